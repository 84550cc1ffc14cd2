"""`embedpipe bench` end to end on a small workload: every figure present, consistent, and the report printed."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from pipeline.bench import format_report, make_bench_shards, run_bench
from pipeline.embedding.tar import iter_tar_samples


def test_bench_shards_are_realistic_jpegs(tmp_path: Path):
    urls = make_bench_shards(tmp_path, 12, shard_size=6)
    samples = [s for u in urls for s in iter_tar_samples(str(u))]
    assert len(urls) == 2 and len(samples) == 12 and len({s["__key__"] for s in samples}) == 12
    for s in samples:
        assert 40_000 <= len(s["jpg"]) <= 120_000
        with Image.open(__import__("io").BytesIO(s["jpg"])) as im:
            assert im.format == "JPEG" and im.size[0] * im.size[1] >= 400 * 300


@pytest.mark.slow
def test_bench_measures_every_rate_and_the_bound(tmp_path: Path):
    r = run_bench("torchvision:resnet18", "none", quick=True, workdir=str(tmp_path), images=48, batch_size=16,
                  modes=[("eager", "fp32"), ("torchscript", "fp32")])
    assert r["setup"]["compile"] == max(r["model_modes"][:2], key=lambda m: m["images_per_s"])["compile"]
    for k in ("r_d_per_core", "r_d_one_core_alone", "r_m", "r_w", "T", "T_baseline"):
        assert r[k] > 0, k
    C = r["machine"]["cores"]
    assert abs(r["T_star"] - 1 / (1 / (C * r["r_d_per_core"]) + 1 / r["r_m"] + 1 / r["r_w"])) < 1e-6 * r["T_star"]
    assert r["E"] == r["T"] / r["T_star"] and r["speedup"] == r["T"] / r["T_baseline"]
    linear = 1 / (1 / (C * r["r_d_one_core_alone"]) + 1 / r["r_m"] + 1 / r["r_w"])
    assert abs(r["E_if_decode_scaled_linearly"] - r["T"] / linear) < 1e-9
    assert r["cosine_to_baseline_min"] >= 0.99  # the same features as the tutorial loop
    gflops = r["setup"]["model_gflops_per_image"]
    assert 3.5 < gflops < 3.8  # ResNet-18 at 224: 1.8 G multiply-adds
    whole = [m for m in r["model_modes"] if m.get("whole_batch")]
    assert len(whole) == 1 and whole[0]["micro_batch"] == 0
    for m in r["model_modes"]:
        peak = r["matmul_peak_flops"][m["precision"]]
        assert abs(m["peak_fraction"] - m["images_per_s"] * gflops * 1e9 / peak) < 1e-9
    auto = r["compile_auto"]["by_precision"]["fp32"]  # embed's choice from these rows: torchscript is its candidate
    assert set(auto["expected_s"]) == {"torchscript"} and auto["mode"] == "torchscript"
    ts = next(m for m in r["model_modes"] if m["compile"] == "torchscript" and not m.get("whole_batch"))
    assert abs(auto["expected_s"]["torchscript"] - (ts["build_s"] + 48 / ts["images_per_s"])) < 1e-9
    report = format_report(r)
    assert "E = T/T* =" in report and "speedup" in report and "matmul peak" in report
    assert "--compile auto for 48 images in fp32: torchscript" in report
    json.dumps(r)  # what --json writes
