"""``embedpipe index --update``: add the shards an index has not seen yet, without retraining, atomically."""
from __future__ import annotations

import logging
import shutil
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .. import atomic, store
from . import keys
from ..embedding.folder_view import committed_files
from ..errors import UserError
from .add import add_shards, shard_table
from .layout import IDS_FILE, INDEX_FILE, IVFDATA, TRAINED, IdsWriter, load_faiss, read_record, result, write_record
from .merge import merge_into
from .options import IndexConfig
from .record import IndexRecord, now

log = logging.getLogger(__name__)


def new_shards(record: IndexRecord, emb_dir: str | Path) -> list[Path]:
    """Shards under ``emb_dir`` that ``index.json`` does not list (already-indexed ones can never be re-added);
    in a run folder, only those its done records vouch for (garbage is refused, never indexed)."""
    files = committed_files(emb_dir) or store.list_shards(emb_dir)
    fresh = []
    for f in files:
        seen = record.shards.get(f.name)
        if seen is None:
            fresh.append(f)
        elif store.shard_info(f).rows != seen.rows:
            log.warning("%s changed since it was indexed (%d rows then, %d now); it is not re-added: rebuild the "
                        "index to pick up the change", f, seen.rows, store.shard_info(f).rows)
    return fresh


def check_new_rows(index_dir: Path, files: list[Path]) -> None:
    """No row may be indexed twice. A row is its (shard, key): a new shard that reuses indexed keys (a second
    img2dataset run) is new items, added; the same shard url with the same keys is a re-embedded copy, refused."""
    new = keys.file_rows(files)
    dup = keys.duplicates(new)
    if dup.repeated_rows:
        raise UserError(f"new shards under {files[0].parent}: {dup.repeated_text()}; remove the copy, or rebuild "
                        "the index with --overwrite")
    ids = pq.read_table(index_dir / IDS_FILE, columns=["shard", "key", "file"])  # read once, for both checks
    indexed = ids.filter(pc.is_in(ids.column("shard"), value_set=pc.unique(new.column("shard"))))
    if indexed.num_rows:
        again = new.join(indexed, ["shard", "key"], join_type="inner")
        if again.num_rows:
            shard, key, was = (again.column(c)[0].as_py() for c in ("shard", "key", "file"))
            raise UserError(f"{again.num_rows} row(s) of the new shards are already in the index {index_dir} (e.g. key "
                            f"{key!r} of {shard}, indexed from {was}): the same shard embedded again under another "
                            "name, or rewritten in place since it was indexed. Remove the copy, or rebuild the index with "
                            "--overwrite")
    shared = keys.duplicates(pa.concat_tables([new, ids.select(["shard", "key"])]))
    if shared.shared_keys:
        log.info("%s", shared.shared_text())


def kept_target(cfg: IndexConfig, rec: IndexRecord) -> str:
    """What to say when ``--target-recall`` differs from the target the index was tuned at: ``--update`` keeps it.

    Retuning needs fresh queries and their exact neighbours among every indexed vector; a build measures them while it
    adds the vectors and keeps neither, so an update could only get them back by reading every indexed folder again.
    """
    recorded = rec.target_recall
    if cfg.target_recall is None or cfg.target_recall == recorded:
        return ""
    folders = len({*rec.source_dirs, str(Path(cfg.emb_dir).resolve())})
    msg = (f"--target-recall {cfg.target_recall} is not applied: --update keeps the search parameters tuned at the "
           f"recorded target {recorded}; to tune at {cfg.target_recall}, rebuild: `embedpipe index {cfg.emb_dir} --out "
           f"{cfg.out} --overwrite --target-recall {cfg.target_recall}`"
           + (" (or, built in parts: --train-only --overwrite, the parts, then index-merge --target-recall)"
              if rec.on_disk else "")
           + (f" (the index holds shards of {folders} embedding folders; a rebuild reads one)" if folders > 1 else ""))
    log.warning(msg)
    return msg


def update(cfg: IndexConfig) -> dict[str, Any]:
    """Add new shards to the index at ``cfg.out`` (same quantizer, same search parameters); all or nothing."""
    import faiss

    out = Path(cfg.out)
    with atomic.locked_dir(out):
        rec = read_record(out)
        note = kept_target(cfg, rec)
        files = new_shards(rec, cfg.emb_dir)
        if not files:
            res = result(out, rec, added=0)
            res["summary"] = f"nothing to add: all {len(rec.shards)} shards under {cfg.emb_dir} are in {out}"
            res["summary"] += f"; {note}" if note else ""
            return res
        src = store.scan(cfg.emb_dir, files)
        if src.dim != rec.dim:
            raise UserError(f"{src.files[0]} has dim {src.dim} but the index {out} holds dim {rec.dim}; "
                            "embed with the index's model, or build a separate index")
        if src.dtype != rec.embedding_dtype:
            raise UserError(f"mixed embedding dtypes: {src.files[0]} is {src.dtype}, the index {out} was built from "
                            f"{rec.embedding_dtype} shards; re-embed with --out-dtype {rec.embedding_dtype}")
        if rec.embedding_meta is not None and src.meta is not None:
            rec.embedding_meta.identity.check_same(src.meta.identity, str(src.files[0]),
                                                   "embed new shards with the index's model, or build a separate index")
        check_new_rows(out, files)
        t0 = time.perf_counter()
        shards, starts = shard_table(src, rec.next_id)
        with atomic.staged_dir(out) as tmp:  # a crash anywhere in here leaves the old index untouched
            ids_out = IdsWriter(tmp / IDS_FILE)
            ids_out.copy_from(out / IDS_FILE)
            if rec.on_disk:
                delta = faiss.read_index(str(out / TRAINED))
                added = add_shards(delta, src.files, starts, ids_out, None, cfg.batch_size)
                old = load_faiss(out, rec)  # on-disk lists stay on disk (mmapped by FAISS itself)
                index = merge_into(faiss.read_index(str(out / TRAINED)), [old, delta], tmp / IVFDATA)
                shutil.copyfile(out / TRAINED, tmp / TRAINED)
            else:
                index = load_faiss(out, rec)
                added = add_shards(index, src.files, starts, ids_out, None, cfg.batch_size)
            ids_out.close()
            faiss.write_index(index, str(tmp / INDEX_FILE))
            folder = str(Path(cfg.emb_dir).resolve())  # verify checks ids against every folder's keys
            rec = replace(
                rec, shards={**rec.shards, **shards}, count=int(index.ntotal), next_id=rec.next_id + added,
                updated=now(), sources=tuple(dict.fromkeys([*rec.source_dirs, folder])),
                updates=(*rec.updates, {"at": now(), "added": added, "shards": sorted(shards), "source": folder,
                                        "seconds": round(time.perf_counter() - t0, 2)}))
            if rec.count != rec.next_id:
                raise RuntimeError(f"index holds {rec.count} vectors but ids run to {rec.next_id}")
            rec = write_record(tmp, rec)
    res = result(out, rec, added=added)
    res["summary"] += f" (search parameters tuned at {rec.tuned_at_count} vectors kept)"
    res["summary"] += f"; {note}" if note else ""
    return res
