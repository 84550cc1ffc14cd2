"""Rank/world resolution: exact results for each cluster convention, clear errors, and full coverage by partition."""
from __future__ import annotations

import pytest

from pipeline.embedding.cluster import describe_source, resolve, resolve_rank_world
from pipeline.embedding.shards import partition
from pipeline.errors import UserError

SHARDS = [f"/data/shard-{i:06d}.tar" for i in range(23)]


def slurm(task: int, count: int, lo: int = 0, step: int | None = None) -> dict[str, str]:
    """The variables Slurm sets in one task of ``--array=lo-(lo+(count-1)*step)[:step]``."""
    env = {"SLURM_ARRAY_TASK_ID": str(task), "SLURM_ARRAY_TASK_COUNT": str(count),
           "SLURM_ARRAY_TASK_MIN": str(lo), "SLURM_ARRAY_TASK_MAX": str(lo + (count - 1) * (step or 1)),
           "SLURM_ARRAY_JOB_ID": "4242", "SLURM_JOB_ID": str(4242 + task)}
    if step is not None:
        env["SLURM_ARRAY_TASK_STEP"] = str(step)
    return env


def srun(procid: int, ntasks: int, array: dict[str, str] | None = None) -> dict[str, str]:
    """The variables srun sets in task ``procid`` of ``srun -n ntasks`` (inside an array task when ``array``)."""
    step = {"SLURM_STEP_ID": "0", "SLURM_PROCID": str(procid), "SLURM_LOCALID": str(procid % 2),
            "SLURM_NTASKS": str(ntasks), "SLURM_STEP_NUM_TASKS": str(ntasks)}
    return {"SLURM_JOB_ID": "4300", **(array or {}), **step}


def batch_script(ntasks: int, array: dict[str, str] | None = None) -> dict[str, str]:
    """The batch script of ``sbatch --ntasks=ntasks``: rank 0 of the allocation, but not an srun task."""
    return {**(array or {}), "SLURM_JOB_ID": "4301", "SLURM_PROCID": "0", "SLURM_NTASKS": str(ntasks)}


def torchrun(rank: int, world: int) -> dict[str, str]:
    return {"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank % 2), "MASTER_ADDR": "n0"}


def k8s(index: int, world: int | None) -> dict[str, str]:
    env = {"JOB_COMPLETION_INDEX": str(index), "HOSTNAME": f"embed-{index}-abcde"}
    if world is not None:
        env["EMBEDPIPE_WORLD_SIZE"] = str(world)
    return env


@pytest.mark.parametrize("env, expected", [
    ({}, (0, 1)),
    ({"HOME": "/root", "SLURM_JOB_ID": "7", "SLURM_PROCID": "0"}, (0, 1)),  # a plain (non-array) Slurm job
    (slurm(0, 8), (0, 8)),
    (slurm(7, 8), (7, 8)),
    (slurm(1, 8, lo=1), (0, 8)),          # --array=1-8
    (slurm(8, 8, lo=1), (7, 8)),
    (slurm(13, 4, lo=10), (3, 4)),        # --array=10-13
    (slurm(8, 4, step=4), (2, 4)),        # --array=0-12:4
    ({"SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_MIN": "2", "SLURM_ARRAY_TASK_MAX": "6"}, (3, 5)),  # no COUNT
    (torchrun(0, 1), (0, 1)),
    (torchrun(2, 4), (2, 4)),
    (torchrun(15, 16), (15, 16)),
    (k8s(0, 3), (0, 3)),
    (k8s(2, 3), (2, 3)),
    ({"EMBEDPIPE_WORLD_SIZE": "1"}, (0, 1)),
    ({"RANK": "", "WORLD_SIZE": ""}, (0, 1)),  # empty variables count as unset
    ({"SLURM_PROCID": "1", "SLURM_NTASKS": "4"}, (1, 4)),  # srun -n 4: the second task
    (srun(0, 4), (0, 4)),
    (srun(3, 4), (3, 4)),
    ({"SLURM_PROCID": "2", "SLURM_STEP_NUM_TASKS": "3"}, (2, 3)),  # SLURM_NTASKS unset: the step's own count
    (srun(0, 1), (0, 1)),                 # a one-task step
    (batch_script(1), (0, 1)),            # the batch script of a one-task job
    (batch_script(1, slurm(5, 8)), (5, 8)),  # ... of an array task: the array's rank
    (srun(0, 4, slurm(0, 3)), (0, 12)),   # --array=0-2, each task running srun -n 4: 3 * 4 ranks
    (srun(1, 4, slurm(0, 3)), (1, 12)),
    (srun(0, 4, slurm(1, 3)), (4, 12)),
    (srun(3, 4, slurm(2, 3)), (11, 12)),
    (srun(2, 4, slurm(3, 8, lo=1)), (10, 32)),  # --array=1-8: array rank 2
    (srun(1, 2, slurm(8, 4, step=4)), (5, 8)),  # --array=0-12:4: array rank 2
    ({**srun(1, 2), **torchrun(5, 8)}, (5, 8)),  # torchrun under srun: RANK is the finer split
])
def test_from_environment(env, expected):
    assert resolve_rank_world(None, None, env) == expected


@pytest.mark.parametrize("rank, world, env, expected", [
    (3, 8, {}, (3, 8)),
    (3, 8, slurm(1, 2), (3, 8)),            # explicit values win over the environment
    (0, 2, torchrun(3, 4), (0, 2)),
    (1, 4, {"RANK": "not-a-number"}, (1, 4)),  # with both given, the environment is not read at all
    (None, 5, k8s(4, None), (4, 5)),        # Kubernetes: index from the env, world from --world-size
    (None, 5, k8s(4, 9), (4, 5)),           # --world-size wins over EMBEDPIPE_WORLD_SIZE
    (2, None, slurm(0, 3), (2, 3)),         # --rank with the array's count
    (None, 1, {}, (0, 1)),
    (0, 1, batch_script(4), (0, 1)),        # the batch script, told to embed everything itself
    (2, None, srun(1, 4, slurm(0, 3)), (2, 12)),  # --rank with the array-of-steps' world
])
def test_explicit_values_win(rank, world, env, expected):
    assert resolve_rank_world(rank, world, env) == expected


@pytest.mark.parametrize("rank, world, env, source", [
    (None, None, {}, "default (one task: no --rank/--world-size, no cluster environment)"),
    (3, 8, {}, "--rank 3 of --world-size 8"),
    (None, None, slurm(5, 8), "SLURM_ARRAY_TASK_ID=5 of SLURM_ARRAY_TASK_COUNT=8"),
    (None, None, slurm(3, 8, lo=1), "SLURM_ARRAY_TASK_ID=3 - SLURM_ARRAY_TASK_MIN=1 of SLURM_ARRAY_TASK_COUNT=8"),
    (None, None, slurm(8, 4, step=4), "SLURM_ARRAY_TASK_ID=8 / SLURM_ARRAY_TASK_STEP=4 of SLURM_ARRAY_TASK_COUNT=4"),
    (None, None, torchrun(1, 2), "RANK=1 of WORLD_SIZE=2"),
    (None, None, k8s(1, 4), "JOB_COMPLETION_INDEX=1 of EMBEDPIPE_WORLD_SIZE=4"),
    (None, 4, k8s(1, None), "JOB_COMPLETION_INDEX=1 of --world-size 4"),
    (None, None, srun(2, 4), "SLURM_PROCID=2 of SLURM_NTASKS=4"),
    (None, None, srun(2, 4, slurm(1, 3)),
     "(SLURM_ARRAY_TASK_ID=1) * SLURM_NTASKS=4 + SLURM_PROCID=2 of SLURM_ARRAY_TASK_COUNT=3 * SLURM_NTASKS=4"),
    (None, None, srun(0, 2, slurm(3, 8, lo=1)), "(SLURM_ARRAY_TASK_ID=3 - SLURM_ARRAY_TASK_MIN=1) * SLURM_NTASKS=2 + "
     "SLURM_PROCID=0 of SLURM_ARRAY_TASK_COUNT=8 * SLURM_NTASKS=2"),
])
def test_describe_source(rank, world, env, source):
    assert describe_source(rank, world, env) == source
    rw = resolve(rank, world, env)
    assert (rw.rank, rw.world, rw.source) == (*resolve_rank_world(rank, world, env), source)


def test_slurm_wins_over_torchrun_wins_over_k8s():
    both = {**k8s(1, 4), **torchrun(2, 4)}
    assert describe_source(None, None, both) == "RANK=2 of WORLD_SIZE=4"
    assert resolve_rank_world(None, None, {**both, **slurm(3, 4)}) == (3, 4)


@pytest.mark.parametrize("rank, world, env, message", [
    (None, None, k8s(2, None),
     "JOB_COMPLETION_INDEX=2 gives this task's rank but not the number of tasks: pass --world-size equal to the "
     "Job's `completions` (or set EMBEDPIPE_WORLD_SIZE in the pod's env)"),
    (None, None, k8s(3, 3),
     "rank 3 is not in [0, 3) (from JOB_COMPLETION_INDEX=3 of EMBEDPIPE_WORLD_SIZE=3); --world-size / "
     "EMBEDPIPE_WORLD_SIZE must equal the Job's `completions`"),
    (None, None, slurm(8, 8),
     "rank 8 is not in [0, 8) (from SLURM_ARRAY_TASK_ID=8 of SLURM_ARRAY_TASK_COUNT=8); the array needs as many "
     "tasks as the world size (e.g. --array=0-N-1 or --array=1-N)"),
    (None, None, {"SLURM_ARRAY_TASK_ID": "4", "SLURM_ARRAY_TASK_MIN": "0", "SLURM_ARRAY_TASK_STEP": "3",
                  "SLURM_ARRAY_TASK_COUNT": "3"},
     "SLURM_ARRAY_TASK_ID=4 is not on the array's range (min 0, step 3); use a contiguous range such as "
     "--array=0-N, or pass --rank and --world-size"),
    (None, None, {"SLURM_ARRAY_TASK_ID": "3"},
     "SLURM_ARRAY_TASK_ID=3 gives this task's rank but not the number of tasks; pass --world-size N "
     "(or set EMBEDPIPE_WORLD_SIZE)"),
    (None, None, {"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_COUNT": "eight"},
     "SLURM_ARRAY_TASK_COUNT='eight' is not an integer; run inside a Slurm job array (sbatch --array=0-N) or "
     "pass --rank and --world-size"),
    (None, None, {"RANK": "1"},
     "RANK=1 is set but WORLD_SIZE is not; set WORLD_SIZE (torchrun does) or pass --world-size N"),
    (None, None, {"RANK": "one", "WORLD_SIZE": "2"},
     "RANK='one' is not an integer; torchrun sets RANK and WORLD_SIZE; unset them, or pass --rank and --world-size"),
    (None, None, torchrun(-1, 4),
     "rank -1 is not in [0, 4) (from RANK=-1 of WORLD_SIZE=4); ranks count from 0 to world size - 1"),
    (None, None, {"JOB_COMPLETION_INDEX": "0", "EMBEDPIPE_WORLD_SIZE": "4x"},
     "EMBEDPIPE_WORLD_SIZE='4x' is not an integer; set EMBEDPIPE_WORLD_SIZE to the number of tasks "
     "(the Job's completions)"),
    (None, None, {"EMBEDPIPE_WORLD_SIZE": "4"},
     "world size 4 (from EMBEDPIPE_WORLD_SIZE=4) but no rank for this task: pass --rank I with 0 <= I < world "
     "size, or run as a Slurm array / torchrun / Kubernetes Indexed Job task"),
    (4, 4, {}, "rank 4 is not in [0, 4) (from --rank 4 of --world-size 4); ranks count from 0 to world size - 1"),
    (-1, 2, {}, "rank -1 is not in [0, 2) (from --rank -1 of --world-size 2); ranks count from 0 to world size - 1"),
    (0, 0, {}, "world size 0 (from --rank 0 of --world-size 0) must be at least 1; pass --world-size N with N >= 1"),
    (2, None, {},
     "--rank 2 gives this task's rank but not the number of tasks; pass --world-size N (or set EMBEDPIPE_WORLD_SIZE)"),
    (None, None, batch_script(4),
     "SLURM_NTASKS=4 but this process was not started by srun (SLURM_PROCID=0, no SLURM_STEP_NUM_TASKS): it is the "
     "job's batch script, and alone it would embed only 1/4 of the shards; start the tasks with `srun embedpipe "
     "embed ...`, or pass --rank 0 --world-size 1 to embed every shard in this one process"),
    (None, 1, batch_script(4, slurm(2, 3)),
     "SLURM_NTASKS=4 but this process was not started by srun (SLURM_PROCID=0, no SLURM_STEP_NUM_TASKS): it is the "
     "job's batch script, and alone it would embed only 1/4 of the shards; start the tasks with `srun embedpipe "
     "embed ...`, or pass --rank 0 --world-size 1 to embed every shard in this one process"),
    (None, None, {**srun(0, 4), "SLURM_PROCID": "4"},
     "SLURM_PROCID=4 is not in [0, SLURM_NTASKS=4); srun sets SLURM_PROCID and SLURM_NTASKS in each task; or pass "
     "--rank and --world-size"),
    (None, None, {**srun(0, 4), "SLURM_NTASKS": "four"},
     "SLURM_NTASKS='four' is not an integer; srun sets SLURM_PROCID and SLURM_NTASKS in each task; or pass --rank "
     "and --world-size"),
    (None, None, srun(1, 2, {"SLURM_ARRAY_TASK_ID": "3"}),
     "(SLURM_ARRAY_TASK_ID=3) * SLURM_NTASKS=2 + SLURM_PROCID=1 gives this task's rank but not the number of tasks; "
     "pass --world-size N (or set EMBEDPIPE_WORLD_SIZE)"),
])
def test_errors_name_the_variable_and_the_fix(rank, world, env, message):
    with pytest.raises(UserError) as e:
        resolve_rank_world(rank, world, env)
    assert str(e.value) == message


@pytest.mark.parametrize("envs", [
    [slurm(t, 5) for t in range(5)],
    [slurm(t, 8, lo=1) for t in range(1, 9)],                   # --array=1-8
    [slurm(t, 4, lo=2, step=5) for t in (2, 7, 12, 17)],        # --array=2-17:5
    [torchrun(r, 3) for r in range(3)],
    [k8s(i, 23) for i in range(23)],                             # one shard per index
    [k8s(i, 40) for i in range(40)],                             # more indexes than shards: some get none
    [srun(p, 4) for p in range(4)],                              # srun -n 4
    [srun(p, 4, slurm(t, 3)) for t in range(3) for p in range(4)],          # --array=0-2, srun -n 4 in each
    [srun(p, 2, slurm(t, 4, lo=2, step=5)) for t in (2, 7, 12, 17) for p in range(2)],  # --array=2-17:5, srun -n 2
    [srun(p, 3, slurm(t, 8, lo=1)) for t in range(1, 9) for p in range(3)],  # 24 ranks, 23 shards: one gets none
    [{}],
])
def test_partition_over_all_ranks_covers_every_shard_once(envs):
    resolved = [resolve_rank_world(None, None, env) for env in envs]
    world = resolved[0][1]
    assert sorted(r for r, _ in resolved) == list(range(world))  # every rank once, one world size
    assert {w for _, w in resolved} == {world}
    parts = [partition(SHARDS, r, w) for r, w in resolved]
    flat = [s for p in parts for s in p]
    assert sorted(flat) == sorted(SHARDS) and len(flat) == len(SHARDS)
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1  # balanced to within one shard


def test_srun_tasks_each_take_their_own_lock_and_identity():
    from pipeline.embedding.cluster import task_identity
    from pipeline.embedding.run_folder import lock_name

    envs = [srun(p, 4, slurm(t, 2)) for t in range(2) for p in range(4)]
    assert [lock_name(*resolve_rank_world(None, None, env)) for env in envs] == [f"_lock.{r}-of-8" for r in range(8)]
    assert [task_identity(env) for env in envs] == [f"slurm:4242_{t}.0/{p}" for t in range(2) for p in range(4)]


def test_partition_of_slurm_array_from_one_is_the_same_as_from_zero():
    from_zero = [partition(SHARDS, *resolve_rank_world(None, None, slurm(t, 4))) for t in range(4)]
    from_one = [partition(SHARDS, *resolve_rank_world(None, None, slurm(t, 4, lo=1))) for t in range(1, 5)]
    assert from_zero == from_one
    assert from_zero[1] == SHARDS[1::4]


def test_reads_os_environ_by_default(monkeypatch):
    for name in ("SLURM_ARRAY_TASK_ID", "RANK", "JOB_COMPLETION_INDEX", "EMBEDPIPE_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("JOB_COMPLETION_INDEX", "2")
    monkeypatch.setenv("EMBEDPIPE_WORLD_SIZE", "6")
    assert resolve_rank_world(None, None) == (2, 6)


SCHEDULER_VARS = ("EMBEDPIPE_TASK_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "SLURM_JOB_ID", "SLURM_STEP_ID",
                  "SLURM_PROCID")


@pytest.mark.parametrize("env, identity", [
    ({}, None),
    ({"SLURM_JOB_ID": "44"}, "slurm:44"),
    ({"SLURM_ARRAY_JOB_ID": "41", "SLURM_ARRAY_TASK_ID": "3", "SLURM_JOB_ID": "44", "SLURM_PROCID": "0"}, "slurm:41_3/0"),
    ({"SLURM_JOB_ID": "44", "SLURM_STEP_ID": "2", "SLURM_PROCID": "1"}, "slurm:44.2/1"),  # srun -n2: one per task
    ({"EMBEDPIPE_TASK_ID": "job-uid-7/4", "SLURM_JOB_ID": "44"}, "job-uid-7/4"),
    ({"JOB_COMPLETION_INDEX": "4"}, None),  # pods are retried under new names: the Job example sets EMBEDPIPE_TASK_ID
])
def test_task_identity(env, identity):
    from pipeline.embedding.cluster import task_identity

    assert task_identity(env) == identity


def _lock_of(tmp_path, owner: dict):
    import json

    from pipeline.embedding.run_folder import RunState

    state = RunState(tmp_path / "out", rank=3, world=8)
    state.out.mkdir(parents=True)
    state.lock.write_text(json.dumps(owner))
    return state


def test_requeued_slurm_task_takes_over_its_predecessors_lock_from_another_node(tmp_path, monkeypatch):
    import json
    import socket

    for name in SCHEDULER_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "41")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    state = _lock_of(tmp_path, {"pid": 1, "host": "gpu-node-17", "since": 0, "task": "slurm:41_3"})
    state.acquire()
    assert json.loads(state.lock.read_text())["task"] == "slurm:41_3"
    assert json.loads(state.lock.read_text())["host"] == socket.gethostname()
    state.release()
    assert not state.lock.exists()


def test_lock_of_another_task_or_a_live_process_is_refused(tmp_path, monkeypatch):
    import os
    import socket

    for name in SCHEDULER_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "41")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    other = _lock_of(tmp_path / "a", {"pid": 1, "host": "gpu-node-17", "since": 0, "task": "slurm:41_4"})
    with pytest.raises(UserError, match="in use by another embedpipe run .pid 1 on gpu-node-17"):
        other.acquire()
    live = _lock_of(tmp_path / "b", {"pid": os.getpid(), "host": socket.gethostname(), "since": 0, "task": "slurm:41_3"})
    with pytest.raises(UserError, match="in use by another embedpipe run"):
        live.acquire()  # same identity but alive here (two runs in one allocation): never taken over
    monkeypatch.delenv("SLURM_ARRAY_JOB_ID")
    monkeypatch.delenv("SLURM_ARRAY_TASK_ID")
    outside = _lock_of(tmp_path / "c", {"pid": 1, "host": "gpu-node-17", "since": 0, "task": None})
    with pytest.raises(UserError, match="in use by another embedpipe run"):
        outside.acquire()  # no scheduler, other host: cannot tell whether it is alive
