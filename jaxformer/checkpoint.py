"""Orbax checkpoints: write once (streamed, atomically), restore straight into shardings.

Layout (docs/checkpoint_format.md): `config.json`, `tokenizer/`, `params/` (orbax), and
`quantization.json` when the linear layers are stored quantized (jaxformer.quant), and
`sentence.json` for a sentence-embedding model (pooling, normalisation: jaxformer.sentence).
Writers stage everything in `<output>.tmp-<random>` beside the output and rename it at the
end, so a failed write leaves nothing that looks like a checkpoint.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import itertools
import json
import logging
import mmap
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Mapping

import jax
import numpy as np

from jaxformer.config import ModelConfig
from jaxformer.models import abstract_params
from jaxformer.models.stack import LayerStack
from jaxformer.quant.module import SCALE_LEAVES
from jaxformer.quant.spec import name, parse
from jaxformer.sentence import FILE as SENTENCE_FILE, SentenceConfig

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
PARAMS_DIR = "params"
TOKENIZER_DIR = "tokenizer"
QUANT_FILE = "quantization.json"
# how quantized kernels are laid out (checkpoint_format.md): every mode K-minor. int4 was
# stored in the float layout before this field existed, so an int4 record without it is
# refused rather than read transposed.
QUANT_LAYOUT = "k-minor"
STAGING_DIR = "_staging"
CHUNK_BYTES = 16 << 20  # storage chunks: a shard's restore reads little else, a save buffers little


def _libc():
    """glibc, for malloc_trim; None where the C library is another."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


_LIBC = _libc()


class CheckpointError(ValueError):
    """A checkpoint directory is missing, incomplete, corrupt or does not match its config."""


def _flatten(tree: Mapping, prefix=()) -> dict[tuple[str, ...], Any]:
    out = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            out.update(_flatten(v, prefix + (k,)))
        else:
            out[prefix + (k,)] = v
    return out


def _unflatten(flat: Mapping[tuple[str, ...], Any]) -> dict:
    tree: dict = {}
    for path, v in flat.items():
        node = tree
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = v
    return tree


def _path(key: str | tuple[str, ...]) -> tuple[str, ...]:
    return tuple(key.split("/")) if isinstance(key, str) else tuple(key)


class CheckpointWriter:
    """Streams a parameter tree to disk, then commits it atomically.

    with CheckpointWriter("ckpt/out", config) as w:
        w.put("embed/token/embedding", array)                  # small or whole tensors
        buf = w.allocate("layers/mlp/wo/kernel", (L, F, D), np.float32)   # disk-backed
        buf[i] = layer_i_weight                                # one layer at a time
        w.add_tokenizer(tok)                                   # optional

    Every path must match the tree that `config` (and `quantize`) describe
    (docs/checkpoint_format.md), with the same shapes; anything missing or extra fails before
    anything is committed. Host memory stays near one tensor: `allocate` returns a memory map
    in the staging dir. `quantize` (a RunConfig.quantize value) writes a quantized tree:
    kernels in their quantized dtype, float32 scales, and `quantization.json`.
    """

    def __init__(self, output: str | os.PathLike, config: ModelConfig, *, overwrite=False,
                 dtype: str | None = None, quantize: str | None = None):
        self.output = Path(output)
        self.config = config
        self.overwrite = overwrite
        self.dtype = dtype  # store every floating tensor in this dtype (None: as given)
        self.quantize = name(quantize)
        if self.output.exists() and not overwrite:
            raise FileExistsError(f"{self.output} exists; pass overwrite=True to replace it")
        self.tmp = self.output.parent / f".{self.output.name}.tmp-{uuid.uuid4().hex[:8]}"
        self._arrays: dict[tuple[str, ...], np.ndarray] = {}
        self._tokenizer = None
        self._sentence: SentenceConfig | None = None

    def __enter__(self):
        self.output.parent.mkdir(parents=True, exist_ok=True)
        (self.tmp / STAGING_DIR).mkdir(parents=True)
        return self

    def _expected(self) -> dict:
        return _flatten(_to_plain(abstract_params(self.config, self.quantize)))

    def _check(self, path, shape, dtype=None):
        expected = self._expected()
        if path not in expected:
            raise CheckpointError(f"{'/'.join(path)} is not a parameter of this model "
                                  f"({self.config.name or 'config'}); expected one of "
                                  f"{sorted('/'.join(p) for p in expected)}")
        if tuple(shape) != tuple(expected[path].shape):
            raise CheckpointError(f"{'/'.join(path)}: shape {tuple(shape)} does not match the "
                                  f"config's {tuple(expected[path].shape)}")
        want = expected[path].dtype
        if dtype is not None and _fixed_dtype(path, want) and np.dtype(dtype) != want:
            raise CheckpointError(f"{'/'.join(path)}: dtype {np.dtype(dtype)}, but a "
                                  f"{self.quantize} checkpoint stores {want}")

    def put(self, key, array) -> None:
        path = _path(key)
        array = np.asarray(array)
        self._check(path, array.shape, array.dtype)
        keep = self.dtype is None or _fixed_dtype(path, self._expected()[path].dtype)
        self._arrays[path] = array if keep else _cast(array, self.dtype)

    def allocate(self, key, shape, dtype=np.float32) -> np.ndarray:
        """A disk-backed buffer (in the writer's dtype, when it has one) to fill in place."""
        path = _path(key)
        self._check(path, shape, dtype)
        if self.dtype is not None and np.issubdtype(np.dtype(dtype), np.floating) \
                and not _fixed_dtype(path, self._expected()[path].dtype):
            dtype = _cast(np.zeros((), dtype), self.dtype).dtype
        file = self.tmp / STAGING_DIR / ("__".join(path) + ".npy")
        buf = np.lib.format.open_memmap(file, mode="w+", dtype=dtype, shape=tuple(shape))
        self._arrays[path] = buf
        return buf

    def add_tokenizer(self, tokenizer) -> None:
        self._tokenizer = tokenizer

    def add_sentence(self, sentence: SentenceConfig | None) -> None:
        """A sentence-embedding model's pooling config, written as sentence.json."""
        self._sentence = sentence

    def __exit__(self, exc_type, exc, tb):
        try:
            if exc_type is None:
                self._commit()
        finally:
            self._arrays.clear()
            if self.tmp.exists():
                shutil.rmtree(self.tmp, ignore_errors=True)
        return False

    def _commit(self):
        expected = self._expected()
        missing = sorted("/".join(p) for p in set(expected) - set(self._arrays))
        if missing:
            raise CheckpointError(f"checkpoint for {self.output} is incomplete: missing {missing}")
        tree = _unflatten(self._arrays)
        save_params(self.tmp / PARAMS_DIR, tree)
        shutil.rmtree(self.tmp / STAGING_DIR)
        self.config.save_json(self.tmp / CONFIG_FILE)
        if self.quantize is not None:
            (self.tmp / QUANT_FILE).write_text(json.dumps(
                {"quantize": self.quantize, "layout": QUANT_LAYOUT}) + "\n")
        if self._tokenizer is not None:
            self._tokenizer.save(self.tmp / TOKENIZER_DIR)
        if self._sentence is not None:
            self._sentence.save(self.tmp / SENTENCE_FILE)
        if self.output.exists():
            shutil.rmtree(self.output)
        os.replace(self.tmp, self.output)
        log.info("wrote checkpoint %s", self.output)


def _fixed_dtype(path, dtype) -> bool:
    """Quantized kernels and their float32 scales keep their dtype whatever the writer's."""
    return path[-1] in SCALE_LEAVES or np.dtype(dtype) != np.float32


def _cast(a: np.ndarray, dtype: str):
    import ml_dtypes  # registers bfloat16 with numpy
    if not np.issubdtype(a.dtype, np.floating) and a.dtype != ml_dtypes.bfloat16:
        return a
    return a.astype(ml_dtypes.bfloat16 if dtype == "bfloat16" else np.dtype(dtype))


def _to_plain(state) -> dict:
    """nnx.State / nested mapping -> plain nested dict of leaves."""
    from flax import nnx
    if isinstance(state, nnx.State):
        return nnx.to_pure_dict(state)
    return state


def _chunk_shape(shape, itemsize: int) -> tuple[int, ...]:
    """Storage chunks of at most CHUNK_BYTES, split along the leading axes first (for stacked
    layers that is one chunk per layer or less), so a shard's restore reads little else."""
    chunk = list(shape)
    for i in range(len(chunk)):
        while chunk[i] > 1 and int(np.prod(chunk)) * itemsize > CHUNK_BYTES:
            chunk[i] = -(-chunk[i] // 2)
    return tuple(max(1, c) for c in chunk)


def _trim() -> None:
    """Give the C heap's free memory back to the system (glibc's malloc_trim; elsewhere
    nothing): tensorstore's writer threads each keep a malloc arena, and the chunk buffers
    they free would otherwise stay in the process's memory, arena by arena."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def save_params(directory: Path, tree: Mapping) -> None:
    """Write a plain nested dict of host arrays (memory maps welcome) as an orbax checkpoint.

    Host memory stays near one storage chunk, not the model: orbax first writes every array's
    metadata from zero-cost placeholders, then each array is filled chunk by chunk through
    tensorstore, dropping memory-mapped pages once written. (orbax's own save would copy every
    array into memory at once, about 3x the model for a converter.)
    """
    import orbax.checkpoint as ocp
    import tensorstore as ts

    directory = Path(directory).absolute()
    flat = _flatten(tree)
    # orbax writes the tree's metadata from one-element stand-ins (a full-size stand-in would
    # be materialised); each array is then re-created at its real shape in the same store.
    standin = _unflatten({p: np.zeros((1,) * a.ndim, a.dtype) for p, a in flat.items()})
    ocp.Checkpointer(ocp.PyTreeCheckpointHandler()).save(
        directory, args=ocp.args.PyTreeSave(standin))
    context = ts.Context({"cache_pool": {"total_bytes_limit": 0}})
    for path, src in flat.items():
        spec = {"driver": "zarr", "kvstore": {"driver": "ocdbt", "base": f"file://{directory}/",
                                              "path": ".".join(path) + "/"}}
        meta = ts.open(spec, open=True, context=context).result().spec().to_json()["metadata"]
        chunk = _chunk_shape(src.shape, src.dtype.itemsize)
        meta.update(shape=list(src.shape), chunks=list(chunk))
        store = ts.open({**spec, "metadata": meta}, create=True, delete_existing=True,
                        context=context).result()
        pages = getattr(src, "_mmap", None)
        for start in itertools.product(*(range(0, n, c) for n, c in zip(src.shape, chunk))):
            box = tuple(slice(s, min(s + c, n)) for s, c, n in zip(start, chunk, src.shape))
            store[box].write(np.ascontiguousarray(src[box])).result()
            if pages is not None:
                pages.madvise(mmap.MADV_DONTNEED)
            _trim()


def stacked_leaves(params: Mapping):
    """Yield (path, host numpy array) of a params tree of either layer layout in the
    checkpoint's stacked layout, one array at a time (models/stack.py)."""
    return LayerStack.checkpoint_leaves(params, _flatten)


def save(output, params, config: ModelConfig, tokenizer=None, *, overwrite=False,
         dtype: str | None = None, quantize: str | None = None,
         sentence: SentenceConfig | None = None) -> None:
    """Save a whole parameter tree (nnx.State or nested dict of arrays, either layer layout)
    as a checkpoint, one array on the host at a time; `quantize`: the tree is quantized so
    (RunConfig.quantize), recorded in quantization.json."""
    with CheckpointWriter(output, config, overwrite=overwrite, dtype=dtype,
                          quantize=quantize) as w:
        for path, arr in stacked_leaves(_to_plain(params)):
            w.put(path, arr)
        if tokenizer is not None:
            w.add_tokenizer(tokenizer)
        w.add_sentence(sentence)


# ---- reading -------------------------------------------------------------------------------
def read_config(path: str | os.PathLike) -> ModelConfig:
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint directory {path} does not exist")
    if not (path / CONFIG_FILE).exists():
        raise CheckpointError(f"{path} is not a jaxformer checkpoint: no {CONFIG_FILE}")
    try:
        return ModelConfig.load_json(path / CONFIG_FILE)
    except (ValueError, TypeError) as e:  # name the file once (load_json's JSON error does)
        msg = str(e)
        raise CheckpointError(msg if str(path / CONFIG_FILE) in msg
                              else f"{path / CONFIG_FILE}: {msg}") from None


def read_sentence(path: str | os.PathLike) -> SentenceConfig | None:
    """A sentence-embedding checkpoint's pooling config (sentence.json), else None."""
    f = Path(path) / SENTENCE_FILE
    if not f.exists():
        return None
    try:
        return SentenceConfig.load(f)
    except ValueError as e:
        raise CheckpointError(str(e)) from None


def read_quantization(path: str | os.PathLike) -> str | None:
    """The `quantize` value a checkpoint's linear layers are stored in (None: float)."""
    f = Path(path) / QUANT_FILE
    if not f.exists():
        return None
    try:
        record = json.loads(f.read_text())
        value = name(record["quantize"])
        layout = record.get("layout")
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{f}: not a valid quantization record: {e}") from None
    if layout not in (None, QUANT_LAYOUT):
        raise CheckpointError(f"{f}: unknown quantized layout {layout!r} (this jaxformer "
                              f"reads {QUANT_LAYOUT!r})")
    if layout is None and parse(value).mode == "int4":
        raise CheckpointError(f"{f}: an int4 checkpoint from an earlier jaxformer, with its "
                              f"codes in the float layout; quantize the float checkpoint "
                              f"again (load(..., quantize={value!r}) and save, or the "
                              f"converters' --quantize)")
    return value


def restore_params(path: str | os.PathLike, target: Mapping, *, partial: bool = False) -> dict:
    """Restore `params/` into `target`, a nested dict of jax.ShapeDtypeStruct with shardings.

    Each host reads only the slices its devices need; dtypes are cast on the way in.
    partial: `target` may be a subset of the stored tree (quantizing at load restores one
    float weight at a time).
    """
    import orbax.checkpoint as ocp
    pdir = Path(path).absolute() / PARAMS_DIR
    if not pdir.is_dir():
        raise CheckpointError(f"{path} is not a jaxformer checkpoint: no {PARAMS_DIR}/ directory")
    ckptr = ocp.StandardCheckpointer()
    try:
        meta = ckptr.metadata(pdir)
        stored = meta.item_metadata.tree if hasattr(meta, "item_metadata") else meta
    except Exception as e:  # orbax raises many types for a damaged directory
        raise CheckpointError(f"{pdir} is not a readable orbax checkpoint: {e}") from None
    stored_flat = _flatten(dict(stored))
    target_flat = _flatten(target)
    missing = sorted("/".join(p) for p in set(target_flat) - set(stored_flat))
    extra = sorted("/".join(p) for p in set(stored_flat) - set(target_flat))
    if missing or (extra and not partial):
        raise CheckpointError(f"{path}: weights do not match config.json: missing {missing}, "
                              f"unexpected {extra}")
    for p, t in target_flat.items():
        if tuple(stored_flat[p].shape) != tuple(t.shape):
            raise CheckpointError(f"{path}: {'/'.join(p)} has shape {tuple(stored_flat[p].shape)} "
                                  f"but config.json implies {tuple(t.shape)}")
    try:
        if partial:
            restore_args = jax.tree.map(lambda t: ocp.ArrayRestoreArgs(
                sharding=t.sharding, global_shape=t.shape, dtype=t.dtype), target)
            args = ocp.args.PyTreeRestore(item=target, restore_args=restore_args,
                                          partial_restore=True)
            return ocp.Checkpointer(ocp.PyTreeCheckpointHandler()).restore(pdir, args=args)
        return ckptr.restore(pdir, target)
    except Exception as e:
        raise CheckpointError(f"{pdir}: could not restore parameters: {e}") from None
