"""A fixed-seed fit's history is the one the recipe wrote before the per-epoch overhead work.

``REFERENCE_*`` were produced by the recipe as it was before that work (issue 15: validation,
checkpoint and history writes made cheaper), on this test's stores and config. Losses per
epoch, the epochs early stopping ran, the learning rate each stage chose and the test
metrics must stay what they were (to float32 round-off: the losses are sums of float32s).
"""

from __future__ import annotations

import pytest
from conftest import extract_demo_stores

from stitchtrain.pipeline.fit import fit
from stitchtrain.train.config import FitConfig

# (stage, lr, epoch, train_loss, val_loss, val_metric) per history row; per stage (chosen lr,
# [(lr, best epoch)]); test metrics. Early stopping ends TLT at lr 0.05 after epoch 4.
REFERENCE_HISTORY = [
    ("ffm", 0.001, 1, 1.658209238733564, 1.4101357460021973, None),
    ("ffm", 0.001, 2, 1.2113604375294276, 1.2602788209915161, None),
    ("ffm", 0.001, 3, 1.0049132875033788, 1.1729662418365479, None),
    ("ffm", 0.001, 4, 0.8994727219854083, 1.1082985401153564, None),
    ("ffm", 0.001, 5, 0.814783343247005, 1.04585599899292, None),
    ("ffm", 0.001, 6, 0.7506419590541294, 0.9872918725013733, None),
    ("ffm", 0.05, 1, 1.737040945461818, 1.6757333278656006, None),
    ("ffm", 0.05, 2, 1.5367365053721838, 1.540175437927246, None),
    ("ffm", 0.05, 3, 1.4083841357912337, 1.4296178817749023, None),
    ("ffm", 0.05, 4, 1.291184595652989, 1.3371376991271973, None),
    ("ffm", 0.05, 5, 1.187874742916652, 1.2551897764205933, None),
    ("ffm", 0.05, 6, 1.0994072471346175, 1.17909574508667, None),
    ("tlt", 0.001, 1, 0.9966795785086495, 0.737013041973114, 1.0),
    ("tlt", 0.001, 2, 0.67971989938191, 0.5217777490615845, 1.0),
    ("tlt", 0.001, 3, 0.5003715753555298, 0.35390111804008484, 1.0),
    ("tlt", 0.001, 4, 0.39523318835667204, 0.2539578378200531, 1.0),
    ("tlt", 0.001, 5, 0.30981284379959106, 0.17936545610427856, 1.0),
    ("tlt", 0.001, 6, 0.24598450320107595, 0.12499769032001495, 1.0),
    ("tlt", 0.05, 1, 1.7338064057486398, 2.540226697921753, 0.25),
    ("tlt", 0.05, 2, 2.424194369997297, 2.2123303413391113, 0.25),
    ("tlt", 0.05, 3, 1.700999174799238, 0.5358943939208984, 0.75),
    ("tlt", 0.05, 4, 1.1960083373955317, 0.5982174277305603, 0.75),
]
REFERENCE_STAGES = {
    "ffm": (0.001, [(0.001, 6), (0.05, 6)]),
    "tlt": (0.001, [(0.001, 6), (0.05, 3)]),
}
REFERENCE_METRICS = {
    "final_distance": 11.413706461588541,
    "layer_distance": 13.736076354980469,
    "test_accuracy": 1.0,
}


def run_reference_fit(root) -> tuple[list[tuple], dict, dict]:
    """The fit the reference was made with: history rows, per-stage choice, test metrics."""
    urls = extract_demo_stores(
        root / "data",
        root / "stores",
        models=["dinov2-tiny", "siglip2-tiny"],
        layers=[2],
        shard_size=8,
    )
    config = FitConfig(
        source=urls["dinov2-tiny", "train"],
        target=urls["siglip2-tiny", "train"],
        position=2,
        out=str(root / "run"),
        objective="ffm+tlt",
        lrs=(1e-3, 5e-2),
        epochs=6,
        patience=1,
        batch_size=8,
        val_fraction=0.25,
        device="cpu",
    )
    metrics = fit(config)
    history = [
        (r["stage"], r["lr"], r["epoch"], r["train_loss"], r["val_loss"], r["val_metric"])
        for r in _read_history(root / "run" / "history.csv")
    ]
    stages = {
        stage: (result["lr"], [(g["lr"], g["best_epoch"]) for g in result["grid"]])
        for stage, result in metrics["stages"].items()
    }
    scores = {k: metrics[k] for k in ("test_accuracy", "layer_distance", "final_distance")}
    return history, stages, scores


def _read_history(path) -> list[dict]:
    import csv

    def value(text: str):
        if text == "":
            return None
        try:
            return int(text)
        except ValueError:
            pass
        try:
            return float(text)
        except ValueError:
            return text

    with open(path, newline="") as handle:
        return [{k: value(v) for k, v in row.items()} for row in csv.DictReader(handle)]


def test_history_equals_the_reference(tmp_path):
    history, stages, scores = run_reference_fit(tmp_path)
    assert [row[:3] for row in history] == [row[:3] for row in REFERENCE_HISTORY]
    for got, want in zip(history, REFERENCE_HISTORY, strict=True):
        assert got[3:5] == pytest.approx(want[3:5], rel=1e-5), got[:3]
        assert (got[5] is None) == (want[5] is None), got[:3]
        if want[5] is not None:
            assert got[5] == pytest.approx(want[5], abs=1e-9), got[:3]
    assert stages == REFERENCE_STAGES
    assert scores == pytest.approx(REFERENCE_METRICS, rel=1e-5)
