"""The engine registry (pipeline/embedding/engines/): what it finds, its one signature, its errors, and that no code
outside it compares an engine's name. Engines agreeing with each other on real shards: test_devices.py, test_ray.py
(slow)."""
from __future__ import annotations

import inspect
import typing
from pathlib import Path

import pytest

from pipeline.embedding import engines
from pipeline.embedding.engines import Engine, EngineJob, engine_for, engine_names, get_engine
from pipeline.embedding.options import EmbedConfig, EmbedSummary
from pipeline.embedding.runner import embed
from pipeline.errors import UserError
import tiny

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "pipeline"
ENGINE_DIR = PACKAGE / "embedding" / "engines"


def test_the_registry_finds_one_engine_per_module():
    modules = sorted(p.stem for p in ENGINE_DIR.glob("*.py") if not p.name.startswith("_"))
    assert engine_names() == tuple(modules) == ("devices", "local", "ray")


@pytest.mark.parametrize("name", engine_names())
def test_every_engine_has_the_one_signature(name):
    engine = get_engine(name)
    assert isinstance(engine, Engine) and engine.name == name and engine.about
    assert list(inspect.signature(engine.run).parameters) == ["job", "summary"]
    assert typing.get_type_hints(engine.run) == {"job": EngineJob, "summary": EmbedSummary, "return": list[str]}


def test_an_unknown_engine_lists_the_names_before_anything_is_touched(digits_shards, tmp_path):
    with pytest.raises(UserError, match=r"unknown engine 'spark'; choose one of: devices, local, ray"):
        get_engine("spark")
    with pytest.raises(UserError, match="unknown engine 'spark'"):
        embed([str(digits_shards[0])], tmp_path / "out", **tiny.options(engine="spark"))
    assert not (tmp_path / "out").exists()


def test_the_engine_of_a_run():
    assert engine_for("local", None).runs_model_here
    assert engine_for("local", ["cpu"]).runs_model_here  # one device: this process, on it
    assert engine_for("local", ["cpu", "cpu"]).takes_devices  # several: the devices engine, never typed
    assert engine_for("devices", ["cpu", "cpu"]).takes_devices  # typing it is fine too
    assert engine_for("ray", None).places_work_itself
    with pytest.raises(UserError, match=r"--engine ray places work itself \(.*one actor per GPU\); drop --devices"):
        engine_for("ray", ["cpu", "cpu"])


def test_the_cli_offers_the_registry():
    from pipeline.cli import cli

    (option,) = [p for p in cli.commands["embed"].params if p.name == "engine"]
    assert tuple(option.type.choices) == engine_names()


def test_contain_runs_the_devices_engine_with_one_worker(monkeypatch):
    seen = []
    fake = Engine("devices", lambda job, summary: seen.append(job) or [], "test", takes_devices=True)
    monkeypatch.setattr(engines, "get_engine", lambda name: fake if name == engines.DEVICES else None)
    cfg = EmbedConfig(device="cpu", workers=4)
    job = EngineJob(["a.tar", "b.tar"], {"a.tar": "a", "b.tar": "b"}, None, cfg, ["cpu", "cpu"], model=("bb", "ex"))
    assert engines.contain(job, None) == []
    (child,) = seen
    assert child.pending == ["a.tar", "b.tar"] and child.devices == ["cpu"] and child.cfg.workers == 0
    assert child.model is None and child.respawns == 4
    assert engines.contain(EngineJob([], {}, None, cfg, ["cpu"]), None) == [] and len(seen) == 1
