"""Serving: continuous batching over the Engine (scheduler.py) and its page bookkeeping."""
