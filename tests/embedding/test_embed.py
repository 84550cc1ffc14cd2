"""The embed stage end to end on real tar shards: output contract, equivalences, resume, faults."""
import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner

from pipeline import store
from pipeline.cli import cli
from pipeline.embedding.runner import embed
from pipeline.errors import UserError
from pipeline.model.backbones import load_backbone, with_input_size
from pipeline.model.compile import build_extractor
from pipeline.model.decoders.cpu import decode_one
from pipeline.model.deprecations import torchscript_calls
from campaign import cases
from shards import UNDECODABLE, jpeg_bytes, read_tar, sample_image, write_tar
import tiny

FAST = tiny.options(batch_size=32, compile=None, workers=None)


def rows(out: Path) -> dict[str, tuple]:
    """Every row of an output folder keyed by (shard, key)."""
    b = store.read_all(out)
    return {(s, k): (i, lab, e) for s, k, i, lab, e in zip(b.shards, b.keys, b.indices, b.labels, b.embeddings)}


@pytest.fixture(scope="module")
def digits_run(digits_shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("digits-out")
    summary = embed([str(p) for p in digits_shards], out, workers=2, out_dtype="float32",
                    cache_dir=str(out / "cache"), **FAST)
    return out, summary


def test_output_contract(digits_run, digits_shards):
    out, summary = digits_run
    assert summary.failed == {} and summary.embedded == 300 and summary.shards_done == 3
    assert sorted(p.name for p in (out / "embeddings").iterdir()) == [f"{p.stem}.parquet" for p in digits_shards]
    assert (out / "_SUCCESS").is_file() and (out / "run.json").is_file()
    table = pq.read_table(out / "embeddings" / f"{digits_shards[0].stem}.parquet")
    assert table.column_names == ["key", "shard", "index", "label", "embedding", "json"]
    assert str(table.schema.field("embedding").type) == "fixed_size_list<element: float>[512]"
    samples = read_tar(digits_shards[0])
    assert table.column("key").to_pylist() == [s["__key__"] for s in samples]
    assert table.column("index").to_pylist() == list(range(len(samples)))
    assert table.column("label").to_pylist() == [int(s["cls"]) for s in samples]
    assert table.column("json").to_pylist() == [s["json"].decode() for s in samples]
    emb = store.embedding_matrix(table.column("embedding"))
    assert np.allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    meta = store.read_metadata(out / "embeddings" / f"{digits_shards[0].stem}.parquet")
    assert {"model", "weights", "weights_sha256", "dim", "dtype", "precision", "compile", "preprocess", "version"} <= set(meta.to_dict())
    assert meta.dim == 512 and meta.compile == "torchscript" and meta.identity.preprocess["input_size"] == 64
    record = json.loads((out / "_state" / f"{digits_shards[0].stem}.json").read_text())
    assert record["seen"] == record["embedded"] == len(samples) and record["skipped"] == []


def test_torchscript_embeddings_equal_eager_fp32(digits_run, digits_shards):
    out, _ = digits_run
    bb = with_input_size(load_backbone("torchvision:resnet18", "none"), 64)
    eager = build_extractor(bb, "cpu", "fp32", "eager")
    samples = read_tar(digits_shards[1])
    x = torch.stack([decode_one(s["jpg"], bb.preprocess) for s in samples])
    ref = torch.nn.functional.normalize(eager(x), dim=1).numpy()
    got = store.embedding_matrix(pq.read_table(out / "embeddings" / f"{digits_shards[1].stem}.parquet").column("embedding"))
    cos = (ref * got).sum(1)
    assert cos.min() >= 0.9999, cos.min()


def test_one_shard_many_workers_gives_same_rows(digits_run, digits_shards, tmp_path):
    out, _ = digits_run
    embed([str(digits_shards[0])], tmp_path, workers=0, compile="eager", out_dtype="float32", **FAST)
    single = rows(tmp_path)
    full = rows(out)
    assert single.keys() <= full.keys()
    for k, (i, lab, e) in single.items():
        assert full[k][:2] == (i, lab) and np.allclose(full[k][2], e, atol=1e-4)


@pytest.mark.slow
def test_bf16_close_to_fp32_on_real_photos(photo_shards, tmp_path):
    a = embed([str(p) for p in photo_shards], tmp_path / "fp32", precision="fp32", compile="eager", quiet=True, workers=0)
    b = embed([str(p) for p in photo_shards], tmp_path / "bf16", precision="bf16", compile="eager", quiet=True, workers=0)
    ra, rb = rows(tmp_path / "fp32"), rows(tmp_path / "bf16")
    assert a.embedded == b.embedded == len(ra) == len(rb) > 0
    cos = np.array([float(ra[k][2] @ rb[k][2]) for k in ra])
    print(f"bf16 vs fp32, default backbone, {len(cos)} real photos: min cosine {cos.min():.4f}, mean {cos.mean():.4f}")
    assert cos.min() >= 0.99


@pytest.mark.slow
@pytest.mark.parametrize("crash_at", cases([], [40, 150, 290]))  # campaign only: tests/faults kills at random points
def test_crash_mid_shard_then_resume_equals_clean_run(digits_shards, digits_run, tmp_path, crash_at):
    clean, _ = digits_run
    args = [sys.executable, "-m", "pipeline", "embed", *map(str, digits_shards), "--out", str(tmp_path),
            *tiny.cli_args(out_dtype="float32", batch_size=32, workers=2, compile=None), "--cache-dir", str(clean / "cache")]
    crashed = subprocess.run(args, env={**os.environ, "EMBEDPIPE_CRASH_AT": str(crash_at)}, capture_output=True)
    assert crashed.returncode == -9, crashed.stderr.decode()[-2000:]
    done_before = sorted(p.name for p in (tmp_path / "_state").glob("*.json")) if (tmp_path / "_state").exists() else []
    assert len(done_before) < 3 and not (tmp_path / "_SUCCESS").exists()
    resumed = subprocess.run(args, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"({len(done_before)} already done, 0 failed)" in resumed.stdout
    got, want = rows(tmp_path), rows(clean)
    assert got.keys() == want.keys() and len(store.read_all(tmp_path).keys) == 300
    for k in want:
        assert np.allclose(got[k][2], want[k][2], atol=1e-4)
    assert not list(tmp_path.rglob("*.tmp")) and not (tmp_path / "_lock").exists()


def test_faults_are_recorded_and_good_samples_embedded(fault_shard, tmp_path):
    shards = tmp_path / "in"
    write_tar(shards / "mixed-000000.tar", [{"__key__": "good_a", "jpg": jpeg_bytes(sample_image())},
                                            {"__key__": "no_image", "txt": "caption only"},
                                            {"__key__": "good_a", "jpg": jpeg_bytes(sample_image(seed=1))},
                                            {"__key__": "good_b", "png": jpeg_bytes(sample_image(seed=2))}])
    good = (shards / "mixed-000000.tar").read_bytes()
    (shards / "truncated-000000.tar").write_bytes(good[: len(good) // 2 + 100])
    (shards / "empty-000000.tar").write_bytes(b"\0" * 1024)  # a valid tar with no members
    (shards / "corrupt-000000.tar.gz").write_bytes(gzip.compress(good)[:200])
    urls = [str(fault_shard), *(str(p) for p in sorted(shards.iterdir())), str(tmp_path / "missing.tar")]
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["embed", *urls, "--out", str(out), *tiny.cli_args(workers=None)])
    assert result.exit_code == 1, result.output
    st = json.loads((out / "_state" / "faults-000000.json").read_text())
    skipped = {s["key"]: s["reason"] for s in st["skipped"]}
    assert set(skipped) == {f"bad_{n}" for n in UNDECODABLE}
    total = len(read_tar(fault_shard))
    assert st["seen"] == total and st["embedded"] == total - len(UNDECODABLE)
    mixed = json.loads((out / "_state" / "mixed-000000.json").read_text())
    assert mixed["embedded"] == 2 and {s["key"] for s in mixed["skipped"]} == {"no_image", "good_a"}
    assert "no image field" in " ".join(s["reason"] for s in mixed["skipped"])
    assert json.loads((out / "_state" / "empty-000000.json").read_text())["embedded"] == 0
    failed = {json.loads(p.read_text())["url"] for p in (out / "_state").glob("*.failed.json")}
    assert failed == {str(shards / "truncated-000000.tar"), str(shards / "corrupt-000000.tar.gz"),
                      str(tmp_path / "missing.tar")}
    assert not (out / "embeddings" / "truncated-000000.parquet").exists() and not (out / "_SUCCESS").exists()
    # Fix the inputs: the rerun retries only the failed shards, then the folder is complete.
    (shards / "truncated-000000.tar").write_bytes(good)
    (shards / "corrupt-000000.tar.gz").write_bytes(gzip.compress(good))
    write_tar(tmp_path / "missing.tar", [{"__key__": "late", "jpg": jpeg_bytes(sample_image())}])
    again = CliRunner().invoke(cli, ["embed", *urls, "--out", str(out), *tiny.cli_args(workers=None)])
    assert again.exit_code == 0, again.output
    assert "3 already done" in again.output and (out / "_SUCCESS").is_file()
    assert not list((out / "_state").glob("*.failed.json"))


def test_img2dataset_layout_and_gzip(tmp_path):
    samples = [{"__key__": f"00000{i}", "jpg": jpeg_bytes(sample_image(seed=i)), "txt": f"a photo {i}",
                "json": {"url": f"http://x/{i}.jpg", "width": 64}} for i in range(5)]
    write_tar(tmp_path / "00000.tar", samples)
    (tmp_path / "00001.tar.gz").write_bytes(gzip.compress((tmp_path / "00000.tar").read_bytes()))
    embed([str(tmp_path / "00000.tar"), str(tmp_path / "00001.tar.gz")], tmp_path / "out", compile="eager", **FAST)
    t = pq.read_table(tmp_path / "out" / "embeddings" / "00001.parquet")
    assert t.column("txt").to_pylist() == [f"a photo {i}" for i in range(5)]
    assert t.column("label").null_count == 5 and json.loads(t.column("json")[0].as_py())["width"] == 64


def test_different_model_refused_unless_overwrite(digits_shards, tmp_path):
    one = [str(digits_shards[0])]
    embed(one, tmp_path, compile="eager", **FAST)
    with pytest.raises(UserError, match="different settings.*--overwrite"):
        embed(one, tmp_path, compile="eager", **{**FAST, "input_size": 96})
    s = embed(one, tmp_path, compile="eager", overwrite=True, **{**FAST, "input_size": 96})
    assert s.embedded == 100 and store.read_metadata(next((tmp_path / "embeddings").iterdir())).identity.preprocess["input_size"] == 96


def test_live_lock_refuses_and_stale_lock_is_taken_over(digits_shards, tmp_path):
    tmp_path.mkdir(exist_ok=True)
    import socket
    (tmp_path / "_lock").write_text(json.dumps({"pid": os.getppid(), "host": socket.gethostname()}))
    with pytest.raises(UserError, match="in use by another embedpipe run"):
        embed([str(digits_shards[0])], tmp_path, compile="eager", **FAST)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / "_lock").write_text(json.dumps({"pid": int(dead.stdout), "host": socket.gethostname()}))
    assert embed([str(digits_shards[0])], tmp_path, compile="eager", **FAST).embedded == 100


def test_config_file_under_cli_flags_and_unknown_keys(digits_shards, tmp_path):
    cfg = tmp_path / "job.toml"
    cfg.write_text('[embed]\nmodel = "torchvision:resnet18"\nweights = "none"\ninput-size = 64\n'
                   'compile = "eager"\nbatch_size = 7\nquiet = true\n')
    out = tmp_path / "out"
    r = CliRunner().invoke(cli, ["--config", str(cfg), "embed", str(digits_shards[0]), "--out", str(out),
                                 "--batch-size", "50"])
    assert r.exit_code == 0, r.output
    run = json.loads((out / "run.json").read_text())["config"]
    assert run["batch_size"] == 50 and run["input_size"] == 64 and run["compile"] == "eager"
    cfg.write_text('[embed]\nbatchsize = 7\n')
    r = CliRunner().invoke(cli, ["--config", str(cfg), "embed", str(digits_shards[0]), "--out", str(out)])
    assert r.exit_code != 0 and "unknown key 'batchsize'" in str(r.exception or r.output)


def test_status_command(digits_run):
    out, _ = digits_run
    r = CliRunner().invoke(cli, ["status", str(out), "--json"])
    st = json.loads(r.output)
    assert r.exit_code == 0 and st["done"] == 3 and st["embedded"] == 300 and st["success"]


def test_sigterm_releases_the_lock(digits_shards, tmp_path):
    import signal
    import time

    args = [sys.executable, "-m", "pipeline", "embed", *map(str, digits_shards), "--out", str(tmp_path),
            *tiny.cli_args(batch_size=1)]
    proc = subprocess.Popen(args, stderr=subprocess.PIPE)
    deadline = time.time() + 60
    while not (tmp_path / "_lock").exists() and time.time() < deadline:
        time.sleep(0.2)
    assert (tmp_path / "_lock").exists()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 128 + signal.SIGTERM
    assert not (tmp_path / "_lock").exists() and not list(tmp_path.rglob("*.tmp"))


def test_failing_urls_fail_their_shard_and_zero_byte_member_is_skipped(tmp_path):
    write_tar(tmp_path / "z.tar", [{"__key__": "zero", "jpg": b""}, {"__key__": "ok", "jpg": jpeg_bytes(sample_image())}])
    urls = [str(tmp_path / "z.tar"), "pipe:false", "http://127.0.0.1:9/x.tar"]
    s = embed(urls, tmp_path / "out", **{**FAST, "compile": "eager"})
    assert set(s.failed) == {"pipe:false", "http://127.0.0.1:9/x.tar"}
    assert "exit" in s.failed["pipe:false"]
    rec = json.loads((tmp_path / "out" / "_state" / "z.json").read_text())
    assert rec["embedded"] == 1 and rec["skipped"] == [{"key": "zero", "reason": "empty image (0 bytes)"}]


def test_disk_full_fails_the_shard_leaves_nothing_and_rerun_completes(digits_shards, tmp_path, monkeypatch):
    import errno

    from pipeline import store as store_mod

    real = store_mod.pq.write_table
    calls = []

    def full_disk(table, where, **kw):
        calls.append(where)
        if len(calls) == 1:  # the first shard: half a file, then the disk is full
            Path(where).write_bytes(b"PAR1 partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(table, where, **kw)

    monkeypatch.setattr(store_mod.pq, "write_table", full_disk)
    shards = [str(p) for p in digits_shards[:2]]
    s = embed(shards, tmp_path, **{**FAST, "compile": "eager", "workers": 0})
    assert list(s.failed) == [shards[0]] and "No space left" in s.failed[shards[0]] and s.shards_done == 1
    assert not (tmp_path / "embeddings" / f"{digits_shards[0].stem}.parquet").exists()
    assert not list(tmp_path.rglob("*.tmp")) and not (tmp_path / "_SUCCESS").exists()
    again = embed(shards, tmp_path, **{**FAST, "compile": "eager", "workers": 0})
    assert again.failed == {} and again.shards_done == 1 and again.shards_skipped == 1
    assert (tmp_path / "_SUCCESS").is_file()


def test_ranks_share_one_folder_and_the_last_marks_success(digits_shards, tmp_path, monkeypatch):
    shards = [str(p) for p in digits_shards]
    first = embed(shards, tmp_path, rank=0, world_size=2, **{**FAST, "compile": "eager", "workers": 0})
    assert first.shards_total == 2 and first.shards_done == 2 and not (tmp_path / "_SUCCESS").exists()
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "1")
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "2")
    second = embed(shards, tmp_path, **{**FAST, "compile": "eager", "workers": 0})  # rank from the environment
    assert second.shards_total == 1 and second.shards_done == 1 and (tmp_path / "_SUCCESS").is_file()
    assert len(store.read_all(tmp_path).keys) == 300


def test_hostile_keys_and_shard_names_never_become_paths(tmp_path):
    from pipeline.embedding.shards import stem

    assert stem("/data/../../etc/passwd.tar") == "passwd" and stem("/d/..hidden.tar") == "hidden"
    assert "/" not in stem("pipe:curl -s 'http://h/a/../b c.tar'")
    shard = write_tar(tmp_path / "in" / "..evil.tar", [{"__key__": "../../outside", "jpg": jpeg_bytes(sample_image())},
                                                       {"__key__": "/abs/key", "jpg": jpeg_bytes(sample_image(seed=3))}])
    out = tmp_path / "out"
    s = embed([str(shard)], out, **{**FAST, "compile": "eager", "workers": 0})
    assert s.embedded == 2
    written = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file() and "in" not in p.parts)
    assert written == ["out/_SUCCESS", "out/_state/evil.json", "out/embeddings/evil.parquet", "out/run.json"]
    assert sorted(store.read_all(out).keys) == ["../../outside", "/abs/key"]


@pytest.mark.slow
def test_torchscript_file_runs_in_bf16(digits_shards, tmp_path):
    bb = load_backbone("torchvision:resnet18", "none")
    path = tmp_path / "feat.pt"
    with torchscript_calls():
        torch.jit.save(torch.jit.trace(bb.model, torch.zeros(1, 3, 64, 64)), str(path))
    outs = {}
    for precision in ("fp32", "bf16"):
        r = CliRunner().invoke(cli, ["embed", str(digits_shards[0]), "--out", str(tmp_path / precision), "--model",
                                     f"torchscript:{path}", "--input-size", "64", "--precision", precision,
                                     "--workers", "0", "-q"])
        assert r.exit_code == 0, r.output
        outs[precision] = store.read_all(tmp_path / precision).embeddings
    cos = (outs["fp32"] * outs["bf16"]).sum(1)  # both L2-normalised
    assert cos.min() > 0.99
