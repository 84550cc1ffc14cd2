"""Which model files a process loads for queries: a model read from a file runs that file's code (TorchScript) or
reads its weights, and the file is named by an index's ``embedding_meta``, which whoever can edit the index
controls. Library models (timm, torchvision) with ``default``, ``none`` or embedded weights read no file named
there; anything else is loaded by ``embedpipe serve`` only when its operator trusts the file
(``--trust-model FILE``), and a code file is checked against the recorded sha256 before it is loaded, by every
rebuild (serve, ``search --image``, export).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from ..atomic import file_sha256
from ..errors import UserError
from ..records import ModelIdentity
from .sources import code_file


class UntrustedModel(UserError):
    """A model file nobody trusted, or one that is not what the index records: refused before it is read (a 403)."""


def files_read(ident: ModelIdentity) -> list[str]:
    """The files rebuilding ``ident`` reads: the code file its spec names (TorchScript), a weights file. None for a
    library model with ``default``/``none``/embedded weights (the installed library's own code and files)."""
    code = code_file(ident.model)
    files = [code] if code else []
    weights = ident.weights_arg()
    if weights not in ("default", "none") and (code is None or os.path.realpath(weights) != os.path.realpath(code)):
        files.append(weights)
    return files


def check_code_file(ident: ModelIdentity) -> None:
    """Before loading a model whose file runs code: that file's sha256 must be the one recorded, else it is not
    the model that made the embeddings (and its code is not run)."""
    code = code_file(ident.model)
    if code is None:
        return
    if not Path(code).is_file():
        raise UserError(f"the model file {code} of {ident.model} does not exist; put it back, or rebuild the index")
    if not ident.weights_sha256:
        raise UntrustedModel(f"the record of {ident.model} holds no weights_sha256, so its file {code} cannot be "
                             "checked before its code runs; not loaded: re-embed with this version of embedpipe")
    sha = file_sha256(code)
    if sha != ident.weights_sha256:
        raise UntrustedModel(f"the model file {code} is not the one that made the embeddings (sha256 {sha[:12]}..., "
                             f"the record says {ident.weights_sha256[:12]}...); not loaded, so its code did not run: "
                             "restore that file, or rebuild the index with this one")


@dataclass(frozen=True)
class TrustedFiles:
    """The model files an operator allows a service to load (``--trust-model``), by real path."""

    paths: frozenset[str] = frozenset()

    @classmethod
    def of(cls, entries: Sequence[str]) -> "TrustedFiles":
        """From ``--trust-model`` values: a file, or a spec naming one (``torchscript:/models/feat.pt``)."""
        paths = set()
        for entry in entries:
            path = code_file(entry) or entry
            if not Path(path).is_file():
                raise UserError(f"--trust-model {entry}: no such file; name a TorchScript model file or a weights "
                                "file an index's embedding_meta records")
            paths.add(os.path.realpath(path))
        return cls(frozenset(paths))

    def check(self, ident: ModelIdentity, index: str) -> None:
        """Refuse (:class:`UntrustedModel`) a model that reads a file the operator did not trust."""
        for f in files_read(ident):
            if os.path.realpath(f) not in self.paths:
                raise UntrustedModel(
                    f"image and text queries of the index {index} need its model {ident.model}, which reads the file {f}; "
                    "this service loads a model file only when its operator trusts it (a TorchScript file runs code): "
                    f"restart it with --trust-model {f} to allow it (its sha256 is still checked against the "
                    "index's record). Key and vector queries work without it")
