"""A sample that kills the process natively (issue 16, item 1): contained, never a run that dies on every rerun.

The real crashing input: an RGB PNG whose scanline filter byte is 7, which libpng (through torchvision's
``decode_image``) answers with a segfault. embed now decodes PNGs with PIL, which refuses it with an error;
``libpng.py`` puts the old decoder back to check the process-level guard against a real native crash: a run
that died leaves its claims, and the next run embeds those shards in a child process, retries the one that
kills it once, then records it failed (as a crash, so later runs contain it too) while the others complete.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline import store
from pipeline.verify import run_verify
from campaign import FULL
from shards import bad_filter_png_bytes, jpeg_bytes, sample_image, write_tar
import tiny

pytestmark = pytest.mark.slow  # real processes that segfault, and reruns

LIBPNG = str(Path(__file__).with_name("libpng.py"))
ARGS = tiny.cli_args(out_dtype="float32", batch_size=4, workers=None)


def good(i: int) -> dict:
    return {"__key__": f"good_{i}", "jpg": jpeg_bytes(sample_image((48, 40), seed=300 + i)), "cls": i}


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("native-crash")
    return [str(write_tar(root / "ok-0.tar", [good(i) for i in range(3)])),
            str(write_tar(root / "crash.tar", [good(3), {"__key__": "bad", "png": bad_filter_png_bytes()}, good(4)])),
            str(write_tar(root / "ok-1.tar", [good(i) for i in range(5, 8)]))]


def embed(out: Path, shards: list[str], *extra: str, libpng: bool = True) -> subprocess.CompletedProcess:
    cmd = [LIBPNG] if libpng else ["-m", "pipeline"]
    return subprocess.run([sys.executable, *cmd, "embed", *shards, "--out", str(out), *ARGS, *extra],
                          capture_output=True, text=True, timeout=600)


def keys(out: Path, name: str) -> list[str]:
    return store.read_all(out, files=[out / "embeddings" / f"{name}.parquet"]).keys


def assert_contained(r: subprocess.CompletedProcess, out: Path, how: str) -> None:
    assert r.returncode == 1, r.stderr[-3000:]
    assert "Traceback" not in r.stderr and "1 shard(s) failed" in r.stderr
    failed = json.loads((out / "_state" / "crash.failed.json").read_text())
    assert failed["crashed"] is True and how in failed["reason"]
    assert keys(out, "ok-0") == ["good_0", "good_1", "good_2"] and keys(out, "ok-1") == ["good_5", "good_6", "good_7"]
    assert not (out / "embeddings" / "crash.parquet").exists() and not (out / "_SUCCESS").exists()
    assert not (out / "_lock").exists() and not list(out.rglob("*.claim")) and run_verify(out)[0] == []


def test_native_crash_is_contained_by_the_next_run_and_never_again_aborts_one(shards, tmp_path):
    out = tmp_path / "out"
    first = embed(out, shards, "--workers", "0")  # decoding in this process: the segfault kills the run
    assert first.returncode == -11, first.stderr[-2000:]
    assert "libpng error: bad adaptive filter value" in first.stderr
    assert list((out / "_state").glob("crash.claim"))  # left: its owner is dead, so the next run contains it
    for attempt in range(2 if FULL else 1):  # the rerun, and every later one, embeds the shard in a child process
        again = embed(out, shards, "--workers", "0")
        assert_contained(again, out, "killed by SIGSEGV")
        assert "died twice" in json.loads((out / "_state" / "crash.failed.json").read_text())["reason"]
    if not FULL:  # the campaign also reruns with embedpipe's own PNG decoder (test_hostile_samples covers it)
        return
    fixed = embed(out, shards, "--workers", "0", libpng=False)  # embedpipe's own decoder: PIL refuses the PNG
    assert fixed.returncode == 0, fixed.stderr[-2000:]
    rec = json.loads((out / "_state" / "crash.json").read_text())
    assert keys(out, "crash") == ["good_3", "good_4"] and [s["key"] for s in rec["skipped"]] == ["bad"]
    assert "cannot decode PNG" in rec["skipped"][0]["reason"]
    assert (out / "_SUCCESS").is_file() and not (out / "_state" / "crash.failed.json").exists()


def test_decode_worker_killed_by_the_sample_is_contained_in_the_same_run(shards, tmp_path):
    out = tmp_path / "out"
    r = embed(out, shards, "--workers", "2")  # the segfault kills a DataLoader worker, not the run
    assert "DataLoader worker" in r.stderr and "go to a child process" in r.stderr
    assert_contained(r, out, "killed by SIGSEGV")


def test_a_worker_dying_mid_handoff_is_a_log_line_not_a_traceback(capsys, caplog):
    """multiprocessing's descriptor-sharing thread reports a worker that died mid-handoff through
    sys.excepthook; that one error is a warning line, any other thread's error still a traceback."""
    import sys
    import threading

    from pipeline.embedding.worker import quiet_worker_handoffs

    before = sys.excepthook
    quiet_worker_handoffs()
    quiet_worker_handoffs()  # once only: not wrapped twice

    def report(error):
        try:
            raise error
        except Exception:
            sys.excepthook(*sys.exc_info())

    def _serve():  # named like multiprocessing.resource_sharer's thread target
        report(ConnectionResetError(104, "Connection reset by peer"))

    try:
        for target in (_serve, lambda: report(ValueError("a real bug"))):
            t = threading.Thread(target=target)
            t.start()
            t.join()
    finally:
        sys.excepthook = before
    err = capsys.readouterr().err
    (traceback,) = err.split("Traceback")[1:]  # one traceback: the other thread's error
    assert "ValueError: a real bug" in traceback and "ConnectionResetError" not in traceback
    assert "a decode worker died while handing over a batch (ConnectionResetError" in caplog.text
