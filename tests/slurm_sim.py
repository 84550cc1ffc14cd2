"""A stub `sbatch` that records submissions, and a tiny scheduler that runs them as Slurm would.

The scheduler follows sbatch(1) on what matters to a chain: a job starts once its dependencies are
satisfied (`afterok:ID`: ID completed with exit status 0 in every array task; `afterany:ID`: ID ended in
any state); a dependency that can no longer be satisfied leaves the job PENDING with reason
DependencyNeverSatisfied (on a real cluster: forever), unless it was submitted with
`--kill-on-invalid-dep=yes`, which cancels it. Jobs run the real scripts with bash, as sbatch does: a copy
in a spool folder, the submitter's environment plus the SLURM_* variables of the job (or array task), and
a stub `scontrol show job` that names the original script. What is left PENDING at the end is a stalled
chain.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from job_scripts import stub

SBATCH = """import json, os, sys
from pathlib import Path
log = Path({log!r})
n = len(log.read_text().splitlines()) if log.exists() else 0
job = {{"id": {first} + n, "args": sys.argv[1:], "env": dict(os.environ), "cwd": os.getcwd()}}
with log.open("a") as f:
    f.write(json.dumps(job) + "\\n")
print(f"{{job['id']}};cluster1")
"""


@dataclass
class Job:
    id: int
    script: Path
    env: dict[str, str]
    cwd: str
    name: str = ""
    array: list[int] | None = None
    deps: list[tuple[str, int]] = field(default_factory=list)
    kill_on_invalid_dep: bool = False
    state: str = "PENDING"
    reason: str = ""
    tasks: dict[int | None, subprocess.CompletedProcess] = field(default_factory=dict)

    def output(self) -> str:
        """Every task's stdout and stderr, as the job's log files would hold them."""
        return "".join(r.stdout + r.stderr for r in self.tasks.values())


class MiniSlurm:
    """Install with ``MiniSlurm(tmp_path)``, put ``.bin`` first on PATH, submit, then :meth:`run`."""

    def __init__(self, root: Path, first_id: int = 1001):
        self.root = root
        self.bin = root / "slurm-bin"
        self.log = root / "sbatch.jsonl"
        self.commands = root / "scontrol.txt"  # "ID ORIGINAL-SCRIPT" per job, for scontrol show job
        self.bin.mkdir(parents=True, exist_ok=True)
        sbatch = self.bin / "sbatch"
        sbatch.write_text(f"#!{sys.executable}\n" + SBATCH.format(log=str(self.log), first=first_id))
        sbatch.chmod(0o755)
        stub(self.bin, "scontrol", f"""[[ $1 == show && $2 == job ]] || exit 1
cmd=$(sed -n "s/^${{3%%_*}} //p" {self.commands})
[[ -n $cmd ]] || {{ echo "slurm_load_jobs error: Invalid job id specified" >&2; exit 1; }}
echo "JobId=$3 JobName=x"
echo "   Command=$cmd"
""")

    def jobs(self) -> dict[int, Job]:
        jobs = {}
        for line in self.log.read_text().splitlines():
            rec = json.loads(line)
            job = Job(rec["id"], Path(rec["args"][-1]), rec["env"], rec["cwd"])
            for arg in rec["args"][:-1]:
                name, _, value = arg.partition("=")
                if name == "--job-name":
                    job.name = value
                elif name == "--array":
                    lo, _, hi = value.partition("-")
                    job.array = list(range(int(lo), int(hi or lo) + 1))
                elif name == "--dependency":
                    kind, *ids = value.split(":")
                    job.deps = [(kind, int(i)) for i in ids]
                elif name == "--kill-on-invalid-dep":
                    job.kill_on_invalid_dep = value == "yes"
            jobs[job.id] = job
        return jobs

    def run(self) -> dict[int, Job]:
        """Run every submitted job whose dependencies allow it, until nothing changes; return all jobs."""
        jobs = self.jobs()
        with self.commands.open("w") as f:
            f.writelines(f"{j.id} {j.script}\n" for j in jobs.values())
        changed = True
        while changed:
            changed = False
            for job in (j for j in jobs.values() if j.state == "PENDING"):
                ended = [jobs[i].state for _, i in job.deps if jobs[i].state != "PENDING"]
                never = any(kind == "afterok" and jobs[i].state in ("FAILED", "CANCELLED") for kind, i in job.deps)
                if never:
                    job.reason = "DependencyNeverSatisfied"
                    if job.kill_on_invalid_dep:
                        job.state, changed = "CANCELLED", True
                elif len(ended) == len(job.deps):
                    self._start(job)
                    changed = True
        return jobs

    def _start(self, job: Job) -> None:
        spool = self.root / "spool" / f"job{job.id}"
        spool.mkdir(parents=True)
        copy = shutil.copy(job.script, spool / "slurm_script")
        env = {**job.env, "PATH": f"{self.bin}:{job.env['PATH']}", "SLURM_JOB_ID": str(job.id),
               "SLURM_JOB_NAME": job.name, "SLURM_SUBMIT_DIR": job.cwd}
        for task in job.array or [None]:
            task_env = dict(env)
            if task is not None:
                assert job.array is not None
                task_env.update(SLURM_JOB_ID=f"{job.id}_{task}", SLURM_ARRAY_JOB_ID=str(job.id),
                                SLURM_ARRAY_TASK_ID=str(task), SLURM_ARRAY_TASK_MIN=str(job.array[0]),
                                SLURM_ARRAY_TASK_MAX=str(job.array[-1]), SLURM_ARRAY_TASK_COUNT=str(len(job.array)))
            job.tasks[task] = subprocess.run(["bash", str(copy)], env=task_env, cwd=job.cwd, capture_output=True,
                                             text=True, timeout=300)
        job.state = "COMPLETED" if all(r.returncode == 0 for r in job.tasks.values()) else "FAILED"

    @staticmethod
    def squeue(jobs: dict[int, Job]) -> list[str]:
        """What `squeue -h -o '%i %j %T %r'` would still show: the jobs that never ran."""
        return [f"{j.id} {j.name} {j.state} {j.reason}" for j in jobs.values() if j.state == "PENDING"]
