"""`search --html`: a self-contained page with each query image and its neighbours as thumbnails."""
from __future__ import annotations

import base64
import html
import io
import logging
from collections import Counter
from pathlib import Path
from typing import Any, Sequence

from .. import atomic
from ..captions import is_web_link
from ..embedding import tar
from ..embedding.tar import IMAGE_EXTS
from ..model.image_header import DEFAULT_MAX_PIXELS
from .keys import short_shard

THUMB = 160
log = logging.getLogger(__name__)


def thumbnail_jpeg(data: bytes | None, max_pixels: int = DEFAULT_MAX_PIXELS) -> bytes | None:
    """A small JPEG of an encoded image (at most THUMB px a side); None when it cannot be decoded or is too large."""
    if not data:
        return None
    from PIL import Image, ImageOps

    try:
        im = Image.open(io.BytesIO(data))
        if im.size[0] * im.size[1] > max_pixels:  # checked on the header, before any pixel is decoded
            return None
        im = ImageOps.exif_transpose(im)
        im.thumbnail((THUMB, THUMB))
        buf = io.BytesIO()
        im.convert("RGB").save(buf, "JPEG", quality=85)
    except (OSError, ValueError, Image.DecompressionBombError):
        return None
    return buf.getvalue()


def thumbnail_uri(data: bytes | None) -> str | None:
    """A small JPEG data URI of an encoded image; None when it cannot be decoded."""
    jpeg = thumbnail_jpeg(data)
    return "data:image/jpeg;base64," + base64.b64encode(jpeg).decode() if jpeg else None


def images_by_key(wanted: dict[str, set[str]]) -> dict[tuple[str, str], bytes]:
    """Read each shard once and pick out the images of the wanted keys: ``{shard_url: {key, ...}}``."""
    found: dict[tuple[str, str], bytes] = {}
    for url, keys in wanted.items():
        if url.startswith("pipe:"):  # the url comes from the index's data: never run it as a shell command
            log.warning("not opening %r for thumbnails: pipe: shard urls recorded in an index are not run; "
                        "their images show as missing", url)
            continue
        try:
            for sample in tar.iter_tar_samples(url):
                if sample["__key__"] in keys:
                    ext = next((e for e in IMAGE_EXTS if e in sample), None)
                    if ext:
                        found[(url, sample["__key__"])] = sample[ext]
        except Exception as e:  # a shard that moved or broke: its thumbnails show as missing, the page still renders
            log.warning("cannot read thumbnails of %d key(s) from %s (%s: %s); they show as missing", len(keys), url,
                        type(e).__name__, e)
            continue
        lost = sorted(k for k in keys if (url, k) not in found)
        if lost:
            log.warning("%d image(s) not found in %s (e.g. %s); they show as missing", len(lost), url, lost[0])
    return found


def render(records: Sequence[dict[str, Any]], out: str | Path, query_images: dict[str, str] | None = None,
           title: str = "embedpipe search", query_info: dict[tuple[str, str], dict[str, str]] | None = None,
           query_texts: set[str] | None = None) -> Path:
    """Write the page for search ``records`` (``SearchResult.records()``) atomically to ``out``.

    ``query_images`` maps a query name to an image file; a key query's image is read from its ``query_shard``;
    ``query_info`` maps a key query's (key, shard) to its ``caption``/``url`` (shown as the hits' are);
    ``query_texts`` are text queries, each shown in a text box where a query image would be.
    """
    wanted: dict[str, set[str]] = {}
    for rec in records:
        for hit in rec["results"]:
            wanted.setdefault(hit["shard"], set()).add(hit["key"])
        q, shard = rec.get("query"), rec.get("query_shard")
        if q and shard:
            wanted.setdefault(shard, set()).add(q)
    images = images_by_key(wanted)

    def cell(uri: str | None, caption: str, cls: str = "", hit: dict[str, Any] | None = None) -> str:
        img = f'<img src="{uri}" alt="{html.escape(caption)}">' if uri else '<div class="missing">image not found</div>'
        text = (hit or {}).get("caption")
        more = f'<br><span class="text">{html.escape(text)}</span>' if text else ""
        if is_web_link((hit or {}).get("url")):
            more += f'<br><a href="{html.escape(hit["url"], quote=True)}" rel="noopener noreferrer">source</a>'
        return f'<figure class="{cls}">{img}<figcaption>{html.escape(caption)}{more}</figcaption></figure>'

    asked = Counter(rec.get("query") for rec in records)  # a key several shards hold: each row names its shard
    rows = []
    for rec in records:
        q, shard = rec.get("query") or "query", rec.get("query_shard") or ""
        if query_images and q in query_images:
            q_uri = thumbnail_uri(Path(query_images[q]).read_bytes())
        else:
            q_uri = thumbnail_uri(images.get((shard, q)))
        label = f"query: {q}" + (f" ({short_shard(shard)})" if shard and asked[q] > 1 else "")
        if query_texts and q in query_texts:
            cells = [f'<figure class="query"><div class="text-query">{html.escape(q)}</div>'
                     '<figcaption>text query</figcaption></figure>']
        else:
            cells = [cell(q_uri, label, "query", hit=(query_info or {}).get((q, shard)))]
        for hit in rec["results"]:
            cells.append(cell(thumbnail_uri(images.get((hit["shard"], hit["key"]))),
                              f"#{hit['rank']} {hit['key']} · {hit['score']:.3f}", hit=hit))
        rows.append(f'<section class="row">{"".join(cells)}</section>')
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 1.5rem; background: #fafafa; }}
.row {{ display: flex; gap: .75rem; flex-wrap: wrap; margin-bottom: 1.5rem; align-items: flex-start; }}
figure {{ margin: 0; width: {THUMB}px; text-align: center; }}
figure img {{ max-width: {THUMB}px; max-height: {THUMB}px; border: 1px solid #ccc; }}
figure.query img {{ border: 3px solid #2a6; }}
figcaption {{ font-size: .75rem; word-break: break-all; }}
figcaption .text {{ color: #444; font-style: italic; word-break: normal; }}
.text-query {{ width: {THUMB}px; min-height: 4rem; padding: .5rem; box-sizing: border-box; border: 3px solid #2a6;
               background: #fff; text-align: left; font-size: .9rem; word-break: break-word; }}
.missing {{ width: {THUMB}px; height: {THUMB}px; background: #eee; display: flex; align-items: center;
            justify-content: center; font-size: .75rem; color: #888; }}
</style></head><body>
<h1>{html.escape(title)}</h1>
{"".join(rows)}
</body></html>
"""
    out = Path(out)
    atomic.write_bytes(out, page.encode())
    return out
