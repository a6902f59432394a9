"""lm-evaluation-harness tasks, scored through the executor.

lm-eval turns every task into ``loglikelihood`` / ``loglikelihood_rolling`` / ``generate_until``
requests; the :class:`ExecutorLM` below answers them with the executor's workers (embedding on
the first, the blocks of each slice on its owner, the head on the last), so a model split over
several workers, Ray actors or torch.distributed ranks is evaluated without ever being loaded in
one process. Generation is greedy and recomputes the whole sequence per new token (no KV cache),
so for a model directory ``neuroal evaluate`` hands generation tasks to lm-eval's own ``hf``
backend (accelerate places the model on every visible GPU) or ``vllm`` instead
(:func:`generation_backend`).
Only per-position log-probabilities of the target tokens leave the last worker (``(B, T)``
numbers, never ``(B, T, vocab)`` logits).

A request ``(context, continuation)`` is scored as in lm-eval's own ``HFLM``: the tokens
``(context + continuation)[-(max_length + 1):]`` give inputs ``[:-1]`` and targets ``[1:]``
(right-padded within a batch; causal attention makes padding invisible to real positions), and
the answer is the sum of the continuation tokens' log-softmax values and whether every one of
them is the argmax.

Importing this module imports lm-eval (the optional extra ``neuroal[eval]``); the rest of
neuroal imports it only when ``eval.tasks`` is set.
"""

from __future__ import annotations

import difflib
import importlib.util
import logging
import random
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from neuroal.runtime.errors import ConfigError
from neuroal.runtime.logging import get_logger, progress

try:
    from lm_eval.api.model import TemplateLM as _LMBase
except ImportError:  # the optional extra is missing: require_lm_eval() says how to install it
    _LMBase = object

if TYPE_CHECKING:
    from neuroal.config.build import PruneConfig

log = get_logger(__name__)

INSTALL_HINT = "install it with: pip install 'neuroal[eval]' (lm-eval >= 0.4)"
BUILTIN_TASKS = Path(__file__).resolve().parent / "tasks"
"""Task YAMLs shipped with neuroal (always on the include path), e.g. ``neuroal_tiny_qa``."""
DEFAULT_MAX_LENGTH = 2048


@dataclass(frozen=True)
class TaskSpec:
    """Which lm-eval tasks to run and how (plain values taken from ``EvalConfig``).

    Attributes:
        tasks: lm-eval task (or group) names.
        include_path: A directory of extra task YAMLs, or None.
        num_fewshot: Few-shot examples (None: the task's default, else 0).
        limit: First ``limit`` documents per task (None: all).
        max_length: Context window in tokens (None: from the model config).
        batch_size: Sequences per executor call (they are micro-batched inside it).
        apply_chat_template: lm-eval's option: render prompts with the tokenizer's template.
        log_samples: lm-eval's option: keep every document's prompt and answer.
    """

    tasks: tuple[str, ...]
    include_path: str | None = None
    num_fewshot: int | None = None
    limit: int | None = None
    max_length: int | None = None
    batch_size: int = 32
    apply_chat_template: bool = False
    log_samples: bool = False


def require_lm_eval() -> None:
    """Raise a ConfigError naming the extra when lm-eval is not installed."""
    if importlib.util.find_spec("lm_eval") is None:
        raise ConfigError([f"eval.tasks needs lm-evaluation-harness, which is not installed; "
                           f"{INSTALL_HINT}"])


def task_manager(spec: TaskSpec) -> Any:
    """An lm-eval ``TaskManager`` that knows every task of ``spec``; raises ConfigError naming
    each unknown task (with close matches) before any weight is loaded.

    The built-in index (about 15,000 tasks) is only scanned when a task is not found in
    neuroal's own tasks or ``spec.include_path``.
    """
    require_lm_eval()
    from lm_eval.tasks import TaskManager

    paths = [str(BUILTIN_TASKS)]
    if spec.include_path:
        if not Path(spec.include_path).is_dir():
            raise ConfigError([f"eval.include_path={spec.include_path!r} is not a directory; "
                               "give a folder of lm-eval task YAML files"])
        paths.append(str(spec.include_path))
    manager = TaskManager(include_path=paths, include_defaults=False)
    if not _unknown(manager, spec.tasks):
        return manager
    manager = TaskManager(include_path=paths)
    unknown = _unknown(manager, spec.tasks)
    if unknown:
        names = manager.all_tasks
        raise ConfigError([f"eval.tasks: unknown lm-eval task {name!r}"
                           f"{_suggest(name, names)}; list them with `lm-eval ls tasks`, or add "
                           "a task YAML folder with --include-path" for name in unknown])
    return manager


def _unknown(manager: Any, tasks: Sequence[str]) -> list[str]:
    known = set(manager.all_tasks)
    return [t for t in tasks if t not in known]


def _suggest(name: str, names: Sequence[str]) -> str:
    close = difflib.get_close_matches(name, names, n=3)
    return f" (did you mean {', '.join(close)}?)" if close else ""


def load_tasks(spec: TaskSpec, manager: Any) -> None:
    """Build every task once (reads or downloads its documents), so a missing dataset fails
    before the model is loaded rather than after a long prune."""
    from lm_eval.tasks import get_task_dict

    try:
        get_task_dict(list(spec.tasks), manager)
    except Exception as exc:  # lm-eval raises many kinds (network, dataset, YAML errors)
        raise ConfigError([f"eval.tasks: could not load {', '.join(spec.tasks)}: {exc}"]) from exc


def task_spec(cfg: PruneConfig) -> TaskSpec:
    """The zero-shot settings of ``cfg.eval`` as plain values (:class:`TaskSpec`);
    one executor call scores ``4 x micro_batch x workers`` requests, so every worker is busy."""
    ev, eng = cfg.eval, cfg.engine
    return TaskSpec(tuple(ev.tasks), ev.include_path, ev.num_fewshot, ev.limit, ev.max_length,
                    batch_size=4 * eng.micro_batch * eng.workers,
                    apply_chat_template=ev.apply_chat_template, log_samples=ev.log_samples)


def prepare_tasks(cfg: PruneConfig) -> Any:
    """Check the task names and build every task once (documents read or downloaded) before
    any weight is loaded; returns the lm-eval TaskManager, or None without ``eval.tasks``."""
    if not cfg.eval.tasks:
        return None

    spec = task_spec(cfg)
    manager = task_manager(spec)
    load_tasks(spec, manager)
    return manager


class _QuietCustomDataset(logging.Filter):
    """Drop lm-eval's per-task hint about ``--metadata`` for tasks with a ``custom_dataset``
    loader (neuroal's own local tasks), printed on every load."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Custom kwargs can be passed" not in str(record.msg)


logging.getLogger("lm_eval.api.task").addFilter(_QuietCustomDataset())


@contextmanager
def _kept_rng() -> Iterator[None]:
    """lm-eval reseeds ``random``, numpy and torch; restore them so adding tasks to a run
    never changes what is pruned."""
    import numpy as np

    states = random.getstate(), np.random.get_state(), torch.random.get_rng_state()
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.random.set_rng_state(states[2])


def evaluate_tasks(executor: Any, tokenizer: Any, model_config: Any, spec: TaskSpec,
                   manager: Any | None = None) -> dict[str, Any]:
    """Run the lm-eval tasks of ``spec`` on the executor's current (dense or pruned) model.

    Returns:
        ``{task: {"metrics": {name: value}, "version", "n_shot", "samples"}}`` for every task
        and group lm-eval reports (metric names without lm-eval's ``,none`` filter suffix).
    """
    return summarize_results(executor_results(executor, tokenizer, model_config, spec, manager))


def executor_results(executor: Any, tokenizer: Any, model_config: Any, spec: TaskSpec,
                     manager: Any | None = None, tasks: Sequence[str] | None = None
                     ) -> dict[str, Any]:
    """lm-eval's own result dict (its schema) for ``tasks`` (default: all of ``spec``),
    every request answered by the executor's workers."""
    manager = manager if manager is not None else task_manager(spec)
    lm = ExecutorLM(executor, tokenizer, max_length(model_config, tokenizer, spec.max_length),
                    spec.batch_size)
    return run_lm_eval(lm, None, spec, manager, tasks)


def run_lm_eval(model: Any, model_args: dict[str, Any] | None, spec: TaskSpec, manager: Any,
                tasks: Sequence[str] | None = None) -> dict[str, Any]:
    """``lm_eval.simple_evaluate`` with ``spec``'s options; ``model`` an LM instance, or a
    backend name (``hf``, ``vllm``) with its ``model_args``. Returns lm-eval's result dict."""
    import lm_eval

    with _kept_rng():
        return lm_eval.simple_evaluate(
            model=model, model_args=model_args, tasks=list(tasks or spec.tasks),
            num_fewshot=spec.num_fewshot, limit=spec.limit, task_manager=manager,
            log_samples=spec.log_samples, apply_chat_template=spec.apply_chat_template,
            bootstrap_iters=1000)


def generation_tasks(spec: TaskSpec, manager: Any) -> list[str]:
    """The tasks of ``spec`` (or groups) with at least one ``generate_until`` subtask."""
    from lm_eval.tasks import get_task_dict

    def generates(node: Any) -> bool:
        if isinstance(node, dict):
            return any(generates(child) for child in node.values())
        output_type = getattr(node, "OUTPUT_TYPE", None) or \
            getattr(getattr(node, "config", None), "output_type", None)
        return output_type == "generate_until"

    built = get_task_dict(list(spec.tasks), manager)
    found = []
    for name in spec.tasks:
        nodes = [v for k, v in built.items() if getattr(k, "group_name", k) == name]
        if any(generates(node) for node in nodes):
            found.append(name)
    return found


def generation_backend(setting: str, model_dir: str | None, cuda: bool) -> str:
    """Who answers generation requests: ``setting`` unless ``auto``; for ``auto``, ``vllm``
    (installed, CUDA) or ``hf`` when the model is a directory lm-eval can load, else the
    ``workers``."""
    if setting != "auto":
        return setting
    if model_dir is None:
        return "workers"
    return "vllm" if cuda and importlib.util.find_spec("vllm") is not None else "hf"


def backend_results(backend: str, model_dir: str, dtype: str, device: str, spec: TaskSpec,
                    manager: Any, tasks: Sequence[str], gpus: int = 0) -> dict[str, Any]:
    """lm-eval's result dict for ``tasks`` from its own ``hf`` or ``vllm`` backend on the model
    directory: ``hf`` on ``device`` (``parallelize``: accelerate's device map over every GPU
    when there are several), ``vllm`` with one tensor-parallel rank per GPU."""
    args: dict[str, Any] = {"pretrained": model_dir, "dtype": dtype}
    if backend == "hf":
        args.update({"parallelize": True} if gpus > 1 else {"device": device})
    elif backend == "vllm":
        args["tensor_parallel_size"] = max(gpus, 1)
    else:
        raise ValueError(f"generation backend {backend!r}: expected hf or vllm")
    if spec.max_length:
        args["max_length"] = spec.max_length
    log.info("generation tasks %s: lm-eval's %s backend on %s", ", ".join(tasks), backend,
             model_dir)
    return run_lm_eval(backend, args, spec, manager, tasks)


RESULT_SECTIONS = ("results", "groups", "group_subtasks", "configs", "versions", "n-shot",
                   "higher_is_better", "n-samples", "samples")


def merge_results(first: dict[str, Any] | None, second: dict[str, Any] | None) -> dict[str, Any]:
    """Two lm-eval result dicts of disjoint tasks as one (per-task sections merged; the rest,
    such as ``config``, from ``first``)."""
    if not first or not second:
        return dict(first or second or {})
    merged = dict(first)
    for key in RESULT_SECTIONS:
        if key in first or key in second:
            merged[key] = {**(first.get(key) or {}), **(second.get(key) or {})}
    return merged


def write_lm_eval_output(result: dict[str, Any], output_path: str, model_name: str) -> list[Path]:
    """Write ``result`` in lm-eval's own files under ``output_path`` (what ``lm-eval
    --output_path`` writes: ``<model>/results_<time>.json``, and ``samples_<task>_<time>.jsonl``
    when samples were logged); returns the new files. lm-eval names every file by the time,
    so nothing existing is replaced."""
    from lm_eval.loggers import EvaluationTracker

    before = set(Path(output_path).rglob("*")) if Path(output_path).exists() else set()
    tracker = EvaluationTracker(output_path=output_path)
    tracker.general_config_tracker.log_experiment_args(
        model_source="neuroal", model_args={"pretrained": model_name}, system_instruction=None,
        chat_template=None, fewshot_as_multiturn=False)
    result = dict(result)
    samples = result.pop("samples", None)
    tracker.save_results_aggregated(results=result, samples=samples)
    for task, rows in (samples or {}).items():
        tracker.save_results_samples(task_name=task, samples=rows)
    return sorted(p for p in Path(output_path).rglob("*") if p.is_file() and p not in before)


def summarize_results(out: dict[str, Any]) -> dict[str, Any]:
    """The report's view of an lm-eval result dict (see :func:`evaluate_tasks`)."""
    table: dict[str, Any] = {}
    for name, values in out.get("results", {}).items():
        metrics = {}
        for key, value in values.items():
            metric, _, filt = key.partition(",")
            if metric in ("alias", "sample_len") or not isinstance(value, (int, float)):
                continue
            metrics[metric if filt in ("", "none") else f"{metric},{filt}"] = float(value)
        samples = out.get("n-samples", {}).get(name, {})
        table[name] = {"metrics": metrics, "version": out.get("versions", {}).get(name),
                       "n_shot": out.get("n-shot", {}).get(name),
                       "samples": samples.get("effective")}
    return table


def lm_eval_version() -> str | None:
    """The installed lm-eval version (report provenance), or None."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lm_eval")
    except PackageNotFoundError:
        return None


def max_length(model_config: Any, tokenizer: Any, override: int | None = None) -> int:
    """The context window: ``override``, else the config's position limit, else the
    tokenizer's ``model_max_length`` when finite, else 2048 (lm-eval's default)."""
    if override:
        return int(override)
    for attr in ("n_positions", "max_position_embeddings", "n_ctx"):
        value = getattr(model_config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(limit, int) and 0 < limit < 1_000_000:
        return limit
    return DEFAULT_MAX_LENGTH


class ExecutorLM(_LMBase):  # type: ignore[misc, valid-type]
    """An lm-eval ``LM`` whose log-likelihoods come from a neuroal executor.

    Args:
        executor: Any :class:`~neuroal.engine.executor.Executor` (local, Ray, dist).
        tokenizer: The model's Hugging Face tokenizer.
        max_length: Context window in tokens (longer requests are cut on the left).
        batch_size: Requests per executor call; the executor micro-batches (and, for Ray,
            pipelines) inside it.
    """

    backend = "causal"

    def __init__(self, executor: Any, tokenizer: Any, max_length: int, batch_size: int = 32) -> None:
        super().__init__()
        self.executor = executor
        self.tokenizer = tokenizer
        self._max_length = max_length
        self.batch_size = batch_size

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        """Context of an empty-context request: BOS if the tokenizer has one, else EOS."""
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.eot_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    def tok_encode(self, string: str, add_special_tokens: bool | None = None,
                   **_kwargs: Any) -> list[int]:
        """Token ids with the tokenizer's default special tokens (no second BOS when the
        string already starts with it)."""
        kwargs = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
        bos = self.tokenizer.bos_token
        if add_special_tokens is None and bos and string.startswith(bos):
            kwargs["add_special_tokens"] = False
        return self.tokenizer.encode(string, **kwargs)

    def tok_decode(self, tokens: list[int], **kwargs: Any) -> str:
        return self.tokenizer.decode(tokens, **kwargs)

    def _loglikelihood_tokens(self, requests: list[tuple[Any, list[int], list[int]]],
                              disable_tqdm: bool = False, **_kwargs: Any
                              ) -> list[tuple[float, bool]]:
        """``(sum of continuation log-probs, all greedy)`` per ``(key, context, continuation)``
        token request, longest first in batches of ``batch_size``, answers in request order."""
        order = sorted(range(len(requests)),
                       key=lambda i: -len(requests[i][1]) - len(requests[i][2]))
        answers: list[tuple[float, bool]] = [(0.0, False)] * len(requests)
        batches = [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        for batch in batches if disable_tqdm else progress(batches, "zero-shot requests",
                                                           total=len(batches)):
            for i, answer in zip(batch, self._score([requests[i] for i in batch]), strict=True):
                answers[i] = answer
        return answers

    def _score(self, batch: list[tuple[Any, list[int], list[int]]]) -> list[tuple[float, bool]]:
        """One executor call: right-padded inputs/targets ``(B, T)``, then per-request sums."""
        rows, spans = [], []
        for _key, context, continuation in batch:
            if not continuation:
                raise ValueError("lm-eval sent a request with an empty continuation")
            whole = (list(context) + list(continuation))[-(self._max_length + 1):]
            rows.append(whole)
            spans.append(min(len(continuation), len(whole) - 1))
        width = max(len(r) for r in rows) - 1
        pad = self.eot_token_id if self.eot_token_id is not None else 0
        inputs = torch.full((len(rows), width), pad, dtype=torch.long)
        targets = torch.full((len(rows), width), pad, dtype=torch.long)
        for b, whole in enumerate(rows):
            inputs[b, : len(whole) - 1] = torch.tensor(whole[:-1])
            targets[b, : len(whole) - 1] = torch.tensor(whole[1:])
        logprobs, greedy = self.executor.token_logprobs(inputs, targets)
        out = []
        for b, (whole, span) in enumerate(zip(rows, spans, strict=True)):
            end = len(whole) - 1
            out.append((float(logprobs[b, end - span : end].sum()),
                        bool(greedy[b, end - span : end].all())))
        return out

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        """Full-text log-likelihood in disjoint windows of ``max_length`` tokens, each
        conditioned on as much preceding text as fits (lm-eval's rolling windows)."""
        from lm_eval import utils

        windows, owner = [], []
        for r, request in enumerate(requests):
            (text,) = request.args
            for context, continuation in map(utils.make_disjoint_window,
                                             utils.get_rolling_token_windows(
                                                 token_list=self.tok_encode(text),
                                                 prefix_token=self.prefix_token_id,
                                                 max_seq_len=self._max_length, context_len=1)):
                windows.append((None, context, continuation))
                owner.append(r)
        totals = [0.0] * len(requests)
        for r, (logprob, _greedy) in zip(owner, self._loglikelihood_tokens(windows, disable_tqdm),
                                         strict=True):
            totals[r] += logprob
        return totals

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        """Greedy continuation of each ``(context, gen_kwargs)`` request through the workers,
        as lm-eval's ``HFLM`` decodes it: the context cut on the left to leave room for
        ``max_gen_toks`` (256 by default) new tokens, stopped at the end-of-text token or the
        first ``until`` string, which is cut off with what follows it. Sampling options are
        ignored (logged once): the answer is the greedy one."""
        items = requests if disable_tqdm else progress(requests, "generation requests",
                                                      total=len(requests))
        return [self._generate(*request.args) for request in items]

    def _generate(self, context: str, gen_kwargs: dict[str, Any]) -> str:
        kwargs = dict(gen_kwargs or {})
        until = kwargs.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        budget = int(kwargs.pop("max_gen_toks", 256))
        if kwargs.get("do_sample") or kwargs.get("temperature", 0.0):
            log.warning("generation options %s ignored: neuroal decodes greedily", kwargs)
        ids = self.tok_encode(context)[-max(self._max_length - budget, 1):]
        new: list[int] = []
        for _ in range(budget):
            window = torch.tensor([(ids + new)[-self._max_length:]], dtype=torch.long)
            token = int(self.executor.last_logits(window)[0].argmax())
            if token == self.eot_token_id:
                break
            new.append(token)
            if until and any(stop in self.tok_decode(new) for stop in until):
                break
        text = self.tok_decode(new)
        for stop in until:
            text = text.split(stop)[0]
        return text

    def apply_chat_template(self, chat_history: list[dict[str, str]],
                            add_generation_prompt: bool = True) -> str:
        """The prompt lm-eval's ``apply_chat_template`` asks for, from the tokenizer's template."""
        return self.tokenizer.apply_chat_template(chat_history, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)

    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.tokenizer, "name_or_path", "tokenizer")).replace("/", "__")

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return getattr(self.tokenizer, "chat_template", None) if chat_template else None
