"""`embedpipe verify`: check an embed folder against its done records, and an index against its embeddings."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from . import atomic, store
from .embedding import folder_view, run_folder
from .errors import UserError
from .index import keys, layout
from .records import ModelIdentity


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
        problems += _against_run(f, info, fp)
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
    problems += _copies([files[n] for n in pending], set(urls))
    failed = {}
    for name, p in failed_records.items():
        if name in records:  # done since (a done record wins over a stale failure): not failed
            continue
        rec = run_folder.read_record(p)
        if rec is None:
            failed[p.name] = "unreadable failure record"
        else:
            failed[rec.get("url", p.name)] = rec.get("reason", "?")
    counts = folder_view.shard_counts(run, list(records), list(failed_records))  # the ones `status` prints
    stale = folder_view.stale_success(out, list(records), list(failed_records))
    if stale:
        problems.append(f"{stale}: rerun `embedpipe embed` with the same shards to redo them")
    return problems, {"shards_verified": len(records), "rows": rows, "findings": findings,
                      "pending_without_record": pending,
                      "failed_records": sorted(p.name for p in failed_records.values()), "failed": failed,
                      "shards_expected": counts["shards_expected"],
                      "shards_not_done": counts["failed"] + counts["pending"]}


def _against_run(f: Path, info: Any, fp: dict[str, Any]) -> list[str]:
    """A file's recorded model and precision must be the folder's (``run.json``): an edit to either breaks that."""
    meta = info.metadata
    if meta is None or not fp:
        return []
    mine = {**meta.identity.to_dict(), "precision": meta.precision}
    differ = [k for k in (*ModelIdentity.COMPARED, "precision")
              if fp.get(k) is not None and mine.get(k) is not None and fp[k] != mine[k]]
    return [f"{f}: its {k} is {mine[k]!r}, {run_folder.RUN_JSON} records {fp[k]!r} (one of them was edited; rerun "
            "embed with --overwrite to remake the folder)" for k in differ]


def _copies(unvouched: list[Path], done_urls: set[str]) -> list[str]:
    """Files no done record vouches for that hold rows of a done shard: a stray copy, which every reader of
    ``embeddings/`` (pyarrow, pandas, autofaiss) sees as duplicates. Others are pending (a shard in progress)."""
    out = []
    for f in unvouched:
        try:
            shards = set(pq.read_table(f, columns=["shard"]).column("shard").unique().to_pylist())
        except Exception:  # noqa: BLE001  unreadable: not a copy of anything
            continue
        copied = sorted(shards & done_urls)
        if copied:
            out.append(f"{f}: no done record vouches for it, and it holds rows of the done shard {copied[0]} (a "
                       "stray copy: readers of embeddings/ see them twice); delete it")
    return out


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
    """Problems in an index folder: its files against the sizes and sha256 ``index.json`` records, FAISS count and
    dim vs ``index.json`` and ``ids.parquet``, and every id's (key, shard) against the row of the embedding file it
    names. Unreadable parts are problems, never tracebacks."""
    problems: list[str] = []
    findings: list[str] = []
    fix = "rebuild the index: `embedpipe index EMB_DIR --out INDEX_DIR --overwrite`"
    try:
        rec = layout.read_record(index_dir)
    except UserError as e:
        return [str(e)], {"vectors": None, "factory": None, "findings": []}
    for name, check in rec.files.items():
        f = index_dir / name
        if not f.is_file():
            problems.append(f"{f}: missing ({fix})")
        elif f.stat().st_size != check.get("bytes"):
            problems.append(f"{f}: {f.stat().st_size} bytes, {layout.META_FILE} says {check.get('bytes')} ({fix})")
        elif atomic.file_sha256(f) != check.get("sha256"):
            problems.append(f"{f}: its content changed since it was written (sha256 differs from "
                            f"{layout.META_FILE}) ({fix})")
    if not rec.files:
        findings.append(f"{layout.META_FILE} records no checksums of the index files (built by embedpipe before they "
                        "were recorded): byte changes to them cannot be detected; rebuild to record them")
    ntotal = None
    try:
        index = layout.load_faiss(index_dir, rec, mmap=True)
        ntotal = int(index.ntotal)
    except Exception as e:  # noqa: BLE001  a truncated or garbled file is exactly what verify reports
        problems.append(f"{index_dir / layout.INDEX_FILE}: FAISS cannot read it ({str(e).splitlines()[0][:200]}) ({fix})")
    else:
        if ntotal != rec.count:
            problems.append(f"{index_dir}: the FAISS index holds {ntotal} vectors, {layout.META_FILE} says {rec.count}")
        if index.d != rec.dim:
            problems.append(f"{index_dir}: the FAISS index has dim {index.d}, {layout.META_FILE} says {rec.dim}")
    try:
        ids = pq.read_table(index_dir / layout.IDS_FILE)
        ids = ids.select(list(layout.IDS_SCHEMA.names)).cast(layout.IDS_SCHEMA)
    except Exception as e:  # noqa: BLE001
        problems.append(f"{index_dir / layout.IDS_FILE}: unreadable or without the columns "
                        f"{list(layout.IDS_SCHEMA.names)} ({str(e).splitlines()[0][:200]}) ({fix})")
        return problems, {"vectors": ntotal, "factory": rec.factory, "findings": findings}
    if ntotal is not None and ids.num_rows != ntotal:
        problems.append(f"{index_dir}/{layout.IDS_FILE}: {ids.num_rows} rows for {ntotal} vectors")
    id_col = ids.column("id").to_numpy()
    if not np.array_equal(id_col, np.arange(len(id_col))):
        problems.append(f"{index_dir}/{layout.IDS_FILE}: ids are not 0..{len(id_col) - 1} in order ({fix})")
    dup = keys.duplicates(ids)
    if dup.repeated_rows:
        problems.append(f"{index_dir}/{layout.IDS_FILE}: {dup.repeated_text()}")
    if dup.shared_keys:
        findings.append(dup.shared_text())
    problems += _ids_against_files(index_dir, rec, ids, findings)
    return problems, {"vectors": ntotal, "factory": rec.factory, "findings": findings}


def _ids_against_files(index_dir: Path, rec: Any, ids: pa.Table, findings: list[str]) -> list[str]:
    """Each id's key and shard must be those of the embedding file row it names (swapped keys answer wrongly)."""
    where = {}
    for d in rec.source_dirs:  # the build's folder and each --update's
        base = store.embeddings_dir(d) if Path(d).exists() else None
        if base is None:
            findings.append(f"the embedding folder {d} is gone: ids from it are not checked against their rows")
            continue
        where.update({f.name: f for f in base.glob("*.parquet")})
    problems, wrong, first = [], 0, None
    for name in pc.unique(ids.column("file")).to_pylist():
        rows = ids.filter(pc.equal(ids.column("file"), name))
        f = where.get(name)
        if f is None:
            if len(where):
                problems.append(f"{index_dir}/{layout.IDS_FILE}: {rows.num_rows} id(s) name {name}, which no "
                                f"embedding folder of the index holds")
            continue
        entry = rec.shards.get(name)
        if entry is not None and entry.rows != rows.num_rows:
            problems.append(f"{index_dir}: {layout.META_FILE} says {name} has {entry.rows} rows, {layout.IDS_FILE} "
                            f"holds {rows.num_rows}")
        stored = pq.read_table(f, columns=["key", "shard"])
        at = rows.column("row").to_numpy()
        if len(at) and (at.max() >= stored.num_rows or at.min() < 0):
            problems.append(f"{index_dir}/{layout.IDS_FILE}: ids name rows past the end of {f}")
            continue
        bad = ~(np.asarray(stored.column("key").take(pa.array(at)).to_pylist(), object)
                == np.asarray(rows.column("key").to_pylist(), object))
        bad |= ~(np.asarray(stored.column("shard").take(pa.array(at)).to_pylist(), object)
                 == np.asarray(rows.column("shard").to_pylist(), object))
        if bad.any():
            wrong += int(bad.sum())
            i = int(np.argmax(bad))
            first = first or (f"id {rows.column('id')[i].as_py()} says {rows.column('key')[i].as_py()!r}, row "
                              f"{int(at[i])} of {name} holds {stored.column('key')[int(at[i])].as_py()!r}")
    if wrong:
        problems.append(f"{index_dir}/{layout.IDS_FILE}: {wrong} id(s) name another item than the embedding row "
                        f"they point to ({first}): searches would answer with the wrong keys; rebuild the index")
    return problems


def run_verify(path: str | Path) -> tuple[list[str], dict[str, Any]]:
    """Verify an embed output folder (has run.json) or an index folder (has index.json)."""
    p = Path(path)
    if run_folder.is_run_folder(p):
        return verify_embeddings(p)
    if (p / layout.META_FILE).is_file():
        return verify_index(p)
    raise UserError(f"{p} is neither an embed output folder ({run_folder.RUN_JSON}) nor an index folder "
                    f"({layout.META_FILE})")
