"""Models compose layers/: DecoderLM (GPT families) and Encoder (BERT)."""
from __future__ import annotations

import functools

import jax
from flax import nnx

from jaxformer.config import ModelConfig
from jaxformer.models.bert import Encoder
from jaxformer.models.gpt import DecoderLM


LAYERS = "layers"  # the parameter subtree of the blocks


def build(cfg: ModelConfig, seed: int = 0, unrolled: bool = False):
    """A model with random weights (float32, host/default device)."""
    cls = DecoderLM if cfg.arch == "decoder" else Encoder
    return cls(cfg, nnx.Rngs(params=seed), unrolled)


@functools.lru_cache(maxsize=64)
def _abstract(cfg: ModelConfig, unrolled: bool = False):
    model = nnx.eval_shape(lambda: build(cfg, unrolled=unrolled))
    graphdef, state = nnx.split(model)
    return graphdef, state


def abstract_model(cfg: ModelConfig, unrolled: bool = False):
    """(graphdef, abstract nnx.State) of the model `cfg` describes; nothing is allocated.
    unrolled: the per-layer layout (models/transformer.py) instead of the stacked one."""
    return _abstract(cfg, unrolled)


def unstack_layers(params: dict, shardings: dict | None = None, delete: bool = True) -> dict:
    """Stacked params (leaves under `layers` are [L, ...]) -> the unrolled layout
    (`layers` = {0: tree, 1: tree, ...}), on the device, one leaf at a time: each stacked
    array is split and then deleted, so the peak is the model plus one leaf.

    shardings: the unrolled layout's shardings (param_shardings(..., unrolled=True)).
    """
    stacked = params[LAYERS]
    flat, treedef = jax.tree.flatten(stacked)
    L = flat[0].shape[0]
    sh_flat = None
    if shardings is not None:
        sh_flat = [jax.tree.flatten(shardings[LAYERS][i])[0] for i in range(L)]
    per_layer = [[None] * len(flat) for _ in range(L)]
    for j, a in enumerate(flat):
        out_sh = None if sh_flat is None else tuple(sh_flat[i][j] for i in range(L))
        parts = jax.jit(lambda a: tuple(a[i] for i in range(L)), out_shardings=out_sh)(a)
        for i in range(L):
            per_layer[i][j] = parts[i]
        if delete and isinstance(a, jax.Array) and not a.is_deleted():
            a.delete()
    out = dict(params)
    out[LAYERS] = {i: jax.tree.unflatten(treedef, per_layer[i]) for i in range(L)}
    return out


def is_unrolled(params: dict) -> bool:
    layers = params.get(LAYERS) if isinstance(params, dict) else None
    return isinstance(layers, dict) and 0 in layers


def stacked_leaves(params: dict):
    """Yield (path tuple, host numpy array) in the stacked (checkpoint) layout, one leaf at
    a time, from params in either layout."""
    import numpy as np

    def walk(tree, prefix):
        for k, v in tree.items():
            if isinstance(v, dict):
                yield from walk(v, prefix + (str(k),))
            else:
                yield prefix + (str(k),), v

    for path, leaf in walk({k: v for k, v in params.items() if k != LAYERS}, ()):
        yield path, np.asarray(jax.device_get(leaf))
    layers = params.get(LAYERS)
    if layers is None:
        return
    if not is_unrolled(params):
        for path, leaf in walk(layers, (LAYERS,)):
            yield path, np.asarray(jax.device_get(leaf))
        return
    L = len(layers)
    for path, _ in walk(layers[0], (LAYERS,)):
        rest = path[1:]

        def get(tree, keys=rest):
            for k in keys:
                tree = tree[k]
            return tree
        yield path, np.stack([np.asarray(jax.device_get(get(layers[i]))) for i in range(L)])


def abstract_params(cfg: ModelConfig) -> dict:
    """Plain nested dict of jax.ShapeDtypeStruct (float32): the checkpoint's tree."""
    return nnx.to_pure_dict(_abstract(cfg)[1])


def param_axes(cfg: ModelConfig, unrolled: bool = False) -> dict:
    """Plain nested dict of logical-axis tuples, one per parameter."""
    _, state = _abstract(cfg, unrolled)
    specs = nnx.to_pure_dict(nnx.get_partition_spec(state))
    return jax.tree.map(lambda p: tuple(p), specs,
                        is_leaf=lambda p: isinstance(p, jax.sharding.PartitionSpec))


__all__ = ["DecoderLM", "Encoder", "build", "abstract_model", "abstract_params", "param_axes",
           "unstack_layers", "stacked_leaves", "is_unrolled", "LAYERS"]
