"""embedpipe: sharded images -> frozen backbone -> Parquet embeddings -> FAISS index -> linear probes.

The Python API (each a thin entry to one stage; importing ``pipeline`` loads neither torch nor faiss)::

    import pipeline
    summary = pipeline.embed("shards/digits-{000000..000003}.tar", "run", model="default")
    report = pipeline.build_index("run", "run/index")
    hits = pipeline.open_index("run/index").search_keys(["digits_000360"], k=5)
    probe = pipeline.train_probe("run", "run/probe", val_fraction=0.2)
    pipeline.serve(["run/index"], port=8000)  # HTTP lookups and a web page (needs embedpipe[serve])
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

if TYPE_CHECKING:
    from .embedding.options import EmbedSummary
    from .index.layout import IndexReport
    from .index.search import Index
    from .probe.head import Head
    from .probe.linear import ProbeReport
    from .store import Batch

from .threads import set_openmp_defaults
from .version import __version__

# Here, at the first import of any part of embedpipe and before torch or FAISS load their OpenMP runtime, which
# reads its environment once: passive waiting, and threads for the CPUs this process may use (pipeline/threads.py).
set_openmp_defaults()

__all__ = ["__version__", "embed", "build_index", "open_index", "serve", "train_probe", "load_probe",
           "load_embeddings"]


def embed(shards: Sequence[str] | str, out: str | Path, **options: Any) -> EmbedSummary:
    """Embed WebDataset shards into ``out/embeddings/<shard>.parquet`` (one file per shard), resumably.

    ``options`` are the ``embedpipe embed`` options (``model``, ``weights``, ``compile``, ``precision``,
    ``batch_size``, ``device``, ``devices``, ``quiet``, ...); see ``pipeline.embedding.options.EmbedConfig``.
    Rerunning into the same folder skips finished shards and retries failed ones.

    Example:
        >>> summary = pipeline.embed("data/shard-{000000..000009}.tar", "run", model="default")  # doctest: +SKIP
        >>> summary.failed, summary.embedded  # doctest: +SKIP
        ({}, 5000)
    """
    from .embedding.runner import embed as run

    return run(shards, out, **options)


def build_index(emb_dir: str | Path, out: str | Path, **options: Any) -> IndexReport:
    """Build (or with ``update=True`` extend) a FAISS index of an embedding folder, tuned against exact search.

    ``options`` are the ``embedpipe index`` options (``kind``, ``factory``, ``metric``, ``memory``,
    ``target_recall``, ``update``, ``overwrite``, ...); see ``pipeline.index.options.IndexConfig``.

    Example:
        >>> report = pipeline.build_index("run", "run/index", kind="auto")  # doctest: +SKIP
        >>> report.factory, report.recall_at_10  # doctest: +SKIP
        ('Flat', 1.0)
    """
    from .errors import UserError
    from .index.build import run_index
    from .index.layout import IndexReport
    from .index.options import IndexConfig

    res = run_index(IndexConfig(str(emb_dir), out=str(out), **options))
    if "record" not in res:  # --train-only and --part write a step of a parted build, not an index
        raise UserError("build_index builds a whole index; run the parted steps (train_only, parts/part) with "
                        "`embedpipe index` and merge them with `embedpipe index-merge`")
    return IndexReport(Path(res["path"]), res["record"], res["summary"])


def open_index(path: str | Path, embeddings: str | Path | None = None, mmap: bool = False) -> Index:
    """Open an index directory for searching (``search``, ``search_keys``, ``search_images``, ``search_texts``).

    Args:
        path: the index directory (index.json, index.faiss, ids.parquet).
        embeddings: the embedding folder, when it moved since indexing (used to fetch vectors for search_keys).
        mmap: memory-map the index file instead of loading it (for IVF indexes larger than RAM).

    Example:
        >>> idx = pipeline.open_index("run/index")  # doctest: +SKIP
        >>> idx.search_keys(["digits_000360"], k=5).keys[0]  # doctest: +SKIP
        ['digits_001017', ...]
    """
    from .index.search import open_index as run

    return run(path, embeddings, mmap)


def serve(indexes: Sequence[str | Path], **options: Any) -> None:
    """Serve nearest-neighbour lookups in index directories over HTTP, with a web page, until interrupted.

    ``options`` are the ``embedpipe serve`` options (``host``, ``port``, ``token``, ``max_body_mb``,
    ``batch_wait_ms``, ``reload_every``, ...); see ``pipeline.service.options.ServeOptions``. An index
    swapped by ``build_index(..., update=True)`` is picked up while serving. To mount the service inside
    another ASGI app instead, use ``pipeline.service.create_app(indexes, **options)``. Needs ``embedpipe[serve]``.

    Example:
        >>> pipeline.serve(["run/index"], port=8000, token="a-long-secret")  # doctest: +SKIP
        >>> # curl -H 'Authorization: Bearer a-long-secret' localhost:8000/search -F image=@cat.jpg
    """
    from .service.run import serve as run

    run(indexes, **options)


def train_probe(emb_dir: str | Path, out: str | Path, **options: Any) -> ProbeReport:
    """Train a linear probe on an embedding folder (a grid of L2 strengths, the best kept on validation).

    ``options`` are the ``embedpipe probe`` options (``label_column``, ``label_field``, ``val``,
    ``val_fraction``, ``weight_decays``, ``method``, ``plots``, ...); see ``pipeline.probe.options.ProbeOptions``.
    Writes ``out/head.pt``, ``metrics.json`` and ``report.txt``.

    Example:
        >>> probe = pipeline.train_probe("run", "run/probe", val_fraction=0.2)  # doctest: +SKIP
        >>> probe.top1  # doctest: +SKIP
        0.95
    """
    from .probe.linear import ProbeReport, run_probe
    from .probe.options import ProbeOptions

    if "weight_decays" in options:
        options["weight_decays"] = tuple(options["weight_decays"])
    if "learning_rates" in options:
        options["learning_rates"] = tuple(options["learning_rates"])
    return ProbeReport(Path(out), run_probe(emb_dir, out, ProbeOptions(**options)))


def load_probe(path: str | Path) -> Head:
    """A trained probe head (``PROBE_DIR/head.pt``): ``predict(embeddings)`` gives class ids and probabilities.

    Example:
        >>> head = pipeline.load_probe("run/probe")  # doctest: +SKIP
        >>> classes, probs = head.predict(pipeline.load_embeddings("run").embeddings)  # doctest: +SKIP
    """
    from .probe.head import load_head

    return load_head(path)


def load_embeddings(path: str | Path, columns: Sequence[str] = ()) -> Batch:
    """Every embedding of an embed output folder (or its ``embeddings/`` folder) in memory, as float32.

    ``columns`` adds stored columns such as ``txt`` or ``json`` (in ``.extra``). For sets larger than memory,
    read ``path/embeddings/*.parquet`` batch by batch with ``pipeline.store.iter_batches``.

    Example:
        >>> rows = pipeline.load_embeddings("run", columns=["json"])  # doctest: +SKIP
        >>> rows.embeddings.shape, rows.keys[0]  # doctest: +SKIP
        ((1797, 1280), 'digits_000000')
    """
    from .store import read_all

    return read_all(path, columns=columns)
