"""Rank and world size of this task: explicit values, else the scheduler's environment (Slurm, torchrun, Kubernetes)."""
from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from ..errors import UserError

# Conventions, tried in this order when --rank is not given:
#   Slurm job arrays      SLURM_ARRAY_TASK_ID (minus SLURM_ARRAY_TASK_MIN, over SLURM_ARRAY_TASK_STEP)
#                         of SLURM_ARRAY_TASK_COUNT; when each array task runs an `srun -n K` step, its K tasks
#                         split the array task's part: array rank * K + SLURM_PROCID of count * K
#   torchrun / torch.distributed   RANK of WORLD_SIZE (before srun's variables: torchrun under srun starts
#                                  several processes per srun task, and RANK is the finer one)
#   srun multi-task step           SLURM_PROCID of SLURM_NTASKS
#   Kubernetes Indexed Job         JOB_COMPLETION_INDEX of --world-size or EMBEDPIPE_WORLD_SIZE (= completions)
WORLD_ENV = "EMBEDPIPE_WORLD_SIZE"


@dataclass(frozen=True)
class RankWorld:
    """This task's ``rank`` in ``[0, world)`` and where both numbers came from (for the log line)."""

    rank: int
    world: int
    source: str


def _int(env: Mapping[str, str], name: str, fix: str) -> int | None:
    """The integer in ``env[name]``, None when unset or empty; a non-integer is a UserError naming the variable."""
    raw = env.get(name, "").strip()
    if not raw:
        return None
    try:
        return int(raw)
    except ValueError:
        raise UserError(f"{name}={env[name]!r} is not an integer; {fix}") from None


Found = tuple[int, str, "int | None", str]  # rank, how it was found, world (None: not given), how


def _srun(env: Mapping[str, str]) -> tuple[int, int, str, str] | None:
    """This process's place in a multi-task srun step: ``(procid, ntasks, shown procid, shown ntasks)``.

    None outside Slurm and in one-task steps (they add nothing to an array's rank).
    """
    fix = "srun sets SLURM_PROCID and SLURM_NTASKS in each task; or pass --rank and --world-size"
    procid = _int(env, "SLURM_PROCID", fix)
    ntasks_name = "SLURM_NTASKS" if env.get("SLURM_NTASKS", "").strip() else "SLURM_STEP_NUM_TASKS"
    ntasks = _int(env, ntasks_name, fix)
    if procid is None or ntasks is None or ntasks == 1:
        return None
    if procid == 0 and not env.get("SLURM_STEP_NUM_TASKS", "").strip():
        # srun sets SLURM_STEP_NUM_TASKS in every task it starts; the batch script of an --ntasks=N job has
        # SLURM_PROCID=0 and SLURM_NTASKS=N but is one process, which would embed 1/N of the shards alone.
        raise UserError(f"SLURM_NTASKS={ntasks} but this process was not started by srun (SLURM_PROCID=0, no "
                        f"SLURM_STEP_NUM_TASKS): it is the job's batch script, and alone it would embed only 1/"
                        f"{ntasks} of the shards; start the tasks with `srun embedpipe embed ...`, or pass "
                        "--rank 0 --world-size 1 to embed every shard in this one process")
    if not 0 <= procid < ntasks:
        raise UserError(f"SLURM_PROCID={procid} is not in [0, {ntasks_name}={ntasks}); {fix}")
    return procid, ntasks, f"SLURM_PROCID={procid}", f"{ntasks_name}={ntasks}"


def _slurm_array(env: Mapping[str, str]) -> Found | None:
    fix = "run inside a Slurm job array (sbatch --array=0-N) or pass --rank and --world-size"
    task = _int(env, "SLURM_ARRAY_TASK_ID", fix)
    if task is None:
        return None
    lo = _int(env, "SLURM_ARRAY_TASK_MIN", fix)
    step = _int(env, "SLURM_ARRAY_TASK_STEP", fix) or 1
    count = _int(env, "SLURM_ARRAY_TASK_COUNT", fix)
    lo = 0 if lo is None else lo
    count_src = f"SLURM_ARRAY_TASK_COUNT={count}"
    if count is None:  # old Slurm: derive the count from the bounds
        hi = _int(env, "SLURM_ARRAY_TASK_MAX", fix)
        count = None if hi is None else (hi - lo) // step + 1
        count_src = f"SLURM_ARRAY_TASK_MIN..MAX={lo}..{hi}"
    if step < 1 or (task - lo) % step:
        raise UserError(f"SLURM_ARRAY_TASK_ID={task} is not on the array's range (min {lo}, step {step}); "
                        "use a contiguous range such as --array=0-N, or pass --rank and --world-size")
    shown = f"SLURM_ARRAY_TASK_ID={task}"
    if lo:
        shown += f" - SLURM_ARRAY_TASK_MIN={lo}"
    if step > 1:
        shown += f" / SLURM_ARRAY_TASK_STEP={step}"
    rank = (task - lo) // step
    step_task = _srun(env)
    if step_task is None:
        return rank, shown, count, count_src
    # Each array task's srun step: its K tasks take consecutive ranks, so every (array task, step task) pair
    # is one rank of count * K and the parts still cover the shard list once.
    procid, ntasks, procid_src, ntasks_src = step_task
    return (rank * ntasks + procid, f"({shown}) * {ntasks_src} + {procid_src}",
            None if count is None else count * ntasks, f"{count_src} * {ntasks_src}")


def _srun_step(env: Mapping[str, str]) -> Found | None:
    step_task = _srun(env)
    return None if step_task is None else (step_task[0], step_task[2], step_task[1], step_task[3])


def _torchrun(env: Mapping[str, str]) -> Found | None:
    fix = "torchrun sets RANK and WORLD_SIZE; unset them, or pass --rank and --world-size"
    rank = _int(env, "RANK", fix)
    if rank is None:
        return None
    world = _int(env, "WORLD_SIZE", fix)
    return rank, f"RANK={rank}", world, f"WORLD_SIZE={world}"


def _k8s(env: Mapping[str, str]) -> Found | None:
    fix = "Kubernetes sets it in Indexed Jobs (completionMode: Indexed); or pass --rank and --world-size"
    rank = _int(env, "JOB_COMPLETION_INDEX", fix)
    if rank is None:
        return None
    return rank, f"JOB_COMPLETION_INDEX={rank}", None, ""


def _conventions(env: Mapping[str, str]) -> Found | None:
    """The first convention found in ``env``, in the order of the table at the top of this module."""
    return _slurm_array(env) or _torchrun(env) or _srun_step(env) or _k8s(env)


def resolve(rank: int | None = None, world: int | None = None, env: Mapping[str, str] | None = None) -> RankWorld:
    """Like :func:`resolve_rank_world`, and also says which convention gave the numbers (``.source``).

    Example:
        >>> resolve(None, None, {"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_MIN": "1",
        ...                      "SLURM_ARRAY_TASK_COUNT": "8"}).source
        'SLURM_ARRAY_TASK_ID=3 - SLURM_ARRAY_TASK_MIN=1 of SLURM_ARRAY_TASK_COUNT=8'
    """
    env = os.environ if env is None else env
    rank_src = world_src = ""
    if rank is not None:
        rank_src = f"--rank {rank}"
    if world is not None:
        world_src = f"--world-size {world}"
    found = None if rank is not None and world is not None else _conventions(env)
    if found is not None:
        env_rank, env_rank_src, env_world, env_world_src = found
        if rank is None:
            rank, rank_src = env_rank, env_rank_src
        if world is None and env_world is not None:
            world, world_src = env_world, env_world_src
    if world is None:
        world = _int(env, WORLD_ENV, f"set {WORLD_ENV} to the number of tasks (the Job's completions)")
        world_src = f"{WORLD_ENV}={world}" if world is not None else ""
    if rank is None and world is None:
        return RankWorld(0, 1, "default (one task: no --rank/--world-size, no cluster environment)")
    source = " of ".join(s for s in (rank_src, world_src) if s)
    if world is None:
        if rank_src.startswith("JOB_COMPLETION_INDEX"):
            raise UserError(f"{source} gives this task's rank but not the number of tasks: pass --world-size equal "
                            f"to the Job's `completions` (or set {WORLD_ENV} in the pod's env)")
        if rank_src.startswith("RANK"):
            raise UserError(f"{source} is set but WORLD_SIZE is not; set WORLD_SIZE (torchrun does) or pass "
                            "--world-size N")
        raise UserError(f"{source} gives this task's rank but not the number of tasks; pass --world-size N "
                        f"(or set {WORLD_ENV})")
    if world < 1:
        raise UserError(f"world size {world} (from {source}) must be at least 1; pass --world-size N with N >= 1")
    if rank is None:
        if world == 1:
            return RankWorld(0, 1, source)
        raise UserError(f"world size {world} (from {source}) but no rank for this task: pass --rank I with "
                        "0 <= I < world size, or run as a Slurm array / torchrun / Kubernetes Indexed Job task")
    if not 0 <= rank < world:
        hint = "ranks count from 0 to world size - 1"
        if "SLURM_ARRAY_TASK_ID" in rank_src:
            hint = "the array needs as many tasks as the world size (e.g. --array=0-N-1 or --array=1-N)"
        elif rank_src.startswith("JOB_COMPLETION_INDEX"):
            hint = f"--world-size / {WORLD_ENV} must equal the Job's `completions`"
        raise UserError(f"rank {rank} is not in [0, {world}) (from {source}); {hint}")
    return RankWorld(rank, world, source)


def resolve_rank_world(rank: int | None, world: int | None,
                       env: Mapping[str, str] | None = None) -> tuple[int, int]:
    """This task's ``(rank, world)``: explicit values win, else the first cluster convention found in ``env``.

    Slurm job arrays (``SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN`` of ``SLURM_ARRAY_TASK_COUNT``, so
    ``--array=1-8`` gives ranks 0..7; with an ``srun -n K`` step in each array task, array rank * K +
    ``SLURM_PROCID`` of count * K), torchrun (``RANK`` of ``WORLD_SIZE``), srun multi-task steps
    (``SLURM_PROCID`` of ``SLURM_NTASKS``), Kubernetes Indexed Jobs (``JOB_COMPLETION_INDEX`` of
    ``--world-size`` or ``EMBEDPIPE_WORLD_SIZE``). With none of them: ``(0, 1)``.
    ``env`` defaults to ``os.environ``.
    Inconsistent or non-integer values are a :class:`~pipeline.errors.UserError` naming the variable.

    Example:
        >>> resolve_rank_world(None, None, {"JOB_COMPLETION_INDEX": "5", "EMBEDPIPE_WORLD_SIZE": "8"})
        (5, 8)
        >>> resolve_rank_world(None, None, {"SLURM_PROCID": "1", "SLURM_NTASKS": "4"})  # srun -n 4
        (1, 4)
        >>> resolve_rank_world(None, None, {})
        (0, 1)
    """
    rw = resolve(rank, world, env)
    return rw.rank, rw.world


def task_identity(env: Mapping[str, str] | None = None) -> str | None:
    """Who this task is to its scheduler, which never runs two live instances of one identity at once.

    A lock left by a task with the same identity belongs to a dead earlier attempt (a requeued Slurm
    array task on another node, a retried Kubernetes pod), so it may be taken over. ``EMBEDPIPE_TASK_ID``
    wins (the Kubernetes example sets it to the Job's uid and completion index); else the Slurm array task
    or job id. None outside a scheduler.

    Example:
        >>> task_identity({"SLURM_ARRAY_JOB_ID": "41", "SLURM_ARRAY_TASK_ID": "3", "SLURM_JOB_ID": "44",
        ...                "SLURM_PROCID": "0"})
        'slurm:41_3/0'
    """
    env = os.environ if env is None else env
    if env.get("EMBEDPIPE_TASK_ID", "").strip():
        return env["EMBEDPIPE_TASK_ID"].strip()
    if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
        ident = f"slurm:{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    elif env.get("SLURM_JOB_ID"):
        ident = f"slurm:{env['SLURM_JOB_ID']}"
    else:
        return None
    # Steps and tasks of one job (`srun -n2 ...`) run at the same time: each is its own identity.
    for name, sep in (("SLURM_STEP_ID", "."), ("SLURM_PROCID", "/")):
        if env.get(name):
            ident += f"{sep}{env[name]}"
    return ident


def describe_source(rank: int | None, world: int | None, env: Mapping[str, str] | None = None) -> str:
    """Where :func:`resolve_rank_world` takes its numbers from, e.g. ``'RANK=2 of WORLD_SIZE=4'``."""
    return resolve(rank, world, env).source
