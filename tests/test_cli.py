"""The command line as a new user meets it: fast start, honest progress, no noise, folders as input, no-op reruns."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from pipeline.cli import cli
import tiny

TINY = tiny.cli_args(quiet=False)
STAMP = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d"


def embedpipe(*args: str, cwd: Path | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env={**os.environ, **(env or {})}, timeout=300)


def imported_after(code: str) -> list[str]:
    """Heavy libraries in sys.modules after running ``code`` in a fresh interpreter."""
    probe = code + "\nimport sys\nprint(sorted(m for m in ('torch', 'faiss', 'timm', 'torchvision') if m in sys.modules))"
    return json.loads(subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
                      .stdout.strip().splitlines()[-1].replace("'", '"'))


def img2dataset_folder(root: Path, shards: list[Path]) -> Path:
    """The layout img2dataset writes: NNNNN.tar with NNNNN.parquet and NNNNN_stats.json beside it."""
    root.mkdir()
    for i, s in enumerate(shards):
        shutil.copy(s, root / f"{i:05d}.tar")
        pq.write_table(pa.table({"key": [f"{i:05d}0000"], "url": ["https://example.com/a.jpg"], "caption": ["a"],
                                 "status": ["success"]}), root / f"{i:05d}.parquet")  # img2dataset's sample list
        (root / f"{i:05d}_stats.json").write_text(json.dumps({"count": 100, "successes": 100}))
    (root / "urls.tsv").write_text("url\tcaption\n")
    return root


def test_status_verify_and_completion_never_import_torch(digits_shards, tmp_path):
    out = tmp_path / "run"
    r = CliRunner().invoke(cli, ["embed", str(digits_shards[0]), "--out", str(out), *TINY, "-q"])
    assert r.exit_code == 0, r.output
    main = "from pipeline.cli.main import main\ntry:\n    main({args!r})\nexcept SystemExit as e:\n    assert e.code == 0, e.code\n"
    for args in (["--help"], ["--version"], ["status", str(out)], ["verify", str(out)], ["embed", "--help"]):
        assert imported_after(main.format(args=args)) == [], args
    completion = ("import os, sys\nos.environ.update(_EMBEDPIPE_COMPLETE='bash_complete', COMP_WORDS='embedpipe em', "
                  "COMP_CWORD='1')\nsys.argv = ['embedpipe']\n" + main.format(args=None))
    assert imported_after(completion) == []


@pytest.mark.slow
def test_a_folder_of_img2dataset_output_is_embedded_with_a_total_and_rerun_at_once(digits_shards, tmp_path):
    i2d = img2dataset_folder(tmp_path / "i2d", digits_shards[:2])
    first = embedpipe("embed", i2d, "--out", tmp_path / "run", *TINY)
    assert first.returncode == 0, first.stderr[-2000:]
    assert "embedded 200 samples (0 skipped) from 2/2 shards (0 already done, 0 failed)" in first.stdout
    log = first.stderr
    assert re.search(rf"^{STAMP} INFO pipeline.embedding.shards: the folder {i2d}: 2 tar shards; 5 other entries "
                     r"skipped \(e\.g\. 00000\.parquet, 00000_stats\.json, 00001\.parquet\)$", log, re.M), log
    # Not a terminal: progress is log lines, with the total the _stats.json sidecars give, and the shards done.
    assert re.search(rf"^{STAMP} INFO pipeline.embedding.progress: embed: 200/200 img \(100%\), [\d.]+ img/s, "
                     r"shards 2/2$", log, re.M), log
    assert "Warning" not in log and "warnings.warn" not in log  # torch's TorchScript and torchvision notices
    t0 = time.perf_counter()
    again = embedpipe("embed", i2d, "--out", tmp_path / "run", *TINY)
    seconds = time.perf_counter() - t0
    assert again.returncode == 0 and "nothing to do" in again.stdout and "no model loaded" in again.stdout
    assert seconds < 10  # measured well under a second on an idle machine (README); torch is not even imported
    quiet = embedpipe("embed", i2d, "--out", tmp_path / "run", *TINY, "-q")
    assert quiet.returncode == 0 and quiet.stderr == "" and "nothing to do" in quiet.stdout


def test_a_rerun_with_every_shard_done_loads_no_model(digits_shards, tmp_path, monkeypatch):
    import pipeline
    from pipeline.embedding import worker

    opts = tiny.options()
    pipeline.embed([str(digits_shards[0])], tmp_path, **opts)
    (tmp_path / "_SUCCESS").unlink()

    def no_model(*a, **k):
        raise AssertionError("a no-op rerun loaded the model")

    monkeypatch.setattr(worker, "prepare_model", no_model)
    again = pipeline.embed([str(digits_shards[0])], tmp_path, **opts)
    assert (again.shards_skipped, again.embedded) == (1, 0) and (tmp_path / "_SUCCESS").is_file()
    with pytest.raises(AssertionError, match="loaded the model"):  # other options: the model decides (refusal)
        pipeline.embed([str(digits_shards[0])], tmp_path, **{**opts, "input_size": 96})
    with pytest.raises(AssertionError, match="loaded the model"):  # a shard not done yet
        pipeline.embed([str(s) for s in digits_shards[:2]], tmp_path, **opts)


def test_sidecars_named_explicitly_are_a_usage_error_before_any_model(digits_shards, tmp_path):
    i2d = img2dataset_folder(tmp_path / "i2d", digits_shards[:1])
    r = embedpipe("embed", i2d / "00000.parquet", i2d / "00000.tar", "--out", tmp_path / "run", *TINY)
    assert r.returncode == 2 and "00000.parquet is not a tar shard" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "run").exists()
    r = embedpipe("index", i2d, "--out", tmp_path / "idx")  # img2dataset's folder instead of the embeddings
    assert r.returncode == 2 and "has no 'embedding' column" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.slow
def test_local_shards_are_recorded_as_absolute_paths(digits_shards, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    shutil.copy(digits_shards[0], work / "s-0.tar")
    r = embedpipe("embed", "s-0.tar", "--out", "run", *TINY, "-q", cwd=work)
    assert r.returncode == 0, r.stderr
    shards = set(pq.read_table(work / "run" / "embeddings" / "s-0.parquet", columns=["shard"]).column("shard").to_pylist())
    assert shards == {str(work / "s-0.tar")}
    assert json.loads((work / "run" / "_state" / "s-0.json").read_text())["url"] == str(work / "s-0.tar")


def test_index_directories_are_readable_by_others(tmp_path):
    from index_data import clustered, write_shards

    write_shards(tmp_path / "emb", clustered(300, 8))
    old = os.umask(0o022)
    try:
        r = CliRunner().invoke(cli, ["index", str(tmp_path / "emb"), "--out", str(tmp_path / "idx"), "-q"])
    finally:
        os.umask(old)
    assert r.exit_code == 0, r.output
    assert (tmp_path / "idx").stat().st_mode & 0o777 == 0o755


def test_models_prints_the_preprocessing_embed_uses():
    """`models SPEC` describes the weights embed loads by default (the embedded ones, with their overrides)."""
    from pipeline.model.backbones import load_backbone

    r = CliRunner().invoke(cli, ["models", "default", "--json"])
    assert r.exit_code == 0, r.output
    info, used = json.loads(r.stdout), load_backbone("default").describe()  # what `embed` (weights default) loads
    assert info["preprocess"] == used["preprocess"] and info["weights"] == used["weights"]
    assert info["preprocess"]["interpolation"] == "bilinear" and info["preprocess"]["mean"] == [0.498] * 3
    line = CliRunner().invoke(cli, ["models", "default"]).stdout
    assert "bilinear" in line and "0.498" in line and "embedded:" in line
    none = json.loads(CliRunner().invoke(cli, ["models", "default", "--weights", "none", "--json"]).stdout)
    assert none["preprocess"]["interpolation"] == "bicubic" and none["weights"] == "none"
    # no embedded weights: described offline with random weights (embed's download has the same preprocessing)
    r = CliRunner().invoke(cli, ["models", tiny.MODEL])
    assert r.exit_code == 0 and "weights none" in r.output and "bilinear" in r.output, r.output


def test_a_job_config_sets_search_k_by_its_flag_name(tiny_index, tmp_path):
    """`search`'s option is `-k`: `k = 3` in [search] works, and does not block the rest of the job config."""
    key = pq.read_table(tiny_index / "idx" / "ids.parquet", columns=["key"]).column("key")[0].as_py()
    job = tmp_path / "job.toml"
    job.write_text('[embed]\nmodel = "torchvision:resnet18"\nweights = "none"\n\n[search]\nk = 3\nformat = "json"\n')
    r = CliRunner().invoke(cli, ["--config", str(job), "search", str(tiny_index / "idx"), key])
    assert r.exit_code == 0, r.output
    assert len(json.loads(r.stdout)[0]["results"]) == 3
    own = tmp_path / "search.toml"  # the command's own --config: flat keys
    own.write_text("k = 2\nformat = \"json\"\n")
    r = CliRunner().invoke(cli, ["search", str(tiny_index / "idx"), key, "--config", str(own)])
    assert r.exit_code == 0 and len(json.loads(r.stdout)[0]["results"]) == 2, r.output


def test_every_option_of_every_command_has_a_config_key():
    """Config keys follow the flags users type (`--batch-size`, `-k`): no option is out of a job config's reach."""
    import click

    from pipeline.config import command_defaults

    for name, command in cli.commands.items():
        for p in command.params:
            if isinstance(p, click.Option) and p.name != "config":
                flag = max(p.opts, key=len).lstrip("-")
                assert p.name in command_defaults(command, {flag: p.default}, "t.toml"), (name, p.opts)
