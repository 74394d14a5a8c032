"""Hugging Face GPT-2 / LLaMA(-style) / BERT directories -> jaxformer checkpoints.

    python -m conversion.hf --input hf/gpt2 --output ckpt/gpt2 [--dtype bfloat16] [--overwrite]
                            [--quantize int8|int4|int4-g<N>|fp8|fp8-tensor]

Table-driven: every family is a list of `Row`s (source-key regex, target path, transform,
optional slot inside the target). Tensors stream one at a time from safetensors (`safe_open`)
or pytorch_model.bin (`torch.load(mmap=True)`) into disk-backed `CheckpointWriter` buffers,
one layer slice at a time, so host memory stays near one tensor. Output is staged and renamed
by CheckpointWriter: a failed conversion leaves nothing that looks like a checkpoint.

Shape legend: L layers, D hidden, N heads, K kv heads, G = N // K, H head dim, F ffn,
V vocab, Vp padded vocab, P positions, Tt token types. Torch `nn.Linear` weights are
[out, in]; GPT-2's Conv1D weights are already [in, out]; jaxformer stores [in, out].
"""
from __future__ import annotations

import argparse
import json
import logging
import re
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from jaxformer.checkpoint import CheckpointWriter
from jaxformer.config import DTYPES, ModelConfig
from jaxformer.hf_config import from_hf_config

log = logging.getLogger(__name__)

try:  # torch reads bfloat16 safetensors and pytorch_model.bin; without it numpy reads safetensors
    import torch  # noqa: F401
    _HAVE_TORCH = True
except ImportError:  # pragma: no cover
    _HAVE_TORCH = False


class ConversionError(ValueError):
    """The input directory cannot be converted; the message names the file and the key."""


class ShapeError(ValueError):
    pass


# ---- transforms: each asserts the source shape, returns the target (slice) -------------------
Transform = Callable[[np.ndarray, ModelConfig], np.ndarray]


def _expect(x: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    if tuple(x.shape) != tuple(shape):
        raise ShapeError(f"shape {tuple(x.shape)}, but config.json implies {tuple(shape)}")
    return x


def _pad_rows(x, c: ModelConfig):  # [V, ...] -> [Vp, ...], zero rows past the vocabulary
    return np.pad(x, [(0, c.padded_vocab_size - c.vocab_size)] + [(0, 0)] * (x.ndim - 1))


def vec(size: Callable[[ModelConfig], int]) -> Transform:
    return lambda x, c: _expect(x, (size(c),))


def table(rows: Callable[[ModelConfig], int]) -> Transform:  # [R, D]
    return lambda x, c: _expect(x, (rows(c), c.hidden_size))


def conv1d(n_in, n_out) -> Transform:  # GPT-2 Conv1D [in, out]: already jaxformer's layout
    return lambda x, c: _expect(x, (n_in(c), n_out(c)))


def linear(n_in, n_out) -> Transform:  # nn.Linear [out, in] -> [in, out]
    return lambda x, c: _expect(x, (n_out(c), n_in(c))).T


def token_embedding(x, c):  # [V, D] -> [Vp, D]
    return _pad_rows(_expect(x, (c.vocab_size, c.hidden_size)), c)


def lm_head(x, c):  # nn.Linear [V, D] -> [D, Vp]
    return _pad_rows(_expect(x, (c.vocab_size, c.hidden_size)), c).T


def vocab_bias(x, c):  # [V] -> [Vp]
    return _pad_rows(_expect(x, (c.vocab_size,)), c)


def gpt2_qkv_kernel(x, c):  # Conv1D [D, 3*N*H] (q | k | v, head-major) -> [D, N, 3, H]
    D, N, H = c.hidden_size, c.num_heads, c.dims_per_head
    return _expect(x, (D, 3 * N * H)).reshape(D, 3, N, H).transpose(0, 2, 1, 3)


def gpt2_qkv_bias(x, c):  # [3*N*H] -> [N, 3, H]
    N, H = c.num_heads, c.dims_per_head
    return _expect(x, (3 * N * H,)).reshape(3, N, H).transpose(1, 0, 2)


def out_conv1d(x, c):  # Conv1D [N*H, D] -> [N, H, D]
    N, H, D = c.num_heads, c.dims_per_head, c.hidden_size
    return _expect(x, (N * H, D)).reshape(N, H, D)


def out_linear(x, c):  # nn.Linear [D, N*H] -> [N, H, D]
    N, H, D = c.num_heads, c.dims_per_head, c.hidden_size
    return _expect(x, (D, N * H)).T.reshape(N, H, D)


def q_kernel(x, c):  # nn.Linear [N*H, D] -> [D, K, G, H] (query head n = k*G + g)
    D, K, G, H = c.hidden_size, c.kv_heads, c.q_per_kv, c.dims_per_head
    return _expect(x, (K * G * H, D)).T.reshape(D, K, G, H)


def kv_kernel(x, c):  # nn.Linear [K*H, D] -> [D, K, H]
    D, K, H = c.hidden_size, c.kv_heads, c.dims_per_head
    return _expect(x, (K * H, D)).T.reshape(D, K, H)


def q_bias(x, c):  # [N*H] -> [K, G, H]
    K, G, H = c.kv_heads, c.q_per_kv, c.dims_per_head
    return _expect(x, (K * G * H,)).reshape(K, G, H)


def kv_bias(x, c):  # [K*H] -> [K, H]
    return _expect(x, (c.kv_heads * c.dims_per_head,)).reshape(c.kv_heads, c.dims_per_head)


_D = lambda c: c.hidden_size  # noqa: E731
_F = lambda c: c.mlp_size  # noqa: E731
_P = lambda c: c.max_position_embeddings  # noqa: E731
_TT = lambda c: c.type_vocab_size  # noqa: E731
_TWO = lambda c: 2  # noqa: E731

# Slots inside one layer's target (the leading L index is added by the converter).
Q = ("q", lambda c: np.s_[:, :, : c.q_per_kv])  # kernel [D, K, G+2, H]
K_ = ("k", lambda c: np.s_[:, :, c.q_per_kv])
V_ = ("v", lambda c: np.s_[:, :, c.q_per_kv + 1])
QB = ("q", lambda c: np.s_[:, : c.q_per_kv])  # bias [K, G+2, H]
KB = ("k", lambda c: np.s_[:, c.q_per_kv])
VB = ("v", lambda c: np.s_[:, c.q_per_kv + 1])
GATE = ("gate", lambda c: np.s_[:, 0])  # kernel [D, 2, F]
UP = ("up", lambda c: np.s_[:, 1])
GATE_B = ("gate", lambda c: np.s_[0])  # bias [2, F]
UP_B = ("up", lambda c: np.s_[1])


@dataclass(frozen=True)
class Row:
    """One table row: source keys matching `pattern` go to `target` via `transform`.

    `pattern` is a full-match regex over the key (backbone prefix stripped); `{L}` stands for
    the layer number. `slot` = (name, cfg -> index) writes a part of the target (fused QKV,
    fused gate/up); a target is complete when every slot of every layer has been written.
    """

    pattern: str
    target: str
    transform: Transform
    slot: tuple[str, Callable[[ModelConfig], tuple]] | None = None

    @property
    def regex(self) -> re.Pattern:
        return re.compile(self.pattern.replace("{L}", r"(?P<layer>\d+)"))

    @property
    def slot_name(self) -> str:
        return self.slot[0] if self.slot else ""


def _norm_rows(src: str, target: str, bias=True, aliases=("weight", "bias")) -> list[Row]:
    # old TF-converted BERT checkpoints call LayerNorm parameters gamma / beta
    w, b = aliases
    rows = [Row(rf"{src}\.(?:{w}|gamma)", f"{target}/scale", vec(_D))]
    if bias:
        rows.append(Row(rf"{src}\.(?:{b}|beta)", f"{target}/bias", vec(_D)))
    return rows


GPT2_ROWS = [
    Row(r"wte\.weight", "embed/token/embedding", token_embedding),
    Row(r"wpe\.weight", "embed/position/embedding", table(_P)),
    *_norm_rows(r"h\.{L}\.ln_1", "layers/attn_norm"),
    Row(r"h\.{L}\.attn\.c_attn\.weight", "layers/attn/qkv/kernel", gpt2_qkv_kernel),
    Row(r"h\.{L}\.attn\.c_attn\.bias", "layers/attn/qkv/bias", gpt2_qkv_bias),
    Row(r"h\.{L}\.attn\.c_proj\.weight", "layers/attn/out/kernel", out_conv1d),
    Row(r"h\.{L}\.attn\.c_proj\.bias", "layers/attn/out/bias", vec(_D)),
    *_norm_rows(r"h\.{L}\.ln_2", "layers/mlp_norm"),
    Row(r"h\.{L}\.mlp\.c_fc\.weight", "layers/mlp/wi/kernel", conv1d(_D, _F)),
    Row(r"h\.{L}\.mlp\.c_fc\.bias", "layers/mlp/wi/bias", vec(_F)),
    Row(r"h\.{L}\.mlp\.c_proj\.weight", "layers/mlp/wo/kernel", conv1d(_F, _D)),
    Row(r"h\.{L}\.mlp\.c_proj\.bias", "layers/mlp/wo/bias", vec(_D)),
    *_norm_rows(r"ln_f", "final_norm"),
    Row(r"lm_head\.weight", "lm_head/kernel", lm_head),
]

LLAMA_ROWS = [
    Row(r"embed_tokens\.weight", "embed/token/embedding", token_embedding),
    *_norm_rows(r"layers\.{L}\.input_layernorm", "layers/attn_norm", bias=False),
    Row(r"layers\.{L}\.self_attn\.q_proj\.weight", "layers/attn/qkv/kernel", q_kernel, Q),
    Row(r"layers\.{L}\.self_attn\.k_proj\.weight", "layers/attn/qkv/kernel", kv_kernel, K_),
    Row(r"layers\.{L}\.self_attn\.v_proj\.weight", "layers/attn/qkv/kernel", kv_kernel, V_),
    Row(r"layers\.{L}\.self_attn\.q_proj\.bias", "layers/attn/qkv/bias", q_bias, QB),
    Row(r"layers\.{L}\.self_attn\.k_proj\.bias", "layers/attn/qkv/bias", kv_bias, KB),
    Row(r"layers\.{L}\.self_attn\.v_proj\.bias", "layers/attn/qkv/bias", kv_bias, VB),
    Row(r"layers\.{L}\.self_attn\.o_proj\.weight", "layers/attn/out/kernel", out_linear),
    Row(r"layers\.{L}\.self_attn\.o_proj\.bias", "layers/attn/out/bias", vec(_D)),
    *_norm_rows(r"layers\.{L}\.post_attention_layernorm", "layers/mlp_norm", bias=False),
    Row(r"layers\.{L}\.mlp\.gate_proj\.weight", "layers/mlp/wi/kernel", linear(_D, _F), GATE),
    Row(r"layers\.{L}\.mlp\.up_proj\.weight", "layers/mlp/wi/kernel", linear(_D, _F), UP),
    Row(r"layers\.{L}\.mlp\.gate_proj\.bias", "layers/mlp/wi/bias", vec(_F), GATE_B),
    Row(r"layers\.{L}\.mlp\.up_proj\.bias", "layers/mlp/wi/bias", vec(_F), UP_B),
    Row(r"layers\.{L}\.mlp\.down_proj\.weight", "layers/mlp/wo/kernel", linear(_F, _D)),
    Row(r"layers\.{L}\.mlp\.down_proj\.bias", "layers/mlp/wo/bias", vec(_D)),
    *_norm_rows(r"norm", "final_norm", bias=False),
    Row(r"lm_head\.weight", "lm_head/kernel", lm_head),
]


def _bert_rows(megatron: bool) -> list[Row]:
    layer = r"encoder\.layer\.{L}\."
    rows = [
        Row(r"embeddings\.word_embeddings\.weight", "embed/token/embedding", token_embedding),
        Row(r"embeddings\.position_embeddings\.weight", "embed/position/embedding", table(_P)),
        Row(r"embeddings\.token_type_embeddings\.weight", "embed/token_type/embedding",
            table(_TT)),
        Row(layer + r"attention\.self\.query\.weight", "layers/attn/qkv/kernel", q_kernel, Q),
        Row(layer + r"attention\.self\.key\.weight", "layers/attn/qkv/kernel", kv_kernel, K_),
        Row(layer + r"attention\.self\.value\.weight", "layers/attn/qkv/kernel", kv_kernel, V_),
        Row(layer + r"attention\.self\.query\.bias", "layers/attn/qkv/bias", q_bias, QB),
        Row(layer + r"attention\.self\.key\.bias", "layers/attn/qkv/bias", kv_bias, KB),
        Row(layer + r"attention\.self\.value\.bias", "layers/attn/qkv/bias", kv_bias, VB),
        Row(layer + r"attention\.output\.dense\.weight", "layers/attn/out/kernel", out_linear),
        Row(layer + r"attention\.output\.dense\.bias", "layers/attn/out/bias", vec(_D)),
        Row(layer + r"intermediate\.dense\.weight", "layers/mlp/wi/kernel", linear(_D, _F)),
        Row(layer + r"intermediate\.dense\.bias", "layers/mlp/wi/bias", vec(_F)),
        Row(layer + r"output\.dense\.weight", "layers/mlp/wo/kernel", linear(_F, _D)),
        Row(layer + r"output\.dense\.bias", "layers/mlp/wo/bias", vec(_D)),
        Row(r"pooler\.dense\.weight", "pooler/kernel", linear(_D, _D)),
        Row(r"pooler\.dense\.bias", "pooler/bias", vec(_D)),
        Row(r"cls\.predictions\.transform\.dense\.weight", "mlm/dense/kernel", linear(_D, _D)),
        Row(r"cls\.predictions\.transform\.dense\.bias", "mlm/dense/bias", vec(_D)),
        *_norm_rows(r"cls\.predictions\.transform\.LayerNorm", "mlm/norm"),
        Row(r"cls\.predictions\.bias", "mlm/bias", vocab_bias),
        Row(r"cls\.seq_relationship\.weight", "binary_head/kernel", linear(_D, _TWO)),
        Row(r"cls\.seq_relationship\.bias", "binary_head/bias", vec(_TWO)),
    ]
    if megatron:  # pre-LN: norm before each sublayer, a final norm, none on the embeddings
        rows += [*_norm_rows(layer + r"attention\.ln", "layers/attn_norm"),
                 *_norm_rows(layer + r"ln", "layers/mlp_norm"),
                 *_norm_rows(r"encoder\.ln", "final_norm")]
    else:  # post-LN: norm after each residual add, and on the embedding sum
        rows += [*_norm_rows(r"embeddings\.LayerNorm", "embed/norm"),
                 *_norm_rows(layer + r"attention\.output\.LayerNorm", "layers/attn_norm"),
                 *_norm_rows(layer + r"output\.LayerNorm", "layers/mlp_norm")]
    return rows


@dataclass(frozen=True)
class Family:
    prefix: str  # backbone prefix that task models add (GPT2LMHeadModel: "transformer.")
    rows: list[Row]
    ignore: tuple[str, ...] = ()  # buffers, not parameters
    tied_aliases: tuple[str, ...] = ()  # copies of the token table when embeddings are tied
    zero_ok: tuple[str, ...] = ()  # targets the source may lack; they stay zero


_LLAMA = Family("model.", LLAMA_ROWS, ignore=(r"(layers\.\d+\.self_attn\.)?rotary_emb\.inv_freq",),
                tied_aliases=(r"lm_head\.weight",),
                # LLaMA's attention_bias adds an o_proj bias without MLP biases (and mlp_bias
                # the reverse); linear_bias covers both, the absent ones are zeros.
                zero_ok=("layers/attn/out/bias", "layers/mlp/wi/bias", "layers/mlp/wo/bias"))
_BERT_IGNORE = (r"embeddings\.position_ids", r"embeddings\.token_type_ids")
_BERT_TIED = (r"cls\.predictions\.decoder\.weight", r"cls\.predictions\.decoder\.bias")
FAMILIES = {
    "gpt2": Family("transformer.", GPT2_ROWS,
                   ignore=(r"h\.\d+\.attn\.(bias|masked_bias)",),
                   tied_aliases=(r"lm_head\.weight",)),
    "llama": _LLAMA, "mistral": _LLAMA, "qwen2": _LLAMA,
    "bert": Family("bert.", _bert_rows(False), _BERT_IGNORE, _BERT_TIED),
    "megatron-bert": Family("bert.", _bert_rows(True), _BERT_IGNORE, _BERT_TIED),
}


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


def _progress(items, **kw):
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
def _flatten(tree, prefix="") -> dict[str, tuple[int, ...]]:
    out = {}
    for k, v in tree.items():
        p = f"{prefix}/{k}" if prefix else k
        out.update(_flatten(v, p) if isinstance(v, dict) else {p: tuple(v.shape)})
    return out


def _np_dtype(name: str):
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


def _check_complete(src_dir, expected, required, written, zero_ok) -> None:
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
    expected = _flatten(abstract_params(cfg))
    L, np_dtype = cfg.num_layers, _np_dtype(dtype)
    ignore = [re.compile(p) for p in fam.ignore]
    tied = [re.compile(p) for p in fam.tied_aliases] if cfg.tie_embeddings else []
    rows = [(r, r.regex) for r in fam.rows]
    required: dict[str, set] = {}
    for r in fam.rows:
        if r.target in expected:
            layers = range(L) if r.target.startswith("layers/") else (None,)
            required.setdefault(r.target, set()).update((i, r.slot_name) for i in layers)

    tokenizer = _tokenizer(src_dir)
    written: set[tuple[str, int | None, str]] = set()
    with CheckpointWriter(Path(output_dir), cfg, overwrite=overwrite) as writer:
        bufs = {p: writer.allocate(p, shape, np_dtype) for p, shape in expected.items()}
        quiet = not sys.stderr.isatty() if progress is None else not progress
        for f, key in _progress(source.keys, desc=f"converting {src_dir.name}", unit="tensor",
                                disable=quiet):
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
            mark = (row.target, layer, row.slot_name)
            if mark in written:
                raise ConversionError(f"{f}: key {key!r} writes {row.target} a second time")
            try:
                value = row.transform(source.read(f, key), cfg)
            except ShapeError as e:
                raise ConversionError(f"{f}: key {key!r}: {e}") from None
            index = (() if layer is None else (layer,)) + (row.slot[1](cfg) if row.slot else ())
            dst = bufs[row.target]
            if dst[index].shape != value.shape:
                raise ConversionError(f"{f}: key {key!r}: shape {value.shape} after transform, "
                                      f"{row.target} expects {dst[index].shape}")
            dst[index] = value
            written.add(mark)
        _check_complete(src_dir, expected, required, written, fam.zero_ok)
        for b in bufs.values():
            b.flush()
        if tokenizer is not None:
            writer.add_tokenizer(tokenizer)
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
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
