"""Evaluation: embeddings once per checkpoint and dataset, then zero-shot and retrieval metrics."""
