"""Slurm: submit.sh's exact chain, the scripts run by hand and as sbatch's spool copies from any working
directory, the index and probe steps' exit statuses, and whole chains run by the stub scheduler in
tests/slurm_sim.py: a failing array task never leaves a job that cannot start."""
from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from campaign import FULL
from job_scripts import JOBS, VENV_BIN, run_script, script_env, stub
from shards import jpeg_bytes, sample_image, write_tar
from slurm_sim import MiniSlurm


pytestmark = pytest.mark.slow  # real processes and files: in `make test`, not in the fast subset


SLURM = JOBS / "slurm"
DEFAULT_CONFIG = JOBS / "configs" / "gpu-default.toml"  # what every script uses without CONFIG


def _stub_sbatch(tmp_path: Path, line: str, reply: str) -> Path:
    """sbatch logging ``line`` (bash words: its variables, ``$*``) and answering ``reply`` (``$n``: the nth call)."""
    calls = tmp_path / "sbatch.log"
    stub(tmp_path / "bin", "sbatch", f"""n=$(( $(wc -l < {calls} 2>/dev/null || echo 0) + 1 ))
echo "{line}" >> {calls}
echo "{reply}"
""")
    return calls


def test_submit_chains_embed_then_index_and_probe_after_any_end(tmp_path):
    calls = _stub_sbatch(tmp_path, "STEP=${STEP:-} PROBE=${PROBE:-} SHARDS=$SHARDS OUT=$OUT INDEX=$INDEX "
                         "CONFIG=$CONFIG | $*", "$((1000 + n));cluster1")
    env = script_env(tmp_path / "bin", SHARDS="/d/s-{000..009}.tar", OUT="/d/emb/", TASKS="4",
                     LOGS=str(tmp_path / "logs"))
    res = run_script(SLURM / "submit.sh", env, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    common = f"SHARDS=/d/s-{{000..009}}.tar OUT=/d/emb INDEX=/d/emb-index CONFIG={DEFAULT_CONFIG} | --parsable"
    logs = f"--output={tmp_path}/logs/%x-%j.out"
    array_logs = f"--output={tmp_path}/logs/%x-%A_%a.out"
    assert calls.read_text().splitlines() == [
        f"STEP= PROBE= {common} --job-name=embedpipe-embed {array_logs} --array=0-3 {SLURM}/embed.sbatch",
        f"STEP=build PROBE= {common} --job-name=embedpipe-index {logs} --dependency=afterany:1001 "
        f"{SLURM}/index.sbatch",
        f"STEP= PROBE=/d/emb-probe {common} --job-name=embedpipe-probe {logs} --dependency=afterany:1001 "
        f"{SLURM}/probe.sbatch",
    ]
    assert res.stdout.splitlines()[:3] == ["embed:       job 1001 (4 array tasks)", "index:       job 1002",
                                           "probe:       job 1003"]


def test_submit_with_index_parts_trains_builds_parts_then_merges(tmp_path):
    calls = _stub_sbatch(tmp_path, "STEP=${STEP:-} $*", "$((2000 + n))")
    env = script_env(tmp_path / "bin", SHARDS="x.tar", OUT="/e", INDEX_PARTS="3", PROBE="none", LOGS=str(tmp_path))
    res = run_script(SLURM / "submit.sh", env, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    lines = [line.replace(f"--output={tmp_path}/", "").replace(f"{SLURM}/", "") for line in calls.read_text().splitlines()]
    assert lines == [
        "STEP= --parsable --job-name=embedpipe-embed %x-%A_%a.out --array=0-7 embed.sbatch",
        "STEP=train --parsable --job-name=embedpipe-index-train %x-%j.out --dependency=afterany:2001 index.sbatch",
        "STEP=part --parsable --job-name=embedpipe-index-part %x-%A_%a.out --dependency=afterok:2002 "
        "--kill-on-invalid-dep=yes --array=0-2 index.sbatch",
        "STEP=merge --parsable --job-name=embedpipe-index-merge %x-%j.out --dependency=afterok:2003 "
        "--kill-on-invalid-dep=yes index.sbatch",
    ]
    assert "index:       jobs 2002 (train), 2003 (3 parts), 2004 (merge)" in res.stdout


def test_submit_refuses_bad_numbers_before_submitting(tmp_path):
    stub(tmp_path / "bin", "sbatch", "echo called >&2; exit 9\n")
    res = run_script(SLURM / "submit.sh", script_env(tmp_path / "bin", SHARDS="x.tar", OUT="/e", TASKS="0"), tmp_path)
    assert res.returncode == 2
    assert res.stderr == "TASKS (0) must be a positive integer and INDEX_PARTS (0) 0 or more\n"
    res = run_script(SLURM / "submit.sh", script_env(tmp_path / "bin", OUT="/e"), tmp_path)
    assert res.returncode != 0 and "set SHARDS to the shard spec" in res.stderr


# -- the scripts on their own ----------------------------------------------------------------------

def _echo_embedpipe(tmp_path: Path, status_rc: int = 0) -> None:
    """A stub embedpipe printing its arguments; `status` prints a report like the real one's."""
    stub(tmp_path / "bin", "embedpipe", f"""echo "$*"
if [[ " $* " == *" status "* ]]; then echo "/e: 2/3 shards done, 1 failed, 1 pending"; exit {status_rc}; fi
""")


@pytest.mark.parametrize("step, exists, last", [
    ("build", False, f"--config {DEFAULT_CONFIG} index OUT --out OUT-index --update"),
    ("train", False, f"--config {DEFAULT_CONFIG} index OUT --out OUT-index --train-only --overwrite"),
    ("part", False, f"--config {DEFAULT_CONFIG} index OUT --out OUT-index --parts 4 --part 2"),
    ("merge", False, f"--config {DEFAULT_CONFIG} index-merge OUT-index"),
    # a rerun of the parted chain on an existing index: train and part do nothing, merge adds new shards
    ("build", True, f"--config {DEFAULT_CONFIG} index OUT --out OUT-index --update"),
    ("train", True, "nothing to train"),
    ("part", True, "nothing to part"),
    ("merge", True, f"--config {DEFAULT_CONFIG} index OUT --out OUT-index --update"),
])
def test_index_sbatch_steps(tmp_path, step, exists, last):
    _echo_embedpipe(tmp_path)
    out = tmp_path / "emb"
    out.mkdir()
    (out / "_SUCCESS").touch()
    if exists:
        (tmp_path / "emb-index").mkdir()
        (tmp_path / "emb-index" / "index.json").write_text("{}")
    env = script_env(tmp_path / "bin", OUT=f"{out}/", STEP=step, SLURM_ARRAY_TASK_ID="3", SLURM_ARRAY_TASK_MIN="1",
                     SLURM_ARRAY_TASK_COUNT="4")
    res = run_script(SLURM / "index.sbatch", env, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    said, want = res.stdout.splitlines()[-1], last.replace("OUT", str(out))
    assert said == want if want.startswith("--config") else want in said  # the command run, or what it says
@pytest.mark.parametrize("step", ["build", "merge"])
def test_index_of_an_incomplete_folder_is_built_then_exits_1_with_the_status(tmp_path, step):
    _echo_embedpipe(tmp_path, status_rc=1)
    out = tmp_path / "emb"  # no _SUCCESS: some shards failed or were never embedded
    res = run_script(SLURM / "index.sbatch", script_env(tmp_path / "bin", OUT=str(out), STEP=step), cwd=tmp_path)
    assert res.returncode == 1
    assert res.stdout.splitlines()[1].split(" ", 3)[2] == ("index" if step == "build" else "index-merge")
    assert f"{out} is incomplete (no _SUCCESS): {out}-index holds the done shards only" in res.stderr
    assert res.stderr.splitlines()[-2:] == ["status " + str(out), "/e: 2/3 shards done, 1 failed, 1 pending"]


def test_embed_sbatch_runs_embed_with_the_array_environment_from_any_directory(tmp_path):
    stub(tmp_path / "bin", "embedpipe", 'echo "$* | task=$SLURM_ARRAY_TASK_ID count=$SLURM_ARRAY_TASK_COUNT"\n')
    env = script_env(tmp_path / "bin", SHARDS="/s/{0..9}.tar", OUT="/e", SLURM_ARRAY_TASK_ID="2",
                     SLURM_ARRAY_TASK_COUNT="8", SLURM_CPUS_PER_TASK="6")
    res = run_script(SLURM / "embed.sbatch", env, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines()[-1] == (f"--config {DEFAULT_CONFIG} embed /s/{{0..9}}.tar --out /e --workers 6 "
                                           "| task=2 count=8")
    res = run_script(SLURM / "embed.sbatch", script_env(tmp_path / "bin", OUT="/e"), cwd=tmp_path)
    assert res.returncode != 0 and "set SHARDS to the shard spec" in res.stderr


@pytest.mark.parametrize("script", ["embed.sbatch", "index.sbatch", "probe.sbatch"])
def test_a_spool_copy_finds_the_default_config_through_scontrol(tmp_path, script):
    """sbatch runs a copy of the script (slurmd's spool); the original's folder comes from `scontrol show job`."""
    _echo_embedpipe(tmp_path)
    spool = tmp_path / "spool" / "job77"
    spool.mkdir(parents=True)
    copy = spool / "slurm_script"
    copy.write_text((SLURM / script).read_text())
    (tmp_path / "emb").mkdir()
    (tmp_path / "emb" / "_SUCCESS").touch()
    env = script_env(tmp_path / "bin", SHARDS="s.tar", OUT=str(tmp_path / "emb"), SLURM_JOB_ID="77")
    res = run_script(copy, env, cwd=tmp_path)  # no scontrol on PATH: the default cannot be found
    assert res.returncode == 2
    assert res.stderr == (f"CONFIG={tmp_path}/spool/configs/gpu-default.toml does not exist; set CONFIG to a job config "
                          "(jobs/configs/*.toml)\n")
    stub(tmp_path / "bin", "scontrol", f'[[ "$*" == "show job 77" ]] && echo "   Command={SLURM / script}"\n')
    res = run_script(copy, env, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert f"--config {DEFAULT_CONFIG} " in res.stdout


@pytest.mark.parametrize("message, rc, expected_rc, skipped", [
    ("error: no labels found in /e (label source 'label', 40 rows); embed shards that carry .cls files", 2, 0, True),
    ("error: only one class ('7') in /e; a classifier needs at least two distinct labels", 2, 2, False),
    ("error: no labels found in /e", 1, 1, False),  # the message alone is not enough: a user error is exit 2
    ("trained", 0, 0, False),
])
def test_probe_sbatch_skips_unlabelled_collections_and_fails_otherwise(tmp_path, message, rc, expected_rc, skipped):
    stub(tmp_path / "bin", "embedpipe", f'echo "$*"; echo "{message}" >&2; exit {rc}\n')
    res = run_script(SLURM / "probe.sbatch", script_env(tmp_path / "bin", OUT="/e"), cwd=tmp_path)
    assert res.returncode == expected_rc
    assert message in res.stderr  # the log shows embedpipe's own words either way
    assert res.stdout.splitlines()[1] == f"--config {DEFAULT_CONFIG} probe /e --out /e-probe"
    assert ("probe skipped: /e has no labels" in res.stdout) == skipped


# -- whole chains, run by the stub scheduler ---------------------------------------------------------

def _stub_embedpipe_for_chains(tmp_path: Path) -> Path:
    """embed: fails in array task $FAIL_TASK, else marks its part done; the last part writes _SUCCESS (as the
    real runner does). `index --train-only` fails when $FAIL_TRAIN is set. Every call is logged."""
    log = tmp_path / "embedpipe.log"
    stub(tmp_path / "bin", "embedpipe", f"""out=; cmd=; prev=
for a in "$@"; do
    [[ $prev == --out ]] && out=$a
    [[ -z $cmd && $a =~ ^(embed|index|index-merge|probe|status)$ ]] && cmd=$a
    prev=$a
done
echo "$cmd task=${{SLURM_ARRAY_TASK_ID:--}}" >> {log}
case $cmd in
    embed)
        if [[ ${{SLURM_ARRAY_TASK_ID}} == "${{FAIL_TASK:-}}" ]]; then echo "1 shard(s) failed" >&2; exit 1; fi
        mkdir -p "$out"; touch "$out/part-$SLURM_ARRAY_TASK_ID"
        if [[ $(ls "$out"/part-* | wc -l) -eq $SLURM_ARRAY_TASK_COUNT ]]; then touch "$out/_SUCCESS"; fi ;;
    index)  # refuses what the real one refuses: an existing --out without --update/--overwrite, and so on
        if [[ -n ${{FAIL_TRAIN:-}} && " $* " == *" --train-only "* ]]; then exit 1; fi
        if [[ " $* " == *" --train-only "* ]]; then
            [[ ! -e $out.parts || " $* " == *" --overwrite "* ]] || {{ echo "error: $out.parts already exists" >&2; exit 2; }}
            mkdir -p "$out.parts"
        elif [[ " $* " == *" --parts "* ]]; then
            [[ -d $out.parts ]] || {{ echo "error: $out.parts/train.json is missing" >&2; exit 2; }}
        else
            if [[ -e $out && " $* " != *" --update "* && " $* " != *" --overwrite "* ]]; then
                echo "error: $out already exists; pass --update to add new shards to it, or --overwrite to rebuild" >&2
                exit 2
            fi
            [[ -e $out ]] && echo "nothing to add"
            mkdir -p "$out"; touch "$out/index.json"
        fi ;;
    index-merge)
        idx=${{*: -1}}; [[ $idx == --overwrite ]] && idx=${{*: -2:1}}
        if [[ -e $idx && " $* " != *" --overwrite "* ]]; then echo "error: $idx already exists" >&2; exit 2; fi
        mkdir -p "$idx"; touch "$idx/index.json" ;;
    probe) mkdir -p "$out" ;;
    status) echo "  failed /d/s-$FAIL_TASK.tar: truncated tar"; exit 1 ;;
esac
""")
    return log


@pytest.mark.parametrize("extra, fail, states", [
    ({}, {}, {"embed": "COMPLETED", "index": "COMPLETED", "probe": "COMPLETED"}),
    ({}, {"FAIL_TASK": "1"}, {"embed": "FAILED", "index": "FAILED", "probe": "COMPLETED"}),
    ({"INDEX_PARTS": "2", "PROBE": "none"}, {"FAIL_TASK": "2"},
     {"embed": "FAILED", "index-train": "COMPLETED", "index-part": "COMPLETED", "index-merge": "FAILED"}),
    ({"INDEX_PARTS": "2"}, {"FAIL_TRAIN": "1"}, {"embed": "COMPLETED", "index-train": "FAILED",
                                                 "index-part": "CANCELLED", "index-merge": "CANCELLED",
                                                 "probe": "COMPLETED"}),
])
def test_no_job_of_the_chain_is_left_pending(tmp_path, extra, fail, states):
    slurm = MiniSlurm(tmp_path)
    log = _stub_embedpipe_for_chains(tmp_path)
    env = script_env(tmp_path / "bin", SHARDS="/d/s-{0..2}.tar", OUT=str(tmp_path / "emb"), TASKS="3",
                     **extra, **fail)
    env["PATH"] = f"{slurm.bin}:{env['PATH']}"
    res = run_script(SLURM / "submit.sh", env, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    jobs = slurm.run()
    assert slurm.squeue(jobs) == []
    assert {j.name.removeprefix("embedpipe-"): j.state for j in jobs.values()} == states
    cancelled = [j for j in jobs.values() if j.state == "CANCELLED"]
    assert all(j.reason == "DependencyNeverSatisfied" and not j.tasks for j in cancelled)
    index = next(j for j in jobs.values() if j.name in ("embedpipe-index", "embedpipe-index-merge"))
    if "FAIL_TASK" in fail:  # the index ran on the done parts and its log names the failed shard
        assert f"failed /d/s-{fail['FAIL_TASK']}.tar: truncated tar" in index.output()
    calls = log.read_text().splitlines()
    assert calls[:3] == ["embed task=0", "embed task=1", "embed task=2"]


@pytest.mark.parametrize("extra", [{}, {"INDEX_PARTS": "2"}], ids=["build", "parts"])
def test_the_whole_chain_runs_again_on_the_same_folders(tmp_path, extra):
    """A second submit.sh on the same OUT, INDEX and PROBE: index (or train, parts, merge) and probe exit 0,
    and the index is updated (`index --update`), never refused as already existing."""
    _stub_embedpipe_for_chains(tmp_path)
    out = tmp_path / "emb"
    env = script_env(tmp_path / "bin", SHARDS="/d/s-{0..2}.tar", OUT=str(out), TASKS="3", **extra)
    for run in ("first", "second"):
        slurm = MiniSlurm(tmp_path / run)
        res = run_script(SLURM / "submit.sh", {**env, "PATH": f"{slurm.bin}:{env['PATH']}"}, cwd=tmp_path)
        assert res.returncode == 0, res.stderr
        jobs = slurm.run()
        assert slurm.squeue(jobs) == []
        failed = [j.output() for j in jobs.values() if j.state != "COMPLETED"]
        assert not failed, failed
    assert (tmp_path / "emb-index").is_dir() and (tmp_path / "emb-probe").is_dir()
    assert not (out / "index").exists() and not (out / "probe").exists()
    last = next(j for j in jobs.values() if j.name in ("embedpipe-index", "embedpipe-index-merge"))
    assert "nothing to add" in last.output()


def test_the_scheduler_stub_shows_a_stalled_chain(tmp_path):
    """The check above can fail: an afterok dependent of a failed array stays pending (the old chain)."""
    slurm = MiniSlurm(tmp_path)
    script = tmp_path / "task.sh"
    script.write_text('#!/usr/bin/env bash\n[[ ${SLURM_ARRAY_TASK_ID:-0} != 1 ]]\n')
    env = script_env(slurm.bin)
    for args in (["--array=0-2"], ["--dependency=afterok:1001"], ["--dependency=afterany:1001"],
                 ["--dependency=afterok:1001", "--kill-on-invalid-dep=yes"]):
        submitted = subprocess.run(["sbatch", "--parsable", *args, str(script)], env=env, capture_output=True, text=True)
        assert submitted.returncode == 0, submitted.stderr
    jobs = slurm.run()
    assert [(j.state, j.reason) for j in jobs.values()] == [
        ("FAILED", ""), ("PENDING", "DependencyNeverSatisfied"), ("COMPLETED", ""),
        ("CANCELLED", "DependencyNeverSatisfied")]
    assert slurm.squeue(jobs) == ["1002  PENDING DependencyNeverSatisfied"]


# -- with the real embedpipe -------------------------------------------------------------------------

def _real_embedpipe() -> Path:
    exe = VENV_BIN / "embedpipe"
    if not exe.exists():
        pytest.skip(f"{exe} not installed")
    return exe


@pytest.mark.slow
def test_a_chain_with_a_corrupt_shard_indexes_the_rest_then_the_readme_recovery_and_a_rerun_succeed(tmp_path):
    """A chain, a failure, the README's fix (rerun the embed array, then index.sbatch), then the whole chain
    again on the same folders: every job can run again, and the rerun of index and probe exits 0."""
    import json

    from pipeline.sample_data import write_sample_shards

    shards = tmp_path / "shards"  # 3 x 20 labelled digits, and a truncated 4th shard for array task 1
    write_sample_shards(shards, "digits", limit=60, shard_size=20, image_size=64, fmt="jpg")
    good = (shards / "digits-000000.tar").read_bytes()
    (shards / "digits-000003.tar").write_bytes(good[: len(good) // 2])
    out = tmp_path / "emb"
    env = script_env(tmp_path / "bin", SHARDS=str(shards / "*.tar"), OUT=str(out), TASKS="2",
                     EMBEDPIPE=str(_real_embedpipe()), CONFIG=str(JOBS / "configs" / "smoke-cpu.toml"),
                     LOGS=str(tmp_path / "logs"))

    def chain(name: str, *submissions: list[str]) -> dict:
        slurm = MiniSlurm(tmp_path / name)
        run_env = {**env, "PATH": f"{slurm.bin}:{env['PATH']}"}
        for args in submissions:  # each: [VAR=value ..., sbatch options ..., script]
            extra = dict(a.split("=", 1) for a in args if not a.startswith("-") and "=" in a)
            argv = [a for a in args if a.startswith("-") or "=" not in a]
            res = subprocess.run(argv, env={**run_env, **extra}, cwd=tmp_path, capture_output=True, text=True,
                                 timeout=60)
            assert res.returncode == 0, res.stderr
        jobs = slurm.run()
        assert slurm.squeue(jobs) == []
        return {j.name.removeprefix("embedpipe-"): j for j in jobs.values()}

    jobs = chain("first", ["bash", str(SLURM / "submit.sh")])
    embed, index, probe = jobs["embed"], jobs["index"], jobs["probe"]
    assert [t.returncode for t in embed.tasks.values()] == [0, 1]  # task 1 had digits-000001 and the broken one
    assert (index.state, probe.state) == ("FAILED", "COMPLETED"), index.output() + probe.output()
    assert f"failed {shards}/digits-000003.tar" in index.output()
    meta = json.loads((tmp_path / "emb-index" / "index.json").read_text())  # INDEX and PROBE outside OUT
    assert meta["count"] == 60 and len(meta["shards"]) == 3  # every done shard is searchable
    assert (tmp_path / "emb-probe" / "metrics.json").is_file()
    assert not (out / "index").exists() and not (out / "probe").exists()

    # The fix: a good digits-000003, then the README's recovery, as written: the embed array, then index.sbatch.
    fixed = tmp_path / "fixed"
    write_sample_shards(fixed, "digits", limit=80, shard_size=20, image_size=64, fmt="jpg")
    (shards / "digits-000003.tar").write_bytes((fixed / "digits-000003.tar").read_bytes())
    jobs = chain("recovery", ["sbatch", "--parsable", "--job-name=embedpipe-embed", "--array=0-1",
                              str(SLURM / "embed.sbatch")],
                 ["sbatch", "--parsable", "--job-name=embedpipe-index", "--dependency=afterany:1001",
                  str(SLURM / "index.sbatch")],
                 ["sbatch", "--parsable", "--job-name=embedpipe-probe", "--dependency=afterany:1001",
                  str(SLURM / "probe.sbatch")])
    assert {n: j.state for n, j in jobs.items()} == {"embed": "COMPLETED", "index": "COMPLETED",
                                                      "probe": "COMPLETED"}, jobs["index"].output()
    assert json.loads((tmp_path / "emb-index" / "index.json").read_text())["count"] == 80  # updated, not rebuilt

    # The whole chain again on the same folders: nothing new, nothing fails.
    jobs = chain("rerun", ["bash", str(SLURM / "submit.sh")])
    assert {n: j.state for n, j in jobs.items()} == {"embed": "COMPLETED", "index": "COMPLETED",
                                                      "probe": "COMPLETED"}, jobs["index"].output()
    assert "nothing to add" in jobs["index"].output()
    assert json.loads((tmp_path / "emb-index" / "index.json").read_text())["count"] == 80
    assert (tmp_path / "emb-probe" / "metrics.json").is_file()


@pytest.mark.slow
@pytest.mark.skipif(not FULL, reason="campaign only (EMBEDPIPE_CAMPAIGN=1): the stub-scheduler tests cover the skip")
def test_probe_sbatch_with_the_real_embedpipe_skips_an_unlabelled_folder(tmp_path):
    exe = _real_embedpipe()
    samples = [{"__key__": f"img{i:03d}", "jpg": jpeg_bytes(sample_image((64, 64), seed=i)), "txt": f"caption {i}"}
               for i in range(12)]  # as img2dataset writes them: image, caption, no class
    shard = write_tar(tmp_path / "web-000000.tar", samples)
    config = str(JOBS / "configs" / "smoke-cpu.toml")
    embedded = subprocess.run([str(exe), "--config", config, "embed", str(shard), "--out", str(tmp_path / "emb")],
                              capture_output=True, text=True, timeout=120)
    assert embedded.returncode == 0, embedded.stderr
    env = script_env(tmp_path / "bin", OUT=str(tmp_path / "emb"), EMBEDPIPE=str(exe), CONFIG=config)
    res = run_script(SLURM / "probe.sbatch", env, cwd=tmp_path, timeout=120)
    assert res.returncode == 0, res.stderr
    assert f"probe skipped: {tmp_path}/emb has no labels" in res.stdout
    assert "no labels found in" in res.stderr
    assert not (tmp_path / "emb" / "probe").exists()
