"""An embed output folder as its readers see it: the files its done records vouch for (what an index may read),
its shard counts and its status. The folder's names and its writer are ``run_folder``'s."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

from .. import store
from ..errors import UserError
from .run_folder import (EMBEDDINGS, IN_FOLDER, RUN_JSON, SUCCESS, file_mismatch, is_run_folder, positive_count,
                         read_record, records)

log = logging.getLogger(__name__)


def committed_files(path: Path | str) -> list[Path] | None:
    """The embedding files a run folder's done records vouch for: what an index may read.

    ``path`` is a run folder or its ``embeddings/``; None when it is neither (bare Parquet files: nothing to
    check them against). A done record that is unreadable, or whose file is missing or no longer the one
    committed (size, sha256, rows), is a UserError naming the file: rerunning embed redoes exactly those
    shards. Files without a done record (a shard being embedded, or killed before its record) are left out.
    """
    p = Path(path)
    out = p if is_run_folder(p) else p.parent if p.name == EMBEDDINGS and is_run_folder(p.parent) else None
    if out is None:
        return None
    done, failed = records(out)
    fix = f"rerun `embedpipe embed` with the same shards and --out {out} to redo it, then index again"
    stale = stale_success(out, list(done), list(failed))
    if stale:
        raise UserError(f"{stale}; rerun `embedpipe embed` with the same shards and --out {out} to redo them, then "
                        "index again")
    files = []
    for name, rec_path in sorted(done.items()):
        rec = read_record(rec_path)
        if rec is None:
            raise UserError(f"{rec_path} is an unreadable done record; delete it and {fix}")
        f = out / EMBEDDINGS / f"{name}.parquet"
        why = file_mismatch(f, rec.get("file"))
        if why is None and store.shard_info(f).rows != rec.get("embedded"):  # the footer only: cheap
            why = f"it has {store.shard_info(f).rows} rows, its done record says {rec.get('embedded')}"
        if why:
            raise UserError(f"{f}: {why}; {fix}")
        files.append(f)
    unrecorded = sorted(p.name for p in (out / EMBEDDINGS).glob("*.parquet") if not p.name.startswith(".")
                        and p.name[: -len(".parquet")] not in done)
    if unrecorded:
        log.warning("%d file(s) in %s have no done record and are left out (a shard being embedded, or killed "
                    "before its record): %s", len(unrecorded), out / EMBEDDINGS, ", ".join(unrecorded[:3]))
    if not files:
        raise UserError(f"no finished shards in {out} (no done records); did `embedpipe embed` finish?")
    return files


def stale_success(out: Path, done: Sequence[str], failed: Sequence[str]) -> str | None:
    """Why ``OUT/_SUCCESS`` is untrue (it is there, but fewer shards are done than the folder was given), or None."""
    if not (out / SUCCESS).is_file():
        return None
    counts = shard_counts(read_record(out / RUN_JSON), done, failed)
    if counts["done"] >= counts["shards_expected"]:
        return None
    return (f"{out / SUCCESS} says every shard is done, but {counts['shards_expected'] - counts['done']} of the "
            f"{counts['shards_expected']} shards the folder was given have no done record (their files and records "
            "were removed, or the folder was edited)")


def shard_counts(run: dict[str, Any] | None, done: Sequence[str], failed: Sequence[str]) -> dict[str, Any]:
    """The shard counts of a folder from its run.json and the names of its done and failed records.

    A failed shard is one kind of not done (counted once); a folder fed more than one input set expects every
    shard it knows of (``shards_in_folder``, its records), not just its last run's, so no count exceeds its total.
    """
    last = positive_count(((run or {}).get("config") or {}).get("shards"))
    failed_only = set(failed) - set(done)
    expected = max(last, positive_count((run or {}).get(IN_FOLDER)), len(set(done) | failed_only))
    return {"shards_expected": expected, "done": len(done), "failed": len(failed_only),
            "pending": expected - len(done) - len(failed_only), "shards_last_run": last,
            "more_than_one_input_set": expected > last}


def status(out: Path | str) -> dict[str, Any]:
    """Done, failed and pending shards of an output folder, with sample counts."""
    out = Path(out)
    if not is_run_folder(out):
        raise UserError(f"{out} is not an embedpipe output folder (no {RUN_JSON}); pass the --out of `embedpipe embed`")
    run = read_record(out / RUN_JSON)
    if run is None:
        raise UserError(f"{out / RUN_JSON} is unreadable (empty or not JSON); rerun `embedpipe embed` with --overwrite")
    done_paths, failed_paths = records(out)
    done_recs = {name: read_record(p) for name, p in done_paths.items()}
    done = [r for r in done_recs.values() if r is not None]
    failed = {p: read_record(p) for name, p in failed_paths.items() if name not in done_recs or done_recs[name] is None}
    unreadable = [str(p) for name, p in done_paths.items() if done_recs[name] is None]
    unreadable += [str(p) for p, r in failed.items() if r is None]
    return {
        **shard_counts(run, [n for n, r in done_recs.items() if r is not None], list(failed_paths)),
        "embedded": sum(r.get("embedded", 0) for r in done), "skipped": sum(len(r.get("skipped", [])) for r in done),
        "failed_shards": {(r or {}).get("url", str(p)): (r or {}).get("reason", "unreadable failure record; rerun embed")
                          for p, r in failed.items()},
        "unreadable_records": unreadable, "success": (out / SUCCESS).is_file(),
    }
