"""PERP (recovery.md §3-4): sparsity-preserving adapters, exact merges, the spec's parameter
counts, bias-norm exports that transformers loads, whole-model and block-wise retraining that
keep every zero, and a single-rank DeepSpeed ZeRO-3 run on the CPU."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, save_tiny_model, tiny_config
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, OPTConfig

from neuroal.data import load_calibration
from neuroal.models.adapter import ModelAdapter
from neuroal.models.loading import build_skeleton
from neuroal.recovery.perp import (
    PERP_VARIANTS,
    PerpOptions,
    ReconstructOptions,
    apply_perp,
    count_perp_parameters,
    merge_perp,
    reconstruct_block,
    trainable_parameters,
    unique_numel,
    zero_masks,
)
from neuroal.recovery.train import TrainOptions, retrain, save_model, window_nll


def _tiny(model_type: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_config(model_type), attn_implementation="sdpa").eval()


@torch.no_grad()
def _prune_linears(linears: dict[str, torch.nn.Linear]) -> dict[str, torch.Tensor]:
    """Zero the smaller half of every weight (per matrix); returns the masks (True = pruned)."""
    masks = {}
    for name, lin in linears.items():
        w = lin.weight
        masks[name] = w.abs() <= w.abs().flatten().kthvalue(w.numel() // 2).values
        w.masked_fill_(masks[name], 0.0)
    return masks


def _prune(model: torch.nn.Module) -> None:
    adapter = ModelAdapter(model)
    for block in adapter.blocks:
        _prune_linears(adapter.prunable_linears(block))


@torch.no_grad()
def _perturb(model: torch.nn.Module, seed: int = 1, size: float = 0.05) -> None:
    """Move every trainable tensor (as training would), seeded."""
    g = torch.Generator().manual_seed(seed)
    for p in trainable_parameters(model).values():
        p.add_(torch.randn(p.shape, generator=g) * size)


def _ids(batch: int = 2, seqlen: int = 24, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 320, (batch, seqlen), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny matrices: one intra-op thread avoids OpenMP spinning on a shared CI machine (10x)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def windows(tokenizer_dir: Path, small_text: Path) -> torch.Tensor:
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    return load_calibration(f"text:{small_text}", tokenizer, 8, 32, seed=0).windows


# --------------------------------------------------------------------------- merge


@pytest.mark.parametrize("model_type", ["llama", "opt"])
@pytest.mark.parametrize("variant", ["masklora", "scalelora"])
def test_merge_keeps_every_zero_and_the_logits(model_type: str, variant: str) -> None:
    model = _tiny(model_type)
    _prune(model)
    before = zero_masks(model)
    kept_before = {n: model.get_parameter(n + ".weight").detach().clone()
                   for n in before}
    ids = _ids()
    with torch.no_grad():
        pruned_logits = model(input_ids=ids).logits
    state = apply_perp(model, PERP_VARIANTS.get(variant))
    _perturb(model)
    with torch.no_grad():
        unmerged = model(input_ids=ids).logits
    merge_perp(model, state)
    with torch.no_grad():
        merged = model(input_ids=ids).logits
    assert (unmerged - pruned_logits).abs().max() > 1e-2, "the adapters changed nothing"
    torch.testing.assert_close(merged, unmerged, rtol=1e-5, atol=1e-5)
    after = zero_masks(model)
    for name, mask in before.items():
        weight = model.get_parameter(name + ".weight")
        assert type(model.get_submodule(name)) is torch.nn.Linear
        assert torch.equal(after[name], mask), f"{name}: zero set changed"
        assert not torch.signbit(weight[mask]).any(), f"{name}: pruned weights must be +0.0"
        assert not torch.equal(weight, kept_before[name]), f"{name}: kept weights never moved"
    assert not any(p.requires_grad for p in model.parameters())


# --------------------------------------------------------------------------- counts


# Hand counts for the tiny configs (hidden 64, 4 heads of 16, 2 KV heads, MLP 128, vocab 320,
# 2 blocks). Llama: q 64x64, k/v 32x64, o 64x64, gate/up 128x64, down 64x128; tied head.
#   norms 2*(64+64)+64 = 320; zero biases 2*(64+32+32+64+128+128+64) = 1024
#   MaskLoRA r16: 2*16*(128+96+96+128+192+192+192) = 32768; ScaleLoRA 2*1024 = 2048
#   head LoRA 16*(64+320) = 6144; total 320*64 + 2*36992 + 64 = 94528
# OPT: q/k/v/out 64x64, fc1 128x64, fc2 64x128, all with biases; LayerNorms with bias; untied.
#   biases 2*(4*64+128+64) = 896; norms 2*2*128+128 = 640; MaskLoRA 2*16*(4*128+2*192) = 28672
#   total 20480 (embed) + 258*64 (positions) + 2*33472 + 128 + 20480 (head) = 124544
TINY_COUNTS = {
    ("llama", "masklora"): ({"biases": 1024, "norms": 320, "adapters": 32768, "lm_head_lora": 6144,
                         "weights": 0}, 94528),
    ("llama", "scalelora"): ({"biases": 1024, "norms": 320, "adapters": 2048, "lm_head_lora": 6144,
                         "weights": 0}, 94528),
    ("llama", "bias-norm"): ({"biases": 1024, "norms": 320, "adapters": 0, "lm_head_lora": 0,
                         "weights": 0}, 94528),
    ("opt", "masklora"): ({"biases": 896, "norms": 640, "adapters": 28672, "lm_head_lora": 6144,
                         "weights": 0}, 124544),
    ("opt", "scalelora"): ({"biases": 896, "norms": 640, "adapters": 1792, "lm_head_lora": 6144,
                         "weights": 0}, 124544),
    ("opt", "bias-norm"): ({"biases": 896, "norms": 640, "adapters": 0, "lm_head_lora": 0,
                         "weights": 0}, 124544),
    ("llama", "full"): ({"biases": 1024, "norms": 320, "adapters": 0, "lm_head_lora": 0,
                         "weights": 73728}, 94528),
    ("opt", "full"): ({"biases": 896, "norms": 640, "adapters": 0, "lm_head_lora": 0,
                       "weights": 65536}, 124544),
}


@pytest.mark.parametrize(("model_type", "variant"), list(TINY_COUNTS))
def test_trainable_counts_match_the_formulas(model_type: str, variant: str) -> None:
    groups, total = TINY_COUNTS[(model_type, variant)]
    options = dataclasses.replace(PERP_VARIANTS.get(variant), add_biases=True)
    model = _tiny(model_type)
    count = count_perp_parameters(model, options)
    assert count.groups == groups and count.total == total
    assert count.fraction == pytest.approx(sum(groups.values()) / total)
    apply_perp(model, options)
    assert unique_numel(trainable_parameters(model)) == count.trainable


@pytest.mark.parametrize(("config", "row"), [
    (LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                 num_attention_heads=32, vocab_size=32000), (6.74, 0.27, 0.004, 40.0, 0.59)),
    (OPTConfig(hidden_size=2048, ffn_dim=8192, num_hidden_layers=24, num_attention_heads=32,
               vocab_size=50272, max_position_embeddings=2048, word_embed_proj_dim=2048),
     (1.32, 0.64, 0.049, 14.2, 1.08)),
], ids=["llama-2-7b", "opt-1.3b"])
def test_counts_reproduce_the_spec_table(config, row: tuple[float, ...]) -> None:
    """recovery.md §3.3's table (total B, biases + norms M and %, LoRA r16 M and %), to the
    table's printed precision, from meta skeletons of the public configs."""
    model = build_skeleton(config, torch.float16)
    count = count_perp_parameters(model, PerpOptions(adapter="mask_lora", lm_head_lora=False))
    subset = count.groups["biases"] + count.groups["norms"]
    lora, total = count.groups["adapters"], count.total
    got = (round(total / 1e9, 2), round(subset / 1e6, 2), round(100 * subset / total, 3),
           round(lora / 1e6, 1), round(100 * lora / total, 2))
    assert got == row


# --------------------------------------------------------------------------- export round trip


@pytest.mark.parametrize("variant", ["bias-norm", "masklora"])
def test_added_biases_round_trip_through_from_pretrained(variant: str, tokenizer_dir: Path,
                                                         tmp_path: Path) -> None:
    model = _tiny("llama")
    _prune(model)
    before = zero_masks(model)
    state = apply_perp(model, dataclasses.replace(PERP_VARIANTS.get(variant), add_biases=True))
    assert len(state.added_biases) == 14 and model.config.attention_bias and model.config.mlp_bias
    _perturb(model)
    merge_perp(model, state)
    save_model(model.state_dict(), model, AutoTokenizer.from_pretrained(tokenizer_dir), tmp_path,
               torch.float32, "40KB")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="sdpa").eval()
    assert loaded.get_parameter("model.layers.1.mlp.down_proj.bias").abs().sum() > 0
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits,
                                   rtol=0, atol=0)
    assert all(torch.equal(zero_masks(loaded)[n], m) for n, m in before.items())
    assert loaded.config.tie_word_embeddings == (variant == "bias-norm")


# --------------------------------------------------------------------------- training


@pytest.mark.parametrize(("model_type", "variant"), [("llama", "masklora"), ("opt", "scalelora")])
def test_retraining_lowers_the_loss_and_keeps_the_masks(model_type: str, variant: str,
                                                        windows: torch.Tensor) -> None:
    model = _tiny(model_type)
    _prune(model)
    before = zero_masks(model)
    nll_before = window_nll(model, windows, 4, torch.device("cpu")).mean()
    options = TrainOptions(lr=5e-3, steps=12, batch_size=2, grad_accum=2, seed=0,
                           gradient_checkpointing=model_type == "opt")
    info, state = retrain(model, windows, PERP_VARIANTS.get(variant), options)
    nll_after = window_nll(model, windows, 4, torch.device("cpu")).mean()
    assert nll_after < nll_before - 0.05, (float(nll_before), float(nll_after))
    assert info.losses[-1] < info.losses[0]
    assert info.steps == 12 and info.tokens == 12 * 2 * 2 * windows.shape[1]
    assert info.count is state.count and info.count.trainable > 0
    after = zero_masks(model)
    assert all(torch.equal(after[n], m) for n, m in before.items())


def test_full_fine_tuning_remasks_weights_and_moments(windows: torch.Tensor) -> None:
    """``perp-full`` (recovery.md §4.2 option 2) trains the block weights themselves: every
    zero survives each step, Adam's moments stay zero there, the kept weights move; without the
    re-masking the zeros would come back."""
    from neuroal.recovery.perp import apply_perp, block_weights
    from neuroal.recovery.remask import MaskKeeper
    from neuroal.recovery.train import TorchRunner, run_steps

    options = TrainOptions(lr=1e-3, steps=4, batch_size=2, grad_accum=1, seed=0)
    runs = {}
    for keep in (True, False):
        model = _tiny("llama")
        _prune(model)
        before = {n: w.detach().clone() for n, w in block_weights(model).items()}
        state = apply_perp(model, PERP_VARIANTS.get("full"))
        assert state.count.groups["weights"] == sum(w.numel() for w in before.values())
        runner = TorchRunner(model, options, options.steps)
        assert runner.keeper and runner.keeper.packed_bytes() * 8 >= \
            sum(w.numel() for w in before.values())
        if not keep:
            runner.keeper = MaskKeeper({})  # holds nothing: the step no longer re-masks
        info = run_steps(runner, windows, options, options.steps)
        runs[keep] = (model, before, runner, info)
    model, before, runner, info = runs[True]
    for name, weight in block_weights(model).items():
        pruned = before[name] == 0
        assert (weight[pruned] == 0).all(), name
        assert not torch.equal(weight[~pruned], before[name][~pruned]), name
        moments = runner.optimizer.state[weight]
        assert (moments["exp_avg"][pruned] == 0).all() and (moments["exp_avg_sq"][pruned] == 0).all()
    assert info.losses[-1] < info.losses[0]
    model, before, _, _ = runs[False]
    assert any((w[before[n] == 0] != 0).any() for n, w in block_weights(model).items())


def test_bit_packing_round_trip() -> None:
    from neuroal.recovery.remask import pack_bits, unpack_bits

    for n in (1, 7, 8, 9, 1000):
        mask = torch.rand(n, generator=torch.Generator().manual_seed(n)) < 0.5
        packed = pack_bits(mask)
        assert packed.dtype == torch.uint8 and packed.numel() == -(-n // 8)
        assert torch.equal(unpack_bits(packed, n), mask)


def test_token_budget_sets_the_steps() -> None:
    assert TrainOptions(tokens=1000, batch_size=2, grad_accum=2).plan_steps(64) == 4
    assert TrainOptions(tokens=1000, batch_size=2, grad_accum=2).plan_steps(64, ranks=4) == 1
    with pytest.raises(ValueError, match="lr"):
        TrainOptions(lr=0)


@torch.no_grad()
def _block_mse(fn, inputs: torch.Tensor, targets: torch.Tensor) -> float:
    out = torch.cat([fn(inputs[i:i + 2]) for i in range(0, inputs.shape[0], 2)])
    return float((out - targets).pow(2).mean())


def test_reconstruct_block_fits_the_dense_outputs_and_keeps_the_masks(windows: torch.Tensor) -> None:
    model = _tiny("llama").requires_grad_(False)  # as a worker holds it
    adapter = ModelAdapter(model)
    with torch.no_grad():
        inputs, _ = adapter.capture_block0(input_ids=windows)
        _, call = adapter.capture_block0(input_ids=windows[:2])
    block = adapter.blocks[0]

    def fn(x: torch.Tensor) -> torch.Tensor:
        return adapter.call_block(block, x, call)

    with torch.no_grad():
        targets = torch.cat([fn(inputs[i:i + 2]) for i in range(0, inputs.shape[0], 2)])
    linears = adapter.prunable_linears(block)
    masks = _prune_linears(linears)
    mse_pruned = _block_mse(fn, inputs, targets)
    info = reconstruct_block(block, fn, inputs, targets, masks, linears,
                             ReconstructOptions(steps=30, batch_size=2, lr=1e-2))
    mse_fit = _block_mse(fn, inputs, targets)
    assert mse_fit < 0.7 * mse_pruned, (mse_pruned, mse_fit)
    assert info.mse_before == pytest.approx(mse_pruned, rel=1e-4)
    assert info.mse_after == pytest.approx(mse_fit, rel=1e-4)
    assert info.trainable == 16384 + 2 * 64  # MaskLoRA r16 of one block (see TINY_COUNTS) + 2 norms
    for name, lin in adapter.prunable_linears(block).items():
        assert lin is linears[name], "the block must hold the original linear objects again"
        assert (lin.weight[masks[name]] == 0).all() and not torch.signbit(lin.weight[masks[name]]).any()
    assert not any(p.requires_grad for p in model.parameters()), "flags must be restored"


# --------------------------------------------------------------------------- launch/recover.py


def _pruned_dir(root: Path, tokenizer_dir: Path, model_type: str) -> Path:
    dense = save_tiny_model(model_type, root / "dense", tokenizer_dir)
    model = AutoModelForCausalLM.from_pretrained(dense)
    _prune(model)
    out = root / "pruned"
    model.save_pretrained(out)
    for f in tokenizer_dir.iterdir():
        shutil.copy(f, out / f.name)
    return out


def _check_recovered(pruned: Path, out: Path) -> dict:
    report = json.loads((out / "recovery.json").read_text())
    old = AutoModelForCausalLM.from_pretrained(pruned)
    new = AutoModelForCausalLM.from_pretrained(out)
    moved = 0
    for name, mask in zero_masks(old).items():
        weight = new.get_parameter(name + ".weight")
        assert (weight[mask] == 0).all(), f"{name}: a pruned weight came back"
        moved += int(not torch.equal(weight, old.get_parameter(name + ".weight")))
    assert report["achieved_sparsity"] == pytest.approx(0.5, abs=0.01)
    return report | {"moved": moved}


def test_recover_entry_point_in_process(tokenizer_dir: Path, small_text: Path, tmp_path: Path) -> None:
    sys.path.insert(0, str(REPO / "launch"))
    try:
        from recover import main
    finally:
        sys.path.remove(str(REPO / "launch"))
    pruned = _pruned_dir(tmp_path, tokenizer_dir, "opt")
    out = tmp_path / "perp"
    assert main([str(pruned), "--output", str(out), "--allow-unpruned", "--variant", "bias-norm",
                 "--steps", "4",
                 "--calib", f"text:{small_text}", "--eval", f"text:{small_text}", "--nsamples", "4",
                 "--seqlen", "32", "--eval-windows", "2", "--lr", "1e-2", "--device", "cpu"]) == 0
    report = _check_recovered(pruned, out)
    assert report["moved"] == 0  # bias-norm never touches a weight matrix
    assert report["train"]["params"]["groups"]["adapters"] == 0
    assert report["perplexity"]["after"] < report["perplexity"]["before"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# DeepSpeed JIT-compiles a CPU shared-memory all-reduce kernel when its communication backend
# starts (about 1.5 CPU-minutes with g++, once per machine). It is a speed path for several CPU
# ranks and irrelevant to one; the test turns it off so it needs no compiler and stays fast.
_LAUNCH = ("import runpy, sys, deepspeed.ops; "
           "deepspeed.ops.__compatible_ops__['deepspeed_shm_comm'] = False; "
           "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')")


@pytest.mark.parametrize("variant", ["masklora", "full"])
def test_deepspeed_zero3_single_rank_keeps_the_masks(variant: str, tokenizer_dir: Path,
                                                     small_text: Path, tmp_path: Path) -> None:
    """MaskLoRA on a frozen base, and ``full``: the weights themselves trained under ZeRO-3,
    re-masked through each rank's local fp32 fragment (recovery.md §4.2)."""
    pytest.importorskip("deepspeed", reason="DeepSpeed is not installed (pip install '.[deepspeed]')")
    pruned = _pruned_dir(tmp_path, tokenizer_dir, "llama")
    out = tmp_path / "perp"
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0",
           "LOCAL_WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()),
           "ACCELERATE_USE_DEEPSPEED": "true",
           "ACCELERATE_DEEPSPEED_CONFIG_FILE": str(REPO / "configs/deepspeed/zero3.json"),
           "NEUROAL_PROGRESS": "0", "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    lr = "1e-2" if variant == "masklora" else "1e-3"
    cmd = [sys.executable, "-c", _LAUNCH, str(REPO / "launch/recover.py"), str(pruned), "--output",
           str(out), "--allow-unpruned", "--variant", variant, "--steps", "4", "--lr", lr,
           "--calib", f"text:{small_text}", "--eval", f"text:{small_text}", "--nsamples", "4",
           "--seqlen", "32", "--eval-windows", "2"]
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    report = _check_recovered(pruned, out)
    assert report["backend"] == "accelerate" and report["zero_stage"] == 3 and report["ranks"] == 1
    assert report["untied_head"] == (variant == "masklora") and report["train"]["steps"] == 4
    assert report["moved"] == 14, f"{variant} must have updated every kept weight matrix"
    assert report["perplexity"]["after"] < report["perplexity"]["before"]


def test_recover_entry_point_takes_the_variant_learning_rate() -> None:
    """Without --lr, ``launch/recover.py --variant full`` trains at the pipeline's
    ``perp-full`` rate (2e-5), the adapters at 5e-4; an explicit --lr wins."""
    from neuroal.commands.recover import build_job, parse
    from neuroal.recovery import RECOVERY_STEPS

    for variant in ("full", "masklora", "scalelora", "bias-norm"):
        job = build_job(parse(["m", "--output", "o", "--variant", variant]))
        assert job.train.lr == RECOVERY_STEPS.get(f"perp-{variant}").defaults["lr"], variant
    assert build_job(parse(["m", "--output", "o", "--variant", "full"])).train.lr == 2e-5
    assert build_job(parse(["m", "--output", "o", "--variant", "full", "--lr", "1e-3"])).train.lr == 1e-3


class _DropoutBlock(torch.nn.Module):
    """A block with one prunable linear and a dropout; records its mode at every call."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(8, 8)
        self.drop = torch.nn.Dropout(0.5)
        self.modes: list[bool] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.modes.append(self.drop.training)
        return self.drop(self.fc(x))


def test_reconstruction_trains_the_block_in_train_mode_with_floor_warmup(monkeypatch) -> None:
    """The reference's reconstruction calls ``layer.train()`` for the fit (dropout
    active) and warms up for ``int(0.1 * steps)`` steps (1 of 15; the Trainer's ceil gives 2)."""
    import neuroal.recovery.perp.reconstruct as perp_module

    gen = torch.Generator().manual_seed(0)
    block = _DropoutBlock().eval().requires_grad_(False)
    with torch.no_grad():
        block.fc.weight[:, :4] = 0.0
    inputs = torch.randn(4, 3, 8, generator=gen)
    with torch.no_grad():
        targets = block(inputs)
    block.modes.clear()
    lrs: list[float] = []
    real_adamw = perp_module.adamw

    def spy(params, lr):
        optimizer = real_adamw(params, lr)
        optimizer.register_step_pre_hook(lambda opt, *_: lrs.append(opt.param_groups[0]["lr"]))
        return optimizer

    monkeypatch.setattr(perp_module, "adamw", spy)
    options = ReconstructOptions(steps=15, batch_size=2, lr=1e-2, measure=True)
    reconstruct_block(block, block, inputs, targets, {"fc": block.fc.weight == 0},
                      {"fc": block.fc}, options)
    # MSE before and after (2 micro-batches each) keep the caller's eval mode; the fit trains
    assert block.modes == [False] * 2 + [True] * 15 + [False] * 2
    assert not block.training and not block.drop.training and not block.fc.training
    assert lrs[0] == 0.0 and lrs[1] == pytest.approx(1e-2)  # one warm-up step, then the peak
    assert perp_module.reconstruction_warmup_steps(15, 0.1) == 1


@pytest.mark.parametrize("rank", [4, 16])
def test_scale_lora_vectors_follow_the_authors_rank_r_form_under_adam(rank: int) -> None:
    """The two ScaleLoRA vectors, trained by PERP's AdamW, give the same effective
    weights step for step as the authors' rank-r ``W * (B A)`` with ``A = B = 1/sqrt(r)``
    trained by plain AdamW (recovery.md §3.4), up to float32 rounding."""
    from neuroal.recovery.perp import ScaleLoRALinear, adamw

    gen = torch.Generator().manual_seed(rank)
    rows, cols, lr = 6, 10, 1e-2
    weight = torch.randn(rows, cols, generator=gen) * (torch.rand(rows, cols, generator=gen) > 0.5)
    x = torch.randn(32, cols, generator=gen)
    y = x @ (weight * (1 + 0.3 * torch.randn(rows, cols, generator=gen))).T

    b = torch.full((rows, rank), rank ** -0.5, requires_grad=True)
    a = torch.full((rank, cols), rank ** -0.5, requires_grad=True)
    reference = torch.optim.AdamW([b, a], lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    linear = torch.nn.Linear(cols, rows, bias=False)
    linear.weight.data.copy_(weight)
    linear.weight.requires_grad_(False)
    module = ScaleLoRALinear(linear, rank=rank)
    ours = adamw([module.row_scale, module.col_scale], lr)
    for step in range(60):
        for opt, loss in ((reference, (x @ (weight * (b @ a)).T - y).pow(2).mean()),
                          (ours, (module(x) - y).pow(2).mean())):
            opt.zero_grad()
            loss.backward()
            opt.step()
        expected = weight * (b @ a).detach()
        got = module.merged_weight()
        assert (got - expected).abs().max() < 1e-5, step  # 1.4e-6 measured; 0.5 without sqrt(r)
    assert (expected - weight).abs().max() > 0.05  # the weights really moved
