"""The Ray engine on a local Ray instance with CPUs: the same summary, layout and rows as the local engine (as the
devices engine has, tests/embedding/test_devices.py), resumable."""
import pytest

from pipeline.embedding.runner import embed
from engine_runs import assert_same_run
import tiny

ray = pytest.importorskip("ray", reason="Ray is an optional extra: pip install 'embedpipe[ray]'")

FAST = tiny.options(batch_size=32, out_dtype="float32")


@pytest.mark.slow
def test_ray_embeds_as_local_does_and_resumes(digits_shards, tmp_path):
    shards = [str(p) for p in digits_shards]
    local = embed(shards, tmp_path / "local", **FAST)
    assert local.failed == {} and local.embedded == 300 and local.shards_done == 3
    s = embed(shards, tmp_path / "ray", engine="ray", **FAST)
    assert_same_run(local, tmp_path / "local", s, tmp_path / "ray")
    again = embed(shards, tmp_path / "ray", engine="ray", **FAST)
    assert again.shards_skipped == 3 and again.embedded == 0
