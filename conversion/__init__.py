"""Checkpoint converters: foreign checkpoints in, jaxformer (orbax) checkpoints out.

Each converter is a table of (source-key pattern, target path, transform) rows; see hf.py.
"""
