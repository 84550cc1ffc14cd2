"""``--compile auto`` on a CPU (issue 28, item 2): the mode with the least expected time for the run's images, from
rates and setups measured on this machine and remembered; a small first run never pays a compile."""
from __future__ import annotations

import json

import pytest

from pipeline.model import tuning
from pipeline.model.backbones import load_backbone, with_input_size
from pipeline.model.tuning import tuned_extractor
import tiny


@pytest.fixture()
def backbone():
    return with_input_size(load_backbone(tiny.MODEL, "none"), 64)


@pytest.fixture()
def modes_built(monkeypatch):
    """The compile modes the choice builds, in order (the real builds run)."""
    built: list[str] = []
    real = tuning.build_extractor

    def spy(bb, device, precision, compile, *args, **kwargs):
        built.append(compile)
        return real(bb, device, precision, compile, *args, **kwargs)

    monkeypatch.setattr(tuning, "build_extractor", spy)
    return built


def test_expected_time_is_setup_then_images_at_the_rate():
    assert tuning.expected_seconds({"setup_s": 30.0, "rate": 100.0}, 1000) == 40.0


def test_a_small_first_run_measures_nothing_and_compiles_nothing(backbone, tmp_path, modes_built):
    ex = tuned_extractor(backbone, "cpu", "fp32", "auto", tmp_path, micro_batch=0, count_images=lambda: 300)
    assert ex.compile == "torchscript" and modes_built == ["torchscript"] and ex.batch_size == tuning.CPU_BATCH
    assert not (tmp_path / "cpu_compile.json").exists()


def test_a_first_run_measures_torchscript_and_compiles_where_the_guess_pays(backbone, tmp_path, modes_built):
    # this tiny model's TorchScript runs thousands of images per second: 5,000 images are no reason to compile
    ex = tuned_extractor(backbone, "cpu", "fp32", "auto", tmp_path, micro_batch=0, count_images=lambda: 5_000)
    assert ex.compile == "torchscript" and modes_built == ["torchscript"] and ex.batch_size == tuning.CPU_BATCH
    known = json.loads((tmp_path / "cpu_compile.json").read_text())
    ((key, entry),) = known.items()
    assert set(entry) == {"torchscript"} and entry["torchscript"]["rate"] > 0 and entry["torchscript"]["setup_s"] > 0
    # The next run takes the remembered rate: TorchScript is built, not timed again, and stays the choice.
    modes_built.clear()
    again = tuned_extractor(backbone, "cpu", "fp32", "auto", tmp_path, micro_batch=0, count_images=lambda: 5_000)
    assert again.compile == "torchscript" and modes_built == ["torchscript"]
    assert json.loads((tmp_path / "cpu_compile.json").read_text()) == known


def test_measured_rates_decide_and_a_slower_compiled_mode_is_never_built(backbone, tmp_path, modes_built):
    tuned_extractor(backbone, "cpu", "fp32", "auto", tmp_path, micro_batch=0, count_images=lambda: 5_000)
    path = tmp_path / "cpu_compile.json"
    known = json.loads(path.read_text())
    (key,) = known
    rate = known[key]["torchscript"]["rate"]
    for mode in ("aot", "inductor"):  # measured here slower than TorchScript
        known[key][mode] = {"rate": rate / 2, "setup_s": 20.0}
    path.write_text(json.dumps(known))
    modes_built.clear()
    ex = tuned_extractor(backbone, "cpu", "fp32", "auto", tmp_path, micro_batch=0, count_images=lambda: 10_000_000)
    assert ex.compile == "torchscript" and modes_built == ["torchscript"]


@pytest.mark.slow
def test_a_large_first_run_compiles_the_cheaper_guess_measures_it_and_runs_the_faster(backbone, tmp_path,
                                                                                        modes_built):
    ex = tuned_extractor(backbone, "cpu", "fp32", "auto", tmp_path, micro_batch=0, count_images=lambda: 10_000_000)
    # every compiled mode is measured (aot built, then loaded from the package it wrote: the setup later runs pay)
    assert modes_built == ["torchscript", "aot", "aot", "inductor"]
    (entry,) = json.loads((tmp_path / "cpu_compile.json").read_text()).values()
    assert set(entry) == {"torchscript", "aot", "inductor"}
    fastest = max(entry, key=lambda m: entry[m]["rate"])
    assert ex.compile == fastest
    # The next large run takes the fastest measured mode, timing nothing again.
    modes_built.clear()
    again = tuned_extractor(backbone, "cpu", "fp32", "auto", tmp_path, micro_batch=0, count_images=lambda: 10_000_000)
    assert again.compile == fastest and modes_built == [fastest]
