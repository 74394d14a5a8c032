"""One transformer block: attention and MLP sublayers, pre-LN (GPT, LLaMA, Megatron) or
post-LN (BERT), optionally with sandwich norms (Gemma 2/3: the sublayer outputs are normed
too) or a parallel residual (GPT-NeoX, GPT-J, Falcon: x + attn(n1(x)) + mlp(n2(x)), where
parallel_norms=1 shares one norm)."""
from __future__ import annotations

from flax import nnx

from jaxformer.config import ModelConfig
from jaxformer.layers.attention import Attention
from jaxformer.layers.mlp import MLP
from jaxformer.layers.moe import MoE
from jaxformer.layers.norms import Norm


def make_norm(cfg: ModelConfig, rngs: nnx.Rngs) -> Norm:
    """A norm over D as the config asks (kind, eps, Gemma's 1 + w offset)."""
    return Norm(cfg.hidden_size, cfg.norm, cfg.norm_eps, rngs, offset=cfg.norm_offset)


class Block(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        self.attn_norm = make_norm(cfg, rngs)
        self.attn = Attention(cfg, rngs)
        if not (cfg.parallel_residual and cfg.parallel_norms == 1):
            self.mlp_norm = make_norm(cfg, rngs)
        if cfg.sandwich_norm:
            self.post_attn_norm = make_norm(cfg, rngs)
            self.post_mlp_norm = make_norm(cfg, rngs)
        self.mlp = MoE(cfg, rngs) if cfg.num_experts else MLP(cfg, rngs)

    def __call__(self, x, positions, kv_lengths, cache=None, at=None, layer=None, *,
                 backend="auto", layer_id=None):
        """x [B, T, D] -> (x [B, T, D], new cache or None). Arguments as Attention's."""
        attn = lambda h: self.attn(h, positions, kv_lengths, cache, at, layer,  # noqa: E731
                                   backend=backend, layer_id=layer_id)
        cfg = self.cfg
        if cfg.norm_position == "post":
            a, new_cache = attn(x)
            x = self.attn_norm(x + a)
            return self.mlp_norm(x + self.mlp(x)), new_cache
        h = self.attn_norm(x)
        a, new_cache = attn(h)
        if cfg.parallel_residual:
            m = self.mlp(h if cfg.parallel_norms == 1 else self.mlp_norm(x))
            return x + a + m, new_cache
        if cfg.sandwich_norm:
            a = self.post_attn_norm(a)
        x = (h if cfg.residual_from_norm else x) + a
        h = self.mlp_norm(x)
        m = self.mlp(h)
        if cfg.sandwich_norm:
            m = self.post_mlp_norm(m)
        x = (h if cfg.residual_from_norm else x) + m
        return x, new_cache
