"""The trunk every model shares: embeddings, the layer stack (models/stack.py), the final
norm."""
from __future__ import annotations

from flax import nnx

from jaxformer.cache import KVCache, Write
from jaxformer.config import ModelConfig
from jaxformer.layers import Embeddings, Norm
from jaxformer.models.stack import LayerStack


class Transformer(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, stages: int | None = None):
        """stages: None for the stacked (scan) layout, else the unrolled layout for that
        many pipeline stages (1: none); see models/stack.py."""
        self.cfg = cfg
        self.stack = LayerStack(cfg, stages)
        self.embed = Embeddings(cfg, rngs)
        self.layers = self.stack.create(rngs)
        if cfg.final_norm:
            self.final_norm = Norm(cfg.hidden_size, cfg.norm, cfg.norm_eps, rngs,
                                   offset=cfg.norm_offset)

    def trunk(self, ids, positions, kv_lengths, cache: KVCache | None = None,
              at: Write | None = None, token_types=None, *, backend="auto"):
        """ids, positions [B, T]; kv_lengths [B] -> (hidden [B, T, D], new cache or None).
        cache and at: as Attention's (a KVCache of every layer, and where to write)."""
        x = self.embed(ids, positions, token_types)
        x, new_cache = self.stack(self.layers, x, positions, kv_lengths, cache, at,
                                  backend=backend)
        if self.cfg.final_norm:
            x = self.final_norm(x)
        return x, new_cache
