"""The ``embedpipe`` command line: ``group`` holds the click group, one module per stage registers its commands."""
from .main import cli, main

__all__ = ["cli", "main"]
