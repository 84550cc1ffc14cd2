"""Shared fixtures: small real-image WebDataset shards built once per test session (helpers: tests/shards.py)."""
from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.sample_data import write_sample_shards

import tiny
from shards import fault_samples, write_tar

DIGITS_FIXTURE = {"limit": 300, "shard_size": 100, "image_size": 64, "fmt": "jpg"}
PHOTOS_FIXTURE = {"variants": 3, "shard_size": 27, "image_size": 96, "fmt": "mixed"}


@pytest.fixture(scope="session", autouse=True)
def compile_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Compiled models go to a per-session folder, never the user's ~/.cache (subprocesses inherit it)."""
    import os

    path = tmp_path_factory.mktemp("compile-cache")
    old = os.environ.get("EMBEDPIPE_CACHE")
    os.environ["EMBEDPIPE_CACHE"] = str(path)
    yield path
    if old is None:
        os.environ.pop("EMBEDPIPE_CACHE", None)
    else:
        os.environ["EMBEDPIPE_CACHE"] = old


@pytest.fixture(scope="session", autouse=True)
def no_bf16_units():
    """``--precision auto`` on a CPU becomes bf16 where the CPU has bf16 units (model/auto_precision.py): the
    suite takes every CPU as without them, so that its embeddings do not depend on the machine CI runs on.
    The tests of that choice set ``EMBEDPIPE_CPU_BF16`` themselves (subprocesses inherit it)."""
    import os

    old = os.environ.get("EMBEDPIPE_CPU_BF16")
    os.environ["EMBEDPIPE_CPU_BF16"] = "0"
    yield
    if old is None:
        os.environ.pop("EMBEDPIPE_CPU_BF16", None)
    else:
        os.environ["EMBEDPIPE_CPU_BF16"] = old


@pytest.fixture(scope="session")
def digits_shards(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """3 shards x 100 real digit JPEGs (64 px RGB) with ``.cls`` and ``.json``: ``digits-00000{0,1,2}.tar``."""
    return write_sample_shards(tmp_path_factory.mktemp("digits"), "digits", **DIGITS_FIXTURE)


@pytest.fixture(scope="session")
def tiny_index(digits_shards: list[Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder holding ``emb/`` (the first two digit shards embedded with the tiny model, ``tests/tiny.py``) and
    ``idx/`` (a flat index of them). Shared by the whole session: read it, or copy it before changing anything."""
    from pipeline.embedding.runner import embed
    from pipeline.index.build import run_index
    from pipeline.index.options import IndexConfig

    root = tmp_path_factory.mktemp("tiny-index")
    embed([str(p) for p in digits_shards[:2]], root / "emb", **tiny.options())
    run_index(IndexConfig(str(root / "emb"), out=str(root / "idx"), kind="flat"))
    return root


@pytest.fixture(scope="session")
def photo_shards(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """2 shards, 54 skimage photo variants (18 photos x 3) at 96 px, JPEG and PNG mixed, ``.cls``/``.txt``/``.json``."""
    return write_sample_shards(tmp_path_factory.mktemp("photos"), "photos", **PHOTOS_FIXTURE)


@pytest.fixture(scope="session")
def fault_shard(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One shard ``faults-000000.tar``: good JPEGs ``good_NNN`` interleaved with one ``bad_<fault>`` per FAULTS kind."""
    return write_tar(tmp_path_factory.mktemp("faults") / "faults-000000.tar", fault_samples())


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory: pytest.TempPathFactory):
    """The tiny open_clip model (tests/tiny_clip.py): its config registered, its random checkpoint written."""
    from tiny_clip import install

    return install(tmp_path_factory.mktemp("tiny-clip"))


@pytest.fixture(scope="session")
def clip_index(digits_shards: list[Path], tiny_clip, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder holding ``emb/`` (two digit shards embedded with the tiny CLIP) and ``idx/`` (a flat index of them).
    Shared by the whole session: read it, or copy it before changing anything."""
    from pipeline.embedding.runner import embed
    from pipeline.index.build import run_index
    from pipeline.index.options import IndexConfig

    root = tmp_path_factory.mktemp("clip-index")
    embed([str(p) for p in digits_shards[:2]], root / "emb", **tiny_clip.options(out_dtype="float32"))
    run_index(IndexConfig(str(root / "emb"), out=str(root / "idx"), kind="flat"))
    return root


@pytest.fixture
def embedpipe(capsys):
    """The `embedpipe` entry point run in this process as a shell runs it: ``(exit status, stdout, stderr)``,
    with errors mapped to exit codes (a UserError is exit 2 and one line on stderr)."""

    def run(*args):
        from pipeline.cli import main

        capsys.readouterr()
        with pytest.raises(SystemExit) as e:
            main([str(a) for a in args])
        out, err = capsys.readouterr()
        return e.value.code, out, err

    return run
