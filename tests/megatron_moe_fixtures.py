"""Synthetic megatron-core MoE checkpoints (per-rank torch files) and their transformers
references, on top of megatron_fixtures (the attention, norms and embeddings).

Every MoE layer: a router [E, D] (mlp.router.weight), E SwiGLU experts split over `ep`
expert-parallel ranks (folder mp_rank_TT_EEE with one pipeline stage, as megatron-core names
them) and over the tensor-parallel ranks like a dense MLP (fc1 rows [gate_r; up_r], fc2
columns), in one of three layouts:

  sequential   mlp.experts.local_experts.<j>.linear_fc{1,2}.weight   (SequentialMLP)
  te_grouped   mlp.experts.linear_fc{1,2}.weight<j>                  (TEGroupedMLP)
  grouped      mlp.experts.weight1 [D, El * 2F/tp] viewed [El, D, 2F/tp] and
               mlp.experts.weight2 [El * F/tp, D] viewed [El, F/tp, D] (GroupedMLP,
               --moe-grouped-gemm)

plus, optionally, a shared expert (mlp.shared_experts.linear_fc{1,2}.weight) with its
sigmoid gate (mlp.shared_experts.gate_weight).
"""
from __future__ import annotations

import random
from pathlib import Path

import numpy as np

import megatron_fixtures as mf


def make_moe_weights(spec: mf.Spec, Vm: int, E: int, Fs: int = 0, seed: int = 0) -> dict:
    """megatron_fixtures' weights plus, per layer, the router, E experts and a shared
    expert of Fs (0: none); the dense MLP entries stay unused."""
    W = mf.make_weights(spec, Vm, seed)
    rng = np.random.default_rng(seed + 1)
    nrm = lambda *s, std=0.1: rng.standard_normal(s).astype(np.float32) * std  # noqa: E731
    for i in range(spec.L):
        p = f"l{i}."
        W[p + "router"] = nrm(E, spec.D, std=0.5)
        for e in range(E):
            W[p + f"e{e}.gate"], W[p + f"e{e}.up"] = nrm(spec.F, spec.D), nrm(spec.F, spec.D)
            W[p + f"e{e}.down"] = nrm(spec.D, spec.F)
        if Fs:
            W[p + "sh.gate"], W[p + "sh.up"], W[p + "sh.down"] = \
                nrm(Fs, spec.D), nrm(Fs, spec.D), nrm(spec.D, Fs)
            W[p + "sh.g"] = nrm(1, spec.D, std=0.5)
    return W


def _fc1(W, pre, r, tp):  # a SwiGLU MLP's fc1 piece of TP rank r: [gate_r; up_r]
    return np.concatenate([np.split(W[pre + "gate"], tp)[r], np.split(W[pre + "up"], tp)[r]])


def _fc2(W, pre, r, tp):
    return np.split(W[pre + "down"], tp, axis=1)[r]


def moe_tensors(W, spec, i, local, E, r, tp, e_rank, ep, layout, shared) -> dict:
    """The MoE tensors of layer i (`local` its index in the file) on TP rank r, EP rank e."""
    pre = f"decoder.layers.{local}.mlp."
    El = E // ep
    out = {pre + "router.weight": W[f"l{i}.router"]}
    fc1 = [_fc1(W, f"l{i}.e{e_rank * El + j}.", r, tp) for j in range(El)]
    fc2 = [_fc2(W, f"l{i}.e{e_rank * El + j}.", r, tp) for j in range(El)]
    if layout == "sequential":
        for j in range(El):
            out[f"{pre}experts.local_experts.{j}.linear_fc1.weight"] = fc1[j]
            out[f"{pre}experts.local_experts.{j}.linear_fc2.weight"] = fc2[j]
    elif layout == "te_grouped":
        for j in range(El):
            out[f"{pre}experts.linear_fc1.weight{j}"] = fc1[j]
            out[f"{pre}experts.linear_fc2.weight{j}"] = fc2[j]
    else:  # grouped GEMM: the buffers GroupedMLP.forward views as [El, D, X] / [El, F, D]
        D = spec.D
        out[pre + "experts.weight1"] = np.stack([a.T for a in fc1]).reshape(D, -1)
        out[pre + "experts.weight2"] = np.stack([a.T for a in fc2]).reshape(-1, D)
    if shared:
        out[pre + "shared_experts.linear_fc1.weight"] = _fc1(W, f"l{i}.sh.", r, tp)
        out[pre + "shared_experts.linear_fc2.weight"] = _fc2(W, f"l{i}.sh.", r, tp)
        out[pre + "shared_experts.gate_weight"] = W[f"l{i}.sh.g"]
    return out


def write_moe_checkpoint(root, W, spec, *, E, tp, ep, layout, shared, pre_softmax, topk=2,
                         divisor=16):
    """A checkpoint root of per-rank files mp_rank_TT_EEE (one pipeline stage)."""
    import torch
    root = Path(root)
    Vm = W["word"].shape[0]
    step = root / "iter_0000100"
    a = mf.make_args(spec, version=3, tp=tp, pp=1, Vm=Vm, divisor=divisor, scheme="mcore_local",
                     num_experts=E, moe_router_topk=topk, expert_model_parallel_size=ep,
                     moe_router_pre_softmax=pre_softmax, moe_grouped_gemm=layout != "sequential",
                     moe_shared_expert_intermediate_size=W["l0.sh.down"].shape[1] if shared
                     else None)
    tt = lambda x: torch.from_numpy(np.ascontiguousarray(x, np.float32))  # noqa: E731
    layers = list(range(spec.L))
    for r in range(tp):
        base = mf.rank_model_state(W, spec, "mcore_local", 3, r, tp, layers, True, True, 1)
        base = {k: v for k, v in base.items() if ".mlp.linear_fc" not in k}  # no dense MLP
        for e in range(ep):
            sd = dict(base)
            for i in layers:
                sd.update({k: tt(v) for k, v in moe_tensors(W, spec, i, i, E, r, tp, e, ep,
                                                            layout, shared).items()})
            d = step / f"mp_rank_{r:02d}_{e:03d}"
            d.mkdir(parents=True, exist_ok=True)
            with mf.fake_megatron():
                torch.save({"iteration": 100, "checkpoint_version": 3.0, "args": a,
                            "model": sd, "rng_state": [{"random_rng_state": random.getstate()}]},
                           d / "model_optim_rng.pt")
    (root / "latest_checkpointed_iteration.txt").write_text("100")
    return root


def hf_moe(W, spec, E, topk, shared, pre_softmax):
    """transformers' Mixtral (softmax, top k renormalised: megatron-core's default) or, with
    a shared expert or --moe-router-pre-softmax, Qwen2-MoE (norm_topk_prob = not
    pre_softmax) loaded with W -> fn(ids) -> float32 logits."""
    import torch
    import transformers as T
    common = dict(vocab_size=spec.vocab, hidden_size=spec.D, intermediate_size=spec.F,
                  num_hidden_layers=spec.L, num_attention_heads=spec.N,
                  num_key_value_heads=spec.kv, max_position_embeddings=spec.P,
                  rms_norm_eps=spec.eps, num_experts_per_tok=topk,
                  rope_parameters={"rope_type": "default", "rope_theta": spec.rope_theta},
                  tie_word_embeddings=spec.tied, bos_token_id=None, eos_token_id=None,
                  pad_token_id=None)
    if shared or pre_softmax:
        Fs = W["l0.sh.down"].shape[1] if shared else 0
        m = T.Qwen2MoeForCausalLM(T.Qwen2MoeConfig(
            moe_intermediate_size=spec.F, shared_expert_intermediate_size=Fs, num_experts=E,
            norm_topk_prob=not pre_softmax, qkv_bias=False, **common)).eval()
    else:
        m = T.MixtralForCausalLM(T.MixtralConfig(num_local_experts=E, **common)).eval()
    sd = {"model.embed_tokens.weight": W["word"][:spec.vocab], "model.norm.weight": W["lnf_w"],
          "lm_head.weight": (W["word"] if spec.tied else W["out"])[:spec.vocab]}
    for i in range(spec.L):
        p, h = f"l{i}.", f"model.layers.{i}."
        names = {"input_layernorm": "ln1_w", "post_attention_layernorm": "ln2_w",
                 "self_attn.q_proj": "q", "self_attn.k_proj": "k", "self_attn.v_proj": "v",
                 "self_attn.o_proj": "o", "mlp.gate": "router"}
        sd.update({f"{h}{hf}.weight": W[p + ours] for hf, ours in names.items()})
        sd[h + "mlp.experts.gate_up_proj"] = np.stack(
            [np.concatenate([W[p + f"e{e}.gate"], W[p + f"e{e}.up"]]) for e in range(E)])
        sd[h + "mlp.experts.down_proj"] = np.stack([W[p + f"e{e}.down"] for e in range(E)])
        if shared:
            for hf, ours in (("gate_proj", "gate"), ("up_proj", "up"), ("down_proj", "down")):
                sd[f"{h}mlp.shared_expert.{hf}.weight"] = W[p + f"sh.{ours}"]
            sd[h + "mlp.shared_expert_gate.weight"] = W[p + "sh.g"]
    mf._load(m, sd)

    def run(ids):
        with torch.no_grad():
            return m(torch.tensor(ids)).logits.numpy()
    return run
