"""DSnoT and R²-DSnoT mask refinement (recovery.md §1-2): the swap loop on hand-made and random
layers, N:M re-validation, the engine wiring through the pipeline, and config errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import ARCHS, assert_rejected_before_loading, save_tiny_model, tiny_cfg, tiny_config

from neuroal.criteria.base import LayerStats, NMPattern
from neuroal.criteria.masking import nm_mask, row_mask, row_ratio_mask
from neuroal.pipeline import run
from neuroal.recovery import DSNOT, R2DSNOT, RECOVERY_STEPS, REFINERS
from neuroal.recovery.dsnot import effective_threshold

# --------------------------------------------------------------------------- helpers


def _layer(rows: int, cols: int, seed: int) -> tuple[torch.Tensor, LayerStats]:
    """A random weight and the statistics of random inputs (8 sequences x 32 tokens)."""
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(rows, cols, generator=gen)
    x = torch.randn(8, 32, cols, generator=gen) * torch.rand(cols, generator=gen) + 0.2
    stats = LayerStats(nsamples=8, sq_norm=x.pow(2).sum(1).mean(0), mean=x.sum(1).mean(0),
                       var=x.var(1, unbiased=False).mean(0))
    return weight, stats


def _eps(weight: torch.Tensor, mask: torch.Tensor, stats: LayerStats) -> torch.Tensor:
    """``eps_i = sum_{j pruned} W_ij m_j`` recomputed from scratch in float64, ``(rows,)``."""
    assert stats.mean is not None
    return (weight.double() * stats.mean.double() * mask).sum(1)


def _wanda_mask(weight: torch.Tensor, stats: LayerStats, sparsity: float = 0.5) -> torch.Tensor:
    assert stats.sq_norm is not None
    return row_mask(weight.abs() * stats.sq_norm.sqrt(), sparsity)


REFINER_OPTIONS = [
    (DSNOT, {}),
    (DSNOT, {"var_power": 0, "prune_key": "magnitude"}),
    (R2DSNOT, {}),
    (R2DSNOT, {"relative_phase": "grow", "alpha": 1.0}),
    (R2DSNOT, {"gamma1": 0.5, "gamma2": 0.5, "p": 1}),
]
IDS = ["dsnot", "dsnot-p0-magnitude", "r2dsnot", "r2dsnot-grow", "r2dsnot-gamma"]


# --------------------------------------------------------------------------- hand-made row


def _hand_row() -> tuple[torch.Tensor, LayerStats]:
    """One row of 6 weights; unit activations except m_4 = 0.3 (so c_4 = 0.3)."""
    weight = torch.tensor([[-0.8, 0.1, -0.7, 2.0, 1.0, -3.0]])
    ones = torch.ones(6)
    mean = torch.tensor([1.0, 1.0, 1.0, 1.0, 0.3, 1.0])
    return weight, LayerStats(nsamples=1, sq_norm=ones, mean=mean, var=ones)


def test_hand_made_row_with_sign_check_makes_the_predicted_swap() -> None:
    # Wanda prunes |W| = 0.1, 0.7, 0.8 (cols 1, 2, 0): eps = 0.1 - 0.7 - 0.8 = -1.4 < 0.
    # Cycle 1 regrows the most negative growth key (col 0, c = -0.8) and prunes from the back
    # of the prune list, the lowest-scoring positive kept weight (col 4, c = 0.3):
    # eps = -1.4 + 0.3 + 0.8 = -0.3. Cycle 2 would regrow col 2 and prune col 3 (c = 2.0),
    # flipping eps to +2.4, which the sign check rejects.
    weight, stats = _hand_row()
    mask = _wanda_mask(weight, stats)
    assert mask[0].nonzero().flatten().tolist() == [0, 1, 2]
    new, info = DSNOT.refine(weight, mask, stats, {"sign_check": True})
    assert new[0].nonzero().flatten().tolist() == [1, 2, 4]
    assert info["swaps"] == 1 and info["stopped_rows"] == 0
    assert info["eps_before"] == pytest.approx(1.4) and info["eps_after"] == pytest.approx(0.3)


def test_hand_made_row_faithful_mode_overshoots_then_stops() -> None:
    # Without the sign check (the reference's unstructured path) cycle 2 is accepted (eps 2.4),
    # cycle 3 regrows col 1 (c = 0.1) and prunes col 5 (c = -3.0): eps = -0.7. Cycle 4 needs a
    # negative growth key but both were used: the row is stopped, not misaccounted.
    weight, stats = _hand_row()
    new, info = DSNOT.refine(weight, _wanda_mask(weight, stats), stats, {})
    assert new[0].nonzero().flatten().tolist() == [3, 4, 5]
    assert info["swaps"] == 3 and info["stopped_rows"] == 1 and info["cycles"] == 4
    assert info["eps_after"] == pytest.approx(0.7)
    assert float(_eps(weight, new, stats).abs()[0]) == pytest.approx(0.7)


def test_threshold_freezes_rows_and_scales_with_seqlen() -> None:
    weight, stats = _hand_row()
    mask = _wanda_mask(weight, stats)
    new, info = DSNOT.refine(weight, mask, stats, {"threshold": 1.5})
    assert torch.equal(new, mask) and info["swaps"] == 0
    assert effective_threshold({"threshold": 0.1, "threshold_seqlen": 2048}, 512) == pytest.approx(0.025)
    assert effective_threshold({"threshold": 0.1, "threshold_seqlen": None}, 512) == 0.1
    # 1.5 * 256 / 512 = 0.75 < 1.4: the first swap happens again
    new, info = DSNOT.refine(weight, mask, stats, {"threshold": 1.5, "threshold_seqlen": 512,
                                                   "sign_check": True}, seqlen=256)
    assert info["swaps"] == 1


# --------------------------------------------------------------------------- random layers


@pytest.mark.parametrize(("refiner", "options"), REFINER_OPTIONS, ids=IDS)
def test_sign_checked_refinement_keeps_rows_and_never_increases_eps(refiner, options) -> None:
    weight, stats = _layer(24, 96, seed=1)
    mask = _wanda_mask(weight, stats, 0.6)
    new, info = refiner.refine(weight, mask, stats, {**options, "sign_check": True})
    assert torch.equal(new.sum(1), mask.sum(1))
    before, after = _eps(weight, mask, stats).abs(), _eps(weight, new, stats).abs()
    assert bool((after <= before + 1e-9).all())
    assert int((new != mask).any(1).sum()) == info["rows_changed"] > 0
    assert info["rows_worse"] == 0
    assert info["eps_after"] == pytest.approx(float(after.mean()), rel=1e-6)
    assert info["eps_after"] < info["eps_before"]


@pytest.mark.parametrize(("refiner", "options"), REFINER_OPTIONS, ids=IDS)
def test_faithful_refinement_keeps_rows_and_accounts_eps_exactly(refiner, options) -> None:
    weight, stats = _layer(24, 128, seed=2)
    ratios = torch.linspace(0.3, 0.7, 24, dtype=torch.float64)  # per-row ratios (NeuroAL rows)
    assert stats.sq_norm is not None
    mask = row_ratio_mask(weight.abs() * stats.sq_norm.sqrt(), ratios)
    new, info = refiner.refine(weight, mask, stats, options)
    assert torch.equal(new.sum(1), mask.sum(1))
    assert info["swaps"] == int((new & ~mask).sum()) > 0  # one regrowth per swap
    after = _eps(weight, new, stats).abs()
    assert info["eps_after"] == pytest.approx(float(after.mean()), rel=1e-6)
    assert info["eps_after"] < info["eps_before"]


@pytest.mark.parametrize(("n", "m"), [(2, 4), (4, 8), (1, 4)])
@pytest.mark.parametrize("refiner", [DSNOT, R2DSNOT], ids=["dsnot", "r2dsnot"])
def test_nm_pattern_stays_valid_and_sign_is_kept(refiner, n: int, m: int) -> None:
    weight, stats = _layer(32, 64, seed=3)
    assert stats.sq_norm is not None
    mask = nm_mask(weight.abs() * stats.sq_norm.sqrt(), n, m)
    new, info = refiner.refine(weight, mask, stats, {}, nm=NMPattern(n, m))
    pruned = new.reshape(32, 64 // m, m).sum(-1)
    assert bool((pruned == m - n).all())
    assert info["swaps"] > 0
    before, after = _eps(weight, mask, stats), _eps(weight, new, stats)
    changed = (new != mask).any(1)
    assert bool((torch.sign(after[changed]) == torch.sign(before[changed])).all())


def test_nm_rejects_a_broken_pattern_and_sign_check_off() -> None:
    weight, stats = _layer(4, 16, seed=4)
    mask = _wanda_mask(weight, stats, 0.25)  # not 2:4
    with pytest.raises(RuntimeError, match="2:4"):
        DSNOT.refine(weight, mask, stats, {}, nm=NMPattern(2, 4))
    assert stats.sq_norm is not None
    good = nm_mask(weight.abs() * stats.sq_norm.sqrt(), 2, 4)
    with pytest.raises(ValueError, match="sign"):
        DSNOT.refine(weight, good, stats, {"sign_check": False}, nm=NMPattern(2, 4))


def test_updated_weights_use_the_dense_error() -> None:
    # After a weight update the error is measured against the dense output.
    weight, stats = _layer(8, 32, seed=5)
    mask = _wanda_mask(weight, stats)
    updated = torch.where(mask, weight, weight * 1.1)
    new, info = DSNOT.refine(updated, mask, stats, {"sign_check": True}, dense=weight)
    assert stats.mean is not None
    m = stats.mean.double()
    eps0 = (weight.double() * m).sum(1) - (updated.double() * m * ~mask).sum(1)
    eps1 = (weight.double() * m).sum(1) - (updated.double() * m * ~new).sum(1)
    assert info["eps_before"] == pytest.approx(float(eps0.abs().mean()), rel=1e-6)
    assert info["eps_after"] == pytest.approx(float(eps1.abs().mean()), rel=1e-6)
    assert bool((eps1.abs() <= eps0.abs() + 1e-9).all()) and info["swaps"] > 0


def test_missing_statistics_are_named() -> None:
    weight, stats = _layer(4, 8, seed=6)
    mask = _wanda_mask(weight, stats)
    with pytest.raises(ValueError, match="'var'"):
        DSNOT.refine(weight, mask, LayerStats(sq_norm=stats.sq_norm, mean=stats.mean), {})


def test_registries() -> None:
    assert {"dsnot", "r2dsnot"} <= set(RECOVERY_STEPS.names())
    assert set(REFINERS.names()) == {"dsnot", "r2dsnot"}
    assert R2DSNOT.label == "R²-DSnoT (reconstructed)"


@pytest.mark.parametrize("model_type", ARCHS)
def test_attention_linears_are_the_four_projections(model_type: str) -> None:
    from transformers import AutoModelForCausalLM

    from neuroal.models.adapter import ModelAdapter

    model = AutoModelForCausalLM.from_config(tiny_config(model_type, num_layers=1))
    adapter = ModelAdapter(model)
    block = adapter.blocks[0]
    names = adapter.attention_linears(block)
    linears = {n for n, m in block.named_modules() if isinstance(m, torch.nn.Linear)}
    assert len(names) == 4 and names < linears
    assert not any("fc" in n or "mlp" in n for n in names)


# --------------------------------------------------------------------------- pipeline


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> Path:
    return save_tiny_model("llama", tmp_path_factory.mktemp("dsnot") / "llama", tokenizer_dir)


def _run(model_dir: Path, text: Path, **overrides):
    calib = {"source": f"text:{text}", **overrides.pop("calib", {})}
    return run(tiny_cfg(model_dir, None, calib=calib, **overrides), keep_executor=True)


def test_pipeline_dsnot_refines_attention_only(llama_dir: Path, small_text: Path) -> None:
    evals = {"datasets": [f"text:{small_text}"], "max_windows": 2}
    plain = _run(llama_dir, small_text, eval=evals)
    refined = _run(llama_dir, small_text, eval=evals,
                   recover={"steps": ["dsnot"], "baseline": True, "dsnot": {"sign_check": True}})
    before, after = plain.executor.masks(), refined.executor.masks()
    layers = refined.report["layers"]
    touched = {n for n, row in layers.items() if "recovery" in row.get("info", {})}
    assert touched == {n for n in after if "self_attn" in n}
    for name, mask in after.items():
        assert torch.equal(mask.sum(1), before[name].sum(1)), name  # per-row sparsity
        assert int(mask.sum()) == layers[name]["pruned"] == layers[name]["zeros"]
        if name in touched:
            assert layers[name]["info"]["recovery"]["dsnot"]["rows_worse"] == 0
        elif ".0." in name:
            # block 0 sees identical inputs in both runs, so its MLP keeps Wanda's mask; later
            # blocks' inputs (and statistics) already differ through the refined attention
            assert torch.equal(mask, before[name]), name
    assert any(not torch.equal(after[n], before[n]) for n in touched)
    step = refined.report["recovery"]["steps"][0]
    assert step["name"] == "dsnot" and step["swaps"] > 0 and step["layers_refined"] == len(touched)
    assert step["eps_after"] < step["eps_before"] and step["seconds"] >= 0
    assert step["options"]["max_cycles"] == 50 and step["options"]["sign_check"] is True
    # the baseline is the same prune without refinement: plain Wanda's perplexity exactly
    key = f"text:{small_text}"
    assert step["ppl_before"][key] == pytest.approx(plain.report["eval"][key]["model_ppl"], rel=1e-9)
    assert step["ppl_after"][key] == refined.report["eval"][key]["model_ppl"]
    json.dumps(refined.report)


def test_pipeline_r2dsnot_all_layers_with_sparsegpt_and_nm(llama_dir: Path,
                                                           small_text: Path) -> None:
    result = _run(llama_dir, small_text, criterion={"name": "sparsegpt"}, pattern="2:4",
                  recover={"steps": ["r2dsnot"], "r2dsnot": {"layers": "all"}})
    layers = result.report["layers"]
    for name, mask in result.executor.masks().items():
        rows, cols = mask.shape
        assert bool(((~mask).reshape(rows, cols // 4, 4).sum(-1) == 2).all()), name
        assert "r2dsnot" in layers[name]["info"]["recovery"], name
    step = result.report["recovery"]["steps"][0]
    assert step["label"] == "R²-DSnoT (reconstructed)" and step["swaps"] > 0
    assert step["ppl_before"] is None and "recover.baseline" in step["before"]


# --------------------------------------------------------------------------- config and CLI


BAD_RECOVER = [
    (["--recover", "dsnto"], ["'dsnto'", "dsnot", "r2dsnot"]),
    (["--recover", "dsnot,r2dsnot"], ["dsnot and r2dsnot", "at most one"]),
    (["--recover", "r2dsnot", "recover.r2dsnot.relative_phase=both"], ["'both'", "not both"]),
    (["--recover", "dsnot", "--pattern", "2:4", "recover.dsnot.sign_check=false"],
     ["sign_check=False", "N:M"]),
    (["--recover", "dsnot", "recover.dsnot.max_cycle=3"], ["max_cycle", "max_cycles"]),
    (["--recover", "dsnot", "recover.dsnot.layers=mlp"], ["layers='mlp'", "attention, all"]),
    (["--recover", "dsnot", "recover.dsnot.initial=magnitude"], ["initial", "criterion="]),
]


@pytest.mark.parametrize(("extra", "expected"), BAD_RECOVER)
def test_bad_recover_values_exit_2_before_loading(extra: list[str], expected: list[str],
                                                  llama_dir: Path, tmp_path: Path,
                                                  no_loading: None,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    assert_rejected_before_loading(llama_dir, extra, expected, tmp_path, caplog)
