"""Quantizing the linear layers of a module tree in place (abstract or real values): which
Dense layers are covered, their scale leaves, and their layer-independent names. The layer
floor of jaxformer.quant: models use it to describe a quantized model's tree; params.py
quantizes arrays on devices on top of it."""
from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from jaxformer.layers.base import Dense
from jaxformer.quant import ops
from jaxformer.quant.spec import parse

SCALE_LEAVES = ("kernel_scale", "act_scale")


def iter_denses(module):
    """(path, Dense) for every linear layer that quantization covers (those under `layers`)."""
    it = nnx.iter_modules(module) if hasattr(nnx, "iter_modules") else module.iter_modules()
    for path, m in it:
        if isinstance(m, Dense) and path and path[0] == "layers":
            yield tuple(str(p) for p in path), m


def _param(value, axes) -> nnx.Param:
    return nnx.Param(value, out_sharding=tuple(axes), eager_sharding=False)


def _layer_name(path: tuple) -> str:
    """A Dense's name without its layer: `layers/attn/qkv` (stacked) and
    `layers/<j>/attn/qkv` (unrolled position j, models/stack.py) are both "attn/qkv"."""
    parts = [str(p) for p in path[1:]]
    return "/".join(parts[1:] if parts and parts[0].isdigit() else parts)


def quantize_module(module, quantize):
    """Quantize the covered Dense kernels of `module` in place (real or abstract values);
    returns the module. `quantize`: a RunConfig.quantize value or QuantSpec."""
    spec = parse(quantize)
    for path, dense in list(iter_denses(module)):
        kernel = dense.kernel[...]
        axes = tuple(dense.kernel.get_metadata()["out_sharding"])
        lead = kernel.ndim - dense.kernel_ndim
        q, scale = ops.quantize_kernel(kernel, spec, lead, dense.contract)
        dense.kernel = _param(q, ops.stored_axes(axes, spec, lead, dense.contract))
        dense.kernel_scale = _param(scale, ops.scale_axes(axes, spec, lead, dense.contract))
        # placeholder 1.0 until calibrate() measures the inputs
        if spec.activations and not dense.weight_only:
            dense.act_scale = _param(jnp.ones(kernel.shape[:lead], jnp.float32), axes[:lead])
        dense.quant = spec  # a QuantSpec: what the layer's product runs, parsed once
        # the layer-independent name ("attn/qkv"), without the layout's position index
        dense.qname = _layer_name(path)
    return module


def at_path(tree, path):
    """tree[path[0]][path[1]]...; module paths name the unrolled layout's positions "0",
    "1", ... (iter_denses), which its params tree keys as ints."""
    for k in path:
        tree = tree[int(k)] if isinstance(k, str) and k.isdigit() and int(k) in tree else tree[k]
    return tree
