"""Inputs never run code or pick paths: weights load with weights_only, TorchScript only when named,
shard names are reduced to safe file names, urls recorded in an index are never run as commands."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from pipeline.embedding.shards import output_names, stem
from pipeline.errors import UserError
from pipeline.model.sources import resolve_spec
from pipeline.model.weights import read_weights_file


class Evil:
    """Unpickling this would run a shell command (the reason torch.load needs weights_only=True)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_pickled_code_in_a_weights_file_is_refused_not_run(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"fc.weight": torch.zeros(2, 2), "trap": Evil(marker)}, tmp_path / "w.pt")
    with pytest.raises(UserError, match="cannot read weights file"):
        read_weights_file(tmp_path / "w.pt")
    assert not marker.exists()


def test_pickled_code_in_a_probe_head_is_refused_not_run(tmp_path):
    from pipeline.probe.head import load_head

    marker = tmp_path / "pwned"
    (tmp_path / "probe").mkdir()
    torch.save({"weight": Evil(marker)}, tmp_path / "probe" / "head.pt")
    with pytest.raises(Exception, match="Weights only load failed|Unsupported global"):
        load_head(tmp_path / "probe")
    assert not marker.exists()


def test_torchscript_only_when_named_explicitly(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("resnet18").write_bytes(b"not a model")  # a file named like a model is never loaded as one
    Path("evil.pt").write_bytes(b"PK")
    assert resolve_spec("resnet18") in (("timm", "resnet18"), ("torchvision", "resnet18"))
    with pytest.raises(UserError, match="unknown model 'evil.pt'"):
        resolve_spec("evil.pt")
    assert resolve_spec("torchscript:evil.pt") == ("torchscript", "evil.pt")


@pytest.mark.parametrize("url", ["/data/../../etc/passwd.tar", "..", "../..", "a/..", "/d/.hidden.tar", "..tar",
                                 "pipe:cat ../../x.tar", "pipe:curl -s 'http://h/a/../b c.tar'",
                                 "http://h/x/..%2F..%2Fetc.tar?a=/../b", "s3://b/k/", "C:\\x\\..\\y.tar",
                                 "shard\x00.tar", "name with\nnewline.tar"])
def test_shard_names_become_safe_file_names(url):
    name = stem(url)
    assert name and not name.startswith(".") and name not in (".", "..")
    assert all(c.isalnum() or c in "._-" for c in name), name


def test_colliding_names_stay_distinct():
    urls = ["/a/x.tar", "/b/x.tar", "pipe:cat /c/x.tar", "..", "../.."]
    names = output_names(urls)
    assert len(set(names.values())) == len(urls)


def test_search_page_never_runs_a_pipe_url_from_index_data(tmp_path):
    from pipeline.index.html_page import images_by_key

    marker = tmp_path / "pwned"
    assert images_by_key({f"pipe:touch {marker}; cat /dev/null": {"k"}}) == {}
    assert not marker.exists()
