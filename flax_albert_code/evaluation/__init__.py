"""Evaluation: metrics, BM25 baselines, the sandbox, HumanEval, and the harness that runs them."""
