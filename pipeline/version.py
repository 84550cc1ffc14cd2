"""The embedpipe version: recorded in every output, and the package version (pyproject reads it from here)."""
__version__ = "0.1.0"
