"""The feature store's format constants, below every store module so that each can name them."""
from __future__ import annotations

FORMAT = "unmix-clip-feature-cache"
FORMAT_VERSION = 2
LABEL_FILL = -128  # a lost labels chunk reads -128, never a plausible 0
REPAIR = "run `pipeline verify --repair`, then `pipeline extract-features`"
TEXT_NAMES = ("positive", "negative", "plain")  # L2-normalised class prompt features
RAW_TEXT_NAMES = tuple(f"raw_{n}" for n in TEXT_NAMES)  # the same, un-normalised (encode_text output)
