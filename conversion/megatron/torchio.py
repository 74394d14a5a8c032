"""Reading Megatron files without Megatron, one tensor at a time.

`open_torch_file(path)` unpickles a `torch.save` file with a restricted, permissive unpickler
(MEGATRON_FORMAT.md §7, method 1): classes of `megatron`, `apex`, `transformer_engine`, `fp16`,
`nemo` (and anything else outside a short allow-list) come back as inert stubs, so pickled
`args` load without those packages and nothing in the file can run code. Tensors come back as
`LazyTensor`s that remember where their bytes are; `.numpy()` reads exactly those bytes with
`pread`. Nothing is memory-mapped, so pages of the (possibly huge, optimizer-laden) rank file
never count against the process, and a model whose parameters are views into one flat buffer
(Megatron's distributed-optimizer param buffer) still reads only the tensor asked for.

`DistCheckpoint` reads the torch_dist / DCP format (§7, last paragraph) key by key, or one
slice of the leading (layer) axis, through torch.distributed.checkpoint with no process group.
"""
from __future__ import annotations

import io
import os
import pickle
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from conversion.megatron.errors import MegatronConversionError, fail

STUB_PACKAGES = ("megatron", "apex", "transformer_engine", "fp16", "nemo", "deepspeed")
# Globals resolved for real (exact names; None: any undotted name that passes _safe_any);
# everything else becomes an inert stub, so nothing in a file can run code.
_ALLOWED = {
    "collections": {"OrderedDict", "defaultdict", "deque"},
    "argparse": {"Namespace"},
    "io": {"BytesIO"},
    "_io": {"BytesIO"},
    "copyreg": {"_reconstructor"},
    "_codecs": {"encode"},
    "builtins": {"set", "frozenset", "slice", "complex", "bytearray", "range", "object",
                 "dict", "list", "tuple", "int", "float", "bool", "str", "bytes"},
    "types": {"SimpleNamespace"},
    "enum": {"Enum", "IntEnum"},
    "pathlib": {"PosixPath", "WindowsPath", "PurePosixPath", "Path"},
    "datetime": {"datetime", "date", "timedelta"},
    "numpy": {"dtype", "ndarray"},
    "numpy._core.multiarray": {"_reconstruct", "scalar"},
    "numpy.dtypes": None,
    "numpy.random._pickle": {"__randomstate_ctor", "__bit_generator_ctor", "__generator_ctor"},
    "numpy.random.mtrand": {"RandomState"},
    "numpy.random._mt19937": {"MT19937"},
    "torch": None,  # dtypes, Size, device, storage classes only (_safe_any)
    "torch.nn.parameter": {"Parameter"},
}


def _safe_any(module: str, obj) -> bool:
    """For wildcard modules: data classes and dtypes, never functions or modules."""
    if module == "torch":
        import torch
        return isinstance(obj, (torch.dtype, torch.device)) or obj in (
            torch.Size, torch.device, torch.Tensor) or (
            isinstance(obj, type) and obj.__name__.endswith("Storage"))
    return isinstance(obj, type)


class Stub:
    """Stands in for any class the unpickler does not resolve (Megatron enums, optimizer
    state classes...). Keeps constructor args and pickled state for inspection."""

    def __init__(self, *args, **kwargs):
        self._args, self._kwargs = args, kwargs

    def __setstate__(self, state):
        self._state = state

    @property
    def value(self):  # pickled enum members are rebuilt as Class(value)
        return self._args[0] if self._args else None

    def __repr__(self):
        return f"<stub {type(self).__module__}.{type(self).__qualname__}{self._args!r}>"

    @classmethod
    def __class_getitem__(cls, item):
        return cls


_stub_cache: dict[tuple[str, str], type] = {}


def stub_class(module: str, name: str) -> type:
    key = (module, name)
    if key not in _stub_cache:
        _stub_cache[key] = type(name, (Stub,), {"__module__": module, "__qualname__": name})
    return _stub_cache[key]


def _resolve(module: str, name: str):
    """The real global if allow-listed, else a stub class."""
    import _compat_pickle  # Python 2 names (protocol 2 pickles say __builtin__, copy_reg)
    if (module, name) in _compat_pickle.NAME_MAPPING:
        module, name = _compat_pickle.NAME_MAPPING[(module, name)]
    module = _compat_pickle.IMPORT_MAPPING.get(module, module)
    if module.startswith("numpy.core"):  # pickled under numpy 1.x
        module = module.replace("numpy.core", "numpy._core", 1)
    allowed = _ALLOWED.get(module, ())
    if (allowed is None and "." not in name) or (allowed and name in allowed):
        try:
            __import__(module)
            obj = getattr(sys.modules[module], name)
            if allowed or _safe_any(module, obj):
                return obj
        except (ImportError, AttributeError):
            pass
    return stub_class(module, name)


# ---- lazy tensors ---------------------------------------------------------------------------
def torch_to_numpy_dtype(dtype) -> np.dtype:
    import torch
    if dtype == torch.bfloat16:
        import ml_dtypes
        return np.dtype(ml_dtypes.bfloat16)
    return torch.empty((), dtype=dtype).numpy().dtype


class _ZipRecords:
    """Byte offsets of the storages of one torch zip file, read with pread."""

    def __init__(self, path: Path, reader):
        self.path = path
        self.reader = reader
        self.size = path.stat().st_size
        self._offsets: dict[str, int] = {}

    def offset(self, key: str) -> int:
        if key not in self._offsets:
            try:
                self._offsets[key] = self.reader.get_record_offset(f"data/{key}")
            except Exception as e:
                raise fail(f"storage record data/{key} unreadable ({e}); the file is "
                           "corrupt or truncated", self.path) from None
        return self._offsets[key]

    def read_into(self, start: int, out: np.ndarray) -> None:
        """Fill `out` (a contiguous array) with the file's bytes from `start`."""
        nbytes = out.nbytes
        if start + nbytes > self.size:
            raise fail(f"truncated: needs bytes up to {start + nbytes}, file has {self.size}",
                       self.path)
        view = memoryview(out.reshape(-1).view(np.uint8))
        done = 0
        with open(self.path, "rb") as f:
            while done < nbytes:
                n = os.preadv(f.fileno(), [view[done:]], start + done)
                if n <= 0:
                    raise fail(f"truncated: read {done} of {nbytes} bytes at {start}", self.path)
                done += n


class _LazyStorage:
    __slots__ = ("records", "key", "dtype", "numel")

    def __init__(self, records, key, dtype, numel):
        self.records, self.key, self.dtype, self.numel = records, key, dtype, numel


class LazyTensor:
    """A tensor of a torch file, not yet read. shape, dtype (numpy), numpy()."""

    def __init__(self, storage: _LazyStorage, offset: int, shape, stride, dtype=None):
        import torch
        self.storage = storage
        self.offset = int(offset)
        self.shape = tuple(int(s) for s in shape)
        self.stride = tuple(int(s) for s in stride)
        self.torch_dtype = dtype if dtype is not None else storage.dtype
        if self.torch_dtype == torch.uint8 and storage.dtype != torch.uint8:
            self.torch_dtype = storage.dtype
        self.dtype = torch_to_numpy_dtype(self.torch_dtype)

    @property
    def path(self):
        return self.storage.records.path

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize

    def numpy(self) -> np.ndarray:
        """Read the tensor's bytes (only those) into a fresh numpy array."""
        n = int(np.prod(self.shape, dtype=np.int64))
        item = self.dtype.itemsize
        base = self.storage.records.offset(self.storage.key)
        if n == 0:
            return np.zeros(self.shape, self.dtype)
        extent = 1 + sum((s - 1) * st for s, st in zip(self.shape, self.stride))
        if self.offset + extent > self.storage.numel:
            raise fail(f"tensor view exceeds its storage ({self.offset}+{extent} > "
                       f"{self.storage.numel} elements)", self.path)
        if _contiguous(self.shape, self.stride):
            out = np.empty(self.shape, self.dtype)
            self.storage.records.read_into(base + self.offset * item, out)
            return out
        flat = np.empty(extent, self.dtype)
        self.storage.records.read_into(base + self.offset * item, flat)
        view = np.lib.stride_tricks.as_strided(
            flat, self.shape, tuple(s * item for s in self.stride))
        return np.array(view)

    def __repr__(self):
        return f"LazyTensor({self.shape}, {self.dtype}, {self.path.name})"


class LoadedTensor:
    """A tensor already in memory (old non-zip torch files); same interface as LazyTensor."""

    def __init__(self, t, path):
        self.t, self.path = t, path
        self.shape = tuple(t.shape)
        self.torch_dtype = t.dtype
        self.dtype = torch_to_numpy_dtype(t.dtype)
        self.nbytes = t.numel() * t.element_size()

    def numpy(self, copy: bool = True) -> np.ndarray:
        import torch
        t = self.t.detach().cpu().contiguous()
        a = t.view(torch.int16).numpy().view(self.dtype) if t.dtype == torch.bfloat16 \
            else t.numpy()
        return a.copy() if copy else a


def _contiguous(shape, stride) -> bool:
    expected = 1
    for s, st in zip(reversed(shape), reversed(stride)):
        if s != 1 and st != expected:
            return False
        expected *= s
    return True


def is_tensor(x) -> bool:
    return isinstance(x, (LazyTensor, LoadedTensor))


def _rebuild_v2(storage, storage_offset, size, stride, requires_grad=False,
                backward_hooks=None, metadata=None):
    return LazyTensor(storage, storage_offset, size, stride)


def _rebuild_v3(storage, storage_offset, size, stride, requires_grad, backward_hooks, dtype,
                metadata=None):
    return LazyTensor(storage, storage_offset, size, stride, dtype)


def _rebuild_v1(storage, storage_offset, size, stride):
    return LazyTensor(storage, storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, state=None):
    return data


def _rebuild_from_type_v2(func, new_type, args, state):  # tensor subclasses: keep the data
    return func(*args)


_TORCH_OVERRIDES = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_v2,
    ("torch._utils", "_rebuild_tensor_v3"): _rebuild_v3,
    ("torch._utils", "_rebuild_tensor"): _rebuild_v1,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
}


class _StorageType:
    def __init__(self, name):
        import torch
        from torch.serialization import StorageType
        self.dtype = torch.uint8 if name == "UntypedStorage" else StorageType(name).dtype


class _LazyUnpickler(pickle.Unpickler):
    def __init__(self, file, records: _ZipRecords):
        super().__init__(file)
        self.records = records
        self.storages: dict[str, _LazyStorage] = {}

    def find_class(self, module, name):
        if module == "torch.tensor":
            module = "torch._tensor"
        if (module, name) in _TORCH_OVERRIDES:
            return _TORCH_OVERRIDES[(module, name)]
        if module == "torch" and "Storage" in name:
            return _StorageType(name)
        return _resolve(module, name)

    def persistent_load(self, saved_id):
        if not (isinstance(saved_id, tuple) and saved_id
                and saved_id[0] in ("storage", b"storage")):
            raise fail(f"unexpected persistent id {saved_id!r}", self.records.path)
        storage_type, key, _location, numel = saved_id[1:]
        if isinstance(key, bytes):
            key = key.decode()
        dtype = storage_type.dtype if isinstance(storage_type, _StorageType) else \
            getattr(storage_type, "dtype", None)
        if dtype is None:
            import torch
            dtype = torch.uint8
        if key not in self.storages:
            self.storages[key] = _LazyStorage(self.records, key, dtype, int(numel))
        return self.storages[key]


def _load_old_format(path: Path):
    """Pre-1.6 (non-zip) torch files: torch.load(weights_only=True) inside safe_globals,
    extended from each "Unsupported global" refusal with the allowed real object or a stub
    (MEGATRON_FORMAT.md §7, method 2). The whole file is read into memory."""
    import re as _re
    import torch
    extra: list = []
    for _ in range(200):
        try:
            with torch.serialization.safe_globals(extra):
                return torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            m = (_re.search(r"GLOBAL ([\w.]+)\.(\w+)", str(e))
                 or _re.search(r"but got <class '([\w.]+)\.(\w+)'>", str(e)))
            if not m or any(o is _resolve(*m.groups()) for o in extra
                            if not isinstance(o, tuple)):
                raise
            module, name = m.groups()
            obj = _resolve(module, name)
            extra.append((obj, f"{module}.{name}") if isinstance(obj, type) and
                         issubclass(obj, Stub) else obj)
    raise fail("too many unsupported globals", path)


def _wrap_loaded(obj, path):
    import torch
    if isinstance(obj, torch.Tensor):
        return LoadedTensor(obj, path)
    if isinstance(obj, dict):
        return {k: _wrap_loaded(v, path) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_wrap_loaded(v, path) for v in obj]
    return obj


def open_torch_file(path: str | os.PathLike) -> Any:
    """Unpickle a torch.save file; tensors are LazyTensor (zip format) or LoadedTensor."""
    import torch
    path = Path(path)
    if not path.is_file():
        raise fail("file not found (missing rank file?)", path)
    if path.stat().st_size == 0:
        raise fail("empty file (truncated?)", path)
    with open(path, "rb") as f:
        is_zip = f.read(4) == b"PK\x03\x04"
    if not is_zip:
        warnings.warn(f"{path}: old (pre-1.6) torch format, loaded whole into memory")
        try:
            obj = _load_old_format(path)
        except MegatronConversionError:
            raise
        except Exception as e:
            raise fail(f"cannot read torch file ({type(e).__name__}: {e}); truncated or corrupt?",
                       path) from None
        return _wrap_loaded(obj, path)
    try:
        reader = torch._C.PyTorchFileReader(str(path))
    except Exception as e:
        raise fail(f"not a readable torch zip file ({str(e).splitlines()[0]}); truncated or "
                   "corrupt?", path) from None
    records = _ZipRecords(path, reader)
    try:
        data = reader.get_record("data.pkl")
        obj = _LazyUnpickler(io.BytesIO(data), records).load()
    except MegatronConversionError:
        raise
    except Exception as e:
        raise fail(f"cannot unpickle ({type(e).__name__}: {e}); truncated or corrupt?",
                   path) from None
    return obj


# ---- torch_dist (PyTorch DCP) -----------------------------------------------------------------
class DistCheckpoint:
    """A DCP directory: tensor keys with global shapes; read a key or one leading-axis slice."""

    def __init__(self, directory: str | os.PathLike):
        from torch.distributed.checkpoint import FileSystemReader
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata
        self.dir = Path(directory)
        if not (self.dir / ".metadata").is_file():
            raise fail("no .metadata file: not a torch_dist / DCP checkpoint", self.dir)
        try:
            self.metadata = FileSystemReader(str(self.dir)).read_metadata()
        except Exception as e:
            raise fail(f"cannot read DCP metadata ({type(e).__name__}: {e})",
                       self.dir / ".metadata") from None
        self.tensors: dict[str, Any] = {}
        self.objects: list[str] = []
        for k, m in self.metadata.state_dict_metadata.items():
            if isinstance(m, TensorStorageMetadata):
                self.tensors[k] = m
            else:
                self.objects.append(k)
        self._reader = None
        self._cache = None

    def close(self) -> None:
        self._cache = None

    def shape(self, key) -> tuple[int, ...]:
        return tuple(self.tensors[key].size)

    def dtype(self, key) -> np.dtype:
        return torch_to_numpy_dtype(self.tensors[key].properties.dtype)

    def spans_layers(self, key: str) -> bool:
        """Whether some saved chunk of this stacked tensor covers more than one layer."""
        return any(c.sizes[0] > 1 for c in self.tensors[key].chunks)

    def read(self, key: str, index: int | None = None) -> np.ndarray:
        """The global tensor `key`, or its slice [index] along the leading (layer) axis.

        DCP reads whole saved chunks, so when the chunks holding layer `index` span several
        layers (a stacked tensor saved as one piece), their layers are read together once and
        kept until another key is asked for: callers go key by key (layer_major = False).
        """
        if index is None:
            return self._read_box(key, None)
        chunks = [c for c in self.tensors[key].chunks
                  if c.offsets[0] <= index < c.offsets[0] + c.sizes[0]]
        if not chunks:
            raise fail(f"no saved chunk holds layer {index}", self.dir, key)
        lo = min(c.offsets[0] for c in chunks)
        hi = max(c.offsets[0] + c.sizes[0] for c in chunks)
        if hi - lo == 1:
            return self._read_box(key, (index, index + 1))[0]
        cached = self._cache
        if cached is None or cached[0] != key or not cached[1] <= index < cached[2]:
            self._cache = None  # free the previous block before reading the next
            self._cache = (key, lo, hi, self._read_box(key, (lo, hi)))
        _, lo, _, block = self._cache
        return block[index - lo]

    def _read_box(self, key: str, rows: tuple[int, int] | None) -> np.ndarray:
        import torch
        import torch.distributed.checkpoint as dcp
        md = self.tensors[key]
        size = list(md.size)
        offsets = [0] * len(size)
        if rows is not None:
            offsets[0], size[0] = rows[0], rows[1] - rows[0]
        dest = torch.empty(size, dtype=md.properties.dtype)
        planner = _SlicePlanner({key: (offsets, size)})
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                dcp.load({key: dest}, storage_reader=self._storage_reader(), planner=planner)
        except Exception as e:
            raise fail(f"cannot read tensor ({type(e).__name__}: {str(e)[:500]}); a .distcp "
                       "file is missing, truncated or corrupt?", self.dir, key) from None
        return LoadedTensor(dest, self.dir).numpy(copy=False)

    def _storage_reader(self):
        from torch.distributed.checkpoint import FileSystemReader
        if self._reader is None:
            md = self.metadata

            class _Reader(FileSystemReader):  # parse .metadata once, not per read
                def read_metadata(self):
                    return md

            self._reader = _Reader(str(self.dir))
        return self._reader


def _slice_planner_cls():
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata
    from torch.distributed.checkpoint.planner import LoadPlan
    from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list
    import torch

    class SlicePlanner(DefaultLoadPlanner):
        """Loads the box `offsets`/`sizes` of each requested key into a tensor of `sizes`."""

        def __init__(self, requests):
            super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
            self.requests = requests

        def create_local_plan(self):
            items = []
            for fqn, (offsets, sizes) in self.requests.items():
                md = self.metadata.state_dict_metadata[fqn]
                chunk = ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=torch.Size(sizes))
                items += create_read_items_for_chunk_list(fqn, md, [chunk])
            return LoadPlan(items)

        def lookup_tensor(self, index):
            return self.state_dict[index.fqn]

    return SlicePlanner


class _SlicePlanner:
    def __new__(cls, requests):
        return _slice_planner_cls()(requests)
