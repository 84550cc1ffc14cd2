"""WebDataset tar shards -> samples ``{"__key__", "__url__", ext: bytes}``, read as a stream with integrity checks."""
from __future__ import annotations

import collections
import io
import re
import tarfile
from typing import Any, Iterator

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")  # the image of a sample: the first of these fields it has
KEEPABLE = ("txt", "json")  # sample fields the embed stage can keep as string columns
_KEY_EXT = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")  # webdataset's rule: the key ends at the first dot
RAW_KEY = "__raw_key__"  # a sample's key as bytes, present when those bytes are not UTF-8 (the key is escaped)


class _Tap(io.RawIOBase):
    """The (decompressed) tar byte stream, counting bytes and keeping the last ones read.

    tarfile stops *silently* at a garbled header and does not check gzip CRCs; with the tail kept here
    :func:`_check_tar_end` can tell a proper end-of-archive marker from corruption or truncation.
    """

    KEEP = 1 << 16  # > tarfile's read-ahead (one 10 KiB record past the header it could not parse)

    def __init__(self, raw: Any):
        head = raw.read(6) or b""
        self.raw, self.head = raw, head
        if head[:2] == b"\x1f\x8b":  # decompress here, not in tarfile: GzipFile checks the CRC and the length
            import gzip
            self.src: Any = gzip.GzipFile(fileobj=_Prefixed(head, raw))
        elif head[:3] == b"BZh":
            import bz2
            self.src = bz2.BZ2File(_Prefixed(head, raw))
        elif head[:6] == b"\xfd7zXZ\x00":
            import lzma
            self.src = lzma.LZMAFile(_Prefixed(head, raw))
        else:
            self.src = _Prefixed(head, raw)
        self.pos = 0
        self.chunks: collections.deque[bytes] = collections.deque()  # the last reads, >= KEEP bytes in all
        self.kept = 0

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        data = self.src.read(n) if n is not None and n >= 0 else self.src.read()
        self.pos += len(data)
        # References to the chunks, not a copy: keeping a rolling bytearray cost a 64 KiB move per read.
        self.chunks.append(data)
        self.kept += len(data)
        while self.kept - len(self.chunks[0]) >= self.KEEP:
            self.kept -= len(self.chunks.popleft())
        return data

    def block(self, offset: int) -> bytes:
        """The 512 bytes at ``offset`` of the tar stream (fewer at its end), once it is read to the end."""
        while self.read(1 << 16):
            pass  # to the end: decompressors verify their checksums there
        tail = b"".join(self.chunks)
        start = len(tail) - (self.pos - offset)
        if start < 0:
            raise tarfile.ReadError(f"cannot check the tar's end at byte {offset}")
        return tail[start: start + 512]


class _Prefixed(io.RawIOBase):
    """``head`` (already read for sniffing) followed by the rest of ``raw``."""

    def __init__(self, head: bytes, raw: Any):
        self.head, self.raw = head, raw

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        if self.head:
            out = self.head if n is None or n < 0 or n >= len(self.head) else self.head[:n]
            self.head = self.head[len(out):]
            return out
        return self.raw.read(n) if n is not None and n >= 0 else self.raw.read()

    def readinto(self, b: Any) -> int:
        data = self.read(len(b))
        b[: len(data)] = data
        return len(data)


def _check_tar_end(tap: _Tap, offset: int, members: int) -> None:
    """Raise unless the tar ended with its end-of-archive marker where tarfile stopped reading headers."""
    if members == 0 and tap.pos == 0:
        raise tarfile.ReadError("empty file")
    block = tap.block(offset)
    if len(block) < 512:
        raise tarfile.ReadError(f"the tar ends at byte {tap.pos} without its end-of-archive marker (truncated?)")
    if any(block):
        raise tarfile.ReadError(f"invalid tar header at byte {offset}: the shard is corrupt from there on")


def iter_tar_samples(url: str) -> Iterator[dict[str, Any]]:
    """Stream a (gzipped) tar from a path or any url webdataset opens, grouping members by key.

    Raises (so the shard fails, never silently shortened) on a truncated or corrupt tar or gzip stream, a
    garbled header mid-archive, and a ``pipe:`` command or download that exits with an error.
    """
    from webdataset import gopen

    stream = gopen(url, "rb")
    try:
        tap = _Tap(stream)
        members = 0
        with tarfile.open(fileobj=tap, mode="r|") as tf:
            current: dict[str, Any] | None = None
            for member in tf:
                members += 1
                if not member.isfile():
                    continue
                split = member_key(member.name)
                if split is None:
                    continue
                key, ext, raw = split
                data = tf.extractfile(member).read()  # type: ignore[union-attr]
                # A member whose key and extension repeat the current sample's starts a new sample (with a
                # duplicate key, skipped downstream with a reason) instead of silently replacing the first.
                if current is None or current["__key__"] != key or ext in current:
                    if current is not None:
                        yield current
                    current = {"__key__": key, "__url__": url}
                    if raw is not None:
                        current[RAW_KEY] = raw
                current[ext] = data
            if current is not None:
                yield current
            _check_tar_end(tap, tf.offset, members)
    finally:
        _close(stream)


def member_key(name: str) -> tuple[str, str, bytes | None] | None:
    """A tar member's sample key, its lower-cased extension and the key's raw bytes when they are not UTF-8 (the
    key is then escaped); None for a name without an extension. webdataset's rule: the key ends at the first dot
    of the file name. Every reader of shards (embed, thumbnails) names samples with this one function."""
    m = _KEY_EXT.match(name)
    if not m:
        return None
    (key, raw), ext = _text(m.group(1)), _text(m.group(2).lower())[0]
    return key, ext, raw


def _text(name: str) -> tuple[str, bytes | None]:
    """A key (or extension) as text every writer accepts, and its raw bytes when they are not UTF-8.

    tarfile keeps undecodable bytes as lone surrogates, which Parquet, JSON files and terminals refuse; they
    become ``\\xNN`` (``bad_\\xff.jpg``), and the raw bytes travel with the sample so the loss is recorded.
    """
    try:
        name.encode("utf-8")
        return name, None
    except UnicodeEncodeError:
        raw = name.encode("utf-8", "surrogateescape")
        return raw.decode("utf-8", "backslashreplace"), raw


def _close(stream: Any) -> None:
    """Close a gopen stream; a ``pipe:`` command (or curl) that failed raises with its exit status."""
    try:
        stream.close()
    except OSError:
        status, args = getattr(stream, "status", None), getattr(stream, "args", None)
        if status is None or not args:
            raise
        cmd = args[0][0] if args[0] else "?"
        cmd = " ".join(cmd) if isinstance(cmd, (list, tuple)) else str(cmd)
        raise OSError(f"the command `{cmd}` exited with status {status}") from None
