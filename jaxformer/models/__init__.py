"""Models compose layers/: DecoderLM (GPT families) and Encoder (BERT)."""
from __future__ import annotations

import functools

import jax
from flax import nnx

from jaxformer.config import ModelConfig
from jaxformer.models.bert import Encoder
from jaxformer.models.gpt import DecoderLM


def build(cfg: ModelConfig, seed: int = 0):
    """A model with random weights (float32, host/default device)."""
    cls = DecoderLM if cfg.arch == "decoder" else Encoder
    return cls(cfg, nnx.Rngs(params=seed))


@functools.lru_cache(maxsize=64)
def _abstract(cfg: ModelConfig):
    model = nnx.eval_shape(lambda: build(cfg))
    graphdef, state = nnx.split(model)
    return graphdef, state


def abstract_model(cfg: ModelConfig):
    """(graphdef, abstract nnx.State) of the model `cfg` describes; nothing is allocated."""
    return _abstract(cfg)


def abstract_params(cfg: ModelConfig) -> dict:
    """Plain nested dict of jax.ShapeDtypeStruct (float32): the checkpoint's tree."""
    return nnx.to_pure_dict(_abstract(cfg)[1])


def param_axes(cfg: ModelConfig) -> dict:
    """Plain nested dict of logical-axis tuples, one per parameter."""
    _, state = _abstract(cfg)
    specs = nnx.to_pure_dict(nnx.get_partition_spec(state))
    return jax.tree.map(lambda p: tuple(p), specs,
                        is_leaf=lambda p: isinstance(p, jax.sharding.PartitionSpec))


__all__ = ["DecoderLM", "Encoder", "build", "abstract_model", "abstract_params", "param_axes"]
