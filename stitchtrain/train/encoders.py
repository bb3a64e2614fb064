"""The frozen encoders of a run: loaded as its stores were written, checked by fingerprint."""

from __future__ import annotations

from featcache.encoders import Encoder, TokenLayout, load_encoder
from featcache.errors import FeatcacheError
from featcache.store import FeatureStore

__all__ = ["load_run_encoder"]


def load_run_encoder(
    store: FeatureStore, weights: str | None, random_init: bool, device
) -> Encoder:
    """Load the encoder a store was written with and refuse it if the fingerprint differs."""
    described = store.attrs["encoder"]
    spec = described["spec"]
    encoder = load_encoder(
        described["name"],
        weights=weights,
        random_init=random_init,
        device=device,
        **spec["overrides"],
    )
    if encoder.fingerprint != described["fingerprint"]:
        raise FeatcacheError(
            f"Encoder {described['name']} loaded with fingerprint {encoder.fingerprint}, but "
            f"{store.url} was extracted with fingerprint {described['fingerprint']}: different "
            "weights or preprocessing. Pass the weights the store was made with (--target-weights"
            " / --source-weights, or --random-init for a random-init store)."
        )
    return encoder


def _layout(store: FeatureStore) -> TokenLayout:
    layout = store.attrs["encoder"]["layout"]
    return TokenLayout(tuple(layout["prefix"]), tuple(layout["grid"]))
