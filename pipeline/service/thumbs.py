"""Thumbnails of indexed items, read back from the shards the index records (never from a path in a request).

The search page reads a whole shard to pick out a few images; a service asked for one thumbnail at a time
cannot. For a local uncompressed tar it reads the member headers once (seeking past the data), then one seek
and read per image; a local compressed shard goes through the page's own reader; a remote one (http, https,
...) is read by ``remote.py`` within ``--thumb-timeout``, and the app runs those reads on their own small pool,
so a slow host costs thumbnails, never searches. ``pipe:`` urls are never run: they come from the index's data,
and running them would let whoever wrote the data run commands.
"""
from __future__ import annotations

import logging
import tarfile
import threading
from collections import OrderedDict
from pathlib import Path

from ..embedding.tar import IMAGE_EXTS, member_key
from ..index.html_page import images_by_key, thumbnail_jpeg
from .remote import read_image

log = logging.getLogger(__name__)


def _local_path(url: str) -> Path | None:
    """The file a shard url names on this machine (plain path or file://); None for any other scheme."""
    if url.startswith("file://"):
        return Path(url[len("file://"):])
    if ":" in url.split("/", 1)[0]:  # scheme:..., e.g. pipe:, s3:, https:
        return None
    return Path(url)


def _members(path: Path) -> dict[str, tuple[int, int]]:
    """``{key: (offset, size)}`` of each sample's image in an uncompressed tar (first image extension wins)."""
    found: dict[str, dict[str, tuple[int, int]]] = {}
    with tarfile.open(path, mode="r:") as tf:  # random access: headers only, the data is seeked past
        for m in tf:
            if not m.isfile():
                continue
            split = member_key(m.name)  # the key as the embed stage stored it (escaped when not UTF-8)
            if split is not None and split[1] in IMAGE_EXTS:
                found.setdefault(split[0], {})[split[1]] = (m.offset_data, m.size)
    return {key: next(exts[e] for e in IMAGE_EXTS if e in exts) for key, exts in found.items()}


class ShardImages:
    """Thumbnail JPEGs by (shard url, key), with the member tables of recently used shards and recent thumbnails
    kept (both bounded)."""

    def __init__(self, max_pixels: int, shards: int = 256, thumbs: int = 4096, timeout: float = 10.0):
        self.max_pixels = max_pixels
        self.timeout = timeout  # a remote shard's read, connecting included
        self.tables: OrderedDict[str, dict[str, tuple[int, int]] | None] = OrderedDict()
        self.thumbs: OrderedDict[tuple[str, str], bytes | None] = OrderedDict()
        self.max_tables, self.max_thumbs = shards, thumbs
        self.lock = threading.Lock()

    @staticmethod
    def is_remote(url: str) -> bool:
        """Read over the network (its reads go on the app's remote pool); ``pipe:`` urls are never read at all."""
        return _local_path(url) is None and not url.startswith("pipe:")

    def recent(self, url: str, key: str) -> tuple[bool, bytes | None]:
        """(kept, thumbnail): a thumbnail made before, without reading anything."""
        with self.lock:
            if (url, key) in self.thumbs:
                self.thumbs.move_to_end((url, key))
                return True, self.thumbs[(url, key)]
        return False, None

    def thumbnail(self, url: str, key: str) -> bytes | None:
        """The thumbnail of ``key`` in the shard ``url``; None when the shard or the image is gone or unreadable
        (remembered); :class:`~pipeline.service.remote.ShardTimeout` when a remote shard is too slow (not)."""
        kept, jpeg = self.recent(url, key)
        if kept:
            return jpeg
        jpeg = thumbnail_jpeg(self.image(url, key), self.max_pixels)
        with self.lock:
            self.thumbs[(url, key)] = jpeg
            while len(self.thumbs) > self.max_thumbs:
                self.thumbs.popitem(last=False)
        return jpeg

    def image(self, url: str, key: str) -> bytes | None:
        """The encoded image of ``key`` as stored in its shard."""
        if url.startswith("pipe:"):
            log.warning("not opening %r: pipe: shard urls recorded in an index are not run", url)
            return None
        path = _local_path(url)
        if path is None:
            return read_image(url, key, self.timeout)
        table = self._table(url, path)
        if table is None:  # compressed: a streamed read of the shard
            return images_by_key({url: {key}}).get((url, key))
        where = table.get(key)
        if where is None:
            return None
        try:
            with open(path, "rb") as f:  # type: ignore[arg-type]
                f.seek(where[0])
                data = f.read(where[1])
        except OSError:
            return None
        return data if len(data) == where[1] else None

    def _table(self, url: str, path: Path) -> dict[str, tuple[int, int]] | None:
        with self.lock:
            if url in self.tables:
                self.tables.move_to_end(url)
                return self.tables[url]
        try:
            table: dict[str, tuple[int, int]] | None = _members(path)
        except (OSError, tarfile.TarError):
            table = None  # not a plain tar here (gzip, moved): streamed instead
        with self.lock:
            self.tables[url] = table
            while len(self.tables) > self.max_tables:
                self.tables.popitem(last=False)
        return table
