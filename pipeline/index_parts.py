"""Building an IVF index in parts (Slurm array / several machines) and merging them with FAISS's on-disk merge.

Layout: ``<OUT>.parts/`` holds ``trained.faiss`` (the shared trained, empty index), ``train.json`` (the shard list
with each shard's first id, so parts need no coordination), ``queries.npz`` (held-out tuning queries) and one
``part-IIIII-of-NNNNN/`` per part (``index.faiss``, ``ids.parquet``, ``gt.npz`` with the exact k-NN of the queries
over that part). ``embedpipe index-merge OUT`` merges every part into the index directory ``OUT``.
"""
from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pyarrow.parquet as pq

from . import __version__
from . import index as ix
from . import index_tune as tune
from . import store
from .errors import UserError

log = logging.getLogger(__name__)

TRAIN_JSON, QUERIES, GT, PART_JSON = "train.json", "queries.npz", "gt.npz", "part.json"


def parts_dir(out: str | Path) -> Path:
    """Where ``--train-only`` and ``--part I`` write, next to the final index directory."""
    out = Path(out)
    return out.parent / f"{out.name}.parts"


def part_name(part: int, parts: int) -> str:
    return f"part-{part:05d}-of-{parts:05d}"


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def part_files(files: Sequence[Path], part: int, parts: int) -> list[Path]:
    """Part ``part`` of ``parts``: a contiguous, disjoint block of the sorted shard list (pure function)."""
    bounds = np.linspace(0, len(files), parts + 1).round().astype(int)
    return list(files[bounds[part]:bounds[part + 1]])


def train_only(cfg: ix.IndexConfig, budget: int) -> dict[str, Any]:
    """Train the shared quantizer (and PQ) on a sample; write it, the shard→id table and the tuning queries."""
    import faiss

    pdir = parts_dir(cfg.out)
    if pdir.exists() and not cfg.overwrite:
        raise UserError(f"{pdir} already exists (a trained quantizer, maybe parts); pass --overwrite to retrain "
                        "(every part must then be rebuilt)")
    src = ix.scan(cfg.emb_dir)
    n = src.rows
    if n == 0:
        raise UserError(f"embedding shards under {cfg.emb_dir} hold no rows")
    choice = tune.choose(cfg.kind, n, src.dim, budget, cfg.factory, parts=True)
    index = ix.new_index(choice.factory, src.dim, cfg.metric)
    if faiss.try_extract_index_ivf(index) is None:
        raise UserError(f"--parts needs an IVF index; {choice.factory!r} has no inverted lists (try IVF...,Flat)")
    t0 = time.perf_counter()
    q_rows, t_rows = tune.pick_rows(n, ix.n_queries(cfg, n), choice.train_size, cfg.seed)
    queries, sample = tune.read_rows(src.files, [q_rows, t_rows], cfg.batch_size)
    train_s = ix.train(index, sample, choice.factory)
    shards, _ = ix.shard_table(src, 0)
    with ix.locked(pdir), ix.staged(pdir) as tmp:
        faiss.write_index(index, str(tmp / ix.TRAINED))
        np.savez(tmp / QUERIES, queries=queries, rows=q_rows)
        record = {"factory": choice.factory, "kind": choice.kind, "reason": choice.reason, "metric": cfg.metric,
                  "dim": src.dim, "dtype": src.dtype, "count": n, "shards": shards, "embedding_meta": src.meta,
                  "memory_budget": budget, "estimated_bytes": choice.estimated_bytes, "train_seconds": round(train_s, 2),
                  "source": str(Path(cfg.emb_dir).resolve()), "trained_sha256": sha256(tmp / ix.TRAINED),
                  "config": asdict(cfg)}
        store.atomic_write_json(tmp / TRAIN_JSON, record)
    summary = (f"trained {choice.factory} on {len(sample)} vectors in {time.perf_counter() - t0:.1f}s; wrote {pdir}; "
               f"next: `embedpipe index {cfg.emb_dir} --out {cfg.out} --parts N --part I` for I in 0..N-1")
    return {"path": str(pdir), "summary": summary, "meta": record}


def read_train(pdir: Path) -> dict[str, Any]:
    f = pdir / TRAIN_JSON
    if not f.is_file():
        out = pdir.name[: -len(".parts")]
        raise UserError(f"{f} is missing; train the shared quantizer first: "
                        f"`embedpipe index EMB_DIR --out {pdir.parent / out} --train-only`")
    return json.loads(f.read_text())


def build_part(cfg: ix.IndexConfig) -> dict[str, Any]:
    """Add one disjoint block of shards to a copy of the trained index; write it as ``part-I-of-N``."""
    import faiss

    pdir = parts_dir(cfg.out)
    rec = read_train(pdir)
    src = ix.scan(cfg.emb_dir)
    have = {f.name: i.rows for f, i in zip(src.files, src.infos)}
    want = {name: s["rows"] for name, s in rec["shards"].items()}
    if have != want:
        extra = sorted(set(have) - set(want))[:3]
        missing = sorted(set(want) - set(have))[:3]
        raise UserError(f"the shards under {cfg.emb_dir} differ from those the quantizer in {pdir} was trained for "
                        f"(new: {extra}, missing: {missing}); rerun --train-only --overwrite, or use --update later")
    files = part_files(src.files, cfg.part, cfg.parts)
    index = faiss.read_index(str(pdir / ix.TRAINED))
    q = np.load(pdir / QUERIES)
    gt = tune.ExactKnn(q["queries"], 10 + tune.GT_EXTRA, rec["metric"])
    name = part_name(cfg.part, cfg.parts)
    t0 = time.perf_counter()
    with ix.locked(pdir / name), ix.staged(pdir / name) as tmp:
        ids_out = ix.IdsWriter(tmp / ix.IDS_FILE)
        starts = [rec["shards"][f.name]["id_start"] for f in files]
        added = ix.add_shards(index, files, starts, ids_out, gt, cfg.batch_size, desc=name)
        ids_out.close()
        faiss.write_index(index, str(tmp / ix.INDEX_FILE))
        d, i = gt.result()
        np.savez(tmp / GT, D=d, I=i)
        store.atomic_write_json(tmp / PART_JSON, {"part": cfg.part, "parts": cfg.parts, "files": [f.name for f in files],
                                                  "count": added, "trained_sha256": rec["trained_sha256"]})
    summary = (f"built {name}: {added} vectors from {len(files)} shards in {time.perf_counter() - t0:.1f}s; "
               f"merge with `embedpipe index-merge {cfg.out}` once all {cfg.parts} parts are done")
    return {"path": str(pdir / name), "summary": summary, "meta": {"count": added, "files": [f.name for f in files]}}


def run_merge(out: str | Path, target_recall: float = 0.95, overwrite: bool = False) -> dict[str, Any]:
    """Merge every part in ``<out>.parts`` into the index directory ``out`` (on-disk inverted lists), then tune.

    Example:
        >>> run_merge("runs/a/index")  # doctest: +SKIP
    """
    import faiss

    out = Path(out)
    pdir = parts_dir(out)
    rec = read_train(pdir)
    if out.exists() and not overwrite:
        raise UserError(f"{out} already exists; pass --overwrite to replace it with the merged parts")
    found = sorted(p for p in pdir.glob("part-*-of-*") if (p / PART_JSON).is_file())
    if not found:
        raise UserError(f"no parts in {pdir}; build them with `embedpipe index EMB_DIR --out {out} --parts N --part I`")
    infos = [json.loads((p / PART_JSON).read_text()) for p in found]
    n_parts = {i["parts"] for i in infos}
    if len(n_parts) != 1:
        raise UserError(f"{pdir} mixes parts of different --parts counts {sorted(n_parts)}; delete the stale ones")
    (total,) = n_parts
    missing = sorted(set(range(total)) - {i["part"] for i in infos})
    if missing:
        raise UserError(f"{pdir}: parts {missing} of {total} are missing; build them with --parts {total} --part I")
    stale = [p.name for p, i in zip(found, infos) if i["trained_sha256"] != rec["trained_sha256"]]
    if stale:
        raise UserError(f"{stale} were built against another trained quantizer than {pdir / ix.TRAINED}; rebuild them")
    q = np.load(pdir / QUERIES)
    gts = [np.load(p / GT) for p in found]
    _, gt_ids = tune.merge_knn([(g["D"], g["I"]) for g in gts], 10 + tune.GT_EXTRA, rec["metric"])
    t0 = time.perf_counter()
    with ix.locked(out), ix.staged(out) as tmp:
        index = merge_into(faiss.read_index(str(pdir / ix.TRAINED)), [p / ix.INDEX_FILE for p in found],
                           tmp / ix.IVFDATA)
        shutil.copyfile(pdir / ix.TRAINED, tmp / ix.TRAINED)
        ids_out = ix.IdsWriter(tmp / ix.IDS_FILE)
        for p in found:
            ids_out.copy_from(p / ix.IDS_FILE)
        ids_out.close()
        check_dense(tmp / ix.IDS_FILE, index.ntotal)
        tuning = tune.tune(index, q["queries"], q["rows"], gt_ids, target_recall)
        faiss.write_index(index, str(tmp / ix.INDEX_FILE))
        meta = merged_meta(rec, index.ntotal, tuning, total)
        meta["build_seconds"] = {"merge_and_tune": round(time.perf_counter() - t0, 2)}
        store.atomic_write_json(tmp / ix.META_FILE, meta)
    return ix.result(out, meta)


def merged_meta(rec: dict[str, Any], count: int, tuning: tune.Tuning, parts: int) -> dict[str, Any]:
    meta = {
        "format": ix.FORMAT, "version": __version__, "created": ix.now(), "updated": ix.now(),
        "factory": rec["factory"], "kind": rec["kind"], "reason": rec["reason"], "metric": rec["metric"],
        "dim": rec["dim"], "count": count, "next_id": count, "embedding_dtype": rec["dtype"],
        "search_params": tuning.params, "tuning": tuning.to_dict(), "tuned_at_count": count,
        "memory_budget": rec["memory_budget"], "estimated_bytes": rec["estimated_bytes"], "on_disk": True,
        "source": rec["source"], "shards": rec["shards"], "embedding_meta": rec["embedding_meta"],
        "config": rec["config"], "merged_from_parts": parts,
    }
    return meta


def merge_into(trained: Any, sources: Sequence[Any], ivfdata: Path) -> Any:
    """FAISS's on-disk merge: the inverted lists of ``sources`` (index files or in-memory invlists) → ``ivfdata``.

    Sources are memory-mapped, so the parts together may exceed RAM. Ids are kept as added (no shifting).
    """
    import faiss

    keep = []  # indexes whose inverted lists we borrow must outlive the merge
    vec = faiss.InvertedListsPtrVector()
    for s in sources:
        if isinstance(s, (str, Path)):
            idx = faiss.read_index(str(s), faiss.IO_FLAG_MMAP)
        else:
            idx = s
        ivf = faiss.extract_index_ivf(idx)
        keep.append(idx)
        vec.push_back(ivf.invlists)
    ivf_out = faiss.extract_index_ivf(trained)
    if trained.ntotal != 0:
        raise RuntimeError("merge target must be the empty trained index")
    invlists = faiss.OnDiskInvertedLists(ivf_out.nlist, ivf_out.code_size, str(ivfdata))
    ntotal = invlists.merge_from_multiple(vec.data(), vec.size(), False)
    trained.ntotal = ivf_out.ntotal = ntotal
    ivf_out.replace_invlists(invlists, True)
    invlists.this.disown()
    del keep
    return trained


def check_dense(ids_path: Path, ntotal: int) -> None:
    """ids.parquet must hold ids 0..ntotal-1 in order (row i is id i): search relies on it."""
    ids = pq.read_table(ids_path, columns=["id"]).column("id").to_numpy()
    if len(ids) != ntotal or (len(ids) and not np.array_equal(ids, np.arange(ntotal))):
        raise RuntimeError(f"{ids_path}: ids are not 0..{ntotal - 1} in order ({len(ids)} rows)")
