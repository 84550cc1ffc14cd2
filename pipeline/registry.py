"""The one mechanism behind every extension point (model sources, decoders, index kinds, engines): a package whose
modules are its entries, as timm's ``register_model`` keeps one name per model.

Each module of the package (not starting with ``_``) is one entry, named as the module and holding it in one
attribute (``SOURCE``, ``DECODER``, ``SPEC``, ``ENGINE``) whose ``name`` is that name. Listing the names imports
nothing (they are the modules' names), so option checks and ``--help`` stay free of torch; an entry's module is
imported on first use. Entries kept outside the package (a plugin, a test) join with :meth:`Registry.register`.
"""
from __future__ import annotations

import importlib
import pkgutil
import sys
from typing import Any, Generic, TypeVar

from .errors import UserError

T = TypeVar("T")


class Registry(Generic[T]):
    """The entries of one package.

    Example:
        >>> DECODERS = Registry(__name__, "DECODER", "decoder")  # in pipeline/model/decoders/__init__.py
        >>> DECODERS.get("cpu").in_workers  # doctest: +SKIP
        True
    """

    def __init__(self, package: str, attribute: str, what: str):
        self.package, self.attribute, self.what = package, attribute, what
        self.registered: dict[str, T] = {}

    def _modules(self) -> list[str]:
        path = sys.modules[self.package].__path__  # read at each call: a test may add a folder to it
        return [m.name for m in pkgutil.iter_modules(path) if not m.name.startswith("_")]

    def names(self) -> tuple[str, ...]:
        """Every entry's name, sorted: the package's modules (none imported) and the registered entries."""
        return tuple(sorted({*self._modules(), *self.registered}))

    def get(self, name: str) -> T:
        """The entry called ``name`` (its module imported on first use); a UserError lists the names for another."""
        if name in self.registered:
            return self.registered[name]
        if name not in self._modules():
            raise UserError(f"unknown {self.what} {name!r}; choose one of: {', '.join(self.names())}")
        module = importlib.import_module(f"{self.package}.{name}")
        entry: Any = getattr(module, self.attribute, None)
        if getattr(entry, "name", None) != name:
            raise RuntimeError(f"{module.__file__} must define {self.attribute} with name {name!r}: one {self.what} "
                               f"per module of {self.package}, named as its module")
        return entry

    def all(self) -> list[T]:
        """Every entry (each module imported), by name."""
        return [self.get(n) for n in self.names()]

    def register(self, entry: T) -> T:
        """Make ``entry`` available by its ``name`` (one kept outside the package); a taken name is refused."""
        name = getattr(entry, "name")
        if name in self.names():
            raise UserError(f"a {self.what} named {name!r} exists already; give the new one another name")
        self.registered[name] = entry
        return entry
