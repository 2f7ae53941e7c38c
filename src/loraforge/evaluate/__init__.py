"""The evaluation stage: held-out loss, perplexity, task metrics, and the run report."""
