"""WebDataset tar shards -> samples ``{"__key__", "__url__", ext: bytes}``, read as a stream with integrity checks."""
from __future__ import annotations

import collections
import io
import json
import os
import re
import stat
import tarfile
from typing import Any, Callable, Collection, Iterator
from urllib.parse import urlparse

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")  # the image of a sample: the first of these fields it has
KEEPABLE = ("txt", "json")  # sample fields the embed stage can keep as string columns
LABEL = "cls"  # the field of a sample's integer label
USED = (*IMAGE_EXTS, LABEL, *KEEPABLE)  # the fields any reader of samples reads; the rest are skipped unread
_KEY_EXT = re.compile(r"^((?:.*/|)[^./]+)\.([^/]+)$")  # webdataset's rule: the key ends at the first dot
RAW_KEY = "__raw_key__"  # a sample's key as bytes, present when those bytes are not UTF-8 (the key is escaped)
UNREAD = "__unread__"  # the fields a sample has whose data was not read (unused, or refused for their size)
REFUSED = "__refused__"  # why the sample cannot be used: a used field above the size limit (its data unread)
NOT_A_SAMPLE = "__not_a_sample__"  # a record for a tar member that is no sample field: why (its __key__: its name)
# No real image comes near these; above them a member or a shard is a bomb (a sparse or zero-filled member that
# would be read whole into memory, a gzip stream that decompresses forever). Options: --max-member-mb, --max-shard-gb.
DEFAULT_MAX_MEMBER_MB = 64
DEFAULT_MAX_SHARD_GB = 64.0
MB, GB = 1 << 20, 1 << 30
# Test hook: EMBEDPIPE_COUNT_READS=DIR makes each process append a line {"url", "bytes", "seek", "pid"} per shard
# it opened to DIR/reads-<pid>.jsonl: the bytes read from the shard's source (before decompression).
COUNT_READS_ENV = "EMBEDPIPE_COUNT_READS"
_COMPRESSED_MAGIC = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00")  # gzip, bzip2, xz: what _Tap decompresses
_COMPRESSED_SUFFIXES = (".gz", ".tgz", ".bz2", ".tbz", ".tbz2", ".xz", ".txz", ".zst", ".lz4")


class ShardTooLarge(ValueError):
    """The tar stream of a shard (after decompression) is longer than its limit: the shard fails."""


class _Tap(io.RawIOBase):
    """The (decompressed) tar byte stream, counting bytes and keeping the last ones read.

    tarfile stops *silently* at a garbled header and does not check gzip CRCs; with the tail kept here
    :func:`_check_tar_end` can tell a proper end-of-archive marker from corruption or truncation.
    """

    KEEP = 1 << 16  # > tarfile's read-ahead (one 10 KiB record past the header it could not parse)

    def __init__(self, raw: Any, limit: int | None = None):
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
        self.pos, self.limit = 0, limit
        self.chunks: collections.deque[bytes] = collections.deque()  # the last reads, >= KEEP bytes in all
        self.kept = 0

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        if self.limit is not None and (n is None or n < 0):
            n = self.limit + 1 - self.pos  # never a whole bomb at once
        data = self.src.read(n) if n is not None and n >= 0 else self.src.read()
        self.pos += len(data)
        if self.limit is not None and self.pos > self.limit:
            raise _too_large(self.limit)
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


def _too_large(limit: int) -> ShardTooLarge:
    return ShardTooLarge(f"the shard's tar stream is longer than {limit / GB:g} GB (after decompression; "
                         "--max-shard-gb): a decompression bomb? If the shard really is that large, raise "
                         "--max-shard-gb")


class _Counted(io.RawIOBase):
    """A shard's source (file, pipe, download), counting the bytes read from it (for ``COUNT_READS_ENV``)."""

    def __init__(self, src: Any):
        self.src, self.bytes = src, 0

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        data = self.src.read(n) if n is not None and n >= 0 else self.src.read()
        self.bytes += len(data)
        return data

    def readinto(self, b: Any) -> int:
        data = self.read(len(b))
        b[: len(data)] = data
        return len(data)

    def seekable(self) -> bool:
        return self.src.seekable()

    def seek(self, pos: int, whence: int = 0) -> int:
        return self.src.seek(pos, whence)

    def tell(self) -> int:
        return self.src.tell()


def can_seek(url: str) -> bool:
    """Whether ``url`` names a shard whose samples can be read apart, each seeking over the others' data: a local
    file, not compressed (by its name; a compressed one found by its bytes is streamed, correctly but whole).
    ``pipe:`` commands and downloads cannot seek, and a compressed stream can only be decompressed through."""
    if url == "-" or urlparse(url).scheme not in ("", "file"):
        return False
    return not url.lower().endswith(_COMPRESSED_SUFFIXES)


class _Source:
    """A shard's tar as tarfile reads it: seekable (a local uncompressed file, asked for with ``seek``: the data of
    unwanted samples is seeked over, never read) or a stream through :class:`_Tap` (anything else)."""

    def __init__(self, stream: Any, limit: int, seek: bool):
        raw = getattr(stream, "raw", None) if seek else None  # gopen opens local files buffered; seek the file
        self.seek = isinstance(raw, io.FileIO) and stat.S_ISREG(os.fstat(raw.fileno()).st_mode)
        self.counted = _Counted(raw if self.seek else stream)
        if self.seek:
            self.size = os.fstat(raw.fileno()).st_size  # type: ignore[union-attr]
            head = self.counted.read(6)
            self.counted.seek(0)
            self.seek = not head.startswith(_COMPRESSED_MAGIC)
        if self.seek:
            if self.size > limit:  # uncompressed: the tar stream is the file
                raise _too_large(limit)
            self.fileobj: Any = self.counted
        else:
            self.tap = self.fileobj = _Tap(self.counted, limit)

    def check_end(self, offset: int, members: int) -> None:
        """Raise unless the tar ended with its end-of-archive marker where tarfile stopped reading headers."""
        if self.seek:
            self.counted.seek(offset)
            block, size = self.counted.read(512), self.size
        else:
            block, size = self.tap.block(offset), self.tap.pos
        if members == 0 and size == 0:
            raise tarfile.ReadError("empty file")
        if len(block) < 512:
            raise tarfile.ReadError(f"the tar ends at byte {size} without its end-of-archive marker (truncated?)")
        if any(block):
            raise tarfile.ReadError(f"invalid tar header at byte {offset}: the shard is corrupt from there on")

    def report(self, url: str) -> None:
        folder = os.environ.get(COUNT_READS_ENV)
        if folder:
            line = {"url": url, "bytes": self.counted.bytes, "seek": self.seek, "pid": os.getpid()}
            with open(os.path.join(folder, f"reads-{os.getpid()}.jsonl"), "a") as f:
                f.write(json.dumps(line) + "\n")


def iter_tar_samples(url: str, fields: Collection[str] = USED, max_member_mb: float = DEFAULT_MAX_MEMBER_MB,
                     max_shard_gb: float = DEFAULT_MAX_SHARD_GB,
                     wanted: Callable[[int], bool] | None = None) -> Iterator[dict[str, Any]]:
    """Stream a (gzipped) tar from a path or any url webdataset opens, grouping members by key.

    Only the data of ``fields`` is read; the names of a sample's other fields are listed under ``UNREAD`` (their
    data is streamed past, never held). A sample with a used field above ``max_member_mb`` carries ``REFUSED``
    (why) instead of that field's data. A member that is no sample field (a link, FIFO or device; a name without
    a key or an extension) comes as a record of its own, ``{"__key__": its name, NOT_A_SAMPLE: why}``, after the
    sample it interrupts; directories are structure and pass silently.

    ``wanted(i)`` (optional) says whether the data of the i-th sample (counting samples, not those records) is
    read at all: the others come with their key and every field named under ``UNREAD``. A local uncompressed tar
    (:func:`can_seek`) is then read by seeking over their data: only their 512-byte headers are read.

    Raises (so the shard fails, never silently shortened) on a truncated or corrupt tar or gzip stream, a
    garbled header mid-archive, a tar stream longer than ``max_shard_gb`` (:class:`ShardTooLarge`), and a
    ``pipe:`` command or download that exits with an error.
    """
    from webdataset import gopen

    max_member = int(max_member_mb * MB)
    stream = gopen(url, "rb")
    source = None
    try:
        source = _Source(stream, int(max_shard_gb * GB), seek=wanted is not None)
        members, samples, reading = 0, 0, True
        with tarfile.open(fileobj=source.fileobj, mode="r:" if source.seek else "r|") as tf:
            current: dict[str, Any] | None = None
            exts: set[str] = set()  # the current sample's fields, read or not
            aside: list[dict[str, Any]] = []  # records of members that are no field, yielded after the sample
            while (member := tf.next()) is not None:
                members += 1
                tf.members.clear()  # tarfile keeps every header it read: memory stays bounded, whatever the count
                split = member_key(member.name) if member.isfile() else None
                if split is None:
                    why = not_a_field(member)
                    if why:
                        record = {"__key__": _text(member.name)[0], "__url__": url, NOT_A_SAMPLE: why}
                        if current is None:
                            yield record
                        else:
                            aside.append(record)
                    continue
                key, ext, raw = split
                # A member whose key and extension repeat the current sample's starts a new sample (with a
                # duplicate key, skipped downstream with a reason) instead of silently replacing the first.
                if current is None or current["__key__"] != key or ext in exts:
                    if current is not None:
                        yield current
                        yield from aside
                        aside = []
                    current, exts = {"__key__": key, "__url__": url}, set()
                    if raw is not None:
                        current[RAW_KEY] = raw
                    reading = wanted is None or wanted(samples)
                    samples += 1
                exts.add(ext)
                if ext not in fields or not reading:
                    current.setdefault(UNREAD, []).append(ext)
                elif member.size > max_member:
                    current.setdefault(UNREAD, []).append(ext)
                    current.setdefault(REFUSED, f"its .{ext} member is {member.size / MB:.1f} MB, above the limit of "
                                                f"{max_member_mb:g} MB (--max-member-mb); not read")
                else:
                    current[ext] = tf.extractfile(member).read()  # type: ignore[union-attr]
            if current is not None:
                yield current
                yield from aside
            source.check_end(tf.offset, members)
    finally:
        _close(stream)
        if source is not None:
            source.report(url)


def not_a_field(member: tarfile.TarInfo) -> str:
    """Why a tar member is no field of a sample ('' for a directory, which is only structure)."""
    if member.isdir():
        return ""
    name = repr(_text(member.name)[0])
    if not member.isfile():
        kind = (f"a symbolic link (to {member.linkname!r})" if member.issym() else
                f"a hard link (to {member.linkname!r})" if member.islnk() else "a FIFO" if member.isfifo() else
                "a character device" if member.ischr() else "a block device" if member.isblk() else
                f"of tar type {member.type!r}")
        return f"tar member {name} is {kind}, not a regular file; not read"
    base = member.name.rsplit("/", 1)[-1]
    if base.startswith("."):
        return (f"tar member {name} has no sample key (its name starts with a dot; a sample's members are named "
                "KEY.EXT); not read")
    return f"tar member {name} has no extension (a sample's members are named KEY.EXT); not read"


def member_key(name: str) -> tuple[str, str, bytes | None] | None:
    """A tar member's sample key, its lower-cased extension and the key's raw bytes when they are not UTF-8 (the
    key is then escaped); None for a name without a key or an extension. webdataset's rule: the key ends at the first dot
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
