"""Quantized checkpoints from float ones (what the converters' --quantize does).

The converters first write the float checkpoint as they always do (streamed, host memory
near one tensor) into a hidden staging directory beside the output, then `quantize_checkpoint`
loads it on this host's CPU with `quantize=` (one float stacked weight at a time: host memory
is about the quantized model plus one float weight of all layers) and saves the quantized
checkpoint; the staging directory is removed whatever happens. FP8 calibration runs here too,
on the CPU, with the checkpoint's tokenizer.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from pathlib import Path
from jaxformer.model import load
from jaxformer.sharding import make_mesh


def quantize_checkpoint(src, dst, quantize: str, *, dtype: str = "float32",
                        overwrite: bool = False, calibration=None) -> None:
    """Write a `quantize`d copy of the float checkpoint `src` at `dst`.

    dtype: the dtype of what stays float (embeddings, norms, biases, LM head), usually the
    float checkpoint's own. calibration: FP8 prompts (Model.calibrate).
    """
    import jax

    mesh = make_mesh(1, 1, 1, devices=jax.devices("cpu")[:1])
    model = load(src, mesh=mesh, dtype=dtype, quantize=quantize, calibration=calibration)
    model.save(dst, overwrite=overwrite)


@contextlib.contextmanager
def staged_float(output: str | os.PathLike, overwrite: bool):
    """A hidden directory beside `output` for the float checkpoint, removed at the end."""
    output = Path(output)
    if output.exists() and not overwrite:
        raise FileExistsError(f"{output} exists; pass overwrite=True (--overwrite) to replace it")
    tmp = output.parent / f".{output.name}.float-{uuid.uuid4().hex[:8]}"
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
