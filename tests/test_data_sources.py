"""``hf:`` and ``tokens:`` calibration sources on local files, offline."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from neuroal.data import (
    DataNotFoundError,
    SourceSpec,
    calibration_windows,
    eval_text,
    load_calibration,
    parse_source,
    tokenize_text,
)
from neuroal.data.sources import CHARS_PER_TOKEN, HFSpec


class CharTokenizer:
    """One id per character; ``chat_template`` set makes it render conversations."""

    chat_template: str | None = None

    def __call__(self, text: str, return_tensors: str | None = None) -> dict[str, torch.Tensor]:
        return {"input_ids": torch.tensor([[ord(ch) % 300 for ch in text]], dtype=torch.int64)}


ROWS = [{"text": f"Document number {i}. " + "word " * (5 + i % 7), "id": i} for i in range(40)]


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture()
def jsonl_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return folder


def _expected(texts: list[str], tokenizer, nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    """The documented draw: rows shuffled with the seed, joined until the budget, stream draw."""
    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    picked, chars = [], 0
    for i in order:
        picked.append(texts[i])
        chars += len(texts[i]) + 2
        if chars >= CHARS_PER_TOKEN * nsamples * seqlen:
            break
    ids = tokenize_text("\n\n".join(picked), tokenizer)
    return calibration_windows(ids, nsamples, seqlen, seed)


def test_hf_spec_parts() -> None:
    assert HFSpec.parse("allenai/c4:en:validation:text") == HFSpec("allenai/c4", "en", "validation",
                                                                   "text")
    assert HFSpec.parse("./d:::messages") == HFSpec("./d", None, "train", "messages")
    with pytest.raises(ValueError, match="expected hf:"):
        HFSpec.parse(":x")
    with pytest.raises(DataNotFoundError, match="does not exist"):
        parse_source("hf:./no/such/folder")


def test_hf_local_jsonl_folder(jsonl_dir: Path) -> None:
    tok = CharTokenizer()
    data = load_calibration(f"hf:{jsonl_dir}", tok, 4, 16, seed=3)
    assert data.windows.shape == (4, 16) and data.windows.dtype == torch.int64
    assert torch.equal(data.windows, _expected([r["text"] for r in ROWS], tok, 4, 16, 3))
    assert data.source_info.origin == "local" and "load_dataset" in data.source_info.location
    other = load_calibration(f"hf:{jsonl_dir}", tok, 4, 16, seed=4)
    assert not torch.equal(data.windows, other.windows)


def test_hf_parquet_file_and_named_field(tmp_path: Path) -> None:
    import datasets

    path = tmp_path / "rows.parquet"
    datasets.Dataset.from_list([{"body": r["text"]} for r in ROWS]).to_parquet(str(path))
    tok = CharTokenizer()
    data = load_calibration(f"hf:{path}:::body", tok, 3, 8, seed=0)
    assert torch.equal(data.windows, _expected([r["text"] for r in ROWS], tok, 3, 8, 0))
    with pytest.raises(ValueError, match="no 'text' field; its fields: body"):
        load_calibration(f"hf:{path}", tok, 3, 8, seed=0)
    with pytest.raises(ValueError, match="no field 'nope'"):
        load_calibration(f"hf:{path}:::nope", tok, 3, 8, seed=0)


def test_hf_saved_to_disk_with_split(tmp_path: Path) -> None:
    import datasets

    folder = tmp_path / "saved"
    datasets.DatasetDict({"validation": datasets.Dataset.from_list(ROWS)}).save_to_disk(str(folder))
    tok = CharTokenizer()
    data = load_calibration(f"hf:{folder}::validation", tok, 2, 8, seed=1)
    assert torch.equal(data.windows, _expected([r["text"] for r in ROWS], tok, 2, 8, 1))


def test_hf_evaluation_text_joins_rows_in_order(jsonl_dir: Path) -> None:
    text = eval_text(f"hf:{jsonl_dir}")
    assert text.text == "\n\n".join(r["text"] for r in ROWS)


def test_hf_missing_hub_dataset_offline_is_a_clear_error() -> None:
    with pytest.raises(DataNotFoundError, match="could not be loaded"):
        load_calibration("hf:someone/no-such-dataset-xyz", CharTokenizer(), 2, 8, seed=0)


CHATS = [{"messages": [{"role": "user", "content": f"Question {i}? " * 3},
                       {"role": "assistant", "content": f"Answer {i}. " * 4}]} for i in range(12)]
SHAREGPT = [{"conversations": [{"from": "human", "value": f"Question {i}? " * 3},
                               {"from": "gpt", "value": f"Answer {i}. " * 4}]} for i in range(12)]


def test_chat_template_renders_conversations(tmp_path: Path, tokenizer_dir: Path) -> None:
    from gguf_fixture import CHAT_TEMPLATE
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    tok.chat_template = CHAT_TEMPLATE
    for name, rows in (("openai", CHATS), ("sharegpt", SHAREGPT)):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "data.json").write_text(json.dumps(rows))
        data = load_calibration(f"hf:{folder}", tok, 3, 16, seed=2, chat_template=True)
        rendered = [f"<s>user: {f'Question {i}? ' * 3}</s>\n<s>assistant: "
                    f"{f'Answer {i}. ' * 4}</s>\n" for i in range(12)]
        assert rendered[0] == tok.apply_chat_template(CHATS[0]["messages"], tokenize=False)
        assert torch.equal(data.windows, _expected(rendered, tok, 3, 16, 2)), name
        assert "chat template applied" in data.source_info.note


def test_conversations_get_the_chat_template_without_asking(tmp_path: Path,
                                                            tokenizer_dir: Path) -> None:
    """A chat-shaped field is rendered with the template even without calib.chat_template,
    never calibrated on the Python text of the message dicts; the note says so."""
    from gguf_fixture import CHAT_TEMPLATE
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    tok.chat_template = CHAT_TEMPLATE
    folder = tmp_path / "chats"
    folder.mkdir()
    (folder / "chats.jsonl").write_text("".join(json.dumps(r) + "\n" for r in CHATS))
    asked = load_calibration(f"hf:{folder}/chats.jsonl:::messages", tok, 3, 16, seed=2,
                             chat_template=True)
    auto = load_calibration(f"hf:{folder}/chats.jsonl:::messages", tok, 3, 16, seed=2)
    assert torch.equal(auto.windows, asked.windows)
    assert "chat template applied (automatically" in auto.source_info.note
    unnamed = load_calibration(f"hf:{folder}/chats.jsonl", tok, 3, 16, seed=2)  # no text field
    assert torch.equal(unnamed.windows, asked.windows)
    decoded = tok.decode(auto.windows[0])
    assert "'role'" not in decoded and "'content'" not in decoded
    with pytest.raises(ValueError, match="has no chat template"):
        load_calibration(f"hf:{folder}/chats.jsonl:::messages", CharTokenizer(), 2, 8, seed=0)
    with pytest.raises(ValueError, match="without a tokenizer"):
        eval_text(f"hf:{folder}/chats.jsonl:::messages")


@pytest.mark.parametrize("value, kind", [(["a", "b"], "list"), ({"a": "b"}, "dict"), (7, "int"),
                                         ([{"x": 1}], "list")])
def test_non_text_fields_are_refused_naming_field_and_type(tmp_path: Path, value: object,
                                                           kind: str) -> None:
    folder = tmp_path / "odd"
    folder.mkdir()
    rows = [{"text": f"row {i}", "meta": value} for i in range(6)]
    (folder / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ValueError, match=rf"field 'meta' holds {kind} values"):
        load_calibration(f"hf:{folder}/data.jsonl:::meta", CharTokenizer(), 2, 8, seed=0)
    assert load_calibration(f"hf:{folder}/data.jsonl", CharTokenizer(), 2, 8, seed=0) is not None


def test_chat_template_needs_a_template_and_an_hf_source(tmp_path: Path, small_text: Path) -> None:
    folder = tmp_path / "c"
    folder.mkdir()
    (folder / "data.json").write_text(json.dumps(CHATS))
    with pytest.raises(ValueError, match="has no chat template"):
        load_calibration(f"hf:{folder}", CharTokenizer(), 2, 8, seed=0, chat_template=True)
    with pytest.raises(ValueError, match="applies to hf:"):
        load_calibration(f"text:{small_text}", CharTokenizer(), 2, 8, seed=0, chat_template=True)


def test_tokens_pt_windows_and_npy_stream(tmp_path: Path) -> None:
    windows = torch.arange(6 * 20).reshape(6, 20)
    torch.save({"input_ids": windows}, tmp_path / "w.pt")
    data = load_calibration(f"tokens:{tmp_path / 'w.pt'}", None, 4, 16, seed=0)
    assert torch.equal(data.windows, windows[:4, :16])
    assert data.source_info.sha256 and data.source_info.origin == "file"

    stream = np.arange(500, dtype=np.int32)
    np.save(tmp_path / "s.npy", stream)
    data = load_calibration(f"tokens:{tmp_path / 's.npy'}", None, 5, 32, seed=7)
    assert torch.equal(data.windows, calibration_windows(torch.arange(500), 5, 32, 7))


def test_tokens_bad_input_is_refused(tmp_path: Path) -> None:
    torch.save(torch.ones(4, 8), tmp_path / "f.pt")
    with pytest.raises(ValueError, match="expected integer token ids"):
        load_calibration(f"tokens:{tmp_path / 'f.pt'}", None, 2, 8, seed=0)
    torch.save(torch.zeros(2, 8, dtype=torch.long), tmp_path / "short.pt")
    with pytest.raises(ValueError, match="holds 2 windows of 8 tokens"):
        load_calibration(f"tokens:{tmp_path / 'short.pt'}", None, 4, 8, seed=0)
    with pytest.raises(ValueError, match="expected a .pt"):
        parse_source(f"tokens:{tmp_path / 'x.txt'}")
    with pytest.raises(DataNotFoundError):
        parse_source(f"tokens:{tmp_path / 'missing.npy'}")
    assert parse_source(f"tokens:{tmp_path / 'f.pt'}") == SourceSpec("tokens", str(tmp_path / "f.pt"))


def test_config_rejects_misused_sources(tmp_path: Path, small_text: Path) -> None:
    from neuroal.config.build import ConfigError, build_config

    torch.save(torch.zeros(2, 8, dtype=torch.long), tmp_path / "w.pt")
    with pytest.raises(ConfigError) as err:
        build_config({"calib": {"source": f"text:{small_text}", "chat_template": True},
                      "eval": {"datasets": [f"tokens:{tmp_path / 'w.pt'}"]}})
    text = str(err.value)
    assert "calib.chat_template=true does not apply" in text
    assert "is a calibration source only" in text


def test_prune_with_hf_calibration(tiny_models: dict[str, Path], jsonl_dir: Path,
                                   tmp_path: Path) -> None:
    from conftest import tiny_cfg

    from neuroal.pipeline import run

    cfg = tiny_cfg(tiny_models["llama"], None, calib={"source": f"hf:{jsonl_dir}", "nsamples": 2,
                                                      "seqlen": 16})
    report = run(cfg).report
    assert report["calibration"]["origin"]["spec"] == f"hf:{jsonl_dir}"
    assert report["achieved_sparsity"] == pytest.approx(0.5, abs=0.01)
