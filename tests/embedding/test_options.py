"""Embed options are validated before anything is touched: a bad device, precision or compile mode fails with the
message that says how to fix it before the folder's lock is taken (``--out`` is not even created) and before a model
is loaded."""
from __future__ import annotations

import pytest
import torch

from pipeline.cli.main import main
from pipeline.embedding import run_folder, worker
from pipeline.embedding.runner import embed
from pipeline.errors import UserError
from pipeline.model import backbones
import tiny

NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
FP16_ON_CPU = "--precision fp16 is not supported on CPU; use --precision bf16"

BAD = [
    pytest.param({"precision": "fp8"}, "unknown precision 'fp8'; use auto, fp32, fp16, bf16", id="precision"),
    pytest.param({"compile": "jit"}, "unknown compile mode 'jit'; use one of auto, torchscript, inductor, max-autotune, aot, eager",
                 id="compile"),
    pytest.param({"decode": "nvjpeg"}, "--decode must be auto or a decoder (cpu, gpu), got 'nvjpeg'", id="decode"),
    pytest.param({"device": "tpu"}, "unknown device 'tpu'; use cpu, cuda, cuda:N or auto", id="device"),
    pytest.param({"device": "cpu", "precision": "fp16"}, FP16_ON_CPU, id="fp16-on-cpu"),
    pytest.param({"devices": "cpu,cpu", "precision": "fp16"}, FP16_ON_CPU, id="fp16-on-cpu-devices"),
    pytest.param({"precision": "fp16"}, FP16_ON_CPU, marks=NO_CUDA, id="fp16-auto-device-without-cuda"),
    pytest.param({"device": "cuda"}, "device cuda requested but CUDA is not available here; use --device cpu",
                 marks=NO_CUDA, id="cuda-without-cuda"),
    pytest.param({"max_member_mb": 0}, "--max-member-mb must be a positive number of MB, got 0", id="max-member-mb"),
    pytest.param({"max_shard_gb": float("nan")}, "--max-shard-gb must be a positive number of GB, got nan",
                 id="max-shard-gb"),
]


@pytest.fixture
def nothing_touched(monkeypatch):
    """Taking the lock or loading a model fails the test: validation must come first."""
    def lock(self):
        raise AssertionError(f"the lock of {self.out} was taken before the options were validated")

    def model(*a, **k):
        raise AssertionError("a model was loaded before the options were validated")

    monkeypatch.setattr(run_folder.RunState, "acquire", lock)
    for module, name in ((worker, "prepare_model"), (worker, "load_configured_backbone"),
                         (backbones, "load_backbone")):
        monkeypatch.setattr(module, name, model)


@pytest.mark.parametrize("bad, message", BAD)
def test_bad_placement_fails_before_the_lock_and_the_model(bad, message, digits_shards, tmp_path, nothing_touched):
    out = tmp_path / "out"
    with pytest.raises(UserError) as e:
        embed([str(digits_shards[0])], out, **tiny.options(**bad))
    assert message in str(e.value)
    assert not out.exists()


@pytest.mark.parametrize("bad, message", [p for p in BAD if p.id in ("fp16-on-cpu", "cuda-without-cuda", "device",
                                                                       "max-member-mb")])
def test_the_command_exits_2_with_the_message_and_no_folder(bad, message, digits_shards, tmp_path, capsys,
                                                             nothing_touched):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        main(["embed", str(digits_shards[0]), "--out", str(out), *tiny.cli_args(**bad)])
    assert e.value.code == 2
    assert f"error: {message}" in capsys.readouterr().err
    assert not out.exists()
