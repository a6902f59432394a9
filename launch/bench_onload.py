#!/usr/bin/env python
"""Sequential onloading benchmark: time per block with the blocks on the device vs onloaded
from host memory (with and without the prefetch of the next block) or from disk.

    PYTHONPATH=. python launch/bench_onload.py --tiny                 # CPU, tiny width, seconds
    PYTHONPATH=. python launch/bench_onload.py --device cuda          # 70B width, bf16, 4 blocks

A random Llama checkpoint with ``--blocks`` blocks (default: Llama-2-70B width: hidden 8192,
MLP 28672, 64 heads / 8 KV heads, vocab 32000) is written as safetensors; for every mode a fresh
:class:`neuroal.engine.worker.Worker` owning all blocks loads it, then (1) runs ``--repeat``
dense forward passes of ``nsamples x seqlen`` tokens over its blocks and (2) prunes every block
once with Wanda (statistics, masks, pruned forward: the final prune's loop). Reported per mode:
ms per block of each, the device peak, the time the compute waited for a block to arrive,
and whether the outputs and masks equal the on-device run bit for bit. ``copy_ms`` is one
block's host-to-device copy alone; ``overlap`` = the share of it hidden by the prefetch:
``1 - (t_prefetch - t_device) / copy_ms`` (forward pass). Also used by ``launch/bench.py
onload`` and ``launch/gpu_check.sh``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

WIDTH_70B = {"hidden_size": 8192, "intermediate_size": 28672, "num_attention_heads": 64,
             "num_key_value_heads": 8, "vocab_size": 32000}
WIDTH_TINY = {"hidden_size": 256, "intermediate_size": 1024, "num_attention_heads": 8,
              "num_key_value_heads": 2, "vocab_size": 1000}
MODES = [("device", True), ("host", True), ("host", False), ("disk", True)]


def build_checkpoint(directory: Path, blocks: int, width: dict[str, int], dtype: str,
                     device: str, seed: int = 0) -> None:
    """Random Llama weights (std 0.02, norms 1), one shard per block; drawn on ``device``
    (fast on a GPU), stored in ``dtype``."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoConfig

    from neuroal.models.loading import DTYPE_NAMES, build_skeleton

    config = AutoConfig.for_model("llama", num_hidden_layers=blocks, max_position_embeddings=4096,
                                  rms_norm_eps=1e-5, tie_word_embeddings=False, dtype=dtype,
                                  **width)
    gen = torch.Generator(device=device).manual_seed(seed)
    shards: dict[str, dict[str, Any]] = {}
    for name, p in build_skeleton(config, torch.float32).named_parameters():
        fname = (f"block-{int(name.split('.')[2]):03d}.safetensors" if ".layers." in name
                 else "rest.safetensors")
        shards.setdefault(fname, {})[name] = tuple(p.shape)
    weight_map, total = {}, 0
    for fname, members in shards.items():
        tensors = {}
        for name, shape in members.items():
            value = (torch.ones(shape, device=device) if len(shape) == 1 else
                     torch.randn(shape, generator=gen, device=device) * 0.02)
            tensors[name] = value.to(DTYPE_NAMES[dtype]).cpu().contiguous()
            weight_map[name] = fname
            total += tensors[name].numel() * tensors[name].element_size()
        save_file(tensors, str(directory / fname), metadata={"format": "pt"})
    (directory / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}))
    config.save_pretrained(directory)


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _copy_ms(worker: Any, device: str, repeat: int) -> float:
    """One block's host-to-device copy (pinned on CUDA), alone."""
    store = worker.store
    host = store.host_tensors(store.order[0])
    times = []
    for _ in range(repeat + 1):
        _sync(device)
        t0 = time.perf_counter()
        out = {n: t.to(device, copy=True) for n, t in host.items()}
        _sync(device)
        times.append(time.perf_counter() - t0)
        del out
    return 1000 * min(times[1:])


def time_mode(model_dir: Path, mode: str, prefetch: bool, opts: argparse.Namespace,
              ids: Any, stream: Any) -> tuple[dict[str, Any], Any, dict[str, Any]]:
    """Load a fresh worker with ``mode``, time forward passes and one Wanda prune."""
    import torch

    from neuroal.engine.worker import PruneJob, Worker, WorkerSpec
    from neuroal.models.loading import resolve_model

    if opts.device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    spec = WorkerSpec(resolve_model(str(model_dir)), 0, opts.blocks, opts.blocks, opts.device,
                      opts.dtype, opts.micro_batch, onload=mode, prefetch=prefetch)
    worker = Worker(spec)
    load_s = time.perf_counter() - t0
    x = stream.to(opts.device)
    out = worker.forward(x)  # warm-up (kernels, allocator)
    _sync(opts.device)
    t0 = time.perf_counter()
    for _ in range(opts.repeat):
        out = worker.forward(x)
    _sync(opts.device)
    forward_ms = 1000 * (time.perf_counter() - t0) / (opts.repeat * opts.blocks)
    wait_before = worker.store.wait_seconds if worker.store else 0.0
    _sync(opts.device)
    t0 = time.perf_counter()
    s = x
    for index in worker.blocks:
        entries = {n: 0.5 for n in worker.adapter.prunable_linears(worker.adapter.blocks[index])}
        s, _ = worker.prune_one(index, s, entries, PruneJob("wanda"))
    _sync(opts.device)
    prune_ms = 1000 * (time.perf_counter() - t0) / opts.blocks
    copy_ms = _copy_ms(worker, opts.device, 2) if worker.store else 0.0
    row = {"mode": mode, "prefetch": prefetch if mode != "device" else None, "load_s": load_s,
           "forward_ms_per_block": forward_ms, "prune_ms_per_block": prune_ms,
           "copy_ms_per_block": copy_ms,
           "device_peak_bytes": (torch.cuda.max_memory_allocated() if
                                 opts.device.startswith("cuda") else None),
           "store": worker.store.stats() if worker.store else None,
           "prune_wait_ms_per_block": (1000 * (worker.store.wait_seconds - wait_before) / opts.blocks
                                       if worker.store else 0.0)}
    result = {"forward": out.cpu(), "pruned": s.cpu(), "masks": worker.masks()}
    worker.close()
    del worker
    return row, out, result


def run(opts: argparse.Namespace) -> dict[str, Any]:
    """Every mode on one checkpoint; rows plus the identity check against ``device``."""
    import os

    import torch

    if opts.device.startswith("cuda"):
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    if opts.threads:
        torch.set_num_threads(opts.threads)
    width = WIDTH_TINY if opts.tiny else WIDTH_70B
    work = Path(tempfile.mkdtemp(prefix="neuroal-onload-bench-", dir=opts.tmp))
    rows = []
    try:
        t0 = time.perf_counter()
        build_checkpoint(work, opts.blocks, width, opts.dtype, opts.device)
        build_s = time.perf_counter() - t0
        gen = torch.Generator().manual_seed(0)
        ids = torch.randint(0, width["vocab_size"], (opts.nsamples, opts.seqlen), generator=gen)
        stream = (torch.randn(opts.nsamples, opts.seqlen, width["hidden_size"], generator=gen)
                  ).to(getattr(torch, opts.dtype))
        reference = None
        for mode, prefetch in MODES:
            if mode not in opts.modes:
                continue
            row, _, result = time_mode(work, mode, prefetch, opts, ids, stream)
            if reference is None:
                reference = result
            row["identical"] = all(
                torch.equal(result[k], reference[k]) for k in ("forward", "pruned")) and all(
                torch.equal(result["masks"][n], reference["masks"][n]) for n in reference["masks"])
            rows.append(row)
            print(f"{mode:<6} prefetch={row['prefetch']!s:<5} forward {row['forward_ms_per_block']:9.2f} "
                  f"ms/block, prune {row['prune_ms_per_block']:9.2f} ms/block, copy "
                  f"{row['copy_ms_per_block']:8.2f} ms, identical {row['identical']}",
                  file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    device_row = next((r for r in rows if r["mode"] == "device"), None)
    for r in rows:
        if device_row is not None and r["mode"] != "device" and r["copy_ms_per_block"] > 0:
            extra = r["forward_ms_per_block"] - device_row["forward_ms_per_block"]
            r["overlap"] = max(0.0, min(1.0, 1 - extra / r["copy_ms_per_block"]))
            r["forward_slowdown"] = r["forward_ms_per_block"] / device_row["forward_ms_per_block"]
            r["prune_slowdown"] = r["prune_ms_per_block"] / device_row["prune_ms_per_block"]
    settings = {k: v for k, v in vars(opts).items() if k not in ("func",)}
    gpu = torch.cuda.get_device_name() if opts.device.startswith("cuda") else None
    return {"settings": settings, "width": width, "build_s": build_s, "gpu": gpu,
            "threads": torch.get_num_threads(), "rows": rows}


def table(result: dict[str, Any]) -> str:
    head = (f"{'mode':<7}{'prefetch':<9}{'fwd ms/blk':>11}{'prune ms/blk':>13}{'copy ms':>9}"
            f"{'overlap':>9}{'fwd x':>7}{'prune x':>8}{'dev peak GB':>12}{'identical':>10}")
    lines = [head]
    for r in result["rows"]:
        peak = r["device_peak_bytes"]
        lines.append(
            f"{r['mode']:<7}{str(r['prefetch']):<9}{r['forward_ms_per_block']:>11.2f}"
            f"{r['prune_ms_per_block']:>13.2f}{r['copy_ms_per_block']:>9.2f}"
            f"{r.get('overlap', float('nan')):>9.2f}{r.get('forward_slowdown', 1.0):>7.2f}"
            f"{r.get('prune_slowdown', 1.0):>8.2f}"
            f"{(peak / 1e9 if peak else float('nan')):>12.2f}{str(r['identical']):>10}")
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="onloading: time per block vs on-device")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--tiny", action="store_true", help="tiny width (CPU smoke run)")
    p.add_argument("--blocks", type=int, default=4)
    p.add_argument("--dtype", default=None, help="default: bfloat16 on cuda, float32 on cpu")
    p.add_argument("--nsamples", type=int, default=8)
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--modes", default="device,host,disk", help="comma list of device,host,disk")
    p.add_argument("--threads", type=int, default=None,
                   help="intra-op threads (default: 1 on cpu, where a shared machine's OpenMP "
                        "barriers otherwise dominate tiny blocks; torch's default on cuda)")
    p.add_argument("--tmp", default=None, help="where to write the random checkpoint")
    p.add_argument("--json", default=None)
    return p


def finish(opts: argparse.Namespace) -> argparse.Namespace:
    if opts.threads is None and not opts.device.startswith("cuda"):
        opts.threads = 1
    opts.dtype = opts.dtype or ("bfloat16" if opts.device.startswith("cuda") else "float32")
    opts.modes = [m for m in str(opts.modes).split(",") if m] if isinstance(opts.modes, str) \
        else list(opts.modes)
    return opts


def main() -> int:
    opts = finish(parser().parse_args())
    result = run(opts)
    print(table(result))
    if opts.json:
        Path(opts.json).parent.mkdir(parents=True, exist_ok=True)
        Path(opts.json).write_text(json.dumps(result, indent=2, default=str) + "\n")
    return 0 if all(r["identical"] for r in result["rows"]) else 1


if __name__ == "__main__":
    sys.exit(main())
