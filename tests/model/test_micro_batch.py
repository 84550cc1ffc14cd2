"""The model runs a few images per call on CPU: same features as the whole batch, the count measured once."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from pipeline.errors import UserError
from pipeline.model import micro_batch
from pipeline.model.backbones import load_backbone, with_input_size
from pipeline.model.compile import build_extractor

from campaign import FULL


@pytest.fixture(scope="module")
def small_bb():
    return with_input_size(load_backbone("torchvision:resnet18", "none"), 64)


def test_default_is_measured_on_cpu_whole_batch_on_gpu_and_negative_refused():
    assert micro_batch.resolve(None, torch.device("cpu")) == micro_batch.TUNE
    assert micro_batch.resolve(None, torch.device("cuda")) == 0
    assert micro_batch.resolve(6, torch.device("cpu")) == 6
    with pytest.raises(UserError, match="--micro-batch must be 0"):
        micro_batch.resolve(-2, torch.device("cpu"))


@pytest.mark.parametrize("compile", ["eager", "torchscript"])
def test_micro_batches_give_the_whole_batch_features(small_bb, tmp_path: Path, compile: str):
    x = torch.randint(0, 256, (10, 3, 64, 64), dtype=torch.uint8)  # 4 + 4 + 2: a short last chunk
    whole = build_extractor(small_bb, "cpu", "fp32", compile, tmp_path, micro_batch=0)
    parts = build_extractor(small_bb, "cpu", "fp32", compile, tmp_path, micro_batch=4)
    a, b = whole(x), parts(x)
    assert a.shape == b.shape == (10, 512)
    assert F.cosine_similarity(a, b).min().item() >= 0.9999


def test_measured_once_then_remembered_per_model(small_bb, tmp_path: Path):
    ex = build_extractor(small_bb, "cpu", "fp32", "torchscript", tmp_path)
    assert ex.micro_batch in micro_batch.CANDIDATES
    known = json.loads((tmp_path / "micro_batch.json").read_text())
    assert list(known.values()) == [ex.micro_batch] and "torchscript" in next(iter(known))

    calls = []
    value = micro_batch.remembered(tmp_path / "micro_batch.json", next(iter(known)).rsplit("-threads", 1)[0],
                                   lambda x: calls.append(len(x)), 64)
    assert value == ex.micro_batch and calls == []  # read back, not measured again

    value = micro_batch.remembered(tmp_path / "micro_batch.json", "another-model",
                                   lambda x: calls.append(len(x)) or x, 64)
    assert value in micro_batch.CANDIDATES and sorted(set(calls)) == sorted(micro_batch.CANDIDATES)
    assert len(json.loads((tmp_path / "micro_batch.json").read_text())) == 2


def test_unwritable_cache_costs_a_measurement_not_a_failure(tmp_path: Path):
    blocker = tmp_path / "file"
    blocker.write_text("a file where the cache folder should be")
    value = micro_batch.remembered(blocker / "micro_batch.json", "k", lambda x: x, 32)
    assert value in micro_batch.CANDIDATES


@pytest.mark.slow
def test_inductor_micro_batches_pad_the_short_chunk_and_match_eager(small_bb, tmp_path: Path):
    x = torch.randint(0, 256, (11, 3, 64, 64), dtype=torch.uint8)
    eager = build_extractor(small_bb, "cpu", "fp32", "eager", micro_batch=0)(x)
    ind = build_extractor(small_bb, "cpu", "fp32", "inductor", tmp_path, micro_batch=4)  # 4 + 4 + 3 (padded)
    out = ind(x)
    assert ind.fixed_batch == ind.micro_batch == 4
    assert F.cosine_similarity(out, eager).min().item() >= 0.9999



@pytest.mark.slow
def test_aot_packages_load_warm_and_match_eager(small_bb, tmp_path: Path):
    x = torch.randint(0, 256, (11, 3, 64, 64), dtype=torch.uint8)  # 4 + 4 + 3: the short chunk padded
    eager = build_extractor(small_bb, "cpu", "fp32", "eager", micro_batch=0)(x)
    cold = build_extractor(small_bb, "cpu", "fp32", "aot", tmp_path, micro_batch=4)
    out = cold(x)
    assert cold.fixed_batch == 4 and cold.module.loaded_from_cache == 0
    assert F.cosine_similarity(out, eager).min().item() >= 0.9999
    (package,) = (tmp_path / "aot").glob("*-b4.pt2")
    built = package.stat().st_mtime_ns

    # A warm start loads the package instead of compiling again.
    warm = build_extractor(small_bb, "cpu", "fp32", "aot", tmp_path, micro_batch=4)
    assert torch.equal(warm(x), out)
    assert warm.module.loaded_from_cache == 1 and package.stat().st_mtime_ns == built


@pytest.mark.slow
@pytest.mark.skipif(not FULL, reason="campaign only (EMBEDPIPE_CAMPAIGN=1): two AOTInductor compiles")
def test_unreadable_aot_package_is_rebuilt(small_bb, tmp_path: Path):
    x = torch.randint(0, 256, (4, 3, 64, 64), dtype=torch.uint8)
    expected = build_extractor(small_bb, "cpu", "fp32", "aot", tmp_path, micro_batch=4)(x)
    (package,) = (tmp_path / "aot").glob("*.pt2")
    package.write_bytes(b"not a package")  # a corrupt entry is rebuilt, not a crash
    again = build_extractor(small_bb, "cpu", "fp32", "aot", tmp_path, micro_batch=4)
    assert torch.allclose(again(x), expected, atol=1e-4)
    assert again.module.loaded_from_cache == 0 and package.stat().st_size > 1000
