"""Disk full while committing (a failing writer): the shard fails, nothing partial remains, the rerun completes it."""
from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from pipeline import atomic, store
from pipeline.cli import cli
from pipeline.verify import run_verify
import tiny


pytestmark = pytest.mark.slow  # real processes and files: in `make test`, not in the fast subset


ARGS = tiny.cli_args()


def full_disk_for(monkeypatch, victim: str, what: str) -> list[str]:
    """Make every write whose file name starts with ``victim`` fail with ENOSPC after writing half of it.

    ``what``: "all" (Parquet file, done record and failure record alike) or "record" (only the done record).
    """
    hits: list[str] = []
    real_table, real_bytes = store.pq.write_table, atomic.write_bytes

    def table(t, where, **kw):
        if what == "all" and Path(where).name.startswith(f".{victim}."):
            hits.append(str(where))
            Path(where).write_bytes(b"PAR1 half a file")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_table(t, where, **kw)

    def raw(path, data):
        name = Path(path).name
        if name.startswith(victim) and (what == "all" or name == f"{victim}.json"):
            hits.append(str(path))
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real_bytes(path, data)

    monkeypatch.setattr(store.pq, "write_table", table)
    monkeypatch.setattr(atomic, "write_bytes", raw)
    return hits


@pytest.mark.parametrize("what", ["all", "record"])
def test_disk_full_fails_only_that_shard_and_rerun_completes_it(digits_shards, tmp_path, monkeypatch, what):
    shards = [str(p) for p in digits_shards[:2]]
    victim = digits_shards[0].stem
    out = tmp_path / "out"
    hits = full_disk_for(monkeypatch, victim, what)
    r = CliRunner().invoke(cli, ["embed", *shards, "--out", str(out), *ARGS])
    assert r.exit_code == 1, r.output
    assert hits and "1 shard(s) failed" in r.output and f"  {shards[0]}: write failed:" in r.output
    assert "No space left on device" in r.output
    assert not list(out.rglob("*.tmp")) and not (out / "_SUCCESS").exists() and not (out / "_lock").exists()
    assert not (out / "_state" / f"{victim}.json").exists()  # never a done record for an incomplete shard
    assert (out / "_state" / f"{digits_shards[1].stem}.json").is_file()  # the other shard is done
    failed = out / "_state" / f"{victim}.failed.json"
    if what == "all":  # nothing at all could be written for it: not even its failure record
        assert not (out / "embeddings" / f"{victim}.parquet").exists() and not failed.exists()
    else:  # the Parquet file is complete but has no record: pending (redone next run), not corrupt
        assert "No space left" in json.loads(failed.read_text())["reason"]
        problems, info = run_verify(out)
        assert problems == [] and info["pending_without_record"] == [victim]
    monkeypatch.undo()  # space freed
    again = CliRunner().invoke(cli, ["embed", *shards, "--out", str(out), *ARGS])
    assert again.exit_code == 0, again.output
    assert "(1 already done, 0 failed)" in again.output and (out / "_SUCCESS").is_file()
    assert not list((out / "_state").glob("*.failed.json")) and run_verify(out)[0] == []
    assert len(store.read_all(out).keys) == 200
