#!/usr/bin/env python
"""Scale benchmark: the memory planner against real workers at Llama-2-70B block width.

    nice -n 10 python launch/bench_scale.py                       # 4 blocks, 2 workers, fp32
    nice -n 10 python launch/bench_scale.py --blocks 2 --cli      # + the real CLI, one process
    nice -n 10 python launch/bench_scale.py --workers 1 --onload disk   # sequential onloading

A random checkpoint with Llama-2-70B's block geometry (hidden 8192, MLP 28672, 64 heads / 8 KV
heads, vocab 32000) but only ``--blocks`` blocks is written as sharded safetensors (one shard per
block, one for the embedding, one for the final norm and head; stored in bf16 like the real
checkpoint), with a small byte-level BPE tokenizer (its ids fit the 32000-row embedding).

Measurement. The local executor runs every worker in one process, so its peak mixes the slices.
Instead each worker runs in its own process, exactly as a Ray actor or a torch.distributed rank
would: it builds the same :class:`neuroal.engine.worker.Worker` (lazy loading of its own shards),
embeds the calibration windows (first worker) or reads the stream handed over by the previous
worker, prunes its blocks with ``prune_one`` (statistics, masks, propagation: the final prune of
``launch/prune.py``) and, on the last worker, computes the windows' NLL through the head. Its
peak resident set (``VmHWM``, reset after the imports) is compared with the planner's prediction
for the same settings: the process peak against the planner's total (the planner's CPU overhead
constant stands for the runtime), and the peak above the post-import baseline against the total
minus that constant. Run in fp32 because this CPU has no bf16 matrix units (bf16 GEMMs are ~6x
slower); 4 blocks at fp32 are 15.8 GB, so two worker processes of ~8 GB each fit in 24 GiB of
RAM one after the other, while the one-process CLI run needs ~20 GB (``--cli`` with
``--blocks 2`` measures that path). Each worker also records the shard files it opened, which must
be exactly those holding its tensors. With ``--onload host|disk`` each worker keeps its blocks
off the "device"; on a CPU device and host share the RAM, so the process peak is
compared with the planner's device total plus its host figure, and the device-equivalent peak
(process peak minus the host copies the worker holds) with the device total alone. Results: a
table on stdout, JSON in outputs/bench/scale.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
DATA_DIR = REPO.parent / "shared" / "data"
WIDTH = {"hidden_size": 8192, "intermediate_size": 28672, "num_attention_heads": 64,
         "num_key_value_heads": 8, "vocab_size": 32000, "max_position_embeddings": 4096,
         "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2}
HALF_WIDTH = {**WIDTH, "hidden_size": 4096, "intermediate_size": 14336, "num_attention_heads": 32}
"""Llama-3-8B's block geometry (a quarter of the 70B block's weights, an eighth of its flops)."""
TOLERANCE = 0.25


def proc_status(key: str) -> int:
    """A ``/proc/self/status`` memory field in bytes (VmRSS, VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


# --------------------------------------------------------------------------- checkpoint


def shard_of(name: str, blocks_prefix: str = "model.layers.") -> str:
    """One shard per block, one for the embedding, one for the final norm and head."""
    if name.startswith(blocks_prefix):
        return f"model-block-{int(name[len(blocks_prefix):].split('.')[0]):03d}.safetensors"
    return "model-embed.safetensors" if "embed_tokens" in name else "model-head.safetensors"


def build_checkpoint(directory: Path, blocks: int, store_dtype: str, seed: int) -> None:
    """Random Llama weights (std 0.02, norms 1) at 70B width, sharded, plus a tokenizer."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoConfig

    from neuroal.models.loading import DTYPE_NAMES, build_skeleton

    config = AutoConfig.for_model("llama", num_hidden_layers=blocks, dtype=store_dtype, **WIDTH)
    names = [(n, tuple(p.shape)) for n, p in build_skeleton(config, torch.float32).named_parameters()]
    gen = torch.Generator().manual_seed(seed)
    groups: dict[str, list[tuple[str, tuple[int, ...]]]] = {}
    for name, shape in names:
        groups.setdefault(shard_of(name), []).append((name, shape))
    weight_map, total = {}, 0
    for fname, members in groups.items():
        tensors = {}
        for name, shape in members:
            value = torch.ones(shape) if len(shape) == 1 else torch.randn(shape, generator=gen) * 0.02
            tensors[name] = value.to(DTYPE_NAMES[store_dtype]).contiguous()
            weight_map[name] = fname
            total += tensors[name].numel() * tensors[name].element_size()
        save_file(tensors, str(directory / fname), metadata={"format": "pt"})
        del tensors
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    config.save_pretrained(directory)
    build_tokenizer(directory)


def _tokenizer_text() -> str:
    """WikiText-2 validation text; on a machine without the data folder (a lent GPU machine) the
    standard library's help texts (``pydoc_data.topics``), which every CPython ships."""
    path = DATA_DIR / "wikitext2" / "wiki.valid.tokens"
    if path.is_file():
        return path.read_text(encoding="utf-8")[:300_000]
    from pydoc_data.topics import topics

    return "\n".join(topics[k] for k in sorted(topics))[:300_000]


def build_tokenizer(directory: Path, vocab: int = 512) -> None:
    """A byte-level BPE tokenizer learnt from WikiText-2 validation text (ids < ``vocab``)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    learner = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    text = _tokenizer_text()
    bpe.train_from_iterator(text.splitlines(), trainer=learner)
    PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(directory)


# --------------------------------------------------------------------------- one worker


def run_worker(job: dict[str, Any]) -> dict[str, Any]:
    """Child process: load one slice, prune it, report peak memory and opened shards."""
    import torch

    from neuroal.engine.worker import PruneJob, Worker, WorkerSpec
    from neuroal.models.loading import resolve_model
    from neuroal.runtime.process import seed_everything

    seed_everything(0, True)  # as the CLI does
    baseline = proc_status("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current resident size
    t0 = time.perf_counter()
    spec = WorkerSpec(resolve_model(job["model"]), job["start"], job["stop"], job["blocks"], "cpu",
                      job["dtype"], job["micro_batch"], rank=job["rank"],
                      onload=job.get("onload", "device"))
    worker = Worker(spec)
    loaded = time.perf_counter() - t0
    ids = torch.load(job["ids"])
    stream = worker.embed(ids) if spec.start == 0 else torch.load(job["stream_in"])
    zeros = numel = 0
    state = job.get("state")
    sync_writes = []
    if state:  # the resume state of the final prune (neuroal.outputs.checkpoint), written per block
        (Path(state) / "prune").mkdir(parents=True, exist_ok=True)
        sync_writes = time_sync_state_writes()
    block_s = []
    for index in worker.blocks:
        linears = worker.adapter.prunable_linears(worker.adapter.blocks[index])
        t_block = time.perf_counter()
        stream, report = worker.prune_one(index, stream, {n: job["sparsity"] for n in linears},
                                          PruneJob(job["criterion"], state_dir=state))
        block_s.append(time.perf_counter() - t_block)
        zeros += sum(r.zeros for r in report.layers)
        numel += sum(r.numel for r in report.layers)
    state_facts = state_summary(worker, state, sync_writes) if state else None
    nll = None
    if worker.last:
        nll = float(worker.window_nll(stream, ids).mean())
    else:
        torch.save(stream, job["stream_out"])
    weight_map = worker.checkpoint.weight_map
    owned = sorted({weight_map[worker.adapter.checkpoint_key(n)] for n in worker.loaded})
    store = worker.store
    host = store.host_bytes() if store is not None else 0  # host arenas as allocated
    return {"rank": spec.rank, "blocks": [spec.start, spec.stop], "baseline_rss": baseline,
            "host_store_bytes": host, "onload": store.stats() if store is not None else None,
            "peak_rss": proc_status("VmHWM"), "opened": sorted(worker.checkpoint.opened),
            "owned_shards": owned, "achieved": zeros / numel, "load_s": loaded,
            "total_s": time.perf_counter() - t0, "calib_nll": nll, "block_s": block_s,
            "state": state_facts}


def time_sync_state_writes() -> list[float]:
    """Seconds of each synchronous block-state write, for a worker that writes its state in
    ``prune_one`` itself (neuroal before the background writer; a background writer reports
    its own counters, see :func:`state_summary`)."""
    import neuroal.engine.worker as worker_module

    seconds: list[float] = []
    original = getattr(worker_module, "save_block_state", None)
    if original is None:
        return seconds

    def timed(*args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            seconds.append(time.perf_counter() - t0)

    worker_module.save_block_state = timed
    return seconds


def state_summary(worker: Any, state: str, sync_writes: list[float]) -> dict[str, Any]:
    """Bytes of the resume state's block files (digests included) and the seconds the prune
    spent on the state: each synchronous write, or a background writer's counters (seconds
    the writer thread spent, seconds the prune waited for it)."""
    files = sorted((Path(state) / "prune").iterdir())
    facts: dict[str, Any] = {"files": len(files),
                             "bytes": sum(f.stat().st_size for f in files)}
    writer = getattr(worker, "state_writer", None)
    if writer is not None:
        facts["writer"] = writer.stats()
        facts["critical_path_s"] = writer.stats()["wait_seconds"]
    else:
        facts["sync_write_s"] = sync_writes
        facts["critical_path_s"] = sum(sync_writes)
    return facts


def spawn(args: list[str]) -> tuple[int, int, str]:
    """Run a child; returns (exit code, its own peak RSS from wait4, stderr tail)."""
    proc = subprocess.Popen(args, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    stderr = proc.stderr.read() if proc.stderr else ""
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, usage.ru_maxrss * 1024, stderr[-3000:]


# --------------------------------------------------------------------------- driver


def predict(model_dir: Path, opts: argparse.Namespace) -> Any:
    from neuroal.models.loading import load_model_config, resolve_model
    from neuroal.planning import MemoryRequest, plan_memory

    request = MemoryRequest(workers=opts.workers, dtype=opts.dtype, nsamples=opts.nsamples,
                            seqlen=opts.seqlen, micro_batch=opts.micro_batch,
                            criterion=opts.criterion, device_type="cpu", eval_seqlen=opts.seqlen,
                            onload=opts.onload)
    return plan_memory(load_model_config(resolve_model(str(model_dir))), request)


def calibration_ids(model_dir: Path, opts: argparse.Namespace, path: Path) -> None:
    import torch
    from transformers import AutoTokenizer

    from neuroal.data import load_calibration

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    calib = load_calibration("wikitext2", tokenizer, opts.nsamples, opts.seqlen, 0, DATA_DIR)
    torch.save(calib.windows, path)


def measure_workers(model_dir: Path, work: Path, plan: Any, opts: argparse.Namespace) -> list[dict]:
    rows = []
    for row in plan.workers:
        job = {"model": str(model_dir), "start": row.start, "stop": row.stop,
               "blocks": plan.num_blocks, "rank": row.rank, "dtype": opts.dtype,
               "micro_batch": opts.micro_batch, "criterion": opts.criterion,
               "sparsity": opts.sparsity, "ids": str(work / "ids.pt"), "onload": opts.onload,
               "stream_in": str(work / f"stream{row.rank}.pt"),
               "state": str(work / "state") if opts.state else None,
               "stream_out": str(work / f"stream{row.rank + 1}.pt"),
               "result": str(work / f"worker{row.rank}.json")}
        code, _, err = spawn([sys.executable, __file__, "--child", json.dumps(job)])
        if code != 0:
            raise SystemExit(f"worker {row.rank} failed ({code}):\n{err}")
        result = json.loads(Path(job["result"]).read_text())
        predicted = row.total + row.host  # on a CPU the "device" and the host are one memory
        device_equiv = result["peak_rss"] - result["host_store_bytes"]
        result.update(predicted=predicted, predicted_parts={
            k: getattr(row, k) for k in ("weights", "activations", "statistics", "transients",
                                         "overhead", "host_weights")},
            error=result["peak_rss"] / predicted - 1,
            error_above_baseline=(result["peak_rss"] - result["baseline_rss"])
            / (predicted - row.overhead) - 1,
            predicted_device=row.total, measured_device_equiv=device_equiv,
            device_error=device_equiv / row.total - 1,
            predicted_host=row.host, measured_host=result["host_store_bytes"],
            shards_ok=result["opened"] == result["owned_shards"])
        rows.append(result)
        print(f"worker {row.rank}: peak {result['peak_rss'] / 1e9:.2f} GB, predicted "
              f"{predicted / 1e9:.2f} GB ({result['error']:+.1%}), {result['total_s']:.0f} s, "
              f"blocks {', '.join(f'{s:.1f}' for s in result['block_s'])} s, state "
              f"{result['state']}", file=sys.stderr, flush=True)
    return rows


def measure_cli(model_dir: Path, plan: Any, opts: argparse.Namespace) -> dict[str, Any]:
    """The real ``launch/prune.py`` (all workers in one process) against the planner's
    ``one_process`` figure (all weights + the largest working set + one overhead)."""
    args = [sys.executable, str(REPO / "launch" / "prune.py"), "--model", str(model_dir),
            "--workers", str(opts.workers), "--device", "cpu", "--dtype", opts.dtype,
            "--calib", "wikitext2", "--data-dir", str(DATA_DIR), "--nsamples", str(opts.nsamples),
            "--seqlen", str(opts.seqlen), "--micro-batch", str(opts.micro_batch), "--eval", "none",
            "--criterion", opts.criterion, "--sparsity", str(opts.sparsity), "--no-save"]
    t0 = time.perf_counter()
    code, peak, err = spawn(args)
    if code != 0:
        raise SystemExit(f"launch/prune.py failed ({code}):\n{err}")
    predicted = plan.one_process
    return {"command": " ".join(args[1:]), "peak_rss": peak, "predicted": predicted,
            "error": peak / predicted - 1, "wall_s": time.perf_counter() - t0}


def table(rows: list[dict], cli: dict | None) -> str:
    head = (f"{'worker':>6} {'blocks':>7} {'weights':>8} {'streams':>8} {'stats':>6} "
            f"{'transient':>9} {'overhead':>8} {'predicted':>9} {'measured':>9} {'error':>7} "
            f"{'above base':>10} {'shards':>6}")
    lines = [head, "-" * len(head)]
    for r in rows:
        p = {k: v / 1e9 for k, v in r["predicted_parts"].items()}
        lines.append(
            f"{r['rank']:>6} {r['blocks'][0]:>3}-{r['blocks'][1] - 1:<3} {p['weights']:>8.2f} "
            f"{p['activations']:>8.3f} {p['statistics']:>6.3f} {p['transients']:>9.2f} "
            f"{p['overhead']:>8.2f} {r['predicted'] / 1e9:>9.2f} {r['peak_rss'] / 1e9:>9.2f} "
            f"{r['error']:>+7.1%} {r['error_above_baseline']:>+10.1%} "
            f"{'ok' if r['shards_ok'] else 'EXTRA':>6}")
    for r in rows:
        if r.get("onload"):
            lines.append(f"worker {r['rank']} onload {r['onload']['mode']}: device-equivalent "
                         f"peak {r['measured_device_equiv'] / 1e9:.2f} GB vs predicted "
                         f"{r['predicted_device'] / 1e9:.2f} GB ({r['device_error']:+.1%}); host "
                         f"{r['measured_host'] / 1e9:.2f} GB vs predicted "
                         f"{r['predicted_host'] / 1e9:.2f} GB; {r['onload']['fetches']} fetches, "
                         f"{r['onload']['prefetch_hits']} prefetched, at most "
                         f"{r['onload']['max_resident']} blocks resident")
    if cli:
        lines.append(f"one-process CLI: predicted {cli['predicted'] / 1e9:.2f} GB, measured "
                     f"{cli['peak_rss'] / 1e9:.2f} GB ({cli['error']:+.1%})")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description="planner vs measured memory at 70B block width")
    p.add_argument("--blocks", type=int, default=4)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--dtype", default="float32", help="run dtype")
    p.add_argument("--store-dtype", default="bfloat16", help="checkpoint dtype on disk")
    p.add_argument("--nsamples", type=int, default=4)
    p.add_argument("--seqlen", type=int, default=128)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--criterion", default="wanda")
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--dir", help="checkpoint directory to reuse (built there if missing)")
    p.add_argument("--onload", default="device", choices=["device", "host", "disk"],
                   help="sequential onloading of each worker's blocks")
    p.add_argument("--cli", action="store_true", help="also run launch/prune.py in one process")
    p.add_argument("--state", action="store_true",
                   help="write the resume state of every pruned block (bytes and per-block "
                        "seconds in the JSON)")
    p.add_argument("--half-width", action="store_true",
                   help="Llama-3-8B block width (4096 / 14336) instead of Llama-2-70B's")
    p.add_argument("--json", default=str(REPO / "outputs" / "bench" / "scale.json"))
    p.add_argument("--child", help=argparse.SUPPRESS)
    opts = p.parse_args()
    global WIDTH
    WIDTH = HALF_WIDTH if opts.half_width else WIDTH
    if opts.child:
        job = json.loads(opts.child)
        Path(job["result"]).write_text(json.dumps(run_worker(job)))
        return 0
    work = Path(tempfile.mkdtemp(prefix="neuroal-scale-"))
    model_dir = Path(opts.dir) if opts.dir else work / "model"
    try:
        if not (model_dir / "config.json").is_file():
            model_dir.mkdir(parents=True, exist_ok=True)
            t0 = time.perf_counter()
            build_checkpoint(model_dir, opts.blocks, opts.store_dtype, seed=0)
            print(f"checkpoint written in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        plan = predict(model_dir, opts)
        calibration_ids(model_dir, opts, work / "ids.pt")
        rows = measure_workers(model_dir, work, plan, opts)
        cli = measure_cli(model_dir, plan, opts) if opts.cli else None
    finally:
        shutil.rmtree(work, ignore_errors=True)
    ok = all(abs(r["error"]) <= TOLERANCE and r["shards_ok"] and
             abs(r["device_error"]) <= TOLERANCE for r in rows) and (
        cli is None or abs(cli["error"]) <= TOLERANCE)
    print(table(rows, cli))
    print(f"{'PASS' if ok else 'FAIL'}: every worker within {TOLERANCE:.0%} of the planner and "
          "opening only its own shards")
    out = Path(opts.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"settings": {k: v for k, v in vars(opts).items() if k != "child"},
                               "plan": plan.to_dict(), "workers": rows, "cli": cli, "pass": ok},
                              indent=2) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
