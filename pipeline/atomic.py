"""Files that are complete or absent: temp + fsync + replace, multi-file journals, directory exchange, stale temps."""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any, Iterator, Sequence

from .errors import UserError

log = logging.getLogger(__name__)

_UMASK = os.umask(0)
os.umask(_UMASK)
FILE_MODE = 0o666 & ~_UMASK  # mkstemp makes 0600 files; outputs get the usual permissions instead
JOURNAL = ".commit.json"  # the commit point of a multi-file write (write_files)


def temp_beside(path: Path) -> str:
    """A new empty temporary file ``.NAME.<random>.tmp`` in ``path``'s folder (what remove_stale_temps finds)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.fchmod(fd, FILE_MODE)
    os.close(fd)
    return tmp


def _fsync(path: str) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


@contextlib.contextmanager
def replacing(path: str | Path) -> Iterator[str]:
    """Write ``path`` through a temporary file beside it: yields the temporary path to write; on success it is
    fsynced and renamed over ``path`` (readers see the old file or the whole new one), on failure removed.

    Example:
        >>> with replacing("out/model.pt") as tmp:  # doctest: +SKIP
        ...     torch.jit.save(module, tmp)
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_beside(path)
    try:
        yield tmp
        _fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that the file is either complete or absent."""
    with replacing(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)


def write_json(path: str | Path, obj: Any) -> None:
    """:func:`write_bytes` of ``obj`` as indented, key-sorted JSON."""
    write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode())


def file_sha256(path: str | Path) -> str:
    """The sha256 of a file's content, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def remove_stale_temps(folder: Path, names: Sequence[str]) -> int:
    """Delete the temporary files (``.NAME.<random>.tmp``) a killed writer left for these file names in ``folder``.

    Only for names this process alone writes (its own shards, under its lock); returns how many went.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    wanted = re.compile(r"^\.(%s)\.[A-Za-z0-9_]+\.tmp$" % "|".join(re.escape(n) for n in names)) if names else None
    gone = 0
    for p in folder.iterdir() if wanted else ():
        if wanted.match(p.name) and p.is_file():
            p.unlink(missing_ok=True)
            gone += 1
    return gone


def write_files(folder: Path, files: dict[str, bytes]) -> None:
    """Replace several files of ``folder`` as one: after a crash a reader sees all old or all new ones.

    Each file goes to a temporary name; the journal ``.commit.json`` (final name -> temporary name), written
    atomically, is the commit point; then the renames. :func:`recover_files`, called by writers and readers
    of the folder, finishes a commit a crash interrupted; the temporaries of an uncommitted one are dropped.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    recover_files(folder)
    remove_stale_temps(folder, [*sorted(files), JOURNAL])
    tmps: dict[str, str] = {}
    try:
        for name, data in files.items():
            tmp = temp_beside(folder / name)
            tmps[name] = Path(tmp).name
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        write_json(folder / JOURNAL, tmps)
    except BaseException:
        for t in tmps.values():
            (folder / t).unlink(missing_ok=True)
        raise
    recover_files(folder)


def recover_files(folder: Path) -> None:
    """Finish the multi-file commit of :func:`write_files` that a crash interrupted, if any."""
    journal = Path(folder) / JOURNAL
    try:
        plan = json.loads(journal.read_text())
    except FileNotFoundError:
        return
    for name, tmp in plan.items():
        if Path(name).name != name or Path(tmp).name != tmp:
            raise UserError(f"{journal} names a file outside its folder ({name!r}); delete it")
        try:
            os.replace(Path(folder) / tmp, Path(folder) / name)
        except FileNotFoundError:
            pass  # renamed already
    journal.unlink(missing_ok=True)


def exchange_dirs(a: Path, b: Path) -> bool:
    """Swap two existing directories in one step (Linux ``renameat2(RENAME_EXCHANGE)``); False where unsupported."""
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


@contextlib.contextmanager
def locked_dir(final: Path) -> Iterator[None]:
    """One writer at a time per directory (``.NAME.lock``, flock): a scheduled update must not race another."""
    final.parent.mkdir(parents=True, exist_ok=True)
    with open(final.parent / f".{final.name}.lock", "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(f"another embedpipe command is writing {final}; wait for it to finish") from None
        _clean_stale(final)
        yield


def _clean_stale(final: Path) -> None:
    """Under the lock: drop what a killed writer left beside ``final`` (and put back an index it had moved away)."""
    leftovers = sorted(final.parent.glob(f".{final.name}.old-*"), key=lambda p: p.stat().st_mtime)
    if leftovers and not final.exists():  # killed between the two renames of the fallback swap
        log.warning("restoring %s from %s", final, leftovers[-1])
        os.rename(leftovers.pop(), final)
    for p in leftovers + list(final.parent.glob(f".{final.name}.tmp-*")):
        log.warning("removing %s, left by an interrupted run", p)
        shutil.rmtree(p, ignore_errors=True)


@contextlib.contextmanager
def staged_dir(final: Path, carry_except: Sequence[str] | None = None) -> Iterator[Path]:
    """A temporary sibling of ``final`` to build into; swapped in on success, removed on failure.

    With ``carry_except``, the entries of the current ``final`` that the new version neither writes nor names
    there (a file a user keeps in a probe folder) are carried over: hard-linked in before the swap, so they
    never go missing, and moved across after it if they changed meanwhile.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    os.chmod(tmp, 0o777 & ~_UMASK)  # mkdtemp makes 0700: others (a serving pod, a colleague) must read it too
    try:
        yield tmp
        ours = {p.name for p in tmp.iterdir()} | set(carry_except or ())
        others = [p for p in final.iterdir() if p.name not in ours] if carry_except is not None and final.is_dir() else []
        for p in others:
            _link_into(p, tmp / p.name)
        if final.exists() and exchange_dirs(tmp, final):  # one atomic step: readers see old or new
            _carry_changed(tmp, final, ours)  # tmp now holds the previous version
            shutil.rmtree(tmp, ignore_errors=True)
            return
        old = final.parent / f".{final.name}.old-{uuid.uuid4().hex[:8]}"
        if final.exists():
            os.rename(final, old)
        os.rename(tmp, final)
        if old.exists():
            _carry_changed(old, final, ours)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _link_into(src: Path, dst: Path) -> None:
    """``src`` at ``dst`` without copying data: hard links (a folder's tree of them), symlinks as symlinks."""
    if src.is_symlink():
        os.symlink(os.readlink(src), dst)
    elif src.is_dir():
        shutil.copytree(src, dst, symlinks=True, copy_function=os.link)
    else:
        os.link(src, dst)


def _carry_changed(old: Path, new: Path, ours: set[str]) -> None:
    """Entries of ``old`` that are not ``ours`` and were created or replaced there after they were linked."""
    for p in old.iterdir():
        target = new / p.name
        if p.name in ours:
            continue
        if not target.exists() and not target.is_symlink():
            os.rename(p, target)
        elif p.is_file() and not p.is_symlink() and p.stat().st_ino != target.stat().st_ino:
            os.replace(p, target)
