"""One image read from a remote shard (http, https, ...) within a deadline, for thumbnails.

webdataset opens http(s) urls with curl and no ``--max-time``: a host that accepts the connection and never
answers held the reading thread for minutes, and the search threads with it. Here curl has a connect and a
total timeout, and a timer kills the reader at the deadline whatever the scheme (``gs:`` and the other
schemes webdataset runs a command for), so a read ends in time: with the image, None, or :class:`ShardTimeout`.
The stream stops once the key's sample has been read, not at the end of the shard.
"""
from __future__ import annotations

import contextlib
import logging
import subprocess
import tarfile
import threading
import zlib
from typing import Any, Iterator
from urllib.parse import urlsplit

from ..embedding.tar import IMAGE_EXTS, member_key

log = logging.getLogger(__name__)

CURL_SCHEMES = ("http", "https", "ftps", "sftp", "scp")  # the schemes webdataset reads with curl


class ShardTimeout(Exception):
    """A remote shard did not give the image within ``--thumb-timeout``: answered 504, never cached."""


@contextlib.contextmanager
def _stream(url: str, timeout: float) -> Iterator[tuple[Any, threading.Event]]:
    """The shard's bytes as a stream, and an event set when the deadline killed it."""
    proc: subprocess.Popen | None = None
    if urlsplit(url).scheme in CURL_SCHEMES:
        proc = subprocess.Popen(["curl", "-f", "-s", "-L", "--proto", "=" + ",".join(CURL_SCHEMES),
                                 "--proto-redir", "=http,https", "--connect-timeout", f"{min(timeout, 10.0):g}",
                                 "--max-time", f"{timeout + 2:g}", "--", url],  # a backstop: the timer decides
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
        stream: Any = proc.stdout
    else:
        from webdataset import gopen

        stream = gopen(url, "rb")
        proc = getattr(stream, "proc", None)
    expired = threading.Event()

    def expire() -> None:
        expired.set()
        if proc is not None:
            proc.kill()  # the reader then sees the end of the stream
        else:
            stream.close()

    timer = threading.Timer(timeout, expire)
    timer.daemon = True
    timer.start()
    try:
        yield stream, expired
    finally:
        timer.cancel()
        if proc is not None and proc.poll() is None:
            proc.kill()  # done early (the key found): the rest of the shard is not wanted
        with contextlib.suppress(OSError):
            stream.close()
        if proc is not None:
            proc.wait()


def read_image(url: str, key: str, timeout: float) -> bytes | None:
    """The encoded image of ``key`` in the remote shard ``url`` (the first image extension in ``IMAGE_EXTS``
    order, as the embed stage chose); None when the shard cannot be read or lacks it; ShardTimeout after
    ``timeout`` seconds."""
    found: dict[str, bytes] = {}
    with _stream(url, timeout) as (stream, expired):
        try:
            with tarfile.open(fileobj=stream, mode="r|*") as tf:
                for m in tf:
                    split = member_key(m.name) if m.isfile() else None
                    if split is None:
                        continue
                    if found and split[0] != key:
                        break  # past the key's sample
                    if split[0] == key and split[1] in IMAGE_EXTS:
                        found[split[1]] = tf.extractfile(m).read()  # type: ignore[union-attr]
        except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
            if not expired.is_set():
                log.warning("cannot read the thumbnail of %r from %s (%s: %s)", key, url, type(e).__name__, e)
                return None
        if expired.is_set() and not found:
            raise ShardTimeout(f"the shard {url} did not give the image of {key!r} within {timeout:g} s "
                               "(--thumb-timeout); the thumbnail is missing, searches are not affected")
    return next((found[e] for e in IMAGE_EXTS if e in found), None)
