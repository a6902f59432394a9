"""Write a tiny Llama model as a GGUF file, the way llama.cpp's converter lays it out.

Shared by the tests that need a GGUF checkpoint both transformers and
``neuroal.models.gguf.GGUFCheckpoint`` can load, without any download.
"""

from __future__ import annotations

import os
from pathlib import Path

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType

# "F32": every tensor as float32 (the file round-trips the model exactly).
# "Q8_0": 2-D weights as Q8_0 blocks, norms as float32 (as llama.cpp does).
QUANT_TYPES = {"F32": GGMLQuantizationType.F32, "Q8_0": GGMLQuantizationType.Q8_0}


def tiny_llama_config(tie_word_embeddings: bool = False, **overrides):
    """A 2-block Llama config: hidden 64, 4 heads / 2 KV heads (head dim 16), vocab 256."""
    from transformers import LlamaConfig

    kwargs = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                  rms_norm_eps=1e-5, tie_word_embeddings=tie_word_embeddings)
    kwargs.update(overrides)
    return LlamaConfig(**kwargs)


def tiny_llama(seed: int = 0, tie_word_embeddings: bool = False, **overrides):
    """A random LlamaForCausalLM from :func:`tiny_llama_config`, norms perturbed off 1."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config(tie_word_embeddings, **overrides)).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):  # make the norms informative, not all ones
                param.add_(0.1 * torch.randn_like(param))
    return model


def _llama_cpp_permute(weight: np.ndarray, n_head: int) -> np.ndarray:
    """Reorder q/k rows from HF's half-split RoPE layout to llama.cpp's interleaved one.

    Within each head, HF keeps the first halves of the rotary pairs in rows ``[0, d/2)`` and the
    second halves in ``[d/2, d)``; llama.cpp interleaves them (pair ``i`` at rows ``2i, 2i+1``).
    Shape ``(n_head * d, cols)`` -> ``(n_head, 2, d/2, cols)`` -> swap -> back.
    """
    rows = weight.shape[0]
    split = weight.reshape(n_head, 2, rows // n_head // 2, *weight.shape[1:])
    return split.swapaxes(1, 2).reshape(weight.shape)


def _rope_theta(config) -> float:
    theta = getattr(config, "rope_theta", None)
    if theta is None:  # transformers 5 keeps it in `rope_parameters`
        theta = (getattr(config, "rope_parameters", None) or {}).get("rope_theta", 10000.0)
    return float(theta)


CHAT_TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>\n{% endfor %}"
                 "{% if add_generation_prompt %}<s>assistant: {% endif %}")
"""A small chat template stored in the GGUF file by :func:`add_bpe_tokenizer`."""


def add_bpe_tokenizer(writer, tokenizer_dir: str | os.PathLike) -> None:
    """Store a byte-level BPE ``tokenizer.json`` (the tests' tokenizer) as GGUF ``gpt2``
    tokenizer metadata, with special tokens ``<pad>``, ``<s>``, ``</s>`` and a chat template."""
    import json

    data = json.loads((Path(tokenizer_dir) / "tokenizer.json").read_text(encoding="utf-8"))
    vocab = data["model"]["vocab"]
    tokens = sorted(vocab, key=vocab.get)
    merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"]["merges"]]
    special = {t["content"]: t["id"] for t in data.get("added_tokens", [])}
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t in special else 1 for t in tokens])  # 3 = control
    writer.add_token_merges(merges)
    writer.add_bos_token_id(special["<s>"])
    writer.add_eos_token_id(special["</s>"])
    writer.add_pad_token_id(special["<pad>"])
    writer.add_chat_template(CHAT_TEMPLATE)


def write_tiny_llama_gguf(path: str | os.PathLike, model, quant: str = "F32",
                          tokenizer_dir: str | os.PathLike | None = None) -> Path:
    """Write ``model`` (a LlamaForCausalLM) as a llama.cpp-style GGUF file.

    q/k weights are stored permuted as llama.cpp's converter stores them; with tied embeddings
    the file has no ``output.weight`` (transformers infers ``tie_word_embeddings`` from that).

    Args:
        path: The ``.gguf`` file to write; its folder must exist.
        model: The model; its config supplies the metadata transformers needs.
        quant: ``"F32"`` or ``"Q8_0"`` (see ``QUANT_TYPES``).
        tokenizer_dir: A folder with a byte-level BPE ``tokenizer.json`` to embed
            (:func:`add_bpe_tokenizer`); none by default.

    Returns:
        The path written.
    """
    if quant not in QUANT_TYPES:
        raise ValueError(f"quant must be one of {sorted(QUANT_TYPES)}, got {quant!r}")
    config = model.config
    n_blocks = config.num_hidden_layers
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    arch = gguf.MODEL_ARCH.LLAMA
    name_map = gguf.get_tensor_name_map(arch, n_blocks)

    path = Path(path)
    writer = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[arch])
    writer.add_name("tiny-llama")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(n_blocks)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_rope_dimension_count(head_dim)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(_rope_theta(config))
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32 if quant == "F32"
                         else gguf.LlamaFileType.MOSTLY_Q8_0)
    if tokenizer_dir is not None:
        add_bpe_tokenizer(writer, tokenizer_dir)

    for hf_name, tensor in model.state_dict().items():
        if hf_name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        stem, suffix = hf_name.rsplit(".", 1)
        gguf_name = name_map.get_name(stem)
        if gguf_name is None:
            raise ValueError(f"no GGUF name for {hf_name!r}")
        data = tensor.detach().to(torch.float32).cpu().numpy()
        if ".attn_q" in gguf_name:
            data = _llama_cpp_permute(data, config.num_attention_heads)
        elif ".attn_k" in gguf_name:
            data = _llama_cpp_permute(data, config.num_key_value_heads)
        qtype = QUANT_TYPES[quant] if data.ndim == 2 else GGMLQuantizationType.F32
        if qtype != GGMLQuantizationType.F32:
            data = gguf.quants.quantize(data, qtype)  # uint8 blocks, (rows, bytes per row)
        writer.add_tensor(f"{gguf_name}.{suffix}", np.ascontiguousarray(data), raw_dtype=qtype)

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
