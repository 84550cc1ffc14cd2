"""Locks that cannot be fooled (issue 16, items 6-8), with real processes, a really full disk and real races.

6. A full disk while the lock is created leaves no lock (it is written whole under a temporary name, then
   linked into place); an empty lock an older version left is one clear line saying how to clear it.
7. Two processes racing for a dead owner's lock (or a shard's claim): exactly one takes it over.
8. Runs with different partitions on one folder at once: each shard is claimed, so embedded exactly once.
"""
from __future__ import annotations

import collections
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline import store
from pipeline.embedding.run_folder import RunState
from pipeline.errors import UserError
from pipeline.verify import run_verify
from campaign import cases
from shards import tiny_shards
import tiny


pytestmark = pytest.mark.slow  # real processes and files: in `make test`, not in the fast subset


HERE = Path(__file__).parent
ARGS = tiny.cli_args(batch_size=4)


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


# ---------------------------------------------------------------- 6. full disk


@pytest.mark.slow
def test_full_disk_while_creating_the_lock_leaves_no_lock_and_the_run_after_freeing_works(tmp_path, mount_namespace):
    shard = tiny_shards(tmp_path / "in", 1)[0]
    disk, kept = tmp_path / "disk", tmp_path / "kept"
    disk.mkdir()
    embed = f"{sys.executable} -m pipeline embed {shard} --out {disk}/out {' '.join(ARGS)}"
    r = mount_namespace(f"""
        mount -t tmpfs -o size=256k tmpfs {disk}
        dd if=/dev/zero of={disk}/fill bs=4k 2>/dev/null || true   # the disk is full
        {embed} && echo "full: rc=0" || echo "full: rc=$?"
        ls -A {disk}/out > {tmp_path}/after-full.txt
        rm {disk}/fill                                             # space freed
        {embed} && echo "freed: rc=0" || echo "freed: rc=$?"
        cp -a {disk}/out {kept}""")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "full: rc=2" in r.stdout and "freed: rc=0" in r.stdout, r.stdout + r.stderr[-2000:]
    failing = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(failing) == 1 and "No space left on device" in failing[0] and "Traceback" not in r.stderr
    assert (tmp_path / "after-full.txt").read_text().split() in ([], [".owners.lock"])  # no _lock, no temporary
    assert (kept / "_SUCCESS").is_file() and not (kept / "_lock").exists() and run_verify(kept)[0] == []


def test_empty_lock_left_by_an_older_version_is_one_clear_line(tmp_path, embedpipe):
    out = tmp_path / "out"
    out.mkdir()
    (out / "_lock").write_bytes(b"")  # what a full disk left before the lock was written whole
    code, _, err = embedpipe("embed", tmp_path / "none.tar", "--out", out, *ARGS)
    assert code == 2 and err.count("\n") == 1, err
    assert f"{out / '_lock'} is unreadable (empty:" in err and f"rm {out / '_lock'}" in err
    (out / "_lock").unlink()
    state = RunState(out)
    state.acquire()
    assert json.loads((out / "_lock").read_text())["pid"] == os.getpid()
    state.release()


def test_unreadable_claim_is_a_dead_owners_and_taken_over(tmp_path):
    state = RunState(tmp_path / "out")
    state.state_dir.mkdir(parents=True)
    (state.state_dir / "s.claim").write_bytes(b"")  # claims are not fsynced: a crashed machine can leave this
    ours, held, suspects = state.claim_shards({"u": "s"})
    assert ours == suspects == ["u"] and held == {}
    assert json.loads((state.state_dir / "s.claim").read_text())["pid"] == os.getpid()
    state.release_claims()
    assert not (state.state_dir / "s.claim").exists()


@pytest.mark.slow
@pytest.mark.parametrize("rerun", ["nothing to do", "other shards pending"])
def test_a_done_shards_claim_left_by_a_killed_run_is_removed_by_the_next_run(tmp_path, embedpipe, rerun):
    # killed between writing the done record and removing its claim: the shard is done, its claim a dead owner's
    shards = tiny_shards(tmp_path / "in", 2)
    out = tmp_path / "out"
    first = shards if rerun == "nothing to do" else shards[:1]
    assert embedpipe("embed", *first, "--out", out, *ARGS)[0] == 0
    state = RunState(out)
    done = sorted(p.name.removesuffix(".json") for p in state.state_dir.glob("*.json"))[0]
    claim = state.state_dir / f"{done}.claim"
    claim.write_text(json.dumps({**state.me, "pid": dead_pid(), "start": None, "token": "killed"}))
    assert embedpipe("embed", *shards, "--out", out, *ARGS)[0] == 0
    assert not claim.exists() and not list(out.rglob("*.claim"))


# ---------------------------------------------------------------- 7. racing for a dead owner's file


@pytest.mark.slow
@pytest.mark.parametrize("kind", cases(["lock"], ["claim"]))  # one owners.py code path for both
def test_two_processes_racing_for_a_dead_owners_file_exactly_one_wins(tmp_path, kind):
    dead = {"pid": dead_pid(), "host": socket.gethostname(), "since": 0, "task": None}
    for attempt in range(6):
        out = tmp_path / f"out{attempt}"
        owned = out / "_lock" if kind == "lock" else out / "_state" / "s.claim"
        owned.parent.mkdir(parents=True)
        owned.write_text(json.dumps(dead))
        go = tmp_path / f"go{attempt}"
        racers = [subprocess.Popen([sys.executable, str(HERE / "contender.py"), kind, str(out), str(go), "0.3"],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
        for p in racers:
            assert p.stdout.readline().strip() == "ready"
        go.touch()
        said = {p.pid: p.communicate(timeout=60)[0].strip() for p in racers}
        assert sorted(s.split(":")[0] for s in said.values()) == ["lost", "won"], said
        winner = next(pid for pid, s in said.items() if s == "won")
        assert json.loads(owned.read_text())["pid"] == winner
        lost = next(s for s in said.values() if s != "won")
        assert (f"in use by another embedpipe run (pid {winner} " if kind == "lock" else f"held by pid {winner}") in lost


def test_lock_of_a_reused_pid_is_stale_and_a_live_owner_is_refused(tmp_path):
    me = RunState(tmp_path / "a").me
    (tmp_path / "a").mkdir()
    # pid 1 is alive here, but not the process that wrote the lock: it started at another time
    (tmp_path / "a" / "_lock").write_text(json.dumps({**me, "pid": 1, "start": "1", "token": "x"}))
    RunState(tmp_path / "a").acquire()
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "_lock").write_text(json.dumps({**me, "pid": os.getppid(), "start": None, "token": "y"}))
    with pytest.raises(UserError, match=f"in use by another embedpipe run .pid {os.getppid()} on"):
        RunState(tmp_path / "b").acquire()


# ---------------------------------------------------------------- 8. overlapping partitions at once


@pytest.mark.slow
def test_runs_with_three_different_partitions_at_once_embed_each_shard_exactly_once(tmp_path):
    shards = tiny_shards(tmp_path / "in", 6)
    out, tally = tmp_path / "out", tmp_path / "tally.txt"
    env = {**os.environ, "EMBEDPIPE_TALLY": str(tally), "EMBEDPIPE_TALLY_PAUSE": "1"}
    parts = [[], ["--rank", "0", "--world-size", "2"], ["--rank", "0", "--world-size", "3"]]
    runs = [subprocess.Popen([sys.executable, str(HERE / "tally.py"), "embed", *shards, "--out", str(out), *ARGS, *p],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for p in parts]
    said = [r.communicate(timeout=600) for r in runs]
    assert [r.returncode for r in runs] == [0, 0, 0], [e[-2000:] for _, e in said]
    assert all("Traceback" not in e for _, e in said)
    commits = collections.Counter(line.split()[1] for line in tally.read_text().splitlines())
    assert sorted(commits) == sorted(shards) and set(commits.values()) == {1}, commits  # none embedded twice
    assert any("being embedded by another run" in o for o, _ in said), "the runs did not overlap"
    batch = store.read_all(out)
    assert len(batch.keys) == len(set(batch.keys)) == 18 and run_verify(out)[0] == []
    assert (out / "_SUCCESS").is_file() and not list(out.rglob("*.claim")) and not list(out.glob("_lock*"))
