"""embedpipe: sharded images -> frozen backbone -> Parquet embeddings -> FAISS index -> linear probes."""
__version__ = "0.1.0"


def __getattr__(name: str):  # lazy: `import pipeline` must not import faiss or torch
    if name == "open_index":
        from .search import open_index

        return open_index
    if name == "embed":
        from .embed import embed

        return embed
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
