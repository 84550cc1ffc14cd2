"""The Ray engine on a local Ray instance with CPUs: same layout and rows as the local engine, resumable."""
import numpy as np
import pytest

from pipeline import store
from pipeline.embedding.runner import embed
import tiny

ray = pytest.importorskip("ray", reason="Ray is an optional extra: pip install 'embedpipe[ray]'")

FAST = tiny.options(batch_size=32, out_dtype="float32")


@pytest.mark.slow
def test_ray_engine_matches_local_and_resumes(digits_shards, tmp_path):
    shards = [str(p) for p in digits_shards]
    local = embed(shards, tmp_path / "local", **FAST)
    s = embed(shards, tmp_path / "ray", engine="ray", **FAST)
    assert s.failed == {} and s.embedded == local.embedded == 300 and s.shards_done == 3
    assert sorted(p.name for p in (tmp_path / "ray" / "embeddings").iterdir()) == \
        sorted(p.name for p in (tmp_path / "local" / "embeddings").iterdir())
    a, b = store.read_all(tmp_path / "local"), store.read_all(tmp_path / "ray")
    oa, ob = np.argsort(a.keys), np.argsort(b.keys)
    assert [a.keys[i] for i in oa] == [b.keys[i] for i in ob]
    assert np.allclose(a.embeddings[oa], b.embeddings[ob], atol=1e-5)
    assert (tmp_path / "ray" / "_SUCCESS").is_file()
    again = embed(shards, tmp_path / "ray", engine="ray", **FAST)
    assert again.shards_skipped == 3 and again.embedded == 0
