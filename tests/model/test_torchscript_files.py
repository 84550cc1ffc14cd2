"""`torchscript:` files end to end (issue 26, item 6): a traced file with fp32 steps baked in runs in bf16 (under
autocast) or is refused before any shard; a file's preprocessing set on the command line is recorded and rebuilt."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

from pipeline import store

import tiny


@pytest.fixture
def embedpipe(capsys):
    """The `embedpipe` entry point run in this process: ``(exit status, stdout, stderr)``, errors mapped to codes."""

    def run(*args):
        from pipeline.cli import main

        capsys.readouterr()
        with pytest.raises(SystemExit) as e:
            main([str(a) for a in args])
        out, err = capsys.readouterr()
        return e.value.code, out, err

    return run


def embed_args(shard: Path, out: Path, model: Path, *more: str) -> list[str]:
    return ["embed", shard, "--out", out, "--model", f"torchscript:{model}", "--input-size", "64", "--workers", "0",
            "--out-dtype", "float32", *more]


def test_traced_file_with_fp32_steps_runs_in_bf16_under_autocast(digits_shards, tmp_path, embedpipe, caplog):
    """open_clip's ViT-B/32 tower traced in fp32 died in bf16 with "mixed dtype (CPU)" on every shard (exit 1):
    its casts to the input's dtype were baked in as float32 steps. Now it runs under autocast, whatever --compile
    asks (tracing the wrapper would drop the autocast), and its vectors match fp32's within cosine 0.99."""
    model = tiny.save_fp32_cast_tower(tmp_path / "traced.pt", "trace")
    vectors = {}
    for precision in ("fp32", "bf16"):
        with caplog.at_level(logging.INFO, logger="pipeline"):
            code, out, err = embedpipe(*embed_args(digits_shards[0], tmp_path / precision, model, "--precision",
                                                   precision))
        assert code == 0, err
        vectors[precision] = store.read_all(tmp_path / precision).embeddings
    meta = store.shard_info(store.list_shards(tmp_path / "bf16")[0]).metadata
    assert (meta.precision, meta.compile) == ("bf16", "eager")  # as it ran: the file as loaded, under autocast
    cos = (vectors["fp32"] * vectors["bf16"]).sum(1)  # both L2-normalised
    assert len(cos) == 100 and cos.min() > 0.99
    assert not np.array_equal(vectors["fp32"], vectors["bf16"])  # bf16 really ran (not fp32 under another name)
    said = " ".join(r.getMessage() for r in caplog.records)
    assert "autocast" in said and "mixed dtype" in said


def test_scripted_file_still_runs_cast_whole_in_bf16(digits_shards, tmp_path, embedpipe, caplog):
    model = tiny.save_fp32_cast_tower(tmp_path / "scripted.pt", "script")
    with caplog.at_level(logging.INFO, logger="pipeline"):
        code, out, err = embedpipe(*embed_args(digits_shards[0], tmp_path / "bf16", model, "--precision", "bf16"))
    assert code == 0, err
    meta = store.shard_info(store.list_shards(tmp_path / "bf16")[0]).metadata
    assert (meta.precision, meta.compile) == ("bf16", "torchscript")
    said = " ".join(r.getMessage() for r in caplog.records)
    assert "whole module runs in bf16" in said and "autocast" not in said


def test_file_no_reduced_precision_runs_is_refused_before_any_shard(digits_shards, tmp_path, embedpipe):
    """A step that fails in bf16 both cast whole and under autocast: exit 2 with the fixes named, before any shard
    is read (it was exit 1, the code of a failed shard, after a traceback per shard)."""
    model = tiny.save_fp32_cast_tower(tmp_path / "lerp.pt", "trace", lerp=True)
    code, out, err = embedpipe(*embed_args(digits_shards[0], tmp_path / "bf16", model, "--precision", "bf16"))
    assert code == 2, err
    assert "cannot run in bf16" in err and "--precision fp32" in err and "torch.jit.script" in err
    assert "expected dtype float" in err  # what torch said, in one line
    assert "Traceback" not in err
    assert not (tmp_path / "bf16" / "embeddings").exists() or not list((tmp_path / "bf16" / "embeddings").iterdir())
    code, out, err = embedpipe(*embed_args(digits_shards[0], tmp_path / "fp32", model, "--precision", "fp32"))
    assert code == 0, err  # the same file in fp32 is fine
