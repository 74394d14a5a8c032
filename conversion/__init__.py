"""Checkpoint converters: foreign checkpoints in, jaxformer (orbax) checkpoints out.

Each converter is a table of (source-key pattern, target path, transform) rows; see hf.py.
"""


def error_line(prog: str, err) -> str:
    """The one-line error both converters print: `python -m conversion.X: error: ...`."""
    return f"{prog}: error: {err}"
