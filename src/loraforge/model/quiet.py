"""transformers' progress bars ("Loading weights", "Writing model shards") kept out of loraforge's output."""
from __future__ import annotations

import contextlib


@contextlib.contextmanager
def quiet_progress_bars():
    """No transformers progress bar inside the block: it would land in the middle of a chat, the answers or
    a status line; the previous setting comes back after."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()
