"""transformers draws tqdm progress bars on stderr while it loads weights; the services log instead."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def quiet_progress_bars() -> Iterator[None]:
    """transformers' progress bars off for the duration (and back on after, if they were on)."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()
