"""GGUF files (llama.cpp) -> jaxformer checkpoints.

    python -m conversion.gguf --input model.gguf --output ckpt/model [--dtype bfloat16]
                              [--quantize int8|int4|int4-g<N>] [--overwrite]

Read through the `gguf` package (llama.cpp's own reader, memory-mapped): every tensor is
dequantized to float32 with `gguf.quants.dequantize` (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0,
Q5_1, Q4_K, Q5_K, Q6_K), renamed to its Hugging Face key, and written through conversion.hf's
tables and CheckpointWriter, one tensor at a time into disk-backed buffers staged beside the
output and renamed at the end. `--quantize` re-quantizes the float result into jaxformer's
INT8 / INT4 layout (jaxformer.quant.convert), as conversion.hf does.

Architectures: llama (and mistral files, which llama.cpp writes as llama) and qwen2. llama.cpp
permutes the rows of a llama model's Q and K projections so that its rope rotates adjacent
pairs (GPT-J style); they are permuted back to Hugging Face's half-split layout here, so the
checkpoint equals the one conversion.hf writes from the original model. qwen2 is stored with
NeoX-style rope and is not permuted.

The tokenizer is rebuilt from the file's vocabulary and merges (conversion/gguf_tokenizer.py),
with its chat template. Shape legend: conversion/hf_tables.py (D, N, K, H, F, V, L).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import gguf
import numpy as np

from conversion.gguf_tokenizer import tokenizer_from_gguf
from conversion.hf import (ConversionError, check_complete, flat_shapes, numpy_dtype, progress_bar)
from conversion.hf_tables import FAMILIES, ShapeError
from jaxformer.checkpoint import CheckpointWriter
from jaxformer.config import DTYPES, ModelConfig
from jaxformer.hf_config import from_hf_config
from jaxformer.models import abstract_params
from jaxformer.quant.spec import name as quant_name

Q = gguf.GGMLQuantizationType
# Types dequantized here: the ones llama.cpp's common quantizations (Q4_K_M, Q5_K_M, Q8_0, ...)
# are made of. Others gguf can read (IQ*, Q2_K, Q3_K, TQ*) are refused until tested.
SUPPORTED_TYPES = (Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1,
                   Q.Q4_K, Q.Q5_K, Q.Q6_K)
# GGUF `general.architecture` -> (Hugging Face model_type, rows of Q and K permuted by llama.cpp)
ARCHITECTURES = {"llama": ("llama", True), "qwen2": ("qwen2", False)}

# GGUF tensor name -> Hugging Face key (conversion.hf's tables, backbone prefix stripped)
_GLOBAL_NAMES = {"token_embd.weight": "embed_tokens.weight", "output_norm.weight": "norm.weight",
                 "output.weight": "lm_head.weight"}
_BLOCK_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight", "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.weight": "self_attn.k_proj.weight", "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.weight": "self_attn.v_proj.weight", "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight", "attn_output.bias": "self_attn.o_proj.bias",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight", "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
# Tensors that change the numerics in ways jaxformer does not implement: refused by name.
_REFUSED = {"rope_freqs.weight": "per-frequency rope factors (Llama 3.1-style rope scaling)"}


class GGUFSource:
    """One GGUF file: its metadata fields and its tensors, read one at a time."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise ConversionError(f"GGUF file {self.path} does not exist")
        try:
            self.reader = gguf.GGUFReader(self.path)
        except Exception as e:  # noqa: BLE001  (the reader raises ValueError, struct.error, ...)
            raise ConversionError(f"{self.path}: not a readable GGUF file: {e}") from None
        self.tensors = {t.name: t for t in self.reader.tensors}

    def field(self, key: str, default=None):
        f = self.reader.fields.get(key)
        return default if f is None else f.contents()

    def require(self, key: str):
        value = self.field(key)
        if value is None:
            raise ConversionError(f"{self.path}: metadata field {key!r} is missing")
        return value

    @property
    def architecture(self) -> str:
        return self.require("general.architecture")

    def read(self, name: str) -> np.ndarray:
        """One tensor dequantized to float32, in numpy order (GGUF lists dims reversed)."""
        t = self.tensors[name]
        if t.tensor_type not in SUPPORTED_TYPES:
            raise ConversionError(
                f"{self.path}: tensor {name!r} has type {t.tensor_type.name}; supported: "
                f"{[q.name for q in SUPPORTED_TYPES]}")
        x = gguf.quants.dequantize(t.data, t.tensor_type)
        return np.asarray(x, dtype=np.float32).reshape(tuple(int(d) for d in t.shape[::-1]))


def hf_config(src: GGUFSource) -> dict:
    """The Hugging Face config.json the file's `<arch>.*` metadata describes."""
    arch = src.architecture
    if arch not in ARCHITECTURES:
        raise ConversionError(f"{src.path}: general.architecture {arch!r} is not supported; "
                              f"supported: {sorted(ARCHITECTURES)}")
    a = lambda key, default=None: src.field(f"{arch}.{key}", default)  # noqa: E731
    need = lambda key: src.require(f"{arch}.{key}")  # noqa: E731
    D, N = int(need("embedding_length")), int(need("attention.head_count"))
    K = int(a("attention.head_count_kv", N))
    H = int(a("attention.key_length", D // N))
    if int(a("attention.value_length", H)) != H:
        raise ConversionError(f"{src.path}: {arch}.attention.value_length differs from "
                              f"key_length ({H}); not supported")
    rot = int(a("rope.dimension_count", H))
    tokens = src.field("tokenizer.ggml.tokens")
    vocab = a("vocab_size")
    if vocab is None:
        vocab = len(tokens) if tokens is not None else src.tensors["token_embd.weight"].shape[1]
    d = {
        "model_type": ARCHITECTURES[arch][0],
        "_name_or_path": src.path.stem,
        "vocab_size": int(vocab),
        "hidden_size": D,
        "num_hidden_layers": int(need("block_count")),
        "num_attention_heads": N,
        "num_key_value_heads": K,
        "head_dim": H,
        "intermediate_size": int(need("feed_forward_length")),
        "max_position_embeddings": int(need("context_length")),
        "rope_theta": float(a("rope.freq_base", 10000.0)),
        "rms_norm_eps": float(a("attention.layer_norm_rms_epsilon", 1e-6)),
        "hidden_act": "silu",
        "tie_word_embeddings": "output.weight" not in src.tensors,
        "attention_bias": "blk.0.attn_output.bias" in src.tensors,
        "mlp_bias": "blk.0.ffn_down.bias" in src.tensors,
        "partial_rotary_factor": rot / H,
    }
    scaling = a("rope.scaling.type")
    if scaling not in (None, "none"):  # from_hf_config decides whether it implements it
        d["rope_scaling"] = {"rope_type": scaling, "factor": a("rope.scaling.factor"),
                             "original_max_position_embeddings":
                                 a("rope.scaling.original_context_length")}
    for name, what in _REFUSED.items():
        if name in src.tensors:
            raise ConversionError(f"{src.path}: tensor {name!r} holds {what}, which jaxformer "
                                  f"does not implement; refusing a model that would compute "
                                  f"something else")
    if int(a("expert_count", 0) or 0) > 0:
        raise ConversionError(f"{src.path}: {arch}.expert_count = {a('expert_count')}: "
                              f"mixture-of-experts models are not supported")
    for key, field in (("bos", "bos_token_id"), ("eos", "eos_token_id"),
                       ("pad", "padding_token_id")):
        v = src.field(f"tokenizer.ggml.{field}")
        if v is not None:
            d[f"{key}_token_id"] = int(v)
    # ModelConfig.bos_token_id means "string prompts start with bos" (generate): only where
    # llama.cpp adds it: the file's flag (SmolLM2: false), else true for a SentencePiece
    # vocabulary and false for a byte-level one (as transformers' GGUF tokenizer decides)
    spm = src.field("tokenizer.ggml.model") == "llama"
    if not src.field("tokenizer.ggml.add_bos_token", spm):
        d.pop("bos_token_id", None)
    return d


def unpermute_rope_rows(x: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's convert_hf_to_gguf `permute` of Q / K rows ([heads*H, ...]).

    llama.cpp reorders each head's rows from Hugging Face's halves (0..H/2-1 | H/2..H-1) to
    interleaved pairs, so its GPT-J-style rope rotates the same pairs; this is the inverse.
    """
    half = x.shape[0] // heads // 2
    return x.reshape(heads, half, 2, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape)


def hf_key(name: str) -> str:
    """GGUF tensor name -> Hugging Face key without the `model.` prefix ("": unknown)."""
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    parts = name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _BLOCK_NAMES:
        return f"layers.{parts[1]}.{_BLOCK_NAMES[parts[2]]}"
    return ""


def read_config(src: GGUFSource) -> tuple[dict, ModelConfig]:
    hf = hf_config(src)
    try:
        cfg = from_hf_config(hf)
    except ValueError as e:
        raise ConversionError(f"{src.path}: {e}") from None
    return hf, cfg.replace(name=src.path.stem)


def convert(input_file, output_dir, *, dtype: str = "float32", overwrite: bool = False,
            progress: bool | None = None, quantize: str | None = None,
            calibration=None) -> ModelConfig:
    """Convert a GGUF file to a jaxformer checkpoint; returns its config.

    dtype: stored dtype of the float tensors (float32 keeps the dequantized values exactly).
    quantize (RunConfig.quantize): store the linear layers quantized, as conversion.hf does.
    Raises ConversionError naming the file and the field or tensor at fault.
    """
    quantize = quant_name(quantize, "quantize")
    if dtype not in DTYPES:
        raise ConversionError(f"dtype {dtype!r} is not one of {list(DTYPES)}")
    src, t0 = GGUFSource(input_file), time.perf_counter()
    hf, cfg = read_config(src)
    if quantize is not None:
        from jaxformer.quant.convert import quantize_checkpoint, staged_float
        with staged_float(output_dir, overwrite) as tmp:
            cfg = convert(src.path, tmp, dtype=dtype, progress=progress)
            quantize_checkpoint(tmp, output_dir, quantize, dtype=dtype, overwrite=overwrite,
                                calibration=calibration)
        print(f"quantized {output_dir} to {quantize}")
        return cfg
    fam = FAMILIES[hf["model_type"]]
    permuted = ARCHITECTURES[src.architecture][1]
    N, K, L = cfg.num_heads, cfg.kv_heads, cfg.num_layers
    tokenizer = tokenizer_from_gguf(src)
    expected = flat_shapes(abstract_params(cfg))
    rows = [(r, r.regex) for r in fam.rows]
    required: dict[str, set] = {}
    for r in fam.rows:
        if r.target in expected:
            layers = range(L) if r.target.startswith("layers/") else (None,)
            required.setdefault(r.target, set()).update((i, r.slot_name) for i in layers)
    np_dtype, written = numpy_dtype(dtype), set()
    with CheckpointWriter(Path(output_dir), cfg, overwrite=overwrite) as writer:
        bufs = {p: writer.allocate(p, shape, np_dtype) for p, shape in expected.items()}
        quiet = not sys.stderr.isatty() if progress is None else not progress
        for name in progress_bar(list(src.tensors), desc=f"converting {src.path.name}",
                                 unit="tensor", disable=quiet):
            key = hf_key(name)
            match = next(((r, m) for r, rx in rows if key and (m := rx.fullmatch(key))), None)
            if match is None:
                raise ConversionError(f"{src.path}: unknown tensor {name!r} for a "
                                      f"{src.architecture} model; refusing to drop weights")
            row, m = match
            layer = int(m.group("layer")) if "layer" in m.groupdict() else None
            if layer is not None and not 0 <= layer < L:
                raise ConversionError(f"{src.path}: tensor {name!r}: layer {layer} is outside "
                                      f"the {L} layers of {src.architecture}.block_count")
            x = src.read(name)
            if permuted and ".attn_q." in name:
                x = unpermute_rope_rows(x, N)
            elif permuted and ".attn_k." in name:
                x = unpermute_rope_rows(x, K)
            try:
                value = row.transform(x, cfg)
            except ShapeError as e:
                raise ConversionError(f"{src.path}: tensor {name!r}: {e}") from None
            index = (() if layer is None else (layer,)) + (row.slot[1](cfg) if row.slot else ())
            bufs[row.target][index] = value
            written.add((row.target, layer, row.slot_name))
        check_complete(src.path, expected, required, written, fam.zero_ok)
        for b in bufs.values():
            b.flush()
        if tokenizer is not None:
            writer.add_tokenizer(tokenizer)
    n_params = sum(int(np.prod(s)) for s in expected.values())
    print(f"converted {src.path} ({src.architecture}) -> {output_dir}: {n_params:,} params, "
          f"{dtype}, {len(src.tensors)} tensors, {time.perf_counter() - t0:.1f}s")
    return cfg


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m conversion.gguf",
                                 description=__doc__.split("\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--input", required=True, help="GGUF file")
    ap.add_argument("--output", required=True, help="jaxformer checkpoint directory to write")
    ap.add_argument("--dtype", choices=DTYPES, default="float32",
                    help="stored dtype of the dequantized weights")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing output")
    ap.add_argument("--quantize", help="store the linear layers quantized: int8 | int4 | "
                    "int4-g<N> (docs/quantization.md)")
    args = ap.parse_args(argv)
    try:
        convert(args.input, args.output, dtype=args.dtype, overwrite=args.overwrite,
                quantize=args.quantize)
    except (ValueError, FileExistsError) as e:  # ConversionError, CheckpointError, quantize
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
