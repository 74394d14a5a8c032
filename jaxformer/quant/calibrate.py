"""Static FP8 activation scales from sample prompts.

`calibrate(model, prompts)` runs the prompts (one padded batch, at most MAX_TOKENS tokens
each) through the trunk one layer at a time and records max |x| over the valid tokens at the
input of every quantized linear layer of every layer; each layer's `act_scale` becomes
max |x| / 448, so the largest calibrated input maps onto float8_e4m3fn's largest value and
larger ones saturate.

The weights are already FP8 when this runs (load quantizes first, so no float copy of the
model is kept beside the quantized one); activations stay unquantized while recording, so
each scale is measured on the inputs the deployed weights produce upstream.

Without prompts: DEFAULT_PROMPTS (short English prose, dialogue, code, numbers and lists)
through the model's tokenizer; a model without a tokenizer uses seeded random token ids,
which suits random-weight models and nothing else. Pass prompts like the ones you serve.

Layer by layer (a Python loop over one compiled layer program) rather than through the
model's scan: the per-layer maxima leave each call as ordinary outputs. A layer's weights are
taken from the stack as one slice per pipeline stage, so a `pipe`-sharded stack moves at most
one layer per stage, never the whole stack.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax

from jaxformer import sharding as shd
from jaxformer.layers.base import Dense
from jaxformer.quant import ops
from jaxformer.quant.module import at_path, iter_denses
from jaxformer.quant.spec import parse

MAX_TOKENS = 256
RANDOM_PROMPTS = (16, 64)  # prompts x tokens of random ids when there is no tokenizer

DEFAULT_PROMPTS = (
    "The history of the city goes back more than two thousand years, to a small settlement "
    "on the river crossing.",
    "Photosynthesis converts light energy into chemical energy stored in glucose.",
    "Q: What is the capital of France?\nA: The capital of France is Paris.",
    "def fibonacci(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n"
    "    return a\n",
    "Dear team, thank you all for your hard work this quarter. Revenue grew by 12% to "
    "$4.3 million.",
    "Once upon a time, in a kingdom by the sea, there lived a princess who loved to read.",
    "SELECT name, COUNT(*) FROM orders WHERE created_at > '2024-01-01' GROUP BY name;",
    "The patient presented with a fever of 39.2 C, a persistent cough and shortness of "
    "breath.",
    "1. Preheat the oven to 180 degrees.\n2. Mix the flour, sugar and eggs.\n3. Bake for "
    "25 minutes.",
    "In 1969, Apollo 11 landed on the Moon and Neil Armstrong became the first person to "
    "walk on its surface.",
    "The derivative of x^2 + 3x - 5 with respect to x is 2x + 3.",
    "\"Where are you going?\" she asked. \"Home,\" he said, without turning around.",
    "The stock market closed higher on Friday as investors welcomed the latest inflation "
    "figures.",
    "Machine learning models are trained on large datasets to recognise patterns and make "
    "predictions.",
    "<html><body><h1>Welcome</h1><p>This is a test page.</p></body></html>",
    "A man is playing a guitar on the street while people walk past.",
)


def encode(model, prompts=None):
    """prompts (strings or token-id lists; None: the defaults) -> (ids [B, T] int32,
    attention mask [B, T], token types [B, T] or None), right-padded, at most MAX_TOKENS."""
    cfg, tok = model.config, model.tokenizer
    limit = min(MAX_TOKENS, cfg.max_position_embeddings)
    if prompts is None and tok is None:
        n, t = RANDOM_PROMPTS
        rng = np.random.default_rng(0)
        rows = [rng.integers(0, cfg.vocab_size, int(k)).tolist()
                for k in rng.integers(t // 4, t + 1, n)]
        types = None
    else:
        prompts = list(DEFAULT_PROMPTS if prompts is None else prompts)
        if not prompts:
            raise ValueError("calibration: prompts is empty; give at least one prompt")
        rows, types = [], []
        for i, p in enumerate(prompts):
            tt = None
            if isinstance(p, str):
                if tok is None:
                    raise ValueError("calibration: string prompts need a tokenizer; this model "
                                     "has none, so pass token-id lists")
                if cfg.arch == "encoder" and hasattr(tok, "encode_for_model"):
                    ids, tt = tok.encode_for_model(p)
                elif cfg.arch == "encoder":  # BERT's frame where the vocabulary has it
                    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
                    ids = tok.encode(p)
                    ids = ids if cls is None or sep is None else [cls] + ids + [sep]
                else:
                    ids = tok.encode(p)
                    if tok.bos_id is not None and cfg.bos_token_id is not None:
                        ids = [tok.bos_id] + ids
            else:
                ids = [int(t) for t in p]
            if not ids:
                raise ValueError(f"calibration: prompt {i} is empty")
            rows.append(ids[:limit])
            types.append((tt or [0] * len(ids))[:limit])
        if not cfg.type_vocab_size:
            types = None
    T = max(len(r) for r in rows)
    ids = np.zeros((len(rows), T), np.int32)
    mask = np.zeros((len(rows), T), np.int32)
    tt = None if types is None else np.zeros((len(rows), T), np.int32)
    for i, r in enumerate(rows):
        ids[i, :len(r)], mask[i, :len(r)] = r, 1
        if tt is not None:
            tt[i, :len(r)] = types[i]
    return ids, mask, tt


def calibrate(model, prompts=None) -> dict:
    """Measure max |x| at every quantized linear's input on `prompts` and set the model's
    act_scale params to max |x| / 448. Returns {name, e.g. "attn/qkv": amax [L] float32}."""
    spec = parse(model.run.quantize)
    if spec is None or not spec.activations:
        raise ValueError(f"calibrate(): activation scales belong to FP8 models; this model "
                         f"has quantize={model.run.quantize!r}")
    ids, mask, types = encode(model, prompts)
    ids_d, lengths, types_d, _ = model._padded(ids, mask, types)
    amax = _measure(model, ids_d, lengths, types_d)
    set_act_scales(model, amax)
    return amax


def _measure(model, ids, lengths, types) -> dict:
    """max |x| at each quantized linear's input, layer by layer: {name: [L] float32}.

    Each step takes one layer stage-locally (LayerStack.layer_views), so a pipe-sharded stack
    moves at most one layer.
    """
    backend = model.run.attention
    L = model.config.num_layers
    graphdef, S, where = model.stack.layer_views(
        model.module(model.params).layers, shd.mesh_size(model.mesh, model.rules.get("layers")))

    @jax.jit
    def embed(params, ids, types):
        with model.traced():
            B, T = ids.shape
            positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
            return model.module(params).embed(ids, positions, types)

    @jax.jit
    def layer(state, s, j, h, lengths, i):
        def take(a):  # [S * n, ...] viewed [S, n, ...] as the stages hold it -> [s, j]
            a = a.reshape((S, a.shape[0] // S) + a.shape[1:])
            a = lax.dynamic_index_in_dim(a, j, 1, keepdims=False)
            return lax.dynamic_index_in_dim(a, s, 0, keepdims=False)

        with model.traced():
            block = nnx.merge(graphdef, jax.tree.map(take, state))
            B, T = h.shape[:2]
            positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
            mask = positions < lengths[:, None]
            denses = observe(block)
            h, _ = block(h, positions, lengths, backend=backend, layer_id=i)
            return h, recorded(denses, mask)

    with jax.set_mesh(model.mesh):  # the traces' abstract mesh (Model.traced)
        h = embed(model.params, ids, types)
        per_layer = []
        for i in range(L):
            state_i, s, j = where(i)
            h, amax = layer(state_i, jnp.int32(s), jnp.int32(j), h, lengths, jnp.int32(i))
            per_layer.append(amax)
    names = per_layer[0].keys()
    return {k: np.asarray([float(jax.device_get(a[k])) for a in per_layer], np.float32)
            for k in names}


def observe(block) -> list[Dense]:
    """Turn on input recording (Dense.observe) in the quantized linears of `block`, a copy
    merged inside the trace; returns them."""
    it = nnx.iter_modules(block) if hasattr(nnx, "iter_modules") else block.iter_modules()
    denses = [m for _, m in it if isinstance(m, Dense) and m.quant is not None
              and not m.weight_only]  # MoE experts take no act_scale
    for d in denses:
        d.observe = True
    return denses


def recorded(denses: list[Dense], mask) -> dict:
    """{qname: max |x| over the valid tokens of mask [B, T]} from the denses' records."""
    amax: dict = {}
    for d in denses:
        v = jnp.max(jnp.where(mask, d.observed[...], 0.0))
        amax[d.qname] = v if d.qname not in amax else jnp.maximum(amax[d.qname], v)
    return amax


def set_act_scales(model, amax: dict) -> None:
    """act_scale = amax / 448 (1 where a layer saw only zeros), in each scale's sharding."""
    pure = nnx.to_pure_dict(model.params)
    for path, dense in iter_denses(model.module(model.params)):
        if dense.weight_only:  # no act_scale (MoE experts: layers/moe.py)
            continue
        a = model.stack.per_layer_values(np.asarray(amax[dense.qname], np.float32), path)
        node = at_path(pure, path)
        old = node["act_scale"]
        scale = np.where(a > 0, a, ops.FP8_MAX) / ops.FP8_MAX
        node["act_scale"] = jax.device_put(scale.astype(np.float32).reshape(old.shape),
                                           old.sharding)
    nnx.replace_by_pure_dict(model.params, pure)
    model.params_changed()
