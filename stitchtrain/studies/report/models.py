"""The report's "Models" section: what each sweep key (``dinov2``, ``siglip2``) stands for.

Read from the stores the results record for the key (the columns ``config.source`` /
``config.source_test`` / ``config.store_url`` / ``config.test_store`` where it is the source,
``config.target`` / ``config.target_test`` where it is the target): one row per store, giving
the encoder as a user reads it (``names.encoder_label``: a preset's name, a hybrid's label),
its fingerprint (weights, architecture and preprocessing), the store's dataset and split, and
the weights file the results name for the key. A key whose results name no store, or whose
store does not open, keeps the encoder name of the results' own columns (``source_encoder``
/ ``target_encoder``) and a note saying why the rest is missing.
"""

from __future__ import annotations

import pandas as pd

from featcache.errors import FeatcacheError
from stitchtrain.studies.report.render import Table
from stitchtrain.studies.report.sections import _Section

__all__ = ["MODELS_TITLE", "models_section"]

MODELS_TITLE = "Models"

# (role, store columns (train first), the weights column) of a result row
_ROLES = (
    ("source", ("config.source", "config.store_url", "config.source_test", "config.test_store"),
     "config.source_weights"),
    ("target", ("config.target", "config.target_test"), "config.target_weights"),
)  # fmt: skip


def _text(value) -> str | None:
    """A cell of the results as text; None for a missing one (None, NaN, "")."""
    return value if isinstance(value, str) and value else None


def _recorded(frame: pd.DataFrame) -> dict[str, dict]:
    """Per key, in the order the results name it: its encoder name from the results, the
    stores they record for it (train first) and the weights files they name."""
    keys: dict[str, dict] = {}
    for _, row in frame.iterrows():
        for role, columns, weights in _ROLES:
            key = _text(row.get(role))
            if key is None:
                continue
            entry = keys.setdefault(
                key, {"encoder": _text(row.get(f"{role}_encoder")), "stores": {}, "weights": {}}
            )
            for column in columns:
                url = _text(row.get(column))
                if url is not None:
                    entry["stores"][url] = None
            weights_file = _text(row.get(weights))
            if weights_file is not None:
                entry["weights"][weights_file] = None
    return keys


def models_section(frame: pd.DataFrame) -> _Section:
    """The "Models" section of the results ``frame``: a sentence, the table, and a note for
    each key whose stores are not recorded or do not open."""
    from featcache.store import FeatureStore
    from stitchtrain.data.names import encoder_label

    rows, notes, unnamed = [], [], []
    for key, entry in _recorded(frame).items():
        weights = ", ".join(entry["weights"]) or "–"
        if not entry["stores"]:
            unnamed.append(key)
            rows.append([key, entry["encoder"] or "–", "–", "–", "–", "–", weights])
        for url in entry["stores"]:
            try:
                attrs = FeatureStore.open(url).attrs
            except FeatcacheError as err:  # moved or damaged: say so, keep the results' name
                notes.append(f"The store of {key} at {url} did not open: {err}")
                rows.append([key, entry["encoder"] or "–", "–", "–", "–", url, weights])
                continue
            encoder, dataset = attrs["encoder"], attrs["dataset"]
            rows.append(
                [
                    key,
                    encoder_label(encoder),
                    encoder["fingerprint"],
                    dataset["source"],
                    dataset["split"],
                    url,
                    weights,
                ]
            )
    if unnamed:
        notes.insert(
            0,
            f"The results name no store of {', '.join(unnamed)} (columns config.source / "
            "config.target): the encoder is the name the results give, the rest unknown.",
        )
    header = ["key", "encoder", "fingerprint", "dataset", "split", "store", "weights"]
    table = Table(
        "Models: what each sweep key stands for",
        header,
        rows,
        "encoder: a preset's or model's name, a hybrid's label; fingerprint: a hash of the "
        "weights, architecture and preprocessing (stores of equal fingerprints hold the same "
        "encoder); weights: the file the sweep named for the key, – for none (the preset's own "
        "or random initialisation).",
        text_columns=tuple(range(1, len(header))),
    )
    text = (
        "The figures and tables name encoders by their sweep keys; each key stands for the "
        "encoder of the stores the results record for it, read from those stores."
    )
    return _Section(MODELS_TITLE, [("text", text), ("table", table), *(("text", n) for n in notes)])
