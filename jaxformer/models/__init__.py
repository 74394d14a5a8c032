"""Models compose layers/: DecoderLM (GPT families) and Encoder (BERT)."""
from __future__ import annotations

import functools

import jax
import numpy as np
from flax import nnx

from jaxformer.config import ModelConfig
from jaxformer.models.bert import Encoder
from jaxformer.models.gpt import DecoderLM
from jaxformer.models.stack import LAYERS, LayerStack
from jaxformer.quant.module import quantize_module
from jaxformer.quant.spec import QuantSpec, parse


def build(cfg: ModelConfig, seed: int = 0, stages: int | None = None):
    """A model with random weights (float32, host/default device); `stages`: the layer
    layout (models/stack.py: None stacked, S unrolled for S pipeline stages)."""
    cls = DecoderLM if cfg.arch == "decoder" else Encoder
    return cls(cfg, nnx.Rngs(params=seed), stages)


@functools.lru_cache(maxsize=64)
def _abstract(cfg: ModelConfig, stages: int | None = None, quantize: QuantSpec | None = None):
    def make():
        model = build(cfg, stages=stages)
        if quantize is not None:
            quantize_module(model, quantize)
        return model

    graphdef, state = nnx.split(nnx.eval_shape(make))
    return graphdef, state


def _spec(quantize) -> QuantSpec | None:
    """A `quantize` value or QuantSpec -> QuantSpec (the cache key: hashable), or None."""
    return parse(quantize)


def abstract_model(cfg: ModelConfig, stages: int | None = None, quantize: str | None = None):
    """(graphdef, abstract nnx.State) of the model `cfg` describes, with its linear layers
    quantized as `quantize` says (jaxformer.quant); nothing is allocated. stages: None for
    the stacked layer layout, S for the unrolled one (models/stack.py)."""
    return _abstract(cfg, stages, _spec(quantize))


def abstract_params(cfg: ModelConfig, quantize: str | None = None) -> dict:
    """Plain nested dict of jax.ShapeDtypeStruct: the checkpoint's (stacked) tree. Float
    leaves are float32; quantized kernels have their own dtype and float32 scales beside
    them."""
    return nnx.to_pure_dict(_abstract(cfg, None, _spec(quantize))[1])


def param_axes(cfg: ModelConfig, quantize: str | None = None,
               stages: int | None = None) -> dict:
    """Plain nested dict of logical-axis tuples, one per parameter (in the layer layout
    `stages` names, as abstract_model)."""
    _, state = _abstract(cfg, stages, _spec(quantize))
    specs = nnx.to_pure_dict(nnx.get_partition_spec(state))
    return jax.tree.map(lambda p: tuple(p), specs,
                        is_leaf=lambda p: isinstance(p, jax.sharding.PartitionSpec))


def num_params(cfg: ModelConfig) -> int:
    """Parameter count (padded vocabulary included), from the abstract tree."""
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(abstract_params(cfg))))


def expert_params(cfg: ModelConfig) -> int:
    """Parameters of one routed expert of one layer (0 for a dense model)."""
    if not cfg.num_experts:
        return 0
    return cfg.hidden_size * cfg.expert_mlp_size * (3 if cfg.gated_mlp else 2)


def num_active_params(cfg: ModelConfig) -> int:
    """Parameters one token's forward uses: a mixture of experts counts k of its E experts
    per layer (the FLOPs of a token are about 2x this)."""
    idle = cfg.num_experts - cfg.experts_per_token
    return num_params(cfg) - cfg.num_layers * idle * expert_params(cfg)


__all__ = ["DecoderLM", "Encoder", "LayerStack", "build", "abstract_model", "abstract_params",
           "num_params", "num_active_params", "expert_params", "param_axes", "LAYERS"]
