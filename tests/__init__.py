"""Tests for embedpipe (a package, so helpers import as ``from tests.shards import ...`` under any runner)."""
