"""The conversion driver: Megatron source -> jaxformer checkpoint, streamed layer by layer.

Host memory: one merged tensor (all TP pieces of one layer's largest matrix, plus its
transposed copy) at a time. Tensors are read from the rank files with pread (torchio.py), so
nothing of the source stays mapped; the output layers go straight into the writer's
disk-backed buffers, whose pages are handed back to the kernel after every layer.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import mmap
import resource
import time
from pathlib import Path

import numpy as np

from jaxformer.checkpoint import CheckpointWriter
from jaxformer.models import num_params

from conversion.hf import numpy_dtype
from conversion.megatron import layout
from conversion.megatron.args import plan as make_plan
from conversion.megatron.errors import MegatronConversionError, fail
from conversion.megatron.source import _get, open_source

log = logging.getLogger(__name__)

DTYPE_ALIASES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16",
                 "bf16": "bfloat16", "float16": "float16", "fp16": "float16",
                 "half": "float16"}


def peak_rss_mb() -> float:
    """Peak resident memory of this process in MiB: VmHWM (Linux; resettable through
    /proc/self/clear_refs), else getrusage's ru_maxrss."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _release(buf) -> None:
    """Write a writer buffer's dirty pages back and drop them from this process (the data
    stays in the file): keeps resident memory at one layer, not the whole model."""
    mm = getattr(buf, "_mmap", None)
    if mm is None:
        return
    buf.flush()
    try:
        mm.madvise(mmap.MADV_DONTNEED)
    except (AttributeError, OSError, ValueError):
        pass


def load_tokenizer_from(*, vocab_file=None, merges_file=None, tokenizer_model=None,
                        vocab_txt=None, tokenizer=None, lower_case=None, args=None):
    """A jaxformer Tokenizer from explicit files, else from the paths in Megatron's args
    when they exist on this machine, else None."""
    from jaxformer import tokenizer as jt
    if tokenizer is not None:
        return jt.load_tokenizer(tokenizer)
    if vocab_file or merges_file:
        if not (vocab_file and merges_file):
            raise MegatronConversionError("--vocab-file and --merges-file go together")
        return jt.GPT2BPETokenizer(vocab_file, merges_file)
    if tokenizer_model:
        p = Path(tokenizer_model)
        return jt.load_tokenizer(p) if p.is_dir() else jt.SentencePieceTokenizer(p)
    ttype = _get(args, "tokenizer_type", default="")
    if lower_case is None:
        lower_case = ttype != "BertWordPieceCase"
    if vocab_txt:
        return jt.WordPieceTokenizer(vocab_txt, lowercase=lower_case)
    if args is None:
        return None
    vf, mf, tm = (_get(args, "vocab_file"), _get(args, "merge_file"),
                  _get(args, "tokenizer_model"))
    exists = lambda f: f is not None and Path(str(f)).exists()  # noqa: E731
    try:
        if ttype == "GPT2BPETokenizer" and exists(vf) and exists(mf):
            log.info("tokenizer from args: %s, %s", vf, mf)
            return jt.GPT2BPETokenizer(vf, mf)
        if ttype.startswith("BertWordPiece") and exists(vf):
            log.info("tokenizer from args: %s", vf)
            return jt.WordPieceTokenizer(vf, lowercase=lower_case)
        if exists(tm):
            log.info("tokenizer from args: %s", tm)
            p = Path(str(tm))
            return jt.load_tokenizer(p) if p.is_dir() else jt.SentencePieceTokenizer(p)
    except Exception as e:  # a stale path in args is not worth failing the conversion for
        log.warning("could not load the tokenizer named in args (%s): %s", ttype, e)
    return None


def convert(input, output, *, tokenizer=None, vocab_file=None, merges_file=None,
            tokenizer_model=None, vocab_txt=None, lower_case=None, dtype=None,
            true_vocab_size=None, keep_vocab_padding=False, overwrite=False,
            overrides=None, layernorm_1p=None, progress=True, name=None, echo=print,
            quantize=None, calibration=None) -> dict:
    """Convert the Megatron checkpoint at `input` into a jaxformer checkpoint at `output`.

    `input`: a checkpoint root (with latest_checkpointed_iteration.txt), an iter_XXXXXXX /
    release folder, a torch_dist folder, or one model_optim_rng.pt. `tokenizer` (a dir or
    file for jaxformer.tokenizer.load_tokenizer) or the Megatron-style file options give the
    tokenizer, copied into the checkpoint; its vocab_size (or `true_vocab_size`) is the true
    vocabulary, and Megatron's padding rows are stripped unless `keep_vocab_padding`.
    `overrides`: ModelConfig fields that win over what args and shapes say. Returns a summary
    dict (also echoed): config, parameter count, bytes, seconds, peak RSS.
    `quantize` (RunConfig.quantize) writes a quantized checkpoint: the float one is staged
    beside the output and quantized on this host's CPU (jaxformer.quant.convert), FP8
    activation scales calibrated on `calibration` prompts (default: jaxformer.quant's).
    """
    t0 = time.time()
    output = Path(output)
    if quantize is not None:
        from jaxformer.quant.convert import quantize_checkpoint, staged_float
        from jaxformer.quant.spec import name as quant_name
        quantize = quant_name(quantize, "quantize")
        with staged_float(output, overwrite) as tmp:
            summary = convert(input, tmp, tokenizer=tokenizer, vocab_file=vocab_file,
                              merges_file=merges_file, tokenizer_model=tokenizer_model,
                              vocab_txt=vocab_txt, lower_case=lower_case, dtype=dtype,
                              true_vocab_size=true_vocab_size,
                              keep_vocab_padding=keep_vocab_padding, overrides=overrides,
                              layernorm_1p=layernorm_1p, progress=progress, name=name,
                              echo=echo)
            quantize_checkpoint(tmp, output, quantize, dtype=summary["dtype"],
                                overwrite=overwrite, calibration=calibration)
        nbytes = sum(f.stat().st_size for f in output.rglob("*") if f.is_file())
        summary.update(output=str(output), quantize=quantize, bytes=nbytes,
                       seconds=round(time.time() - t0, 2))
        echo(f"quantized {output} to {quantize}: {nbytes / 2**20:,.1f} MiB on disk, "
             f"{summary['seconds']:.1f} s in all")
        return summary
    if output.exists() and not overwrite:
        raise FileExistsError(f"{output} exists; pass --overwrite to replace it")
    src = open_source(input)
    tok = load_tokenizer_from(vocab_file=vocab_file, merges_file=merges_file,
                              tokenizer_model=tokenizer_model, vocab_txt=vocab_txt,
                              tokenizer=tokenizer, lower_case=lower_case, args=src.args)
    true_vocab = true_vocab_size or (tok.vocab_size if tok is not None else None)
    pl = make_plan(src, overrides or {}, true_vocab=true_vocab, keep_padding=keep_vocab_padding,
                   tokenizer=tok, name=name if name is not None else _default_name(input, src))
    if layernorm_1p is not None:
        pl.layernorm_1p = layernorm_1p
    cfg = pl.config
    if getattr(pl, "compare_head", False):
        same = np.array_equal(src.read_global("output.w"), src.read_global("word_emb"))
        cfg = cfg.replace(tie_embeddings=same)
        pl.notes.append(f"no args: output_layer.weight on the last stage "
                        f"{'equals' if same else 'differs from'} the embedding -> "
                        f"{'tied' if same else 'untied'}")
    out_name = DTYPE_ALIASES.get(str(dtype or src.dtype.name), None)
    if out_name is None:
        raise MegatronConversionError(f"unsupported dtype {dtype or src.dtype}; use float32, "
                                      "bfloat16 or float16")
    dt = numpy_dtype(out_name)
    # gamma - 1 stored in half precision loses bits when 1 is added back: keep norms in f32
    norm_dt = np.dtype(np.float32) if pl.layernorm_1p and dt.itemsize < 4 else dt
    echo(f"source: {src.describe()}, {src.num_layers} layers, {src.dtype.name} "
         f"({Path(input)})")
    for n in pl.notes:
        echo(f"note: {n}")
    rss_stream = _write(src, pl, cfg, output, dt, norm_dt, tok, overwrite, progress)
    src.close()
    seconds = time.time() - t0
    nbytes = sum(f.stat().st_size for f in output.rglob("*") if f.is_file())
    summary = dict(output=str(output), source=src.describe(), dtype=out_name,
                   num_params=num_params(cfg), bytes=nbytes, seconds=round(seconds, 2),
                   peak_rss_mb_streaming=round(rss_stream, 1),
                   peak_rss_mb=round(peak_rss_mb(), 1),
                   tokenizer=None if tok is None else type(tok).__name__,
                   config=_nondefault(cfg))
    echo("config: " + json.dumps(summary["config"], sort_keys=True))
    echo(f"wrote {output}: {summary['num_params']:,} parameters ({out_name}), "
         f"{nbytes / 2**20:,.1f} MiB on disk, {seconds:.1f} s, peak RSS "
         f"{summary['peak_rss_mb']:,.0f} MiB ({summary['peak_rss_mb_streaming']:,.0f} MiB "
         f"before the final save)")
    return summary


def _default_name(input, src) -> str:
    p = Path(input)
    base = p.parent.name if p.name.startswith(("iter_", "release", "model_")) else p.name
    return f"megatron:{base}"


def _nondefault(cfg) -> dict:
    from jaxformer.config import ModelConfig
    defaults = {f.name: f.default for f in dataclasses.fields(ModelConfig)}
    return {k: v for k, v in cfg.to_dict().items() if defaults.get(k, object()) != v}


def _write(src, pl, cfg, output, dt, norm_dt, tok, overwrite, progress) -> float:
    """Stream every tensor into a CheckpointWriter. Merged tensors stay in the source dtype
    (numpy casts while copying into the output buffer); only norm weights, which may need
    +1 (apply_layernorm_1p), go through float32."""
    from tqdm.auto import tqdm
    L, D = cfg.num_layers, cfg.hidden_size
    N, K, G, H, F = cfg.num_heads, cfg.kv_heads, cfg.q_per_kv, cfg.dims_per_head, cfg.mlp_size
    Vp, rows = cfg.padded_vocab_size, pl.copy_rows
    dims = dict(K=K, G=G, H=H, N=N, D=D, F=F, gated=pl.gated)

    def norm(a):
        a = a.astype(np.float32)
        return a + 1.0 if pl.layernorm_1p else a

    def read_global(canon):
        return src.read_global(canon, gated=pl.gated, head_dim=H)

    def checked(canon, a, expected, g=None):
        if tuple(a.shape) != tuple(expected):
            raise fail(f"shape {tuple(a.shape)}, expected {tuple(expected)}",
                       src.location(canon, g))
        return a

    with CheckpointWriter(output, cfg, overwrite=overwrite) as w:
        # ---- embeddings (first stage) ----
        emb = checked("word_emb", read_global("word_emb"), (pl.megatron_vocab, D))
        buf = w.allocate("embed/token/embedding", (Vp, D), dt)
        buf[:rows] = emb[:rows]
        _release(buf)
        del emb
        if cfg.position_embedding == "learned":
            pos = read_global("pos_emb")
            if pos.shape[0] < cfg.max_position_embeddings:
                raise fail(f"position table has {pos.shape[0]} rows; config asks for "
                           f"{cfg.max_position_embeddings}", src.location("pos_emb"))
            w.put("embed/position/embedding", pos[:cfg.max_position_embeddings].astype(dt))
        if cfg.type_vocab_size:
            w.put("embed/token_type/embedding", read_global("type_emb").astype(dt))

        # ---- layers ----
        bufs, by_path = {}, {}
        E = cfg.num_experts
        for canon in layout.LAYER_CANONS + layout.expert_canons(E):
            if not src.has_layer(canon):
                continue
            path, view = layout.to_jaxformer(canon, np.empty(src.layer_shape(canon), np.int8),
                                             **dims)
            is_norm = canon.endswith(("norm.w", "norm.b"))
            e = layout.expert_of(canon)  # MoE experts share one [L, E, ...] buffer
            if path not in by_path:
                by_path[path] = w.allocate("layers/" + path, (L,) + ((E,) if e is not None
                                                                     else ()) + view.shape,
                                           norm_dt if is_norm else dt)
            bufs[canon] = (by_path[path], src.layer_shape(canon), e)

        def one(g, canon):
            buf, shape, e = bufs[canon]
            a = checked(canon, src.read_layer(g, canon, gated=pl.gated, head_dim=H), shape, g)
            if canon.endswith("norm.w"):
                a = norm(a)
            # casts to the output dtype
            buf[(g,) if e is None else (g, e)] = layout.to_jaxformer(canon, a, **dims)[1]
            _release(buf)

        if getattr(src, "layer_major", True):
            for g in tqdm(range(L), desc="layers", unit="layer", disable=not progress):
                for canon in bufs:
                    one(g, canon)
        else:  # a torch_dist whose saved chunks span layers: read each such chunk once
            bar = tqdm(total=L * len(bufs), desc="layers x tensors", unit="tensor",
                       disable=not progress)
            for canon in bufs:
                for g in range(L):
                    one(g, canon)
                    bar.update()
            bar.close()

        # ---- final norm and heads (last stage) ----
        if cfg.final_norm:
            w.put("final_norm/scale", norm(read_global("final_norm.w")).astype(norm_dt))
            if cfg.norm == "layernorm":
                w.put("final_norm/bias", read_global("final_norm.b").astype(norm_dt))
        if cfg.arch == "decoder" and not cfg.tie_embeddings:
            out = checked("output.w", read_global("output.w"), (pl.megatron_vocab, D))
            buf = w.allocate("lm_head/kernel", (D, Vp), dt)
            buf[:, :rows] = out[:rows].T
            _release(buf)
            del out
        if cfg.arch == "encoder":
            _write_bert_heads(w, src, cfg, pl, read_global, dt, norm_dt, rows, Vp)
        if tok is not None:
            w.add_tokenizer(tok)
        rss_stream = peak_rss_mb()
        src.close()
    return rss_stream


def _write_bert_heads(w, src, cfg, pl, read_global, dt, norm_dt, rows, Vp):
    if cfg.pooler:
        w.put("pooler/kernel", read_global("pooler.w").T.astype(dt))
        w.put("pooler/bias", read_global("pooler.b").astype(dt))
    if cfg.binary_head:
        w.put("binary_head/kernel", read_global("binary.w").T.astype(dt))
        w.put("binary_head/bias", read_global("binary.b").astype(dt))
    if cfg.mlm_head:
        w.put("mlm/dense/kernel", read_global("lm_dense.w").T.astype(dt))
        w.put("mlm/dense/bias", read_global("lm_dense.b").astype(dt))
        # lm_head.layernorm (legacy LayerNorm) never took --apply-layernorm-1p; get_norm() did
        canon, one = ("lm_norm1p", pl.layernorm_1p) if src.has_global("lm_norm1p.w") else \
            ("lm_norm", pl.layernorm_1p and src.naming == "mcore")
        scale = read_global(f"{canon}.w").astype(np.float32) + (1.0 if one else 0.0)
        w.put("mlm/norm/scale", scale.astype(norm_dt))
        if cfg.norm == "layernorm":
            w.put("mlm/norm/bias", read_global(f"{canon}.b").astype(norm_dt))
        bias = np.zeros((Vp,), np.float32)
        if src.has_global("lm_bias"):
            bias[:rows] = read_global("lm_bias")[:rows]
        w.put("mlm/bias", bias.astype(dt))
