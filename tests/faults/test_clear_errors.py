"""Errors of the environment are one clear line, never a traceback (issue 16, "Clear errors").

``--out`` under a regular file and on a read-only filesystem (a real read-only tmpfs) exit 2 with one line
saying how to fix it; SIGTERM to a run's whole process group, decode workers included (as Slurm sends it),
exits 143 without a DataLoader traceback and with the lock and claims released.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from shards import tiny_shards
import tiny


pytestmark = pytest.mark.slow  # real processes and files: in `make test`, not in the fast subset


ARGS = tiny.cli_args(batch_size=4, workers=None)


def test_out_under_a_regular_file_is_one_line(tmp_path, embedpipe):
    (tmp_path / "file").write_text("not a folder")
    shards = tiny_shards(tmp_path / "in", 1)
    code, _, err = embedpipe("embed", *shards, "--out", tmp_path / "file" / "out", *ARGS)
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert "Not a directory" in err and "pass an --out folder on a writable filesystem" in err


@pytest.mark.slow
def test_out_on_a_read_only_filesystem_is_one_line(tmp_path, mount_namespace):
    shards = tiny_shards(tmp_path / "in", 1)
    ro = tmp_path / "ro"
    ro.mkdir()
    r = mount_namespace(f"mount -t tmpfs -o ro tmpfs {ro}\n"
                        f"{sys.executable} -m pipeline embed {shards[0]} --out {ro}/out {' '.join(ARGS)}")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert r.stderr.count("\n") == 1 and "Read-only file system" in r.stderr, r.stderr


@pytest.mark.slow
def test_sigterm_to_the_process_group_with_decode_workers_exits_143_without_a_traceback(tmp_path):
    shards = tiny_shards(tmp_path / "in", 4, per=200)  # each decode worker owns whole shards: two more to go
    out = tmp_path / "out"
    run = subprocess.Popen([sys.executable, "-m", "pipeline", "embed", *shards, "--out", str(out), *ARGS,
                            "--workers", "2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           start_new_session=True)
    try:
        while not (out / "_state" / "p-00.json").exists() and run.poll() is None:
            time.sleep(0.05)  # until the first shard is committed: decode workers are busy with the next ones
        os.killpg(run.pid, signal.SIGTERM)  # as Slurm and `timeout --kill-after` stop a job step
        _, err = run.communicate(timeout=120)
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
    assert run.returncode == 143, err[-3000:]
    assert "Traceback" not in err and "DataLoader worker" not in err, err[-3000:]
    assert not (out / "_lock").exists() and not list(out.rglob("*.claim"))
