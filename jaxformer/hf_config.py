"""Hugging Face `config.json` -> ModelConfig, for the families jaxformer computes exactly.

Supported `model_type`s: gpt2; llama, mistral, qwen2 (LLaMA-style: RoPE, RMSNorm, SwiGLU, GQA);
bert (post-LN) and megatron-bert (pre-LN). Anything whose numerics jaxformer does not
implement (rope scaling, attention scaled by layer index, relative positions, ...) is refused
with a ValueError rather than converted into a model that silently computes something else.

Head flags of encoders (pooler, MLM head, binary head) describe the weights a checkpoint
holds, which a config cannot know; the converter sets them from the keys it finds
(`conversion/hf.py`). Here they default to the full pre-training model.
"""
from __future__ import annotations

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

LLAMA_STYLE = ("llama", "mistral", "qwen2")
SUPPORTED = ("gpt2", *LLAMA_STYLE, "bert", "megatron-bert")


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


def _rope_theta(d: Mapping[str, Any], mt: str) -> float:
    # transformers >= 5 keeps rope settings in `rope_parameters`; older ones in rope_theta /
    # rope_scaling.
    params = d.get("rope_parameters") or {}
    scaling = d.get("rope_scaling") or {}
    for p in (params, scaling):
        kind = p.get("rope_type", p.get("type", "default"))
        _refuse_if(kind not in ("default", None), mt, f"rope scaling type {kind!r}")
    if d.get("partial_rotary_factor", 1.0) not in (1, 1.0, None):
        _refuse_if(True, mt, f"partial_rotary_factor={d['partial_rotary_factor']}")
    theta = params.get("rope_theta", d.get("rope_theta", 10000.0))
    return float(theta)


def _llama(d: Mapping[str, Any], mt: str) -> ModelConfig:
    D, N = d["hidden_size"], d["num_attention_heads"]
    K = d.get("num_key_value_heads") or N
    vocab = d["vocab_size"]
    H = d.get("head_dim") or D // N
    _refuse_if(d.get("pretraining_tp", 1) not in (1, None), mt,
               f"pretraining_tp={d.get('pretraining_tp')}")
    max_pos = d["max_position_embeddings"]
    if mt == "qwen2":
        _refuse_if(bool(d.get("use_window")), mt, "use_window=True")
        qkv_bias, linear_bias = True, False  # Qwen2: q/k/v biases only
    else:
        if mt == "mistral" and d.get("window"):
            # Within the window, sliding-window attention is full causal attention; longer
            # sequences are refused by the max_position_embeddings check.
            max_pos = min(max_pos, int(d["window"]))
        attention_bias = bool(d.get("attention_bias", False))
        qkv_bias = attention_bias
        # LLaMA's attention_bias also gives o_proj a bias; mlp_bias gives the MLP biases.
        # jaxformer's linear_bias covers both; missing ones are converted as zeros.
        linear_bias = attention_bias or bool(d.get("mlp_bias", False))
    return ModelConfig(
        name=_name(d, mt),
        arch="decoder",
        vocab_size=vocab,
        hidden_size=D,
        num_layers=d["num_hidden_layers"],
        num_heads=N,
        num_kv_heads=None if K == N else K,  # canonical: None means K = N
        head_dim=None if H * N == D else H,
        ffn_size=d["intermediate_size"],
        max_position_embeddings=max_pos,
        position_embedding="rope",
        rope_theta=_rope_theta(d, mt),
        norm="rmsnorm",
        norm_eps=d.get("rms_norm_eps", 1e-6),
        activation=_activation(d.get("hidden_act", "silu"), mt),
        gated_mlp=True,
        qkv_bias=qkv_bias,
        linear_bias=linear_bias,
        tie_embeddings=bool(d.get("tie_word_embeddings", False)),
        **_special(d, vocab),
    )


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
