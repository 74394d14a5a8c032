"""Sentence embeddings from an encoder: `Model.embed` (texts or token ids -> [B, D] float32).

    model = jf.load("ckpt/all-minilm-l6-v2")      # sentence.json: mean pooling, normalised
    vecs = model.embed(["A man is eating food.", "A man rides a horse."])   # [2, 384]

Pooling (jaxformer.sentence): "mean" over a text's tokens, "cls" its first token's state,
"pooler" BERT's pooler head on it (tanh(dense)); then an optional L2 normalisation. The
checkpoint's sentence.json (kept from sentence-transformers' files by the converter) says
which, `embed`'s arguments override; without either, mean and no normalisation, as
sentence-transformers does for a plain Hugging Face model.

Two layouts of a batch, both compiled once per bucketed shape:
  padded  one text per row, right-padded to a length bucket (token_bucket), rows bucketed
          (row_bucket); attention masks the padding.
  packed  TensorRT's "varseqlen": texts back to back in rows of R_T tokens (first-fit by
          length), positions restarting at each text, and attention block-diagonal
          (cache.Write.packed: each query sees only its own text), so no FLOPs go to padding
          past a row's end. On Hopper the flash kernel never loads the other texts' keys
          (kernels/flash_attention.py); elsewhere XLA computes the row's whole [R_T, R_T]
          scores and masks them, which keeps R_T small (PACK_ROW_TOKENS).
Nothing but the inputs crosses to the device per call. One program per layout and
bucketed shape serves every pooling: it computes them all (a few [B, D] sums and one
[B, D] x [D, D] product, nothing beside the encoder) and picks one by an operand, so a
server mixing requests compiles no more. Calls from several threads are safe.

Legend: B texts, R rows, T row length, D hidden size.
"""
from __future__ import annotations

import dataclasses
import functools
import threading
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jax.sharding import NamedSharding, PartitionSpec as P

from jaxformer.cache import MIN_BUCKET, Write
from jaxformer.sentence import SentenceConfig
from jaxformer.sharding import to_global, to_host

POOLINGS = ("mean", "cls", "pooler")  # the operand `mode` is the index
# packed rows hold at least this many tokens when the batch has them: on the XLA path a row
# costs T^2 attention scores, against ~24 D^2 FLOPs per token in the matmuls, so 512 keeps
# attention a few percent of the work for BERT-base while still packing short texts densely
PACK_ROW_TOKENS = 512
DEFAULT_BATCH = 128  # texts per compiled call (a larger list runs in several)
_BUILD = threading.Lock()  # builds of compiled entry points (first calls from threads)
# Buckets finer than generate()'s powers of two: BERT's usual 384 tokens would pad to 512
# (1.3x the matmul FLOPs, 1.8x attention's) and 33 rows to 64. Past these sizes shapes
# grow in steps of a flash-kernel CTA's 128 query rows, and of 8 rows.
TOKEN_STEP, ROW_STEP = 128, 8


def token_bucket(n: int) -> int:
    """Padded length of n tokens: a power of two up to TOKEN_STEP (at least MIN_BUCKET),
    then a multiple of it."""
    if n <= TOKEN_STEP:
        return max(MIN_BUCKET, 1 << max(0, n - 1).bit_length())
    return -(-n // TOKEN_STEP) * TOKEN_STEP


def row_bucket(n: int, data: int = 1) -> int:
    """Rows for n rows of work: a power of two up to ROW_STEP, then a multiple of it; a
    multiple of `data` (the mesh's data-parallel size) either way."""
    r = 1 << max(0, n - 1).bit_length() if n <= ROW_STEP else -(-n // ROW_STEP) * ROW_STEP
    return -(-r // data) * data


@dataclasses.dataclass(frozen=True)
class Batch:
    """Host arrays of one call: ids, types, positions, seq [R, T] int32 (seq: the text
    each token belongs to, n_out for padding); lengths [R] (keys in use per row); first
    [n_out] flat index (r * T + t) of each text's first token; spans (seg_lo, seg_lim)
    [R, T] when packed. Texts past `n` in the n_out outputs are padding."""
    ids: np.ndarray
    types: np.ndarray
    positions: np.ndarray
    seq: np.ndarray
    lengths: np.ndarray
    first: np.ndarray
    n: int
    spans: tuple[np.ndarray, np.ndarray] | None = None


def padded_batch(seqs: Sequence[tuple[np.ndarray, np.ndarray]], positions: int,
                 data: int = 1) -> Batch:
    """One text per row, rows and length bucketed (row_bucket, token_bucket), the length
    at most the model's `positions` (padding's positions must exist too)."""
    n = len(seqs)
    R = row_bucket(n, data)
    T = min(token_bucket(max(len(i) for i, _ in seqs)), positions)
    ids, types = np.zeros((R, T), np.int32), np.zeros((R, T), np.int32)
    seq = np.full((R, T), R, np.int32)
    lengths = np.zeros((R,), np.int32)
    for b, (i, t) in enumerate(seqs):
        ids[b, :len(i)], types[b, :len(i)], seq[b, :len(i)], lengths[b] = i, t, b, len(i)
    positions = np.broadcast_to(np.arange(T, dtype=np.int32), (R, T)).copy()
    return Batch(ids, types, positions, seq, lengths, np.arange(R, dtype=np.int32) * T, n)


def pack_rows(lengths: Sequence[int], row_tokens: int) -> list[list[int]]:
    """First-fit decreasing: the texts (by index) each row of `row_tokens` holds."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        r = next((r for r, left in enumerate(room) if left >= lengths[i]), None)
        if r is None:
            rows.append([])
            room.append(row_tokens)
            r = len(rows) - 1
        rows[r].append(i)
        room[r] -= lengths[i]
    return rows


def packed_batch(seqs: Sequence[tuple[np.ndarray, np.ndarray]], data: int = 1) -> Batch:
    """Texts back to back in rows (module docstring), rows and row length bucketed."""
    n = len(seqs)
    lens = [len(i) for i, _ in seqs]
    T = max(token_bucket(max(lens)), min(token_bucket(sum(lens)), PACK_ROW_TOKENS))
    layout = pack_rows(lens, T)
    R, n_out = row_bucket(len(layout), data), row_bucket(n)
    ids, types, positions = (np.zeros((R, T), np.int32) for _ in range(3))
    seq = np.full((R, T), n_out, np.int32)
    lo, lim = np.zeros((R, T), np.int32), np.full((R, T), -1, np.int32)
    lengths = np.zeros((R,), np.int32)
    first = np.zeros((n_out,), np.int32)
    for r, members in enumerate(layout):
        o = 0
        for i in members:
            (tok, typ), m = seqs[i], lens[i]
            ids[r, o:o + m], types[r, o:o + m], seq[r, o:o + m] = tok, typ, i
            positions[r, o:o + m] = np.arange(m)
            lo[r, o:o + m], lim[r, o:o + m] = o, o + m - 1
            first[i] = r * T + o
            o += m
        lengths[r] = o
    return Batch(ids, types, positions, seq, lengths, first, n, (lo, lim))


def pool(hidden, seq, first, mode, pooler=None, packed: bool = True):
    """hidden [R, T, D] -> [B, D] float32 per text (B = first.shape[0]), by `mode` (an
    int32 scalar, index into POOLINGS): "mean" over its tokens (seq == i), "cls" its
    first token (flat index first[i]), "pooler" pooler(cls states) (cls without one).
    packed False: row b is text b (B == R), and the mean a masked sum over the row."""
    R, T, D = hidden.shape
    B = first.shape[0]
    flat = hidden.reshape(R * T, D)
    cls = jnp.take(flat, first, axis=0)
    head = cls if pooler is None else pooler(cls)
    # float32 adds per text (sentence-transformers' masked sum)
    if packed:  # a scatter-add by text; id B collects the padding
        ids = seq.reshape(R * T)
        sums = jax.ops.segment_sum(flat.astype(jnp.float32), ids, num_segments=B + 1)[:B]
        counts = jax.ops.segment_sum(jnp.ones_like(ids, jnp.float32), ids,
                                     num_segments=B + 1)[:B]
    else:  # one GEMM of the texts' 0/1 token masks [B, R*T] with the tokens [R*T, D]
        # A reduce over T would make XLA:GPU's layout assignment give its [R, T, D] input a
        # T-minor layout, which propagates back through every layer's residual stream and
        # costs each matmul a transpose (docs/benchmarks.md, session 15); a dot constrains
        # no operand layout. The masks are exact 0 / 1 and the products add in float32.
        mine = (seq.reshape(1, R * T) == jnp.arange(B, dtype=seq.dtype)[:, None])
        sums = jnp.dot(mine.astype(hidden.dtype), flat, preferred_element_type=jnp.float32)
        counts = mine.sum(1, dtype=jnp.float32)
    mean = sums / jnp.maximum(counts, 1.0)[:, None]
    return jnp.select([mode == 0, mode == 1], [mean, cls.astype(jnp.float32)],
                      head.astype(jnp.float32))


def l2_normalize(x):
    """x / max(||x||, 1e-12) over the last axis (torch.nn.functional.normalize)."""
    norm = jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True))
    return x / jnp.maximum(norm, 1e-12)


def embed_fn(model, packed: bool):
    """The compiled embedding of `model` in one layout: fn(params, ids, types, positions,
    seq, lengths, first, lo, lim, mode, normalize) -> [n_out, D] float32 (Batch's arrays;
    mode int32 and normalize bool scalars)."""
    backend = model.run.attention

    # called once per request, as the other prefill-like entry points: small params packed
    @functools.partial(model.jit, pack_small=True)
    def fn(params, ids, types, positions, seq, lengths, first, lo, lim, mode, normalize):
        with model.traced():
            m = model.module(params)
            at = Write.packed(lo, lim) if packed else None
            hidden, _ = m(ids, lengths, types, backend=backend, positions=positions, at=at)
            out = pool(hidden, seq, first, mode, m.pool if model.config.pooler else None,
                       packed)
            return jnp.where(normalize, l2_normalize(out), out)

    return fn


def resolve(model, pooling, normalize) -> tuple[str, bool, int]:
    """(pooling, normalize, max tokens per text) from the arguments, else the checkpoint's
    sentence config, else mean / False / the model's positions."""
    cfg = model.config
    if cfg.arch != "encoder":
        raise ValueError(f"embed() needs an encoder model (BERT-style); "
                         f"{cfg.name or 'this model'} is a {cfg.arch}")
    sent = getattr(model, "sentence", None) or SentenceConfig()
    pooling = sent.pooling if pooling is None else pooling
    if pooling not in POOLINGS:
        raise ValueError(f"embed(pooling=...): must be one of {POOLINGS} or None, "
                         f"got {pooling!r}")
    if pooling == "pooler" and not cfg.pooler:
        raise ValueError("embed(pooling='pooler'): this model has no pooler head "
                         "(ModelConfig.pooler)")
    normalize = sent.normalize if normalize is None else normalize
    if not isinstance(normalize, (bool, np.bool_)):
        raise ValueError(f"embed(normalize=...): must be True, False or None, "
                         f"got {normalize!r}")
    limit = cfg.max_position_embeddings
    return pooling, bool(normalize), min(sent.max_length or limit, limit)


def sequences(model, inputs, max_len: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(ids, token types) [T] int32 per text: strings through the tokenizer (special tokens
    added, cut to max_len), token-id lists (or rows of a 2-D array) as given."""
    if isinstance(inputs, str):
        inputs = [inputs]
    elif isinstance(inputs, np.ndarray) and inputs.ndim == 2:
        inputs = list(inputs)
    inputs = list(inputs)
    if not inputs:
        raise ValueError("embed(): no texts given")
    out = []
    for k, x in enumerate(inputs):
        if isinstance(x, str):
            if not x.strip():
                raise ValueError(f"embed(): text {k} is empty")
            if not hasattr(model.tokenizer, "encode_for_model"):
                raise ValueError("embed() of strings needs the model's tokenizer (a BERT "
                                 "WordPiece or tokenizer.json one); pass token ids instead")
            ids, types = model.tokenizer.encode_for_model(x, max_length=max_len)
        else:
            ids = np.asarray(x)
            if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer) or ids.size == 0:
                raise ValueError(f"embed(): input {k} must be a string or a non-empty list "
                                 f"of token ids, got {type(x).__name__} "
                                 f"{getattr(ids, 'shape', '')}")
            if len(ids) > max_len:
                raise ValueError(f"embed(): input {k} has {len(ids)} tokens, more than the "
                                 f"model's {max_len}")
            types = np.zeros_like(ids)
        ids = model.check_ids(np.asarray(ids, np.int32)[None], f"embed() input {k}")[0]
        out.append((ids, np.asarray(types, np.int32)))
    return out


def embed(model, inputs, pooling: str | None = None, normalize: bool | None = None, *,
          packed: bool = False, batch_size: int = DEFAULT_BATCH) -> np.ndarray:
    """Model.embed: float32 numpy [B, D], one vector per text (module docstring)."""
    mode, normalize, max_len = resolve(model, pooling, normalize)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"embed(batch_size=...): must be a positive int, got {batch_size!r}")
    seqs = sequences(model, inputs, max_len)
    fn, ops = compiled(model, packed), knobs(mode, normalize)
    data = model.mesh.shape["data"]
    # similar lengths share a call (less padding); results go back in the input order
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i][0]))
    out = np.zeros((len(seqs), model.config.hidden_size), np.float32)
    for s in range(0, len(order), batch_size):
        chunk = order[s:s + batch_size]
        part = [seqs[i] for i in chunk]
        b = packed_batch(part, data) if packed else \
            padded_batch(part, model.config.max_position_embeddings, data)
        out[chunk] = to_host(fn(model.params, *device_args(model, b), *ops))[:b.n]
    return out


def compiled(model, packed: bool):
    """The model's compiled embedding for a layout (embed_fn), built once."""
    with _BUILD:
        fn = model.compiled.get(("embed", bool(packed)), lambda: embed_fn(model, bool(packed)))
        # the params' flat tuple and packed buffers, built once before threads race to
        model.packed_params() if fn.plan else model.param_leaves()
    return fn


def device_args(model, b: Batch) -> list:
    """A Batch's arrays on the model's mesh (rows on `data` where it divides them), in
    embed_fn's order; the benchmark builds them once and times the compiled call alone."""
    R = b.ids.shape[0]
    rows2, rows1 = model._batch_sharding(R, 2), model._batch_sharding(R, 1)
    args = [to_global(a, rows2) for a in (b.ids, b.types, b.positions, b.seq)]
    args += [to_global(b.lengths, rows1), to_global(b.first, NamedSharding(model.mesh, P()))]
    args += [None, None] if b.spans is None else [to_global(a, rows2) for a in b.spans]
    return args


def knobs(pooling: str, normalize: bool) -> tuple:
    """embed_fn's mode and normalize operands."""
    return np.int32(POOLINGS.index(pooling)), np.bool_(normalize)
