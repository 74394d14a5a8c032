"""Mixture-of-experts MLP (Mixtral, Qwen2-MoE, Megatron-core MoE): a softmax top-k router,
dropless dispatch to E experts, and an optional (gated) shared expert.

Shape legend: B batch, T length, D embed, E experts, k experts per token, F one expert's
MLP size, C = 2 (gate, up) of a gated expert, M = B * T tokens, A = M * k assignments.

Expert weights are stacked on a leading `experts` axis: wi [E, D, (C,) F], wo [E, F, D]. The
rules table puts `experts` on a mesh axis for expert parallelism (expert_parallel.yaml:
`data`) and `mlp` on `tensor` inside each expert. Two dispatches of the same numbers:

  ragged  (prefill, large batches) the A assignments sorted by expert and two grouped matmuls
          (jax.lax.ragged_dot) over the sorted rows: every expert's weights read once
  gather  (decode: A < E) per assignment, its expert's weights read in place by a multiply
          and a float32 reduction over the contracted axis: only the active experts are read,
          once (a gathered copy feeding a matmul would be written out and read again)

Routing (router_norm_topk): softmax over the E router logits in float32, the top k, then
renormalised to sum to 1 (Mixtral; Qwen2-MoE's norm_topk_prob; Megatron's default top-k
followed by a softmax over the k, which is the same numbers) or used as they are (Qwen2-MoE
norm_topk_prob=False; Megatron moe_router_pre_softmax). No capacity factor: no token is
dropped.

With a mesh, the experts run in a shard_map that is manual over the experts', the experts'
F and the batch's mesh axes: every shard computes its own experts (its slice of F) for the
tokens it sees, and the partial outputs are summed over the expert and tensor axes (an
all-gather of the tokens over an expert axis that also splits the batch, then a sum: XLA
places both at the shard_map's edges).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from jaxformer import sharding as shd
from jaxformer.config import ModelConfig
from jaxformer.layers.base import Dense, param
from jaxformer.layers.mlp import MLP, activation
from jaxformer.quant import ops


class ExpertDense(Dense):
    """A Dense whose kernel carries a leading `experts` axis that no product contracts:
    quantization (jaxformer.quant) treats it as a stacked axis, so scales are per expert
    and output channel. Products dequantize the kernel (all of it, or the gathered experts)
    rather than run Dense.einsum, so FP8 leaves their inputs unquantized (weight_only)."""

    weight_only = True

    def __init__(self, rngs, kernel_shape, kernel_axes, *, contract: int = 1):
        super().__init__(rngs, kernel_shape, kernel_axes, contract=contract)
        self.kernel_ndim = len(kernel_shape) - 1  # the experts axis counts as stacked


def _float_kernel(dense: ExpertDense, q, scale, lead: int, dtype):
    """(stored kernel, scale or None) with `lead` leading axes -> float [*lead, ...]."""
    if dense.quant is None:
        return q
    return ops.dequantize(q, scale, dense.quant, lead, dense.contract, dtype)


class MoE(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        D, E, F = cfg.hidden_size, cfg.num_experts, cfg.expert_mlp_size
        glu = ((2,), ("glu",)) if cfg.gated_mlp else ((), ())
        # the router stays in the run dtype (never quantized): it picks the experts
        self.router = param(rngs, (D, E), ("embed", None))
        self.wi = ExpertDense(rngs, (E, D, *glu[0], F), ("experts", "embed", *glu[1], "mlp"))
        self.wo = ExpertDense(rngs, (E, F, D), ("experts", "mlp", "embed"))
        if cfg.shared_expert_size:
            self.shared = MLP(cfg.replace(ffn_size=cfg.shared_expert_size, num_experts=0,
                                          experts_per_token=0, moe_ffn_size=None,
                                          shared_expert_size=0, shared_expert_gate=False),
                              rngs)
            if cfg.shared_expert_gate:
                self.shared_gate = param(rngs, (D, 1), ("embed", None))

    def route(self, x):
        """x [B, T, D] -> (weights [B, T, k] in x's dtype, expert ids [B, T, k] int32)."""
        return route(x, self.router[...], self.cfg.experts_per_token,
                     self.cfg.router_norm_topk)

    def __call__(self, x):
        """x [B, T, D] -> [B, T, D]."""
        cfg = self.cfg
        weights, ids = self.route(x)
        out = run_experts(x, weights, ids, self.wi, self.wo, cfg)
        if cfg.shared_expert_size:
            s = self.shared(x)
            if cfg.shared_expert_gate:
                g = jnp.einsum("btd,do->bto", x, self.shared_gate[...],
                               preferred_element_type=jnp.float32)
                s = (jax.nn.sigmoid(g) * s.astype(jnp.float32)).astype(x.dtype)
            out = out + s
        return shd.shard(out, ("batch", "length", "embed"))


def route(x, router, k: int, norm_topk: bool):
    """x [B, T, D], router [D, E] -> (weights [B, T, k] in x's dtype, ids [B, T, k] int32):
    the k most probable experts of each token under softmax(x router) in float32."""
    logits = jnp.einsum("btd,de->bte", x, router, preferred_element_type=jnp.float32)
    probs = jax.nn.softmax(logits, axis=-1)
    top, ids = jax.lax.top_k(probs, k)
    if norm_topk:
        top = top / jnp.sum(top, axis=-1, keepdims=True)
    return top.astype(x.dtype), ids.astype(jnp.int32)


# ---- the experts' products on one shard ---------------------------------------------------
def _expert_act(h, cfg: ModelConfig):
    """h [..., (C,) F] -> [..., F]: act(gate) * up, or act(h)."""
    if cfg.gated_mlp:
        return activation(cfg.activation, h[..., 0, :]) * h[..., 1, :]
    return activation(cfg.activation, h)


def ragged_experts(x, weights, ids, wi, wo, cfg: ModelConfig, first: int = 0):
    """Sorted-by-expert grouped matmuls. x [M, D]; weights, ids [M, k]; wi [El, D, (C,) F],
    wo [El, F, D] float: experts first .. first + El - 1 (this shard's). Assignments to other
    experts contribute 0. Returns [M, D] (this shard's partial sum)."""
    M, k = ids.shape
    El = wi.shape[0]
    local = ids.reshape(-1) - first  # [A]
    mine = (local >= 0) & (local < El)
    key = jnp.where(mine, local, El)  # other shards' assignments sort last, past every group
    order = jnp.argsort(key, stable=True)  # [A]
    sizes = jnp.bincount(key, length=El + 1)[:El].astype(jnp.int32)  # [El]
    rows = jnp.take(x, order // k, axis=0)  # [A, D]: token of each sorted assignment
    w_in = wi.reshape(El, wi.shape[1], -1)  # [El, D, C F]
    h = jax.lax.ragged_dot(rows, w_in, sizes)  # [A, C F]; rows past the groups are 0
    h = _expert_act(h.reshape((h.shape[0],) + wi.shape[2:]), cfg)  # [A, F]
    y = jax.lax.ragged_dot(h, wo, sizes)  # [A, D]
    w = jnp.where(mine, weights.reshape(-1), 0).astype(y.dtype)[order]
    y = y * w[:, None]
    inverse = jnp.argsort(order)  # sorted position of each assignment
    return jnp.sum(y[inverse].reshape(M, k, -1), axis=1)


def gather_experts(x, weights, ids, wi_of, wo_of, cfg: ModelConfig, first: int = 0,
                   El: int | None = None):
    """Per assignment, the chosen expert's weights: reads only active experts.
    x [M, D]; weights, ids [M, k]; wi_of(e [A]) -> [A, D, (C,) F], wo_of(e) -> [A, F, D]
    (float, gathered from this shard's experts first .. first + El - 1). Returns [M, D].

    The products are multiplies and float32 sums, not einsums: XLA fuses the gather (and a
    quantized kernel's dequantization) into the reduction, which reads each chosen expert's
    weights once where they lie; a dot would get the gathered copy as a separate buffer."""
    M, k = ids.shape
    local = ids.reshape(-1) - first
    mine = (local >= 0) & (local < El)
    e = jnp.clip(local, 0, El - 1)
    rows = jnp.repeat(x, k, axis=0).astype(jnp.float32)  # [A, D]
    wi, wo = wi_of(e), wo_of(e)
    A, D = wi.shape[:2]
    h = jnp.sum(rows[:, :, None] * wi.reshape(A, D, -1).astype(jnp.float32), axis=1)
    h = _expert_act(h.reshape((A,) + wi.shape[2:]), cfg)  # [A, (C,) F] -> [A, F]
    y = jnp.sum(h[:, :, None] * wo.astype(jnp.float32), axis=1)  # [A, D]
    w = jnp.where(mine, weights.reshape(-1), 0).astype(jnp.float32)
    return jnp.sum((y * w[:, None]).reshape(M, k, -1), axis=1).astype(x.dtype)


def use_gather(assignments: int, num_experts: int) -> bool:
    """Gather dispatch when fewer assignments than experts (a decode step): it reads each
    active expert's weights once per assignment, the grouped matmul every expert once."""
    return assignments < num_experts


def _local_experts(x, weights, ids, wi_q, wi_s, wo_q, wo_s, dense_i, dense_o, cfg, first):
    """One shard's experts on tokens x [M, D] (stored kernels and scales, or None)."""
    El = wi_q.shape[0]
    dt = x.dtype
    if use_gather(ids.size, cfg.num_experts):
        def take(a, e):
            return None if a is None else jnp.take(a, e, axis=0)

        def wi_of(e):
            return _float_kernel(dense_i, take(wi_q, e), take(wi_s, e), 1, dt)

        def wo_of(e):
            return _float_kernel(dense_o, take(wo_q, e), take(wo_s, e), 1, dt)

        return gather_experts(x, weights, ids, wi_of, wo_of, cfg, first, El)
    wi = _float_kernel(dense_i, wi_q, wi_s, 1, dt)
    wo = _float_kernel(dense_o, wo_q, wo_s, 1, dt)
    return ragged_experts(x, weights, ids, wi, wo, cfg, first)


def _leaves(dense: ExpertDense):
    q = dense.kernel[...]
    s = dense.kernel_scale[...] if dense.quant is not None else None
    return q, s


def _axes(dense: ExpertDense, axes: tuple) -> tuple[tuple, tuple | None]:
    """(stored kernel axes, scale axes or None) of an expert kernel of float axes `axes`."""
    if dense.quant is None:
        return axes, None
    q = dense.quant
    return (ops.stored_axes(axes, q, 1, dense.contract),
            ops.scale_axes(axes, q, 1, dense.contract))


def _mesh_axes(B: int):
    """(mesh, expert axes, F's tensor axes, batch axes) of the shard_map over the active mesh
    (jax's context mesh), each the axes of size > 1 not already manual; mesh None: no
    shard_map."""
    mesh, rules = shd.abstract_mesh(), shd.rules()
    if mesh is None or mesh.size == 1:
        return None, (), (), ()
    manual_now = shd.manual_axes()
    sizes = dict(mesh.shape)

    def axes_of(logical):
        return tuple(a for a in shd._as_tuple(rules.get(logical))
                     if sizes.get(a, 1) > 1 and a not in manual_now)

    ep, tp = axes_of("experts"), axes_of("mlp")
    bp = tuple(a for a in axes_of("batch") if a not in ep + tp)
    if B % shd.mesh_size(mesh, bp):
        bp = ()
    return mesh, ep, tp, bp


def run_experts(x, weights, ids, wi: ExpertDense, wo: ExpertDense, cfg: ModelConfig):
    """x [B, T, D], weights / ids [B, T, k] -> the routed experts' sum [B, T, D]; sharded
    as the module docstring says when a mesh is active."""
    B, T, D = x.shape
    glu = ("glu",) if cfg.gated_mlp else ()
    wi_axes = _axes(wi, ("experts", "embed", *glu, "mlp"))
    wo_axes = _axes(wo, ("experts", "mlp", "embed"))
    (wi_q, wi_s), (wo_q, wo_s) = _leaves(wi), _leaves(wo)
    mesh, ep, tp, bp = _mesh_axes(B)
    sizes = {} if mesh is None else dict(mesh.shape)

    def body(x, weights, ids, wi_q, wi_s, wo_q, wo_s):
        Bl = x.shape[0]
        first = _axis_index(ep, sizes) * wi_q.shape[0] if ep else 0
        y = _local_experts(x.reshape(-1, D), weights.reshape(Bl * T, -1),
                           ids.reshape(Bl * T, -1), wi_q, wi_s, wo_q, wo_s, wi, wo, cfg, first)
        if ep or tp:  # this shard's experts and slice of F: a partial sum
            y = jax.lax.psum(y, ep + tp)
        return y.reshape(Bl, T, D)

    names = set(ep + tp + bp)
    if not names:
        return body(x, weights, ids, wi_q, wi_s, wo_q, wo_s)
    rules = shd.rules()

    def spec(axes):  # a weight's PartitionSpec over the manual axes only
        if axes is None:
            return None
        out = []
        for a in axes:
            m = tuple(ax for ax in shd._as_tuple(rules.get(a)) if ax in names) \
                if a in ("experts", "mlp") else ()
            out.append(None if not m else m[0] if len(m) == 1 else m)
        return P(*out)

    bspec = P(bp or None, None, None)
    return jax.shard_map(
        body, mesh=mesh,
        in_specs=(bspec, bspec, bspec, spec(wi_axes[0]), spec(wi_axes[1]),
                  spec(wo_axes[0]), spec(wo_axes[1])),
        out_specs=bspec, axis_names=names, check_vma=False,
    )(x, weights, ids, wi_q, wi_s, wo_q, wo_s)


def _axis_index(axes: tuple, sizes: dict):
    """The linear index of this shard over mesh axes `axes` (major to minor)."""
    idx = jnp.int32(0)
    for a in axes:
        idx = idx * sizes[a] + jax.lax.axis_index(a)
    return idx
