"""When the model runs in other processes (--devices, Ray, a contained child), the runner needs only the run's
fingerprint: it loads the backbone, and builds, compiles and measures nothing in the parent."""
import pytest

from pipeline.embedding import worker
from pipeline.embedding.runner import embed
import tiny


@pytest.mark.slow
def test_devices_run_builds_no_extractor_in_the_parent(digits_shards, tmp_path, monkeypatch):
    def no_extractor(*args, **kwargs):
        raise AssertionError("the parent built an extractor (and measured micro-batches) only for a fingerprint")

    # Device workers are spawned fresh, so only this (the parent) process refuses to build one.
    monkeypatch.setattr(worker, "build_extractor", no_extractor)
    summary = embed([str(digits_shards[0])], tmp_path / "out", devices="cpu,cpu", **tiny.options(batch_size=50))
    assert summary.failed == {} and summary.embedded == 100
