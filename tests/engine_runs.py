"""Runs of the same shards by different engines agree: the summaries' counts, the committed files (names, file
metadata, rows in shard order, embeddings to ``atol``) and their done records (counts and skipped keys; durations
differ). Used by tests/embedding/test_devices.py and test_ray.py."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from pipeline import store
from pipeline.embedding.folder_view import committed_files
from pipeline.embedding.run_folder import records


def counts(summary) -> dict:
    """What a run's summary says it did, without its timings."""
    return {k: getattr(summary, k) for k in ("shards_total", "shards_done", "shards_skipped", "shards_elsewhere",
                                            "embedded", "skipped", "failed")}


def done_records(out: Path) -> dict[str, dict]:
    fields = ("url", "output", "seen", "embedded", "skipped", "warnings")
    return {name: {k: json.loads(p.read_text())[k] for k in fields} for name, p in records(out)[0].items()}


def assert_same_run(a, a_out: Path, b, b_out: Path, atol: float = 1e-5) -> None:
    """``a`` and ``b`` (EmbedSummary) of runs into ``a_out`` and ``b_out`` did and committed the same."""
    assert counts(a) == counts(b)
    files_a, files_b = committed_files(a_out), committed_files(b_out)
    assert [f.name for f in files_a] == [f.name for f in files_b] and files_a
    for fa, fb in zip(files_a, files_b):
        assert store.read_metadata(fa) == store.read_metadata(fb), fa.name
        ra, rb = store.read_all(a_out, files=[fa]), store.read_all(b_out, files=[fb])
        assert (ra.keys, ra.shards, ra.labels) == (rb.keys, rb.shards, rb.labels), fa.name
        assert np.array_equal(ra.indices, rb.indices), fa.name
        assert np.allclose(ra.embeddings, rb.embeddings, atol=atol), fa.name
    assert done_records(a_out) == done_records(b_out)
    assert (Path(a_out) / "_SUCCESS").is_file() and (Path(b_out) / "_SUCCESS").is_file()
