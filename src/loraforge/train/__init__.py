"""The training stage: an explicit PyTorch loop on accelerate (loop.py), with checkpoints that survive crashes."""
