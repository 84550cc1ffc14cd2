"""What a sample says about itself: its caption and source url, from the ``txt``/``json`` fields embed keeps.

img2dataset writes the caption as ``KEY.txt`` and ``{"caption": ..., "url": ...}`` as ``KEY.json``; other
shards may carry either or neither. Search results, the HTML page, the service and ``predict`` all show them.
"""
from __future__ import annotations

import json
from typing import Any


def caption_and_url(txt: str | None, json_text: str | None) -> dict[str, str]:
    """``{"caption": ..., "url": ...}`` with the keys that are known (the ``txt`` caption first).

    Example:
        >>> caption_and_url(None, '{"caption": "a cat", "url": "https://x/1.jpg"}')
        {'caption': 'a cat', 'url': 'https://x/1.jpg'}
    """
    meta: Any = {}
    if json_text and ('"url"' in json_text or '"caption"' in json_text):
        try:
            meta = json.loads(json_text)
        except ValueError:
            meta = {}
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
