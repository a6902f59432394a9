"""Data-parallel final prune (neuroal.engine.data_parallel): every worker calibrates every block
on its micro-batches and each linear is solved once; masks and weights are bit-identical to
pipeline mode for any number of workers, with the local executor (threads), onloading, resume
and two torch.distributed ranks over gloo; failures reach the caller without a hang."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import data_mode_rank, random_ids, save_tiny_model, spawn_two_ranks, tiny_cfg

from neuroal.allocation.plan import SparsityPlan
from neuroal.config.build import ConfigError
from neuroal.engine.data_parallel import Layout, assign_solvers, resolve_parallel, solve_cost
from neuroal.engine.executor import LocalExecutor
from neuroal.engine.worker import PruneJob
from neuroal.models.loading import resolve_model

NUM_BLOCKS = 4


@pytest.fixture(scope="module")
def llama4(tokenizer_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four blocks: with 3 workers the slices are uneven ([0, 2), [2, 3), [3, 4))."""
    return save_tiny_model("llama", tmp_path_factory.mktemp("data") / "llama4", tokenizer_dir,
                           num_layers=NUM_BLOCKS)



def _prune(model: Path, workers: int, parallel: str, criterion: str, **kwargs: Any,
           ) -> tuple[LocalExecutor, list[Any], dict[str, torch.Tensor]]:
    """A final prune at 50 % (per-row ratios for block 1: neuron masks) on fresh workers;
    returns the executor, the block reports and every owned tensor."""
    job = kwargs.pop("job", None) or PruneJob(criterion)
    ex = LocalExecutor(resolve_model(str(model)), NUM_BLOCKS, workers, ["cpu"], "float32", 2,
                       parallel=parallel, **kwargs)
    reports = ex.run_final_prune(_plan(ex.workers[0].adapter.shape().blocks, job.criterion),
                                 job, random_ids())
    tensors: dict[str, torch.Tensor] = {}
    for w in ex.workers:
        tensors.update(w.state_items())
    return ex, reports, tensors


def _plan(blocks: list[dict[str, tuple[int, int]]], criterion: str) -> SparsityPlan:
    """50 % everywhere but block 1: per-row ratios (neuron masks), or for SparseGPT (one
    ratio per linear) a different ratio per linear."""
    entries: list[dict[str, Any]] = [{n: 0.5 for n in blk} for blk in blocks]
    entries[1] = {n: 0.3 + 0.05 * i for i, n in enumerate(blocks[1])} if criterion == "sparsegpt" \
        else {n: torch.linspace(0.3, 0.7, rows, dtype=torch.float64)
              for n, (rows, _cols) in blocks[1].items()}
    return SparsityPlan(0.5, "unstructured", entries)


def _assert_same(got: tuple[Any, ...], want: tuple[Any, ...]) -> None:
    _, got_reports, got_tensors = got
    _, want_reports, want_tensors = want
    assert [r.index for r in got_reports] == list(range(NUM_BLOCKS))
    for g, w in zip(got_reports, want_reports, strict=True):
        assert [(x.name, x.pruned, x.zeros, x.numel) for x in g.layers] == \
            [(x.name, x.pruned, x.zeros, x.numel) for x in w.layers]
    assert got_tensors.keys() == want_tensors.keys()
    for name, tensor in want_tensors.items():
        assert torch.equal(got_tensors[name].view(torch.uint8), tensor.view(torch.uint8)), name


# --------------------------------------------------------------------------- rules


def test_resolve_parallel_rule() -> None:
    assert resolve_parallel("auto", 1) == "pipeline"
    assert resolve_parallel("auto", 2) == "data"
    assert resolve_parallel("auto", 8, fits=False) == "pipeline"
    assert resolve_parallel("data", 1) == "data"
    assert resolve_parallel("pipeline", 8) == "pipeline"
    with pytest.raises(ValueError, match="engine.parallel='sideways'"):
        resolve_parallel("sideways", 2)


def test_layout_deals_micro_batches_round_robin() -> None:
    layout = Layout(((0, 2), (2, 3), (3, 4)), sequences=7, micro_batch=2)
    assert (layout.batches, layout.steps) == (4, 2)
    assert [layout.active(s) for s in range(layout.steps)] == [3, 1]
    assert [layout.rows(r) for r in range(3)] == [[0, 1, 6], [2, 3], [4, 5]]
    assert [layout.active_steps(r) for r in range(3)] == [2, 1, 1]
    assert [layout.owner(b) for b in range(4)] == [0, 0, 1, 2]
    assert sorted(i for r in range(3) for i in layout.rows(r)) == list(range(7))


def test_solvers_are_balanced_by_cost() -> None:
    shapes = {"q": (64, 64), "k": (32, 64), "v": (32, 64), "o": (64, 64), "gate": (128, 64),
              "up": (128, 64), "down": (64, 128)}
    for needs in (frozenset({"sq_norm"}), frozenset({"hessian"})):
        costs = {n: solve_cost(r, c, needs) for n, (r, c) in shapes.items()}
        solver = assign_solvers(costs, 2)
        loads = [sum(c for n, c in costs.items() if solver[n] == r) for r in (0, 1)]
        assert max(loads) <= 0.6 * sum(costs.values()), (needs, solver)
        assert assign_solvers(costs, 1) == dict.fromkeys(shapes, 0)
    assert set(assign_solvers(costs, 9).values()) == set(range(7))  # more workers than linears


def test_an_input_group_has_one_solver() -> None:
    """q/k/v and gate/up go to one solver each, their costs summed (SparseGPT's cols^3 +
    rows cols^2: down 2^21 + 2^20, gate + up 2 (2^18 + 2^19), q + k + v 2^19 + 2 (2^18 + 2^17),
    o 2^19), costliest first; a group member that is absent is ignored."""
    shapes = {"q": (64, 64), "k": (32, 64), "v": (32, 64), "o": (64, 64), "gate": (128, 64),
              "up": (128, 64), "down": (64, 128)}
    costs = {n: solve_cost(r, c, frozenset({"hessian"})) for n, (r, c) in shapes.items()}
    groups = (("q", "k", "v"), ("gate", "up"), ("absent", "o"))
    assert assign_solvers(costs, 3, groups) == {"q": 2, "k": 2, "v": 2, "o": 2, "gate": 1,
                                                "up": 1, "down": 0}
    assert assign_solvers(costs, 9, groups) == {"q": 2, "k": 2, "v": 2, "o": 3, "gate": 1,
                                                "up": 1, "down": 0}
    assert list(assign_solvers(costs, 2, groups)) == list(shapes)  # the linears' order


@pytest.mark.parametrize(("criterion", "workers"), [("sparsegpt", 2), ("symwanda", 1),
                                                     ("symwanda", 3)])
def test_a_shared_input_is_routed_once(llama4: Path, criterion: str, workers: int,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """A shared input's sums travel once per micro-batch, with its group's leader, to a solver
    of the whole group: a follower solved there sends only its own output statistics
    (symwanda) or nothing (sparsegpt, whose groups always share a solver); one solved
    elsewhere (norms are balanced linear by linear) sends its own copy. The result is
    pipeline mode's (checked above)."""
    from neuroal.engine.data_parallel import ThreadComm

    real, sent = ThreadComm.route, []

    def route(self: ThreadComm, mine: Any, active: int, solver: Any, order: Any,
              take: Any) -> Any:
        if mine is not None:
            sent.append(({n: sorted(mine[n][0]) for n in order}, dict(solver)))
        return real(self, mine, active, solver, order, take)

    monkeypatch.setattr(ThreadComm, "route", route)
    _prune(llama4, workers, "data", criterion)
    stat = "hessian" if criterion == "sparsegpt" else "sq_norm"
    leader = {"self_attn.k_proj": "self_attn.q_proj", "self_attn.v_proj": "self_attn.q_proj",
              "mlp.up_proj": "mlp.gate_proj"}
    placed = []
    assert sent
    for keys, solver in sent:
        assert stat in keys["self_attn.q_proj"] and stat in keys["mlp.gate_proj"]
        for name, lead in leader.items():
            placed.append(solver[name] == solver[lead])
            if placed[-1]:
                assert keys.get(name, []) == ([] if criterion == "sparsegpt" else
                                              ["out_sq_norm"]), (name, keys)
            else:
                assert stat in keys[name]
    assert all(placed) if workers < 3 else not any(placed)  # both paths are taken


def test_a_sharing_that_changes_is_an_error() -> None:
    """A follower whose input is not its leader's in a later micro-batch cannot be routed
    without its own sums: the data-parallel prune stops with the collector's kind of error."""
    from neuroal.engine.data_parallel import input_sharing, join_shared, strip_shared

    x, y = torch.ones(3), torch.zeros(3)
    first = {"q": ({"sq_norm": x}, 2), "k": ({"sq_norm": x}, 2), "o": ({"sq_norm": y}, 2)}
    assert input_sharing(first, ["q", "k", "o"]) == {"k": "q"}
    assert strip_shared(first, {"k": "q"}) == {"q": first["q"], "o": first["o"]}
    changed = {**first, "k": ({"sq_norm": x.clone()}, 2)}
    with pytest.raises(RuntimeError, match="'k' received the input of 'q'"):
        strip_shared(changed, {"k": "q"})
    from neuroal.capture.collector import new_accumulator

    folds = {n: new_accumulator(frozenset({"sq_norm"})) for n in ("q", "k")}
    folds["q"].update({"sq_norm": x.clone()}, 2)
    join_shared(folds, {"k": "q", "v": "q"})  # v is solved elsewhere: skipped
    assert folds["k"].sq_norm is folds["q"].sq_norm and folds["k"].n == 2


def test_resume_hash_ignores_the_mode() -> None:
    from neuroal.outputs.checkpoint import canonical_config

    pipeline, data = ({"sparsity": 0.5, "engine": {"parallel": mode, "workers": k}}
                      for mode, k in (("pipeline", 1), ("data", 4)))
    assert canonical_config(pipeline, {}) == canonical_config(data, {})


def test_parallel_is_validated(llama4: Path) -> None:
    with pytest.raises(ConfigError, match="engine.parallel='fast'"):
        tiny_cfg(llama4, None, engine={"parallel": "fast"})
    assert tiny_cfg(llama4, None).engine.parallel == "auto"


# --------------------------------------------------------------------------- local executor


@pytest.mark.parametrize("criterion", ["wanda", "sparsegpt", "symwanda"])
def test_local_data_mode_matches_pipeline_on_any_worker_count(llama4: Path,
                                                              criterion: str) -> None:
    want = _prune(llama4, 1, "pipeline", criterion)
    for workers in (1, 2, 3, 4):
        got = _prune(llama4, workers, "auto" if workers > 1 else "data", criterion)
        assert got[0].parallel == "data"
        _assert_same(got, want)
    assert _prune(llama4, 2, "pipeline", criterion)[0].parallel == "pipeline"


def test_data_mode_with_onloading_and_refiner(llama4: Path) -> None:
    """Guests beside blocks kept in host memory; RIA plus a DSnoT refinement per linear."""
    job = PruneJob("ria", refine=(("dsnot", {"max_cycles": 5}),))
    want = _prune(llama4, 1, "pipeline", "ria", job=job)
    got = _prune(llama4, 2, "data", "ria", job=job, onload="host")
    _assert_same(got, want)
    assert got[0].workers[0].store is not None and got[0].workers[0].store.fetches > 0


def test_data_mode_resumes_from_block_states(llama4: Path, tmp_path: Path) -> None:
    (tmp_path / "prune").mkdir()  # as neuroal.outputs.checkpoint lays the state out
    first = _prune(llama4, 2, "data", "sparsegpt", job=PruneJob("sparsegpt",
                                                                 state_dir=str(tmp_path)))
    assert len(list((tmp_path / "prune").glob("block_*.safetensors"))) == NUM_BLOCKS
    (tmp_path / "prune" / "block_0003.safetensors").unlink()  # as if stopped before block 3
    again = _prune(llama4, 4, "data", "sparsegpt", job=PruneJob("sparsegpt",
                                                                 state_dir=str(tmp_path)))
    _assert_same(again, first)


def test_failure_on_one_worker_is_raised(llama4: Path) -> None:
    ex = LocalExecutor(resolve_model(str(llama4)), NUM_BLOCKS, 2, ["cpu"], "float32", 2,
                       parallel="data")
    blocks = ex.workers[0].adapter.shape().blocks
    entries = [{n: 0.5 for n in blk} for blk in blocks]
    del entries[2]["mlp.down_proj"]  # missing for one solver only
    with pytest.raises(KeyError, match="down_proj"):
        ex.run_final_prune(SparsityPlan(0.5, "unstructured", entries), PruneJob("wanda"), random_ids())


def test_fold_failure_on_receipt_stops_every_worker(llama4: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """A solver's fold of a received micro-batch fails inside the route (where no worker may
    leave the exchange): the error is kept, the other worker is not left waiting, and the
    solver's own error is raised."""
    import threading

    from neuroal.capture import collector

    real, calls = collector._Accumulator.update, []

    def update(self: Any, contrib: Any, batch: int, owned: bool = False) -> None:
        rank = threading.current_thread().name
        calls.append(rank)
        if rank == "neuroal-data-1" and calls.count(rank) > 3:
            raise RuntimeError("fold failed on rank 1")
        real(self, contrib, batch, owned)

    monkeypatch.setattr(collector._Accumulator, "update", update)
    ex = LocalExecutor(resolve_model(str(llama4)), NUM_BLOCKS, 2, ["cpu"], "float32", 2,
                       parallel="data")
    with pytest.raises(RuntimeError, match="fold failed on rank 1"):
        ex.run_final_prune(_plan(ex.workers[0].adapter.shape().blocks, "wanda"),
                           PruneJob("wanda"), random_ids())
    assert {"neuroal-data-0", "neuroal-data-1"} <= set(calls)


def test_fold_received_keeps_the_error_and_skips_later_parts() -> None:
    """Inside a route a fold that raises must not leave the exchange (a torch.distributed peer
    would stay blocked in send/recv): the error is kept for the next phase boundary and the
    parts still arriving are received but not folded."""
    from types import SimpleNamespace

    from neuroal.engine.data_parallel import fold_received

    folded: list[int] = []

    class Fold:
        def update(self, sums: dict[str, torch.Tensor], batch: int, owned: bool = False,
                   ) -> None:
            if batch == 2:
                raise RuntimeError("fold failed")
            folded.append(batch)

    phase = SimpleNamespace(error=None, w=SimpleNamespace(device=torch.device("cpu"),
                                                          busy_seconds=0.0))
    part = {"xx": torch.ones(2, 2)}
    for batch in (1, 2, 3):
        fold_received(phase, Fold(), (part, batch))  # type: ignore[arg-type]
    assert folded == [1]
    assert isinstance(phase.error, RuntimeError) and str(phase.error) == "fold failed"


def test_report_records_the_mode(llama4: Path) -> None:
    from neuroal.pipeline import run

    for workers, mode in ((1, "pipeline"), (2, "data")):
        cfg = tiny_cfg(llama4, None, engine={"workers": workers})
        assert run(cfg).report["engine"]["parallel"] == mode


# --------------------------------------------------------------------------- torch.distributed


def _dist_compare(model_dir: str, stage: Any) -> None:
    from neuroal.engine import EXECUTORS

    cfg = tiny_cfg(Path(model_dir), None, engine={"executor": "dist", "workers": 2,
                                                   "parallel": "data"})
    for criterion in ("wanda", "sparsegpt"):
        ex = EXECUTORS.get("dist")(cfg, source=resolve_model(model_dir), num_blocks=NUM_BLOCKS,
                                   devices=["cpu"], dtype="float32", session=stage)
        plan = _plan(stage.w.adapter.shape().blocks, criterion)
        reports = ex.run_final_prune(plan, PruneJob(criterion), random_ids())
        assert ex.parallel == "data"
        local = _prune(Path(model_dir), 1, "pipeline", criterion)
        masks, logits = ex.masks(), ex.logits(random_ids())
        assert masks.keys() == local[0].masks().keys()
        assert all(torch.equal(masks[n], m) for n, m in local[0].masks().items())
        assert torch.equal(logits, local[0].logits(random_ids()))  # weights equal where kept
        for g, w in zip(reports, local[1], strict=True):
            assert [(x.name, x.zeros) for x in g.layers] == [(x.name, x.zeros) for x in w.layers]
        broken = [dict(plan.block(b)) for b in range(NUM_BLOCKS)]
        del broken[3]["self_attn.o_proj"]
        with pytest.raises(KeyError, match="o_proj"):
            ex.run_final_prune(SparsityPlan(0.5, "unstructured", broken), PruneJob(criterion),
                               random_ids())
        ex.shutdown()  # the ranks are still in step after the failure
    _dist_reconstruct(model_dir, stage)
    _dist_fold_failure(model_dir, stage)


def _dist_reconstruct(model_dir: str, stage: Any) -> None:
    """perp-reconstruct in data mode: stream and targets gathered on each block's owner over
    gloo, the refitted block (norms included) sent to the other rank."""
    from neuroal.engine import EXECUTORS

    cfg = tiny_cfg(Path(model_dir), None, engine={"executor": "dist", "workers": 2,
                                                   "parallel": "data"})
    job = PruneJob("wanda", reconstruct={"steps": 2, "batch_size": 2, "lr": 1e-2, "rank": 2})
    ex = EXECUTORS.get("dist")(cfg, source=resolve_model(model_dir), num_blocks=NUM_BLOCKS,
                               devices=["cpu"], dtype="float32", session=stage)
    reports = ex.run_final_prune(_plan(stage.w.adapter.shape().blocks, "wanda"), job, random_ids())
    local = _prune(Path(model_dir), 1, "pipeline", "wanda", job=job)
    assert ex.parallel == "data"
    for g, w in zip(reports, local[1], strict=True):
        assert [(x.name, x.zeros) for x in g.layers] == [(x.name, x.zeros) for x in w.layers]
        assert g.info["perp-reconstruct"]["loss_last"] == w.info["perp-reconstruct"]["loss_last"]
    assert torch.equal(ex.logits(random_ids()), local[0].logits(random_ids()))  # norms refitted alike
    ex.shutdown()


_FOLD_TRIGGER = "NEUROAL_TEST_FOLD_TRIGGER"


def _fail_rank1_folds(rank: int) -> None:
    """On rank 1, every fold of a solver's statistics raises while the file named by
    ``$NEUROAL_TEST_FOLD_TRIGGER`` exists (rank 0 creates it)."""
    if rank != 1:
        return
    from neuroal.capture import collector

    real = collector._Accumulator.update

    def update(self: Any, contrib: Any, batch: int, owned: bool = False) -> None:
        if Path(os.environ[_FOLD_TRIGGER]).exists():
            raise RuntimeError("fold failed on rank 1")
        real(self, contrib, batch, owned)

    collector._Accumulator.update = update  # type: ignore[method-assign]


def _dist_fold_failure(model_dir: str, stage: Any) -> None:
    """A fold that fails on rank 1 inside the route (rank 0 still sending to it): the error
    reaches rank 0 and both ranks leave the exchange, then prune again in step."""
    from neuroal.engine import EXECUTORS

    cfg = tiny_cfg(Path(model_dir), None, engine={"executor": "dist", "workers": 2,
                                                   "parallel": "data"})
    ex = EXECUTORS.get("dist")(cfg, source=resolve_model(model_dir), num_blocks=NUM_BLOCKS,
                               devices=["cpu"], dtype="float32", session=stage)
    plan = _plan(stage.w.adapter.shape().blocks, "wanda")
    trigger = Path(os.environ[_FOLD_TRIGGER])
    trigger.touch()
    with pytest.raises(RuntimeError, match="fold failed on rank 1"):
        ex.run_final_prune(plan, PruneJob("wanda"), random_ids())
    trigger.unlink()
    ex.shutdown()
    ex = EXECUTORS.get("dist")(cfg, source=resolve_model(model_dir), num_blocks=NUM_BLOCKS,
                               devices=["cpu"], dtype="float32", session=stage)
    ex.run_final_prune(plan, PruneJob("wanda"), random_ids())
    local = _prune(Path(model_dir), 1, "pipeline", "wanda")[0].masks()
    assert all(torch.equal(m, local[n]) for n, m in ex.masks().items())
    ex.shutdown()


def test_two_gloo_ranks_data_mode_match_pipeline(llama4: Path, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Rank 0 prunes with both ranks in data mode (Wanda, SparseGPT; Wanda with
    perp-reconstruct) and checks masks, reports and the pruned model's logits against one
    local worker in pipeline mode; a missing plan entry on one rank's solve, and a fold that
    fails on rank 1 inside the route, are raised on rank 0 and the ranks stay in step."""
    monkeypatch.setenv(_FOLD_TRIGGER, str(tmp_path / "fail-folds"))
    spawn_two_ranks(data_mode_rank, str(llama4), _dist_compare, _fail_rank1_folds)
