"""The task loader of neuroal, reading JSON files beside this YAML folder."""

from pathlib import Path

from neuroal.evaluation.tasks.local_json import load as _load


def load(data_file: str, **kwargs):
    return _load(str(Path(__file__).resolve().parent / data_file), **kwargs)
