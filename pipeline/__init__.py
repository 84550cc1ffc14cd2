"""embedpipe: sharded images -> frozen backbone -> Parquet embeddings -> FAISS index -> linear probes."""
__version__ = "0.1.0"
