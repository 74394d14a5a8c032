"""Quantizing a model's parameters: the module tree (abstract or real) and arrays on devices.

What is quantized: every linear layer of the transformer blocks (the `Dense` kernels under
`layers`: attention qkv and out, MLP wi and wo), which hold nearly all of a model's weights
and matmul FLOPs. Embeddings, the LM head, norms, biases and the BERT pooler / MLM / binary
heads stay in the run dtype: the LM head and embedding are a few percent of a large model's
bytes and the most sensitive to error (the usual choice of GPTQ, AWQ and vLLM's FP8 too).

Each quantized Dense gets, beside its kernel (now int8 / int4 / float8_e4m3fn):

    kernel_scale   float32, logical axes from ops.scale_axes (the kernel's output axes, or for
                   int4 also its group axis named like the contraction dim it splits), so
                   scales shard exactly like the weights they scale
    act_scale      float32 [L] (fp8 only): the static per-tensor scale of its input

The leading `layers` axis comes from the kernel's own logical axes, so stacked scales are
split over `pipe` with their layers.
"""
from __future__ import annotations

import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxformer import checkpoint as ckpt
from jaxformer import sharding as shd
from jaxformer.models import abstract_params, build, param_axes
from jaxformer.quant import ops
from jaxformer.quant.module import SCALE_LEAVES, at_path, iter_denses
from jaxformer.quant.spec import QuantSpec, parse

log = logging.getLogger(__name__)

@functools.lru_cache(maxsize=64)
def covered(cfg) -> dict:
    """{path of a quantized Dense: (contract, lead)} for the model `cfg` describes."""
    model = nnx.eval_shape(lambda: build(cfg))
    return {path: (d.contract, len(d.kernel.shape) - d.kernel_ndim)
            for path, d in iter_denses(model)}


def leaf_dtype(path, abstract_dtype, dtype):
    """The dtype a parameter lives in on the devices: quantized kernels their own, scales
    float32, everything else the run dtype."""
    if path[-1] in SCALE_LEAVES:
        return jnp.dtype(jnp.float32)
    if jnp.dtype(abstract_dtype) != jnp.float32:
        return jnp.dtype(abstract_dtype)
    return jnp.dtype(dtype)


def target_dtypes(cfg, quantize, dtype) -> dict:
    """Nested dict of the dtypes `load` and `Model.random` create the parameters in."""
    return jax.tree_util.tree_map_with_path(
        lambda p, s: leaf_dtype(tuple(k.key for k in p), s.dtype, dtype),
        abstract_params(cfg, quantize))


def weight_bits(dtype) -> int:
    """Storage bits of one element (XLA packs int4 two to a byte)."""
    dtype = jnp.dtype(dtype)
    return 4 if dtype == jnp.int4 else 8 * dtype.itemsize


def _copy(tree):
    return {k: _copy(v) if isinstance(v, dict) else v for k, v in tree.items()}


def check_mesh(cfg, quantize, mesh, rules) -> None:
    """Explain, in one error, every scale dimension the mesh does not divide (int4 groups of
    a sharded contraction dimension must fall whole on each shard)."""
    spec = parse(quantize)
    if spec is None:
        return
    shapes, axes = abstract_params(cfg, spec.name), param_axes(cfg, spec.name)
    problems = []
    for path in covered(cfg):
        s, a = at_path(shapes, path)["kernel_scale"], at_path(axes, path)["kernel_scale"]
        for size, logical in zip(s.shape, a):
            n = shd.mesh_size(mesh, rules.get(logical)) if logical else 1
            if size % n:
                problems.append(f"{'/'.join(path)}: {size} scale rows along {logical!r} over "
                                f"{n} shards")
    if problems:
        raise ValueError(f"quantize={spec.name!r}: the mesh does not divide the int4 groups "
                         f"({'; '.join(problems)}); choose a smaller group (int4-g<N>) so that "
                         f"each shard holds whole groups")


def quantize_params(params: dict, cfg, quantize, mesh, rules, *, delete: bool = True) -> dict:
    """Quantize a plain parameter dict of device arrays (float, in the run dtype) on the
    devices, one stacked weight at a time; returns the quantized dict. With `delete`, each
    float kernel is freed as soon as its quantized form exists, so the peak is the float
    model plus one quantized kernel, never two full copies."""
    spec = parse(quantize)
    axes = param_axes(cfg, spec.name)
    out = _copy(params)
    for path, (contract, lead) in covered(cfg).items():
        node = at_path(out, path)
        w = node["kernel"]
        node.update(quantize_kernel_on_device(w, spec, lead, contract, mesh, rules,
                                              at_path(axes, path)))
        if delete and isinstance(w, jax.Array):
            w.delete()
    return out


def quantize_kernel_on_device(w, spec: QuantSpec, lead, contract, mesh, rules, axes) -> dict:
    """{kernel, kernel_scale[, act_scale]} of one float kernel `w`, in their shardings."""
    sh = {k: shd.named_sharding(mesh, axes[k], rules) for k in ("kernel", "kernel_scale")}
    fn = jax.jit(functools.partial(ops.quantize_kernel, spec=spec, lead=lead,
                                   contract=contract),
                 out_shardings=(sh["kernel"], sh["kernel_scale"]))
    q, scale = fn(w)
    out = {"kernel": q, "kernel_scale": scale}
    if spec.activations and "act_scale" in axes:  # weight-only kernels have none
        ones = np.ones(w.shape[:lead], np.float32)
        out["act_scale"] = jax.device_put(ones, shd.named_sharding(mesh, axes["act_scale"],
                                                                   rules))
    return out


def restore_quantized(path, cfg, quantize, mesh, rules, dtype) -> dict:
    """Restore a float checkpoint and quantize it on the devices, reading one stacked kernel
    at a time (orbax partial restore): the device peak is the quantized model plus one float
    kernel (all layers of one weight) in the run dtype."""
    spec = parse(quantize)
    shardings = shd.tree_shardings(mesh, param_axes(cfg), rules)
    target = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, dtype, sharding=sh),
                          abstract_params(cfg), shardings)
    kernels = covered(cfg)
    rest = _copy(target)
    for p in kernels:
        del at_path(rest, p)["kernel"]
    params = _regrow(ckpt.restore_params(path, _prune(rest), partial=True), kernels)
    qaxes = param_axes(cfg, spec.name)
    for p, (contract, lead) in kernels.items():
        one = ckpt.restore_params(path, _nest(p + ("kernel",), at_path(target, p)["kernel"]),
                                  partial=True)
        w = at_path(one, p)["kernel"]
        at_path(params, p).update(quantize_kernel_on_device(w, spec, lead, contract, mesh, rules,
                                                         at_path(qaxes, p)))
        w.delete()
        log.info("quantized %s to %s", "/".join(p), spec.name)
    return params


def _prune(tree: dict) -> dict:
    """Without empty subtrees (a Dense left with no leaf once its kernel is taken out):
    orbax's partial restore cannot match an empty dict."""
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            v = _prune(v)
            if not v:
                continue
        out[k] = v
    return out


def _regrow(tree: dict, paths) -> dict:
    """The nodes `paths` name, made again where _prune dropped them."""
    for p in paths:
        node = tree
        for k in p:
            node = node.setdefault(k, {})
    return tree


def _nest(path, leaf) -> dict:
    tree = leaf
    for k in reversed(path):
        tree = {k: tree}
    return tree
