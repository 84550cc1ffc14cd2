"""Two runs on one output folder: the second refuses (exit 2, naming the owner); a killed owner's lock is taken over."""
from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline import store
from pipeline.embedding.runner import embed
import tiny

pytestmark = pytest.mark.slow  # real processes racing for one folder, one of them killed

KILLER = str(Path(__file__).with_name("killer.py"))
EMBED = tiny.cli_args(batch_size=64)


def test_second_run_refused_then_dead_owners_lock_taken_over(digits_shards, tmp_path, caplog):
    out = tmp_path / "emb"
    shards = [str(p) for p in digits_shards[:2]]
    # The first run holds the folder and hangs as it starts reading its first shard.
    first = subprocess.Popen([sys.executable, KILLER, "pipeline.embedding.tar.iter_tar_samples", "-1", "embed", *shards,
                              "--out", str(out), *EMBED], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 90
        while not (out / "_lock").exists() and time.time() < deadline and first.poll() is None:
            time.sleep(0.1)
        assert (out / "_lock").exists(), first.stderr.read().decode()[-2000:] if first.poll() is not None else "no lock"
        second = subprocess.run([sys.executable, "-m", "pipeline", "embed", *shards, "--out", str(out), *EMBED],
                                capture_output=True, text=True, timeout=120)
        assert second.returncode == 2
        assert f"in use by another embedpipe run (pid {first.pid} on {socket.gethostname()})" in second.stderr
        assert first.poll() is None  # the owner is untouched by the refused run
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=30)
    assert (out / "_lock").exists() and not list((out / "embeddings").glob("*.parquet"))
    with caplog.at_level(logging.WARNING, logger="pipeline.embedding.run_folder"):
        s = embed(shards, out, **tiny.options(batch_size=64))
    assert f"taking over the stale lock {out / '_lock'} of dead pid {first.pid}" in caplog.text
    assert s.failed == {} and s.shards_done == 2 and len(store.read_all(out).keys) == 200
    assert not (out / "_lock").exists() and not list(out.rglob("*.tmp")) and os.listdir(out / "_state")
