"""Synthetic Megatron-LM checkpoints for the converter tests (MEGATRON_FORMAT.md §8).

Full, unsharded weights are drawn first (`make_weights`), loaded into an independent float32
reference (transformers' GPT-2 / LLaMA / Megatron-BERT, or `reference_logits`, a plain torch
forward written from §6), then split into rank files exactly as Megatron stores them: QKV rows
per checkpoint version, vocabulary / column / row partitions, SwiGLU [W_r; V_r] per rank,
stage-local layer numbers, virtual-pipeline chunks, the tied head copy on the last stage.
Files are written with plain torch.save and torch.distributed.checkpoint; `args` pickles a
fake megatron.core.enums.ModelType (registered in sys.modules only while saving).

Run as a script (`python tests/megatron_fixtures.py dist2 WEIGHTS.npz SPEC.json OUT`) it writes
a torch_dist checkpoint from two gloo processes, each saving its tensor-parallel shards.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import enum
import io
import json
import os
import random
import sys
import types
from pathlib import Path

import numpy as np


@dataclasses.dataclass(frozen=True)
class Spec:
    kind: str = "gpt2"  # gpt2 | llama | bert (decides the HF reference)
    vocab: int = 257  # true vocabulary
    D: int = 64
    L: int = 4
    N: int = 4
    K: int | None = None  # query groups (None: N)
    H: int | None = None  # head dim (None: D // N)
    F: int = 128
    P: int = 32
    act: str = "gelu"  # gelu | gelu_tanh | squared_relu | swiglu
    norm: str = "layernorm"  # layernorm | rmsnorm
    position: str = "learned"  # learned | rope
    rope_fraction: float = 1.0
    rope_theta: float = 10000.0
    rope_interleaved: bool = False
    qkv_bias: bool = True
    linear_bias: bool = True
    tied: bool = True
    eps: float = 1e-5
    residual_from_norm: bool = False
    layernorm_1p: bool = False
    dtype: str = "float32"  # what the Megatron files store
    qk_norm: bool = False  # megatron-core --qk-layernorm: q_layernorm / k_layernorm over H
    rope_scaling: str = "none"  # none | llama3 (--use-rope-scaling) | linear (interpolation)
    rope_factor: float = 1.0

    @property
    def kv(self):
        return self.K or self.N

    @property
    def hd(self):
        return self.H or self.D // self.N

    @property
    def gated(self):
        return self.act == "swiglu"

    @property
    def bert(self):
        return self.kind == "bert"


def padded_vocab(vocab, divisor, tp):
    m = divisor * tp
    return -(-vocab // m) * m


def _round(a, dtype):
    import torch
    return torch.from_numpy(np.ascontiguousarray(a, np.float32)).to(
        getattr(torch, dtype)).float().numpy()


def make_weights(spec: Spec, Vm: int, seed: int = 0) -> dict:
    """Full weights, torch [out, in] convention, float32 values representable in spec.dtype.
    Keys: word pos type lnf_w lnf_b out, per layer 'l{i}.*', BERT heads."""
    rng = np.random.default_rng(seed)
    D, N, K, H, F = spec.D, spec.N, spec.kv, spec.hd, spec.F
    nrm = lambda *s, std=0.1: rng.standard_normal(s).astype(np.float32) * std  # noqa: E731
    W = {"word": nrm(Vm, D, std=0.5)}
    if spec.position == "learned":
        W["pos"] = nrm(spec.P, D, std=0.3)
    if spec.bert:
        W["type"] = nrm(2, D, std=0.3)

    def norm(prefix):
        W[prefix + "_w"] = 1 + nrm(D)
        if spec.norm == "layernorm":
            W[prefix + "_b"] = nrm(D)

    for i in range(spec.L):
        p = f"l{i}."
        norm(p + "ln1")
        if spec.qk_norm:
            for qk in ("qln", "kln"):
                W[p + qk + "_w"] = 1 + nrm(H, std=0.2)
                if spec.norm == "layernorm":
                    W[p + qk + "_b"] = nrm(H, std=0.2)
        W[p + "q"], W[p + "k"], W[p + "v"] = nrm(N * H, D), nrm(K * H, D), nrm(K * H, D)
        if spec.qkv_bias:
            W[p + "bq"], W[p + "bk"], W[p + "bv"] = nrm(N * H), nrm(K * H), nrm(K * H)
        W[p + "o"] = nrm(D, N * H)
        norm(p + "ln2")
        if spec.gated:
            W[p + "gate"], W[p + "up"] = nrm(F, D), nrm(F, D)
        else:
            W[p + "fc1"] = nrm(F, D)
        W[p + "fc2"] = nrm(D, F)
        if spec.linear_bias:
            W[p + "bo"], W[p + "bfc2"] = nrm(D), nrm(D)
            if spec.gated:
                W[p + "bgate"], W[p + "bup"] = nrm(F), nrm(F)
            else:
                W[p + "bfc1"] = nrm(F)
    norm("lnf")
    if not spec.tied:
        W["out"] = nrm(Vm, D, std=0.5)
    if spec.bert:
        W["lm_dense"], W["lm_dense_b"] = nrm(D, D), nrm(D)
        norm("lm_ln")
        W["lm_bias"] = nrm(Vm)
        W["pool_w"], W["pool_b"] = nrm(D, D), nrm(D)
        W["bin_w"], W["bin_b"] = nrm(2, D), nrm(2)
    return {k: _round(v, spec.dtype) for k, v in W.items()}


# ---- Megatron layouts ---------------------------------------------------------------------------
def fused_qkv(W, spec, i, bias=False):
    """Per-group rows (K, G+2, H) [, D]: the layout of version 2.0+ and megatron-core."""
    K, G, H = spec.kv, spec.N // spec.kv, spec.hd
    p = f"l{i}.b" if bias else f"l{i}."
    rest = () if bias else (spec.D,)
    q = W[p + "q"].reshape((K, G, H) + rest)
    k = W[p + "k"].reshape((K, 1, H) + rest)
    v = W[p + "v"].reshape((K, 1, H) + rest)
    return np.concatenate([q, k, v], axis=1).reshape((-1,) + rest)


def qkv_rank(W, spec, i, version, r, tp, bias=False):
    K, G, H = spec.kv, spec.N // spec.kv, spec.hd
    rest = () if bias else (spec.D,)
    piece = fused_qkv(W, spec, i, bias).reshape((K, G + 2, H) + rest)
    piece = np.split(piece, tp, axis=0)[r]  # whole groups per rank
    if version == 0:  # (3, np_r, hn)
        assert G == 1
        piece = piece.swapaxes(0, 1)
    elif version == 1:  # (np_r, hn, 3)
        assert G == 1
        piece = piece.swapaxes(1, 2)
    return np.ascontiguousarray(piece).reshape((-1,) + rest)


def fc1_full(W, spec, i, bias=False):
    b = "b" if bias else ""
    if spec.gated:
        return np.concatenate([W[f"l{i}.{b}gate"], W[f"l{i}.{b}up"]], axis=0)
    return W[f"l{i}.{b}fc1"]


def fc1_rank(W, spec, i, r, tp, bias=False):
    b = "b" if bias else ""
    if spec.gated:  # each rank holds [W_r; V_r]
        return np.concatenate([np.split(W[f"l{i}.{b}gate"], tp)[r],
                               np.split(W[f"l{i}.{b}up"], tp)[r]], axis=0)
    return np.split(W[f"l{i}.{b}fc1"], tp)[r]


LEGACY = {
    "v0": dict(block="transformer", attn="attention", ln1="input_layernorm",
               ln2="post_attention_layernorm", lnf="final_layernorm", lm_ln="layernorm"),
    "v2021": dict(block="encoder", attn="self_attention", ln1="input_layernorm",
                  ln2="post_attention_layernorm", lnf="final_layernorm", lm_ln="layernorm"),
    "v2023": dict(block="encoder", attn="self_attention", ln1="input_norm",
                  ln2="post_attention_norm", lnf="final_norm", lm_ln="norm"),
}


def _stored_norm(spec, a):
    return a - 1.0 if spec.layernorm_1p else a


def layer_tensors(W, spec, i, r, tp, version):
    """Canonical per-rank tensors of global layer i: name -> array."""
    t = {"ln1_w": _stored_norm(spec, W[f"l{i}.ln1_w"]),
         "ln2_w": _stored_norm(spec, W[f"l{i}.ln2_w"]),
         "qkv_w": qkv_rank(W, spec, i, version, r, tp),
         "proj_w": np.split(W[f"l{i}.o"], tp, axis=1)[r],
         "fc1_w": fc1_rank(W, spec, i, r, tp),
         "fc2_w": np.split(W[f"l{i}.fc2"], tp, axis=1)[r]}
    if spec.norm == "layernorm":
        t["ln1_b"], t["ln2_b"] = W[f"l{i}.ln1_b"], W[f"l{i}.ln2_b"]
    if spec.qk_norm:
        for qk in ("qln", "kln"):
            t[qk + "_w"] = _stored_norm(spec, W[f"l{i}.{qk}_w"])
            if spec.norm == "layernorm":
                t[qk + "_b"] = W[f"l{i}.{qk}_b"]
    if spec.qkv_bias:
        t["qkv_b"] = qkv_rank(W, spec, i, version, r, tp, bias=True)
    if spec.linear_bias:
        t["proj_b"], t["fc2_b"] = W[f"l{i}.bo"], W[f"l{i}.bfc2"]
        t["fc1_b"] = fc1_rank(W, spec, i, r, tp, bias=True)
    return t


def _wb(name):
    return "weight" if name.endswith("_w") else "bias"


def rank_model_state(W, spec, scheme, version, r, tp, layers, first, last, pp, extra_state="bytes"):
    """One model chunk of one rank: nested dicts (legacy) or a flat dict (mcore) of tensors."""
    import torch
    tt = lambda a: torch.from_numpy(np.ascontiguousarray(a, np.float32)).to(  # noqa: E731
        getattr(torch, spec.dtype)).clone()
    vocab_piece = lambda a: np.split(a, tp, axis=0)[r]  # noqa: E731
    if scheme in LEGACY:
        n = LEGACY[scheme]
        block, lm = {}, {}
        for local, i in enumerate(layers):
            for name, a in layer_tensors(W, spec, i, r, tp, version).items():
                kind = name[:-2]
                sub = {"ln1": n["ln1"], "ln2": n["ln2"], "qkv": f"{n['attn']}.query_key_value",
                       "proj": f"{n['attn']}.dense", "fc1": "mlp.dense_h_to_4h",
                       "fc2": "mlp.dense_4h_to_h"}[kind]
                block[f"layers.{local}.{sub}.{_wb(name)}"] = tt(a)
        if first:
            emb = {"word_embeddings": {"weight": tt(vocab_piece(W["word"]))}}
            if "pos" in W:
                emb["position_embeddings"] = {"weight": tt(W["pos"])}
            if "type" in W:
                emb["tokentype_embeddings"] = {"weight": tt(W["type"])}
            lm["embedding"] = emb
        model = {}
        if last:
            block[f"{n['lnf']}.weight"] = tt(_stored_norm(spec, W["lnf_w"]))
            if "lnf_b" in W:
                block[f"{n['lnf']}.bias"] = tt(W["lnf_b"])
            if not spec.tied:
                lm["output_layer"] = {"weight": tt(vocab_piece(W["out"]))}
            elif pp > 1 and not spec.bert:
                model["word_embeddings_for_head"] = {"weight": tt(vocab_piece(W["word"]))}
            if spec.bert:
                lm["pooler"] = {"dense.weight": tt(W["pool_w"]), "dense.bias": tt(W["pool_b"])}
                ln = n["lm_ln"]
                lnw = _stored_norm(spec, W["lm_ln_w"]) if ln == "norm" else W["lm_ln_w"]
                model["lm_head"] = {"bias": tt(vocab_piece(W["lm_bias"])),
                                    "dense": {"weight": tt(W["lm_dense"]),
                                              "bias": tt(W["lm_dense_b"])},
                                    ln: {"weight": tt(lnw), "bias": tt(W["lm_ln_b"])}}
                model["binary_head"] = {"weight": tt(W["bin_w"]), "bias": tt(W["bin_b"])}
        lm[n["block"]] = block
        model = {"language_model": lm, **model}
        return model
    # megatron-core: flat names
    te = scheme == "mcore_te"
    sd = {}
    es = (lambda: io.BytesIO()) if extra_state == "bytes" else \
        (lambda: torch.zeros(0, dtype=torch.uint8))
    names = {"ln1": "self_attention.linear_qkv.layer_norm_" if te else "input_layernorm.",
             "ln2": "mlp.linear_fc1.layer_norm_" if te else "pre_mlp_layernorm.",
             "qkv": "self_attention.linear_qkv.", "proj": "self_attention.linear_proj.",
             "fc1": "mlp.linear_fc1.", "fc2": "mlp.linear_fc2.",
             "qln": "self_attention.q_layernorm.", "kln": "self_attention.k_layernorm."}
    for local, i in enumerate(layers):
        pre = f"decoder.layers.{local}."
        for name, a in layer_tensors(W, spec, i, r, tp, 3).items():
            sd[pre + names[name[:-2]] + _wb(name)] = tt(a)
        for m in ("self_attention.linear_qkv", "self_attention.linear_proj",
                  "self_attention.core_attention", "mlp.linear_fc1", "mlp.linear_fc2"):
            sd[f"{pre}{m}._extra_state"] = es()
    if first:
        sd["embedding.word_embeddings.weight"] = tt(vocab_piece(W["word"]))
        if "pos" in W:
            sd["embedding.position_embeddings.weight"] = tt(W["pos"])
    if last:
        sd["decoder.final_layernorm.weight"] = tt(_stored_norm(spec, W["lnf_w"]))
        if "lnf_b" in W:
            sd["decoder.final_layernorm.bias"] = tt(W["lnf_b"])
        if not spec.tied:
            sd["output_layer.weight"] = tt(vocab_piece(W["out"]))
        elif pp > 1:  # the tied head copy on the last stage
            sd["output_layer.weight"] = tt(vocab_piece(W["word"]))
        sd["output_layer._extra_state"] = es()
    return sd


# ---- args with a fake Megatron enum -------------------------------------------------------------
class ModelType(enum.Enum):
    encoder_or_decoder = 1
    encoder_and_decoder = 2


ModelType.__module__ = "megatron.core.enums"
ModelType.__qualname__ = "ModelType"


@contextlib.contextmanager
def fake_megatron():
    """Make megatron.core.enums.ModelType importable while pickling, then forget it."""
    names = ("megatron", "megatron.core", "megatron.core.enums")
    saved = {n: sys.modules.get(n) for n in names}
    mods = {n: types.ModuleType(n) for n in names}
    mods["megatron.core.enums"].ModelType = ModelType
    sys.modules.update(mods)
    try:
        yield
    finally:
        for n, m in saved.items():
            if m is None:
                sys.modules.pop(n, None)
            else:
                sys.modules[n] = m


def make_args(spec: Spec, *, version, tp, pp, vp=1, Vm, divisor, scheme="v2021", **extra):
    """An argparse.Namespace with the fields (and field names) of that Megatron era."""
    import torch
    a = argparse.Namespace(
        num_layers=spec.L, hidden_size=spec.D, num_attention_heads=spec.N,
        max_position_embeddings=spec.P, seq_length=spec.P, padded_vocab_size=Vm,
        make_vocab_size_divisible_by=divisor, tokenizer_type="GPT2BPETokenizer",
        vocab_file="/nonexistent/gpt2-vocab.json", merge_file="/nonexistent/gpt2-merges.txt",
        params_dtype=getattr(torch, spec.dtype), fp16=spec.dtype == "float16",
        bf16=spec.dtype == "bfloat16", model_type=ModelType.encoder_or_decoder,
        apply_residual_connection_post_layernorm=spec.residual_from_norm,
        iteration=100, consumed_train_samples=0)
    if version < 3:
        a.model_parallel_size = tp
    else:
        a.tensor_model_parallel_size, a.pipeline_model_parallel_size = tp, pp
        if vp > 1:
            a.virtual_pipeline_model_parallel_size = vp
            a.num_layers_per_virtual_pipeline_stage = spec.L // (pp * vp)
    if version >= 1:
        a.ffn_hidden_size, a.kv_channels = spec.F, spec.hd
    if scheme in ("v2023", "mcore_te", "mcore_local"):
        a.norm_epsilon = spec.eps
        a.normalization = "RMSNorm" if spec.norm == "rmsnorm" else "LayerNorm"
        a.swiglu = spec.gated
        a.squared_relu = spec.act == "squared_relu"
        a.add_bias_linear = spec.linear_bias
        a.add_qkv_bias = spec.qkv_bias
        a.group_query_attention = spec.kv != spec.N
        a.num_query_groups = spec.kv
        a.untie_embeddings_and_output_weights = not spec.tied
        a.position_embedding_type = "rope" if spec.position == "rope" else "learned_absolute"
        a.rotary_percent, a.rotary_base = spec.rope_fraction, int(spec.rope_theta)
        a.rotary_interleaved = spec.rope_interleaved
        a.apply_layernorm_1p = spec.layernorm_1p
        a.qk_layernorm = spec.qk_norm
        a.use_rope_scaling = spec.rope_scaling == "llama3"
        a.rope_scaling_factor = spec.rope_factor if spec.rope_scaling == "llama3" else 8.0
        a.rotary_seq_len_interpolation_factor = \
            spec.rope_factor if spec.rope_scaling == "linear" else None
        a.bias_gelu_fusion = spec.act == "gelu_tanh"
        a.openai_gelu = False
        a.onnx_safe = None
        if scheme.startswith("mcore"):
            a.use_mcore_models = True
            a.transformer_impl = "transformer_engine" if scheme == "mcore_te" else "local"
            a.ckpt_format = "torch"
    else:
        a.layernorm_epsilon = spec.eps
        if version >= 2:
            a.bias_gelu_fusion = spec.act == "gelu_tanh"
            a.openai_gelu = False
            a.onnx_safe = None
            a.apply_query_key_layer_scaling = True
        elif spec.act == "gelu_tanh":
            a.openai_gelu = True
    if spec.bert:
        a.bert_binary_head = True
        a.tokenizer_type = "BertWordPieceLowerCase"
    for k, v in extra.items():
        setattr(a, k, v)
    return a


def stage_layers(spec, p, v, pp, vp):
    """Global layers of chunk v on stage p (§4)."""
    per = spec.L // (pp * vp)
    start = v * (spec.L // vp) + p * per
    return list(range(start, start + per))


def write_torch_checkpoint(root, W, spec, *, scheme, version, tp, pp, vp=1, divisor=16,
                           args=True, release=False, extra_state="bytes", old_format=False,
                           **arg_extra):
    """A checkpoint root: latest_checkpointed_iteration.txt + iter_0000100/mp_rank_*/.
    old_format: torch's pre-1.6 (non-zip) serialization, as 2019-2020 files are."""
    import torch
    root = Path(root)
    Vm = W["word"].shape[0]
    step = root / ("release" if release else "iter_0000100")
    a = make_args(spec, version=version, tp=tp, pp=pp, vp=vp, Vm=Vm, divisor=divisor,
                  scheme=scheme, **arg_extra) if args else None
    for p in range(pp):
        for r in range(tp):
            chunks = []
            for v in range(vp):
                chunks.append(rank_model_state(
                    W, spec, scheme, version, r, tp, stage_layers(spec, p, v, pp, vp),
                    first=p == 0 and v == 0, last=p == pp - 1 and v == vp - 1, pp=pp,
                    extra_state=extra_state))
            sd = {"iteration": 100,
                  "optimizer": {"optimizer": {"state": {0: {"exp_avg": torch.ones(7)}},
                                              "param_groups": [{"lr": 1e-4, "params": [0]}]},
                                "fp32_from_fp16_params": [[torch.ones(5)]]},
                  "opt_param_scheduler": {"num_steps": 100},
                  "rng_state": [{"random_rng_state": random.getstate(),
                                 "np_rng_state": np.random.get_state(),
                                 "torch_rng_state": torch.get_rng_state()}]}
            if version != 0:
                sd["checkpoint_version"] = float(version)
            if a is not None:
                sd["args"] = a
            if vp > 1:
                sd.update({f"model{v}": c for v, c in enumerate(chunks)})
            else:
                sd["model"] = chunks[0]
            d = step / (f"mp_rank_{r:02d}" + (f"_{p:03d}" if pp > 1 else ""))
            d.mkdir(parents=True, exist_ok=True)
            with fake_megatron():
                torch.save(sd, d / "model_optim_rng.pt",
                           _use_new_zipfile_serialization=not old_format)
    (root / "latest_checkpointed_iteration.txt").write_text("release" if release else "100")
    return root


# ---- torch_dist ---------------------------------------------------------------------------------
def global_mcore_state(W, spec):
    """megatron-core torch_dist keys at global shape, layers stacked [L, ...] (§2)."""
    import torch
    tt = lambda a: torch.from_numpy(np.ascontiguousarray(a, np.float32)).to(  # noqa: E731
        getattr(torch, spec.dtype)).clone()
    L = spec.L
    st = lambda f: tt(np.stack([f(i) for i in range(L)]))  # noqa: E731
    pre = "decoder.layers."
    sd = {"embedding.word_embeddings.weight": tt(W["word"])}
    if "pos" in W:
        sd["embedding.position_embeddings.weight"] = tt(W["pos"])
    sd[pre + "self_attention.linear_qkv.layer_norm_weight"] = st(
        lambda i: _stored_norm(spec, W[f"l{i}.ln1_w"]))
    sd[pre + "mlp.linear_fc1.layer_norm_weight"] = st(
        lambda i: _stored_norm(spec, W[f"l{i}.ln2_w"]))
    if spec.norm == "layernorm":
        sd[pre + "self_attention.linear_qkv.layer_norm_bias"] = st(lambda i: W[f"l{i}.ln1_b"])
        sd[pre + "mlp.linear_fc1.layer_norm_bias"] = st(lambda i: W[f"l{i}.ln2_b"])
    sd[pre + "self_attention.linear_qkv.weight"] = st(lambda i: fused_qkv(W, spec, i))
    if spec.qkv_bias:
        sd[pre + "self_attention.linear_qkv.bias"] = st(lambda i: fused_qkv(W, spec, i, True))
    sd[pre + "self_attention.linear_proj.weight"] = st(lambda i: W[f"l{i}.o"])
    sd[pre + "mlp.linear_fc1.weight"] = st(lambda i: fc1_full(W, spec, i))  # [W_all; V_all]
    sd[pre + "mlp.linear_fc2.weight"] = st(lambda i: W[f"l{i}.fc2"])
    if spec.linear_bias:
        sd[pre + "self_attention.linear_proj.bias"] = st(lambda i: W[f"l{i}.bo"])
        sd[pre + "mlp.linear_fc1.bias"] = st(lambda i: fc1_full(W, spec, i, True))
        sd[pre + "mlp.linear_fc2.bias"] = st(lambda i: W[f"l{i}.bfc2"])
    sd["decoder.final_layernorm.weight"] = tt(_stored_norm(spec, W["lnf_w"]))
    if "lnf_b" in W:
        sd["decoder.final_layernorm.bias"] = tt(W["lnf_b"])
    if not spec.tied:
        sd["output_layer.weight"] = tt(W["out"])
    return sd


# dim each TP rank shards (stacked layout: dim 0 is the layer axis); others are replicated
TP_DIM = {"embedding.word_embeddings.weight": 0, "output_layer.weight": 0,
          "decoder.layers.self_attention.linear_qkv.weight": 1,
          "decoder.layers.self_attention.linear_qkv.bias": 1,
          "decoder.layers.self_attention.linear_proj.weight": 2,
          "decoder.layers.mlp.linear_fc1.weight": 1, "decoder.layers.mlp.linear_fc1.bias": 1,
          "decoder.layers.mlp.linear_fc2.weight": 2}


def _dist_extras(spec):
    import torch
    return {"optimizer.state.exp_avg.decoder.layers.mlp.linear_fc2.weight":
            torch.zeros(spec.L, spec.D, spec.F),
            "decoder.layers.self_attention.linear_qkv._extra_state/shard_0.0_1.1": io.BytesIO(),
            "rng_state/shard_0.0_1.1": b"rng"}


def _dist_common(step, spec, tp, pp, Vm, divisor):
    import torch
    step = Path(step)
    a = make_args(spec, version=3, tp=tp, pp=pp, Vm=Vm, divisor=divisor, scheme="mcore_te",
                  ckpt_format="torch_dist")
    with fake_megatron():
        torch.save({"args": a, "checkpoint_version": 3.0, "iteration": 100},
                   step / "common.pt")
    (step / "metadata.json").write_text(json.dumps(
        {"sharded_backend": "torch_dist", "sharded_backend_version": 1,
         "common_backend": "torch", "common_backend_version": 1}))
    (step.parent / "latest_checkpointed_iteration.txt").write_text("100")


def write_torch_dist(root, W, spec, *, tp=1, pp=1, divisor=16, per_layer_keys=False):
    """Single-process DCP save (no process group). per_layer_keys: `decoder.layers.{g}.*`
    (heterogeneous models) instead of stacked `decoder.layers.*` [L, ...]."""
    import warnings
    import torch.distributed.checkpoint as dcp
    step = Path(root) / "iter_0000100"
    step.mkdir(parents=True)
    sd = global_mcore_state(W, spec)
    if per_layer_keys:
        pre = "decoder.layers."
        for k in [k for k in sd if k.startswith(pre)]:
            stacked = sd.pop(k)
            for g in range(spec.L):
                sd[f"{pre}{g}.{k[len(pre):]}"] = stacked[g].clone()
    sd.update(_dist_extras(spec))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(sd, checkpoint_id=str(step))
    _dist_common(step, spec, tp, pp, W["word"].shape[0], divisor)
    return Path(root)


def _dist_worker(rank, world, weights, spec_json, step, port):
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Replicate, Shard
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        spec = Spec(**json.loads(spec_json))
        W = dict(np.load(weights))
        mesh = init_device_mesh("cpu", (world,))
        sd = {}
        for k, t in global_mcore_state(W, spec).items():
            if k in TP_DIM:  # each rank saves only its tensor-parallel shard
                local = t.chunk(world, TP_DIM[k])[rank].contiguous()
                sd[k] = DTensor.from_local(local, mesh, [Shard(TP_DIM[k])])
            else:
                sd[k] = DTensor.from_local(t, mesh, [Replicate()])
        sd.update(_dist_extras(spec))
        dcp.save(sd, checkpoint_id=step)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _main(argv):
    import socket
    import torch.multiprocessing as mp
    _, weights, spec_json, root = argv
    step = Path(root) / "iter_0000100"
    step.mkdir(parents=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_dist_worker, args=(2, weights, Path(spec_json).read_text(), str(step),
                                           port), nprocs=2, start_method="spawn")
    spec = Spec(**json.loads(Path(spec_json).read_text()))
    W = np.load(weights)
    _dist_common(step, spec, 2, 1, W["word"].shape[0], 16)


# ---- references ---------------------------------------------------------------------------------
def hf_gpt2(W, spec):
    import torch
    import transformers as T
    cfg = T.GPT2Config(vocab_size=spec.vocab, n_positions=spec.P, n_embd=spec.D, n_layer=spec.L,
                       n_head=spec.N, n_inner=spec.F, layer_norm_epsilon=spec.eps,
                       activation_function={"gelu": "gelu", "gelu_tanh": "gelu_new"}[spec.act],
                       resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    m = T.GPT2LMHeadModel(cfg).eval()
    sd = {"transformer.wte.weight": W["word"][:spec.vocab], "transformer.wpe.weight": W["pos"],
          "transformer.ln_f.weight": W["lnf_w"], "transformer.ln_f.bias": W["lnf_b"],
          "lm_head.weight": W["word"][:spec.vocab]}
    for i in range(spec.L):
        p, h = f"l{i}.", f"transformer.h.{i}."
        sd.update({h + "ln_1.weight": W[p + "ln1_w"], h + "ln_1.bias": W[p + "ln1_b"],
                   h + "ln_2.weight": W[p + "ln2_w"], h + "ln_2.bias": W[p + "ln2_b"],
                   h + "attn.c_attn.weight": np.concatenate([W[p + "q"], W[p + "k"], W[p + "v"]]).T,
                   h + "attn.c_attn.bias": np.concatenate([W[p + "bq"], W[p + "bk"], W[p + "bv"]]),
                   h + "attn.c_proj.weight": W[p + "o"].T, h + "attn.c_proj.bias": W[p + "bo"],
                   h + "mlp.c_fc.weight": W[p + "fc1"].T, h + "mlp.c_fc.bias": W[p + "bfc1"],
                   h + "mlp.c_proj.weight": W[p + "fc2"].T, h + "mlp.c_proj.bias": W[p + "bfc2"]})
    _load(m, sd)
    return lambda ids: m(torch.tensor(ids)).logits.detach().numpy()


def hf_llama(W, spec):
    import torch
    import transformers as T
    assert spec.gated and spec.norm == "rmsnorm" and spec.position == "rope"
    assert not spec.linear_bias and not spec.qkv_bias and spec.rope_fraction == 1.0
    rope = {"rope_type": "default", "rope_theta": spec.rope_theta}
    if spec.rope_scaling == "llama3":  # megatron-core's fixed constants
        rope.update(rope_type="llama3", factor=spec.rope_factor, low_freq_factor=1.0,
                    high_freq_factor=4.0, original_max_position_embeddings=8192)
    elif spec.rope_scaling == "linear":
        rope.update(rope_type="linear", factor=spec.rope_factor)
    # Qwen 3 is LLaMA plus an RMSNorm over H of q and k before rope: megatron-core's
    # --qk-layernorm with RMSNorm
    Config, Model = (T.Qwen3Config, T.Qwen3ForCausalLM) if spec.qk_norm else \
        (T.LlamaConfig, T.LlamaForCausalLM)
    cfg = Config(vocab_size=spec.vocab, hidden_size=spec.D, intermediate_size=spec.F,
                 num_hidden_layers=spec.L, num_attention_heads=spec.N,
                 num_key_value_heads=spec.kv, head_dim=spec.hd,
                 max_position_embeddings=spec.P, rms_norm_eps=spec.eps,
                 rope_parameters=rope, attention_bias=False,
                 tie_word_embeddings=spec.tied, **({} if spec.qk_norm else {"mlp_bias": False}))
    m = Model(cfg).eval()
    sd = {"model.embed_tokens.weight": W["word"][:spec.vocab], "model.norm.weight": W["lnf_w"],
          "lm_head.weight": (W["word"] if spec.tied else W["out"])[:spec.vocab]}
    for i in range(spec.L):
        p, h = f"l{i}.", f"model.layers.{i}."
        names = {"input_layernorm": "ln1_w", "post_attention_layernorm": "ln2_w",
                 "self_attn.q_proj": "q", "self_attn.k_proj": "k", "self_attn.v_proj": "v",
                 "self_attn.o_proj": "o", "mlp.gate_proj": "gate", "mlp.up_proj": "up",
                 "mlp.down_proj": "fc2"}
        if spec.qk_norm:
            names.update({"self_attn.q_norm": "qln_w", "self_attn.k_norm": "kln_w"})
        sd.update({f"{h}{hf}.weight": W[p + ours] for hf, ours in names.items()})
    _load(m, sd)
    return lambda ids: m(torch.tensor(ids)).logits.detach().numpy()


def hf_bert(W, spec):
    """-> fn(ids, mask, types) -> (hidden, pooled, mlm logits, nsp logits)."""
    import torch
    import transformers as T
    cfg = T.MegatronBertConfig(vocab_size=spec.vocab, hidden_size=spec.D,
                               num_hidden_layers=spec.L, num_attention_heads=spec.N,
                               intermediate_size=spec.F, hidden_act="gelu",
                               max_position_embeddings=spec.P, type_vocab_size=2,
                               layer_norm_eps=spec.eps, hidden_dropout_prob=0.0,
                               attention_probs_dropout_prob=0.0)
    m = T.MegatronBertForPreTraining(cfg).eval()
    b = "bert."
    sd = {b + "embeddings.word_embeddings.weight": W["word"][:spec.vocab],
          b + "embeddings.position_embeddings.weight": W["pos"],
          b + "embeddings.token_type_embeddings.weight": W["type"],
          b + "encoder.ln.weight": W["lnf_w"], b + "encoder.ln.bias": W["lnf_b"],
          b + "pooler.dense.weight": W["pool_w"], b + "pooler.dense.bias": W["pool_b"],
          "cls.predictions.bias": W["lm_bias"][:spec.vocab],
          "cls.predictions.decoder.bias": W["lm_bias"][:spec.vocab],
          "cls.predictions.decoder.weight": W["word"][:spec.vocab],
          "cls.predictions.transform.dense.weight": W["lm_dense"],
          "cls.predictions.transform.dense.bias": W["lm_dense_b"],
          "cls.predictions.transform.LayerNorm.weight": W["lm_ln_w"],
          "cls.predictions.transform.LayerNorm.bias": W["lm_ln_b"],
          "cls.seq_relationship.weight": W["bin_w"], "cls.seq_relationship.bias": W["bin_b"]}
    for i in range(spec.L):
        p, h = f"l{i}.", f"{b}encoder.layer.{i}."
        names = {"attention.ln": ("ln1_w", "ln1_b"), "attention.self.query": ("q", "bq"),
                 "attention.self.key": ("k", "bk"), "attention.self.value": ("v", "bv"),
                 "attention.output.dense": ("o", "bo"), "ln": ("ln2_w", "ln2_b"),
                 "intermediate.dense": ("fc1", "bfc1"), "output.dense": ("fc2", "bfc2")}
        for hf, (w, b_) in names.items():
            sd[f"{h}{hf}.weight"], sd[f"{h}{hf}.bias"] = W[p + w], W[p + b_]
    _load(m, sd)

    def run(ids, mask, types):
        with torch.no_grad():
            out = m(torch.tensor(ids), attention_mask=torch.tensor(mask),
                    token_type_ids=torch.tensor(types), output_hidden_states=True)
            enc = m.bert(torch.tensor(ids), attention_mask=torch.tensor(mask),
                         token_type_ids=torch.tensor(types))
        return (enc.last_hidden_state.numpy(), enc.pooler_output.numpy(),
                out.prediction_logits.numpy(), out.seq_relationship_logits.numpy())
    return run


def _load(model, sd):
    import torch
    missing, unexpected = model.load_state_dict(
        {k: torch.from_numpy(np.ascontiguousarray(v, np.float32)) for k, v in sd.items()},
        strict=False)
    missing = [k for k in missing if "rotary" not in k and "position_ids" not in k]
    assert not missing and not unexpected, (missing, unexpected)


def reference_logits(W, spec, ids):
    """A plain float64 torch forward of a Megatron GPT from MEGATRON_FORMAT.md §6: pre-LN,
    LayerNorm/RMSNorm, learned or rotary positions (fraction, halves or interleaved pairs),
    GQA, GeLU erf/tanh, squared ReLU or SwiGLU, optional residual from the norm output."""
    import torch
    import torch.nn.functional as Fn
    t = {k: torch.from_numpy(np.asarray(v)).double() for k, v in W.items()}
    ids = torch.tensor(ids)
    B, T = ids.shape
    N, K, H = spec.N, spec.kv, spec.hd

    def norm(x, p):
        if spec.norm == "layernorm":
            return Fn.layer_norm(x, (spec.D,), t[p + "_w"], t[p + "_b"], spec.eps)
        return x * torch.rsqrt((x * x).mean(-1, keepdim=True) + spec.eps) * t[p + "_w"]

    def rope(x):  # x [B, T, heads, H]
        rot = int(H * spec.rope_fraction)
        inv = 1.0 / spec.rope_theta ** (torch.arange(0, rot, 2).double() / rot)
        ang = torch.arange(T).double()[:, None] * inv  # [T, rot/2]
        cos, sin = ang.cos()[None, :, None], ang.sin()[None, :, None]
        xr, rest = x[..., :rot], x[..., rot:]
        if spec.rope_interleaved:
            x1, x2 = xr[..., 0::2], xr[..., 1::2]
            out = torch.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).flatten(-2)
        else:
            x1, x2 = xr[..., : rot // 2], xr[..., rot // 2:]
            out = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)
        return torch.cat([out, rest], -1)

    def lin(x, w, b=None):
        y = x @ t[w].T
        return y + t[b] if b is not None and b in t else y

    act = {"gelu": lambda x: Fn.gelu(x), "gelu_tanh": lambda x: Fn.gelu(x, approximate="tanh"),
           "squared_relu": lambda x: Fn.relu(x) ** 2}
    x = t["word"][ids]
    if spec.position == "learned":
        x = x + t["pos"][:T][None]
    mask = torch.ones(T, T).tril().bool()
    for i in range(spec.L):
        p = f"l{i}."
        h = norm(x, p + "ln1")
        q = lin(h, p + "q", p + "bq").view(B, T, N, H)
        k = lin(h, p + "k", p + "bk").view(B, T, K, H)
        v = lin(h, p + "v", p + "bv").view(B, T, K, H)
        if spec.position == "rope":
            q, k = rope(q), rope(k)
        k, v = k.repeat_interleave(N // K, 2), v.repeat_interleave(N // K, 2)
        s = torch.einsum("bqnh,bknh->bnqk", q, k) / H ** 0.5
        a = torch.einsum("bnqk,bknh->bqnh", s.masked_fill(~mask, -1e30).softmax(-1), v)
        a = lin(a.reshape(B, T, N * H), p + "o", p + "bo")
        x = (h if spec.residual_from_norm else x) + a
        h = norm(x, p + "ln2")
        if spec.gated:
            m = Fn.silu(lin(h, p + "gate", p + "bgate")) * lin(h, p + "up", p + "bup")
        else:
            m = act[spec.act](lin(h, p + "fc1", p + "bfc1"))
        x = (h if spec.residual_from_norm else x) + lin(m, p + "fc2", p + "bfc2")
    x = norm(x, "lnf")
    head = t["word"] if spec.tied else t["out"]
    return (x @ head[: spec.vocab].T).float().numpy()


# ---- tokenizer files ---------------------------------------------------------------------------
def write_gpt2_vocab(d):
    """vocab.json (256 byte tokens + <|endoftext|> = 257, GPT-2's base) and empty merges."""
    from tokenizers.pre_tokenizers import ByteLevel
    chars = sorted(ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(chars)}
    vocab["<|endoftext|>"] = len(vocab)
    d = Path(d)
    d.mkdir(parents=True, exist_ok=True)
    (d / "vocab.json").write_text(json.dumps(vocab))
    (d / "merges.txt").write_text("#version: 0.2\n")
    return d / "vocab.json", d / "merges.txt"


def write_wordpiece_vocab(d, n=300):
    toks = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(n - 5)]
    d = Path(d)
    d.mkdir(parents=True, exist_ok=True)
    (d / "vocab.txt").write_text("\n".join(toks) + "\n")
    return d / "vocab.txt"


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "dist2":
        _main(sys.argv[1:])
    else:
        sys.exit("usage: megatron_fixtures.py dist2 WEIGHTS.npz SPEC.json OUT_ROOT")
