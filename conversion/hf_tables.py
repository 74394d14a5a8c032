"""The Hugging Face -> jaxformer conversion tables of conversion.hf: per family, `Row`s of
source-key regex, target path, transform (each asserts the source shape and returns the
target or its slot) and optional slot inside a fused target.

Shape legend: D hidden, N heads, K kv heads, G = N // K, H head dim, F ffn, V vocab, Vp
padded vocab, P positions, Tt token types. Torch `nn.Linear` weights are [out, in]; GPT-2's
Conv1D weights are already [in, out]; jaxformer stores [in, out].
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

import numpy as np

from jaxformer.config import ModelConfig


class ShapeError(ValueError):
    pass


# ---- transforms: each asserts the source shape, returns the target (slice) -------------------
Transform = Callable[[np.ndarray, ModelConfig], np.ndarray]


def _expect(x: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    if tuple(x.shape) != tuple(shape):
        raise ShapeError(f"shape {tuple(x.shape)}, but config.json implies {tuple(shape)}")
    return x


def _pad_rows(x, c: ModelConfig):  # [V, ...] -> [Vp, ...], zero rows past the vocabulary
    return np.pad(x, [(0, c.padded_vocab_size - c.vocab_size)] + [(0, 0)] * (x.ndim - 1))


def vec(size: Callable[[ModelConfig], int]) -> Transform:
    return lambda x, c: _expect(x, (size(c),))


def table(rows: Callable[[ModelConfig], int]) -> Transform:  # [R, D]
    return lambda x, c: _expect(x, (rows(c), c.hidden_size))


def conv1d(n_in, n_out) -> Transform:  # GPT-2 Conv1D [in, out]: already jaxformer's layout
    return lambda x, c: _expect(x, (n_in(c), n_out(c)))


def linear(n_in, n_out) -> Transform:  # nn.Linear [out, in] -> [in, out]
    return lambda x, c: _expect(x, (n_out(c), n_in(c))).T


def token_embedding(x, c):  # [V, D] -> [Vp, D]
    return _pad_rows(_expect(x, (c.vocab_size, c.hidden_size)), c)


def lm_head(x, c):  # nn.Linear [V, D] -> [D, Vp]
    return _pad_rows(_expect(x, (c.vocab_size, c.hidden_size)), c).T


def vocab_bias(x, c):  # [V] -> [Vp]
    return _pad_rows(_expect(x, (c.vocab_size,)), c)


def gpt2_qkv_kernel(x, c):  # Conv1D [D, 3*N*H] (q | k | v, head-major) -> [D, N, 3, H]
    D, N, H = c.hidden_size, c.num_heads, c.dims_per_head
    return _expect(x, (D, 3 * N * H)).reshape(D, 3, N, H).transpose(0, 2, 1, 3)


def gpt2_qkv_bias(x, c):  # [3*N*H] -> [N, 3, H]
    N, H = c.num_heads, c.dims_per_head
    return _expect(x, (3 * N * H,)).reshape(3, N, H).transpose(1, 0, 2)


def out_conv1d(x, c):  # Conv1D [N*H, D] -> [N, H, D]
    N, H, D = c.num_heads, c.dims_per_head, c.hidden_size
    return _expect(x, (N * H, D)).reshape(N, H, D)


def out_linear(x, c):  # nn.Linear [D, N*H] -> [N, H, D]
    N, H, D = c.num_heads, c.dims_per_head, c.hidden_size
    return _expect(x, (D, N * H)).T.reshape(N, H, D)


def grouped_qkv_kernel(x, c):
    """A fused nn.Linear [K*(G+2)*H, D] laid out per kv group (G query heads, its key, its
    value: Falcon; with K = N, G = 1 GPT-NeoX's and BLOOM's per-head q, k, v) -> [D, K, G+2, H]:
    jaxformer's own layout."""
    D, K, G, H = c.hidden_size, c.kv_heads, c.q_per_kv, c.dims_per_head
    return _expect(x, (K * (G + 2) * H, D)).reshape(K, G + 2, H, D).transpose(3, 0, 1, 2)


def grouped_qkv_bias(x, c):  # [K*(G+2)*H] -> [K, G+2, H]
    K, G, H = c.kv_heads, c.q_per_kv, c.dims_per_head
    return _expect(x, (K * (G + 2) * H,)).reshape(K, G + 2, H)


def phi3_qkv_kernel(x, c):
    """Phi-3's fused qkv_proj [(N + 2K)*H, D]: all queries, then keys, then values
    -> [D, K, G+2, H]."""
    D, N, K, G, H = c.hidden_size, c.num_heads, c.kv_heads, c.q_per_kv, c.dims_per_head
    x = _expect(x, ((N + 2 * K) * H, D))
    q = x[: N * H].reshape(K, G, H, D)
    k = x[N * H: (N + K) * H].reshape(K, 1, H, D)
    v = x[(N + K) * H:].reshape(K, 1, H, D)
    return np.concatenate([q, k, v], axis=1).transpose(3, 0, 1, 2)


def gate_up_kernel(x, c):  # Phi-3's fused gate_up_proj [2F, D] (gate, then up) -> [D, 2, F]
    D, F = c.hidden_size, c.mlp_size
    return _expect(x, (2 * F, D)).reshape(2, F, D).transpose(2, 0, 1)


def q_kernel(x, c):  # nn.Linear [N*H, D] -> [D, K, G, H] (query head n = k*G + g)
    D, K, G, H = c.hidden_size, c.kv_heads, c.q_per_kv, c.dims_per_head
    return _expect(x, (K * G * H, D)).T.reshape(D, K, G, H)


def kv_kernel(x, c):  # nn.Linear [K*H, D] -> [D, K, H]
    D, K, H = c.hidden_size, c.kv_heads, c.dims_per_head
    return _expect(x, (K * H, D)).T.reshape(D, K, H)


def q_bias(x, c):  # [N*H] -> [K, G, H]
    K, G, H = c.kv_heads, c.q_per_kv, c.dims_per_head
    return _expect(x, (K * G * H,)).reshape(K, G, H)


def kv_bias(x, c):  # [K*H] -> [K, H]
    return _expect(x, (c.kv_heads * c.dims_per_head,)).reshape(c.kv_heads, c.dims_per_head)


_D = lambda c: c.hidden_size  # noqa: E731
_H = lambda c: c.dims_per_head  # noqa: E731
_P2 = lambda c: c.max_position_embeddings + c.position_offset  # noqa: E731
_F = lambda c: c.mlp_size  # noqa: E731
_P = lambda c: c.max_position_embeddings  # noqa: E731
_TT = lambda c: c.type_vocab_size  # noqa: E731
_TWO = lambda c: 2  # noqa: E731

# Slots inside one layer's target (the leading L index is added by the converter).
Q = ("q", lambda c: np.s_[:, :, : c.q_per_kv])  # kernel [D, K, G+2, H]
K_ = ("k", lambda c: np.s_[:, :, c.q_per_kv])
V_ = ("v", lambda c: np.s_[:, :, c.q_per_kv + 1])
QB = ("q", lambda c: np.s_[:, : c.q_per_kv])  # bias [K, G+2, H]
KB = ("k", lambda c: np.s_[:, c.q_per_kv])
VB = ("v", lambda c: np.s_[:, c.q_per_kv + 1])
GATE = ("gate", lambda c: np.s_[:, 0])  # kernel [D, 2, F]
UP = ("up", lambda c: np.s_[:, 1])
GATE_B = ("gate", lambda c: np.s_[0])  # bias [2, F]
UP_B = ("up", lambda c: np.s_[1])


@dataclass(frozen=True)
class Row:
    """One table row: source keys matching `pattern` go to `target` via `transform`.

    `pattern` is a full-match regex over the key (backbone prefix stripped); `{L}` stands for
    the layer number, `{E}` for the expert number of a mixture of experts. `slot` = (name, cfg -> index) writes a part of the target (fused QKV,
    fused gate/up); a target is complete when every slot of every layer has been written.
    """

    pattern: str
    target: str
    transform: Transform
    slot: tuple[str, Callable[[ModelConfig], tuple]] | None = None

    @property
    def regex(self) -> re.Pattern:
        return re.compile(self.pattern.replace("{L}", r"(?P<layer>\d+)")
                          .replace("{E}", r"(?P<expert>\d+)"))

    @property
    def per_expert(self) -> bool:
        """`{E}` in the pattern: one key per expert, written at [layer, expert] (MoE)."""
        return "{E}" in self.pattern

    @property
    def slot_name(self) -> str:
        return self.slot[0] if self.slot else ""


def _norm_rows(src: str, target: str, bias=True, aliases=("weight", "bias"), size=_D
               ) -> list[Row]:
    # old TF-converted BERT checkpoints call LayerNorm parameters gamma / beta
    w, b = aliases
    rows = [Row(rf"{src}\.(?:{w}|gamma)", f"{target}/scale", vec(size))]
    if bias:
        rows.append(Row(rf"{src}\.(?:{b}|beta)", f"{target}/bias", vec(size)))
    return rows


GPT2_ROWS = [
    Row(r"wte\.weight", "embed/token/embedding", token_embedding),
    Row(r"wpe\.weight", "embed/position/embedding", table(_P)),
    *_norm_rows(r"h\.{L}\.ln_1", "layers/attn_norm"),
    Row(r"h\.{L}\.attn\.c_attn\.weight", "layers/attn/qkv/kernel", gpt2_qkv_kernel),
    Row(r"h\.{L}\.attn\.c_attn\.bias", "layers/attn/qkv/bias", gpt2_qkv_bias),
    Row(r"h\.{L}\.attn\.c_proj\.weight", "layers/attn/out/kernel", out_conv1d),
    Row(r"h\.{L}\.attn\.c_proj\.bias", "layers/attn/out/bias", vec(_D)),
    *_norm_rows(r"h\.{L}\.ln_2", "layers/mlp_norm"),
    Row(r"h\.{L}\.mlp\.c_fc\.weight", "layers/mlp/wi/kernel", conv1d(_D, _F)),
    Row(r"h\.{L}\.mlp\.c_fc\.bias", "layers/mlp/wi/bias", vec(_F)),
    Row(r"h\.{L}\.mlp\.c_proj\.weight", "layers/mlp/wo/kernel", conv1d(_F, _D)),
    Row(r"h\.{L}\.mlp\.c_proj\.bias", "layers/mlp/wo/bias", vec(_D)),
    *_norm_rows(r"ln_f", "final_norm"),
    Row(r"lm_head\.weight", "lm_head/kernel", lm_head),
]

LLAMA_ROWS = [
    Row(r"embed_tokens\.weight", "embed/token/embedding", token_embedding),
    *_norm_rows(r"layers\.{L}\.input_layernorm", "layers/attn_norm", bias=False),
    Row(r"layers\.{L}\.self_attn\.q_proj\.weight", "layers/attn/qkv/kernel", q_kernel, Q),
    Row(r"layers\.{L}\.self_attn\.k_proj\.weight", "layers/attn/qkv/kernel", kv_kernel, K_),
    Row(r"layers\.{L}\.self_attn\.v_proj\.weight", "layers/attn/qkv/kernel", kv_kernel, V_),
    Row(r"layers\.{L}\.self_attn\.q_proj\.bias", "layers/attn/qkv/bias", q_bias, QB),
    Row(r"layers\.{L}\.self_attn\.k_proj\.bias", "layers/attn/qkv/bias", kv_bias, KB),
    Row(r"layers\.{L}\.self_attn\.v_proj\.bias", "layers/attn/qkv/bias", kv_bias, VB),
    Row(r"layers\.{L}\.self_attn\.o_proj\.weight", "layers/attn/out/kernel", out_linear),
    Row(r"layers\.{L}\.self_attn\.o_proj\.bias", "layers/attn/out/bias", vec(_D)),
    *_norm_rows(r"layers\.{L}\.post_attention_layernorm", "layers/mlp_norm", bias=False),
    Row(r"layers\.{L}\.mlp\.gate_proj\.weight", "layers/mlp/wi/kernel", linear(_D, _F), GATE),
    Row(r"layers\.{L}\.mlp\.up_proj\.weight", "layers/mlp/wi/kernel", linear(_D, _F), UP),
    Row(r"layers\.{L}\.mlp\.gate_proj\.bias", "layers/mlp/wi/bias", vec(_F), GATE_B),
    Row(r"layers\.{L}\.mlp\.up_proj\.bias", "layers/mlp/wi/bias", vec(_F), UP_B),
    Row(r"layers\.{L}\.mlp\.down_proj\.weight", "layers/mlp/wo/kernel", linear(_F, _D)),
    Row(r"layers\.{L}\.mlp\.down_proj\.bias", "layers/mlp/wo/bias", vec(_D)),
    *_norm_rows(r"norm", "final_norm", bias=False),
    Row(r"lm_head\.weight", "lm_head/kernel", lm_head),
]


_QK_NORM_ROWS = [  # Qwen 3, Gemma 3: RMSNorm over H of q and k
    *_norm_rows(r"layers\.{L}\.self_attn\.q_norm", "layers/attn/q_norm", bias=False, size=_H),
    *_norm_rows(r"layers\.{L}\.self_attn\.k_norm", "layers/attn/k_norm", bias=False, size=_H),
]
# Gemma 2 / 3: post_attention_layernorm norms the attention output (sandwich), the MLP's
# input norm is pre_feedforward_layernorm
_GEMMA2_ROWS = [r for r in LLAMA_ROWS if "post_attention_layernorm" not in r.pattern] + [
    *_norm_rows(r"layers\.{L}\.post_attention_layernorm", "layers/post_attn_norm", bias=False),
    *_norm_rows(r"layers\.{L}\.pre_feedforward_layernorm", "layers/mlp_norm", bias=False),
    *_norm_rows(r"layers\.{L}\.post_feedforward_layernorm", "layers/post_mlp_norm", bias=False),
]
PHI3_ROWS = [r for r in LLAMA_ROWS if not re.search(r"[qkv]_proj|gate_proj|up_proj", r.pattern)] + [
    Row(r"layers\.{L}\.self_attn\.qkv_proj\.weight", "layers/attn/qkv/kernel", phi3_qkv_kernel),
    Row(r"layers\.{L}\.mlp\.gate_up_proj\.weight", "layers/mlp/wi/kernel", gate_up_kernel),
]
GPT_NEOX_ROWS = [
    Row(r"embed_in\.weight", "embed/token/embedding", token_embedding),
    *_norm_rows(r"layers\.{L}\.input_layernorm", "layers/attn_norm"),
    *_norm_rows(r"layers\.{L}\.post_attention_layernorm", "layers/mlp_norm"),
    Row(r"layers\.{L}\.attention\.query_key_value\.weight", "layers/attn/qkv/kernel",
        grouped_qkv_kernel),
    Row(r"layers\.{L}\.attention\.query_key_value\.bias", "layers/attn/qkv/bias",
        grouped_qkv_bias),
    Row(r"layers\.{L}\.attention\.dense\.weight", "layers/attn/out/kernel", out_linear),
    Row(r"layers\.{L}\.attention\.dense\.bias", "layers/attn/out/bias", vec(_D)),
    Row(r"layers\.{L}\.mlp\.dense_h_to_4h\.weight", "layers/mlp/wi/kernel", linear(_D, _F)),
    Row(r"layers\.{L}\.mlp\.dense_h_to_4h\.bias", "layers/mlp/wi/bias", vec(_F)),
    Row(r"layers\.{L}\.mlp\.dense_4h_to_h\.weight", "layers/mlp/wo/kernel", linear(_F, _D)),
    Row(r"layers\.{L}\.mlp\.dense_4h_to_h\.bias", "layers/mlp/wo/bias", vec(_D)),
    *_norm_rows(r"final_layer_norm", "final_norm"),
    Row(r"embed_out\.weight", "lm_head/kernel", lm_head),
]
GPTJ_ROWS = [
    Row(r"wte\.weight", "embed/token/embedding", token_embedding),
    *_norm_rows(r"h\.{L}\.ln_1", "layers/attn_norm"),
    Row(r"h\.{L}\.attn\.q_proj\.weight", "layers/attn/qkv/kernel", q_kernel, Q),
    Row(r"h\.{L}\.attn\.k_proj\.weight", "layers/attn/qkv/kernel", kv_kernel, K_),
    Row(r"h\.{L}\.attn\.v_proj\.weight", "layers/attn/qkv/kernel", kv_kernel, V_),
    Row(r"h\.{L}\.attn\.out_proj\.weight", "layers/attn/out/kernel", out_linear),
    Row(r"h\.{L}\.attn\.out_proj\.bias", "layers/attn/out/bias", vec(_D)),  # absent: zeros
    Row(r"h\.{L}\.mlp\.fc_in\.weight", "layers/mlp/wi/kernel", linear(_D, _F)),
    Row(r"h\.{L}\.mlp\.fc_in\.bias", "layers/mlp/wi/bias", vec(_F)),
    Row(r"h\.{L}\.mlp\.fc_out\.weight", "layers/mlp/wo/kernel", linear(_F, _D)),
    Row(r"h\.{L}\.mlp\.fc_out\.bias", "layers/mlp/wo/bias", vec(_D)),
    *_norm_rows(r"ln_f", "final_norm"),
    Row(r"lm_head\.weight", "lm_head/kernel", lm_head),
    Row(r"lm_head\.bias", "lm_head/bias", vocab_bias),
]
OPT_ROWS = [
    Row(r"embed_tokens\.weight", "embed/token/embedding", token_embedding),
    Row(r"embed_positions\.weight", "embed/position/embedding", table(_P2)),
    Row(r"layers\.{L}\.self_attn\.q_proj\.weight", "layers/attn/qkv/kernel", q_kernel, Q),
    Row(r"layers\.{L}\.self_attn\.k_proj\.weight", "layers/attn/qkv/kernel", kv_kernel, K_),
    Row(r"layers\.{L}\.self_attn\.v_proj\.weight", "layers/attn/qkv/kernel", kv_kernel, V_),
    Row(r"layers\.{L}\.self_attn\.q_proj\.bias", "layers/attn/qkv/bias", q_bias, QB),
    Row(r"layers\.{L}\.self_attn\.k_proj\.bias", "layers/attn/qkv/bias", kv_bias, KB),
    Row(r"layers\.{L}\.self_attn\.v_proj\.bias", "layers/attn/qkv/bias", kv_bias, VB),
    Row(r"layers\.{L}\.self_attn\.out_proj\.weight", "layers/attn/out/kernel", out_linear),
    Row(r"layers\.{L}\.self_attn\.out_proj\.bias", "layers/attn/out/bias", vec(_D)),
    *_norm_rows(r"layers\.{L}\.self_attn_layer_norm", "layers/attn_norm"),
    Row(r"layers\.{L}\.fc1\.weight", "layers/mlp/wi/kernel", linear(_D, _F)),
    Row(r"layers\.{L}\.fc1\.bias", "layers/mlp/wi/bias", vec(_F)),
    Row(r"layers\.{L}\.fc2\.weight", "layers/mlp/wo/kernel", linear(_F, _D)),
    Row(r"layers\.{L}\.fc2\.bias", "layers/mlp/wo/bias", vec(_D)),
    *_norm_rows(r"layers\.{L}\.final_layer_norm", "layers/mlp_norm"),
    *_norm_rows(r"final_layer_norm", "final_norm"),
    Row(r"lm_head\.weight", "lm_head/kernel", lm_head),
]
_FUSED_QKV = [  # Falcon and BLOOM: query_key_value / dense / dense_h_to_4h / dense_4h_to_h
    Row(r"h\.{L}\.self_attention\.query_key_value\.weight", "layers/attn/qkv/kernel",
        grouped_qkv_kernel),
    Row(r"h\.{L}\.self_attention\.query_key_value\.bias", "layers/attn/qkv/bias",
        grouped_qkv_bias),
    Row(r"h\.{L}\.self_attention\.dense\.weight", "layers/attn/out/kernel", out_linear),
    Row(r"h\.{L}\.self_attention\.dense\.bias", "layers/attn/out/bias", vec(_D)),
    Row(r"h\.{L}\.mlp\.dense_h_to_4h\.weight", "layers/mlp/wi/kernel", linear(_D, _F)),
    Row(r"h\.{L}\.mlp\.dense_h_to_4h\.bias", "layers/mlp/wi/bias", vec(_F)),
    Row(r"h\.{L}\.mlp\.dense_4h_to_h\.weight", "layers/mlp/wo/kernel", linear(_F, _D)),
    Row(r"h\.{L}\.mlp\.dense_4h_to_h\.bias", "layers/mlp/wo/bias", vec(_D)),
    Row(r"word_embeddings\.weight", "embed/token/embedding", token_embedding),
    *_norm_rows(r"ln_f", "final_norm"),
    Row(r"lm_head\.weight", "lm_head/kernel", lm_head),
]
FALCON_ROWS = _FUSED_QKV + [
    # new architecture: ln_attn / ln_mlp (or one input_layernorm); old: input_layernorm and,
    # without parallel attention, post_attention_layernorm
    *_norm_rows(r"h\.{L}\.(?:ln_attn|input_layernorm)", "layers/attn_norm"),
    *_norm_rows(r"h\.{L}\.(?:ln_mlp|post_attention_layernorm)", "layers/mlp_norm"),
]
BLOOM_ROWS = _FUSED_QKV + [
    *_norm_rows(r"word_embeddings_layernorm", "embed/norm"),
    *_norm_rows(r"h\.{L}\.input_layernorm", "layers/attn_norm"),
    *_norm_rows(r"h\.{L}\.post_attention_layernorm", "layers/mlp_norm"),
]


def _bert_rows(megatron: bool) -> list[Row]:
    layer = r"encoder\.layer\.{L}\."
    rows = [
        Row(r"embeddings\.word_embeddings\.weight", "embed/token/embedding", token_embedding),
        Row(r"embeddings\.position_embeddings\.weight", "embed/position/embedding", table(_P)),
        Row(r"embeddings\.token_type_embeddings\.weight", "embed/token_type/embedding",
            table(_TT)),
        Row(layer + r"attention\.self\.query\.weight", "layers/attn/qkv/kernel", q_kernel, Q),
        Row(layer + r"attention\.self\.key\.weight", "layers/attn/qkv/kernel", kv_kernel, K_),
        Row(layer + r"attention\.self\.value\.weight", "layers/attn/qkv/kernel", kv_kernel, V_),
        Row(layer + r"attention\.self\.query\.bias", "layers/attn/qkv/bias", q_bias, QB),
        Row(layer + r"attention\.self\.key\.bias", "layers/attn/qkv/bias", kv_bias, KB),
        Row(layer + r"attention\.self\.value\.bias", "layers/attn/qkv/bias", kv_bias, VB),
        Row(layer + r"attention\.output\.dense\.weight", "layers/attn/out/kernel", out_linear),
        Row(layer + r"attention\.output\.dense\.bias", "layers/attn/out/bias", vec(_D)),
        Row(layer + r"intermediate\.dense\.weight", "layers/mlp/wi/kernel", linear(_D, _F)),
        Row(layer + r"intermediate\.dense\.bias", "layers/mlp/wi/bias", vec(_F)),
        Row(layer + r"output\.dense\.weight", "layers/mlp/wo/kernel", linear(_F, _D)),
        Row(layer + r"output\.dense\.bias", "layers/mlp/wo/bias", vec(_D)),
        Row(r"pooler\.dense\.weight", "pooler/kernel", linear(_D, _D)),
        Row(r"pooler\.dense\.bias", "pooler/bias", vec(_D)),
        Row(r"cls\.predictions\.transform\.dense\.weight", "mlm/dense/kernel", linear(_D, _D)),
        Row(r"cls\.predictions\.transform\.dense\.bias", "mlm/dense/bias", vec(_D)),
        *_norm_rows(r"cls\.predictions\.transform\.LayerNorm", "mlm/norm"),
        Row(r"cls\.predictions\.bias", "mlm/bias", vocab_bias),
        Row(r"cls\.seq_relationship\.weight", "binary_head/kernel", linear(_D, _TWO)),
        Row(r"cls\.seq_relationship\.bias", "binary_head/bias", vec(_TWO)),
    ]
    if megatron:  # pre-LN: norm before each sublayer, a final norm, none on the embeddings
        rows += [*_norm_rows(layer + r"attention\.ln", "layers/attn_norm"),
                 *_norm_rows(layer + r"ln", "layers/mlp_norm"),
                 *_norm_rows(r"encoder\.ln", "final_norm")]
    else:  # post-LN: norm after each residual add, and on the embedding sum
        rows += [*_norm_rows(r"embeddings\.LayerNorm", "embed/norm"),
                 *_norm_rows(layer + r"attention\.output\.LayerNorm", "layers/attn_norm"),
                 *_norm_rows(layer + r"output\.LayerNorm", "layers/mlp_norm")]
    return rows


# ---- mixtures of experts: expert e of layer l goes to [l, e] of the stacked expert kernels
_E = lambda c: c.num_experts  # noqa: E731
_FE = lambda c: c.expert_mlp_size  # noqa: E731
_FS = lambda c: c.shared_expert_size  # noqa: E731
_ONE = lambda c: 1  # noqa: E731


def _moe_rows(layer: str, w_gate: str, w_up: str, w_down: str, router: str) -> list[Row]:
    """Router [E, D] -> [D, E]; expert gate / up nn.Linear [F, D] -> wi [E, D, 2, F] slots;
    down [D, F] -> wo [E, F, D]."""
    expert = layer + r"experts\.{E}\."
    return [
        Row(layer + router, "layers/mlp/router", linear(_D, _E)),
        Row(expert + w_gate, "layers/mlp/wi/kernel", linear(_D, _FE), GATE),
        Row(expert + w_up, "layers/mlp/wi/kernel", linear(_D, _FE), UP),
        Row(expert + w_down, "layers/mlp/wo/kernel", linear(_FE, _D)),
    ]


_NO_MLP = [r for r in LLAMA_ROWS if r"\.mlp\." not in r.pattern]
MIXTRAL_ROWS = _NO_MLP + _moe_rows(r"layers\.{L}\.block_sparse_moe\.", r"w1\.weight",
                                   r"w3\.weight", r"w2\.weight", r"gate\.weight")
QWEN2_MOE_ROWS = _NO_MLP + _moe_rows(
    r"layers\.{L}\.mlp\.", r"gate_proj\.weight", r"up_proj\.weight", r"down_proj\.weight",
    r"gate\.weight") + [
    Row(r"layers\.{L}\.mlp\.shared_expert\.gate_proj\.weight", "layers/mlp/shared/wi/kernel",
        linear(_D, _FS), GATE),
    Row(r"layers\.{L}\.mlp\.shared_expert\.up_proj\.weight", "layers/mlp/shared/wi/kernel",
        linear(_D, _FS), UP),
    Row(r"layers\.{L}\.mlp\.shared_expert\.down_proj\.weight", "layers/mlp/shared/wo/kernel",
        linear(_FS, _D)),
    Row(r"layers\.{L}\.mlp\.shared_expert_gate\.weight", "layers/mlp/shared_gate",
        linear(_D, _ONE)),
]


@dataclass(frozen=True)
class Family:
    prefix: str  # backbone prefix that task models add (GPT2LMHeadModel: "transformer.")
    rows: list[Row]
    ignore: tuple[str, ...] = ()  # buffers, not parameters
    tied_aliases: tuple[str, ...] = ()  # copies of the token table when embeddings are tied
    zero_ok: tuple[str, ...] = ()  # targets the source may lack; they stay zero


_LLAMA = Family("model.", LLAMA_ROWS, ignore=(r"(layers\.\d+\.self_attn\.)?rotary_emb\.inv_freq",),
                tied_aliases=(r"lm_head\.weight",),
                # LLaMA's attention_bias adds an o_proj bias without MLP biases (and mlp_bias
                # the reverse); linear_bias covers both, the absent ones are zeros.
                zero_ok=("layers/attn/out/bias", "layers/mlp/wi/bias", "layers/mlp/wo/bias"))
_BERT_IGNORE = (r"embeddings\.position_ids", r"embeddings\.token_type_ids")
_BERT_TIED = (r"cls\.predictions\.decoder\.weight", r"cls\.predictions\.decoder\.bias")
FAMILIES = {
    "gpt2": Family("transformer.", GPT2_ROWS,
                   ignore=(r"h\.\d+\.attn\.(bias|masked_bias)",),
                   tied_aliases=(r"lm_head\.weight",)),
    "llama": _LLAMA, "mistral": _LLAMA, "qwen2": _LLAMA,
    "qwen3": Family("model.", LLAMA_ROWS + _QK_NORM_ROWS, _LLAMA.ignore, _LLAMA.tied_aliases),
    "phi3": Family("model.", PHI3_ROWS, _LLAMA.ignore, _LLAMA.tied_aliases),
    "gemma": Family("model.", LLAMA_ROWS, _LLAMA.ignore, _LLAMA.tied_aliases),
    "gemma2": Family("model.", _GEMMA2_ROWS, _LLAMA.ignore, _LLAMA.tied_aliases),
    "gemma3_text": Family("model.", _GEMMA2_ROWS + _QK_NORM_ROWS, _LLAMA.ignore,
                          _LLAMA.tied_aliases),
    "gpt_neox": Family("gpt_neox.", GPT_NEOX_ROWS,
                       ignore=(r"layers\.\d+\.attention\.(bias|masked_bias|rotary_emb\.inv_freq)",),
                       tied_aliases=(r"embed_out\.weight",)),
    "gptj": Family("transformer.", GPTJ_ROWS, ignore=(r"h\.\d+\.attn\.(bias|masked_bias)",),
                   # GPT-J's attention output has no bias; linear_bias is the MLP's
                   zero_ok=("layers/attn/out/bias",)),
    "opt": Family("model.decoder.", OPT_ROWS, tied_aliases=(r"lm_head\.weight",)),
    "falcon": Family("transformer.", FALCON_ROWS, tied_aliases=(r"lm_head\.weight",)),
    "bloom": Family("transformer.", BLOOM_ROWS, tied_aliases=(r"lm_head\.weight",)),
    "bert": Family("bert.", _bert_rows(False), _BERT_IGNORE, _BERT_TIED),
    "megatron-bert": Family("bert.", _bert_rows(True), _BERT_IGNORE, _BERT_TIED),
}
FAMILIES.update({  # mixtures of experts: per-expert keys of the Hub checkpoints
    "mixtral": Family("model.", MIXTRAL_ROWS, _LLAMA.ignore, _LLAMA.tied_aliases),
    "qwen2_moe": Family("model.", QWEN2_MOE_ROWS, _LLAMA.ignore, _LLAMA.tied_aliases),
})
