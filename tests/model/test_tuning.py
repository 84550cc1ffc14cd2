"""Choices measured once per machine and model (model/measured.py, tuning.py, decode_choice.py): what a CPU decides
without measuring, the pick among measured rates, remembering, and each measurement run on CPU candidates."""
from __future__ import annotations

import json

import pytest
import torch

from pipeline.model import decode_choice, measured
from pipeline.model.backbones import load_backbone
from pipeline.model.compile import build_extractor
from pipeline.model.decode_choice import choose_decoder, measure_decoders, probe_jpegs
from pipeline.model.decoders import DEFAULT_DECODER, decoder_names
from pipeline.model.tuning import CPU_BATCH, measure_batch_size, measure_compile, pick, tuned_extractor
import tiny

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def backbone():
    return load_backbone(tiny.MODEL, "none", input_size=64)


def test_pick_takes_the_first_candidate_within_the_tie_of_the_fastest():
    assert pick({64: 1000.0, 128: 1400.0, 256: 1420.0, 512: 1500.0}) == 512
    assert pick({64: 1000.0, 128: 1480.0, 256: 1500.0}) == 128
    assert pick({"torchscript": 900.0, "inductor": 910.0}) == "torchscript"  # the cheaper build on a tie
    assert pick({"a": 1.0}) == "a"


def test_on_a_cpu_batches_of_64_the_decoder_is_not_measured_and_a_small_run_is_torchscript(backbone, tmp_path):
    ex = tuned_extractor(backbone, "cpu", "fp32", "auto", tmp_path, micro_batch=0, count_images=lambda: 100)
    assert (ex.batch_size, ex.compile) == (CPU_BATCH, "torchscript")
    assert choose_decoder("auto", backbone, ex, workers=2, cache_dir=tmp_path) == DEFAULT_DECODER
    assert not list(tmp_path.glob("*.json"))  # nothing measured: too few images to compile (test_cpu_compile_auto)
    given = tuned_extractor(backbone, "cpu", "fp32", "eager", tmp_path, micro_batch=0, batch_size=16)
    assert (given.batch_size, given.compile) == (16, "eager")


def test_a_measured_choice_is_remembered_and_measured_again_only_when_its_record_is_unusable(tmp_path):
    file = tmp_path / "choice.json"
    assert measured.remembered(file, "k", lambda: 256, lambda v: isinstance(v, int), "x") == 256
    assert json.loads(file.read_text()) == {"k": 256}

    def must_not_run():
        raise AssertionError("measured again")

    assert measured.remembered(file, "k", must_not_run, lambda v: isinstance(v, int), "x") == 256
    assert measured.remembered(file, "other", lambda: 64, lambda v: True, "x") == 64  # keys are kept apart
    file.write_text('{"k": "garbage", "other": 64}')
    assert measured.remembered(file, "k", lambda: 128, lambda v: isinstance(v, int), "x") == 128
    file.write_text("not json")
    assert measured.remembered(file, "k", lambda: 512, lambda v: True, "x") == 512
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("")
    assert measured.remembered(not_a_folder / "c.json", "k", lambda: 8, lambda v: True, "x") == 8  # not stored


def test_the_machine_key_names_the_cores_the_device_and_torch():
    key = measured.machine(CPU)
    assert "cores" in key and key.endswith(f"torch {torch.__version__}") and "|cpu|" in key


def test_batch_size_measurement_returns_a_candidate_it_measured(backbone):
    ex = build_extractor(backbone, "cpu", "fp32", "eager", micro_batch=0)
    seen: list[int] = []

    def forward(x):
        seen.append(len(x))
        return ex(x)

    assert measure_batch_size(forward, 64, CPU, candidates=(2, 4), seconds=0.05) in (2, 4)
    assert set(seen) == {2, 4}


def test_compile_measurement_leaves_out_a_mode_that_cannot_build_and_keeps_the_built_ones(backbone, tmp_path, caplog):
    def build(mode):
        return build_extractor(backbone, "cpu", "fp32", mode, tmp_path, micro_batch=0)

    chosen, built = measure_compile(build, 2, 64, CPU, candidates=("eager", "no-such-mode", "torchscript"),
                                    seconds=0.05)
    assert chosen in ("eager", "torchscript") and set(built) == {"eager", "torchscript"}
    assert built[chosen].compile == chosen
    assert "compile mode no-such-mode cannot run here" in caplog.text


def test_decoder_measurement_rates_every_registered_decoder_with_the_model(backbone):
    ex = build_extractor(backbone, "cpu", "fp32", "eager", micro_batch=0)
    ex.batch_size = 8
    images = probe_jpegs(8)
    assert len(images) == 8 and all(d[:2] == b"\xff\xd8" for d in images)
    rates = measure_decoders(ex, backbone.preprocess, workers=1, images=images, seconds=0.05)
    assert set(rates) == {"model alone", *decoder_names()} and all(r > 0 for r in rates.values())


def test_a_named_decoder_is_taken_as_given_with_a_warning_for_a_batched_one_on_a_cpu(backbone, tmp_path, caplog,
                                                                                       monkeypatch):
    monkeypatch.setattr(decode_choice, "_warned", set())  # warned once per process: maybe by an earlier test
    ex = build_extractor(backbone, "cpu", "fp32", "eager", micro_batch=0)
    assert choose_decoder("cpu", backbone, ex, 2, tmp_path) == "cpu" and "--decode" not in caplog.text
    assert choose_decoder("gpu", backbone, ex, 2, tmp_path) == "gpu"
    assert "--decode gpu on a CPU device" in caplog.text
    caplog.clear()
    assert choose_decoder("gpu", backbone, ex, 2, tmp_path) == "gpu" and "--decode" not in caplog.text
