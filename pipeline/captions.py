"""What a sample says about itself: its caption and source url, from the ``txt``/``json`` fields embed keeps.

img2dataset writes the caption as ``KEY.txt`` and ``{"caption": ..., "url": ...}`` as ``KEY.json``; other
shards may carry either or neither. Search results, the HTML page, the service and ``predict`` all show them.

A kept field is bounded twice: when embed stores it (:func:`bounded_field`) and whenever it is parsed
(:func:`parse_json`), so that a hostile sidecar (a ``.json`` nested 100,000 levels deep, a megabytes-long
caption) is stored as text with a warning and can never break a query, also in folders written before the bound.
"""
from __future__ import annotations

import json
import re
from typing import Any

MAX_FIELD_CHARS = 64 * 1024  # a kept txt/json field (real captions and img2dataset's json are far below this)
MAX_JSON_DEPTH = 64  # nesting of a kept json that is parsed (json.loads recurses once per level)
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')  # a JSON string, whose brackets do not nest


def json_depth(text: str) -> int:
    """How deeply the arrays and objects of a JSON text nest, found without parsing it (no recursion).

    Example:
        >>> json_depth('{"a": [1, {"b": "[[["}]}')
        3
    """
    depth = deepest = 0
    for c in _STRING.sub("", text):
        if c in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif c in "]}":
            depth -= 1
    return deepest


def too_deep(text: str) -> bool:
    """Whether a JSON text nests deeper than ``MAX_JSON_DEPTH`` (counted at C speed first: real ones have few
    brackets)."""
    return text.count("[") + text.count("{") > MAX_JSON_DEPTH and json_depth(text) > MAX_JSON_DEPTH


def bounded_field(name: str, text: str) -> tuple[str, str | None]:
    """A kept field as embed stores it, and a warning when it had to be changed or will not be parsed: a field
    above ``MAX_FIELD_CHARS`` is cut there; a json nested deeper than ``MAX_JSON_DEPTH`` is kept as text that no
    reader parses (it gives no caption or url)."""
    warnings = []
    if len(text) > MAX_FIELD_CHARS:
        warnings.append(f"{name} is {len(text)} characters long, above the limit of {MAX_FIELD_CHARS}; stored cut to "
                        f"its first {MAX_FIELD_CHARS}")
        text = text[:MAX_FIELD_CHARS]
    if name == "json" and too_deep(text):
        warnings.append(f"json is nested {json_depth(text)} levels deep, above the limit of {MAX_JSON_DEPTH}; "
                        "stored as text, never parsed (no caption or url read from it)")
    return text, "; ".join(warnings) or None


def parse_json(text: str | bytes | None) -> Any:
    """A kept json field parsed, or None when it is missing, not JSON, longer than ``MAX_FIELD_CHARS`` or nested
    deeper than ``MAX_JSON_DEPTH`` (a hostile one, possibly stored before embed bounded it)."""
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    if not text or len(text) > MAX_FIELD_CHARS or too_deep(text):
        return None
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return None


def caption_and_url(txt: str | None, json_text: str | None) -> dict[str, str]:
    """``{"caption": ..., "url": ...}`` with the keys that are known (the ``txt`` caption first).

    Example:
        >>> caption_and_url(None, '{"caption": "a cat", "url": "https://x/1.jpg"}')
        {'caption': 'a cat', 'url': 'https://x/1.jpg'}
    """
    meta: Any = {}
    if json_text and ('"url"' in json_text or '"caption"' in json_text):
        meta = parse_json(json_text)
    meta = meta if isinstance(meta, dict) else {}
    out = {}
    caption = txt.strip() if isinstance(txt, str) and txt.strip() else meta.get("caption")
    if isinstance(caption, str) and caption:
        out["caption"] = caption
    if isinstance(meta.get("url"), str) and meta["url"]:
        out["url"] = meta["url"]
    return out


def is_web_link(url: str | None) -> bool:
    """Only http(s) urls become links on a page (a ``javascript:`` url in a sample's json must not)."""
    return isinstance(url, str) and url.lower().startswith(("http://", "https://"))
