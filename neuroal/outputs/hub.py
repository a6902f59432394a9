"""Upload a finished output to the Hugging Face Hub (``--push-to-hub REPO``; network needed).

Only what neuroal wrote is uploaded: the finished output directory, after it was moved into
place. The API object is passed in (tests use a stand-in; the default is ``HfApi()``, which
reads the token from ``HF_TOKEN`` or the Hub CLI's login: ``hf auth login``).

What it may import: the ``outputs`` floor and below. The run's result
(:class:`neuroal.pipeline.RunResult`) arrives as an argument, a type hint only under
``TYPE_CHECKING``.
"""

from __future__ import annotations

import shlex
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from neuroal.runtime.logging import get_logger

if TYPE_CHECKING:
    from neuroal.pipeline import RunResult

log = get_logger(__name__)


def hub_cli() -> str:
    """The Hub's command-line tool as installed: ``hf`` (huggingface_hub >= 0.34), or the older
    ``huggingface-cli`` where only that one exists."""
    for name in ("hf", "huggingface-cli"):
        if shutil.which(name) or (Path(sys.executable).parent / name).exists():
            return name
    return "hf"


def upload_hint(repo_id: str, directory: str | Path) -> str:
    """The command that uploads ``directory`` to ``repo_id`` later, with the installed CLI."""
    return shlex.join([hub_cli(), "upload", repo_id, str(directory), "."])


def push_output(directory: str | Path, repo_id: str, api: Any = None,
                private: bool | None = None, message: str | None = None) -> str:
    """Create ``repo_id`` (a model repo) if needed and upload ``directory`` to it.

    Args:
        directory: The finished output (weights, card, report, plots).
        repo_id: ``user/name`` or ``org/name``.
        api: An object with ``create_repo`` and ``upload_folder`` (default ``HfApi()``).
        private: Visibility of a newly created repo (None: the Hub's default).
        message: Commit message.

    Returns:
        The URL (or commit reference) the upload returned, as text.

    Raises:
        ValueError: ``repo_id`` is not of the form ``owner/name``.
        FileNotFoundError: ``directory`` does not exist.
    """
    directory = Path(directory)
    if repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise ValueError(f"--push-to-hub {repo_id!r}: expected a repo id owner/name, e.g. "
                         "my-user/llama-2-7b-wanda-50")
    if not directory.is_dir():
        raise FileNotFoundError(f"nothing to upload: {str(directory)!r} does not exist")
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi()
    api.create_repo(repo_id=repo_id, repo_type="model", private=private, exist_ok=True)
    log.info("uploading %s to https://huggingface.co/%s", directory, repo_id)
    result = api.upload_folder(folder_path=str(directory), repo_id=repo_id, repo_type="model",
                               commit_message=message or f"neuroal: upload {directory.name}")
    log.info("uploaded: %s", result)
    return str(result)


def push(repo_id: str, result: RunResult, api: Any = None) -> None:
    """Upload the finished output (``--push-to-hub``); a failed upload leaves the local output
    as it is and records ``report["hub"]["error"]`` (the CLI then exits with 1)."""
    try:
        url = push_output(result.output, repo_id, api=api)  # type: ignore[arg-type]
        result.report["hub"] = {"repo": repo_id, "url": url}
    except Exception as exc:  # network, token, permissions: the local output stays valid
        log.error("upload to the Hub repo %r failed (%s: %s); the output is complete in %s, "
                  "upload it later with `%s`", repo_id, type(exc).__name__, exc, result.output,
                  upload_hint(repo_id, result.output))
        result.report["hub"] = {"repo": repo_id, "error": f"{type(exc).__name__}: {exc}"}
