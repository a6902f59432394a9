"""The device script's multi-worker steps (launch/gpu_check_parallel.py): how a step finds out
that a config key is missing, how it compares two prunes, and how the summary judges it. The
steps themselves need a GPU (or a slow CPU dry run: `bash launch/gpu_check.sh --cpu`)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import torch

LAUNCH = Path(__file__).resolve().parents[1] / "launch"


def _load(name: str):
    sys.path.insert(0, str(LAUNCH))
    spec = importlib.util.spec_from_file_location(name, LAUNCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_probe_names_a_missing_key_and_passes_a_known_one() -> None:
    parallel = _load("gpu_check_parallel")
    assert parallel.probe({"workers": 2}) is None
    message = parallel.probe({"no_such_key": 1})
    assert message is not None and "engine.no_such_key" in message


def test_same_reports_identity_and_agreement() -> None:
    parallel = _load("gpu_check_parallel")
    mask = torch.tensor([[True, False], [False, True]])
    a = {"masks": {"x": mask}, "logits": torch.zeros(1, 2)}
    b = {"masks": {"x": mask.clone()}, "logits": torch.zeros(1, 2)}
    assert parallel.same(a, b)["identical"] is True
    c = {"masks": {"x": ~mask}, "logits": torch.ones(1, 2)}
    got = parallel.same(a, c)
    assert got["identical"] is False and got["mask_agreement"] == 0.0
    assert got["max_abs_logit_diff"] == 1.0


def test_summary_verdict_of_the_parallel_parts() -> None:
    check = _load("gpu_check")
    assert check.parallel_ok({"skipped": "ray is not installed"})
    assert check.parallel_ok({"transports": {"nccl": {"error": "duplicate GPU"}}})  # a finding
    assert not check.parallel_ok({"error": "RuntimeError: boom"})
    assert not check.parallel_ok({"runs": [], "identical": False})
    line = check.parallel_line({"identical": True, "runs": [
        {"transport": "gloo", "criterion": "wanda", "seconds": 1.5, "identical": True},
        {"transport": "nccl", "criterion": "wanda", "error": "NCCL error"}]})
    assert "gloo/wanda 1.50 s identical=True" in line and "nccl/wanda NCCL error" in line
