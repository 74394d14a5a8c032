"""Serving: continuous batching over the Engine (scheduler.py) and the page bookkeeping of a
paged KV cache with prefix caching (pages.py)."""
