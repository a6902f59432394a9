"""Hook statistics equal brute-force computations (criteria.md §1.2, recovery.md §1.1)."""

from __future__ import annotations

import torch
from torch import nn

from neuroal.capture.collector import StatsCollector
from neuroal.criteria.base import STAT_MEAN, STAT_OUT_SQ_NORM, STAT_SQ_NORM, STAT_VAR


def _collect(lin: nn.Linear, batches: list[torch.Tensor], needs: frozenset[str], flatten: bool):
    col = StatsCollector({"l": lin}, needs)
    with col.attached():
        for x in batches:
            col.begin_batch(x.shape[0])
            lin(x.reshape(-1, x.shape[-1]) if flatten else x)
            col.end_batch()
    return col.stats()["l"]


def test_input_and_output_statistics_match_brute_force() -> None:
    torch.manual_seed(0)
    lin = nn.Linear(6, 4)
    x = torch.randn(5, 7, 6) * torch.linspace(0.5, 3, 6) + torch.arange(6.0)
    needs = frozenset({STAT_SQ_NORM, STAT_MEAN, STAT_VAR, STAT_OUT_SQ_NORM})
    y = lin(x).detach()
    for flatten in (False, True):  # OPT's MLP sees (B*T, h): the normaliser still counts sequences
        st = _collect(lin, [x[:2], x[2:]], needs, flatten)
        assert st.nsamples == 5
        torch.testing.assert_close(st.sq_norm, x.pow(2).sum(dim=(0, 1)) / 5)
        torch.testing.assert_close(st.mean, x.sum(dim=(0, 1)) / 5)
        torch.testing.assert_close(st.var, x.var(dim=1, unbiased=False).mean(dim=0))
        torch.testing.assert_close(st.out_sq_norm, y.pow(2).sum(dim=(0, 1)) / 5)


def test_within_sequence_variance_is_not_the_total_variance() -> None:
    # recovery.md §1.1: two sequences with means 0 and 5 -> pooled within-sequence variance.
    lin = nn.Linear(1, 1)
    x = torch.stack([torch.tensor([-1.0, 1.0, -1.0, 1.0]), torch.tensor([4.0, 6.0, 4.0, 6.0])])
    st = _collect(lin, [x.unsqueeze(-1)], frozenset({STAT_VAR}), False)
    assert float(st.var) == 1.0
    assert float(x.flatten().var(unbiased=False)) > 6


def test_windowed_norm_follows_the_reference_sparsegpt_wrapper() -> None:
    """NeuroAL's SparseGPT search reads input norms from the reference wrapper's
    running statistic, fed one window per call: ``s <- s n/(n+1); n <- n+1; x <- sqrt(2/n) x;
    s <- s + ||x||^2 / n`` (written out here), i.e. window k weighted by 2/(N k). Micro-batches
    of any size give the same result."""
    from neuroal.criteria.base import STAT_SQ_NORM_WINDOWED

    torch.manual_seed(1)
    lin = nn.Linear(6, 4)
    x = torch.randn(5, 7, 6) * torch.linspace(0.5, 3, 6)
    s, n = torch.zeros(6), 0
    for window in x:
        s *= n / (n + 1)
        n += 1
        scaled = (2 / n) ** 0.5 * window
        s += scaled.pow(2).sum(dim=0) / n
    for batches in ([x], [x[:2], x[2:]], [x[i:i + 1] for i in range(5)]):
        for flatten in (False, True):
            st = _collect(lin, batches, frozenset({STAT_SQ_NORM_WINDOWED}), flatten)
            torch.testing.assert_close(st.sq_norm_windowed, s)
    uniform = x.pow(2).sum(dim=(0, 1)) / 5
    assert not torch.allclose(s / s.sum(), uniform / uniform.sum())  # not just a scale factor
