"""The one real-model smoke test: SmolLM2-135M (embedded GGUF), tiny calibration."""

from __future__ import annotations

import math

import pytest
from conftest import DATA_DIR

from neuroal.config.build import build_config
from neuroal.pipeline import run


@pytest.mark.slow
def test_wanda_beats_magnitude_on_smollm2() -> None:
    ppl = {}
    for criterion in ("wanda", "magnitude"):
        cfg = build_config({
            "model": {"name": "smollm2-135m", "dtype": "float32"},
            "sparsity": 0.5,
            "criterion": {"name": criterion},
            "calib": {"source": "wikitext2", "nsamples": 4, "seqlen": 128,
                      "data_dir": str(DATA_DIR)},
            "eval": {"datasets": ["wikitext2"], "max_windows": 4, "dense": criterion == "wanda"},
            "engine": {"device": "cpu", "micro_batch": 4},
            "output": {"save_model": False},
        })
        report = run(cfg).report
        assert report["achieved_sparsity"] == pytest.approx(0.5, abs=1e-3)
        assert len(report["layers"]) == 210
        ppl[criterion] = report["eval"]["wikitext2"]["model_ppl"]
        if criterion == "wanda":
            dense = report["eval"]["wikitext2"]["dense_ppl"]
    assert math.isfinite(ppl["wanda"]) and math.isfinite(dense)
    assert dense < ppl["wanda"] < ppl["magnitude"], (dense, ppl)
