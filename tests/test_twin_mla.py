"""The tiny twin of a multi-head latent attention model (DeepSeek-V3) runs: its shared-input
groups are found, not replaced by the "every linear counted alone" fallback."""

from __future__ import annotations

import logging

import pytest

from neuroal.models.adapter import ModelAdapter
from neuroal.models.consumers import shrink_config
from neuroal.models.loading import load_model_config, resolve_model
from neuroal.models.sharing import derive_input_groups


def test_mla_twin_keeps_head_parts_consistent() -> None:
    config = load_model_config(resolve_model("deepseek-v3"), network=False)
    twin = shrink_config(config)
    assert twin.qk_rope_head_dim == twin.qk_nope_head_dim == twin.head_dim
    assert twin.v_head_dim == 2 * twin.qk_rope_head_dim
    assert twin.kv_lora_rank < config.kv_lora_rank and twin.n_group == 1


def test_mla_shared_input_probe_runs(caplog: pytest.LogCaptureFixture) -> None:
    config = load_model_config(resolve_model("deepseek-v3"), network=False)
    with caplog.at_level(logging.WARNING):
        groups = derive_input_groups(config, ModelAdapter)
    assert "probe failed" not in caplog.text
    assert groups, "the attention's projections of the normed input share it"
