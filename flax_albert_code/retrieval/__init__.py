"""Retrieval, below training and inference: BM25, the retriever, the code index, neighbours."""
