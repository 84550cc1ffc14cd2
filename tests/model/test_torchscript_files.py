"""`torchscript:` files end to end (issue 26, item 6): a traced file with fp32 steps baked in runs in bf16 (under
autocast) or is refused before any shard; a file's preprocessing set on the command line is recorded and rebuilt."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest

from pipeline import store

import tiny

pytestmark = pytest.mark.slow  # traced files embedded, devices workers: in `make test`, not in the fast subset


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


def test_devices_workers_refuse_such_a_file_in_one_line(digits_shards, tmp_path):
    """With --devices each worker prepares the model: the first refusal stops the run (exit 2, the message once),
    where each worker died with a traceback and was respawned to die again."""
    import os
    import subprocess
    import sys

    model = tiny.save_fp32_cast_tower(tmp_path / "lerp.pt", "trace", lerp=True)
    r = subprocess.run([sys.executable, "-m", "pipeline", *map(str, embed_args(digits_shards[0], tmp_path / "out", model,
                        "--precision", "bf16", "--devices", "cpu,cpu", "-q"))], capture_output=True, text=True,
                       timeout=300, env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])})
    assert r.returncode == 2, r.stderr
    assert r.stderr.count("cannot run in bf16") == 1 and "Traceback" not in r.stderr, r.stderr
    assert "died" not in r.stderr


CLIP_LIKE = {"input_size": 64, "crop_pct": 0.875, "interpolation": "bicubic", "mean": [0.48, 0.46, 0.41],
             "std": [0.27, 0.26, 0.28]}


def test_preprocess_on_the_command_line_is_used_recorded_and_rebuilt(digits_shards, tmp_path, embedpipe, caplog):
    """A `torchscript:` file without preprocess.json got ImageNet's settings with no way to say otherwise (issue 26,
    item 6). `--preprocess` sets them: the vectors are the file's on images prepared that way, the identity records
    them, and search by image rebuilds the same preprocessing from the index's record."""
    import torch

    from pipeline.index.search import open_index
    from pipeline.model.decoders.cpu import decode_one
    from pipeline.model.deprecations import torchscript_calls
    from pipeline.model.preprocess import Preprocess, UInt8Normalize
    from shards import read_tar

    model = tiny.save_fp32_cast_tower(tmp_path / "feat.pt", "trace")
    (tmp_path / "pre.json").write_text(json.dumps(CLIP_LIKE))
    out = tmp_path / "emb"
    with caplog.at_level(logging.INFO, logger="pipeline"):
        code, _, err = embedpipe("embed", digits_shards[0], "--out", out, "--model", f"torchscript:{model}",
                                 "--preprocess", tmp_path / "pre.json", "--workers", "0", "--out-dtype", "float32")
    assert code == 0, err
    want = {"input_size": 64, "resize_size": 73, "interpolation": "bicubic", "mean": CLIP_LIKE["mean"],
            "std": CLIP_LIKE["std"]}  # crop_pct 0.875: resize 64 / 0.875 = 73
    meta = store.shard_info(store.list_shards(out)[0]).metadata
    assert dict(meta.identity.preprocess) == want
    said = [(r.levelno, r.getMessage()) for r in caplog.records]
    assert any("preprocessing from the command line" in m and "bicubic" in m for _, m in said)
    assert not any("no preprocess.json" in m for _, m in said)  # the ImageNet warning is for files left without one
    run = json.loads((out / "run.json").read_text())
    assert json.loads(run["config"]["preprocess"]) == CLIP_LIKE  # the values, not the file's name

    # The stored vectors are the file's features of images resized, cropped and normalised as given.
    pre = Preprocess.from_dict(want)
    samples = read_tar(digits_shards[0])[:4]
    crops = torch.stack([decode_one(s["jpg"], pre) for s in samples])
    with torch.inference_mode(), torchscript_calls():
        feats = torch.nn.functional.normalize(torch.jit.load(str(model))(UInt8Normalize(pre.mean, pre.std)(crops)))
    rows = store.read_all(out)
    stored = np.stack([rows.embeddings[rows.keys.index(s["__key__"])] for s in samples])
    assert np.abs(stored - feats.numpy()).max() < 1e-4

    # Search by image rebuilds the file with the recorded preprocessing: a shard's image finds itself at cosine 1.
    code, _, err = embedpipe("index", out, "--out", tmp_path / "idx", "--kind", "flat")
    assert code == 0, err
    assert open_index(tmp_path / "idx").record.embedding_meta.identity.preprocess == want
    query = tmp_path / "query.jpg"
    query.write_bytes(samples[0]["jpg"])
    code, stdout, err = embedpipe("search", tmp_path / "idx", "--image", query, "-k", "1", "--format", "json")
    assert code == 0, err
    hit = json.loads(stdout)[0]["results"][0]
    assert hit["key"] == samples[0]["__key__"] and hit["score"] > 0.9999


def test_preprocess_option_is_checked_before_any_work(digits_shards, tmp_path, embedpipe):
    model = tiny.save_fp32_cast_tower(tmp_path / "feat.pt", "trace")
    shard = digits_shards[0]
    code, _, err = embedpipe("embed", shard, "--out", tmp_path / "a", "--model", "torchvision:resnet18",
                             "--preprocess", '{"mean": [0.5, 0.5, 0.5]}', "--workers", "0", "-q")
    assert code == 2 and "torchvision:resnet18 takes its library's preprocessing" in err and "drop --preprocess" in err
    for bad, said in [('{"mean": [0.5, 0.5]}', "mean must be a list of 3 numbers"),
                      ('{"interp": "bicubic"}', "unknown field(s) interp; the fields are input_size"),
                      ('{"interpolation": "lanczos"}', "interpolation must be bilinear or bicubic"),
                      ('{"resize_size": 80, "crop_pct": 0.9}', "resize_size or crop_pct, not both"),
                      ('{"input_size": 64,', "is not valid JSON"),
                      (str(tmp_path / "missing.json"), "is neither a JSON object nor a file"),
                      ('{"input_size": 96, "resize_size": 64}', "resize_size 64 is below input_size 96")]:
        code, _, err = embedpipe("embed", shard, "--out", tmp_path / "a", "--model", f"torchscript:{model}",
                                 "--preprocess", bad, "--workers", "0", "-q")
        assert code == 2 and said in err, (bad, err)
    assert not (tmp_path / "a" / "embeddings").exists()

    # A rerun with other preprocessing is another fingerprint: refused, not skipped as done.
    args = ["embed", shard, "--out", tmp_path / "b", "--model", f"torchscript:{model}", "--workers", "0", "-q"]
    assert embedpipe(*args, "--preprocess", '{"input_size": 64}')[0] == 0
    code, _, err = embedpipe(*args, "--preprocess", '{"input_size": 64, "interpolation": "bicubic"}')
    assert code == 2 and "different settings" in err and "preprocess" in err


def test_preprocess_fields_replace_those_of_the_files_preprocess_json(tmp_path):
    import torch

    from pipeline.model.backbones import load_backbone
    from pipeline.model.deprecations import torchscript_calls

    own = {"input_size": 64, "resize_size": 72, "interpolation": "bicubic", "mean": [0.5] * 3, "std": [0.5] * 3}
    path = tiny.save_fp32_cast_tower(tmp_path / "feat.pt", "trace")
    with torchscript_calls():
        torch.jit.save(torch.jit.load(str(path)), str(path), _extra_files={"preprocess.json": json.dumps(own)})
    bb = load_backbone(f"torchscript:{path}", preprocess={"mean": [0.4, 0.4, 0.4]})
    assert bb.preprocess.to_dict() == {**own, "mean": [0.4, 0.4, 0.4]}
    assert bb.identity.preprocess["mean"] == [0.4, 0.4, 0.4]
