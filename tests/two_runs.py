"""Two img2dataset-like runs that number keys alike (000000000, ...), embedded into one output folder."""
from __future__ import annotations

import shutil
from pathlib import Path

import tiny
from pipeline import embed
from pipeline.index.build import run_index
from pipeline.index.options import IndexConfig
from shards import jpeg_bytes, sample_image, write_tar

KEYS = [f"{i:09d}" for i in range(4)]  # img2dataset's numbering, the same in every run


def img2dataset_run(root: Path, seed: int) -> Path:
    """One output folder: shard 00000.tar with keys 000000000.. (different images per seed)."""
    write_tar(root / "00000.tar", [{"__key__": k, "jpg": jpeg_bytes(sample_image((40, 32), seed=seed + i))}
                                   for i, k in enumerate(KEYS)])
    return root


def embed_two_runs(root: Path) -> dict[str, Path]:
    """run1 embedded and indexed (``index-run1``, a copy in ``index-updated``), then run2 embedded into ``out``."""
    out = root / "out"
    embed([str(img2dataset_run(root / "run1", 0))], str(out), **tiny.options())
    run_index(IndexConfig(str(out), str(root / "index-run1"), kind="flat"))
    shutil.copytree(root / "index-run1", root / "index-updated")
    embed([str(img2dataset_run(root / "run2", 100))], str(out), **tiny.options())
    return {"root": root, "out": out, "run1_file": out / "embeddings" / "00000.parquet"}
