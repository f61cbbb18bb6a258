"""Long-lived thread pools for the detection's work that runs once a round (the heat maps'
shares, the update views' blocks and the autoencoder beside them)."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from functools import cache


@cache
def worker_pool(name: str, workers: int) -> ThreadPoolExecutor:
    """The pool named ``name`` with ``workers`` threads, made once and kept: a fresh thread's
    first operations cost extra, which every round would pay again with new threads."""
    return ThreadPoolExecutor(workers, thread_name_prefix=name)


os.register_at_fork(after_in_child=worker_pool.cache_clear)  # a child has none of the threads
