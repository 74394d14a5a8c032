"""ModelConfig from Megatron `args` plus the tensors' shapes (MEGATRON_FORMAT.md §5, §6).

Shapes are the authority for sizes (hidden, layers, ffn, vocab, positions, token types);
`args` for what shapes cannot say (heads, query groups, numerics). Every value a checkpoint
lacks can be given by the caller (`overrides`, any ModelConfig field).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

from jaxformer.config import ModelConfig

from conversion.megatron.errors import fail
from conversion.megatron.source import Source, _get

log = logging.getLogger(__name__)


@dataclass
class Plan:
    """What the converter needs beyond the ModelConfig."""

    config: ModelConfig
    megatron_vocab: int  # rows of the stored Megatron embedding
    copy_rows: int  # rows copied into the jaxformer table (the rest stay zero)
    layernorm_1p: bool  # stored norm weight is gamma - 1
    gated: bool
    notes: list[str] = field(default_factory=list)


def _flag(args, name, default=False) -> bool:
    v = getattr(args, name, None) if args is not None else None
    return default if v is None else bool(v)


def gelu_variant(args, naming: str, linear_bias: bool, notes: list[str]) -> str:
    """§6: which GeLU the MLP ran, by code generation."""
    fusion = _flag(args, "bias_gelu_fusion") and linear_bias
    if naming == "mcore":  # openai_gelu / onnx_safe are ignored by megatron-core
        return "gelu_tanh" if fusion else "gelu"
    if args is not None and hasattr(args, "swiglu"):  # legacy 23.04+
        if _flag(args, "openai_gelu"):
            return "gelu_tanh"
        if _flag(args, "onnx_safe"):
            notes.append("onnx_safe erf_gelu uses sqrt(2) ~ 1.41421 (relative error 4e-6): "
                         "converted as exact erf GeLU")
            return "gelu"
        return "gelu_tanh" if fusion else "gelu"
    # legacy v1/v2.x: the fused bias-gelu kernel (tanh) wins over the other flags
    if fusion or _flag(args, "openai_gelu"):
        return "gelu_tanh"
    if _flag(args, "onnx_safe"):
        notes.append("onnx_safe erf_gelu converted as exact erf GeLU")
    return "gelu"


# megatron-core's --use-rope-scaling (RotaryEmbedding._apply_scaling): Llama 3.1's smoothing
# with these constants fixed in the code; only the factor is an argument
MCORE_LLAMA3 = dict(rope_low_freq_factor=1.0, rope_high_freq_factor=4.0,
                    rope_original_max_positions=8192)


def rope_scaling(a, where) -> dict:
    """ModelConfig rope-scaling fields from megatron-core args: --use-rope-scaling with
    --rope-scaling-factor (older: --rotary-scaling-factor; default 8) is Llama 3.1's
    scaling, --rotary-seq-len-interpolation-factor f divides positions by f (linear)."""
    interp = _get(a, "rotary_seq_len_interpolation_factor")
    interp = None if interp in (None, 1, 1.0) else float(interp)
    if _flag(a, "use_rope_scaling") or _flag(a, "rope_scaling"):
        if interp is not None:
            raise fail("both --use-rope-scaling and --rotary-seq-len-interpolation-factor",
                       where, "args")
        factor = _get(a, "rope_scaling_factor", "rotary_scaling_factor", default=8.0)
        return dict(rope_scaling="llama3", rope_factor=float(factor), **MCORE_LLAMA3)
    if interp is not None:
        return dict(rope_scaling="linear", rope_factor=interp)
    return {}


def moe_fields(src: Source, a, where) -> dict:
    """ModelConfig fields of a megatron-core MoE: E from the router, k from args (default 2),
    softmax after the top k (renormalised, the default) or before it (--moe-router-pre-softmax,
    not renormalised), the shared expert and its gate from the tensors present. Routing
    jaxformer does not compute is refused."""
    E = src.layer_shape("router.w")[0]
    for e in range(E):
        if not src.has_layer(f"experts.{e}.fc1.w"):
            raise fail(f"the router has {E} experts but expert {e}'s weights are missing "
                       f"(expert-parallel rank files?)", where)
    for name, ok in (("moe_router_score_function", lambda v: v in (None, "softmax")),
                     ("moe_router_topk_scaling_factor", lambda v: v in (None, 1, 1.0)),
                     ("moe_router_num_groups", lambda v: not v),
                     ("moe_router_enable_expert_bias", lambda v: not v),
                     ("moe_expert_capacity_factor", lambda v: v is None)):
        v = _get(a, name)
        if not ok(v):
            raise fail(f"{name} = {v!r} is not implemented by jaxformer (softmax top-k "
                       f"routing, dropless)", where, "args")
    shared = src.layer_shape("shared_fc2.w")[1] if src.has_layer("shared_fc2.w") else 0
    return dict(num_experts=E, experts_per_token=int(_get(a, "moe_router_topk", default=2)),
                router_norm_topk=not _flag(a, "moe_router_pre_softmax"),
                shared_expert_size=shared, shared_expert_gate=src.has_layer("shared_gate.w"))


def plan(src: Source, overrides: dict, *, true_vocab: int | None, keep_padding: bool,
         tokenizer=None, name: str = "") -> Plan:
    a = src.args
    ov = dict(overrides)
    notes: list[str] = []
    where = src.step_dir

    def need(canon, layer=True):
        ok = src.has_layer(canon) if layer else src.has_global(canon)
        if not ok:
            raise fail(f"required tensor {canon} not found", where)

    moe = src.has_layer("router.w")  # megatron-core MoE: experts.<e>.fc1.w for every e
    fc1, fc2 = ("experts.0.fc1.w", "experts.0.fc2.w") if moe else ("fc1.w", "fc2.w")
    need("qkv.w"), need("proj.w"), need(fc1), need(fc2), need("attn_norm.w")
    need("word_emb", layer=False)
    Vm, D = src.global_shape("word_emb")
    L = src.num_layers
    a_layers = _get(a, "num_layers")
    if a_layers is not None and a_layers != L:
        notes.append(f"args.num_layers = {a_layers} but the checkpoint holds {L} layers; "
                     f"using {L}")

    # ---- arch --------------------------------------------------------------------------------
    bert = any(src.has_global(c) for c in ("type_emb", "lm_dense.w", "lm_bias", "pooler.w",
                                           "binary.w"))
    arch = ov.pop("arch", "encoder" if bert else "decoder")

    # ---- attention shapes ---------------------------------------------------------------------
    N = ov.pop("num_heads", None) or _get(a, "num_attention_heads")
    if not N:
        raise fail("the number of attention heads is unknown (no args in the checkpoint): "
                   "pass --num-attention-heads", where)
    H = ov.pop("head_dim", None) or _get(a, "kv_channels") or D // N
    rows = src.layer_shape("qkv.w")[0]
    K = ov.pop("num_kv_heads", None)
    if K is None:
        if _flag(a, "group_query_attention") or (a is None and rows != 3 * N * H):
            K = _get(a, "num_query_groups") if a is not None else None
            if K is None:
                K, r = divmod(rows // H - N, 2) if rows % H == 0 else (0, 1)
                if r or K <= 0:
                    raise fail(f"cannot infer query groups from QKV rows {rows}", where)
                notes.append(f"query groups inferred from QKV rows: {K}")
        else:
            K = N
    if rows != (N + 2 * K) * H:
        raise fail(f"QKV has {rows} rows, but {N} heads, {K} query groups and head dim {H} "
                   f"need {(N + 2 * K) * H}", src.location("qkv.w", 0))
    if src.version < 2 and K != N:
        raise fail(f"checkpoint_version {src.version:g} predates grouped-query attention",
                   where)
    proj = src.layer_shape("proj.w")
    if tuple(proj) != (D, N * H):
        raise fail(f"attention output weight {tuple(proj)} != ({D}, {N * H})",
                   src.location("proj.w", 0))

    # ---- MLP ----------------------------------------------------------------------------------
    F = src.layer_shape(fc2)[1]
    fc1_rows = src.layer_shape(fc1)[0]
    if fc1_rows == 2 * F:
        gated = True
    elif fc1_rows == F:
        gated = False
    else:
        raise fail(f"fc1 has {fc1_rows} rows; fc2 says ffn size {F}", src.location(fc1, 0))
    if a is not None and hasattr(a, "swiglu") and bool(a.swiglu) != gated:
        raise fail(f"args.swiglu = {a.swiglu} but fc1 has {fc1_rows} rows for ffn {F}", where)
    biases = {c: src.has_layer(c) for c in ("proj.b", "fc1.b", "fc2.b")}
    if moe:  # expert MLPs have no biases here; the attention output must not either
        biases = {"proj.b": biases["proj.b"]}
    if len(set(biases.values())) > 1:
        raise fail(f"jaxformer needs all or none of the linear biases; found {biases}", where)
    linear_bias = biases["proj.b"]
    if gated:
        activation = "silu"
    elif _flag(a, "squared_relu"):
        activation = "squared_relu"
    else:
        activation = gelu_variant(a, src.naming, linear_bias, notes)

    # ---- norms --------------------------------------------------------------------------------
    normalization = _get(a, "normalization")
    if normalization is None:
        norm = "layernorm" if src.has_layer("attn_norm.b") else "rmsnorm"
    elif normalization == "LayerNorm":
        norm = "layernorm"
    elif normalization == "RMSNorm":
        norm = "rmsnorm"
    else:
        raise fail(f"normalization {normalization!r} is not supported", where, "args")
    if (norm == "layernorm") != src.has_layer("attn_norm.b"):
        raise fail(f"args say {normalization} but the norm bias is "
                   f"{'present' if src.has_layer('attn_norm.b') else 'absent'}",
                   src.location("attn_norm.w", 0))
    eps = _get(a, "norm_epsilon", "layernorm_epsilon", default=1e-5)
    layernorm_1p = _flag(a, "apply_layernorm_1p")

    # ---- positions ------------------------------------------------------------------------------
    pet = _get(a, "position_embedding_type")
    rope_kw = {}
    if src.has_global("pos_emb"):
        position = "learned"
        P = src.global_shape("pos_emb")[0]
    else:
        if pet == "rope" or _flag(a, "use_rotary_position_embeddings"):
            position = "rope"
        elif pet in ("none",) or (a is not None and _flag(a, "add_position_embedding", True)
                                  is False):
            position = "none"
        elif pet in (None, "learned_absolute") and a is None:
            position = "rope"
            notes.append("no position table and no args: assuming rotary embeddings "
                         "(override with --position-embedding)")
        elif pet in ("learned_absolute",):
            position = "none"
            notes.append("args say learned_absolute but there is no position table")
        else:
            raise fail(f"position_embedding_type {pet!r} is not supported", where, "args")
        P = _get(a, "max_position_embeddings", "seq_length")
        if P is None:
            P = 2048
            notes.append("max_position_embeddings unknown: 2048 (override with "
                         "--max-position-embeddings)")
        if position == "rope":
            rope_kw = dict(rope_theta=float(_get(a, "rotary_base", default=10000)),
                           rope_fraction=float(_get(a, "rotary_percent", default=1.0)),
                           rope_interleaved=_flag(a, "rotary_interleaved"),
                           **rope_scaling(a, where))

    # ---- heads ----------------------------------------------------------------------------------
    extra = {}
    if arch == "decoder":
        untie = getattr(a, "untie_embeddings_and_output_weights", None) if a is not None else None
        if untie is None:
            untie = src.has_global("output.w") and (src.naming == "legacy" or src.pp == 1)
            if src.has_global("output.w") and src.naming == "mcore" and src.pp > 1:
                untie = None  # a tied copy or an untied head: compared in convert.py
        extra["tie_embeddings"] = not untie if untie is not None else True
        if untie and not src.has_global("output.w"):
            raise fail("args say untied embeddings but there is no output_layer.weight", where)
        extra["_compare_head"] = untie is None
    else:
        extra["tie_embeddings"] = True
        extra["type_vocab_size"] = src.global_shape("type_emb")[0] if src.has_global(
            "type_emb") else 0
        extra["pooler"] = src.has_global("pooler.w")
        extra["mlm_head"] = src.has_global("lm_dense.w")
        extra["binary_head"] = src.has_global("binary.w")
        if extra["mlm_head"]:
            head_act = "gelu_tanh" if (src.naming == "legacy" and _flag(a, "openai_gelu")) \
                else "gelu"
            if head_act != activation:
                extra["mlm_activation"] = head_act

    # ---- vocabulary -----------------------------------------------------------------------------
    if true_vocab is not None and true_vocab > Vm:
        raise fail(f"true vocabulary {true_vocab} exceeds the checkpoint's {Vm} embedding rows",
                   src.location("word_emb"))
    if true_vocab is None:
        vocab, multiple, copy_rows = Vm, 128, Vm
        notes.append(f"true vocabulary unknown: keeping all {Vm} rows (pass a tokenizer or "
                     "--true-vocab-size to strip Megatron's padding)")
    elif keep_padding:
        vocab, copy_rows = true_vocab, Vm
        div = _get(a, "make_vocab_size_divisible_by", default=128) * src.tp
        multiple = div if math.ceil(true_vocab / div) * div == Vm else Vm
    else:
        vocab, multiple, copy_rows = true_vocab, 128, true_vocab

    qk_norm = src.has_layer("q_norm.w")
    if qk_norm != src.has_layer("k_norm.w") or (a is not None and hasattr(a, "qk_layernorm")
                                                 and bool(a.qk_layernorm) != qk_norm):
        raise fail(f"args.qk_layernorm = {getattr(a, 'qk_layernorm', None)} but q_layernorm / "
                   f"k_layernorm are {src.has_layer('q_norm.w')} / {src.has_layer('k_norm.w')}",
                   where)
    if qk_norm and (norm == "layernorm") != src.has_layer("q_norm.b"):
        raise fail(f"QK {norm} with the q_layernorm bias "
                   f"{'present' if src.has_layer('q_norm.b') else 'absent'}", where)
    cfg = dict(qk_norm=qk_norm, vocab_size=vocab, hidden_size=D, num_layers=L, num_heads=N, arch=arch,
               num_kv_heads=None if K == N else K, head_dim=None if H * N == D else H,
               ffn_size=F, max_position_embeddings=P, position_embedding=position,
               norm=norm, norm_eps=float(eps), norm_position="pre",
               residual_from_norm=_flag(a, "apply_residual_connection_post_layernorm"),
               activation=activation, gated_mlp=gated, qkv_bias=src.has_layer("qkv.b"),
               linear_bias=linear_bias, final_norm=src.has_global("final_norm.w"),
               vocab_pad_multiple=multiple, name=name, **rope_kw)
    compare_head = extra.pop("_compare_head", False)
    cfg.update(extra)
    if moe:
        cfg.update(moe_fields(src, a, where))
    softmax_scale = _get(a, "softmax_scale")
    if softmax_scale is not None:
        cfg["attn_scale"] = float(softmax_scale)
    if tokenizer is not None:
        for fld, tid in (("bos_token_id", tokenizer.bos_id), ("eos_token_id", tokenizer.eos_id),
                         ("pad_token_id", tokenizer.pad_id)):
            if tid is not None and 0 <= tid < vocab:
                cfg[fld] = tid
    cfg.update(ov)
    try:
        config = ModelConfig(**cfg)
    except (TypeError, ValueError) as e:
        raise fail(f"cannot build a ModelConfig: {e}", where) from None
    p = Plan(config=config, megatron_vocab=Vm, copy_rows=min(copy_rows, config.padded_vocab_size),
             layernorm_1p=layernorm_1p, gated=gated, notes=notes)
    p.compare_head = compare_head
    return p
