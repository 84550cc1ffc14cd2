"""The Python API: real functions in ``__all__``, callable any number of times, useful reprs, the README example runs."""
from __future__ import annotations

import importlib
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import pipeline

from index_data import clustered
from index_data import write_shards as write_vectors
from probe_fixtures import blobs
from probe_fixtures import write_shards as write_labelled
import tiny

README = Path(__file__).resolve().parent.parent / "README.md"
TINY = tiny.options()


def test_dir_lists_the_public_api_and_each_entry_has_an_example():
    assert set(pipeline.__all__) <= set(dir(pipeline))
    for name in pipeline.__all__:
        if name != "__version__":
            fn = getattr(pipeline, name)
            assert callable(fn) and "Example:" in fn.__doc__, name
    assert re.fullmatch(r"\d+\.\d+\.\d+", pipeline.__version__)


def test_embed_is_a_function_every_time(digits_shards, tmp_path):
    first = pipeline.embed([str(digits_shards[0])], tmp_path / "a", **TINY)
    importlib.import_module("pipeline.embedding.runner")  # importing the stage must not replace the function

    second = pipeline.embed([str(digits_shards[1])], tmp_path / "b", **TINY)
    again = pipeline.embed([str(digits_shards[1])], tmp_path / "b", **TINY)  # resumes: nothing left to do
    assert callable(pipeline.embed) and pipeline.embed.__module__ == "pipeline"
    assert (first.embedded, second.embedded, again.embedded, again.shards_skipped) == (100, 100, 0, 1)
    assert repr(first).startswith("EmbedSummary(embedded 100 samples (0 skipped) from 1/1 shards")
    rows = pipeline.load_embeddings(tmp_path / "b", columns=["json"])
    assert len(rows) == 100 and rows.embeddings.shape == (100, 512) and set(rows.extra) == {"json"}
    assert repr(rows).startswith("Batch(100 rows, dim 512")


def test_index_search_and_reprs(tmp_path):
    x = clustered(600, 16)
    write_vectors(tmp_path / "emb", x)
    report = pipeline.build_index(tmp_path / "emb", tmp_path / "idx", kind="flat")
    assert (report.factory, report.count, report.recall_at_10) == ("Flat", 600, 1.0)
    assert repr(report) == f"IndexReport({str(tmp_path / 'idx')!r}: Flat, 600 vectors, recall@10 1.000)"
    again = pipeline.build_index(tmp_path / "emb", tmp_path / "idx", update=True)  # nothing new: same index
    assert again.count == 600
    idx = pipeline.open_index(tmp_path / "idx")
    assert repr(idx).startswith(f"Index({str(tmp_path / 'idx')!r}: Flat, 600 vectors of dim 16, model synthetic")
    res = idx.search(x[:3], k=2)
    assert res.keys[0][0] == "shard-000000_00000" and res.ids.shape == (3, 2)
    assert repr(res) == "SearchResult(3 queries, 6 hits; None -> 'shard-000000_00000')"
    assert idx.search_keys(["shard-000000_00000"], k=2).keys[0][0] != "shard-000000_00000"  # itself excluded


def test_train_probe_and_load_probe(tmp_path):
    x, y = blobs(300, d=8, c=3, spread=0.3)
    write_labelled(tmp_path / "emb", x, y)
    probe = pipeline.train_probe(tmp_path / "emb", tmp_path / "probe", weight_decays=[1e-4, 1e-2])
    assert probe.top1 > 0.9 and probe.classes == ["0", "1", "2"]
    assert re.fullmatch(r"ProbeReport\('.*probe': top-1 \d+\.\d\d% on \d+ val rows, 3 classes, lbfgs wd=0\.0(001|1)\)",
                        repr(probe)), repr(probe)
    head = pipeline.load_probe(tmp_path / "probe")
    assert repr(head) == "Head(3 classes [0, 1, 2] on dim 8 features of test:blobs)"
    classes, prob = head.predict(x)
    assert np.mean(classes == y) > 0.9 and ((prob > 0) & (prob <= 1)).all()


def readme_python_example() -> str:
    text = README.read_text()
    section = text.split("## Python API", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) == 1
    return blocks[0]


@pytest.mark.slow
def test_readme_python_example_runs(tmp_path):
    """The README's example, as written, with the real pretrained default backbone, in a fresh interpreter."""
    out = subprocess.run([sys.executable, "-c", readme_python_example()], cwd=tmp_path, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.splitlines()
    assert lines[0].startswith("EmbedSummary(embedded 300 samples (0 skipped) from 3/3 shards (0 already done, 0 failed)")
    assert lines[1] == "IndexReport('run-index': Flat, 300 vectors, recall@10 1.000)"
    assert lines[2].startswith("{'rank': 1, 'key': 'digits_")
    top1 = float(re.match(r"ProbeReport\('run-probe': top-1 (\d+\.\d+)%, top-5 [\d.]+% on 60 val rows, 10 classes",
                          lines[3]).group(1))
    assert top1 > 80  # pretrained features separate digits (the demo measures ~95% on all 1797)
    assert (tmp_path / "run" / "_SUCCESS").is_file() and (tmp_path / "run-probe" / "head.pt").is_file()
