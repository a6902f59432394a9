"""Model cards for pruned and retrained outputs (engine.md §9).

Built with ``huggingface_hub``'s :class:`ModelCard` / :class:`ModelCardData`, so the front matter
is what the Hub parses: ``base_model`` (a hub id, never a local path), ``license`` (inherited),
``tags`` without duplicates, ``datasets`` with real hub dataset ids only (local text files and
pre-tokenised windows are named in the body instead), ``pipeline_tag`` and a ``model-index``
holding the perplexities, but only for an evaluation over the whole split (a subset of windows
is labelled as such in the body and never claimed as a test-set result). No
``base_model_relation``: the Hub has no value for pruning. A card names no absolute path of the
machine that wrote it: local models by their folder name, absolute paths in the command line as
``.../name``.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from neuroal.data import parse_source
from neuroal.data.sources import HFSpec
from neuroal.outputs.report_keys import final_ppl, model_ppl

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


def _hf_dataset(spec: Any, purpose: str) -> tuple[str, str | None, str | None] | None:
    hf = HFSpec.parse(str(spec.arg))
    return None if hf.is_local() or not _HUB_ID.match(hf.path) else (hf.path, hf.config, hf.split)


HUB_DATASETS: dict[str, Callable[[Any, str], tuple[str, str | None, str | None] | None]] = {
    "wikitext2": lambda spec, purpose: ("Salesforce/wikitext", "wikitext-2-raw-v1" if purpose ==
                                        "evaluation" else "wikitext-2-v1",
                                        "test" if purpose == "evaluation" else "validation"),
    "c4": lambda spec, purpose: ("allenai/c4", "en",
                                 "validation" if purpose == "evaluation" else "train"),
    "hf": _hf_dataset,
}
"""Source name -> ``(hub dataset id, config, split)`` of a spec, or None (local data)."""


def hub_dataset(spec: str, purpose: str = "calibration") -> tuple[str, str | None, str | None] | None:
    """The hub dataset behind a source spec (``wikitext2`` -> ``Salesforce/wikitext``), or None
    for local or generated data (``text:``, ``tokens:``, ``self``, local ``hf:`` folders)."""
    try:
        parsed = parse_source(spec)
    except (ValueError, FileNotFoundError):
        return None
    lookup = HUB_DATASETS.get(parsed.name)
    return lookup(parsed, purpose) if lookup is not None else None


def _unique(items: Iterable[str | None]) -> list[str]:
    return list(dict.fromkeys(i for i in items if i))


def base_model_id(name: str | None) -> str | None:
    """``name`` when it is a hub id (``org/model``) and not a local path, else None."""
    if not name or Path(name).expanduser().exists() or not _HUB_ID.match(name):
        return None
    return name


def display_name(name: str | None) -> str | None:
    """A model as a card may name it: a hub id as it is, a local path by its last part."""
    if not name or base_model_id(name) is not None:
        return name
    return Path(name).name or name


def _portable_word(word: str) -> str:
    key, sep, value = word.rpartition("=") if "=/" in word else ("", "", word)
    if not value.startswith("/"):
        return word
    return f"{key}{sep}.../{Path(value).name}"


def portable_command(command: str) -> str:
    """``command`` as typed, with every absolute path (a word, or a ``key=`` value) shortened
    to ``.../last-part``."""
    try:
        words = shlex.split(command)
    except ValueError:  # unbalanced quotes: leave the words as they are
        words = command.split()
    return shlex.join(_portable_word(w) for w in words)


def full_split(report: dict[str, Any]) -> bool:
    """Whether the perplexities cover every window of their split (``eval.max_windows`` null
    in the resolved config), which is what a ``model-index`` result claims."""
    evaluation = (report.get("config") or {}).get("eval") or {}
    return "max_windows" in evaluation and evaluation["max_windows"] is None


def _card(data: Any, body: list[str]) -> str:
    from huggingface_hub import ModelCard

    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(body).strip() + "\n"))


def _fmt(value: Any) -> str:
    return "n/a" if value is None else f"{value:.3f}" if isinstance(value, float) else str(value)


SERVE = """## How to load / serve

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained("{path}", dtype="auto")
tokenizer = AutoTokenizer.from_pretrained("{path}")
```

```bash
vllm serve {path}        # an OpenAI-compatible server; or vllm.LLM(model="{path}")
```

The pruned weights are stored densely with exact zeros (no sparsity metadata), so every
library that loads the base model loads this one (transformers 4.56 and later; `config.json`
also carries the top-level `rope_theta` / `rope_scaling` older readers need). Outputs are those
of the pruned model, but the zeros by themselves bring **no speed-up and no memory saving** in
vLLM or transformers today: that needs sparse kernels (vLLM removed its 2:4 kernels) or
compression of the stored weights."""


def prune_card(report: dict[str, Any], path: str = "<this repo or directory>") -> str:
    """The ``README.md`` of a pruned output, from its ``report.json`` content."""
    from huggingface_hub import EvalResult, ModelCardData

    calib = report["calibration"]
    evals = report.get("eval") or {}
    results = []
    for spec, ev in evals.items():
        ppl = final_ppl(ev)
        hub = hub_dataset(spec, "evaluation")
        if hub is not None and ppl is not None and full_split(report):
            results.append(EvalResult(task_type="text-generation", dataset_type=hub[0],
                                      dataset_name=spec, dataset_config=hub[1],
                                      dataset_split=hub[2], metric_type="perplexity",
                                      metric_value=round(float(ppl), 4)))
    title = f"{display_name(report['model'])} pruned with neuroal"
    policy = (report.get("plan") or {}).get("policy") or {}
    tags = _unique(["pruned", "sparse", "neuroal", report["criterion"], report["allocation"],
                    "n:m-sparsity" if ":" in report["pattern"] else "unstructured-sparsity",
                    *(s["name"] for s in (report.get("recovery") or {}).get("steps", []))])
    data = ModelCardData(base_model=base_model_id(report.get("base_model")),
                         license=report.get("license"), tags=tags,
                         datasets=_unique(h[0] for h in [hub_dataset(calib["source"])] if h) or None,
                         pipeline_tag="text-generation", library_name="transformers",
                         model_name=title if results else None, eval_results=results or None)
    body = [f"# {title}", "", "## Results", "",
            f"Target sparsity {report['target_sparsity']:.4f}, achieved "
            f"{report['achieved_sparsity']:.4f} (prunable block linears, parameter-weighted), "
            f"pattern `{report['pattern']}`.", ""]
    if evals:
        full = full_split(report)
        scope = "windows x tokens" if full else "first windows x tokens (a subset)"
        where = "every window of the split" if full else \
            "the first windows of the split only: not a full test-set result"
        body += [f"Perplexity on {where}:", "",
                 f"| Data | {scope} | Dense | Pruned | Retrained |", "|---|---|---|---|---|"]
        body += [f"| {spec} | {ev.get('windows')} x {ev.get('seqlen')} | {_fmt(ev.get('dense_ppl'))}"
                 f" | {_fmt(model_ppl(ev))} | {_fmt(ev.get('recovered_ppl'))} |"
                 for spec, ev in evals.items()]
        body.append("")
    for row in report.get("compare") or []:
        body.append(f"- allocation `{row['allocation']}` instead (same data): "
                    + ", ".join(f"{k} {_fmt(v)}" for k, v in model_ppl(row).items()))
    body += recipe_lines(report, policy) + plot_lines(report) + ["", SERVE.format(path=path), ""]
    return _card(data, body)


def recipe_lines(report: dict[str, Any], policy: dict[str, Any]) -> list[str]:
    """The recipe: method, calibration, recovery, command, versions, hardware, time."""
    calib = report["calibration"]
    search = {k: policy[k] for k in ("lambda_block", "lambda_row") if policy.get(k) is not None}
    steps = [s["name"] for s in (report.get("recovery") or {}).get("steps", [])]
    versions = report.get("versions") or {}
    hardware = report.get("hardware") or {}
    return ["", "## Recipe", "",
            f"- base model: `{display_name(report.get('base_model') or report['model'])}`",
            *quantization_lines(report),
            f"- criterion `{report['criterion']}`, allocation `{report['allocation']}`"
            + (f" ({', '.join(f'{k} {v:g}' for k, v in search.items())})" if search else ""),
            f"- calibration: `{calib['source']}`, N={calib['nsamples']}, T={calib['seqlen']}, "
            f"seed {calib['seed']}",
            f"- recovery: {', '.join(steps) if steps else 'none'}",
            f"- command: `{portable_command(report.get('command') or 'python API')}`",
            f"- neuroal {versions.get('neuroal')} (git {versions.get('git_sha')}), torch "
            f"{versions.get('torch')}, transformers {versions.get('transformers')}",
            f"- hardware: {hardware.get('gpu') or hardware.get('cpu')}, wall time "
            f"{(report.get('timings') or {}).get('total', 0.0):.1f} s",
            "- full details: `report.json`, `neuroal_config.yaml`, `plan.json`"]


def quantization_lines(report: dict[str, Any]) -> list[str]:
    """The source's quantization (``report["source"]["quantization"]``), when it had one."""
    quant = (report.get("source") or {}).get("quantization")
    if not quant:
        return []
    block = quant.get("block")
    tiles = f", {block[0]}x{block[1]} tiles" if block else ""
    return [f"- source weights: FP8 ({quant['method']}, {'/'.join(quant['layouts'])} scales"
            f"{tiles}), de-quantized to {quant['dequantized_to']} on load; this export is dense "
            f"({report.get('export_dtype') or quant['dequantized_to']}, no quantization_config)"]


def plot_lines(report: dict[str, Any]) -> list[str]:
    """Embedded plots (``report["plots"]``, paths relative to the output)."""
    plots = report.get("plots") or []
    if not plots:
        return []
    return ["", "## Plots", "", *[f"![{Path(p).stem.replace('_', ' ')}]({p})" for p in plots]]


def recovery_card(report: dict[str, Any], source_card: str | None = None,
                  path: str = "<this repo or directory>") -> str:
    """The ``README.md`` of a ``launch/recover.py`` output (``recovery.json`` content).

    ``source_card`` is the pruned input's ``README.md``: its ``base_model``, ``license`` and
    ``datasets`` carry over.
    """
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    inherited = ModelCard(source_card).data.to_dict() if source_card else {}
    ppl = report.get("perplexity") or {}
    results = []
    hub = hub_dataset(ppl.get("spec") or "", "evaluation")
    if hub is not None and ppl.get("after") is not None and ppl.get("windows") is None:
        results.append(EvalResult(task_type="text-generation", dataset_type=hub[0],
                                  dataset_name=ppl["spec"], dataset_config=hub[1],
                                  dataset_split=hub[2], metric_type="perplexity",
                                  metric_value=round(float(ppl["after"]), 4)))
    title = f"{display_name(report['model'])} retrained with PERP ({report['variant']})"
    data = ModelCardData(base_model=inherited.get("base_model"), license=inherited.get("license"),
                         tags=_unique([*(inherited.get("tags") or ["pruned", "sparse", "neuroal"]),
                                       "perp", report["variant"]]),
                         datasets=_unique([*(inherited.get("datasets") or []),
                                           *[h[0] for h in [hub_dataset(report.get("calib", ""))]
                                             if h]]) or None,
                         pipeline_tag="text-generation", library_name="transformers",
                         model_name=title if results else None, eval_results=results or None)
    train = report.get("train") or {}
    body = [f"# {title}", "", "## Results", "",
            f"Sparsity {report.get('achieved_sparsity', float('nan')):.4f} (every pruned weight "
            "still zero). Perplexity on "
            f"{ppl.get('spec')} ({ppl.get('windows') or 'every'} windows x {ppl.get('seqlen')} "
            f"tokens{'' if ppl.get('windows') is None else ', a subset of the split'}): before "
            f"{_fmt(ppl.get('before'))}, after {_fmt(ppl.get('after'))}.", "",
            "## Recipe", "",
            f"- input (pruned): `{display_name(report['model'])}`",
            f"- PERP variant `{report['variant']}`, backend {report.get('backend')}, "
            f"{train.get('steps')} steps, {train.get('tokens')} tokens",
            f"- calibration: `{report.get('calib')}`",
            "- full details: `recovery.json`", "", SERVE.format(path=path), ""]
    return _card(data, body)
