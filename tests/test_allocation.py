"""Allocation policies (allocation.md §1.4, §3, §4): renormalisation, OWL, AlphaPruning.

Unit tests use a stub executor over hand-made weights; one end-to-end run per policy goes
through the real pipeline on the tiny random Llama.
"""

from __future__ import annotations

import json
import math
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_cfg

from neuroal.allocation import ALLOCATIONS, ModelShape, PlanError, PlanRequest
from neuroal.allocation.alpha import alpha_ratios, cache_path, eigenvalues, hill_alpha, layer_alpha
from neuroal.allocation.owl import outlier_ratio, owl_ratios
from neuroal.allocation.renorm import additive_correction, multiplicative_correction, weighted_mean
from neuroal.config.build import ConfigError
from neuroal.criteria.base import LayerStats

CLIP = (0.01, 0.99)
SPARSITIES = (0.5, 0.6, 0.7, 0.8)
LLAMA7B_BLOCK_ALPHA = [
    2.622, 2.890, 2.969, 2.964, 3.090, 3.064, 2.961, 2.746, 2.775, 2.609, 2.717, 2.730, 2.784,
    2.852, 2.897, 3.177, 3.123, 3.446, 3.872, 3.606, 3.894, 4.066, 3.755, 3.715, 3.994, 4.220,
    4.102, 4.160, 3.851, 4.093, 4.160, 3.537,
]
LLAMA7B_BLOCK = {"self_attn.q_proj": (4096, 4096), "self_attn.k_proj": (4096, 4096),
                 "self_attn.v_proj": (4096, 4096), "self_attn.o_proj": (4096, 4096),
                 "mlp.gate_proj": (11008, 4096), "mlp.up_proj": (11008, 4096),
                 "mlp.down_proj": (4096, 11008)}


class StubExecutor:
    """The two metric entry points of an executor, over in-memory weights; counts calls and
    checks that the functions it receives pickle (they will run inside Ray actors)."""

    def __init__(self, weights: list[dict[str, torch.Tensor]], seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.weights = weights
        self.stats = [{n: LayerStats(4, torch.rand(w.shape[1], generator=gen) * 4 + 0.1)
                       for n, w in blk.items()} for blk in weights]
        self.calls = {"dense": 0, "weights": 0}

    def shape(self) -> ModelShape:
        return ModelShape(tuple({n: tuple(w.shape) for n, w in blk.items()} for blk in self.weights))

    def dense_block_metrics(self, ids, fn, needs):
        assert needs == frozenset({"sq_norm"})
        pickle.loads(pickle.dumps(fn))
        self.calls["dense"] += 1
        return [fn(w, s) for w, s in zip(self.weights, self.stats, strict=True)]

    def weight_metrics(self, fn):
        pickle.loads(pickle.dumps(fn))
        self.calls["weights"] += 1
        return [{n: fn(w) for n, w in blk.items()} for blk in self.weights]


class ConstantAlphas:
    """A weight-metrics stub returning given per-linear values (ignores the function)."""

    def __init__(self, values: list[dict[str, float]]) -> None:
        self.values = values

    def weight_metrics(self, fn):
        return self.values


def make_weights(sizes: list[dict[str, tuple[int, int]]], seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Student-t weights (heavy tails, different per block) of the given shapes."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for b, blk in enumerate(sizes):
        dist = torch.distributions.StudentT(torch.tensor(2.0 + b))
        out.append({n: dist.sample((r, c)) * (1 + 0.1 * torch.rand((), generator=gen))
                    for n, (r, c) in blk.items()})
    return out


EQUAL = [{"attn.q": (16, 24), "attn.o": (24, 16), "mlp.up": (40, 24), "mlp.down": (24, 40)}] * 4
UNEQUAL = [{"attn.q": (16, 24), "mlp.up": (8 * (b + 2), 24)} for b in range(4)]


def request(executor, target: float, tmp_path: Path | None = None, **options) -> PlanRequest:
    return PlanRequest(executor.shape(), target, "unstructured", CLIP, options=options,
                       executor=executor, calibration=torch.zeros(2, 8, dtype=torch.long),
                       model_key="stub" if tmp_path else "",
                       cache_dir=str(tmp_path) if tmp_path else None)


def check_plan(plan, shape: ModelShape, target: float) -> None:
    plan.validate(shape, CLIP, strict=True)
    assert abs(plan.planned_global(shape) - target) <= 1e-6
    values = [float(r) for blk in plan.ratios for r in blk.values()]
    assert all(CLIP[0] <= v <= CLIP[1] for v in values) and 0 < min(values) and max(values) < 1


# --------------------------------------------------------------------------- renormalisation


def test_additive_and_multiplicative_corrections_hit_the_target() -> None:
    raw = [0.2, 0.7, 1.3, 1.6]
    weights = [100, 300, 200, 50]
    for correct in (additive_correction, multiplicative_correction):
        out = correct(raw, weights, 0.85, CLIP)
        assert abs(weighted_mean(out, weights) - 0.85) < 1e-12
        assert all(CLIP[0] <= s <= CLIP[1] for s in out)
    # Without clipping both are closed-form: a shift and a scale.
    shifted = additive_correction([0.4, 0.6], [1, 1], 0.55, CLIP)
    assert shifted == pytest.approx([0.45, 0.65], abs=1e-15)
    scaled = multiplicative_correction([0.4, 0.6], [1, 3], 0.275, CLIP)
    assert scaled == pytest.approx([0.2, 0.3], abs=1e-15)


def test_corrections_support_row_vectors() -> None:
    rows = torch.tensor([0.9, 1.2, 0.1, 0.95], dtype=torch.float64)  # cols 10 per row
    entries = [rows, 0.5]
    out = additive_correction(entries, [10, 200], 0.7, CLIP)
    assert isinstance(out[0], torch.Tensor) and out[0].shape == (4,) and isinstance(out[1], float)
    assert abs(weighted_mean(out, [10, 200]) - 0.7) < 1e-12
    out = multiplicative_correction(entries, [10, 200], 0.7, CLIP)
    assert abs(weighted_mean(out, [10, 200]) - 0.7) < 1e-12 and float(out[0].max()) <= CLIP[1]


def test_infeasible_target_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match=r"outside allocation.clip=\[0.01, 0.99\]"):
        additive_correction([0.5, 0.6], [1, 1], 0.995, CLIP)
    with pytest.raises(ValueError, match="positive"):
        multiplicative_correction([0.0, 0.6], [1, 1], 0.5, CLIP)


# --------------------------------------------------------------------------- OWL


def test_outlier_ratio_by_hand() -> None:
    # Scores |W| * sqrt(s): a = [[1, 2], [3, 4]] * [1, 2] = [[1, 4], [3, 8]]; b = [[2, 0, 1, 1]]
    # * [1, 1, 1, 3] = [[2, 0, 1, 3]]. Pooled mean 22 / 8 = 2.75; M = 1.2 -> threshold 3.3.
    weights = {"a": torch.tensor([[1.0, -2.0], [3.0, 4.0]]), "b": torch.tensor([[2.0, 0.0, -1.0, 1.0]])}
    stats = {"a": LayerStats(1, torch.tensor([1.0, 4.0])), "b": LayerStats(1, torch.tensor([1.0, 1, 1, 9]))}
    assert outlier_ratio(weights, stats, m=1.2) == pytest.approx(100 * 2 / 8)  # 4 and 8
    # Per matrix: a's mean 4 -> threshold 4.8 -> {8}: 25 %; b's mean 1.5 -> 1.8 -> {2, 3}: 50 %.
    assert outlier_ratio(weights, stats, m=1.2, pool="per_matrix_mean") == pytest.approx(37.5)


def test_owl_mapping_by_hand() -> None:
    # LODs [1, 3, 2], lam 0.1: d = [0, 0.2, 0.1], mean 0.1 -> s = S - (d - 0.1).
    assert owl_ratios([1.0, 3.0, 2.0], 0.5, 0.1) == pytest.approx([0.6, 0.4, 0.5], abs=1e-15)
    assert owl_ratios([2.0, 2.0], 0.7, 0.08) == [0.7, 0.7]


class FixedLODs:
    """A dense-pass stub returning given LODs."""

    def __init__(self, lods: list[float], sizes: list[dict[str, tuple[int, int]]]) -> None:
        self.lods, self.sizes = lods, sizes

    def shape(self) -> ModelShape:
        return ModelShape(tuple(self.sizes))

    def dense_block_metrics(self, ids, fn, needs):
        return self.lods


def test_owl_policy_three_block_toy_by_hand() -> None:
    stub = FixedLODs([1.5, 0.5, 1.0], [{"q": (4, 8), "up": (8, 8)}] * 3)
    plan = ALLOCATIONS.get("owl").plan(request(stub, 0.7))
    # d = [0.16, 0, 0.08], mean 0.08 -> s = [0.62, 0.78, 0.70]: more outliers, less pruning.
    assert [plan.ratios[b]["q"] for b in range(3)] == pytest.approx([0.62, 0.78, 0.70], abs=1e-12)
    assert all(blk["q"] == blk["up"] for blk in plan.ratios)
    assert plan.trail["lod"] == [1.5, 0.5, 1.0] and not plan.warnings
    assert plan.granularity == "block" and plan.policy["m"] == 5.0
    check_plan(plan, stub.shape(), 0.7)


@pytest.mark.parametrize("policy", ["uniform", "owl", "alpha"])
@pytest.mark.parametrize("target", SPARSITIES)
def test_every_policy_meets_the_target(policy: str, target: float) -> None:
    stub = StubExecutor(make_weights(EQUAL))
    plan = ALLOCATIONS.get(policy).plan(request(stub, target))
    check_plan(plan, stub.shape(), target)
    if policy != "uniform":
        assert plan.granularity == "block" and len({blk["attn.q"] for blk in plan.ratios}) > 1


@pytest.mark.parametrize("target", SPARSITIES)
def test_owl_renormalise_on_unequal_blocks(target: float) -> None:
    stub = StubExecutor(make_weights(UNEQUAL))
    shape = stub.shape()
    faithful = ALLOCATIONS.get("owl").plan(request(stub, target))
    assert abs(faithful.planned_global(shape) - target) > 1e-6  # unweighted mean, unequal blocks
    assert any("renormalise=true" in w for w in faithful.warnings)
    faithful.validate(shape, CLIP, strict=False)
    with pytest.raises(PlanError, match="differs from the target"):
        faithful.validate(shape, CLIP, strict=True)
    fixed = ALLOCATIONS.get("owl").plan(request(stub, target, renormalise=True))
    check_plan(fixed, shape, target)


def test_owl_clipping_at_high_sparsity() -> None:
    stub = FixedLODs([0.0, 1.0, 2.0, 3.0], [{"q": (4, 8)}] * 4)
    plain = ALLOCATIONS.get("owl").plan(request(stub, 0.95, lam=0.1))  # raw 1.05 ... 0.85
    assert plain.ratios[0]["q"] == 0.99 and any("clipped" in w for w in plain.warnings)
    assert any("misses the target" in w for w in plain.warnings)
    fixed = ALLOCATIONS.get("owl").plan(request(stub, 0.95, lam=0.1, renormalise=True))
    check_plan(fixed, stub.shape(), 0.95)


# --------------------------------------------------------------------------- AlphaPruning


def naive_hill(lam: list[float], lower: str, fingers: str | None) -> float:
    """§4.2 written out with loops (the test's independent reading of the spec)."""
    n_all = len(lam)
    alphas, dists = [0.0] * (n_all - 1), [1.0] * (n_all - 1)
    counts, edges = np.histogram(np.log10(lam), bins=100)
    peak = 10 ** edges[int(np.argmax(counts))]
    low = math.log10(0.95 * peak) if lower == "quirk" else 0.95 * peak
    cuts = {"xmin_mid": [n_all // 2], None: range(n_all - 1)}.get(fingers, range(n_all - 1))
    for i in cuts:
        if fingers == "xmin_peak" and lam[i] < low:
            continue
        if fingers == "xmin_peak" and lam[i] > 1.5 * peak:
            break
        n = n_all - i
        alphas[i] = 1 + n / (sum(math.log(x) for x in lam[i:]) - n * math.log(lam[i]))
        if alphas[i] > 1:
            dists[i] = max(abs(1 - (lam[i + k] / lam[i]) ** (1 - alphas[i]) - k / n) for k in range(n))
    return alphas[dists.index(min(dists))]


@pytest.mark.parametrize("lower", ["quirk", "fixed"])
@pytest.mark.parametrize("fingers", ["xmin_peak", "xmin_mid", None])
def test_hill_matches_a_literal_reading_of_the_spec(lower: str, fingers: str | None) -> None:
    gen = torch.Generator().manual_seed(1)
    for scale in (0.05, 1.0, 30.0):  # the quirk makes alpha scale-dependent
        lam = eigenvalues(torch.randn(48, 160, generator=gen) * scale
                          + torch.randn(48, 1, generator=gen) * torch.randn(1, 160, generator=gen))
        expected = naive_hill(lam.double().tolist(), lower, fingers)
        assert hill_alpha(lam, lower, fingers, "float64") == pytest.approx(expected, rel=1e-9)


def reference_fp32_hill(lam: torch.Tensor, lower: str, fingers: str | None) -> float:
    """§4.2 in the reference's arithmetic, one cut at a time: fp32 tensors, ``torch.histc``
    with ``linspace`` edges, ``alpha = 1 + n / (sum(log lam[i:]) - n log lam[i])``."""
    lam = torch.sort(lam.float()).values
    size, logs = lam.numel(), torch.log(lam)
    alphas, dists = torch.zeros(size - 1), torch.ones(size - 1)
    log10 = torch.log10(lam)
    counts = torch.histc(log10, 100, min=float(log10.min()), max=float(log10.max()))
    peak = 10 ** torch.linspace(float(log10.min()), float(log10.max()), 101)[int(counts.argmax())]
    low = torch.log10(0.95 * peak) if lower == "quirk" else 0.95 * peak
    for i in ([size // 2] if fingers == "xmin_mid" else range(size - 1)):
        if fingers == "xmin_peak" and lam[i] < low:
            continue
        if fingers == "xmin_peak" and lam[i] > 1.5 * peak:
            break
        n = float(size - i)
        alphas[i] = 1 + n / (torch.sum(logs[i:]) - n * logs[i])
        if alphas[i] > 1:
            seq = torch.arange(n)
            dists[i] = torch.max(torch.abs(1 - (lam[i:] / lam[i]) ** (1 - alphas[i]) - seq / n))
    return float(alphas[int(torch.argmin(dists))])


@pytest.mark.parametrize("fingers", ["xmin_peak", "xmin_mid", None])
def test_hill_float32_follows_the_reference_arithmetic(fingers: str | None) -> None:
    """The faithful scan runs in fp32 like the reference (histc, fp32 sums): it
    reproduces the literal fp32 reading bit for bit on most spectra and within summation-order
    rounding (< 5e-6 relative) on all; the float64 option matches none of them exactly."""
    gen = torch.Generator().manual_seed(1)
    exact32 = exact64 = 0
    for scale in (0.05, 1.0, 30.0, 300.0):
        lam = eigenvalues(torch.randn(200, 600, generator=gen) * scale
                          + torch.randn(200, 1, generator=gen) * torch.randn(1, 600, generator=gen))
        expected = reference_fp32_hill(lam, "quirk", fingers)
        got = hill_alpha(lam, "quirk", fingers)
        assert got == pytest.approx(expected, rel=5e-6, abs=0)
        exact32 += got == expected
        exact64 += hill_alpha(lam, "quirk", fingers, "float64") == expected
    assert exact32 >= 2 and exact64 == 0


@pytest.mark.parametrize("precision", ["float32", "float64"])
def test_hill_alpha_hand_computed(precision: str) -> None:
    """Hand-computed alphas (allocation.md §4.7 regression): lambda = 1, 2, 4, 8, 16.

    A tail of n points from cut i has sum ln(lambda_{i+k} / lambda_i) = ln 2 n (n - 1) / 2, so
    alpha(i) = 1 + 2 / ((n - 1) ln 2) and (lambda_{i+k} / lambda_i)^(1 - alpha) = e^(-2k/(n-1)),
    D(i) = max_k |1 - e^(-2k/(n-1)) - k/n|: 0.2321 (n=5), 0.2366 (4), 0.2988 (3), 0.3647 (2).
    The full scan picks i = 0: alpha = 1 + 1 / (2 ln 2) = 1.7213475. The peak scan sees a
    histogram peak of 1 (one value per bin, first bin wins) and visits only lambda <= 1.5, so
    also i = 0. ``xmin_mid`` fixes i = 2 (n = 3): alpha = 1 + 1 / ln 2 = 2.4426950.
    """
    lam = torch.tensor([1.0, 2.0, 4.0, 8.0, 16.0])
    one_cut = 1 + 1 / (2 * math.log(2))
    for lower in ("quirk", "fixed"):
        assert hill_alpha(lam, lower, "xmin_peak", precision) == pytest.approx(one_cut, rel=1e-6)
        assert hill_alpha(lam, lower, None, precision) == pytest.approx(one_cut, rel=1e-6)
    assert hill_alpha(lam, "quirk", "xmin_mid", precision) == pytest.approx(1 + 1 / math.log(2),
                                                                             rel=1e-6)


@pytest.mark.parametrize("alpha", [2.5, 4.0])
def test_hill_recovers_a_pareto_exponent(alpha: float) -> None:
    gen = torch.Generator().manual_seed(0)
    u = torch.rand(1200, generator=gen, dtype=torch.float64)
    lam = torch.sort(u.pow(-1.0 / (alpha - 1.0))).values  # density ~ x^-alpha on [1, inf)
    for fingers in ("xmin_peak", None):
        assert hill_alpha(lam, fix_fingers=fingers) == pytest.approx(alpha, abs=0.25)


def test_hill_edge_cases() -> None:
    assert hill_alpha(torch.tensor([2.0])) == 0.0
    assert hill_alpha(torch.tensor([0.0, 1.0, 2.0, 4.0]), fix_fingers=None) > 1  # zero dropped
    flat = hill_alpha(torch.full((10,), 3.0), fix_fingers=None)
    assert flat == 0.0  # flat tails fit nothing: first argmin of all-ones D, unvisited alpha
    assert math.isfinite(layer_alpha(torch.randn(12, 20, dtype=torch.bfloat16)))


def test_alpha_mapping_reproduces_the_llama7b_fixture() -> None:
    shape = ModelShape(tuple([LLAMA7B_BLOCK] * 32))
    stub = ConstantAlphas([dict.fromkeys(LLAMA7B_BLOCK, a) for a in LLAMA7B_BLOCK_ALPHA])
    plan = ALLOCATIONS.get("alphapruning").plan(
        PlanRequest(shape, 0.7, "unstructured", CLIP, options={"epsilon": 0.2}, executor=stub))
    ratios = [plan.block_ratio(shape, b) for b in range(32)]
    assert [round(s, 3) for s in ratios[:5]] == [0.570, 0.618, 0.632, 0.631, 0.653]
    assert [round(s, 3) for s in ratios[-4:]] == [0.787, 0.830, 0.841, 0.732]
    assert min(ratios) == pytest.approx(0.568, abs=5e-4) and ratios.index(min(ratios)) == 9
    assert max(ratios) == pytest.approx(0.852, abs=5e-4) and ratios.index(max(ratios)) == 25
    assert abs(plan.planned_global(shape) - 0.7) < 1e-12 and not plan.warnings
    assert plan.trail["block_alpha"] == pytest.approx(LLAMA7B_BLOCK_ALPHA)
    raw = alpha_ratios(LLAMA7B_BLOCK_ALPHA, [1] * 32, 0.7, 0.2)
    assert raw == pytest.approx(ratios, abs=1e-12)


def test_alpha_clipping_and_renormalisation_keep_the_target() -> None:
    shape = ModelShape(tuple([LLAMA7B_BLOCK] * 32))
    stub = ConstantAlphas([dict.fromkeys(LLAMA7B_BLOCK, a) for a in LLAMA7B_BLOCK_ALPHA])
    policy = ALLOCATIONS.get("alpha")
    plan = policy.plan(PlanRequest(shape, 0.85, "unstructured", CLIP, executor=stub,
                                   options={"epsilon": 0.5}))
    check_plan(plan, shape, 0.85)
    assert plan.ratios[25]["mlp.up_proj"] == 0.99 and "25" in plan.warnings[0]
    assert max(plan.trail["unclipped"]) > 1.0
    clip_only = policy.plan(PlanRequest(shape, 0.85, "unstructured", CLIP, executor=stub,
                                        options={"epsilon": 0.5, "renormalise": False}))
    assert clip_only.planned_global(shape) < 0.85 - 1e-6 and len(clip_only.warnings) == 2
    clip_only.validate(shape, CLIP)


def test_alpha_layer_wise_mapping() -> None:
    stub = StubExecutor(make_weights(UNEQUAL))
    plan = ALLOCATIONS.get("alpha").plan(request(stub, 0.7, mapping="layer_wise", epsilon=0.4))
    check_plan(plan, stub.shape(), 0.7)
    assert plan.granularity == "linear"
    alphas = plan.trail["alpha"]
    pairs = sorted((alphas[b][n], plan.ratios[b][n]) for b in range(4) for n in alphas[b])
    assert all(s1 <= s2 + 1e-15 for (_, s1), (_, s2) in zip(pairs, pairs[1:], strict=False))


def test_alpha_cache_is_written_and_reused(tmp_path: Path) -> None:
    stub = StubExecutor(make_weights(EQUAL))
    policy = ALLOCATIONS.get("alpha")
    first = policy.plan(request(stub, 0.7, tmp_path))
    assert stub.calls["weights"] == 1
    files = list((tmp_path / "alpha").iterdir())
    assert len(files) == 1 and files[0].name.startswith("stub-") and files[0].suffix == ".json"
    assert json.loads(files[0].read_text())["alpha"] == first.trail["alpha"]
    second = policy.plan(request(stub, 0.7, tmp_path, epsilon=0.2))  # epsilon: not in the key
    assert stub.calls["weights"] == 1 and second.trail["alpha"] == first.trail["alpha"]
    policy.plan(request(stub, 0.7, tmp_path, fix_fingers="none"))  # another estimator
    assert stub.calls["weights"] == 2 and len(list((tmp_path / "alpha").iterdir())) == 2
    opts = policy.resolve({"fix_fingers": "none"})
    path = cache_path(str(tmp_path), "stub", opts)
    assert path.is_file() and not list((tmp_path / "alpha").glob("*.tmp"))
    path.write_text("{broken")  # an unreadable cache is recomputed and rewritten
    policy.plan(request(stub, 0.7, tmp_path, fix_fingers="none"))
    assert stub.calls["weights"] == 3 and json.loads(path.read_text())["alpha"]


# --------------------------------------------------------------------------- config checks


def test_config_validation_names_value_and_fix(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        tiny_cfg(tmp_path, None, allocation={"name": "owl", "m": -1, "lam": 0.9, "pool": "x",
                                             "renormalize": True})
    text = str(info.value)
    assert "allocation.m=-1: expected a positive number" in text
    assert "allocation.lam=0.9" in text and "allocation.pool='x'" in text
    assert "allocation.renormalize is not an option of 'owl'; valid options:" in text
    with pytest.raises(ConfigError) as info:
        tiny_cfg(tmp_path, None, allocation={"name": "alphapruning", "epsilon": 1.5,
                                             "fix_fingers": "peak", "mapping": "mixed"})
    text = str(info.value)
    assert "allocation.epsilon=1.5" in text and "allocation.fix_fingers='peak'" in text
    assert "allocation.mapping='mixed': expected one of block_wise, layer_wise" in text
    with pytest.raises(ConfigError, match="cannot be combined with pattern='2:4'"):
        tiny_cfg(tmp_path, None, pattern="2:4", allocation={"name": "owl"})
    with pytest.raises(ConfigError, match=r"sparsity=0.995 lies outside allocation.clip"):
        tiny_cfg(tmp_path, None, sparsity=0.995, allocation={"name": "owl"})
    assert tiny_cfg(tmp_path, None, allocation={"name": "alpha", "fix_fingers": None})


# --------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def excerpt(small_text: Path) -> Path:
    return small_text


@pytest.mark.parametrize(("policy", "options"), [("owl", {"lam": 0.1}), ("alpha", {})])
def test_pipeline_end_to_end(policy: str, options: dict, tiny_models: dict[str, Path], excerpt: Path,
                             tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from neuroal.pipeline import run

    monkeypatch.setenv("NEUROAL_CACHE", str(tmp_path / "cache"))
    cfg = tiny_cfg(tiny_models["llama"], None, sparsity=0.8, calib={"source": f"text:{excerpt}"},
                   allocation={"name": policy, **options})
    result = run(cfg, keep_executor=True)
    plan, report = result.plan, result.report
    assert report["planned_sparsity"] == pytest.approx(0.8, abs=1e-6)
    assert report["achieved_sparsity"] == pytest.approx(0.8, abs=0.02)
    assert plan.ratios[0]["self_attn.q_proj"] != plan.ratios[1]["self_attn.q_proj"]
    masks = result.executor.masks()
    prefix = result.executor.workers[0].adapter.block_prefix
    for b, blk in enumerate(plan.ratios):
        for name, ratio in blk.items():
            mask = masks[prefix(b) + name]
            assert torch.all(mask.sum(1) == int(ratio * mask.shape[1])), (b, name)  # Wanda: per row
            assert report["layers"][prefix(b) + name]["target"] == pytest.approx(ratio)
    if policy == "alpha":
        assert len(list((tmp_path / "cache" / "alpha").iterdir())) == 1
        assert plan.warnings and "clipped" in plan.warnings[0]  # 2 blocks, eps 0.3 at 80 %


def test_file_policy_reuses_an_earlier_plan(tiny_models: dict[str, Path], excerpt: Path,
                                            tmp_path: Path) -> None:
    """``allocation: file`` prunes with the row-wise NeuroAL plan an earlier run wrote: the same
    ratios, bit for bit, and the same masks, without a search."""
    from neuroal.pipeline import run

    calib = {"source": f"text:{excerpt}"}
    searched = run(tiny_cfg(tiny_models["llama"], tmp_path / "searched", sparsity=0.7, calib=calib,
                            allocation={"name": "neuroal", "block_grid": [0.05, 0.1],
                                        "row_grid": [0.0, 0.05], "search_samples": 2}),
                   keep_executor=True)
    assert searched.plan.granularity == "row"
    reused = run(tiny_cfg(tiny_models["llama"], None, sparsity=0.7, calib=calib,
                          allocation={"name": "file", "path": str(tmp_path / "searched")}),
                 keep_executor=True)
    plan = reused.plan
    assert plan.policy["name"] == "file" and plan.policy["source"] == searched.plan.policy
    assert plan.policy["mask_group"] == searched.plan.policy["mask_group"] == "row"
    assert not plan.trail and reused.report["search"] is None
    for got, want in zip(plan.ratios, searched.plan.ratios, strict=True):
        assert got.keys() == want.keys()
        assert all(torch.equal(torch.as_tensor(got[n]), torch.as_tensor(want[n])) for n in want)
    masks, want_masks = reused.executor.masks(), searched.executor.masks()
    assert all(torch.equal(masks[n], want_masks[n]) for n in want_masks)


def test_file_policy_errors_before_loading(tmp_path: Path) -> None:
    from neuroal.allocation.plan import SparsityPlan

    SparsityPlan(0.7, "unstructured", [{"q": 0.7}]).save(tmp_path)
    cases = [({"name": "file"}, "needs allocation.path"),
             ({"name": "file", "path": str(tmp_path / "none")}, "cannot read"),
             ({"name": "file", "path": str(tmp_path)}, "that plan targets sparsity 0.7 with "
              "pattern 'unstructured', this run asks for 0.5"),
             ({"name": "file", "path": 3}, "allocation.path=3: expected the directory")]
    for allocation, expected in cases:
        with pytest.raises(ConfigError, match=expected):
            tiny_cfg(tmp_path, None, allocation=allocation)
    assert tiny_cfg(tmp_path, None, sparsity=0.7, allocation={"name": "file", "path": str(tmp_path)})
    with pytest.raises(ConfigError, match="compare: allocation 'file' needs allocation.path"):
        tiny_cfg(tmp_path, None, compare=["file"])
