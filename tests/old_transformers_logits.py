"""Run by ``tests/test_export_compat.py`` inside a venv with an OLD transformers (4.5x):
load an exported directory, tokenise a text, and save the logits of fixed ids.

Usage: python old_transformers_logits.py <model dir> <ids.json> <out.json>
Writes ``{"version", "logits" (nested lists), "rope_theta", "tokens", "tokenizer_class"}``.
Imports nothing from neuroal (the old venv does not have it).
"""

import json
import sys

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer


def main() -> None:
    directory, ids_file, out_file = sys.argv[1:4]
    ids = torch.tensor(json.loads(open(ids_file).read()), dtype=torch.int64)
    model = AutoModelForCausalLM.from_pretrained(directory, torch_dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(directory)
    with torch.no_grad():
        logits = model(ids).logits
    json.dump({"version": transformers.__version__, "logits": logits.tolist(),
               "rope_theta": getattr(model.config, "rope_theta", None),
               "tokens": tokenizer("Hello world, pruning.")["input_ids"],
               "tokenizer_class": type(tokenizer).__name__}, open(out_file, "w"))


if __name__ == "__main__":
    main()
