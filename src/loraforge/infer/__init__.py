"""The inference stage: generation and chat with a trained run, in the training template."""
