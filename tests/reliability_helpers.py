"""Shared pieces of the reliability tests (faults, resume, DP)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture
def one_torch_thread() -> Iterator[None]:
    """Run a small simulation on one torch thread, then restore the count.

    Tiny models gain nothing from a second thread, and on a busy machine a second thread that
    waits for a free core makes every operation wait for it.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
