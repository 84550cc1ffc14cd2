"""Kubernetes: every manifest in jobs/k8s validates against the Kubernetes schema (kubernetes-validate ships
the OpenAPI schemas of each release, so this runs offline), the Jobs agree with each other, their container
scripts behave, and submit.sh starts index and probe only once the embed Job has ended."""
from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

from job_scripts import JOBS, run_script, script_env, stub


pytestmark = pytest.mark.slow  # real processes and files: in `make test`, not in the fast subset


K8S = JOBS / "k8s"
MANIFESTS = sorted(K8S.glob("*.yaml"))
# The oldest release the manifests promise to work on (backoffLimitPerIndex, podFailurePolicy), and the newest
# whose schema the installed validator ships.
OLDEST = "1.29"


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _one(name: str) -> dict:
    (doc,) = _docs(K8S / name)
    return doc


def _pod(job: dict) -> tuple[dict, dict]:
    """The pod spec of a Job and its one container."""
    pod = job["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    return pod, container


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_manifest_validates_against_the_kubernetes_schema(path):
    kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate "
                                              "(part of the [dev] extra)")
    docs = _docs(path)
    assert docs, f"{path} holds no manifest"
    for version in (OLDEST, kubernetes_validate.latest_version()):
        for doc in docs:  # strict: an unknown or misplaced field is an error, as `kubectl apply` would say
            kubernetes_validate.validate(doc, version, strict=True)


def test_the_validator_refuses_a_misplaced_field():
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    job = _one("index-job.yaml")
    job["spec"]["template"]["spec"]["backoffLimit"] = 2  # belongs to the Job's spec, not the pod's
    with pytest.raises(kubernetes_validate.ValidationError, match="'backoffLimit' was unexpected"):
        kubernetes_validate.validate(job, OLDEST, strict=True)


def test_the_manifests_exist_and_the_readme_names_them():
    ours = {"embed-indexed-job.yaml", "index-job.yaml", "probe-job.yaml", "pvc.yaml", "submit.sh"}
    assert {p.name for p in [*MANIFESTS, *K8S.glob("*.sh")]} >= ours
    scaling = (JOBS.parent / "README.md").read_text().split("## Scaling", 1)[1]
    assert all(name in scaling for name in ours)


def test_kubernetes_indexed_job_is_consistent():
    job = _one("embed-indexed-job.yaml")
    assert (job["apiVersion"], job["kind"]) == ("batch/v1", "Job")
    spec = job["spec"]
    assert spec["completionMode"] == "Indexed"
    assert 1 <= spec["parallelism"] <= spec["completions"]
    pod, c = _pod(job)
    assert pod["restartPolicy"] == "Never"  # required by podFailurePolicy and backoffLimitPerIndex
    env = {e["name"]: e for e in c["env"]}
    assert int(env["EMBEDPIPE_WORLD_SIZE"]["value"]) == spec["completions"]
    assert env["EMBEDPIPE_TASK_ID"]["value"] == "k8s:$(JOB_UID)/$(JOB_INDEX)"
    names = list(env)
    assert names.index("JOB_UID") < names.index("EMBEDPIPE_TASK_ID") > names.index("JOB_INDEX")  # $(..) order
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert c["args"][0] == "embed" and c["args"][c["args"].index("--out") + 1] == "/data/emb"
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    assert mounts == {"data": "/data", "tmp": "/tmp", "dshm": "/dev/shm"}
    # The compile cache lives on the shared claim: a pod (or a retry) loads what another compiled.
    assert env["EMBEDPIPE_CACHE"]["value"].startswith("/data/") and env["XDG_CACHE_HOME"]["value"].startswith("/data/")
    assert spec["backoffLimitPerIndex"] >= 1
    (fail_job,) = [r for r in spec["podFailurePolicy"]["rules"] if r["action"] == "FailJob"]
    assert fail_job["onExitCodes"] == {"containerName": c["name"], "operator": "In", "values": [2]}


def test_all_jobs_share_the_claim_the_folders_and_the_security_settings():
    claim = _one("pvc.yaml")
    assert claim["kind"] == "PersistentVolumeClaim" and claim["spec"]["accessModes"] == ["ReadWriteMany"]
    embed_pod, embed_c = _pod(_one("embed-indexed-job.yaml"))
    for name, step in (("index-job.yaml", "index"), ("probe-job.yaml", "probe")):
        job = _one(name)
        pod, c = _pod(job)
        assert job["metadata"]["name"] == f"embedpipe-{step}" and c["name"] == step
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert volumes["data"]["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
        assert not [v for v in pod["volumes"] if "emptyDir" in v and v["name"] != "tmp"]
        assert {m["name"]: m["mountPath"] for m in c["volumeMounts"]} == {"data": "/data", "tmp": "/tmp"}
        env = {e["name"]: e["value"] for e in c["env"]}
        assert env["OUT"] == embed_c["args"][embed_c["args"].index("--out") + 1]  # reads what embed wrote
        assert pod["securityContext"] == embed_pod["securityContext"] and pod["restartPolicy"] == "Never"
        assert c["securityContext"] == embed_c["securityContext"]
        assert c["image"].rsplit(":", 1)[0] == embed_c["image"].rsplit(":", 1)[0] and not c["image"].endswith(":latest")
        assert c["command"] == ["bash", "-c"] and "embedpipe " + step in c["args"][0]
    (embed_vol,) = [v for v in embed_pod["volumes"] if v["name"] == "data"]
    assert embed_vol["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]


# -- the Jobs' container scripts, run with bash ------------------------------------------------------

def _container_script(name: str) -> tuple[str, dict[str, str]]:
    _, c = _pod(_one(name))
    return c["args"][0], {e["name"]: e["value"] for e in c["env"]}


def _run_container(tmp_path: Path, name: str, embedpipe: str, **paths: str) -> subprocess.CompletedProcess:
    script, env = _container_script(name)
    stub(tmp_path / "bin", "embedpipe", embedpipe)
    env = script_env(tmp_path / "bin", **{**env, **paths})
    return subprocess.run(["bash", "-c", script], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=30)


@pytest.mark.parametrize("complete", [True, False])
def test_index_job_builds_then_fails_naming_what_is_missing(tmp_path, complete):
    out = tmp_path / "emb"
    out.mkdir()
    if complete:
        (out / "_SUCCESS").touch()
    res = _run_container(tmp_path, "index-job.yaml", 'echo "$*"; [[ $1 != status ]] || echo "  failed s-1.tar: bad"\n',
                         OUT=str(out), INDEX=f"{out}-index")
    assert res.stdout.splitlines()[0] == f"index {out} --out {out}-index --update --memory 24GB"
    if complete:
        assert (res.returncode, res.stderr) == (0, "")
    else:
        assert res.returncode == 1
        assert res.stderr.splitlines() == [
            f"{out} is incomplete (no _SUCCESS): {out}-index holds the done shards only; rerun the embed Job, "
            "then this one", f"status {out}", "  failed s-1.tar: bad"]


# A stub embedpipe that refuses what the real one refuses: `index` onto an existing --out without --update or
# --overwrite (exit 2, the real message); probe replaces its folder, as the real one does.
_CLI_LIKE = """out=; prev=
for a in "$@"; do [[ $prev == --out ]] && out=$a; prev=$a; done
echo "$*"
case $1 in
    index)
        if [[ -e $out && " $* " != *" --update "* && " $* " != *" --overwrite "* ]]; then
            echo "error: $out already exists; pass --update to add new shards to it, or --overwrite to rebuild" >&2
            exit 2
        fi
        mkdir -p "$out" ;;
    probe) mkdir -p "$out" ;;
esac
"""


@pytest.mark.parametrize("name", ["index-job.yaml", "probe-job.yaml"])
def test_index_and_probe_jobs_run_again_on_the_same_folders(tmp_path, name):
    """Every second submit.sh reruns these Jobs on the claim's folders: the second run must exit 0 too."""
    out = tmp_path / "emb"
    out.mkdir()
    (out / "_SUCCESS").touch()
    paths = {"OUT": str(out), "INDEX": str(tmp_path / "emb-index"), "PROBE": str(tmp_path / "emb-probe")}
    for _ in range(2):
        res = _run_container(tmp_path, name, _CLI_LIKE, **paths)
        assert (res.returncode, res.stderr) == (0, ""), res.stderr


def test_index_and_probe_folders_are_outside_the_embedding_folder():
    """The README: keep index and probe folders outside OUT (readers of OUT/ would see them as data)."""
    _, index_env = _container_script("index-job.yaml")
    _, probe_env = _container_script("probe-job.yaml")
    assert (index_env["OUT"], index_env["INDEX"], probe_env["PROBE"]) == ("/data/emb", "/data/emb-index",
                                                                          "/data/emb-probe")
    _, serve = _pod(_one_of("serve-deployment.yaml", "Deployment"))
    assert serve["args"][:2] == ["serve", index_env["INDEX"]]


def _one_of(name: str, kind: str) -> dict:
    (doc,) = [d for d in _docs(K8S / name) if d["kind"] == kind]
    return doc


@pytest.mark.parametrize("message, rc, expected_rc, skipped", [
    ("error: no labels found in /data/emb (label source 'label', 9 rows)", 2, 0, True),
    ("error: only one class ('3') in /data/emb", 2, 2, False),
    ("trained", 0, 0, False),
    ("Killed", 137, 137, False),
])
def test_probe_job_skips_unlabelled_collections(tmp_path, message, rc, expected_rc, skipped):
    res = _run_container(tmp_path, "probe-job.yaml", f'echo "$*"; echo "{message}" >&2; exit {rc}\n')
    assert res.returncode == expected_rc
    assert res.stdout.splitlines()[0] == "probe /data/emb --out /data/emb-probe --max-memory-gb 8"
    assert message in res.stderr
    assert ("probe skipped: /data/emb has no labels" in res.stdout) == skipped


# -- submit.sh, with a stub kubectl ------------------------------------------------------------------

def _stub_kubectl(tmp_path: Path, conditions: list[str]) -> Path:
    """kubectl that logs each call; `get job` answers the embed Job's true conditions, one answer per call."""
    log = tmp_path / "kubectl.log"
    answers = tmp_path / "conditions"
    answers.write_text("".join(f"{c}\n" for c in conditions))
    stub(tmp_path / "bin", "kubectl", f"""echo "$*" >> {log}
if [[ $1 == get ]]; then head -n 1 {answers}; sed -i 1d {answers}; fi
""")
    return log


@pytest.mark.parametrize("conditions, probe, rc", [
    (["", "", "Complete "], "", 0),
    (["", "FailureTarget Failed "], "", 1),  # a failed embed Job still gets its index (of the done shards)
    (["SuccessCriteriaMet Complete "], "none", 0),
])
def test_submit_waits_for_the_embed_job_to_end_then_starts_index_and_probe(tmp_path, conditions, probe, rc):
    log = _stub_kubectl(tmp_path, conditions)
    res = run_script(K8S / "submit.sh", script_env(tmp_path / "bin", POLL="0", PROBE=probe), cwd=tmp_path)
    assert res.returncode == rc, res.stderr
    get = ("get job embedpipe-embed -o jsonpath={range .status.conditions[?(@.status==\"True\")]}{.type}{\" \"}"
           "{end}")
    steps = ["index"] + ([] if probe == "none" else ["probe"])
    assert log.read_text().splitlines() == [
        f"apply -f {K8S}/embed-indexed-job.yaml", *[get] * len(conditions),
        *[line for s in steps for line in (f"delete job embedpipe-{s} --ignore-not-found",
                                            f"apply -f {K8S}/{s}-job.yaml")],
    ]
    assert f"job/embedpipe-embed ended: {conditions[-1]}" in res.stdout
    assert ("the embed Job failed" in res.stderr) == (rc == 1)


def test_submit_stops_when_the_embed_job_cannot_be_read(tmp_path):
    stub(tmp_path / "bin", "kubectl", '[[ $1 != get ]] || { echo "Error from server (NotFound)" >&2; exit 1; }\n')
    res = run_script(K8S / "submit.sh", script_env(tmp_path / "bin", POLL="0"), cwd=tmp_path)
    assert res.returncode == 1 and "NotFound" in res.stderr and "started" not in res.stdout
