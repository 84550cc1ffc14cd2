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


def test_a_measurement_from_another_machine_or_torch_is_not_used(small_bb, tmp_path: Path):
    """Issue 26, item 5: a cache folder shared by machines (a cluster's volume) or kept across a torch upgrade
    holds measurements that are not this machine's; each machine measures its own and keeps the others'."""
    build_extractor(small_bb, "cpu", "fp32", "torchscript", tmp_path)
    cache = tmp_path / "micro_batch.json"
    (recorded,) = json.loads(cache.read_text())
    head, _, cpu = recorded.partition(f"-torch{torch.__version__}-")
    foreign = {  # 3 is no candidate: a build that returns it took another machine's entry
        recorded.split("-threads")[0] + f"-threads{torch.get_num_threads()}": 3,  # as releases before wrote it
        f"{head}-torch1.13.0-{cpu}": 3,
        f"{head}-torch{torch.__version__}-Another CPU": 3,
    }
    cache.write_text(json.dumps(foreign))
    ex = build_extractor(small_bb, "cpu", "fp32", "torchscript", tmp_path)
    assert ex.micro_batch in micro_batch.CANDIDATES
    assert json.loads(cache.read_text()) == {**foreign, recorded: ex.micro_batch}


def test_query_time_never_measures(tiny_index: Path, digits_shards, tmp_path: Path, monkeypatch, caplog):
    """Issue 26, item 5: the first image query of a process (search --image, the service's ImageEmbedder) takes the
    remembered micro-batch or the default; a measurement would cost that query seconds."""
    import logging
    import tarfile

    from pipeline import open_index
    from pipeline.index.query import run_search
    from pipeline.model.rebuild import ImageEmbedder

    monkeypatch.setenv("EMBEDPIPE_CACHE", str(tmp_path / "cache"))  # an empty cache: nothing measured here yet
    with tarfile.open(digits_shards[0]) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith(".jpg"))
        (tmp_path / "q.jpg").write_bytes(tar.extractfile(member).read())
    caplog.set_level(logging.DEBUG, logger="pipeline")
    found = list(run_search(tiny_index / "idx", images=[str(tmp_path / "q.jpg")], k=1, fmt="json"))
    assert json.loads(found[0])[0]["results"][0]["key"] == member.name[: -len(".jpg")]
    embedder = ImageEmbedder(open_index(tiny_index / "idx").record.embedding_meta, "cpu")
    assert not (tmp_path / "cache" / "micro_batch.json").exists()
    assert not [r.getMessage() for r in caplog.records if "measuring" in r.getMessage()]
    assert embedder.extractor.micro_batch == micro_batch.DEFAULT
