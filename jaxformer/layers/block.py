"""One transformer block: attention and MLP sublayers, pre-LN (GPT, LLaMA, Megatron) or
post-LN (BERT)."""
from __future__ import annotations

from flax import nnx

from jaxformer.config import ModelConfig
from jaxformer.layers.attention import Attention
from jaxformer.layers.mlp import MLP
from jaxformer.layers.norms import Norm


class Block(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        self.attn_norm = Norm(cfg.hidden_size, cfg.norm, cfg.norm_eps, rngs)
        self.attn = Attention(cfg, rngs)
        self.mlp_norm = Norm(cfg.hidden_size, cfg.norm, cfg.norm_eps, rngs)
        self.mlp = MLP(cfg, rngs)

    def __call__(self, x, positions, kv_lengths, cache=None, at=None, layer=None, *,
                 backend="auto"):
        """x [B, T, D] -> (x [B, T, D], new cache or None). Arguments as Attention's."""
        attn = lambda h: self.attn(h, positions, kv_lengths, cache, at, layer,  # noqa: E731
                                   backend=backend)
        if self.cfg.norm_position == "post":
            a, new_cache = attn(x)
            x = self.attn_norm(x + a)
            return self.mlp_norm(x + self.mlp(x)), new_cache
        h = self.attn_norm(x)
        a, new_cache = attn(h)
        x = (h if self.cfg.residual_from_norm else x) + a
        h = self.mlp_norm(x)
        x = (h if self.cfg.residual_from_norm else x) + self.mlp(h)
        return x, new_cache
