"""How activation streams cross between Ray actors (docs/transport.md): every transport that runs
on the CPU (the object store, Ray Direct Transport over gloo) gives bit-identical masks, weights,
search terms and perplexities to the local executor, with one call per actor per pass; the
choice is validated before any actor loads."""

from __future__ import annotations

import json
import os
import types
from pathlib import Path

import pytest
import torch
from conftest import save_tiny_model
from safetensors.torch import load_file

from neuroal.allocation.plan import SparsityPlan
from neuroal.config.build import ConfigError, build_config
from neuroal.engine.executor import LocalExecutor
from neuroal.engine.worker import CandidateJob, PruneJob, WorkerSpec
from neuroal.models.loading import resolve_model


def _weights(executor, directory: Path) -> dict[str, torch.Tensor]:
    directory.mkdir()
    out: dict[str, torch.Tensor] = {}
    for f in executor.write_shards(str(directory), "float32", 1 << 30):
        out.update(load_file(directory / f["file"]))
    return out


@pytest.mark.ray
@pytest.mark.parametrize("transport", ["object-store", "gloo"])
def test_transport_matches_local(transport: str, tokenizer_dir: Path, tmp_path: Path) -> None:
    """SparseGPT final prune (masks and updated weights), NeuroAL candidates on a global dense
    reference, dense statistics and window NLL: 2 actors over ``transport`` == 1 local worker,
    bit for bit; the final prune is one stage per actor (the stream crosses once); after an
    actor is killed the run goes on over a rebuilt channel with the same result."""
    import ray

    from neuroal.engine.ray_executor import RayExecutor, RayOptions, init_ray

    owned = init_ray(num_cpus=2)
    source = resolve_model(str(save_tiny_model("llama", tmp_path / "m", tokenizer_dir,
                                               num_layers=3)))
    local = LocalExecutor(source, 3, 1, ["cpu"], "float32", 2)
    remote = RayExecutor(WorkerSpec(source, 0, 0, 3, "cpu", "float32", 2), 2,
                         RayOptions(transport=transport, inflight=2), parallel="pipeline")
    try:
        assert remote.transport_name == transport
        ids = torch.randint(3, 320, (4, 16), generator=torch.Generator().manual_seed(2))
        shape = local.workers[0].adapter.shape()
        cands = [[{n: r for n in blk} for blk in shape.blocks] for r in (0.4, 0.6)]
        job = CandidateJob("wanda")
        for want, got in zip(local.evaluate_candidates(ids, cands, job, "global"),
                             remote.evaluate_candidates(ids, cands, job, "global"), strict=True):
            assert [b.na for b in want] == [b.na for b in got]
            assert all(torch.equal(w.delta[n], g.delta[n])
                       for w, g in zip(want, got, strict=True) for n in w.delta)
        assert torch.equal(remote.window_nll(ids), local.window_nll(ids))

        stages: list[tuple[int, str]] = []
        submit = remote._stage  # noqa: SLF001

        def counted(rank, source, hand_on, op, *args, **kw):  # noqa: ANN001, ANN002, ANN003
            stages.append((rank, op))
            return submit(rank, source, hand_on, op, *args, **kw)

        remote._stage = counted  # noqa: SLF001
        plan = SparsityPlan(0.5, "unstructured", [{n: 0.5 for n in blk} for blk in shape.blocks])
        prune = PruneJob("sparsegpt")
        reports = remote.run_final_prune(plan, prune, ids)
        want = local.run_final_prune(plan, prune, ids)
        assert [r.index for r in reports] == [0, 1, 2]
        assert [[(x.name, x.zeros) for x in r.layers] for r in reports] == \
            [[(x.name, x.zeros) for x in r.layers] for r in want]
        assert stages == [(0, "prune"), (1, "prune")]
        masks, ref_masks = remote.masks(), local.masks()
        assert masks.keys() == ref_masks.keys()
        assert all(torch.equal(masks[n], ref_masks[n]) for n in masks)
        got, want = _weights(remote, tmp_path / "ray"), _weights(local, tmp_path / "local")
        assert got.keys() == want.keys()
        assert all(torch.equal(got[n], want[n]) for n in want)
        want_nll = local.window_nll(ids)
        assert torch.equal(remote.window_nll(ids), want_nll)

        killed: list[int] = []

        def kill(self, operation: str, unit: int) -> None:  # noqa: ANN001
            if operation == "perplexity" and not killed:
                killed.append(unit)
                self.workers[0].__ray_call__.remote(lambda _worker: os._exit(1))

        # actor 0 dies behind its first chunk: restarted (with its peer where Ray drops both
        # ends of the failed transfer), its pruned blocks pruned again, the same NLL
        remote.fault_hook = types.MethodType(kill, remote)
        assert torch.equal(remote.window_nll(ids), want_nll)
        assert killed and remote.restarts[0] == 1
        assert torch.equal(remote.window_nll(ids), want_nll)  # the channel works again
    finally:
        remote.shutdown()
        local.shutdown()
        if owned:
            ray.shutdown()


def test_transport_choice_is_validated_before_loading(monkeypatch: pytest.MonkeyPatch) -> None:
    """``engine.ray.transport``: config names checked; ``auto`` picks gloo between CPU actors and
    nccl between CUDA actors, each only when Ray can start it, else the object store; a
    transport asked for by name that cannot run is refused before Ray starts."""
    from neuroal.engine.ray import executor as ray_exec  # where RayExecutor looks up init_ray
    from neuroal.engine.ray_executor import DirectTransport, RayExecutor, RayOptions, resolve_transport

    assert build_config({"engine": {"ray": {"transport": "gloo"}}}).engine.ray.transport == "gloo"
    with pytest.raises(ConfigError, match="engine.ray.transport='tcp'"):
        build_config({"engine": {"ray": {"transport": "tcp"}}})
    assert resolve_transport("auto", "cpu").name == "gloo"
    assert resolve_transport("object-store", "cuda").name == "object-store"
    with pytest.raises(ValueError, match="moves cpu tensors, but the activation streams live on "
                                         "cuda"):
        resolve_transport("gloo", "cuda")
    with pytest.raises(ValueError, match="moves cuda tensors"):
        resolve_transport("nccl", "cpu")
    monkeypatch.setattr(DirectTransport, "available", lambda self: False)
    assert resolve_transport("auto", "cpu").name == "object-store"
    assert resolve_transport("auto", "cuda").name == "object-store"
    with pytest.raises(ValueError, match="nccl collective backend is not available.*cupy"):
        resolve_transport("nccl", "cuda")
    monkeypatch.setattr(ray_exec, "init_ray", lambda *a: pytest.fail("Ray started"))
    spec = WorkerSpec(None, 0, 0, 2, "cpu", "float32", 2)  # never loaded
    with pytest.raises(ValueError, match="engine.ray.transport=gloo"):
        RayExecutor(spec, 2, RayOptions(transport="gloo"))


def test_doc_table_is_generated_from_the_bench_json() -> None:
    """docs/transport.md's measured table is the one generated from the committed
    benchmarks/transport.json (``launch/bench.py transport``), never typed by hand."""
    import importlib.util

    repo = Path(__file__).resolve().parent.parent
    spec = importlib.util.spec_from_file_location("readme_figures",
                                                  repo / "launch" / "readme_figures.py")
    figures = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(figures)
    result = json.loads((repo / "benchmarks" / "transport.json").read_text())
    doc = (repo / "docs" / "transport.md").read_text()
    assert figures.replace_block(doc, "transport", figures.transport_text(result)) == doc
    assert {r["transport"] for r in result["prunes"]} == {"object-store", "gloo"}
    assert result["identical"]
