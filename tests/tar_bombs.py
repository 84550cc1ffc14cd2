"""Test helpers: tar shards with members far larger than their file (bombs), written in a fraction of a second.

A member is ``(name, data)`` with ``data`` either bytes or an int: that many zero bytes, which never exist in
memory. :func:`sparse_member_tar` stores one member as a GNU sparse file (a 3 GiB member in a 10 KB tar);
:func:`hole_tar` writes zeros as a hole of a sparse file on disk (a 1.5 GB tar that takes no disk space);
:func:`zeros_tar_gz` gzips the tar stream, zeros as repeated deflate blocks (2 GiB in a 2 MB ``.tar.gz``).
"""
from __future__ import annotations

import struct
import tarfile
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path

Member = tuple["str | None", "bytes | int"]  # name None: bytes already laid out as tar blocks (header and data)
BLOCK, RECORD, MIB = tarfile.BLOCKSIZE, tarfile.RECORDSIZE, 1 << 20


def _header(name: str, size: int, kind: bytes = tarfile.REGTYPE) -> bytes:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.type = size, 0, kind
    return info.tobuf(tarfile.GNU_FORMAT, "utf-8", "surrogateescape")


def _pad(n: int) -> int:
    return -n % BLOCK


def _stream(members: Iterable[Member]) -> Iterator[bytes | int]:
    """The tar stream of ``members``: bytes, or an int for that many zero bytes; it ends with the end-of-archive
    marker padded to a whole record, as tarfile writes it."""
    total = 0
    for name, data in members:
        size = data if isinstance(data, int) else len(data)
        for piece in ((data,) if name is None else (_header(name, size), data, _pad(size))):
            yield piece
            total += piece if isinstance(piece, int) else len(piece)
    end = 2 * BLOCK
    yield end + -(total + end) % RECORD


def hole_tar(path: Path, members: Iterable[Member]) -> Path:
    """An uncompressed tar whose zero runs are holes of a sparse file: no disk space, read back as zeros."""
    with open(path, "wb") as f:
        for piece in _stream(members):
            if isinstance(piece, int):
                f.seek(piece, 1)
            else:
                f.write(piece)
        f.truncate(f.tell())
    return path


def zeros_tar_gz(path: Path, members: Iterable[Member]) -> Path:
    """The gzipped tar of ``members``. Each MiB of zeros is the same deflate blocks, compressed once: a full flush
    leaves no history behind, so copies of them can follow each other (as pigz joins its blocks)."""
    zeros = bytes(MIB)
    one = zlib.compressobj(9, zlib.DEFLATED, -15)
    mib_block = one.compress(zeros) + one.flush(zlib.Z_FULL_FLUSH)
    deflate = zlib.compressobj(9, zlib.DEFLATED, -15)
    crc = size = 0
    with open(path, "wb") as f:
        f.write(b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x02\xff")  # gzip header: deflate, no name, mtime 0
        for piece in _stream(members):
            if isinstance(piece, int):
                whole, rest = divmod(piece, MIB)
                f.write(deflate.flush(zlib.Z_FULL_FLUSH))
                for _ in range(whole):
                    f.write(mib_block)
                    crc = zlib.crc32(zeros, crc)
                piece = bytes(rest)
                size += whole * MIB
            f.write(deflate.compress(piece))
            crc, size = zlib.crc32(piece, crc), size + len(piece)
        f.write(deflate.flush(zlib.Z_FINISH))
        f.write(struct.pack("<II", crc, size & 0xFFFFFFFF))
    return path


def sparse_member_tar(path: Path, before: Iterable[Member], name: str, size: int, after: Iterable[Member],
                      tail: bytes = b"\xff" * BLOCK) -> Path:
    """A tar with ``name`` stored as an old-GNU sparse member of ``size`` bytes: only ``tail`` (at its end) is
    stored, the rest is a hole that tarfile expands into zeros when the member is read."""
    head = bytearray(_header(name, len(tail), tarfile.GNUTYPE_SPARSE))
    head[386:410] = tarfile.itn(size - len(tail), 12, tarfile.GNU_FORMAT) + tarfile.itn(len(tail), 12,
                                                                                         tarfile.GNU_FORMAT)
    head[482] = 0  # no extended sparse headers
    head[483:495] = tarfile.itn(size, 12, tarfile.GNU_FORMAT)  # the real size
    head[148:156] = b" " * 8  # the checksum counts its own field as spaces
    head[148:156] = b"%06o\0 " % sum(head)
    entry = bytes(head) + tail + bytes(_pad(len(tail)))
    with open(path, "wb") as f:
        for piece in _stream([*before, (None, entry), *after]):
            f.write(bytes(piece) if isinstance(piece, int) else piece)
    return path
