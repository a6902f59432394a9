#!/usr/bin/env python
"""Python parts of ``launch/gpu_check.sh`` (one prepared device check).

    python launch/gpu_check.py env OUT         # versions, GPUs, optional deps neuroal imported
    python launch/gpu_check.py nccl OUT [cpu]  # 2 ranks (NCCL; gloo with cpu) vs one local worker
    python launch/gpu_check.py memory OUT [cpu]  # pinned onload arena; SparseGPT's squares
    python launch/gpu_check.py summary OUT     # one table + OUT/gpu_check.json from the parts

The multi-worker checks on one GPU (Ray actors sharing it, hops per transport, engine.parallel,
GPU vs CPU bf16 masks) live in ``launch/gpu_check_parallel.py``; the summary reads their parts.

Needs only torch, transformers, safetensors and neuroal (no Ray, GGUF or DeepSpeed, no data
files, no network): models are random and tiny, written to a temporary directory.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

OPTIONAL = ("ray", "gguf", "deepspeed")


def env(out: Path) -> dict[str, Any]:
    """Versions, devices, and which optional packages importing neuroal's engine pulled in."""
    import importlib.util

    before = {m for m in OPTIONAL if m in sys.modules}
    import torch
    import transformers

    import neuroal.engine.dist  # noqa: F401 - the modules the checks use
    import neuroal.engine.executor  # noqa: F401
    import neuroal.engine.onload  # noqa: F401
    import neuroal.pipeline  # noqa: F401

    pulled = sorted(m for m in OPTIONAL if m in sys.modules and m not in before)
    info = {
        "torch": torch.__version__, "transformers": transformers.__version__,
        "cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available(),
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        "installed": {m: importlib.util.find_spec(m) is not None for m in OPTIONAL},
        "imported_by_neuroal": pulled,
    }
    (out / "env.json").write_text(json.dumps(info, indent=2) + "\n")
    print(json.dumps(info, indent=2))
    return info


# --------------------------------------------------------------------------- 2 ranks


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _tiny_model(directory: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("llama", hidden_size=64, intermediate_size=128,
                                  num_hidden_layers=4, num_attention_heads=4,
                                  num_key_value_heads=2, vocab_size=320,
                                  max_position_embeddings=256, tie_word_embeddings=False)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(directory)


def _cfg(model: str, device: str) -> Any:
    from neuroal.config.build import build_config

    return build_config({"model": {"name": model}, "sparsity": 0.5,
                         "calib": {"nsamples": 4, "seqlen": 16},
                         "eval": {"datasets": []},
                         "engine": {"executor": "dist", "workers": 2, "device": device,
                                    "micro_batch": 2, "onload": "host"},
                         "output": {"save_model": False}})


def _phases(ex: Any, blocks: list[dict[str, Any]]) -> dict[str, Any]:
    import torch

    from neuroal.allocation.plan import SparsityPlan
    from neuroal.engine.worker import CandidateJob, PruneJob

    ids = torch.randint(0, 320, (3, 16), generator=torch.Generator().manual_seed(0))
    cands = [[{n: r for n in b} for b in blocks] for r in (0.3, 0.6)]
    res = ex.evaluate_candidates(ids, cands, CandidateJob("wanda"), "global")
    out = {"na": [[b.na for b in c] for c in res], "nll": ex.window_nll(ids)}
    job = PruneJob("sparsegpt", reconstruct={"steps": 2, "batch_size": 2, "rank": 4})
    ex.run_final_prune(SparsityPlan(0.5, "unstructured", [{n: 0.5 for n in b} for b in blocks]),
                       job, ids)
    out.update(masks=ex.masks(), logits=ex.logits(ids), nll_sparse=ex.window_nll(ids))
    return out


def _same(a: Any, b: Any) -> bool:
    import torch

    if isinstance(b, torch.Tensor):
        return a.dtype == b.dtype and torch.equal(a.cpu(), b.cpu())
    if isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in b)
    if isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


def _rank(rank: int, port: int, model: str, device: str, result: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE="2", LOCAL_RANK=str(rank))
    from neuroal.engine import EXECUTORS, dist
    from neuroal.engine.cluster import run_preflight
    from neuroal.engine.executor import LocalExecutor
    from neuroal.models.loading import resolve_model
    from neuroal.runtime.process import seed_everything

    cfg = _cfg(model, device)
    seed_everything(cfg.seed, True)
    if rank > 0:
        dist.serve(cfg)
        return
    with dist.coordinator(cfg) as session:
        t0 = time.perf_counter()
        # preflight through the rank commands: each rank reports its own device's free memory
        facts = run_preflight(cfg, device, None, session=session)
        ex = EXECUTORS.get("dist")(cfg, source=resolve_model(model), num_blocks=4,
                                   devices=[device], dtype="float32", session=session)
        local_device = "cuda:0" if device == "cuda" else "cpu"
        local = LocalExecutor(resolve_model(model), 4, 1, [local_device], "float32", 2)
        blocks = [dict(b) for b in local.workers[0].adapter.shape().blocks]
        got, want = _phases(ex, blocks), _phases(local, blocks)
        ex.shutdown()
        Path(result).write_text(json.dumps({
            "identical": _same(got, want), "seconds": time.perf_counter() - t0,
            "preflight": [{"rank": f.rank, "device": f.device, "device_free": f.device_free,
                           "device_error": f.device_error} for f in facts]}))


def nccl(out: Path, device: str) -> dict[str, Any]:
    """Two ranks (``onload=host``) against one local on-device worker, every phase."""
    import torch
    import torch.multiprocessing as mp

    if device == "cuda" and torch.cuda.device_count() < 2:
        info = {"skipped": f"{torch.cuda.device_count()} GPU(s): the NCCL check needs 2"}
    else:
        with tempfile.TemporaryDirectory(prefix="neuroal-nccl-") as tmp:
            _tiny_model(Path(tmp) / "m")
            result = Path(tmp) / "result.json"
            ctx = mp.start_processes(_rank, args=(_free_port(), str(Path(tmp) / "m"), device,
                                                  str(result)),
                                     nprocs=2, join=False, start_method="spawn")
            deadline = time.monotonic() + 240
            try:
                while not ctx.join(timeout=5):
                    if time.monotonic() > deadline:
                        raise TimeoutError("2-rank check did not finish in 240 s")
            finally:
                for p in ctx.processes:
                    if p.is_alive():
                        p.kill()
            info = {"backend": "nccl" if device == "cuda" else "gloo",
                    **json.loads(result.read_text())}
    (out / "nccl.json").write_text(json.dumps(info, indent=2) + "\n")
    print(json.dumps(info))
    return info


# --------------------------------------------------------------------------- memory


def _arena_check(device: str) -> dict[str, Any]:
    """One onload arena of a Llama-2-70B-like block slice (a 448 MiB MLP matrix and small
    tensors): pinned in place (no power-of-two rounding), copies to the device and back exact."""
    import torch

    from neuroal.engine.arena import HostArena, arena_bytes

    gen = torch.Generator().manual_seed(0)
    tensors = {"mlp": torch.randn(8192, 28672 if device == "cuda" else 512, generator=gen)
               .to(torch.bfloat16), "norm": torch.randn(8192, generator=gen).to(torch.bfloat16),
               "bias": torch.randn(1000, generator=gen)}
    size = arena_bytes(t.numel() * t.element_size() for t in tensors.values())
    arena = HostArena(tensors, pin=device == "cuda")
    views = arena.views
    back = {n: v.to(device, non_blocking=True).to("cpu") for n, v in views.items()}
    if device == "cuda":
        torch.cuda.synchronize()
    per_tensor = sum(1 << (t.numel() * t.element_size() - 1).bit_length() for t in tensors.values())
    info = {"arena_bytes": arena.nbytes, "planned_bytes": size,
            "tensor_by_tensor_pinned_bytes": per_tensor,
            "pinned": all(v.is_pinned() for v in views.values()) if device == "cuda" else None,
            "exact": all(torch.equal(back[n], t) for n, t in tensors.items())}
    arena.release()
    info["ok"] = info["exact"] and arena.nbytes == size and info["pinned"] is not False
    return info


def _sparsegpt_check(device: str) -> dict[str, Any]:
    """SparseGPT on the device: bit-identical to the frozen pre-change implementation, and the
    device peak beyond the inputs within 3 squares + the sweep's per-weight bytes."""
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from reference_sparsegpt import reference_prune

    from neuroal.criteria import CRITERIA
    from neuroal.criteria.base import LayerStats, LayerTarget, NMPattern
    from neuroal.planning.memory import SPARSEGPT_BYTES

    rows, cols = (1024, 4096) if device == "cuda" else (64, 512)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4 * cols, cols, generator=gen) @ torch.randn(cols, cols, generator=gen) / 50
    hessian = (2 * x.T @ x / x.shape[0]).to(device)
    weight = torch.randn(rows, cols, generator=gen).to(device, torch.bfloat16)
    del x
    opts = {"percdamp": 0.01, "blocksize": 128, "on_cholesky_failure": "raise"}
    out: dict[str, Any] = {"rows": rows, "cols": cols}
    for label, target in (("unstructured", LayerTarget(0.5)),
                          ("2:4", LayerTarget(0.5, nm=NMPattern(2, 4)))):
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        new = CRITERIA.get("sparsegpt").prune(weight, LayerStats(hessian=hessian), target, opts)
        peak = torch.cuda.max_memory_allocated() - base if device == "cuda" else None
        old = reference_prune(weight, hessian, target, opts)
        out[label] = {"identical": torch.equal(new.mask, old.mask)
                      and torch.equal(new.weight, old.weight),
                      "peak_squares": None if peak is None else peak / (4 * cols * cols),
                      "bound_squares": 3 + SPARSEGPT_BYTES * rows * cols / (4 * cols * cols)}
    out["ok"] = all(out[k]["identical"] and (out[k]["peak_squares"] is None or
                                             out[k]["peak_squares"] <= out[k]["bound_squares"])
                    for k in ("unstructured", "2:4"))
    return out


def memory(out: Path, device: str) -> dict[str, Any]:
    """The memory checks (pinned arena, SparseGPT) as OUT/memory.json."""
    import torch

    torch.backends.cuda.matmul.allow_tf32 = False
    info = {"device": device, "arena": _arena_check(device), "sparsegpt": _sparsegpt_check(device)}
    info["ok"] = info["arena"]["ok"] and info["sparsegpt"]["ok"]
    (out / "memory.json").write_text(json.dumps(info, indent=2) + "\n")
    print(json.dumps(info))
    return info


# --------------------------------------------------------------------------- summary

PARALLEL_PARTS = ("ray_share", "hop", "parallel", "dtypes")
"""Parts written by launch/gpu_check_parallel.py."""


def parallel_ok(part: dict[str, Any]) -> bool:
    """A part of gpu_check_parallel.py passes unless it failed or found a difference where
    bit-identity is claimed (ray_share, parallel); skipped steps pass, measurements pass."""
    return "error" not in part and part.get("identical", True) is not False


def parallel_line(part: dict[str, Any]) -> str:
    """One line per part: skipped, error, or its rows in short."""
    if "skipped" in part or "error" in part or "missing" in part:
        return str({k: part[k] for k in ("skipped", "error", "missing") if k in part})
    if "runs" in part:
        rows = [f"{r.get('transport') or r.get('mode')}/{r['criterion']}"
                + (f" {r['seconds']:.2f} s identical={r.get('identical')}" if "seconds" in r
                   else f" {r.get('error', '')[:120]}") for r in part["runs"]]
        return f"identical={part.get('identical')}; " + "; ".join(rows)
    if "transports" in part:
        return "; ".join(f"{t}: " + (", ".join(f"{size} {v['seconds']:.3f} s" for size, v in
                                               r.items()) if "seconds" in
                                     next(iter(r.values()), {}) else str(r)[:160])
                         for t, r in part["transports"].items())
    return json.dumps(part.get("rows", part), default=str)[:600]


def summary(out: Path) -> int:
    """Collect the parts into OUT/gpu_check.json and print one table."""
    parts = {}
    for name in ("env", "pytest", "nccl", "onload", "recover_memory", "memory", *PARALLEL_PARTS):
        path = out / f"{name}.json"
        parts[name] = json.loads(path.read_text()) if path.is_file() else {"missing": True}
    (out / "gpu_check.json").write_text(json.dumps(parts, indent=2) + "\n")
    e = parts["env"]
    print(f"torch {e.get('torch')} cuda {e.get('cuda')} gpus {e.get('gpus')} "
          f"optional deps imported by neuroal: {e.get('imported_by_neuroal')}")
    print(f"pytest -m gpu: {parts['pytest']}")
    print(f"2-rank check: {parts['nccl']}")
    onload = parts["onload"]
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    if "rows" in onload:
        from bench_onload import table

        s = onload["settings"]
        print(f"onload timings: {onload.get('gpu') or 'cpu'}, {s['blocks']} blocks of width "
              f"{onload['width']['hidden_size']}/{onload['width']['intermediate_size']}, "
              f"{s['dtype']}, {s['nsamples']} x {s['seqlen']} tokens, micro-batch "
              f"{s['micro_batch']}")
        print(table(onload))
    else:
        print(f"onload timings: {onload}")
    recover = parts["recover_memory"]
    if "rows" in recover:
        from bench_recover_memory import table as recover_table

        print("recovery memory (measured device peak vs planner):")
        print(recover_table(recover))
    else:
        print(f"recovery memory: {recover}")
    for name in PARALLEL_PARTS:
        print(f"{name}: {parallel_line(parts[name])}")
    print(f"memory (pinned arena, SparseGPT squares): {parts['memory']}")
    ran = {k for k, v in parts.items() if not v.get("missing")}  # --only runs a subset
    ok = all([
        not e.get("imported_by_neuroal"),
        parts["pytest"].get("rc", 0) in (0, 5),
        "nccl" not in ran or parts["nccl"].get("identical", "skipped" in parts["nccl"]),
        "onload" not in ran or all(r.get("identical") for r in
                                   onload.get("rows", [{"identical": False}])),
        "recover_memory" not in ran or all(r.get("within") for r in
                                           recover.get("rows", [{"within": False}])),
        "memory" not in ran or bool(parts["memory"].get("ok")),
        *(parallel_ok(parts[name]) for name in PARALLEL_PARTS if name in ran),
    ])
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


def main() -> int:
    what, out = sys.argv[1], Path(sys.argv[2])
    out.mkdir(parents=True, exist_ok=True)
    if what == "env":
        env(out)
        return 0
    if what == "nccl":
        info = nccl(out, "cpu" if len(sys.argv) > 3 and sys.argv[3] == "cpu" else "cuda")
        return 0 if info.get("identical", True) else 1
    if what == "memory":
        return 0 if memory(out, "cpu" if len(sys.argv) > 3 and sys.argv[3] == "cpu"
                           else "cuda")["ok"] else 1
    if what == "summary":
        return summary(out)
    raise SystemExit(f"unknown part {what!r}: expected env, nccl, memory or summary")


if __name__ == "__main__":
    sys.exit(main())
