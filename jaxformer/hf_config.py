"""Hugging Face `config.json` -> ModelConfig, for the families jaxformer computes exactly.

Supported `model_type`s: gpt2; llama (every rope scaling), mistral (sliding window), qwen2,
qwen3 (QK-norm), phi3, gemma, gemma2, gemma3_text (LLaMA-style: RoPE, RMSNorm, gated MLP, GQA,
plus their variants); the mixtures of experts mixtral and qwen2_moe; gpt_neox, gptj, opt, falcon, bloom; bert (post-LN) and megatron-bert
(pre-LN). Anything whose numerics jaxformer does not implement (attention scaled by layer
index, relative positions, Falcon's ALiBi, ...) is refused with a ValueError rather than
converted into a model that silently computes something else.

Head flags of encoders (pooler, MLM head, binary head) describe the weights a checkpoint
holds, which a config cannot know; the converter sets them from the keys it finds
(`conversion/hf.py`). Here they default to the full pre-training model.
"""
from __future__ import annotations

import math
from typing import Any, Mapping

from jaxformer.config import ModelConfig

# HF `hidden_act` / `activation_function` -> ModelConfig.activation
ACTIVATIONS = {
    "gelu": "gelu",
    "gelu_new": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "relu": "relu",
    "relu2": "squared_relu",
    "silu": "silu",
    "swish": "silu",
}

LLAMA_STYLE = ("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma", "gemma2", "gemma3_text")
MOE = ("mixtral", "qwen2_moe")  # mixtures of experts over a LLaMA-style block
SUPPORTED = ("gpt2", *LLAMA_STYLE, *MOE, "gpt_neox", "gptj", "opt", "falcon", "bloom", "bert",
             "megatron-bert")


def _as_dict(hf: Any) -> dict[str, Any]:
    if isinstance(hf, Mapping):
        return dict(hf)
    if hasattr(hf, "to_dict"):
        return hf.to_dict()
    raise TypeError(f"from_hf_config: expected a transformers config or a dict, got "
                    f"{type(hf).__name__}")


def _activation(name: Any, model_type: str) -> str:
    if name not in ACTIVATIONS:
        raise ValueError(f"{model_type}: activation {name!r} is not supported; supported: "
                         f"{sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


def _token_id(v: Any, vocab: int) -> int | None:
    if isinstance(v, (list, tuple)):  # several eos ids: the first is the canonical one
        v = v[0] if v else None
    if isinstance(v, int) and not isinstance(v, bool) and 0 <= v < vocab:
        return v
    return None


def _name(d: Mapping[str, Any], model_type: str) -> str:
    path = str(d.get("_name_or_path") or "").rstrip("/")
    return path.rsplit("/", 1)[-1] or model_type


def _special(d: Mapping[str, Any], vocab: int) -> dict[str, int | None]:
    return {f"{k}_token_id": _token_id(d.get(f"{k}_token_id"), vocab)
            for k in ("bos", "eos", "pad")}


def _refuse_if(cond: bool, model_type: str, what: str) -> None:
    if cond:
        raise ValueError(f"{model_type}: {what} is not implemented by jaxformer; refusing to "
                         f"convert a model that would compute something else")


def from_hf_config(hf: Any) -> ModelConfig:
    """A Hugging Face config (PretrainedConfig or its dict) -> ModelConfig.

    Raises ValueError naming the model_type when it is not supported, and naming the option
    when the config asks for numerics jaxformer does not implement.
    """
    d = _as_dict(hf)
    model_type = d.get("model_type")
    if model_type == "gpt2":
        return _gpt2(d)
    if model_type in LLAMA_STYLE:
        return _llama(d, model_type)
    if model_type in MOE:
        return _moe(d, model_type)
    other = {"gpt_neox": _gpt_neox, "gptj": _gptj, "opt": _opt, "falcon": _falcon,
             "bloom": _bloom}
    if model_type in other:
        return other[model_type](d, model_type)
    if model_type in ("bert", "megatron-bert"):
        return _bert(d, model_type)
    raise ValueError(f"unsupported Hugging Face model_type {model_type!r}; supported: "
                     f"{list(SUPPORTED)}")


def _gpt2(d: Mapping[str, Any]) -> ModelConfig:
    mt = "gpt2"
    _refuse_if(bool(d.get("scale_attn_by_inverse_layer_idx")), mt,
               "scale_attn_by_inverse_layer_idx=True")
    _refuse_if(bool(d.get("add_cross_attention")), mt, "add_cross_attention=True")
    D, N = d["n_embd"], d["n_head"]
    vocab = d["vocab_size"]
    return ModelConfig(
        name=_name(d, mt),
        arch="decoder",
        vocab_size=vocab,
        hidden_size=D,
        num_layers=d["n_layer"],
        num_heads=N,
        ffn_size=d.get("n_inner") or 4 * D,
        max_position_embeddings=d["n_positions"],
        position_embedding="learned",
        norm="layernorm",
        norm_eps=d.get("layer_norm_epsilon", 1e-5),
        activation=_activation(d.get("activation_function", "gelu_new"), mt),
        qkv_bias=True,
        linear_bias=True,
        tie_embeddings=d.get("tie_word_embeddings", True),
        # scale_attn_weights=False means no 1/sqrt(H) at all
        attn_scale=None if d.get("scale_attn_weights", True) else 1.0,
        **_special(d, vocab),
    )


ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "llama3", "longrope")


def _rope_params(d: Mapping[str, Any]) -> dict[str, Any]:
    """The rope settings wherever this config version keeps them (transformers >= 5:
    `rope_parameters`; before: rope_theta / rope_scaling / partial_rotary_factor)."""
    p = dict(d.get("rope_scaling") or {})
    p.update(d.get("rope_parameters") or {})
    p.setdefault("rope_theta", d.get("rope_theta", 10000.0))
    for k in ("partial_rotary_factor", "original_max_position_embeddings"):
        if p.get(k) is None and d.get(k) is not None:
            p[k] = d[k]
    return p


def _rope(p: Mapping[str, Any], mt: str, max_pos: int, rotary_dim: int
          ) -> tuple[dict[str, Any], int]:
    """(ModelConfig rope fields, max_position_embeddings) from one rope parameter dict.

    The scalings that let positions run past the configured context (linear, dynamic) get
    max_position_embeddings x factor; yarn and llama3 at least original x factor."""
    kind = p.get("rope_type", p.get("type")) or "default"
    _refuse_if(kind not in ROPE_TYPES, mt, f"rope scaling type {kind!r}")
    f: dict[str, Any] = {"rope_theta": float(p["rope_theta"])}
    if kind == "default":
        return f, max_pos
    factor = p.get("factor")
    orig = p.get("original_max_position_embeddings")
    f["rope_scaling"] = kind
    if kind in ("linear", "dynamic"):
        f["rope_factor"] = float(factor)
        if kind == "dynamic":  # transformers' threshold is max_position_embeddings
            f["rope_original_max_positions"] = max_pos
        return f, int(max_pos * factor)
    _refuse_if(orig is None, mt, f"rope_type {kind!r} without original_max_position_embeddings")
    f["rope_original_max_positions"] = int(orig)
    if kind == "llama3":
        f.update(rope_factor=float(factor), rope_low_freq_factor=float(p["low_freq_factor"]),
                 rope_high_freq_factor=float(p["high_freq_factor"]))
        return f, max(max_pos, int(orig * factor))
    if kind == "yarn":
        factor = float(factor if factor is not None else max_pos / orig)
        att = p.get("attention_factor")
        ms, ms_all = p.get("mscale"), p.get("mscale_all_dim")
        if att is None and ms and ms_all:
            def m(x):
                return 0.1 * x * math.log(factor) + 1.0 if factor > 1 else 1.0
            att = m(ms) / m(ms_all)
        f.update(rope_factor=factor, rope_attention_factor=None if att is None else float(att),
                 rope_beta_fast=float(p.get("beta_fast") or 32),
                 rope_beta_slow=float(p.get("beta_slow") or 1),
                 rope_truncate=bool(p.get("truncate", True)))
        return f, max(max_pos, int(orig * factor))
    # longrope: the cos / sin scale follows `factor` (default max_pos / original)
    factor = float(factor if factor is not None else max_pos / orig)
    att = p.get("attention_factor")
    if att is None:
        att = 1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(orig))
    f.update(rope_attention_factor=float(att),
             rope_long_factor=tuple(float(x) for x in p["long_factor"]),
             rope_short_factor=tuple(float(x) for x in p["short_factor"]))
    return f, max_pos


def _fraction(rotary: int, H: int, mt: str) -> float:
    frac = rotary / H
    _refuse_if(int(H * frac) != rotary, mt, f"rotary dim {rotary} of head_dim {H}")
    return frac


def _layer_types(d: Mapping[str, Any], L: int, default) -> tuple[str, ...] | None:
    types = d.get("layer_types") or [default(i) for i in range(L)]
    return tuple("sliding" if t == "sliding_attention" else "full" for t in types)


def _decoder(d: Mapping[str, Any], mt: str, **fields) -> ModelConfig:
    vocab = d["vocab_size"]
    try:
        return ModelConfig(name=_name(d, mt), arch="decoder", vocab_size=vocab,
                           **{**_special(d, vocab), **fields})
    except ValueError as e:
        raise ValueError(f"{mt}: {e}") from None


def _llama(d: Mapping[str, Any], mt: str) -> ModelConfig:
    """llama, mistral, qwen2, qwen3, phi3, gemma, gemma2, gemma3_text."""
    D, N = d["hidden_size"], d["num_attention_heads"]
    K = d.get("num_key_value_heads") or N
    L = d["num_hidden_layers"]
    H = d.get("head_dim") or D // N
    _refuse_if(d.get("pretraining_tp", 1) not in (1, None), mt,
               f"pretraining_tp={d.get('pretraining_tp')}")
    p = _rope_params(d)
    frac = float(p.get("partial_rotary_factor") or 1.0)
    rope_p, local_theta = p, None
    if isinstance(p.get("full_attention"), Mapping):  # gemma3: rope per layer type
        rope_p = {"rope_theta": 10000.0, **p["full_attention"]}
        local = p.get("sliding_attention") or {}
        _refuse_if((local.get("rope_type") or "default") != "default", mt,
                   "rope scaling on sliding layers")
        local_theta = float(local.get("rope_theta", 10000.0))
    elif mt == "gemma3_text":
        local_theta = float(d.get("rope_local_base_freq", 10000.0))
    rope, max_pos = _rope(rope_p, mt, d["max_position_embeddings"], int(H * frac))
    act = d.get("hidden_activation") or d.get("hidden_act", "silu")
    f: dict[str, Any] = dict(
        hidden_size=D, num_layers=L, num_heads=N, num_kv_heads=None if K == N else K,
        head_dim=None if H * N == D else H, ffn_size=d["intermediate_size"],
        position_embedding="rope", rope_fraction=frac, norm="rmsnorm",
        norm_eps=d.get("rms_norm_eps", 1e-6), activation=_activation(act, mt), gated_mlp=True,
        tie_embeddings=bool(d.get("tie_word_embeddings", mt.startswith("gemma"))), **rope)
    window = d.get("sliding_window")
    if mt in ("qwen2", "qwen3"):
        types = _layer_types(d, L, lambda i: "sliding_attention" if d.get("use_sliding_window")
                             and i >= d.get("max_window_layers", L) else "full_attention")
        if "sliding" in types:
            f.update(sliding_window=int(window), layer_types=types)
        f.update(qkv_bias=mt == "qwen2", linear_bias=False, qk_norm=mt == "qwen3")
    elif mt.startswith("gemma"):
        f.update(qkv_bias=bool(d.get("attention_bias")), linear_bias=False, norm_offset=1.0,
                 embed_scale=math.sqrt(D))
        if mt != "gemma":
            period = 2 if mt == "gemma2" else d.get("sliding_window_pattern", 6)
            types = _layer_types(d, L, lambda i: "sliding_attention" if (i + 1) % period
                                 else "full_attention")
            f.update(sandwich_norm=True, attn_scale=float(d["query_pre_attn_scalar"]) ** -0.5,
                     attn_softcap=d.get("attn_logit_softcapping"),
                     final_softcap=d.get("final_logit_softcapping"),
                     sliding_window=int(window) if "sliding" in types else None,
                     layer_types=types if "sliding" in types else None,
                     qk_norm=mt == "gemma3_text")
            if mt == "gemma3_text" and "sliding" in types:
                f["rope_local_theta"] = local_theta
    else:  # llama, mistral, phi3
        if window and mt in ("mistral", "phi3"):
            f["sliding_window"] = int(window)
        attention_bias = bool(d.get("attention_bias", False))
        # LLaMA's attention_bias also gives o_proj a bias; mlp_bias gives the MLP biases.
        # jaxformer's linear_bias covers both; missing ones are converted as zeros.
        f.update(qkv_bias=attention_bias,
                 linear_bias=attention_bias or bool(d.get("mlp_bias", False)))
    return _decoder(d, mt, max_position_embeddings=max_pos, **f)


def _moe(d: Mapping[str, Any], mt: str) -> ModelConfig:
    """mixtral (a Mistral block whose MLP is E experts) and qwen2_moe (a Qwen2 block with
    experts, a gated shared expert and the norm_topk_prob switch)."""
    if mt == "mixtral":
        E, F = d["num_local_experts"], d["intermediate_size"]
        moe = dict(router_norm_topk=True)
    else:
        _refuse_if(d.get("decoder_sparse_step", 1) != 1 or bool(d.get("mlp_only_layers")), mt,
                   "dense MLP layers among the expert layers (decoder_sparse_step / "
                   "mlp_only_layers)")
        E, F = d["num_experts"], d["moe_intermediate_size"]
        shared = int(d.get("shared_expert_intermediate_size") or 0)
        moe = dict(router_norm_topk=bool(d.get("norm_topk_prob", False)),
                   shared_expert_size=shared, shared_expert_gate=shared > 0,
                   qkv_bias=bool(d.get("qkv_bias", True)))
    base = dict(d)
    base["intermediate_size"] = F  # ffn_size: one expert's F (the dense MLP is not built)
    cfg = _llama(base, "mistral" if mt == "mixtral" else "qwen2")
    try:
        return cfg.replace(name=_name(d, mt), num_experts=E,
                           experts_per_token=d["num_experts_per_tok"], **moe)
    except ValueError as e:
        raise ValueError(f"{mt}: {e}") from None


def _gpt_neox(d: Mapping[str, Any], mt: str) -> ModelConfig:
    D, N = d["hidden_size"], d["num_attention_heads"]
    p = _rope_params(d)
    frac = float(p.get("partial_rotary_factor") or d.get("rotary_pct") or 1.0)
    rope, max_pos = _rope(p, mt, d["max_position_embeddings"], int(D // N * frac))
    _refuse_if(not d.get("attention_bias", True), mt, "attention_bias=False")
    return _decoder(d, mt, hidden_size=D, num_layers=d["num_hidden_layers"], num_heads=N,
                    ffn_size=d["intermediate_size"], max_position_embeddings=max_pos,
                    position_embedding="rope", rope_fraction=frac, norm="layernorm",
                    norm_eps=d.get("layer_norm_eps", 1e-5),
                    activation=_activation(d.get("hidden_act", "gelu"), mt),
                    parallel_residual=bool(d.get("use_parallel_residual", True)),
                    tie_embeddings=bool(d.get("tie_word_embeddings", False)), **rope)


def _gptj(d: Mapping[str, Any], mt: str) -> ModelConfig:
    D, N = d["n_embd"], d["n_head"]
    H = D // N
    rot = d.get("rotary_dim") or H
    return _decoder(d, mt, hidden_size=D, num_layers=d["n_layer"], num_heads=N,
                    ffn_size=d.get("n_inner") or 4 * D, max_position_embeddings=d["n_positions"],
                    position_embedding="rope", rope_fraction=_fraction(rot, H, mt),
                    rope_interleaved=True, norm="layernorm",
                    norm_eps=d.get("layer_norm_epsilon", 1e-5),
                    activation=_activation(d.get("activation_function", "gelu_new"), mt),
                    qkv_bias=False, linear_bias=True, parallel_residual=True, parallel_norms=1,
                    tie_embeddings=False, lm_head_bias=True)


def _opt(d: Mapping[str, Any], mt: str) -> ModelConfig:
    D = d["hidden_size"]
    _refuse_if(d.get("word_embed_proj_dim", D) != D, mt,
               f"word_embed_proj_dim={d.get('word_embed_proj_dim')} != hidden_size (project_in)")
    _refuse_if(not d.get("layer_norm_elementwise_affine", True), mt,
               "layer_norm_elementwise_affine=False")
    pre = bool(d.get("do_layer_norm_before", True))
    _refuse_if(pre and d.get("_remove_final_layer_norm"), mt, "_remove_final_layer_norm=True")
    bias = bool(d.get("enable_bias", True))
    return _decoder(d, mt, hidden_size=D, num_layers=d["num_hidden_layers"],
                    num_heads=d["num_attention_heads"], ffn_size=d["ffn_dim"],
                    max_position_embeddings=d["max_position_embeddings"],
                    position_embedding="learned", position_offset=2, norm="layernorm",
                    norm_eps=1e-5, norm_position="pre" if pre else "post", final_norm=pre,
                    activation=_activation(d.get("activation_function", "relu"), mt),
                    qkv_bias=bias, linear_bias=bias,
                    tie_embeddings=bool(d.get("tie_word_embeddings", True)))


def _falcon(d: Mapping[str, Any], mt: str) -> ModelConfig:
    D, N = d["hidden_size"], d["num_attention_heads"]
    _refuse_if(bool(d.get("alibi")), mt, "alibi=True (Falcon-RW's ALiBi)")
    new = bool(d.get("new_decoder_architecture"))
    K = d.get("num_kv_heads") or N if new else (1 if d.get("multi_query", True) else N)
    parallel = bool(d.get("parallel_attn", True)) or new
    norms = (d.get("num_ln_in_parallel_attn") or 2) if new else 1
    rope, max_pos = _rope(_rope_params(d), mt, d.get("max_position_embeddings", 2048), D // N)
    bias = bool(d.get("bias", False))
    return _decoder(d, mt, hidden_size=D, num_layers=d["num_hidden_layers"], num_heads=N,
                    num_kv_heads=None if K == N else K, ffn_size=d.get("ffn_hidden_size") or 4 * D,
                    max_position_embeddings=max_pos, position_embedding="rope",
                    norm="layernorm", norm_eps=d.get("layer_norm_epsilon", 1e-5),
                    activation=_activation(d.get("activation", "gelu"), mt),
                    qkv_bias=bias, linear_bias=bias, parallel_residual=parallel,
                    parallel_norms=norms if parallel else 2,
                    tie_embeddings=bool(d.get("tie_word_embeddings", True)), **rope)


def _bloom(d: Mapping[str, Any], mt: str) -> ModelConfig:
    D = d.get("hidden_size") or d["n_embed"]
    _refuse_if(d.get("pretraining_tp", 1) > 1 and d.get("slow_but_exact"), mt,
               "slow_but_exact=True with pretraining_tp > 1")
    return _decoder(d, mt, hidden_size=D, num_layers=d.get("n_layer") or d["num_hidden_layers"],
                    num_heads=d.get("n_head") or d["num_attention_heads"],
                    max_position_embeddings=d.get("seq_length") or 4096,
                    position_embedding="alibi", norm="layernorm",
                    norm_eps=d.get("layer_norm_epsilon", 1e-5), embed_norm=True,
                    residual_from_norm=bool(d.get("apply_residual_connection_post_layernorm")),
                    activation="gelu_tanh", tie_embeddings=bool(d.get("tie_word_embeddings", True)))


def _bert(d: Mapping[str, Any], mt: str) -> ModelConfig:
    pos_type = d.get("position_embedding_type", "absolute")
    _refuse_if(pos_type not in ("absolute", None), mt, f"position_embedding_type={pos_type!r}")
    _refuse_if(bool(d.get("is_decoder")), mt, "is_decoder=True")
    _refuse_if(d.get("tie_word_embeddings", True) is False, mt,
               "an MLM decoder untied from the word embeddings")
    vocab = d["vocab_size"]
    megatron = mt == "megatron-bert"
    return ModelConfig(
        name=_name(d, mt),
        arch="encoder",
        vocab_size=vocab,
        hidden_size=d["hidden_size"],
        num_layers=d["num_hidden_layers"],
        num_heads=d["num_attention_heads"],
        ffn_size=d["intermediate_size"],
        max_position_embeddings=d["max_position_embeddings"],
        position_embedding="learned",
        norm="layernorm",
        norm_eps=d.get("layer_norm_eps", 1e-12),
        norm_position="pre" if megatron else "post",
        embed_norm=not megatron,
        final_norm=megatron,
        activation=_activation(d.get("hidden_act", "gelu"), mt),
        qkv_bias=True,
        linear_bias=True,
        tie_embeddings=True,
        type_vocab_size=d.get("type_vocab_size", 2),
        pooler=True,
        mlm_head=True,
        binary_head=True,
        **_special(d, vocab),
    )
