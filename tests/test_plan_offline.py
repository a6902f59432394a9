"""Planning a built-in alias never reaches for the network: the hub cache or the shipped config,
no download attempt (a download offline retries for about 30 s)."""

from __future__ import annotations

from typing import Any

import pytest

from neuroal.models.loading import load_model_config, resolve_model


def test_alias_config_for_planning_asks_no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    import transformers

    calls: list[dict[str, Any]] = []

    def from_pretrained(*args: Any, **kwargs: Any) -> Any:
        calls.append(kwargs)
        raise OSError("not cached")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", from_pretrained)
    config = load_model_config(resolve_model("llama-2-70b"), network=False)
    assert config.hidden_size == 8192 and config.num_hidden_layers == 80
    assert calls and all(c.get("local_files_only") is True for c in calls)
    calls.clear()
    load_model_config(resolve_model("llama-2-70b"))  # a prune may download the real config
    assert any(c.get("local_files_only") is False for c in calls)


def test_plan_command_on_an_alias_is_offline(monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    import transformers

    from neuroal.commands.plan import main

    def refuse_network(*args: Any, **kwargs: Any) -> Any:
        if not kwargs.get("local_files_only"):
            raise AssertionError("plan tried the network for a built-in alias")
        raise OSError("not cached")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", refuse_network)
    assert main(["--model", "llama-2-7b", "--workers", "1", "--gpu-memory", "80GB"]) == 0
    assert "fits" in capsys.readouterr().out


def test_plan_table_with_host_weights_and_a_retrain_row(capsys: pytest.CaptureFixture[str]) -> None:
    """Host onloading and whole-model retraining together: the table has a row per worker plus
    the retrain row, and each of them gets its host-weights cell (this used to crash)."""
    from neuroal.commands.plan import main

    assert main(["--model", "llama-2-7b", "--workers", "2", "--gpu-memory", "80GB",
                 "--onload", "host", "--recover", "perp-reconstruct,perp-masklora"]) == 0
    out = capsys.readouterr().out
    assert "host weights" in out
    table = [line for line in out.splitlines() if line.strip().startswith(("0 ", "1 ", "all "))]
    assert len(table) == 3 and all(len(r.split()) == len(table[0].split()) for r in table), out
