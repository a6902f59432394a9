"""Shared fixtures: tiny random models of every supported architecture, saved as sharded
safetensors directories with a small byte-level BPE tokenizer trained on WikiText-2."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

os.environ.setdefault("NEUROAL_PROGRESS", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REPO = Path(__file__).resolve().parent.parent
DATA_DIR = REPO.parent / "shared" / "data"
VOCAB = 320
ARCHS = ("llama", "mistral", "qwen2", "opt", "phi")
NEW_ARCHS = ("gpt_neox", "qwen3", "gemma2", "gemma3_text", "phi3", "gptj", "falcon")
"""Architectures found by discovery alone; tested in test_architectures.py."""


def tiny_config(model_type: str, num_layers: int = 2):
    """A tiny config (hidden 64, 2 blocks, GQA where the family has it)."""
    from transformers import AutoConfig

    common = dict(hidden_size=64, num_hidden_layers=num_layers, num_attention_heads=4,
                  vocab_size=VOCAB, max_position_embeddings=256, tie_word_embeddings=False,
                  bos_token_id=1, eos_token_id=2, pad_token_id=0)
    extra = {
        "llama": dict(intermediate_size=128, num_key_value_heads=2, tie_word_embeddings=True),
        "mistral": dict(intermediate_size=128, num_key_value_heads=2, sliding_window=None),
        "qwen2": dict(intermediate_size=128, num_key_value_heads=2),
        "opt": dict(ffn_dim=128, word_embed_proj_dim=64, do_layer_norm_before=True),
        "phi": dict(intermediate_size=128, partial_rotary_factor=0.5),
        "gpt_neox": dict(intermediate_size=128, rotary_pct=0.25),
        "qwen3": dict(intermediate_size=128, num_key_value_heads=2, head_dim=16),
        "gemma2": dict(intermediate_size=128, num_key_value_heads=2, head_dim=16,
                       sliding_window=8),
        "gemma3_text": dict(intermediate_size=128, num_key_value_heads=2, head_dim=16,
                            sliding_window=8,
                            layer_types=["sliding_attention", "full_attention"][:num_layers]),
        "phi3": dict(intermediate_size=128),
        "gptj": dict(rotary_dim=8),
        "falcon": dict(),
    }[model_type]
    return AutoConfig.for_model(model_type, **{**common, **extra})


def train_tokenizer(directory: Path) -> None:
    """A byte-level BPE tokenizer with ``VOCAB`` entries, trained on WikiText-2 validation."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    text = (DATA_DIR / "wikitext2" / "wiki.valid.tokens").read_text(encoding="utf-8")
    tok.train_from_iterator([text[:200_000]], trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>")
    fast.save_pretrained(directory)


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("tokenizer")
    train_tokenizer(directory)
    return directory


def save_tiny_model(model_type: str, directory: Path, tokenizer_dir: Path, seed: int = 0,
                    num_layers: int = 2, shard: str = "60KB") -> Path:
    """Build a random tiny model and save it sharded (several shard files) with a tokenizer."""
    return save_random_model(tiny_config(model_type, num_layers), directory, tokenizer_dir,
                             seed=seed, shard=shard)


def save_random_model(config: Any, directory: Path, tokenizer_dir: Path, *, seed: int = 0,
                      shard: str = "60KB", dead_expert: int | None = None) -> Path:
    """A random model of ``config`` saved as ``save_pretrained`` writes it, in shards of at
    most ``shard``, with the tests' tokenizer. ``dead_expert``: DeepSeek-V3's router bias
    keeps that expert from every token (the magnitude fallback of an expert without tokens)."""
    import shutil

    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    if dead_expert is not None:
        for layer in model.model.layers:
            layer.mlp.gate.e_score_correction_bias[dead_expert] = -10.0  # sigmoid scores are > 0
    model.save_pretrained(directory, max_shard_size=shard)
    for f in tokenizer_dir.iterdir():
        shutil.copy(f, directory / f.name)
    return directory


def random_ids(n: int = 7, seed: int = 0, t: int = 16) -> torch.Tensor:
    """``(n, t)`` random token ids. By default seven sequences: with micro-batch 2, four
    micro-batches, the last one short (uneven shares of a data-parallel stream)."""
    return torch.randint(0, VOCAB, (n, t), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> dict[str, Path]:
    """``model_type -> directory`` of a saved tiny random model, for every architecture."""
    root = tmp_path_factory.mktemp("tiny")
    return {mt: save_tiny_model(mt, root / mt, tokenizer_dir) for mt in ARCHS}


@pytest.fixture(scope="session")
def small_text(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 60 kB excerpt of WikiText-2 validation: fast to tokenise, enough for tiny runs."""
    text = (DATA_DIR / "wikitext2" / "wiki.valid.tokens").read_text(encoding="utf-8")[:60_000]
    path = tmp_path_factory.mktemp("text") / "excerpt.txt"
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not (DATA_DIR / "wikitext2" / "wiki.valid.tokens").is_file():
        pytest.fail(f"shared data not found at {DATA_DIR}; CI expects shared/ beside the repo")
    return DATA_DIR


@pytest.fixture(autouse=True)
def _no_stray_files():
    """Fail a test that leaves files in the working directory (outputs must go to tmp)."""
    before = set(os.listdir(REPO))
    yield
    after = set(os.listdir(REPO))
    stray = sorted(after - before - {".pytest_cache", "__pycache__"})
    assert not stray, f"test left files in the repository: {stray}"


def tiny_cfg(model_dir: Path, out: Path | None, **overrides):
    """A fast config for a tiny model: few short windows, no evaluation unless asked."""
    from neuroal.config.build import build_config, merge

    tree = {
        "model": {"name": str(model_dir)},
        "sparsity": 0.5,
        "calib": {"source": "wikitext2", "nsamples": 4, "seqlen": 32, "data_dir": str(DATA_DIR)},
        "eval": {"datasets": [], "max_windows": 4},
        "engine": {"micro_batch": 2, "device": "cpu"},
        "output": {"dir": str(out) if out else None, "save_model": out is not None},
    }
    return build_config(merge(tree, overrides))


def run_cli_logged(argv: list[str], caplog: pytest.LogCaptureFixture) -> tuple[int, str]:
    """``neuroal.cli.main(argv)`` with the package's ERROR logs captured: (exit code, log text)."""
    import logging

    from neuroal import cli

    logger = logging.getLogger("neuroal")
    with caplog.at_level(logging.ERROR, logger="neuroal"):
        logger.addHandler(caplog.handler)
        try:
            code = cli.main(argv)
        finally:
            logger.removeHandler(caplog.handler)
    return code, caplog.text


@pytest.fixture()
def no_loading(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if any worker is constructed (i.e. if weights would be loaded)."""
    from neuroal.engine import executor as executor_mod

    def refuse(*_args, **_kwargs):
        raise AssertionError("weights were loaded before the input was rejected")

    monkeypatch.setattr(executor_mod, "Worker", refuse)


def assert_rejected_before_loading(model_dir: Path, extra: list[str], expected: list[str],
                                   tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The CLI with ``extra`` flags exits 2, its error names every ``expected`` fragment, and
    nothing is left at the output path or its temporary sibling (use with ``no_loading``)."""
    out = tmp_path / "out"
    argv = ["--model", str(model_dir), "--calib", "wikitext2", "--data-dir", str(DATA_DIR),
            "--eval", "none", "--nsamples", "2", "--seqlen", "16", "--output", str(out)]
    code, text = run_cli_logged(argv + extra, caplog)
    assert code == 2
    for fragment in expected:
        assert fragment in text, f"{fragment!r} not in {text!r}"
    assert not out.exists() and not (tmp_path / "out.neuroal-tmp").exists()


def free_port() -> int:
    """A free TCP port on localhost (a torch.distributed rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def data_mode_rank(rank: int, port: int, model_dir: str, compare: Callable[[str, Any], None],
                   setup: Callable[[int], None] | None = None) -> None:
    """One of two gloo ranks (:func:`spawn_two_ranks`) of a dist executor in data mode: rank 1
    serves, rank 0 runs ``compare(model_dir, stage)`` inside the coordinator; ``setup(rank)``
    first runs on both (e.g. to patch a rank's code)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE="2", LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    if setup is not None:
        setup(rank)
    from neuroal.engine import dist
    from neuroal.runtime.process import seed_everything

    cfg = tiny_cfg(Path(model_dir), None, engine={"executor": "dist", "workers": 2,
                                                   "parallel": "data"})
    if rank > 0:
        assert dist.serve(cfg) == 0
        return
    seed_everything(cfg.seed, cfg.engine.deterministic)
    with dist.coordinator(cfg) as stage:
        compare(model_dir, stage)


def spawn_two_ranks(main: Callable[..., None], *args: Any, timeout: float = 300) -> None:
    """Run ``main(rank, port, *args)`` on two spawned processes (gloo ranks) and join them;
    a rank's exception is raised here, and both are killed after ``timeout`` seconds."""
    import torch.multiprocessing as mp

    ctx = mp.start_processes(main, args=(free_port(), *args), nprocs=2, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + timeout
    try:
        while not ctx.join(timeout=5):
            assert time.monotonic() < deadline, f"distributed ranks did not finish in {timeout} s"
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
