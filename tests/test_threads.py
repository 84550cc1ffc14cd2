"""The CPUs a process may use (affinity, cgroup v1/v2 quota, EMBEDPIPE_THREADS) and the OpenMP defaults set before
torch loads (issue 26, item 5). Cgroup files are real files in temporary folders laid out as the kernel does."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline import threads
from pipeline.errors import UserError

AFFINITY = len(os.sched_getaffinity(0))
# The environment of a process nobody configured: no thread or wait settings of the test process's own.
BARE = {k: v for k, v in os.environ.items()
        if not k.startswith(("OMP_", "GOMP_", "KMP_")) and k not in (threads.THREADS_ENV, threads.DEFAULTS_ENV)}


def cgroup(tmp_path: Path, proc: str, files: dict[str, str]) -> tuple[Path, Path]:
    """A cgroup mount under ``tmp_path/fs`` holding ``files`` (relative paths) and a ``/proc/self/cgroup``."""
    root = tmp_path / "fs"
    root.mkdir()
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text + "\n")
    (tmp_path / "cgroup").write_text(proc)
    return root, tmp_path / "cgroup"


@pytest.mark.parametrize("cpu_max, cpus", [("150000 100000", 2), ("200000 100000", 2), ("50000 100000", 1),
                                           ("400000 200000", 2), ("max 100000", None)])
def test_cgroup_v2_quota_is_rounded_up_and_max_is_no_limit(tmp_path, cpu_max, cpus):
    root, proc = cgroup(tmp_path, "0::/\n", {"cpu.max": cpu_max})
    assert threads.cgroup_cpu_limit(root, proc) == cpus


def test_cgroup_v2_limit_of_a_parent_applies_to_its_children(tmp_path):
    root, proc = cgroup(tmp_path, "0::/kubepods/pod1/box\n",
                        {"kubepods/pod1/box/cpu.max": "max 100000", "kubepods/pod1/cpu.max": "300000 100000",
                         "kubepods/cpu.max": "max 100000"})
    assert threads.cgroup_cpu_limit(root, proc) == 3


def test_cgroup_v1_cfs_quota_on_a_hybrid_system(tmp_path):
    """cgroup v1's cpu controller beside an empty v2 hierarchy (systemd's hybrid layout, as on this machine)."""
    proc = "9:name=systemd:/\n4:memory:/x\n2:cpuacct:/\n1:cpu,cpuacct:/job\n0::/\n"
    root, proc_file = cgroup(tmp_path, proc, {"cpu,cpuacct/job/cpu.cfs_quota_us": "250000",
                                              "cpu,cpuacct/job/cpu.cfs_period_us": "100000",
                                              "unified/cgroup.procs": ""})
    assert threads.cgroup_cpu_limit(root, proc_file) == 3
    (root / "cpu,cpuacct/job/cpu.cfs_quota_us").write_text("-1\n")  # -1: no quota
    assert threads.cgroup_cpu_limit(root, proc_file) is None


def test_cgroup_path_of_the_host_falls_back_to_the_mounted_folder(tmp_path):
    """Inside a container without a cgroup namespace /proc/self/cgroup names the host's path, which is not
    mounted here: the container's own limit is the mount's top folder."""
    root, proc = cgroup(tmp_path, "5:cpu:/docker/0123abcd\n",
                        {"cpu/cpu.cfs_quota_us": "100000", "cpu/cpu.cfs_period_us": "100000"})
    assert threads.cgroup_cpu_limit(root, proc) == 1


@pytest.mark.parametrize("text", ["", "banana 100000", "100000 zero"])
def test_unreadable_cgroup_files_mean_no_limit_not_a_crash(tmp_path, text):
    root, proc = cgroup(tmp_path, "0::/\n", {"cpu.max": text})
    assert threads.cgroup_cpu_limit(root, proc) is None
    assert threads.cgroup_cpu_limit(tmp_path / "missing", tmp_path / "missing-proc") is None


def test_usable_cpus_is_the_fewer_of_affinity_and_quota(tmp_path):
    root, proc = cgroup(tmp_path, "0::/\n", {"cpu.max": "100000 100000"})
    assert threads.usable_cpus(BARE, root, proc) == 1
    (root / "cpu.max").write_text(f"{(AFFINITY + 8) * 100000} 100000\n")  # a quota above the affinity mask
    assert threads.usable_cpus(BARE, root, proc) == AFFINITY
    (root / "cpu.max").write_text("max 100000\n")
    assert threads.usable_cpus(BARE, root, proc) == AFFINITY


def test_embedpipe_threads_overrides_and_a_bad_value_is_a_clear_error(tmp_path):
    root, proc = cgroup(tmp_path, "0::/\n", {"cpu.max": "100000 100000"})
    assert threads.usable_cpus({**BARE, "EMBEDPIPE_THREADS": " 6 "}, root, proc) == 6
    for bad in ("abc", "0", "-2", "1.5"):
        with pytest.raises(UserError, match=r"EMBEDPIPE_THREADS=.* is not a positive whole number.*unset it"):
            threads.usable_cpus({**BARE, "EMBEDPIPE_THREADS": bad})


def test_model_threads_leave_room_for_decode_workers_and_other_model_processes():
    env = {**BARE, "EMBEDPIPE_THREADS": "8"}
    assert threads.model_threads(environ=env) == 8
    assert threads.model_threads(workers=2, environ=env) == 6
    assert threads.model_threads(workers=1, share=2, environ=env) == 3
    assert threads.model_threads(workers=9, environ=env) == 1  # never none
    assert threads.model_threads(cap=4, environ=env) == 4  # torch's own count (physical cores) is never raised
    assert threads.model_threads(workers=2, cap=16, environ=env) == 6


def test_openmp_defaults_fill_only_what_the_user_left_unset(tmp_path):
    env = dict(BARE)
    threads.set_openmp_defaults(env)
    assert env == {**BARE, "OMP_WAIT_POLICY": "PASSIVE"}  # no quota here: torch's own thread count stands
    env = {**BARE, "EMBEDPIPE_THREADS": "3"}
    threads.set_openmp_defaults(env)
    assert env["OMP_NUM_THREADS"] == "3"
    root, proc = cgroup(tmp_path, "0::/\n", {"cpu.max": "100000 100000"})  # a quota of 1 CPU
    env = dict(BARE)
    threads.set_openmp_defaults(env, root, proc)
    assert env["OMP_NUM_THREADS"] == "1" and env["OMP_WAIT_POLICY"] == "PASSIVE"
    for mine in ({"OMP_WAIT_POLICY": "ACTIVE"}, {"GOMP_SPINCOUNT": "300000"}, {"KMP_BLOCKTIME": "200"}):
        env = {**BARE, **mine, "OMP_NUM_THREADS": "3"}
        threads.set_openmp_defaults(env, root, proc)
        assert env == {**BARE, **mine, "OMP_NUM_THREADS": "3"}
    env = {**BARE, "EMBEDPIPE_OPENMP_DEFAULTS": "0"}
    threads.set_openmp_defaults(env, root, proc)
    assert env == {**BARE, "EMBEDPIPE_OPENMP_DEFAULTS": "0"}
    env = {**BARE, "EMBEDPIPE_THREADS": "lots"}
    threads.set_openmp_defaults(env)  # not at import: the command that sizes its threads reports it
    assert "OMP_NUM_THREADS" not in env and env["OMP_WAIT_POLICY"] == "PASSIVE"


def _openmp_runtime_says(env: dict[str, str]) -> str:
    """What torch's OpenMP runtime reports at load in a fresh interpreter that imports embedpipe first."""
    code = "import pipeline, torch; torch.ones(4).sum()"
    run = subprocess.run([sys.executable, "-c", code], env={**env, "OMP_DISPLAY_ENV": "VERBOSE"},
                         capture_output=True, text=True, timeout=120, check=True)
    return run.stderr


@pytest.mark.slow  # a fresh interpreter importing torch
def test_torch_openmp_waits_passively_when_embedpipe_is_imported_first():
    said = _openmp_runtime_says({**BARE, "EMBEDPIPE_THREADS": "3"})
    if "GOMP_SPINCOUNT" not in said:
        pytest.skip("torch's OpenMP runtime here is not libgomp (it reports no GOMP_SPINCOUNT)")
    assert "GOMP_SPINCOUNT = '0'" in said  # passive: no spinning (libgomp's own default spins 300000 times)
    assert "OMP_NUM_THREADS = '3'" in said
    users = _openmp_runtime_says({**BARE, "OMP_WAIT_POLICY": "ACTIVE", "OMP_NUM_THREADS": "1"})
    assert "OMP_WAIT_POLICY = 'ACTIVE'" in users and "OMP_NUM_THREADS = '1'" in users


def test_a_bad_embedpipe_threads_stops_embed_before_any_model(digits_shards, tmp_path, monkeypatch):
    from pipeline import embed

    import tiny

    monkeypatch.setenv("EMBEDPIPE_THREADS", "all")
    with pytest.raises(UserError, match="EMBEDPIPE_THREADS='all' is not a positive whole number"):
        embed([str(digits_shards[0])], tmp_path / "run", **tiny.options())
    assert not (tmp_path / "run" / "_lock").exists()


def test_the_cpu_model_gets_the_usable_cpus_less_its_decode_workers(monkeypatch):
    from pipeline.embedding.options import EmbedConfig
    from pipeline.embedding.worker import prepare_model
    from pipeline.model import device

    import tiny

    before = torch.get_num_threads()
    monkeypatch.setenv("EMBEDPIPE_THREADS", "5")
    monkeypatch.setattr(device, "_torch_threads", 8, raising=False)  # as if torch's own count were 8 cores
    try:
        prepare_model(EmbedConfig(**tiny.options(device="cpu", workers=1, micro_batch=0)))
        assert torch.get_num_threads() == 4
        prepare_model(EmbedConfig(**tiny.options(device="cpu", workers=0, micro_batch=0)))
        assert torch.get_num_threads() == 5
        monkeypatch.setattr(device, "_torch_threads", 3)  # torch's own count is never raised
        prepare_model(EmbedConfig(**tiny.options(device="cpu", workers=0, micro_batch=0)))
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)
