"""What the API accepts as class names, prompt templates and background rules: validated at the
boundary, one ParamError naming what to fix, before any model runs."""
from __future__ import annotations

from collections.abc import Iterable

from pipeline.config.params import ParamError
from pipeline.evaluation.segment_maps import BACKGROUND_RULES

MAX_CLASSES = 255  # labels 1..C and background 0 in one uint8 palette PNG


def as_tokenized(name: str) -> str:
    """The text CLIP's tokenizer encodes for `name`: open_clip's own cleaning (ftfy, HTML entities,
    runs of whitespace to one space, lower case), so names that differ only there are one class."""
    from open_clip.tokenizer import basic_clean, whitespace_clean

    return str(whitespace_clean(basic_clean(name)).lower())


def class_list(classes: str | Iterable[str]) -> list[str]:
    """Validated class names (a list; one name alone may be a string): stripped, non-empty, unique
    as the tokenizer reads them, at most MAX_CLASSES. A string with commas is refused: "person,dog"
    would be one class name."""
    if isinstance(classes, str) and "," in classes:
        raise ParamError(f"classes {classes!r} is one string with commas: pass a list of names, e.g. "
                         f"{[c.strip() for c in classes.split(',') if c.strip()]}")
    names = [classes] if isinstance(classes, str) else list(classes)
    names = [str(c).strip() for c in names]
    if not names or not any(names):
        raise ParamError("no classes given: name at least one, e.g. --classes \"person,dog\"")
    if not all(names):
        raise ParamError(f"empty class name in {names}: remove the extra comma")
    if len(set(names)) != len(names):
        raise ParamError(f"class names repeat in {names}: each label needs one name")
    seen: dict[str, str] = {}
    for name in names:
        first = seen.setdefault(as_tokenized(name), name)
        if first != name:  # the same token ids: one text feature, so the later label never wins
            raise ParamError(f"class names {first!r} and {name!r} are the same text to CLIP's tokenizer "
                             f"(it lower-cases and collapses spaces: {as_tokenized(name)!r}): each label "
                             "needs one name, so keep one")
    if len(names) > MAX_CLASSES - 1:
        raise ParamError(f"{len(names)} classes: at most {MAX_CLASSES - 1} fit a label PNG")
    return names


def template_list(template: str | Iterable[str]) -> list[str]:
    """Prompt templates, each with one "{}" where the class name goes."""
    templates = [template] if isinstance(template, str) else list(template)
    if not templates:
        raise ParamError("no prompt template given, e.g. --template \"A photo of a {}.\"")
    for t in templates:
        if t.count("{}") != 1:
            raise ParamError(f"prompt template {t!r} must contain '{{}}' once, where the class name goes")
    return templates


def check_background(background: str, threshold: float) -> None:
    if background not in BACKGROUND_RULES:
        raise ParamError(f"background must be one of {', '.join(BACKGROUND_RULES)}, got {background!r}")
    if not 0.0 <= threshold <= 1.0:
        raise ParamError(f"background threshold must be in [0, 1], got {threshold}")
