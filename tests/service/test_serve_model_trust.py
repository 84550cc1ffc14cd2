"""A model file named only in ``index.json`` is never loaded by ``embedpipe serve`` unless its operator trusts it,
and a TorchScript file is checked against the recorded sha256 before its code runs (serve and ``search --image``).

The crafted model is real TorchScript whose forward creates a marker file (``torch.from_file`` with
``shared=True`` creates the file it maps), as the attack's read ``/etc/passwd``: the marker's absence proves
its code never ran.
"""
from __future__ import annotations

import base64
import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline.index.build import run_index
from pipeline.index.options import IndexConfig
from pipeline.model.deprecations import torchscript_calls
from pipeline.service import create_app

from index_data import clustered, write_shards
from serve_helpers import post_json, running
from shards import jpeg_bytes, sample_image

pytestmark = pytest.mark.slow  # TorchScript files built and served, CLI processes: in `make test`, not in the fast subset

DIM = 16
PREPROCESS = {"input_size": 32, "resize_size": 32, "interpolation": "bilinear", "mean": [0.485, 0.456, 0.406],
              "std": [0.229, 0.224, 0.225]}


class Crafted(torch.nn.Module):
    """Features of the right shape, and a side effect: the file ``marker`` appears."""

    def __init__(self, marker: str):
        super().__init__()
        self.marker = marker

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        touched = torch.from_file(self.marker, True, 8, dtype=torch.uint8)
        return torch.ones(x.shape[0], 16) + touched[:1].float() * 0


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def point_at(index: Path, model: Path, sha: str) -> None:
    """Edit ``index.json`` as the attacker did: its embedding_meta names ``model`` (a TorchScript file)."""
    rec = json.loads((index / "index.json").read_text())
    rec["embedding_meta"].update(model=f"torchscript:{model}", weights=str(model), weights_sha256=sha, layer=None,
                                 preprocess=PREPROCESS, precision="fp32", compile="eager", normalize=True)
    (index / "index.json").write_text(json.dumps(rec))


@pytest.fixture(scope="module")
def crafted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("trust")
    x = clustered(60, DIM)
    write_shards(tmp / "emb", x, shards=1)
    run_index(IndexConfig(str(tmp / "emb"), out=str(tmp / "idx"), kind="flat"))
    marker = tmp / "marker"
    with torchscript_calls():
        torch.jit.save(torch.jit.script(Crafted(str(marker))), str(tmp / "crafted.pt"))
    point_at(tmp / "idx", tmp / "crafted.pt", sha256(tmp / "crafted.pt"))
    image = base64.b64encode(jpeg_bytes(sample_image((40, 40)))).decode()
    return tmp, x, marker, image


@pytest.fixture
def crafted_now(crafted):
    """The crafted model, its marker not yet created (by an earlier test)."""
    crafted[2].unlink(missing_ok=True)
    return crafted


def test_an_untrusted_model_file_is_never_run_and_key_and_vector_queries_still_work(crafted_now):
    tmp, x, marker, image = crafted_now
    with running(create_app([tmp / "idx"])) as base:
        r = post_json(f"{base}/search", {"images": [image], "k": 3})
        assert r.status == 403, r
        error = r.json()["error"]
        assert f"--trust-model {tmp / 'crafted.pt'}" in error and "Key and vector queries work" in error
        assert post_json(f"{base}/search", {"vectors": [x[0].tolist()], "k": 2}).status == 200
        assert post_json(f"{base}/search", {"keys": ["shard-000000_00001"], "k": 2}).status == 200
    assert not marker.exists()  # its code never ran


def test_a_trusted_model_file_runs_only_while_it_is_the_one_recorded(crafted_now, tmp_path):
    tmp, x, marker, image = crafted_now
    shutil.copytree(tmp / "idx", tmp_path / "idx")
    point_at(tmp_path / "idx", tmp / "crafted.pt", "0" * 64)  # recorded: another file
    with running(create_app([tmp_path / "idx"], trust_models=[str(tmp / "crafted.pt")])) as base:
        r = post_json(f"{base}/search", {"images": [image], "k": 3})
        assert r.status == 403 and "is not the one that made the embeddings" in r.json()["error"], r
    assert not marker.exists()  # trusted, but refused before loading: its code did not run

    with running(create_app([tmp / "idx"], trust_models=[f"torchscript:{tmp / 'crafted.pt'}"])) as base:
        r = post_json(f"{base}/search", {"images": [image], "k": 3})
        assert r.status == 200 and len(r.json()["results"][0]["results"]) == 3, r
    assert marker.exists()  # the operator trusted it, and it is the recorded file: it ran


def test_search_image_on_the_cli_checks_the_sha256_before_loading(crafted_now, tmp_path):
    tmp, _, marker, image = crafted_now
    shutil.copytree(tmp / "idx", tmp_path / "idx")
    point_at(tmp_path / "idx", tmp / "crafted.pt", "0" * 64)
    (tmp_path / "q.jpg").write_bytes(base64.b64decode(image))
    out = subprocess.run([sys.executable, "-m", "pipeline", "search", str(tmp_path / "idx"), "--image",
                          str(tmp_path / "q.jpg")], capture_output=True, text=True, timeout=300)
    assert not marker.exists()  # refused before loading: its code did not run
    assert out.returncode == 2 and "is not the one that made the embeddings" in out.stderr, out.stderr
    assert "Traceback" not in out.stderr


def test_a_weights_file_named_only_in_the_index_is_read_only_when_trusted(tiny_index, tmp_path):
    """A library model reading a weights file the index names (here: the seeded weights themselves, saved) needs
    trust too; trusted, it answers as the index's own model does."""
    from pipeline.model.backbones import load_classifier

    weights = tmp_path / "resnet18.pth"
    torch.save(load_classifier("torchvision:resnet18", "none").model.state_dict(), weights)
    shutil.copytree(tiny_index / "idx", tmp_path / "idx")
    rec = json.loads((tmp_path / "idx" / "index.json").read_text())
    rec["embedding_meta"]["weights"] = str(weights)
    (tmp_path / "idx" / "index.json").write_text(json.dumps(rec))
    image = base64.b64encode(jpeg_bytes(sample_image((64, 64)))).decode()
    with running(create_app([tmp_path / "idx"])) as base:
        r = post_json(f"{base}/search", {"images": [image], "k": 3})
        assert r.status == 403 and f"--trust-model {weights}" in r.json()["error"], r
    answers = []
    for idx, trust in ((tiny_index / "idx", []), (tmp_path / "idx", [str(weights)])):
        with running(create_app([idx], trust_models=trust)) as base:
            r = post_json(f"{base}/search", {"images": [image], "k": 3})
            assert r.status == 200, r
            answers.append([h["key"] for h in r.json()["results"][0]["results"]])
    assert answers[0] == answers[1]


def test_trust_model_must_name_a_file(tmp_path, capsys):
    from pipeline.cli.main import main

    with pytest.raises(SystemExit) as exit:
        main(["serve", str(tmp_path), "--trust-model", str(tmp_path / "nope.pt")])
    err = capsys.readouterr().err
    assert exit.value.code == 2 and f"--trust-model {tmp_path / 'nope.pt'}: no such file" in err, err
