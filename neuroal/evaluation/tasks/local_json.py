"""Loader for task YAMLs whose documents sit in a JSON list beside them (lm-eval's
``custom_dataset: !function local_json.load`` with ``dataset_kwargs: {data_file: NAME}``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def load(data_file: str, split: str = "test", **_metadata: Any) -> Any:
    """``{split: Dataset}`` from ``data_file`` (relative to this folder, or absolute)."""
    import datasets

    path = Path(data_file)
    if not path.is_absolute():
        path = Path(__file__).resolve().parent / path
    rows = json.loads(path.read_text(encoding="utf-8"))
    return datasets.DatasetDict({split: datasets.Dataset.from_list(rows)})
