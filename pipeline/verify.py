"""`embedpipe verify`: check an embed folder against its done records, and an index against its embeddings."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from . import store
from .embedding import run_folder
from .errors import UserError
from .index import keys, layout


def verify_embeddings(out: Path) -> tuple[list[str], dict[str, Any]]:
    """Problems found in an embed output folder (empty when it is sound), and counts.

    Every Parquet file is read whole and checked against its done record: the sha256 recorded at commit (any
    changed byte), rows, unique keys, dim, dtype, NaN/Inf. Unreadable records are problems, never tracebacks.
    """
    problems: list[str] = []
    run = run_folder.read_record(out / run_folder.RUN_JSON)
    if run is None:
        problems.append(f"{out / run_folder.RUN_JSON}: unreadable (empty or not JSON); rerun embed with --overwrite")
    fp = (run or {}).get("fingerprint", {})
    dim_expected, dtype_expected = None, fp.get("dtype")
    records, failed_records = run_folder.records(out)
    emb_dir = out / store.EMBEDDINGS
    files = {p.stem: p for p in emb_dir.glob("*.parquet")} if emb_dir.is_dir() else {}
    rows, urls = 0, {}
    for name, rec_path in sorted(records.items()):
        rec = run_folder.read_record(rec_path)
        if rec is None:
            problems.append(f"{rec_path}: unreadable done record (empty or not JSON); delete it and rerun embed")
            continue
        url = rec.get("url")
        if isinstance(url, str) and url in urls:
            problems.append(f"{rec_path}: the shard {url} is also done as {urls[url]} (embedded twice under two names)")
        urls.setdefault(url, name) if isinstance(url, str) else None
        f = files.get(name)
        if f is None:
            problems.append(f"{rec_path}: done record but no {store.EMBEDDINGS}/{name}.parquet (rerun embed to redo it)")
            continue
        changed = run_folder.file_mismatch(f, rec.get("file"), full=True)
        if changed:
            problems.append(f"{f}: {changed} (rerun embed to redo it)")
        try:
            info = store.shard_info(f)
            table = pq.read_table(f)
        except Exception as e:  # noqa: BLE001  an unreadable file is exactly what verify reports
            problems.append(f"{f}: unreadable Parquet ({e})")
            continue
        rows += table.num_rows
        if table.num_rows != rec.get("embedded"):
            problems.append(f"{f}: {table.num_rows} rows but its done record says {rec.get('embedded')} were embedded")
        keys = table.column("key").to_pylist()
        if len(set(keys)) != len(keys):
            problems.append(f"{f}: {len(keys) - len(set(keys))} duplicate key(s)")
        dim_expected = dim_expected or (info.metadata.dim if info.metadata else None) or info.dim
        if info.dim != dim_expected:
            problems.append(f"{f}: dim {info.dim}, expected {dim_expected}")
        if dtype_expected and info.dtype != dtype_expected:
            problems.append(f"{f}: dtype {info.dtype}, run.json says {dtype_expected}")
        emb = store.embedding_matrix(table.column("embedding"))
        bad = int((~np.isfinite(emb)).any(axis=1).sum())
        if bad:
            problems.append(f"{f}: {bad} embedding(s) with NaN or Inf")
    findings = _row_findings([files[n] for n in sorted(records) if n in files], problems)
    pending = sorted(set(files) - set(records))
    failed = {}
    for name, p in failed_records.items():
        if name in records:  # done since (a done record wins over a stale failure): not failed
            continue
        rec = run_folder.read_record(p)
        if rec is None:
            failed[p.name] = "unreadable failure record"
        else:
            failed[rec.get("url", p.name)] = rec.get("reason", "?")
    counts = run_folder.shard_counts(run, list(records), list(failed_records))  # the ones `status` prints
    return problems, {"shards_verified": len(records), "rows": rows, "findings": findings,
                      "pending_without_record": pending,
                      "failed_records": sorted(p.name for p in failed_records.values()), "failed": failed,
                      "shards_expected": counts["shards_expected"],
                      "shards_not_done": counts["failed"] + counts["pending"]}


def _row_findings(files: list[Path], problems: list[str]) -> list[str]:
    """Rows held twice across ``files``: a repeated (shard, key) is a problem; keys several shards hold (two
    img2dataset runs) are a finding (answered per shard, said so that nobody is surprised)."""
    try:
        dup = keys.duplicates(keys.file_rows(files))
    except Exception:  # noqa: BLE001  an unreadable file is already reported as a problem
        return []
    if dup.repeated_rows:
        problems.append(dup.repeated_text())
    return [dup.shared_text()] if dup.shared_keys else []


def incomplete(info: dict[str, Any]) -> str | None:
    """Why a sound embed folder is not complete (failed or pending shards), or None: ``verify`` says so, exit 1."""
    missing = info.get("shards_not_done", 0)
    if not missing and not info.get("failed"):
        return None
    failed = len(info.get("failed", {}))
    return (f"incomplete: {missing} of {info['shards_expected']} shard(s) not done ({failed} failed, "
            f"{max(0, missing - failed)} pending); rerun `embedpipe embed` with the same shards to finish")


def verify_index(index_dir: Path) -> tuple[list[str], dict[str, Any]]:
    """Problems in an index folder: FAISS count vs index.json and ids.parquet, ids mapping to real keys."""
    problems: list[str] = []
    rec = layout.read_record(index_dir)
    index = layout.load_faiss(index_dir, rec, mmap=True)
    ids = pq.read_table(index_dir / layout.IDS_FILE)
    if index.ntotal != rec.count:
        problems.append(f"{index_dir}: the FAISS index holds {index.ntotal} vectors, {layout.META_FILE} says "
                        f"{rec.count}")
    if ids.num_rows != index.ntotal:
        problems.append(f"{index_dir}/{layout.IDS_FILE}: {ids.num_rows} rows for {index.ntotal} vectors")
    id_col = ids.column("id").to_numpy()
    if len(np.unique(id_col)) != len(id_col):
        problems.append(f"{index_dir}/{layout.IDS_FILE}: duplicate ids")
    dup = keys.duplicates(ids)
    if dup.repeated_rows:
        problems.append(f"{index_dir}/{layout.IDS_FILE}: {dup.repeated_text()}")
    folders = rec.source_dirs  # the build's folder and each --update's
    if all(Path(d).exists() for d in folders):
        known: set[str] = set()
        for f in (f for d in folders for f in store.list_shards(d)):
            known.update(pq.read_table(f, columns=["key"]).column("key").to_pylist())
        missing = [k for k in ids.column("key").to_pylist() if k not in known]
        if missing:
            problems.append(f"{index_dir}: {len(missing)} id(s) map to keys not in {', '.join(folders)} "
                            f"(first: {missing[0]!r})")
    return problems, {"vectors": int(index.ntotal), "factory": rec.factory,
                      "findings": [dup.shared_text()] if dup.shared_keys else []}


def run_verify(path: str | Path) -> tuple[list[str], dict[str, Any]]:
    """Verify an embed output folder (has run.json) or an index folder (has index.json)."""
    p = Path(path)
    if run_folder.is_run_folder(p):
        return verify_embeddings(p)
    if (p / layout.META_FILE).is_file():
        return verify_index(p)
    raise UserError(f"{p} is neither an embed output folder ({run_folder.RUN_JSON}) nor an index folder "
                    f"({layout.META_FILE})")
