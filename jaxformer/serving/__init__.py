"""Serving: continuous batching over a paged KV cache (issue 22).

pages: the host-side page bookkeeping (reference-counted page pool, prefix cache with LRU
eviction, per-sequence block tables); pure Python, no jax.
"""
