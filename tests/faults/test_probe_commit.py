"""The probe's files are swapped in as one directory (issue 16, item 13; the kills are in test_crash.py).

Readers keep working: ``load_head`` reads the folder as before, an older version's folder (committed file by
file with a journal, even one killed mid-commit) still loads and is replaced whole, and files a user keeps in
the folder survive a new probe.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from probe_fixtures import blobs, write_shards

from pipeline import atomic
from pipeline.probe.head import load_head
from pipeline.probe.linear import run_probe
from pipeline.probe.options import ProbeOptions


pytestmark = pytest.mark.slow  # real processes and files: in `make test`, not in the fast subset


def probe(emb, out, frac: float, plots: bool = False) -> None:
    run_probe(emb, out, ProbeOptions(val_fraction=frac, plots=plots))


def test_new_probe_replaces_the_set_keeps_other_files_and_drops_a_stale_plot(tmp_path):
    emb = write_shards(tmp_path / "emb", *blobs(240, d=16, c=3))
    out = tmp_path / "p"
    probe(emb, out, 0.2, plots=True)
    assert (out / "confusion.png").is_file()
    (out / "classifier.pt").write_bytes(b"exported by the user")
    (out / "notes").mkdir()
    (out / "notes" / "a.txt").write_text("kept")
    probe(emb, out, 0.3)
    assert json.loads((out / "metrics.json").read_text())["options"]["val_fraction"] == 0.3
    assert not (out / "confusion.png").exists()  # it belonged to the old set
    assert (out / "classifier.pt").read_bytes() == b"exported by the user"
    assert (out / "notes" / "a.txt").read_text() == "kept"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".p.")) == [".p.lock"]


def test_folder_of_an_older_version_killed_mid_commit_still_loads_then_is_replaced(tmp_path):
    emb = write_shards(tmp_path / "emb", *blobs(240, d=16, c=3))
    out = tmp_path / "p"
    probe(emb, tmp_path / "a", 0.2)
    probe(emb, tmp_path / "b", 0.3)
    # What an older version left when killed after its journal (the commit point) but before the renames:
    out.mkdir()
    for name in ("head.pt", "metrics.json", "report.txt"):
        (out / name).write_bytes((tmp_path / "a" / name).read_bytes())
    plan = {}
    for name in ("head.pt", "metrics.json", "report.txt"):
        tmp = atomic.temp_beside(out / name)
        Path(tmp).write_bytes((tmp_path / "b" / name).read_bytes())
        plan[name] = tmp.rsplit("/", 1)[-1]
    (out / atomic.JOURNAL).write_text(json.dumps(plan))
    head = load_head(out)  # the journal is finished: head.pt and metrics.json agree
    assert torch.equal(head.weight, load_head(tmp_path / "b").weight)
    assert json.loads((out / "metrics.json").read_text())["options"]["val_fraction"] == 0.3
    probe(emb, out, 0.2)
    assert torch.equal(load_head(out).weight, load_head(tmp_path / "a").weight)
    assert sorted(p.name for p in out.iterdir()) == ["head.pt", "metrics.json", "report.txt"]
