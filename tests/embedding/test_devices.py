"""Several device workers (CPU stand-ins for GPUs): same rows as one process, dead workers' shards retried."""

from collections import deque

import pytest

from pipeline import store
from pipeline.embedding import worker
from pipeline.embedding.engines.devices import next_part
from pipeline.embedding.options import parse_devices
from pipeline.embedding.runner import embed
from pipeline.errors import UserError
from engine_runs import assert_same_run
import tiny

FAST = tiny.options(batch_size=32, out_dtype="float32", compile=None)


def test_parse_devices():
    assert parse_devices("cpu") == ["cpu"]
    assert parse_devices("cpu,cpu") == ["cpu", "cpu"]
    assert parse_devices("auto") in (["cpu"], [f"cuda:{i}" for i in range(8)][: len(parse_devices("auto"))])
    with pytest.raises(UserError, match="not a device"):
        parse_devices("gpu0")


@pytest.mark.slow
def test_two_cpu_workers_equal_single_process(digits_shards, tmp_path, monkeypatch):
    shards = [str(p) for p in digits_shards]
    single = embed(shards, tmp_path / "one", compile="eager", **FAST)

    def no_extractor(*args, **kwargs):
        raise AssertionError("the parent built an extractor (and measured micro-batches) only for a fingerprint")

    # The model runs in the device workers (spawned fresh, so unpatched): the parent only needs the fingerprint.
    monkeypatch.setattr(worker, "tuned_extractor", no_extractor)
    # with a decode worker each (the GPU default): device workers are not daemons, so they may have children
    multi = embed(shards, tmp_path / "two", devices="cpu,cpu", compile="eager", **{**FAST, "workers": 1})
    assert multi.failed == {} and multi.embedded == single.embedded == 300 and multi.shards_done == 3
    assert len(set(store.read_all(tmp_path / "two").keys)) == 300
    assert_same_run(single, tmp_path / "one", multi, tmp_path / "two")


@pytest.mark.slow
def test_killed_worker_shard_is_retried_by_another(digits_shards, tmp_path, monkeypatch):
    monkeypatch.setenv("EMBEDPIPE_CRASH_AT", "40")  # a worker SIGKILLs itself mid-shard ...
    monkeypatch.setenv("EMBEDPIPE_CRASH_ONCE", str(tmp_path / "crashed"))  # ... once
    s = embed([str(p) for p in digits_shards], tmp_path / "out", devices="cpu,cpu", compile="eager", **FAST)
    assert (tmp_path / "crashed").exists()
    assert s.failed == {} and s.shards_done == 3 and s.embedded == 300
    keys = store.read_all(tmp_path / "out").keys
    assert len(keys) == len(set(keys)) == 300
    assert not list((tmp_path / "out").rglob("*.tmp"))



def test_a_device_workers_part_is_its_share_and_a_dead_workers_shard_goes_alone():
    todo = deque((f"s{i}", f"n{i}") for i in range(7))
    assert [u for u, _ in next_part(todo, 4, 2, set())] == ["s0", "s1", "s2", "s3"]  # 7 left, 2 workers: 4 each
    assert [u for u, _ in next_part(todo, 4, 2, {"s5"})] == ["s4"]  # stops before a shard a dead worker held
    assert [u for u, _ in next_part(todo, 4, 2, {"s5"})] == ["s5"]  # which goes alone
    assert [u for u, _ in next_part(todo, 1, 2, set())] == ["s6"] and not todo
    assert next_part(todo, 4, 2, set()) == []
    assert len(next_part(deque((f"s{i}", "") for i in range(9)), 32, 3, set())) == 3  # the last parts spread out
