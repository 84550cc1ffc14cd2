"""tests/faults: the shared helpers (tests/shards.py) and fixtures (tests/conftest.py) of the parent folder."""
import sys
from pathlib import Path

_TESTS = str(Path(__file__).resolve().parent.parent)
if _TESTS not in sys.path:  # tests/ has no __init__.py: its modules import each other as top-level names
    sys.path.insert(0, _TESTS)


import pytest  # noqa: E402


@pytest.fixture
def mount_namespace():
    """Run a shell script in a private mount namespace (to mount a tmpfs: full, or read-only) and return the
    CompletedProcess; skips the test where this machine does not permit it (``unshare -m``)."""
    import shutil
    import subprocess

    if shutil.which("unshare") is None or subprocess.run(["unshare", "-m", "true"], capture_output=True).returncode:
        pytest.skip("no private mount namespace here (unshare -m) for a tmpfs")

    def run(script: str) -> subprocess.CompletedProcess:
        return subprocess.run(["unshare", "-m", "sh", "-ec", script], capture_output=True, text=True, timeout=600)

    return run
