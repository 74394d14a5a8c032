"""Meshes and logical-axis sharding.

Layer code names array dimensions only by logical names (`batch`, `embed`, `heads`, ...).
A rules table (configs/sharding/*.yaml) maps each logical name to a mesh axis (`data`,
`pipe`, `tensor`), a tuple of mesh axes, or nothing. `logical_to_spec` applies it and
refuses a table that would put two dimensions of one array on the same mesh axis.
"""
from __future__ import annotations

import contextlib
import contextvars
from pathlib import Path
from typing import Any, Mapping, Sequence

import jax
from jax.experimental import multihost_utils
import numpy as np
import yaml
from jax.sharding import AbstractMesh, Mesh, NamedSharding, PartitionSpec as P

from jaxformer.config import CONFIG_DIR, ModelConfig

MESH_AXES = ("data", "pipe", "tensor")
LOGICAL_AXES = ("batch", "length", "embed", "heads", "kv_heads", "qkv", "head_dim", "mlp",
                "vocab", "layers", "cache_batch", "cache_length", "position", "type",
                "glu", "classes", "act_heads", "act_kv_heads", "act_mlp", "act_vocab",
                "cache_pages", "page_slots", "experts")

Rules = Mapping[str, Any]


def make_mesh(data: int = 1, pipe: int = 1, tensor: int = 1,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh with axes (data, pipe, tensor) over `devices`.

    devices None: all devices of all hosts; on one host, sizes that multiply to fewer than
    jax.device_count() take the first devices in order (CUDA_VISIBLE_DEVICES already narrows
    what jax sees). Passing a subset of devices lets several models run side by side on
    disjoint groups.
    """
    for name, size in (("data", data), ("pipe", pipe), ("tensor", tensor)):
        if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
            raise ValueError(f"make_mesh: {name} must be a positive integer, got {size!r}")
    n = data * pipe * tensor
    devs = list(jax.devices() if devices is None else devices)
    if devices is None and n < len(devs) and jax.process_count() == 1:
        devs, devices = devs[:n], devs[:n]
    if len(devs) != n:
        raise ValueError(f"make_mesh: data={data} x pipe={pipe} x tensor={tensor} = {n} "
                         f"devices, but {len(devs)} {'are' if devices is None else 'were'} "
                         f"{'available' if devices is None else 'given'}")
    kwargs = {"axis_types": (jax.sharding.AxisType.Auto,) * 3}
    if devices is None:
        return jax.make_mesh((data, pipe, tensor), MESH_AXES, **kwargs)
    return Mesh(np.asarray(devs, dtype=object).reshape(data, pipe, tensor), MESH_AXES, **kwargs)


def load_rules(name_or_path: str | Rules = "default") -> dict[str, Any]:
    """A rules table: a name from configs/sharding/, a YAML path, or a mapping."""
    if isinstance(name_or_path, Mapping):
        table = dict(name_or_path)
        source = "<mapping>"
    else:
        path = Path(name_or_path)
        if not path.suffix:
            path = CONFIG_DIR / "sharding" / f"{name_or_path}.yaml"
        if not path.exists():
            avail = sorted(p.stem for p in (CONFIG_DIR / "sharding").glob("*.yaml"))
            raise ValueError(f"unknown sharding rules {name_or_path!r}; available: {avail}")
        table = yaml.safe_load(path.read_text()) or {}
        source = str(path)
    for logical, mesh_axes in table.items():
        for ax in _as_tuple(mesh_axes):
            if ax not in MESH_AXES:
                raise ValueError(f"sharding rules {source}: {logical!r} maps to unknown mesh "
                                 f"axis {ax!r}; mesh axes are {MESH_AXES}")
    return table


def _as_tuple(x) -> tuple:
    if x is None:
        return ()
    if isinstance(x, str):
        return (x,)
    return tuple(x)


def logical_to_spec(axes: Sequence[str | None], rules: Rules) -> P:
    """PartitionSpec for an array whose dimensions carry the logical names `axes`."""
    used: dict[str, str] = {}
    out = []
    for logical in axes:
        mesh_axes = _as_tuple(rules.get(logical)) if logical is not None else ()
        for ax in mesh_axes:
            if ax in used:
                raise ValueError(f"sharding rules put two dimensions of one array on mesh axis "
                                 f"{ax!r}: {used[ax]!r} and {logical!r} (array axes {tuple(axes)})")
            used[ax] = logical
        out.append(None if not mesh_axes else mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes)
    return P(*out)


def mesh_size(mesh: Mesh | None, mesh_axes) -> int:
    if mesh is None:
        return 1
    return int(np.prod([mesh.shape[a] for a in _as_tuple(mesh_axes)], dtype=np.int64))


# ---- the mesh and rules that traced model code sees ----------------------------------------
# The mesh comes only from jax's own context: jax.set_mesh(mesh) around a jitted call (see
# `use`), which jax turns into the abstract mesh of the trace, and which shard_map narrows
# (its axes Manual) inside a shard_map body. Kernels, layers and the pipeline all ask
# jax.sharding.get_abstract_mesh(), so there is one source of truth for the mesh.
#
# The rules table is static configuration, the same for every layer of a model: a context
# variable (use_rules), set around the trace by the model, saves threading it through
# every layer's signature. It never picks a code path; it only names mesh axes for the
# logical axes of a sharding constraint.
_rules: contextvars.ContextVar[Rules | None] = contextvars.ContextVar("jaxformer_rules",
                                                                      default=None)


def abstract_mesh() -> AbstractMesh | None:
    """The mesh of the current trace (jax's context), None without one."""
    mesh = jax.sharding.get_abstract_mesh()
    return None if mesh.empty else mesh


def active_axis_size(axis: str) -> int:
    """The size of mesh axis `axis` of the context mesh (1 without one, or without the axis)."""
    mesh = abstract_mesh()
    return 1 if mesh is None else dict(mesh.shape).get(axis, 1)


def manual_axes() -> set[str]:
    """The context mesh's axes a shard_map has made manual (inside its body)."""
    mesh = abstract_mesh()
    return set() if mesh is None else set(mesh.manual_axes)


@contextlib.contextmanager
def use_rules(rules: Rules):
    """Make `rules` the table that `shard()` applies inside this block (also inside jit)."""
    token = _rules.set(rules)
    try:
        yield
    finally:
        _rules.reset(token)


def rules() -> Rules:
    """The rules table of use_rules ({} outside one: every logical axis replicated)."""
    r = _rules.get()
    return {} if r is None else r


@contextlib.contextmanager
def use(mesh: Mesh | None, rules: Rules):
    """jax.set_mesh(mesh) plus use_rules(rules): enter it outside jit, around the calls of
    jitted model code (jax refuses to set a mesh inside a trace)."""
    with jax.set_mesh(mesh), use_rules(rules):
        yield


def shard(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
    """Constrain an activation's sharding by logical names; a no-op without a context mesh."""
    mesh = abstract_mesh()
    if mesh is None or mesh.size == 1:
        return x
    if len(axes) != x.ndim:
        raise ValueError(f"shard: {len(axes)} logical axes {tuple(axes)} for an array of "
                         f"rank {x.ndim}")
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, logical_to_spec(axes,
                                                                                   rules())))


def named_sharding(mesh: Mesh, axes: Sequence[str | None], rules: Rules) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(axes, rules))


def tree_shardings(mesh: Mesh, axes_tree, rules: Rules):
    """Map a tree whose leaves are logical-axis tuples to NamedShardings."""
    return jax.tree.map(lambda a: named_sharding(mesh, a, rules), axes_tree,
                        is_leaf=lambda a: isinstance(a, tuple))


# ---- does this mesh divide this model? ---------------------------------------------------
def check_divisible(cfg: ModelConfig, mesh: Mesh, rules: Rules, batch: int | None = None):
    """Explain, in one error, every model dimension that the mesh does not divide."""
    dims = {
        "heads": (cfg.num_heads, "num_heads"),
        "kv_heads": (cfg.kv_heads, "num_kv_heads"),
        "mlp": (cfg.mlp_size, "ffn_size"),
        "vocab": (cfg.padded_vocab_size, "padded vocabulary"),
        "layers": (cfg.num_layers, "num_layers"),
        "embed": (cfg.hidden_size, "hidden_size"),
        "head_dim": (cfg.dims_per_head, "head_dim"),
    }
    if batch is not None:
        dims["batch"] = (batch, "batch size")
    extra = []  # (size, what, logical axis) beyond one per logical axis
    if cfg.num_experts:  # mixtures of experts (layers/moe.py)
        dims["experts"] = (cfg.num_experts, "num_experts")
        extra.append((cfg.expert_mlp_size, "moe_ffn_size", "mlp"))
        if cfg.shared_expert_size:
            extra.append((cfg.shared_expert_size, "shared_expert_size", "mlp"))
    bad = {a: n for a, n in dict(mesh.shape).items() if not isinstance(n, int) or n < 1}
    if bad:  # a size of 0 would divide by zero below
        raise ValueError("mesh sizes must be positive integers, got "
                         + ", ".join(f"{a}={n!r}" for a, n in bad.items()))
    problems = []
    for logical, size, what in [(k, s, w) for k, (s, w) in dims.items()] + \
            [(k, s, w) for s, w, k in extra]:
        n = mesh_size(mesh, rules.get(logical))
        if size % n:
            axes = "x".join(f"{a}={mesh.shape[a]}" for a in _as_tuple(rules.get(logical)))
            problems.append(f"{what} = {size} is not divisible by {axes} "
                            f"(logical axis {logical!r})")
    if problems:
        shape = ", ".join(f"{k}={v}" for k, v in mesh.shape.items())
        raise ValueError(f"mesh ({shape}) does not divide the model {cfg.name or ''}: "
                         + "; ".join(problems))


def to_global(x: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """A host array present on every process -> a global jax.Array in `sharding`."""
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])


def to_host(x: jax.Array) -> np.ndarray:
    if jax.process_count() > 1 and not x.is_fully_addressable:
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))
