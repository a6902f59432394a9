#!/usr/bin/env python
"""Device checks of the multi-worker paths on ONE GPU (part of ``launch/gpu_check.sh``).

    python launch/gpu_check_parallel.py ray-share OUT [cpu]  # 2 Ray actors on one GPU vs local
    python launch/gpu_check_parallel.py hop OUT [cpu]        # one actor-to-actor hop per transport
    python launch/gpu_check_parallel.py parallel OUT [cpu]   # engine.parallel data vs pipeline
    python launch/gpu_check_parallel.py dtypes OUT [cpu]     # GPU-bf16 vs CPU-bf16 masks

On a GPU the checkpoints are random Llama blocks of Llama-2-70B width (hidden 8192, MLP 28672,
64 / 8 heads) in bf16; with ``cpu`` (the script's dry run) the same steps run at a tiny width.
Two workers share the one GPU: Ray actors through ``RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES=1``
and ``ray.init(num_gpus=2)`` (each actor reserves one of the two logical GPUs and sees the
physical GPU 0), the local executor through ``engine.devices=[cuda:0, cuda:0]``.

Config keys that other work adds (``engine.ray.transport``, ``engine.parallel``) are probed with
the config validation first: when the tree does not have them yet, the step records
``{"skipped": "<the validation message>"}`` and runs what it can without them. Every step writes
``OUT/<step>.json`` and never raises: failures are recorded as ``{"error": ...}``.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

TRANSPORTS = ("object-store", "gloo", "nccl", "auto")  # engine.ray.transport values
MODES = ("pipeline", "data")  # engine.parallel values
CRITERIA = ("wanda", "sparsegpt")
WIDTH_DRY = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
             "num_key_value_heads": 2, "vocab_size": 320}
"""The CPU dry run's width: checks the script, in seconds."""


# --------------------------------------------------------------------------- shared helpers


def settings(cpu: bool) -> dict[str, Any]:
    """Sizes of the run: 70B width in bf16 on a GPU, tiny on the CPU dry run."""
    from bench_onload import WIDTH_70B

    if cpu:
        return {"device": "cpu", "width": WIDTH_DRY, "blocks": 2, "nsamples": 4, "seqlen": 32,
                "micro_batch": 2, "dtype": "bfloat16", "hop_mib": (1, 4)}
    return {"device": "cuda", "width": WIDTH_70B, "blocks": 2, "nsamples": 8, "seqlen": 512,
            "micro_batch": 4, "dtype": "bfloat16", "hop_mib": (256, 1024)}


def probe(engine: dict[str, Any]) -> str | None:
    """None when ``engine`` (a partial ``engine`` section) validates, else the message: how a
    step finds out whether a config key exists in this tree."""
    from neuroal.config.build import ConfigError, build_config

    try:
        build_config({"engine": engine, "eval": {"datasets": []},
                      "output": {"save_model": False}})
    except ConfigError as exc:
        return str(exc)
    return None


def build(model: Path, s: dict[str, Any], executor: str, workers: int,
          engine: dict[str, Any] | None = None) -> Any:
    """An executor of the registry for the random checkpoint ``model``."""
    from neuroal.config.build import build_config
    from neuroal.engine import EXECUTORS
    from neuroal.models.loading import resolve_model

    device = "cuda:0" if s["device"] == "cuda" else "cpu"
    devices = [device] * (workers if executor == "local" else 1)
    eng = {"executor": executor, "workers": workers, "device": device, "devices": devices,
           "micro_batch": s["micro_batch"], "onload": "device", **(engine or {})}
    cfg = build_config({"model": {"name": str(model), "dtype": s["dtype"]}, "sparsity": 0.5,
                        "calib": {"nsamples": s["nsamples"], "seqlen": s["seqlen"]},
                        "eval": {"datasets": []}, "engine": eng,
                        "output": {"save_model": False}})
    return EXECUTORS.get(executor)(cfg, source=resolve_model(str(model)),
                                   num_blocks=s["blocks"], devices=devices, dtype=s["dtype"])


def checkpoint(directory: Path, s: dict[str, Any]) -> Path:
    """A random Llama checkpoint of ``s["blocks"]`` blocks at ``s["width"]``."""
    from bench_onload import build_checkpoint

    directory.mkdir(parents=True, exist_ok=True)
    build_checkpoint(directory, s["blocks"], s["width"], s["dtype"], s["device"])
    return directory


def calibration(s: dict[str, Any]) -> Any:
    import torch

    return torch.randint(0, s["width"]["vocab_size"], (s["nsamples"], s["seqlen"]),
                         generator=torch.Generator().manual_seed(0))


def prune(ex: Any, criterion: str, ids: Any, model: Path) -> dict[str, Any]:
    """Uniform 50 % final prune; masks, logits of 2 windows after it, and the seconds."""
    from neuroal.allocation.plan import SparsityPlan
    from neuroal.engine.worker import PruneJob
    from neuroal.planning import layout_of

    blocks = layout_of(str(model)).linears  # linear names per block, from the meta skeleton
    plan = SparsityPlan(0.5, "unstructured", [{n: 0.5 for n in b} for b in blocks])
    _sync()
    t0 = time.perf_counter()
    ex.run_final_prune(plan, PruneJob(criterion), ids)
    _sync()
    seconds = time.perf_counter() - t0
    return {"masks": ex.masks(), "logits": ex.logits(ids[:2]).float().cpu(), "seconds": seconds}


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def same(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Bit-identity of masks and logits, and the fraction of mask bits that agree."""
    import torch

    keys = sorted(set(a["masks"]) & set(b["masks"]))
    equal = sum(int((a["masks"][k].cpu() == b["masks"][k].cpu()).sum()) for k in keys)
    total = sum(a["masks"][k].numel() for k in keys)
    masks = keys == sorted(a["masks"]) == sorted(b["masks"]) and equal == total
    return {"identical": bool(masks and torch.equal(a["logits"], b["logits"])),
            "masks_identical": bool(masks), "mask_agreement": equal / max(total, 1),
            "max_abs_logit_diff": float((a["logits"] - b["logits"]).abs().max())}


def guarded(name: str, out: Path, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Run one step; its result (or the error) goes to ``OUT/<name>.json``."""
    t0 = time.perf_counter()
    try:
        info = fn()
    except Exception as exc:  # recorded, never fatal: the other steps still run
        info = {"error": f"{type(exc).__name__}: {exc}",
                "traceback": traceback.format_exc()[-2000:]}
    info["step_seconds"] = time.perf_counter() - t0
    (out / f"{name}.json").write_text(json.dumps(info, indent=2, default=str) + "\n")
    print(json.dumps({k: v for k, v in info.items() if k != "traceback"}, default=str)[:3000])
    return info


def start_ray(cuda: bool) -> Any:
    """A local Ray instance in which two actors share the one GPU."""
    os.environ["RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES"] = "1"
    import ray

    if ray.is_initialized():
        ray.shutdown()
    for attempt in range(3):  # Ray gives its node 30 s to start: too little on a loaded CPU
        try:
            ray.init(num_cpus=4 if cuda else 2, num_gpus=2 if cuda else 0,
                     include_dashboard=False, log_to_driver=False)
            return ray
        except Exception:
            ray.shutdown()
            if attempt == 2:
                raise
    return ray


def ray_missing() -> str | None:
    import importlib.util

    if importlib.util.find_spec("ray") is None:
        return ("ray is not installed on this machine (carry its wheels: see the header of "
                "launch/gpu_check.sh)")
    return None


# --------------------------------------------------------------------------- steps


def ray_share(cpu: bool) -> dict[str, Any]:
    """Two Ray actors sharing the GPU prune bit-identically to one local worker, for every
    ``engine.ray.transport`` in pipeline mode (Wanda; SparseGPT once on the first transport that
    works), then in data mode (the actors' torch.distributed group: gloo through host memory,
    since NCCL refuses two ranks on one GPU), both criteria."""
    if (missing := ray_missing()) is not None:
        return {"skipped": missing}
    s = settings(cpu)
    ids = calibration(s)
    info: dict[str, Any] = {"settings": {k: v for k, v in s.items() if k != "width"},
                            "width": s["width"], "runs": []}
    absent = probe({"ray": {"transport": "object-store"}})
    transports: list[str | None] = [None] if absent else list(TRANSPORTS)
    if absent:
        info["transport_key"] = {"skipped": absent}
    with tempfile.TemporaryDirectory(prefix="neuroal-rayshare-") as tmp:
        model = checkpoint(Path(tmp) / "m", s)
        reference = {c: prune(build(model, s, "local", 1), c, ids, model) for c in CRITERIA}
        ray = start_ray(not cpu)
        try:
            sparsegpt_done = False
            layouts = [("pipeline", t) for t in transports] + [("data", None)]
            for mode, transport in layouts:
                engine = {"parallel": mode,
                          "ray": {"cpus": 1, **({"transport": transport} if transport else {})}}
                for criterion in CRITERIA:
                    if criterion == "sparsegpt" and sparsegpt_done and mode == "pipeline":
                        continue
                    row: dict[str, Any] = {"transport": transport or "(tree default)",
                                           "mode": mode, "criterion": criterion}
                    try:
                        ex = build(model, s, "ray", 2, engine)
                        try:
                            got = prune(ex, criterion, ids, model)
                            row.update(seconds=got["seconds"], **same(got, reference[criterion]))
                            row["report_transport"] = getattr(ex, "transport_name", None)
                            row["report_parallel"] = getattr(ex, "parallel", None)
                        finally:
                            ex.shutdown()
                        sparsegpt_done |= criterion == "sparsegpt"
                    except Exception as exc:  # e.g. NCCL refusing two ranks on one GPU
                        row["error"] = f"{type(exc).__name__}: {str(exc)[:800]}"
                    info["runs"].append(row)
        finally:
            ray.shutdown()
    info["local_seconds"] = {c: r["seconds"] for c, r in reference.items()}
    info["identical"] = all(r.get("identical") for r in info["runs"] if "error" not in r) and \
        any("error" not in r for r in info["runs"])
    return info


def _hop_class(ray: Any, transport: str) -> Any:
    """An actor class whose ``make`` returns a tensor over ``transport`` (RDT for gloo/nccl)."""
    import torch

    class Hop:
        def __init__(self, device: str) -> None:
            self.device = device

        def ready(self) -> bool:
            return True

        def make(self, nbytes: int) -> torch.Tensor:
            return torch.ones(nbytes // 2, dtype=torch.bfloat16, device=self.device)

        def take(self, tensor: torch.Tensor) -> float:
            if tensor.is_cuda:
                torch.cuda.synchronize()
            return float(tensor[-1])

        def local(self, nbytes: int) -> float:
            """The same make and take in one process (a clone stands for the hop)."""
            t = torch.ones(nbytes // 2, dtype=torch.bfloat16, device=self.device)
            t0 = time.perf_counter()
            u = t.clone()
            if u.is_cuda:
                torch.cuda.synchronize()
            return time.perf_counter() - t0

    if transport != "object-store":
        Hop.make = ray.method(tensor_transport=transport)(Hop.make)
    return ray.remote(Hop)


def _hop_times(ray: Any, transport: str, device: str, sizes: tuple[int, ...]) -> dict[str, Any]:
    cls = _hop_class(ray, transport)
    gpus = 1 if device.startswith("cuda") else 0
    a, b = (cls.options(num_cpus=1, num_gpus=gpus).remote(device) for _ in range(2))
    try:
        ray.get([a.ready.remote(), b.ready.remote()])
        if transport != "object-store":
            from ray.experimental.collective import create_collective_group

            create_collective_group([a, b], backend=transport)
        out = {}
        for mib in sizes:
            nbytes = mib * 2 ** 20
            ray.get(b.take.remote(a.make.remote(nbytes)))  # warm-up
            times = []
            for _ in range(3):
                t0 = time.perf_counter()
                ray.get(b.take.remote(a.make.remote(nbytes)))
                times.append(time.perf_counter() - t0)
            local = ray.get(a.local.remote(nbytes))
            out[f"{mib}MiB"] = {"seconds": statistics.median(times), "all": times,
                                "in_process_seconds": local,
                                "bytes_per_s": nbytes / statistics.median(times)}
        return out
    finally:
        for actor in (a, b):
            ray.kill(actor)


def hop(cpu: bool) -> dict[str, Any]:
    """One actor-to-actor hop of a bf16 tensor per transport (median of 3, tensor creation
    on the sender included), beside the same copy in one process."""
    if (missing := ray_missing()) is not None:
        return {"skipped": missing}
    s = settings(cpu)
    device = "cuda:0" if s["device"] == "cuda" else "cpu"
    ray = start_ray(not cpu)
    info: dict[str, Any] = {"device": device, "sizes_mib": list(s["hop_mib"]), "transports": {}}
    try:
        for transport in ("object-store", "gloo", "nccl"):
            if transport == "nccl" and cpu:
                info["transports"][transport] = {"skipped": "NCCL needs CUDA"}
                continue
            try:
                info["transports"][transport] = _hop_times(ray, transport, device, s["hop_mib"])
            except Exception as exc:  # an unsupported transport/device pair is a finding
                info["transports"][transport] = {"error": f"{type(exc).__name__}: "
                                                          f"{str(exc)[:800]}"}
    finally:
        ray.shutdown()
    return info


def parallel(cpu: bool) -> dict[str, Any]:
    """Two local workers on the one device, ``engine.parallel`` data vs pipeline, against one
    worker: prune seconds (SparseGPT's per block feeds the time planner) and bit-identity."""
    s = settings(cpu)
    s["nsamples"] *= 2  # 2 shares of calibration sequences in data mode
    ids = calibration(s)
    absent = probe({"parallel": "data"})
    modes: list[str | None] = [None] if absent else list(MODES)
    info: dict[str, Any] = {"settings": {k: v for k, v in s.items() if k != "width"},
                            "width": s["width"], "runs": []}
    if absent:
        info["parallel_key"] = {"skipped": absent}
    with tempfile.TemporaryDirectory(prefix="neuroal-parallel-") as tmp:
        model = checkpoint(Path(tmp) / "m", s)
        for criterion in CRITERIA:
            one = prune(build(model, s, "local", 1), criterion, ids, model)
            info["runs"].append({"criterion": criterion, "workers": 1, "mode": "-",
                                 "seconds": one["seconds"],
                                 "seconds_per_block": one["seconds"] / s["blocks"]})
            for mode in modes:
                row: dict[str, Any] = {"criterion": criterion, "workers": 2,
                                       "mode": mode or "(tree default: pipeline)"}
                try:
                    engine = {"parallel": mode} if mode else {}
                    got = prune(build(model, s, "local", 2, engine), criterion, ids, model)
                    row.update(seconds=got["seconds"], speedup=one["seconds"] / got["seconds"],
                               **same(got, one))
                except Exception as exc:
                    row["error"] = f"{type(exc).__name__}: {str(exc)[:800]}"
                info["runs"].append(row)
    info["identical"] = all(r.get("identical", True) for r in info["runs"] if "error" not in r)
    return info


def dtypes(cpu: bool) -> dict[str, Any]:
    """Masks of a tiny model pruned in bf16 on the GPU against bf16 on the CPU (like dtypes),
    beside CPU fp32 against CPU bf16 (the gap a dtype change alone makes)."""
    import torch
    from gpu_check import _tiny_model

    from neuroal.engine.executor import LocalExecutor
    from neuroal.models.loading import resolve_model

    ids = torch.randint(0, 320, (8, 64), generator=torch.Generator().manual_seed(0))
    info: dict[str, Any] = {"model": "tiny random llama (hidden 64, 4 blocks)", "rows": []}
    with tempfile.TemporaryDirectory(prefix="neuroal-dtypes-") as tmp:
        _tiny_model(Path(tmp) / "m")
        model = Path(tmp) / "m"
        source = resolve_model(str(model))

        def run(device: str, dtype: str, criterion: str) -> dict[str, Any]:
            return prune(LocalExecutor(source, 4, 1, [device], dtype, 4), criterion, ids, model)

        for criterion in CRITERIA:
            cpu_bf16 = run("cpu", "bfloat16", criterion)
            row: dict[str, Any] = {"criterion": criterion,
                                   "cpu_fp32_vs_cpu_bf16": same(run("cpu", "float32", criterion),
                                                                cpu_bf16)}
            if cpu or not torch.cuda.is_available():
                row["gpu_bf16_vs_cpu_bf16"] = {"skipped": "no CUDA device"}
            else:
                row["gpu_bf16_vs_cpu_bf16"] = same(run("cuda:0", "bfloat16", criterion), cpu_bf16)
            info["rows"].append(row)
    return info


STEPS = {"ray-share": ray_share, "hop": hop, "parallel": parallel, "dtypes": dtypes}


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) < 2 or args[0] not in STEPS:
        raise SystemExit(f"usage: gpu_check_parallel.py {{{','.join(STEPS)}}} OUT [cpu]")
    out = Path(args[1])
    out.mkdir(parents=True, exist_ok=True)
    cpu = len(args) > 2 and args[2] == "cpu"
    info = guarded(args[0].replace("-", "_"), out, lambda: STEPS[args[0]](cpu))
    return 1 if "error" in info else 0


if __name__ == "__main__":
    sys.exit(main())
