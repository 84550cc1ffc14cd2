"""The index-kind registry (pipeline/index/kinds/): what it finds, that it chooses, sizes and tunes exactly as the
code before it did, that no kind name is compared outside it, and the drifts it came with (one recall-target
default, --update and --target-recall)."""
from __future__ import annotations

import ast
import json
import sys
import textwrap
from pathlib import Path

import pytest
from click.testing import CliRunner

from index_data import embedding_like, write_shards
from pipeline.errors import UserError
from pipeline.index import choose, kinds, parts, tune
from pipeline.index.options import DEFAULT_TARGET_RECALL, IndexConfig

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "pipeline"
PINNED = ROOT / "tests" / "fixtures" / "index-kinds-80291de"
KIND_DIR = PACKAGE / "index" / "kinds"

NS = (1_000, 60_000, 2_000_000)
DIMS = (64, 512)
BUDGETS = (8_000_000_000, 1_500_000_000, 1_000_000_000, 300_000_000, 100_000_000, 50_000_000, 20_000_000, 2_000_000)
FACTORIES = ("OPQ16,IVF256,PQ16", "IVF32,SQ8", "PCA16,IVF16,Flat", "HNSW16", "Flat", "IDMap2,HNSW32,Flat")


def row(c: choose.Choice) -> list:
    return [c.kind, c.factory, c.reason, c.nlist, c.estimated_bytes, c.train_size]


def observe() -> dict[str, list]:
    """What ``choose`` says over the grid (public functions only: the old code answered the same calls)."""
    out = {}
    for n in NS:
        for dim in DIMS:
            for b in BUDGETS:
                for kind in ("auto", "flat", "ivf", "ivfpq", "hnsw", "fastscan"):
                    for in_parts in (False, True):
                        try:
                            v = row(choose.choose(kind, n, dim, b, parts=in_parts))
                        except UserError as e:
                            v = ["error", str(e)]
                        out[f"{kind} n={n} dim={dim} budget={b} parts={in_parts}"] = v
                try:
                    v = [row(c) for c in choose.candidates(n, dim, b)]
                except UserError as e:
                    v = ["error", str(e)]
                out[f"candidates n={n} dim={dim} budget={b}"] = v
            for f in FACTORIES:
                out[f"factory {f} n={n} dim={dim}"] = row(choose.choose("auto", n, dim, 8 * 10**9, factory=f))
    return out


def observe_params(choices: dict[str, list]) -> dict[str, list]:
    """The tuned knobs of each distinct (factory, dim) chosen, as [name, first, last, count]: from the kind's spec
    where the choice names a kind, else from the FAISS object (the --factory fallback)."""
    import faiss

    out = {}
    for key, v in choices.items():
        if v[0] == "error" or key.startswith("candidates"):
            continue
        dim = int(key.split("dim=")[1].split()[0])
        name = f"{v[1]} dim={dim}"
        if name not in out:
            index = faiss.index_factory(dim, v[1], faiss.METRIC_INNER_PRODUCT)
            out[name] = [[p, vals[0], vals[-1], len(vals)] for p, vals in tune.search_space(index, v[0], v[1])]
    return out


# ------------------------------------------------------------------ the registry


def test_the_registry_finds_one_kind_per_module():
    modules = sorted(p.stem for p in KIND_DIR.glob("*.py") if not p.name.startswith("_"))
    assert kinds.kind_names() == tuple(modules) == ("fastscan", "flat", "hnsw", "ivf", "ivfpq")
    assert choose.KINDS == ("auto", *modules)
    assert [s.name for s in kinds.auto_kinds()] == ["fastscan", "hnsw", "ivf"]
    assert [s.name for s in kinds.specs() if s.exact] == ["flat"]
    assert [s.name for s in kinds.specs() if s.fallback] == ["ivfpq"]
    assert [s.name for s in kinds.specs() if s.parts] == ["ivf", "ivfpq"]
    with pytest.raises(UserError, match="unknown index kind 'nope'; use one of auto, fastscan, flat, hnsw, ivf, ivfpq"):
        kinds.get_kind("nope")
    with pytest.raises(UserError, match="--kind 'nope' is unknown; use one of auto, fastscan, flat, hnsw, ivf, ivfpq"):
        IndexConfig("e", out="o", kind="nope").validate()


def test_cli_kind_choices_follow_the_registry():
    from pipeline.cli import cli

    (opt,) = [p for p in cli.commands["index"].params if p.name == "kind"]
    assert tuple(opt.type.choices) == ("auto", *kinds.kind_names())


@pytest.fixture
def toy_kind(tmp_path, monkeypatch):
    """A kind added the documented way: one module (here in a second folder of the package's path)."""
    (tmp_path / "toy.py").write_text(textwrap.dedent('''
        from pipeline.index.kinds import Choice, KindSpec, Knob

        def choose(n, dim, budget, parts):
            return Choice("toy", "IVF16,SQ8", "a toy", 16, estimate(n, dim), n)

        def estimate(n, dim, nlist=0, m=0):
            return n * dim

        SPEC = KindSpec("toy", choose, estimate, knobs=lambda factory: (Knob("nprobe", range(1, 17)),), auto=0)
    '''))
    monkeypatch.setattr(kinds, "__path__", [*kinds.__path__, str(tmp_path)])
    yield
    sys.modules.pop("pipeline.index.kinds.toy", None)


def test_a_new_kind_is_one_module(toy_kind):
    assert "toy" in kinds.kind_names()
    assert choose.choose("toy", 1000, 64, 10**9).factory == "IVF16,SQ8"
    assert choose.candidates(1_000_000, 512, 8 * 10**9)[0].kind == "toy"  # auto measures it first
    IndexConfig("e", out="o", kind="toy").validate()
    assert tune.search_space(None, "toy", "IVF16,SQ8") == [("nprobe", list(range(1, 17)))]
    with pytest.raises(UserError, match=r"--parts needs an IVF index \(--kind ivf or ivfpq, or auto\)"):
        choose.choose("toy", 1000, 64, 10**9, parts=True)


def test_a_module_without_its_spec_is_refused(tmp_path, monkeypatch):
    (tmp_path / "broken.py").write_text("SPEC = None\n")
    monkeypatch.setattr(kinds, "__path__", [*kinds.__path__, str(tmp_path)])
    try:
        with pytest.raises(RuntimeError, match=r"must define SPEC with name 'broken': one index kind per module"):
            kinds.specs()
    finally:
        sys.modules.pop("pipeline.index.kinds.broken", None)


# ------------------------------------------------------------------ exactly as before


def test_choices_estimates_and_train_sizes_are_those_of_the_code_before_the_registry():
    want = json.loads((PINNED / "choices.json").read_text())
    got = observe()
    assert got.keys() == want.keys()
    assert {k: v for k, v in got.items() if v != want[k]} == {}
    # a few of them, readable
    assert want["ivfpq n=2000000 dim=512 budget=8000000000 parts=False"][1:] == [
        "IDMap2,IVF1024,PQ64,Refine(SQfp16)", "2000000 vectors: IVF-PQ64 re-ranked with SQfp16 (2.29 GB; float32 IVF "
        "would need 4.11 GB, budget 8.00 GB)", 1024, 2290621440, 65536]
    assert want["fastscan n=60000 dim=512 budget=50000000 parts=False"][1] == "IDMap2,IVF1024,PQ256x4fsr,Refine(SQ8)"
    assert want["auto n=2000000 dim=64 budget=100000000 parts=False"][1] == "IVF1024,PQ32"  # plain PQ, sized to it
    assert want["auto n=60000 dim=512 budget=8000000000 parts=True"][1] == "IVF256,Flat"
    assert want["hnsw n=1000 dim=64 budget=8000000000 parts=True"][0] == "error"


def test_tuned_knobs_are_those_the_faiss_object_had():
    """Each kind's declared knobs equal what inspecting its FAISS index found before (and still finds)."""
    want = json.loads((PINNED / "params.json").read_text())
    assert observe_params(json.loads((PINNED / "choices.json").read_text())) == want
    import faiss

    for name in want:
        factory, dim = name.rsplit(" dim=", 1)
        index = faiss.index_factory(int(dim), factory, faiss.METRIC_INNER_PRODUCT)
        assert [[p, v[0], v[-1], len(v)] for p, v in tune.search_params(index)] == want[name], name


# ------------------------------------------------------------------ one home per default


def test_the_recall_target_default_has_one_home():
    from pipeline.cli import cli

    floats = {str(p.relative_to(ROOT)) for p in PACKAGE.rglob("*.py") if any(
        isinstance(n, ast.Constant) and n.value == 0.95 for n in ast.walk(ast.parse(p.read_text())))}
    assert floats == {"pipeline/index/options.py"}
    assert tune.Tuning().target_recall == DEFAULT_TARGET_RECALL == 0.95
    assert IndexConfig("e", out="o").target_recall is None  # not given: see resolved()
    assert IndexConfig("e", out="o").resolved().target_recall == DEFAULT_TARGET_RECALL
    assert IndexConfig("e", out="o", target_recall=0.9).resolved().target_recall == 0.9
    (merge,) = [p for p in cli.commands["index-merge"].params if p.name == "target_recall"]
    assert merge.default == DEFAULT_TARGET_RECALL
    assert parts.run_merge.__defaults__[0] == DEFAULT_TARGET_RECALL
    assert not hasattr(parts, "sha256")  # atomic.file_sha256 is the one


# ------------------------------------------------------------------ --update and --target-recall


def test_update_says_it_keeps_the_recorded_target(tmp_path):
    from pipeline.cli import cli

    x = embedding_like(2500, 16, seed=7)
    emb, out = tmp_path / "run", tmp_path / "idx"
    write_shards(emb, x[:2000], shards=2, dtype="float16")
    r = CliRunner().invoke(cli, ["index", str(emb), "--out", str(out), "--kind", "ivf", "-q"])
    assert r.exit_code == 0, r.output
    built = json.loads((out / "index.json").read_text())
    assert built["tuning"]["target_recall"] == DEFAULT_TARGET_RECALL and built["config"]["target_recall"] == 0.95
    # the same target, or none given: nothing to say
    r = CliRunner().invoke(cli, ["index", str(emb), "--out", str(out), "--update", "--target-recall", "0.95"])
    assert r.exit_code == 0 and "nothing to add" in r.output and "not applied" not in r.output, r.output
    # another target: kept, said in the log and in the summary line, with the command that retunes
    write_shards(emb, x[2000:], shards=1, dtype="float16", first=2)
    r = CliRunner().invoke(cli, ["index", str(emb), "--out", str(out), "--update", "--target-recall", "0.8"])
    assert r.exit_code == 0, r.output
    summary = r.stdout.strip().splitlines()[-1]
    assert summary.startswith(f"added 500 vectors to {out}")
    assert "--target-recall 0.8 is not applied: --update keeps the search parameters tuned at the recorded target " \
           "0.95" in summary and f"--out {out} --overwrite --target-recall 0.8`" in summary
    assert "WARNING" in r.stderr and "is not applied" in r.stderr
    meta = json.loads((out / "index.json").read_text())
    assert meta["count"] == 2500 and meta["tuning"] == built["tuning"]
    assert meta["search_params"] == built["search_params"]
    r = CliRunner().invoke(cli, ["index", str(emb), "--out", str(out), "--update", "-q"])
    assert r.exit_code == 0 and "nothing to add" in r.output and "not applied" not in r.output, r.output
    # the retune it points to
    r = CliRunner().invoke(cli, ["index", str(emb), "--out", str(out), "--overwrite", "--target-recall", "0.8", "-q"])
    assert r.exit_code == 0, r.output
    assert json.loads((out / "index.json").read_text())["tuning"]["target_recall"] == 0.8
