"""The `quantize` choice of a run (RunConfig.quantize), parsed and checked.

    None          weights in the run dtype, no quantization
    "int8"        INT8 weights, one float32 scale per output channel; activations stay in the
                  run dtype (weight-only)
    "int4"        INT4 weights in groups of 128 along the contraction (input) dimension, one
                  float32 scale per group and output channel (weight-only); "int4-g<N>" uses
                  groups of N
    "fp8"         FP8 E4M3 weights with one scale per output channel, and FP8 E4M3
                  activations with one static scale per linear layer (calibrated)
    "fp8-tensor"  as "fp8" with one weight scale per matrix (per layer): cuBLASLt then takes
                  both scales as scalars in its FP8 GEMM

A group never spans two heads: along a dimension of size n < N (the head dim H of the
attention output projection, for instance) the group is the whole dimension.
"""
from __future__ import annotations

import dataclasses
import functools
import re

MODES = ("int8", "int4", "fp8")
# RunConfig.quant_kernel: whether few-row weight-only int8 / fp8 products take the Mosaic GPU
# kernel (jaxformer.quant.ops): "off" (XLA), "auto" (where supported), "log" ("auto", logging
# once why a call cannot), "interpret" (the kernel in the Mosaic GPU interpreter, any device)
KERNEL_MODES = ("off", "auto", "log", "interpret")
DEFAULT_GROUP = 128
NAMES = ("int8", "int4", "int4-g<N>", "fp8", "fp8-tensor")


@dataclasses.dataclass(frozen=True)
class QuantSpec:
    """A parsed `quantize` value. `name` is its canonical spelling (stored in checkpoints)."""

    mode: str  # "int8" | "int4" | "fp8"
    group_size: int | None = None  # int4: rows of the contraction dimension per scale
    per_tensor: bool = False  # fp8-tensor: one weight scale per matrix
    kernel: str = "off"  # RunConfig.quant_kernel (KERNEL_MODES); not part of the name

    def with_kernel(self, kernel: str) -> "QuantSpec":
        if kernel not in KERNEL_MODES:
            raise ValueError(f"RunConfig.quant_kernel: must be one of {KERNEL_MODES}, got "
                             f"{kernel!r}")
        return dataclasses.replace(self, kernel=kernel)

    @property
    def name(self) -> str:
        if self.mode == "int4":
            return "int4" if self.group_size == DEFAULT_GROUP else f"int4-g{self.group_size}"
        if self.mode == "fp8" and self.per_tensor:
            return "fp8-tensor"
        return self.mode

    @property
    def weight_dtype(self):
        import jax.numpy as jnp
        return {"int8": jnp.int8, "int4": jnp.int4, "fp8": jnp.float8_e4m3fn}[self.mode]

    @property
    def qmax(self) -> float:
        """The largest magnitude the weight dtype holds (symmetric: int4 uses -7..7)."""
        return {"int8": 127.0, "int4": 7.0, "fp8": 448.0}[self.mode]

    @property
    def weight_bits(self) -> int:
        return 4 if self.mode == "int4" else 8

    @property
    def activations(self) -> bool:
        """Whether activations are quantized too (FP8), with calibrated static scales."""
        return self.mode == "fp8"

    def group(self, n: int) -> int:
        """The int4 group size along a contraction dimension of size n."""
        return min(self.group_size, n)


def _fail(field: str, value, why: str = ""):
    raise ValueError(f"{field}: must be None or one of {', '.join(map(repr, NAMES))} "
                     f"(N a positive integer){why}, got {value!r}")


@functools.cache
def _parse(value: str, field: str) -> QuantSpec:
    if value in ("int8", "fp8"):
        return QuantSpec(value)
    if value == "fp8-tensor":
        return QuantSpec("fp8", per_tensor=True)
    m = re.fullmatch(r"int4(?:-g(\d+))?", value)
    if m:
        g = int(m.group(1)) if m.group(1) else DEFAULT_GROUP
        if g <= 0:
            _fail(field, value, "; the group size must be positive")
        return QuantSpec("int4", group_size=g)
    _fail(field, value)


def parse(value, field: str = "RunConfig.quantize") -> QuantSpec | None:
    """None -> None; a `quantize` string -> QuantSpec. ValueError names `field` otherwise."""
    if value is None:
        return None
    if isinstance(value, QuantSpec):
        return value
    if not isinstance(value, str):
        _fail(field, value)
    return _parse(value, field)


def name(value, field: str = "RunConfig.quantize") -> str | None:
    """The canonical spelling of a `quantize` value ("int4-g128" -> "int4"), None for None."""
    spec = parse(value, field)
    return None if spec is None else spec.name
