"""How compiled entry points receive the weights: a flat tuple of arrays, with the small
replicated ones optionally packed into one buffer per dtype.

jit flattens its arguments on every call, and an nnx.State flattens in Python, several
times slower than a tuple of the same arrays: time the device waits for before a prefill
starts (benchmarks/dispatch.py; the numbers are in docs/benchmarks.md). So ParamsJit hands
jit the tuple (Model.param_leaves, built once) and rebuilds the State inside the trace.

Even as a tuple, each array costs host time per call before the first kernel starts, so a
model of hundreds of arrays waits on the host (docs/benchmarks.md). Most of them are tiny:
biases, norm weights, quantization scales. With pack_small, every floating array of at most
SMALL_PARAM_ELEMENTS elements that is replicated on its devices travels in one buffer per
dtype (built once, like the tuple) and is sliced back out inside the trace, where XLA reads
the slices in place. Entry points called once per request (prefill, logits, encode) pack;
the decode loops do not: they run many steps per call, and a slice that feeds a library
call (a cuBLAS epilogue) could cost a copy every step. Only the unrolled layer layout (the
GPU default) packs (Model.jit): the stacked layout hands jit a few arrays in all, and its
layer scan would copy the unpacked slices into temporaries.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import NamedSharding, PartitionSpec as P

SMALL_PARAM_ELEMENTS = 1 << 16  # arrays up to this size travel packed (pack_small)


@dataclasses.dataclass(frozen=True)
class PackPlan:
    """Which leaves travel packed. big: indices handed to jit as they are; groups: per
    dtype, (dtype name, ((leaf index, shape, offset in the buffer), ...))."""
    n: int
    big: tuple[int, ...]
    groups: tuple[tuple[str, tuple[tuple[int, tuple[int, ...], int], ...]], ...]


def _packable(a) -> bool:
    sharding = getattr(a, "sharding", None)
    return (sharding is not None and sharding.is_fully_replicated
            and jnp.issubdtype(a.dtype, jnp.floating) and a.size <= SMALL_PARAM_ELEMENTS)


def pack_plan(leaves) -> PackPlan:
    """The plan for these leaves: small replicated floating arrays grouped by dtype (a
    dtype with a single such array keeps it unpacked)."""
    by_dtype: dict[str, list[int]] = {}
    big = []
    for i, a in enumerate(leaves):
        if _packable(a):
            by_dtype.setdefault(jnp.dtype(a.dtype).name, []).append(i)
        else:
            big.append(i)
    groups = []
    for name, idx in by_dtype.items():
        if len(idx) < 2:
            big += idx
            continue
        entries, offset = [], 0
        for i in idx:
            entries.append((i, tuple(leaves[i].shape), offset))
            offset += leaves[i].size
        groups.append((name, tuple(entries)))
    return PackPlan(len(leaves), tuple(sorted(big)), tuple(groups))


def pack(leaves, plan: PackPlan) -> tuple[tuple, tuple]:
    """(big leaves, packed buffers [one 1-D array per dtype group]) for ParamsJit."""
    if len(leaves) != plan.n:
        raise ValueError(f"params have {len(leaves)} arrays, the packing plan {plan.n}")
    big = tuple(leaves[i] for i in plan.big)
    if not plan.groups:
        return big, ()
    small, shardings = [], []
    for name, entries in plan.groups:
        arrays = [leaves[i] for i, _, _ in entries]
        for a, (i, shape, _) in zip(arrays, entries):
            if tuple(a.shape) != shape or jnp.dtype(a.dtype).name != name:
                raise ValueError(f"param {i}: {a.dtype}{list(a.shape)}, the packing plan "
                                 f"has {name}{list(shape)}")
        small.append(arrays)
        s = arrays[0].sharding  # replicated: the same devices, any rank
        shardings.append(NamedSharding(s.mesh, P()) if isinstance(s, NamedSharding) else s)
    packed = jax.jit(lambda groups: tuple(jnp.concatenate([a.reshape(-1) for a in g])
                                          for g in groups),
                     out_shardings=tuple(shardings))(small)
    return big, packed


def unpack(big, packed, plan: PackPlan) -> list:
    """The leaves in order again (inside the trace): packed ones as static slices."""
    leaves = [None] * plan.n
    for i, a in zip(plan.big, big):
        leaves[i] = a
    for buf, (_, entries) in zip(packed, plan.groups):
        for i, shape, offset in entries:
            size = math.prod(shape)
            leaves[i] = lax.slice(buf, (offset,), (offset + size,)).reshape(shape)
    return leaves


# XLA:GPU's default command buffer contents (xla_gpu_enable_command_buffer) plus while
# loops and conditionals: RunConfig.graph_control_flow
GRAPH_CONTROL_FLOW = {"xla_gpu_enable_command_buffer": "FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,"
                      "CUDNN,DYNAMIC_SLICE_FUSION,WHILE,CONDITIONAL"}


class ParamsJit:
    """jax.jit(fn) for fn(params, *args) of a Model, called with the model's params (an
    nnx.State) but handing jit a flat tuple of their arrays (module docstring), with the
    small ones packed when pack_small; rebuilt into the State inside the trace.
    donate_argnums count fn's arguments, params being 0. Calls (and lower) run under
    jax.set_mesh(model.mesh): the traced code reads the mesh from jax's context only."""

    def __init__(self, model, fn, *, pack_small: bool = False, **jit_kwargs):
        self.model = model
        if model.run.graph_control_flow:
            jit_kwargs["compiler_options"] = {**jit_kwargs.get("compiler_options", {}),
                                              **GRAPH_CONTROL_FLOW}
        treedef = jax.tree.structure(model.params)
        self.plan = model.pack_plan() if pack_small else None
        plan = self.plan
        if plan is None:
            self._jitted = jax.jit(lambda leaves, *args: fn(
                jax.tree.unflatten(treedef, leaves), *args), **jit_kwargs)
            return
        donate = jit_kwargs.pop("donate_argnums", ())
        donate = (donate,) if isinstance(donate, int) else tuple(donate)
        if 0 in donate:
            raise ValueError("ParamsJit: params cannot be donated")
        self._jitted = jax.jit(lambda big, packed, *args: fn(
            jax.tree.unflatten(treedef, unpack(big, packed, plan)), *args),
            donate_argnums=tuple(d + 1 for d in donate), **jit_kwargs)

    def _params_args(self, params) -> tuple:
        if params is self.model.params:
            if not self.plan:
                return (self.model.param_leaves(),)
            # the model's buffers, shared by every entry point, follow its plan: after
            # params_changed() it is rebuilt, and must still be the one traced here
            plan = self.model.pack_plan()
            if plan is not self.plan:
                if plan != self.plan:
                    raise ValueError("ParamsJit: the model's params no longer match the "
                                     "packing plan this entry point was traced with")
                self.plan = plan  # equal: later calls compare by identity
            return self.model.packed_params()
        leaves = tuple(jax.tree.leaves(params))
        return pack(leaves, self.plan) if self.plan else (leaves,)

    def __call__(self, params, *args):
        with jax.set_mesh(self.model.mesh):
            return self._jitted(*self._params_args(params), *args)

    def lower(self, params, *args):
        with jax.set_mesh(self.model.mesh):
            return self._jitted.lower(*self._params_args(params), *args)
