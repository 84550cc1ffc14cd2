"""``--precision auto`` on a CPU (issue 28, items 1 and 5): bf16 where the CPU has bf16 matrix units and the model's
min cosine to fp32 on the run's own images is at least 0.999, else fp32; measured once, remembered, recorded in
run.json, and never a settings conflict for a folder made in another precision. The CPU's units are faked both
ways with ``EMBEDPIPE_CPU_BF16`` (the suite's default is 0: tests/conftest.py)."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from torch import nn

from pipeline import store
from pipeline.embedding.runner import embed
from pipeline.errors import UserError
from pipeline.model import auto_precision
from pipeline.model.auto_precision import bf16_units
from pipeline.model.deprecations import torchscript_calls
import tiny


def run_json(out: Path) -> dict:
    return json.loads((out / "run.json").read_text())


def stored_precision(out: Path) -> str:
    return store.read_metadata(next((out / "embeddings").glob("*.parquet"))).precision


def test_bf16_units_are_read_from_the_cpu_flags_and_can_be_faked(tmp_path):
    def cpu(flags: str) -> Path:
        path = tmp_path / f"cpuinfo-{len(flags)}"
        path.write_text(f"processor\t: 0\nmodel name\t: Some CPU\nflags\t\t: {flags}\n\nprocessor\t: 1\n")
        return path

    assert bf16_units({}, cpu("fpu sse2 avx2 avx512f amx_tile amx_bf16 avx512_bf16")) == "amx_bf16"
    assert bf16_units({}, cpu("fpu sse2 avx2 avx512f avx512_bf16")) == "avx512_bf16"
    assert bf16_units({}, cpu("fpu sse2 avx2 avx512f avx512_vnni")) is None
    assert bf16_units({}, tmp_path / "no-such-file") is None
    assert bf16_units({"EMBEDPIPE_CPU_BF16": "1"}, cpu("fpu sse2")) == "bf16 units (EMBEDPIPE_CPU_BF16=1)"
    assert bf16_units({"EMBEDPIPE_CPU_BF16": "0"}, cpu("amx_bf16")) is None
    with pytest.raises(UserError, match="EMBEDPIPE_CPU_BF16='yes'"):
        bf16_units({"EMBEDPIPE_CPU_BF16": "yes"}, cpu("amx_bf16"))


def test_without_bf16_units_auto_is_fp32_and_nothing_is_measured(digits_shards, tmp_path, monkeypatch):
    monkeypatch.setenv("EMBEDPIPE_CPU_BF16", "0")
    monkeypatch.setattr(auto_precision, "bf16_cosine", lambda *a: pytest.fail("measured without bf16 units"))
    embed([str(digits_shards[0])], tmp_path / "out", cache_dir=str(tmp_path / "cache"), **tiny.options())
    rec = run_json(tmp_path / "out")
    assert rec["fingerprint"]["precision"] == "fp32" and rec["config"]["precision"] == "auto"
    assert rec["precision_choice"]["precision"] == "fp32" and rec["precision_choice"]["cosine"] is None
    assert "no bf16 matrix units" in rec["precision_choice"]["why"]
    assert stored_precision(tmp_path / "out") == "fp32"


@pytest.mark.slow
def test_with_bf16_units_auto_measures_once_and_runs_bf16(digits_shards, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("EMBEDPIPE_CPU_BF16", "1")
    monkeypatch.setenv("EMBEDPIPE_CACHE", str(tmp_path / "default-cache"))  # the cache without --cache-dir
    cache = tmp_path / "cache"
    with caplog.at_level(logging.INFO, logger="pipeline"):
        embed([str(digits_shards[0])], tmp_path / "a", cache_dir=str(cache), **tiny.options())
    assert not (tmp_path / "default-cache").exists()  # the fidelity check compiles into the run's cache
    choice = run_json(tmp_path / "a")["precision_choice"]
    assert choice["precision"] == "bf16" and choice["cosine"] >= auto_precision.MIN_COSINE, choice
    assert run_json(tmp_path / "a")["fingerprint"]["precision"] == "bf16" and stored_precision(tmp_path / "a") == "bf16"
    assert any("--precision auto: bf16" in r.getMessage() and "min cosine" in r.getMessage() for r in caplog.records)
    assert len(json.loads((cache / "precision.json").read_text())) == 1
    # A second folder on this machine takes the remembered cosine: nothing is measured again.
    monkeypatch.setattr(auto_precision, "bf16_cosine", lambda *a: pytest.fail("measured twice"))
    embed([str(digits_shards[1])], tmp_path / "b", cache_dir=str(cache), **tiny.options())
    assert run_json(tmp_path / "b")["precision_choice"]["cosine"] == choice["cosine"]


class Cancelling(nn.Module):
    """Features whose bf16 rounding is far above the features themselves: each is a pixel plus 4x the sum of 64
    pixels, a sum then taken away again. In fp32 that is the pixel; a bf16 matmul keeps 8 bits of the large sum."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = x.flatten(1)[:, :64]
        w = torch.eye(64, dtype=x.dtype, device=x.device) + 4.0
        return f @ w - 4.0 * f.sum(1, keepdim=True)


def test_a_model_whose_bf16_breaks_the_floor_stays_fp32_with_a_log_line(digits_shards, tmp_path, monkeypatch,
                                                                       caplog):
    monkeypatch.setenv("EMBEDPIPE_CPU_BF16", "1")
    path = tmp_path / "cancelling.pt"
    with torchscript_calls():
        torch.jit.save(torch.jit.script(Cancelling()), str(path))
    with caplog.at_level(logging.INFO, logger="pipeline"):
        embed([str(digits_shards[0])], tmp_path / "out", cache_dir=str(tmp_path / "cache"),
              **tiny.options(model=f"torchscript:{path}", weights=None))
    choice = run_json(tmp_path / "out")["precision_choice"]
    assert choice["precision"] == "fp32" and choice["cosine"] < auto_precision.MIN_COSINE, choice
    assert stored_precision(tmp_path / "out") == "fp32"
    refusals = [r for r in caplog.records if "--precision auto: fp32" in r.getMessage()]
    assert refusals and refusals[0].levelno == logging.WARNING and "would change" in refusals[0].getMessage()


@pytest.mark.slow
def test_a_folder_keeps_the_precision_it_was_made_in(digits_shards, tmp_path, monkeypatch):
    shards = [str(p) for p in digits_shards[:2]]
    out, cache = tmp_path / "out", str(tmp_path / "cache")
    # Made in fp32 by hand; resumed under auto on a CPU with bf16 units: fp32 still, no settings conflict.
    embed(shards[:1], out, cache_dir=cache, **tiny.options(precision="fp32"))
    monkeypatch.setenv("EMBEDPIPE_CPU_BF16", "1")
    summary = embed(shards, out, cache_dir=cache, **tiny.options())
    assert summary.failed == {} and summary.shards_done == 1
    assert run_json(out)["fingerprint"]["precision"] == "fp32" and run_json(out)["precision_choice"]["precision"] == "fp32"
    assert {store.read_metadata(p).precision for p in (out / "embeddings").glob("*.parquet")} == {"fp32"}
    # Made under auto in bf16; resumed where the CPU has no bf16 units: bf16 still, its measured cosine kept.
    other = tmp_path / "other"
    embed(shards[:1], other, cache_dir=cache, **tiny.options())
    cosine = run_json(other)["precision_choice"]["cosine"]
    monkeypatch.setenv("EMBEDPIPE_CPU_BF16", "0")
    embed(shards, other, cache_dir=cache, **tiny.options())
    assert run_json(other)["fingerprint"]["precision"] == "bf16"
    assert run_json(other)["precision_choice"] == {**run_json(other)["precision_choice"], "precision": "bf16",
                                                   "cosine": cosine}
    assert {store.read_metadata(p).precision for p in (other / "embeddings").glob("*.parquet")} == {"bf16"}
