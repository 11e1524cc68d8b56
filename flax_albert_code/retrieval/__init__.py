"""Retrieval, below training and inference: BM25, the retriever, the code index, neighbours.

  bm25.py        Okapi BM25 in numpy, and the nearest-neighbour baselines built on it
  retriever.py   Retriever: dense / BM25 / hybrid top-k over a corpus, same-file exclusion
  index.py       the code index: a corpus encoded once into code vectors, ranked for queries
  neighbours.py  each example's train-split neighbours: mined (own file excluded), saved, loaded
"""
