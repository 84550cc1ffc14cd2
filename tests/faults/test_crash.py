"""kill -9 at random and at chosen points of embed, index and probe; the rerun always gives the clean result.

Crashes come from ``EMBEDPIPE_CRASH_AT=N`` (SIGKILL once N samples are embedded) and from killer.py (SIGKILL at
the K-th call of a function such as ``os.replace``: before/after a file is renamed into place), in a real
``python -m pipeline`` subprocess. After every crash the folder is consistent (``verify`` finds nothing wrong);
after the rerun it holds exactly the clean run's rows, no ``*.tmp`` file, no staging directory and no lock.
"""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from pipeline import atomic, store
from pipeline.verify import run_verify
from campaign import cases
from shards import jpeg_bytes, sample_image, write_tar
import tiny

pytestmark = pytest.mark.slow  # a crash campaign: real processes killed and rerun

KILLER = str(Path(__file__).with_name("killer.py"))
OPTIONS = tiny.options(out_dtype="float32", batch_size=8)
EMBED = tiny.cli_args(out_dtype="float32", batch_size=8)
SHARDS, PER_SHARD = 3, 20


def run(target: str, k: int, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, KILLER, target, str(k), *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=120)


def leftovers(folder: Path) -> list[str]:
    """Temporary files, staging/old directories and locks anywhere under ``folder``."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")
                  if p.name.endswith(".tmp") or ".tmp-" in p.name or ".old-" in p.name or p.name == "_lock"
                  or p.name == atomic.JOURNAL)


def rows(out: Path) -> dict[tuple[str, str], np.ndarray]:
    b = store.read_all(out)
    assert len(b.keys) == len(set(zip(b.shards, b.keys))), "duplicate rows"
    return dict(zip(zip(b.shards, b.keys), b.embeddings))


@pytest.fixture(scope="module")
def small_shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("crash-in")
    return [str(write_tar(root / f"c-{s:06d}.tar",
                          [{"__key__": f"s{s}_{i:03d}", "jpg": jpeg_bytes(sample_image((40, 32), seed=s * 100 + i)),
                            "cls": i % 4} for i in range(PER_SHARD)])) for s in range(SHARDS)]


@pytest.fixture(scope="module")
def clean(small_shards, tmp_path_factory):
    from pipeline.embedding.runner import embed

    out = tmp_path_factory.mktemp("crash-clean") / "emb"
    embed(small_shards, out, **OPTIONS)
    return out


@pytest.mark.parametrize("seed", cases([], [1, 2, 3, 4, 5]))  # campaign only; targeted kill points run always
def test_embed_killed_at_random_points_then_rerun_equals_clean(small_shards, clean, tmp_path, seed):
    rng = random.Random(seed)
    out = tmp_path / "emb"
    total = SHARDS * PER_SHARD
    if seed != 2:  # kill once N samples are embedded (mid-shard, at a random N)
        at = rng.randrange(1, total)
        first = run("os.replace", 0, "embed", *small_shards, "--out", out, *EMBED, env={"EMBEDPIPE_CRASH_AT": str(at)})
        assert first.returncode == -9, first.stderr[-2000:]
        assert run_verify(out)[0] == [] and not (out / "_SUCCESS").exists()
    if seed != 1:  # kill just before the K-th rename into place (run.json, a Parquet file, a done record, _SUCCESS)
        k = rng.randrange(1, 2 * SHARDS + 2)
        second = run("os.replace", k, "embed", *small_shards, "--out", out, *EMBED)
        assert second.returncode in (-9, 0), second.stderr[-2000:]  # 0: fewer renames left than K
        assert run_verify(out)[0] == []
    again = run("os.replace", 0, "embed", *small_shards, "--out", out, *EMBED)
    assert again.returncode == 0, again.stderr[-2000:]
    got, want = rows(out), rows(clean)
    assert got.keys() == want.keys() and len(got) == total
    assert max(float(np.abs(got[k] - want[k]).max()) for k in want) < 1e-5
    assert (out / "_SUCCESS").is_file() and leftovers(out) == []
    assert run_verify(out)[0] == []


def test_killed_between_parquet_and_done_record_redoes_the_shard(small_shards, tmp_path):
    out = tmp_path / "emb"
    # renames: run.json, then shard 0's Parquet file, then its done record: die before that third one (a fixed
    # micro-batch: a measured one is first written to the user's cache, one rename more when it is not there yet)
    r = run("os.replace", 3, "embed", small_shards[0], "--out", out, *EMBED, "--micro-batch", "4")
    assert r.returncode == -9
    name = Path(small_shards[0]).stem
    assert (out / "embeddings" / f"{name}.parquet").is_file() and not (out / "_state" / f"{name}.json").exists()
    assert [p.name for p in (out / "_state").glob(f".{name}.json.*.tmp")]  # the record's temporary file
    problems, info = run_verify(out)
    assert problems == [] and info["pending_without_record"] == [name]  # pending, not corrupt
    from pipeline.embedding.runner import embed

    again = embed(small_shards[:1], out, **OPTIONS)
    assert again.shards_done == 1 and again.shards_skipped == 0  # redone, not taken as done
    assert leftovers(out) == [] and json.loads((out / "_state" / f"{name}.json").read_text())["embedded"] == PER_SHARD


# ------------------------------------------------------------------ index


@pytest.fixture(scope="module")
def index_input(tmp_path_factory):
    from index_data import clustered, write_shards

    root = tmp_path_factory.mktemp("crash-index")
    x = clustered(3000, 32, seed=5)
    write_shards(root / "emb", x[:2000], shards=2)
    build(root / "emb", root / "clean", kind="ivf")
    return root, x


def build(emb: Path, idx: Path, **kw) -> dict:
    from pipeline.index.build import run_index
    from pipeline.index.options import IndexConfig

    return run_index(IndexConfig(str(emb), out=str(idx), **kw))


def snapshot(idx: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(idx.iterdir())}


@pytest.mark.parametrize("point", ["faiss.write_index 1", "pipeline.atomic.exchange_dirs 1", "shutil.rmtree 1"])
def test_index_killed_while_rebuilding_keeps_the_old_or_puts_the_new(index_input, tmp_path, point):
    import shutil

    root, _ = index_input
    idx = tmp_path / "idx"
    shutil.copytree(root / "clean", idx)
    before = snapshot(idx)
    target, k = point.split()
    r = run(target, int(k), "index", root / "emb", "--out", idx, "--kind", "flat", "--overwrite")
    assert r.returncode == -9, r.stderr[-2000:]
    meta = json.loads((idx / "index.json").read_text())  # never absent, never half
    if meta["factory"].startswith("IVF"):
        assert snapshot(idx) == before
    else:
        assert meta["factory"] == "Flat" and point in ("pipeline.atomic.exchange_dirs 1", "shutil.rmtree 1")
    assert run_verify(idx)[0] == []
    build(root / "emb", idx, kind="flat", overwrite=True)  # the rerun (in-process: it cleans what the killed run left)
    assert json.loads((idx / "index.json").read_text())["factory"] == "Flat" and run_verify(idx)[0] == []
    assert leftovers(tmp_path) == []


def test_index_update_killed_then_rerun(index_input, tmp_path):
    import shutil

    from index_data import write_shards

    root, x = index_input
    emb, idx = tmp_path / "emb", tmp_path / "idx"
    shutil.copytree(root / "emb", emb)
    build(emb, idx, kind="ivf")
    before = snapshot(idx)
    write_shards(emb, x[2000:], shards=1, first=2)  # a new embedding shard arrives
    killed = run("faiss.write_index", 1, "index", emb, "--out", idx, "--update")
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert snapshot(idx) == before
    build(emb, idx, update=True)
    meta = json.loads((idx / "index.json").read_text())
    assert meta["count"] == 3000 and run_verify(idx)[0] == [] and leftovers(tmp_path) == []
    ids = pq.read_table(idx / "ids.parquet")
    assert ids.num_rows == 3000 and len(set(ids.column("key").to_pylist())) == 3000


# ------------------------------------------------------------------ probe


def probe_set(folder: Path) -> tuple[list, dict]:
    """The probe's files as a program reading them directly sees them (no load_head, no repair)."""
    head = torch.load(folder / "head.pt", weights_only=True)
    metrics = json.loads((folder / "metrics.json").read_text())
    assert (folder / "report.txt").read_text().strip()
    return [head["weight"].tolist(), head["bias"].tolist()], {k: metrics[k] for k in ("options", "top1", "confusion")}


def probe(emb: Path, out: Path, frac: float) -> None:
    from pipeline.probe.linear import run_probe
    from pipeline.probe.options import ProbeOptions

    run_probe(emb, out, ProbeOptions(val_fraction=frac))


def same(a: tuple, b: tuple) -> bool:
    return a[1] == b[1] and np.allclose(a[0][0], b[0][0], atol=1e-5) and np.allclose(a[0][1], b[0][1], atol=1e-5)


# Renames of a probe commit: head.pt, metrics.json, report.txt into the staging directory, then one exchange with
# the folder, then the old version's removal. Killed before the exchange: the old set; after it: the new one.
@pytest.mark.parametrize("point,after", [("os.replace 1", False), ("os.replace 3", False),
                                         ("pipeline.atomic.exchange_dirs 1", False), ("shutil.rmtree 1", True)])
def test_probe_killed_while_writing_leaves_old_or_new_complete_outputs(tmp_path, point, after):
    import shutil

    from probe_fixtures import blobs, write_shards

    emb = write_shards(tmp_path / "emb", *blobs(240, d=16, c=3))
    probe(emb, tmp_path / "old", 0.2)
    probe(emb, tmp_path / "new", 0.3)
    old, new = probe_set(tmp_path / "old"), probe_set(tmp_path / "new")
    assert old[1]["options"] != new[1]["options"]
    shutil.copytree(tmp_path / "old", tmp_path / "p")
    (tmp_path / "p" / "notes.txt").write_text("kept")  # a file of the user's in the probe folder
    target, k = point.split()
    killed = run(target, int(k), "probe", emb, "--val-fraction", "0.3", "--out", tmp_path / "p")
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert same(probe_set(tmp_path / "p"), new if after else old)  # read directly: all old or all new
    assert (tmp_path / "p" / "notes.txt").read_text() == "kept"
    probe(emb, tmp_path / "p", 0.3)
    assert same(probe_set(tmp_path / "p"), new) and (tmp_path / "p" / "notes.txt").read_text() == "kept"
    assert leftovers(tmp_path) == [] and not list(tmp_path.glob(".p.*-*"))
