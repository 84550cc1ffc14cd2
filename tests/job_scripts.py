"""Helpers for tests that run the job scripts for real with bash: paths, stub commands on PATH, a clean env."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
JOBS = ROOT / "jobs"
VENV_BIN = Path(sys.executable).parent


def stub(bin_dir: Path, name: str, body: str) -> Path:
    """An executable bash script ``bin_dir/name`` standing in for a cluster command (sbatch, kubectl, ...)."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    path = bin_dir / name
    path.write_text("#!/usr/bin/env bash\n" + body)
    path.chmod(0o755)
    return path


def script_env(bin_dir: Path, **extra: str) -> dict[str, str]:
    """This environment without any scheduler variables, with ``bin_dir`` first on PATH, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_"))}
    env["PATH"] = f"{bin_dir}{os.pathsep}{env['PATH']}"
    env.update(extra)
    return env


def run_script(script: Path, env: dict[str, str], cwd: Path, timeout: float = 60) -> subprocess.CompletedProcess:
    """Run ``script`` with bash from ``cwd`` (never the repository root: the scripts must not need it)."""
    assert not Path(cwd).resolve().is_relative_to(ROOT), "run job scripts from outside the repository"
    return subprocess.run(["bash", str(script)], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
