"""Wire-level limits that the router and the shards must agree on, defined once.

A shard reports its own `max_top_k` in Info and refuses a step asking for more; the router
validates requests against the smallest value its shards report, and never asks for more.
"""

from __future__ import annotations

MAX_TOP_K = 1024  # the most candidates one shard returns for one sequence in one step
