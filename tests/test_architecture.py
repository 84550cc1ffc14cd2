"""The shape of the house (docs/architecture.md): no import cycles, arrows point down, each contract in one module."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "pipeline"

# Lower layers never import higher ones; one layer's packages never import each other (index and probe).
LAYERS = [
    ("pipeline.errors", "pipeline.version"),
    ("pipeline.config", "pipeline.atomic", "pipeline.progress", "pipeline.records", "pipeline.registry",
     "pipeline.threads"),
    ("pipeline.store", "pipeline.sample_data", "pipeline.captions"),
    ("pipeline.model",),
    ("pipeline.embedding",),
    ("pipeline.index", "pipeline.probe"),
    ("pipeline.bench", "pipeline.demo", "pipeline.verify"),
    ("pipeline.service",),  # embedpipe serve: uses the index and model stages; only the API and the CLI use it
    ("pipeline",),  # the Python API (pipeline/__init__.py)
    ("pipeline.cli",),
    ("pipeline.__main__",),
]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports(path: Path, known: set[str]) -> set[str]:
    """Modules of the package that ``path`` imports anywhere (module level or inside functions)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name in known}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package
                for _ in range(node.level - 1):
                    base = base.rpartition(".")[0]
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module or ""
            for alias in node.names:  # `from . import store` names a module, `from .store import x` a name in one
                sub = f"{target}.{alias.name}"
                if sub in known:
                    found.add(sub)
                elif target in known:
                    found.add(target)
    found.discard(name)
    return found


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {m: imports(p, set(mods)) for m, p in mods.items()}


def layer(module: str) -> tuple[int, str]:
    """(layer index, the layer entry the module belongs to): the longest matching prefix."""
    best = (-1, "")
    for i, names in enumerate(LAYERS):
        for n in names:
            if (module == n or module.startswith(n + ".")) and len(n) > len(best[1]):
                best = (i, n)
    assert best[0] >= 0, f"{module} is in no layer of LAYERS; add it (and to docs/architecture.md)"
    return best


def test_no_import_cycles():
    g = graph()
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in g[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in sorted(g):
        if v not in index:
            visit(v)
    assert len(g) > 50 and sum(map(len, g.values())) > 100  # the graph was really read
    assert cycles == []


def test_imports_point_down():
    wrong = []
    for module, targets in graph().items():
        (i, entry) = layer(module)
        for t in targets:
            (j, other) = layer(t)
            if j > i or (j == i and other != entry):
                wrong.append(f"{module} -> {t}")
    assert wrong == []


def test_engines_import_the_worker_never_the_runner():
    g = graph()
    engines = [m for m in g if m.startswith("pipeline.embedding.engines.")]
    assert len(engines) >= 3  # local, devices, ray: the modules were really found
    for engine in engines:
        assert "pipeline.embedding.worker" in g[engine], engine
        assert "pipeline.embedding.runner" not in g[engine], engine
    assert not any("pipeline.embedding.runner" in g[m] for m in g if m.startswith("pipeline.embedding."))


def test_a_module_has_one_job_and_stays_small():
    big = {m: n for m, p in modules().items() if (n := len(p.read_text().splitlines())) > 400}
    assert big == {}


def string_constants(path: Path) -> set:
    return {n.value for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.Constant)
            and isinstance(n.value, (str, bytes))}


@pytest.mark.parametrize("literal, owner", [
    ("run.json", "pipeline.embedding.run_folder"), ("_state", "pipeline.embedding.run_folder"),
    ("_SUCCESS", "pipeline.embedding.run_folder"), ("_lock", "pipeline.embedding.run_folder"),
    (".failed.json", "pipeline.embedding.run_folder"),
    ("index.json", "pipeline.index.layout"), ("ids.parquet", "pipeline.index.layout"),
    ("index.faiss", "pipeline.index.layout"), ("trained.faiss", "pipeline.index.layout"),
    ("embedpipe-index/1", "pipeline.index.record"),
    ("timm:efficientnet_lite0", "pipeline.model.specs"), (b"embedpipe", "pipeline.store"),
    ("weights_sha256", None),  # model-identity fields: listed in records.ModelIdentity.COMPARED, read through it
    (".commit.json", "pipeline.atomic"), ("head.pt", "pipeline.probe.head"),
])
def test_each_contract_is_written_in_one_module(literal, owner):
    holders = {m for m, p in modules().items() if literal in string_constants(p)}
    if owner is None:  # the list of identity fields lives in records only
        holders = {m for m, p in modules().items() if '"model", "weights_sha256", "layer", "preprocess"' in p.read_text()}
        owner = "pipeline.records"
    assert holders == {owner}


def test_commands_are_listed_in_pipeline_order():
    from pipeline.cli import cli

    assert list(cli.commands) == ["sample-data", "models", "embed", "status", "index", "index-merge", "search", "serve",
                                  "probe", "predict", "knn", "finetune", "verify", "bench", "demo"]


def test_help_imports_neither_torch_nor_faiss():
    code = ("import sys\nfrom pipeline.cli.main import cli\nfrom click.testing import CliRunner\n"
            "assert CliRunner().invoke(cli, ['--help']).exit_code == 0\n"
            "assert CliRunner().invoke(cli, ['embed', '--help']).exit_code == 0\n"
            "print(sorted(m for m in ('torch', 'faiss', 'timm', 'torchvision', 'webdataset') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"


# ------------------------------------------------------------------ registries name their own entries

def registry_comparisons(source: str, names: set[str], subject: str) -> list[int]:
    """Lines of ``source`` that compare a value whose code matches ``subject`` (``choice.kind``, ``cfg.engine``)
    with an entry's name (``==``, ``!=``, ``in`` a tuple, ``case``), or test a spec with ``.startswith("name:")``."""
    import re

    def named(node: ast.AST) -> bool:
        if isinstance(node, ast.Constant):
            return node.value in names or (isinstance(node.value, str) and node.value.rstrip(":") in names
                                           and node.value.endswith(":"))
        return isinstance(node, (ast.Tuple, ast.List, ast.Set)) and any(named(e) for e in node.elts)

    def about(node: ast.AST) -> bool:
        return not isinstance(node, ast.Constant) and re.search(subject, ast.unparse(node)) is not None

    lines = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Compare):
            sides = (node.left, *node.comparators)
            if any(named(x) for x in sides) and any(about(x) for x in sides):
                lines.append(node.lineno)
        elif isinstance(node, ast.Match) and about(node.subject):
            lines += [c.pattern.lineno for c in node.cases if isinstance(c.pattern, ast.MatchValue)
                      and named(c.pattern.value)]
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
              and node.func.attr in ("startswith", "removeprefix") and node.args and named(node.args[0])):
            lines.append(node.lineno)
    return sorted(lines)


def _kinds() -> set[str]:
    from pipeline.index.kinds import kind_names

    return set(kind_names())


def _sources() -> set[str]:
    from pipeline.model.sources import source_names

    return {*source_names(), "open_clip"}  # open_clip: the next source, named only by its module too


def _engines() -> set[str]:
    from pipeline.embedding.engines import engine_names

    return set(engine_names())


def _decoders() -> set[str]:
    from pipeline.model.decoders import decoder_names

    return set(decoder_names())


# (the registry's package, its entry names, what a value naming an entry is called in code)
REGISTRIES = {
    "index kinds": ("pipeline/index/kinds", _kinds, r"kind"),
    "decoders": ("pipeline/model/decoders", _decoders, r"decod"),
    "model sources": ("pipeline/model/sources", _sources, r"kind|spec|model|source|name"),
    "engines": ("pipeline/embedding/engines", _engines, r"engine"),
}


@pytest.mark.parametrize("registry", sorted(REGISTRIES))
def test_each_registry_is_the_only_place_that_names_its_entries(registry):
    """Adding an entry is one file: no ``if kind == "hnsw"`` (ask the entry's spec) outside its registry."""
    folder, names, subject = REGISTRIES[registry]
    entries = names()
    assert entries, f"the {registry} registry found no entries"
    home = PACKAGE.parent / folder
    found = {str(p.relative_to(PACKAGE.parent)): lines for p in sorted(PACKAGE.rglob("*.py"))
             if home not in p.parents and (lines := registry_comparisons(p.read_text(), entries, subject))}
    assert found == {}, f"ask the {registry} registry's entry instead of comparing names: {found}"


def test_the_registry_check_sees_the_comparisons_of_the_code_before_the_registries():
    old = (  # lines of the code before the registries (choose.py, build.py, runner.py, export.py, bench.py)
        'if cfg.kind == "auto" and choice.kind != "flat":\n    pass\n'
        'if parts and kind not in ("ivf", "ivfpq"):\n    pass\n'
        'if pending and cfg.engine == "ray":\n    pass\n'
        'if str(meta["model"]).startswith("torchscript:"):\n    pass\n'
        'if device.type == "cpu" and decoder.name == "cpu":\n    pass\n'
        'match kind:\n    case "hnsw":\n        pass\n')
    assert registry_comparisons(old, {"flat", "ivf", "ivfpq", "hnsw"}, r"kind") == [1, 3, 12]
    assert registry_comparisons(old, {"ray", "local"}, r"engine") == [5]
    assert registry_comparisons(old, {"torchscript", "timm"}, r"model|spec|kind") == [7]
    assert registry_comparisons(old, {"cpu"}, r"decod") == [9]  # the device's "cpu" is not the decoder's
