"""Models compose layers/: DecoderLM (GPT families) and Encoder (BERT)."""
from __future__ import annotations

import functools

import jax
from flax import nnx

from jaxformer.config import ModelConfig
from jaxformer.models.bert import Encoder
from jaxformer.models.gpt import DecoderLM


LAYERS = "layers"  # the parameter subtree of the blocks


def build(cfg: ModelConfig, seed: int = 0, stages: int | None = None):
    """A model with random weights (float32, host/default device); `stages`: the layer
    layout (models/transformer.py: None stacked, S unrolled for S pipeline stages)."""
    cls = DecoderLM if cfg.arch == "decoder" else Encoder
    return cls(cfg, nnx.Rngs(params=seed), stages)


@functools.lru_cache(maxsize=64)
def _abstract(cfg: ModelConfig, stages: int | None = None, quantize: str | None = None):
    def make():
        model = build(cfg, stages=stages)
        if quantize is not None:
            from jaxformer.quant.params import quantize_module
            quantize_module(model, quantize)
        return model

    graphdef, state = nnx.split(nnx.eval_shape(make))
    return graphdef, state


def _name(quantize):
    from jaxformer.quant.spec import name
    return name(quantize)


def abstract_model(cfg: ModelConfig, stages: int | None = None, quantize: str | None = None):
    """(graphdef, abstract nnx.State) of the model `cfg` describes, with its linear layers
    quantized as `quantize` says (jaxformer.quant); nothing is allocated. stages: None for
    the stacked layer layout, S for the unrolled one (models/transformer.py)."""
    return _abstract(cfg, stages, _name(quantize))
def unstack_layers(params: dict, stages: int = 1, shardings: dict | None = None,
                   delete: bool = True) -> dict:
    """Stacked params (leaves under `layers` are [L, ...]) -> the unrolled layout for
    `stages` pipeline stages (`layers` = {j: tree of [S, ...]}, j < Ls = L / S, layer
    s * Ls + j at [s] of position j). On the device, one leaf at a time: each stacked array
    is split and then deleted, so the peak is the model plus one leaf. With the stack's
    `layers` axis on `pipe`, every stage keeps exactly its own layers: nothing moves.

    shardings: the unrolled layout's shardings (param_shardings(..., stages=S)).
    """
    stacked = params[LAYERS]
    flat, treedef = jax.tree.flatten(stacked)
    L = flat[0].shape[0]
    S = stages
    Ls = L // S
    sh_flat = None
    if shardings is not None:
        sh_flat = [jax.tree.flatten(shardings[LAYERS][j])[0] for j in range(Ls)]
    per_pos = [[None] * len(flat) for _ in range(Ls)]

    def split(a):
        a = a.reshape((S, Ls) + a.shape[1:])
        return tuple(a[:, j] for j in range(Ls))

    for i, a in enumerate(flat):
        out_sh = None if sh_flat is None else tuple(sh_flat[j][i] for j in range(Ls))
        parts = jax.jit(split, out_shardings=out_sh)(a)
        for j in range(Ls):
            per_pos[j][i] = parts[j]
        if delete and isinstance(a, jax.Array) and not a.is_deleted():
            a.delete()
    out = dict(params)
    out[LAYERS] = {j: jax.tree.unflatten(treedef, per_pos[j]) for j in range(Ls)}
    return out


def is_unrolled(params: dict) -> bool:
    layers = params.get(LAYERS) if isinstance(params, dict) else None
    return isinstance(layers, dict) and 0 in layers


def abstract_params(cfg: ModelConfig, quantize: str | None = None) -> dict:
    """Plain nested dict of jax.ShapeDtypeStruct: the checkpoint's (stacked) tree. Float
    leaves are float32; quantized kernels have their own dtype and float32 scales beside
    them."""
    return nnx.to_pure_dict(_abstract(cfg, None, _name(quantize))[1])


def param_axes(cfg: ModelConfig, quantize: str | None = None,
               stages: int | None = None) -> dict:
    """Plain nested dict of logical-axis tuples, one per parameter (in the layer layout
    `stages` names, as abstract_model)."""
    _, state = _abstract(cfg, stages, _name(quantize))
    specs = nnx.to_pure_dict(nnx.get_partition_spec(state))
    return jax.tree.map(lambda p: tuple(p), specs,
                        is_leaf=lambda p: isinstance(p, jax.sharding.PartitionSpec))


__all__ = ["DecoderLM", "Encoder", "build", "abstract_model", "abstract_params", "param_axes",
           "unstack_layers", "is_unrolled", "LAYERS"]
