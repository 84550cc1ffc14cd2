"""The index stage: FAISS indexes of embedding folders, chosen and tuned by measurement, and their search."""
