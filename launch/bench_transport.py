#!/usr/bin/env python
"""How activation streams cross between Ray actors, per transport (docs/transport.md).

    python launch/bench.py transport            # hops of 256 MiB and 1 GiB + SmolLM2 prunes
    python launch/bench.py transport --quick    # 64 and 256 MiB, 32 calibration windows

Two timings, all in one run and on one Ray instance:

* **hop**: one actor-to-actor transfer of an fp32 tensor, the size of a stream: actor A
  returns a tensor it holds, actor B receives it and answers with its byte count. Median wall
  time of ``--repeat`` hops, beside an in-process copy of the same tensor (``clone``).
* **prune**: a whole 2-actor Wanda prune of SmolLM2-135M (fp32, CPU, uniform 50 %) per
  transport, in pipeline mode (the mode whose streams cross through the transport), each a
  ``launch/prune.py`` process; the final prune's seconds and the pruned perplexity, which must
  be equal for every transport (the transfers are lossless).

On a CPU the transports available are the object store and gloo (Ray Direct Transport); nccl
needs CUDA actors (the device script measures it). Writes ``benchmarks/transport.json``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from neuroal.outputs.report_keys import model_ppl

REPO = Path(__file__).resolve().parent.parent
MIB = 1 << 20
SIZES_MIB = (256, 1024)
QUICK_SIZES_MIB = (64, 256)


class Holder:
    """A plain actor class for the hop: holds a tensor, hands it on, receives one."""

    def __init__(self) -> None:
        self.tensor: torch.Tensor | None = None

    def make(self, nbytes: int) -> int:
        self.tensor = torch.ones(nbytes // 4, dtype=torch.float32)
        return nbytes

    def give(self) -> torch.Tensor:
        assert self.tensor is not None
        return self.tensor

    def take(self, tensor: torch.Tensor) -> int:
        return tensor.numel() * tensor.element_size()


def hop_seconds(pair: list[Any], options: dict[str, Any], nbytes: int, repeat: int) -> list[float]:
    """Wall seconds of ``repeat`` hops of ``nbytes`` from ``pair[0]`` to ``pair[1]``."""
    import ray

    src, dst = pair
    ray.get(src.make.remote(nbytes))
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        ref = src.give.options(**options).remote()
        got = ray.get(dst.take.remote(ref))
        times.append(time.perf_counter() - t0)
        del ref
        if got != nbytes:
            raise RuntimeError(f"hop delivered {got} bytes, expected {nbytes}")
    ray.get(src.make.remote(4))  # release the big tensor
    return times


def copy_seconds(nbytes: int, repeat: int) -> float:
    """Median seconds of an in-process copy of the same tensor (the floor of any hop)."""
    x = torch.ones(nbytes // 4, dtype=torch.float32)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        y = x.clone()
        times.append(time.perf_counter() - t0)
        del y
    return statistics.median(times)


def hops(names: list[str], sizes_mib: tuple[int, ...], repeat: int) -> list[dict[str, Any]]:
    """One row per (transport, size): median and every hop's seconds, GB/s, in-process copy."""
    import ray
    from ray import cloudpickle

    from neuroal.engine.ray_executor import TRANSPORTS

    # the actors cannot import launch/ modules: ship the class by value
    cloudpickle.register_pickle_by_value(sys.modules[Holder.__module__])
    holder = ray.remote(enable_tensor_transport=True)(Holder)
    pair = [holder.options(num_cpus=1).remote() for _ in range(2)]
    rows = []
    try:
        for name in names:
            transport = TRANSPORTS[name]
            channel = transport.connect(pair)
            try:
                for size in sizes_mib:
                    nbytes = size * MIB
                    times = hop_seconds(pair, transport.options(), nbytes, repeat)
                    median = statistics.median(times)
                    rows.append({"transport": name, "mib": size, "seconds": median,
                                 "all_seconds": times, "gb_per_s": nbytes / median / 1e9,
                                 "copy_seconds": copy_seconds(nbytes, repeat)})
                    print(f"hop {name} {size} MiB: {median:.3f} s", file=sys.stderr, flush=True)
            finally:
                transport.disconnect(channel)
    finally:
        for actor in pair:
            ray.kill(actor)
    return rows


def prunes(names: list[str], opts: argparse.Namespace) -> list[dict[str, Any]]:
    """A 2-actor Wanda prune of SmolLM2 per transport (``launch/prune.py`` processes), in
    pipeline mode: there the stream crosses from actor to actor through the transport (data
    mode moves its tensors over its own process group)."""
    sys.path.insert(0, str(REPO / "launch"))
    from bench import run_prune

    rows = []
    for name in names:
        args = ["--config", "configs/smollm2/wanda-uniform-50.yaml", "--nsamples",
                str(opts.nsamples), "--eval-windows", str(opts.eval_windows), "eval.dense=false",
                "engine.executor=ray", "engine.workers=2", "engine.parallel=pipeline",
                f"engine.ray.transport={name}"]
        report = run_prune(f"transport-{name}", args, Path(opts.out))
        rows.append({"transport": report["engine"]["transport"],
                     "prune_s": report["timings"]["prune"],
                     "prune_utilisation": report["timings"].get("prune_utilisation"),
                     "total_s": report["timings"]["total"],
                     "ppl": model_ppl(report["eval"]["wikitext2"]),
                     "achieved": report["achieved_sparsity"],
                     "command": report["bench_command"].replace(str(opts.out), "<out>")})
        print(f"prune {name}: {rows[-1]['prune_s']:.1f} s, ppl {rows[-1]['ppl']:.4f}",
              file=sys.stderr, flush=True)
    return rows


def table(result: dict[str, Any]) -> str:
    """The printed table (docs/transport.md carries the same, generated from the JSON)."""
    lines = [f"{'transport':<14}{'MiB':>6}{'hop s':>9}{'GB/s':>7}{'copy s':>9}",
             "-" * 45]
    lines += [f"{r['transport']:<14}{r['mib']:>6}{r['seconds']:>9.3f}{r['gb_per_s']:>7.2f}"
              f"{r['copy_seconds']:>9.3f}" for r in result["hops"]]
    lines += ["", f"{'transport':<14}{'prune s':>9}{'total s':>9}{'ppl':>12}", "-" * 44]
    lines += [f"{r['transport']:<14}{r['prune_s']:>9.1f}{r['total_s']:>9.1f}{r['ppl']:>12.4f}"
              for r in result["prunes"]]
    lines.append(f"identical perplexity across transports: {result['identical']}")
    return "\n".join(lines)


def run(opts: argparse.Namespace) -> dict[str, Any]:
    """Every timing of the suite, one Ray instance for the hops."""
    import ray

    from neuroal.engine.ray_executor import TRANSPORTS, init_ray

    names = [n for n in TRANSPORTS if TRANSPORTS[n].device in (None, "cpu")
             and TRANSPORTS[n].available()]
    sizes = QUICK_SIZES_MIB if opts.quick else SIZES_MIB
    owned = init_ray(num_cpus=2)
    try:
        hop_rows = hops(names, sizes, opts.repeat)
    finally:
        if owned:
            ray.shutdown()
    prune_rows = prunes(names, opts)
    return {"hops": hop_rows, "prunes": prune_rows,
            "identical": len({r["ppl"] for r in prune_rows}) <= 1,
            "settings": {"quick": opts.quick, "sizes_mib": list(sizes), "repeat": opts.repeat,
                         "nsamples": opts.nsamples, "seqlen": 512,
                         "eval_windows": opts.eval_windows, "threads": torch.get_num_threads(),
                         "ray": ray.__version__, "torch": torch.__version__,
                         "command": " ".join(["python launch/bench.py transport",
                                              *(["--quick"] if opts.quick else []),
                                              f"--nsamples {opts.nsamples}",
                                              f"--eval-windows {opts.eval_windows}",
                                              f"--repeat {opts.repeat}"])}}
