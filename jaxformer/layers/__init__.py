"""Flax NNX building blocks. Layer code names only logical axes (see jaxformer/sharding.py)."""
from jaxformer.layers.attention import Attention
from jaxformer.layers.block import Block
from jaxformer.layers.embeddings import Embeddings
from jaxformer.layers.mlp import MLP
from jaxformer.layers.moe import MoE
from jaxformer.layers.norms import Norm

__all__ = ["Attention", "Block", "Embeddings", "MLP", "MoE", "Norm"]
