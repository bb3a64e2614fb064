"""Value encodings of a store's arrays (numpy only): the compression setting, float16 mantissa
rounding (bitround), bfloat16 as uint16 bits, and ids as NUL-padded UTF-8 rows."""

from __future__ import annotations

import numpy as np


def parse_compression(text: str) -> tuple[str, int | None]:
    """ "none" | "zstd" | "bitround:K" -> (kind, keepbits)."""
    if text in ("none", "zstd"):
        return text, None
    if text.startswith("bitround:"):
        try:
            keep = int(text.split(":", 1)[1])
        except ValueError:
            keep = -1
        if 1 <= keep <= 10:
            return "bitround", keep
    raise ValueError(
        f"Expected compression 'none', 'zstd' or 'bitround:K' with 1 <= K <= 10 (float16 "
        f"mantissa bits kept). Got {text!r} instead."
    )


def bitround_float16(values: np.ndarray, keepbits: int) -> np.ndarray:
    """Round float16 values to ``keepbits`` mantissa bits (round half to even on the bits)."""
    bits = values.astype(np.float16).view(np.uint16).astype(np.uint32)
    drop = 10 - keepbits
    if drop == 0:
        return values.astype(np.float16)
    half = (1 << (drop - 1)) - 1
    rounded = bits + half + ((bits >> drop) & 1)
    rounded &= ~np.uint32((1 << drop) - 1) & 0xFFFF
    finite = np.isfinite(values)
    out = np.where(finite, rounded.astype(np.uint16), bits.astype(np.uint16))
    return out.view(np.float16)


def float32_to_bfloat16_bits(values: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit pattern as uint16 (round to nearest even), as torch does."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    rounded = bits + 0x7FFF + ((bits >> 16) & 1)
    return (rounded >> 16).astype(np.uint16)


def bfloat16_bits_to_float32(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


def encode_ids(ids, width: int) -> np.ndarray:
    """Strings -> ``(n, width)`` uint8 rows: UTF-8, NUL-padded; refuses ids over ``width``."""
    encoded = [str(value).encode("utf-8") for value in ids]
    longest = max((len(value) for value in encoded), default=0)
    if longest > width:
        raise ValueError(f"Expected ids of at most {width} UTF-8 bytes. Got {longest} instead.")
    if any(b"\0" in value for value in encoded):
        raise ValueError("Expected ids without NUL characters (NUL pads the ids array).")
    fixed = np.array(encoded, dtype=f"S{width}")
    return fixed.view(np.uint8).reshape(len(encoded), width)


def decode_ids(rows: np.ndarray) -> np.ndarray:
    """``(n, width)`` uint8 rows -> object array of str (the inverse of ``encode_ids``)."""
    rows = np.ascontiguousarray(rows, dtype=np.uint8)
    fixed = rows.view(f"S{rows.shape[1]}").reshape(len(rows))  # numpy strips trailing NULs
    return np.array([value.decode("utf-8") for value in fixed.tolist()], dtype=object)
