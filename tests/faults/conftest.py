"""tests/faults: the shared helpers (tests/shards.py) and fixtures (tests/conftest.py) of the parent folder."""
import sys
from pathlib import Path

_TESTS = str(Path(__file__).resolve().parent.parent)
if _TESTS not in sys.path:  # tests/ has no __init__.py: its modules import each other as top-level names
    sys.path.insert(0, _TESTS)
