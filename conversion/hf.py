"""Hugging Face GPT-2 / LLaMA(-style) / BERT directories -> jaxformer checkpoints.

    python -m conversion.hf --input hf/gpt2 --output ckpt/gpt2 [--dtype bfloat16] [--overwrite]
                            [--quantize int8|int4|int4-g<N>|fp8|fp8-tensor]

Table-driven: every family is a list of `Row`s (source-key regex, target path, transform,
optional slot inside the target), in conversion/hf_tables.py. Tensors stream one at a time
from safetensors (`safe_open`) or pytorch_model.bin (`torch.load(mmap=True)`) into
disk-backed `CheckpointWriter` buffers, one layer slice at a time, so host memory stays near
one tensor. Output is staged and renamed by CheckpointWriter: a failed conversion leaves
nothing that looks like a checkpoint. Shape legend: hf_tables' docstring, with L layers.
"""
from __future__ import annotations

import argparse
import json
import logging
import re
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from conversion import error_line
from conversion.hf_tables import FAMILIES, ShapeError
from jaxformer.checkpoint import CheckpointWriter
from jaxformer.config import DTYPES, ModelConfig
from jaxformer.hf_config import from_hf_config
from jaxformer.sentence import from_sentence_transformers

log = logging.getLogger(__name__)

try:  # torch reads bfloat16 safetensors and pytorch_model.bin; without it numpy reads safetensors
    import torch  # noqa: F401
    _HAVE_TORCH = True
except ImportError:  # pragma: no cover
    _HAVE_TORCH = False


class ConversionError(ValueError):
    """The input directory cannot be converted; the message names the file and the key."""


# ---- reading Hugging Face directories, one tensor at a time -------------------------------
class Source:
    """The weight files of a Hugging Face model directory; `read` loads one tensor."""

    def __init__(self, directory: Path):
        self.directory = directory
        files = self._files()
        self.keys: list[tuple[Path, str]] = []
        self._open: dict[Path, object] = {}
        for f in files:
            for k in self._handle(f).keys():
                self.keys.append((f, k))

    def _files(self) -> list[Path]:
        d = self.directory
        for index, single in (("model.safetensors.index.json", "model.safetensors"),
                              ("pytorch_model.bin.index.json", "pytorch_model.bin")):
            if (d / index).is_file():
                try:
                    weight_map = json.loads((d / index).read_text())["weight_map"]
                except (ValueError, KeyError) as e:
                    raise ConversionError(f"{d / index}: not a valid shard index ({e})") from None
                files = sorted(set(weight_map.values()))
                missing = [f for f in files if not (d / f).is_file()]
                if missing:
                    raise ConversionError(f"{d / index} names missing shard files {missing}")
                return [d / f for f in files]
            if (d / single).is_file():
                return [d / single]
        raise ConversionError(f"no weights in {d}: looked for model.safetensors(.index.json) "
                              f"and pytorch_model.bin(.index.json)")

    def _handle(self, f: Path):
        if f not in self._open:
            try:
                if f.suffix == ".safetensors":
                    from safetensors import safe_open
                    self._open[f] = safe_open(str(f), framework="pt" if _HAVE_TORCH else "np")
                else:
                    import torch
                    self._open[f] = torch.load(f, map_location="cpu", mmap=True,
                                               weights_only=True)
            except Exception as e:  # noqa: BLE001  (each library raises its own types)
                raise ConversionError(f"{f}: cannot read weights: {e}") from None
        return self._open[f]

    def read(self, f: Path, key: str) -> np.ndarray:
        """One tensor as a numpy array (floating point upcast to float32: exact)."""
        h = self._handle(f)
        if f.suffix == ".safetensors" and not _HAVE_TORCH:
            if h.get_slice(key).get_dtype() == "BF16":  # numpy has no bfloat16 of its own
                return _read_bf16_safetensors(f, key)
            x = h.get_tensor(key)
            return x.astype(np.float32) if np.issubdtype(x.dtype, np.floating) else x
        t = h.get_tensor(key) if f.suffix == ".safetensors" else h[key]
        return t.float().numpy() if t.is_floating_point() else t.numpy()


def _read_bf16_safetensors(f: Path, key: str) -> np.ndarray:
    """A BF16 tensor straight from the file layout (8-byte header size, JSON header, data)."""
    import ml_dtypes
    with open(f, "rb") as fh:
        n = int.from_bytes(fh.read(8), "little")
        info = json.loads(fh.read(n))[key]
    start, end = info["data_offsets"]
    data = np.memmap(f, dtype=np.uint8, mode="r", offset=8 + n + start, shape=(end - start,))
    return data.view(ml_dtypes.bfloat16).reshape(info["shape"]).astype(np.float32)


def progress_bar(items, **kw):
    """tqdm(items, **kw), or items without tqdm (shared with conversion.gguf)."""
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        return items
    return tqdm(items, **kw)


def _copy_tokenizer_files(src: Path):
    """Fallback when jaxformer.tokenizer is absent: copy the known files verbatim."""
    names = ("tokenizer.json", "tokenizer.model", "vocab.json", "merges.txt", "vocab.txt",
             "tokenizer_config.json", "special_tokens_map.json")
    present = [n for n in names if (src / n).is_file()]
    if not present:
        return None

    class _Files:
        def save(self, directory):
            Path(directory).mkdir(parents=True, exist_ok=True)
            for n in present:
                shutil.copy2(src / n, Path(directory) / n)

    return _Files()


def _tokenizer(src: Path):
    try:
        from jaxformer.tokenizer import load_tokenizer
    except ImportError:
        return _copy_tokenizer_files(src)
    try:
        return load_tokenizer(src)
    except FileNotFoundError:
        return None  # a weights-only directory: convert without a tokenizer


# ---- conversion ---------------------------------------------------------------------------
def flat_shapes(tree, prefix="") -> dict[str, tuple[int, ...]]:
    """A nested params tree -> {"a/b/c": shape} (the checkpoint's keys)."""
    out = {}
    for k, v in tree.items():
        p = f"{prefix}/{k}" if prefix else k
        out.update(flat_shapes(v, p) if isinstance(v, dict) else {p: tuple(v.shape)})
    return out


def numpy_dtype(name: str) -> np.dtype:
    """A stored dtype's name (float32, bfloat16, float16) -> its numpy dtype."""
    if name == "bfloat16":
        import ml_dtypes
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def _read_hf_config(directory: Path) -> dict:
    path = directory / "config.json"
    if not path.is_file():
        raise ConversionError(f"{directory} has no config.json (is it a Hugging Face model?)")
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise ConversionError(f"{path}: not valid JSON: {e}") from None


def check_complete(src_dir, expected, required, written, zero_ok) -> None:
    """Every slot of every layer of every target written (zero_ok targets may be absent)."""
    missing = []
    for target, marks in required.items():
        have = {(i, s) for t, i, s in written if t == target}
        if target in zero_ok and not have:
            continue
        lost = sorted(marks - have, key=str)
        if lost:
            more = " ..." if len(lost) > 4 else ""
            missing.append(f"{target} (layer, slot) {lost[:4]}{more}")
    unfed = sorted(set(expected) - set(required))
    if missing or unfed:
        raise ConversionError(f"{src_dir}: weights missing for {missing + unfed}")


def convert(input_dir, output_dir, *, dtype: str | None = None, overwrite: bool = False,
            progress: bool | None = None, quantize: str | None = None,
            calibration=None) -> ModelConfig:
    """Convert a Hugging Face model directory to a jaxformer checkpoint; returns its config.

    dtype: stored dtype of every tensor (None: the config's `torch_dtype` if float32 /
    bfloat16 / float16, else float32). Raises ConversionError naming the file and key.
    quantize (RunConfig.quantize): write a quantized checkpoint; the float one is staged
    beside the output and quantized on this host's CPU (jaxformer.quant.convert), FP8 scales
    calibrated on `calibration` prompts (default: jaxformer.quant.calibrate's).
    """
    from jaxformer.models import abstract_params
    from jaxformer.quant.spec import name
    quantize = name(quantize, "quantize")

    src_dir, t0 = Path(input_dir), time.perf_counter()
    if not src_dir.is_dir():
        raise ConversionError(f"input directory {src_dir} does not exist")
    hf = _read_hf_config(src_dir)
    model_type = hf.get("model_type")
    if model_type not in FAMILIES:
        raise ConversionError(f"{src_dir / 'config.json'}: unsupported model_type "
                              f"{model_type!r}; supported: {sorted(FAMILIES)}")
    try:
        cfg = from_hf_config(hf).replace(name=src_dir.resolve().name)
    except ValueError as e:
        raise ConversionError(f"{src_dir / 'config.json'}: {e}") from None
    except KeyError as e:  # a field the family's config must have
        raise ConversionError(f"{src_dir / 'config.json'}: a {model_type} config needs "
                              f"{e.args[0]!r}, which it lacks") from None
    dtype = dtype or hf.get("torch_dtype") or hf.get("dtype") or "float32"
    if dtype not in DTYPES:
        dtype = "float32"
    if quantize is not None:
        from jaxformer.quant.convert import quantize_checkpoint, staged_float
        with staged_float(output_dir, overwrite) as tmp:
            cfg = convert(src_dir, tmp, dtype=dtype, progress=progress)
            quantize_checkpoint(tmp, output_dir, quantize, dtype=dtype, overwrite=overwrite,
                                calibration=calibration)
        print(f"quantized {output_dir} to {quantize}")
        return cfg
    fam = FAMILIES[model_type]
    source = Source(src_dir)

    def strip(key: str) -> str:
        return key[len(fam.prefix):] if key.startswith(fam.prefix) else key

    if cfg.arch == "encoder":  # heads are whatever the checkpoint holds
        names = [strip(k) for _, k in source.keys]
        has = lambda p: any(n.startswith(p) for n in names)  # noqa: E731
        try:
            cfg = cfg.replace(pooler=has("pooler."), mlm_head=has("cls.predictions."),
                              binary_head=has("cls.seq_relationship."))
        except ValueError as e:  # e.g. a next-sentence head without the pooler it reads
            raise ConversionError(f"{src_dir}: unusable set of heads: {e}") from None
    expected = flat_shapes(abstract_params(cfg))
    L, np_dtype = cfg.num_layers, numpy_dtype(dtype)
    ignore = [re.compile(p) for p in fam.ignore]
    tied = [re.compile(p) for p in fam.tied_aliases] if cfg.tie_embeddings else []
    rows = [(r, r.regex) for r in fam.rows]
    required: dict[str, set] = {}
    for r in fam.rows:
        if r.target in expected:
            layers = range(L) if r.target.startswith("layers/") else (None,)
            slots = [r.slot_name]
            if r.per_expert:  # one key per expert (mixtures of experts): every expert's
                slots = [f"{r.slot_name}#{e}" for e in range(cfg.num_experts)]
            required.setdefault(r.target, set()).update((i, s) for i in layers for s in slots)

    tokenizer = _tokenizer(src_dir)
    sentence = None
    if cfg.arch == "encoder":  # a sentence-transformers model: keep its pooling config
        try:
            sentence = from_sentence_transformers(src_dir)
        except ValueError as e:
            raise ConversionError(str(e)) from None
    written: set[tuple[str, int | None, str]] = set()
    with CheckpointWriter(Path(output_dir), cfg, overwrite=overwrite) as writer:
        bufs = {p: writer.allocate(p, shape, np_dtype) for p, shape in expected.items()}
        quiet = not sys.stderr.isatty() if progress is None else not progress
        for f, key in progress_bar(source.keys, desc=f"converting {src_dir.name}",
                                   unit="tensor", disable=quiet):
            k = strip(key)
            if any(p.fullmatch(k) for p in ignore + tied):
                continue
            match = next(((r, m) for r, rx in rows if (m := rx.fullmatch(k))), None)
            if match is None:
                raise ConversionError(f"{f}: unknown key {key!r} for a {model_type} model; "
                                      f"refusing to drop weights silently")
            row, m = match
            if row.target not in expected:
                raise ConversionError(f"{f}: key {key!r} maps to {row.target}, which this "
                                      f"config does not have (check config.json)")
            layer = int(m.group("layer")) if "layer" in m.groupdict() else None
            if layer is not None and not 0 <= layer < L:
                raise ConversionError(f"{f}: key {key!r}: layer {layer} is outside the "
                                      f"{L} layers config.json declares")
            expert = int(m.group("expert")) if "expert" in m.groupdict() else None
            if expert is not None and not 0 <= expert < cfg.num_experts:
                raise ConversionError(f"{f}: key {key!r}: expert {expert} is outside the "
                                      f"{cfg.num_experts} experts config.json declares")
            mark = (row.target, layer,
                    row.slot_name if expert is None else f"{row.slot_name}#{expert}")
            if mark in written:
                raise ConversionError(f"{f}: key {key!r} writes {row.target} a second time")
            try:
                value = row.transform(source.read(f, key), cfg)
            except ShapeError as e:
                raise ConversionError(f"{f}: key {key!r}: {e}") from None
            index = (() if layer is None else (layer,)) + (() if expert is None else (expert,)) \
                + (row.slot[1](cfg) if row.slot else ())
            dst = bufs[row.target]
            if dst[index].shape != value.shape:
                raise ConversionError(f"{f}: key {key!r}: shape {value.shape} after transform, "
                                      f"{row.target} expects {dst[index].shape}")
            dst[index] = value
            written.add(mark)
        check_complete(src_dir, expected, required, written, fam.zero_ok)
        for b in bufs.values():
            b.flush()
        if tokenizer is not None:
            writer.add_tokenizer(tokenizer)
        writer.add_sentence(sentence)
    n_params = sum(int(np.prod(s)) for s in expected.values())
    print(f"converted {src_dir} ({model_type}) -> {output_dir}: {n_params:,} params, "
          f"{n_params * np_dtype.itemsize / 1e6:,.1f} MB {dtype}, {len(source.keys)} tensors, "
          f"{time.perf_counter() - t0:.1f}s")
    return cfg


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m conversion.hf", description=__doc__.split("\n")[0])
    ap.add_argument("--input", required=True, help="Hugging Face model directory")
    ap.add_argument("--output", required=True, help="jaxformer checkpoint directory to write")
    ap.add_argument("--dtype", choices=DTYPES, default=None,
                    help="stored dtype (default: the model's torch_dtype, else float32)")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing output")
    ap.add_argument("--quantize", help="write quantized linear layers: int8 | int4 | "
                    "int4-g<N> | fp8 | fp8-tensor (docs/quantization.md)")
    args = ap.parse_args(argv)
    try:
        convert(args.input, args.output, dtype=args.dtype, overwrite=args.overwrite,
                quantize=args.quantize)
    except (ValueError, FileExistsError) as e:  # ConversionError, CheckpointError, quantize
        print(error_line(ap.prog, e), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
