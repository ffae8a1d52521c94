"""The feature store's format constants, below every store module so that each can name them."""
from __future__ import annotations

from pathlib import Path

FORMAT = "unmix-clip-feature-cache"
FORMAT_VERSION = 3  # 3: keys (per-chunk identity), inputs (per-image file records), store_id
LABEL_FILL = -128  # a lost labels chunk reads -128, never a plausible 0
REPAIR = "run `pipeline verify --repair`, then `pipeline extract-features`"
TEXT_NAMES = ("positive", "negative", "plain")  # L2-normalised class prompt features
RAW_TEXT_NAMES = tuple(f"raw_{n}" for n in TEXT_NAMES)  # the same, un-normalised (encode_text output)


def rebuild(path: str | Path) -> str:
    """How to replace a store that cannot be trusted or read."""
    return f"delete the store (`rm -r {path}`) and run `pipeline extract-features`"
