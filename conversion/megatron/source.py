"""Where the tensors are: directory detection and the two readers (per-rank torch files,
torch_dist). Both answer the same questions about canonical tensors (layout.py): which exist,
their merged shapes, and the merged array of one layer or global tensor, read when asked.

MEGATRON_FORMAT.md §1 (detection), §4 (pipeline stages, virtual pipeline chunks).
"""
from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

import numpy as np

from conversion.megatron import layout
from conversion.megatron.errors import fail
from conversion.megatron.torchio import DistCheckpoint, is_tensor, open_torch_file

log = logging.getLogger(__name__)

TRACKER = "latest_checkpointed_iteration.txt"
MODEL_FILES = ("model_optim_rng.pt", "model_rng.pt")
SUPPORTED_VERSIONS = (0, 1.0, 2.0, 3.0)
_RANK_DIR = re.compile(r"^mp_rank_(\d{2})(?:_(\d{3}))?(?:_(\d{3}))?$")
_MODEL_KEYS = ("embedding.", "decoder.", "encoder.", "output_layer.", "lm_head.", "pooler.",
               "binary_head.")


def find_step_dir(path: str | Path) -> tuple[str, Path]:
    """-> (kind, path): kind is "torch" (a step dir of mp_rank_* folders), "file" (one .pt)
    or "torch_dist" (a DCP step dir)."""
    path = Path(path)
    if not path.exists():
        raise fail("input does not exist", path)
    if path.is_file():
        return "file", path
    if (path / TRACKER).is_file():
        text = (path / TRACKER).read_text().strip()
        if text == "release":
            step = path / "release"
        else:
            try:
                step = path / f"iter_{int(text):07d}"
            except ValueError:
                raise fail(f"expected an iteration number or 'release', got {text!r}",
                           path / TRACKER) from None
        if not step.is_dir():
            raise fail(f"names {step.name}, which does not exist", path / TRACKER)
        return find_step_dir(step)
    if (path / "metadata.json").is_file():
        try:
            meta = json.loads((path / "metadata.json").read_text())
        except json.JSONDecodeError as e:
            raise fail(f"invalid JSON: {e}", path / "metadata.json") from None
        backend = meta.get("sharded_backend")
        if backend not in ("torch_dist", None):
            raise fail(f"sharded_backend {backend!r} is not supported (only torch_dist; "
                       "zarr checkpoints must be converted with Megatron's tools)",
                       path / "metadata.json")
        return "torch_dist", path
    if any(_RANK_DIR.match(p.name) for p in path.iterdir() if p.is_dir()):
        return "torch", path
    for name in MODEL_FILES:
        if (path / name).is_file():
            return "file", path / name
    if (path / ".metadata").is_file():
        return "torch_dist", path
    steps = sorted(p for p in path.iterdir() if p.is_dir() and
                   (p.name == "release" or re.fullmatch(r"iter_\d{7}", p.name)))
    if steps:
        pick = next((p for p in steps if p.name == "release"), steps[-1])
        log.warning("%s has no %s; using %s (of %s)", path, TRACKER, pick.name,
                    [p.name for p in steps])
        return find_step_dir(pick)
    raise fail("not a Megatron checkpoint: expected latest_checkpointed_iteration.txt, an "
               "iter_XXXXXXX/ or release/ folder of mp_rank_* folders, a torch_dist folder "
               "(metadata.json, .metadata, *.distcp) or a model_optim_rng.pt", path)


def _get(args, *names, default=None):
    for n in names:
        v = getattr(args, n, None) if args is not None else None
        if v is not None:
            return v
    return default


class Source:
    """Common interface. Subclasses fill: fmt, args, version, tp, pp, vp, num_layers, naming,
    and implement layer_shape/global_shape/read_layer/read_global/has_*."""

    fmt = ""
    naming = "legacy"  # "legacy" | "mcore": decides the GeLU rules of §6
    args: Any = None
    version: float = 3.0
    tp = pp = vp = 1
    num_layers = 0
    dtype: np.dtype = np.dtype(np.float32)

    def describe(self) -> str:
        return self.fmt

    def close(self) -> None:
        pass


# ---- per-rank torch files --------------------------------------------------------------------
class _RankFile:
    """One mp_rank file: its model chunks as {flat key: LazyTensor}."""

    def __init__(self, path: Path, expert_rank: int = 0, local_experts: int | None = None):
        """expert_rank, local_experts: this file's expert-parallel rank and experts per rank
        (megatron-core MoE): its experts are renamed to global numbers."""
        self.path = path
        sd = open_torch_file(path)
        if not isinstance(sd, dict):
            raise fail(f"expected a dict at top level, got {type(sd).__name__}", path)
        self.args = sd.get("args")
        self.version = sd.get("checkpoint_version", 0)
        try:
            self.version = float(self.version)
        except (TypeError, ValueError):
            raise fail(f"unreadable checkpoint_version {self.version!r}", path) from None
        if self.version not in SUPPORTED_VERSIONS:
            raise fail(f"unsupported checkpoint_version {self.version} (known: 0, 1.0, 2.0, "
                       "3.0)", path, "checkpoint_version")
        chunks = sorted((k for k in sd if re.fullmatch(r"model\d+", str(k))),
                        key=lambda k: int(k[5:]))
        if chunks:
            models = [sd[k] for k in chunks]
        elif "model" in sd:
            models = [sd["model"]]
        elif "module" in sd:  # DeepSpeed-Megatron
            models = [sd["module"]]
        else:
            raise fail(f"no model weights: expected key 'model' or 'model0'.., found "
                       f"{sorted(map(str, sd))}", path)
        self.chunks = []
        for m in models:
            if not isinstance(m, dict):
                raise fail(f"model entry is a {type(m).__name__}, not a state dict", path)
            flat = layout.flatten(m)
            if flat and all(k.startswith("module.") for k in flat):
                flat = {k[len("module."):]: v for k, v in flat.items()}
            first = expert_rank * (local_experts or 0)
            self.chunks.append(layout.canonical_experts(flat, first, local_experts, path))

    def add_experts(self, other: "_RankFile") -> None:
        """Take another expert-parallel rank's experts (its other tensors are copies)."""
        for mine, theirs in zip(self.chunks, other.chunks):
            mine.update({k: v for k, v in theirs.items() if ".mlp.experts." in k})


class RankFileSource(Source):
    """Legacy or megatron-core state dicts in mp_rank_XX[_YYY]/model_optim_rng.pt files."""

    fmt = "torch"

    def __init__(self, kind: str, path: Path, tp_override=None, pp_override=None):
        self.step_dir = path if kind == "torch" else path.parent
        files = self._rank_files(kind, path)
        num_experts = _get(self.args, "num_experts", default=0) or 0
        self.local_experts = num_experts // self.ep if num_experts else None
        first = _RankFile(files[(0, 0)], 0, self.local_experts)
        self.args = first.args
        self.version = first.version
        tp = max(t for t, _ in files) + 1
        pp = max(p for _, p in files) + 1
        a_tp = _get(self.args, "tensor_model_parallel_size", "model_parallel_size")
        a_pp = _get(self.args, "pipeline_model_parallel_size")
        self.tp, self.pp = tp_override or a_tp or tp, pp_override or a_pp or pp
        for t in range(self.tp):
            for p in range(self.pp):
                if (t, p) not in files:
                    name = f"mp_rank_{t:02d}" + (f"_{p:03d}" if self.pp > 1 else "")
                    raise fail(f"missing rank file for tensor rank {t}, pipeline rank {p} "
                               f"(TP={self.tp}, PP={self.pp})",
                               self.step_dir / name / MODEL_FILES[0])
        extra = sorted(k for k in files if k[0] >= self.tp or k[1] >= self.pp)
        if extra:
            raise fail(f"rank files {extra} beyond TP={self.tp} x PP={self.pp} (from args)",
                       self.step_dir)
        self.files = files
        self.vp = len(first.chunks)
        self._open: dict[int, list[_RankFile]] = {}
        self._first = first
        self._scan()

    def describe(self):
        kind = "megatron-core" if self.naming == "mcore" else "legacy"
        return (f"torch per-rank files ({kind} names, checkpoint_version {self.version:g}), "
                f"TP={self.tp} PP={self.pp}" + (f" VP={self.vp}" if self.vp > 1 else ""))

    def _rank_files(self, kind, path) -> dict[tuple[int, int], Path]:
        if kind == "file":
            return self._split_expert_ranks({(0, 0): [path, [(None, path)]]})
        files = {}
        for d in sorted(path.iterdir()):
            m = _RANK_DIR.match(d.name)
            if not (m and d.is_dir()):
                continue
            t = int(m.group(1))
            second, third = m.group(2), m.group(3)
            p = int(second) if second is not None else 0
            f = next((d / n for n in MODEL_FILES if (d / n).is_file()), None)
            if f is None:
                raise fail(f"rank folder has no {' or '.join(MODEL_FILES)} (missing rank "
                           "file)", d / MODEL_FILES[0])
            entry = files.setdefault((t, p), [f, []])
            entry[1].append((None if third is None else int(third), f))
        if (0, 0) not in files:
            raise fail("missing rank file", path / "mp_rank_00" / MODEL_FILES[0])
        return self._split_expert_ranks(files)

    def _split_expert_ranks(self, found) -> dict[tuple[int, int], Path]:
        """megatron-core MoE names expert-parallel rank e's folder mp_rank_TT[_PPP]_EEE: with
        one pipeline stage the second number is the expert rank (args say which). Keeps
        rank e's files in self.expert_files[(t, p)][e]; returns those of expert rank 0."""
        sd = open_torch_file(found[(0, 0)][0])
        self.args = args = sd.get("args") if isinstance(sd, dict) else None
        self.ep = ep = _get(args, "expert_model_parallel_size", default=1) or 1
        pp = _get(args, "pipeline_model_parallel_size", default=None)
        self.expert_files: dict[tuple[int, int], list[Path]] = {}
        for (t, second), entries in found.items():
            for third, f in entries[1]:
                if ep > 1 and third is None and (pp or 1) == 1:
                    p, e = 0, second
                else:
                    p, e = second, third or 0
                if e >= ep:
                    raise fail(f"expert-parallel rank {e} beyond "
                               f"expert_model_parallel_size={ep}", f)
                self.expert_files.setdefault((t, p), [None] * ep)[e] = f
        for (t, p), fs in self.expert_files.items():
            for e, f in enumerate(fs):
                if f is None:
                    raise fail(f"missing rank file of expert-parallel rank {e} (tensor rank "
                               f"{t}, pipeline rank {p}; expert_model_parallel_size={ep})",
                               self.step_dir)
        return {k: fs[0] for k, fs in self.expert_files.items()}

    # ---- scanning: key sets, layer numbering, shape agreement --------------------------------
    def stage(self, p: int) -> list[_RankFile]:
        """The TP rank files of pipeline stage p (only one stage is kept open)."""
        if p not in self._open:
            self._open.clear()
            rfs = []
            for t in range(self.tp):
                rf = self._first if (t, p) == (0, 0) else \
                    _RankFile(self.files[(t, p)], 0, self.local_experts)
                for e in range(1, self.ep):  # the other expert-parallel ranks' experts
                    rf.add_experts(_RankFile(self.expert_files[(t, p)][e], e,
                                             self.local_experts))
                if rf.version != self.version:
                    raise fail(f"checkpoint_version {rf.version} differs from "
                               f"{self.files[(0, 0)]}'s {self.version}", rf.path)
                if len(rf.chunks) != self.vp:
                    raise fail(f"{len(rf.chunks)} model chunks, but {self.files[(0, 0)]} "
                               f"has {self.vp}", rf.path)
                rfs.append(rf)
            self._open[p] = rfs
        return self._open[p]

    def _scan(self):
        """Map every key of every rank file; number layers globally (chunks v, then stages
        p, then sorted local indices); check that the TP ranks agree on keys and shapes."""
        self.layer_keys: dict[int, dict[str, tuple[int, int, str]]] = {}  # g -> canon -> (p,v,key)
        self.global_keys: dict[str, tuple[int, int, str]] = {}
        self.shapes: dict[tuple, tuple] = {}  # (p, v, key) -> merged-ready piece shape
        per_stage = {}
        naming = set()
        for p in range(self.pp):
            rfs = self.stage(p)
            per_stage[p] = []
            for v in range(self.vp):
                ref = rfs[0].chunks[v]
                for rf in rfs[1:]:
                    other = rf.chunks[v]
                    missing = sorted(set(ref) - set(other))
                    extra = sorted(set(other) - set(ref))
                    if missing or extra:
                        key = (missing or extra)[0]
                        raise fail(f"tensor-parallel ranks disagree on keys: missing "
                                   f"{missing[:5]}, unexpected {extra[:5]} compared with "
                                   f"{rfs[0].path}", rf.path, key)
                local: dict[int, dict[str, str]] = {}
                for key, val in ref.items():
                    what, i, canon = layout.classify(key, rfs[0].path)
                    if what == "skip":
                        continue
                    if not (is_tensor(val) or isinstance(val, layout.ExpertSlice)):
                        raise fail(f"expected a tensor, found {type(val).__name__}",
                                   rfs[0].path, key)
                    shapes = [rf.chunks[v][key].shape for rf in rfs]
                    if len(set(shapes)) > 1:
                        bad = next(t for t, s in enumerate(shapes) if s != shapes[0])
                        raise fail(f"shape {shapes[bad]} disagrees across tensor-parallel "
                                   f"ranks with {shapes[0]} in {rfs[0].path}",
                                   rfs[bad].path, key)
                    stripped = layout.strip_prefix(key)
                    naming.add("mcore" if stripped == key and
                               key.split(".")[0] in ("decoder", "encoder", "embedding",
                                                     "output_layer") else "legacy")
                    self.shapes[(p, v, key)] = shapes[0]
                    if what == "layer":
                        if i is None:
                            raise fail("layer key without a layer number", rfs[0].path, key)
                        local.setdefault(i, {})[canon] = key
                    else:
                        self.global_keys.setdefault(canon, (p, v, key))
                per_stage[p].append(local)
            # other stages are opened later, layer by layer
        g = 0
        for v in range(self.vp):
            for p in range(self.pp):
                local = per_stage[p][v]
                for i in sorted(local):
                    self.layer_keys[g] = {c: (p, v, k) for c, k in local[i].items()}
                    g += 1
        self.num_layers = g
        if not g:
            raise fail("no transformer layers found", self.files[(0, 0)])
        self.naming = "mcore" if "mcore" in naming else "legacy"
        ref = self.layer_keys[0]
        for g2, canons in self.layer_keys.items():
            if set(canons) != set(ref):
                p, v, key = next(iter(canons.values()))
                raise fail(f"layer {g2} has tensors {sorted(canons)}, layer 0 has "
                           f"{sorted(ref)}", self.files[(0, p)], key)
        word = self.global_keys.get("word_emb")
        self.dtype = self._piece(*word).dtype if word else \
            self._piece(*next(iter(ref.values()))).dtype

    def _piece(self, p, v, key, t=0):
        return self.stage(p)[t].chunks[v][key]

    # ---- queries ----------------------------------------------------------------------------
    def has_layer(self, canon) -> bool:
        return canon in self.layer_keys[0]

    def has_global(self, canon) -> bool:
        return canon in self.global_keys

    def _merged_shape(self, canon, shape):
        shape = list(shape)
        kind = layout.partition(canon)
        if kind in ("vocab", "qkv", "fc1"):
            shape[0] *= self.tp
        elif kind == "row" and len(shape) == 2:
            shape[1] *= self.tp
        return tuple(shape)

    def layer_shape(self, canon) -> tuple:
        p, v, key = self.layer_keys[0][canon]
        return self._merged_shape(canon, self.shapes[(p, v, key)])

    def global_shape(self, canon) -> tuple:
        p, v, key = self.global_keys[canon]
        return self._merged_shape(canon, self.shapes[(p, v, key)])

    def _read(self, canon, loc, gated, head_dim):
        p, v, key = loc
        rfs = self.stage(p)
        if layout.partition(canon) == "rep" or (layout.partition(canon) == "row"
                                                 and len(self.shapes[loc]) == 1):
            pieces = [rfs[0].chunks[v][key].numpy()]
        else:
            pieces = [rf.chunks[v][key].numpy() for rf in rfs]
        return layout.merge(canon, pieces, version=self.version, gated=gated,
                            head_dim=head_dim)

    def read_layer(self, g, canon, *, gated, head_dim) -> np.ndarray:
        return self._read(canon, self.layer_keys[g][canon], gated, head_dim)

    def read_global(self, canon, *, gated=False, head_dim=0) -> np.ndarray:
        return self._read(canon, self.global_keys[canon], gated, head_dim)

    def location(self, canon, g=None) -> str:
        p, v, key = self.layer_keys[g][canon] if g is not None else self.global_keys[canon]
        return f"{self.files[(0, p)]} [{key}]"

    def close(self):
        self._open.clear()


# ---- torch_dist ------------------------------------------------------------------------------
class DistSource(Source):
    """A megatron-core torch_dist (PyTorch DCP) step directory: global shapes, layers stacked."""

    fmt = "torch_dist"
    naming = "mcore"
    version = 3.0

    def __init__(self, path: Path):
        self.step_dir = path
        self.ckpt = DistCheckpoint(path)
        common = path / "common.pt"
        self.args = None
        if common.is_file():
            c = open_torch_file(common)
            if isinstance(c, dict):
                self.args = c.get("args")
        else:
            log.warning("%s has no common.pt: no args; pass config flags if needed", path)
        self.tp = _get(self.args, "tensor_model_parallel_size", default=1)
        self.pp = _get(self.args, "pipeline_model_parallel_size", default=1)
        self.vp = _get(self.args, "virtual_pipeline_model_parallel_size", default=1)
        self.prefix = self._detect_prefix()
        self.stacked: dict[str, str] = {}  # canon -> key of a [L, ...] tensor
        self.per_layer: dict[int, dict[str, str]] = {}  # g -> canon -> key
        self.global_keys: dict[str, str] = {}
        for key in self.ckpt.tensors:
            if not key.startswith(self.prefix):
                continue
            k = key[len(self.prefix):]
            if not k.startswith(_MODEL_KEYS):
                continue  # optimizer state, rng, rerun bookkeeping
            what, i, canon = layout.classify(k, path)
            if what == "skip":
                continue
            if what == "layer":
                if i is None:
                    self.stacked[canon] = key
                else:
                    self.per_layer.setdefault(i, {})[canon] = key
            else:
                self.global_keys[canon] = key
        if self.stacked and self.per_layer:
            raise fail("mixes stacked decoder.layers.* and per-layer decoder.layers.N.* keys",
                       path)
        if self.stacked:
            Ls = {self.ckpt.shape(k)[0] for k in self.stacked.values()}
            if len(Ls) > 1:
                raise fail(f"stacked layer tensors disagree on the layer count: {sorted(Ls)}",
                           path)
            self.num_layers = Ls.pop()
        else:
            self.num_layers = len(self.per_layer)
            if sorted(self.per_layer) != list(range(self.num_layers)):
                raise fail(f"per-layer keys cover layers {sorted(self.per_layer)}", path)
            ref = self.per_layer[0]
            for g, c in self.per_layer.items():
                if set(c) != set(ref):
                    raise fail(f"layer {g} has tensors {sorted(c)}, layer 0 has {sorted(ref)}",
                               path, next(iter(c.values())))
        if not self.num_layers:
            raise fail("no transformer layers found", path)
        word = self.global_keys.get("word_emb")
        self.dtype = self.ckpt.dtype(word) if word else np.dtype(np.float32)
        self.layer_major = not any(self.ckpt.spans_layers(k) for k in self.stacked.values())

    def _detect_prefix(self) -> str:
        for prefix in ("model.module.module.", "model.module.", "model.", "module.", ""):
            if any(k.startswith(prefix + m) for k in self.ckpt.tensors for m in _MODEL_KEYS):
                return prefix
        raise fail("no model tensors (embedding.*, decoder.*, encoder.*) in the checkpoint",
                   self.step_dir / ".metadata")

    def describe(self):
        return (f"torch_dist (PyTorch DCP), saved with TP={self.tp} PP={self.pp}"
                + (f" VP={self.vp}" if self.vp > 1 else ""))

    def _layer_canons(self):
        return self.stacked if self.stacked else self.per_layer[0]

    def has_layer(self, canon):
        return canon in self._layer_canons()

    def has_global(self, canon):
        return canon in self.global_keys

    def layer_shape(self, canon):
        if self.stacked:
            return self.ckpt.shape(self.stacked[canon])[1:]
        return self.ckpt.shape(self.per_layer[0][canon])

    def global_shape(self, canon):
        return self.ckpt.shape(self.global_keys[canon])

    def read_layer(self, g, canon, *, gated, head_dim):
        if self.stacked:
            return self.ckpt.read(self.stacked[canon], index=g)
        return self.ckpt.read(self.per_layer[g][canon])

    def read_global(self, canon, *, gated=False, head_dim=0):
        return self.ckpt.read(self.global_keys[canon])

    def close(self):
        self.ckpt.close()

    def location(self, canon, g=None):
        key = (self.stacked.get(canon) or self.per_layer.get(g, {}).get(canon)) \
            if g is not None else self.global_keys[canon]
        return f"{self.step_dir} [{key}]"


def open_source(path, tp=None, pp=None) -> Source:
    kind, p = find_step_dir(path)
    if kind == "torch_dist":
        return DistSource(p)
    return RankFileSource(kind, p, tp, pp)
