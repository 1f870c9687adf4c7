"""torch's CPU thread count for a block: on a shared 2-core machine, one thread per job beats two
(two 2-thread torch jobs on 2 cores thrash: each runs many times slower than alone)."""

from __future__ import annotations

import contextlib

import torch


@contextlib.contextmanager
def torch_threads(n: int):
    """torch.set_num_threads(n) inside the block, restored after (0 = leave torch's default)."""
    prev = torch.get_num_threads()
    if n > 0:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(prev)
