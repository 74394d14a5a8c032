"""Attention benchmark: our Mosaic GPU kernels vs cuDNN vs plain XLA, one run, one card.

    python benchmarks/attention.py [--quick] [--variants] [--json out.json]
    python benchmarks/attention.py --kv-cache int8 --batches 1,64 --ctxs 1024,4096
    python benchmarks/attention.py --paged [--page-sizes 16,32,64,128] [--kv-cache int8]
        [--heads 32 --kv-heads 8 --head-dim 128] [--window W] [--softcap C] [--alibi]
    python benchmarks/attention.py --paged --smoke        # tiny, any device (CPU: interpreter)
    python benchmarks/attention.py --window 4096 [--softcap 50] [--seqs ...] [--ctxs ...]

Prints the device, the versions and one table:
  prefill  causal bf16, head_dim 128, 16 heads, batch x seq = 32k tokens, seq 1k..16k:
           TFLOP/s (causal: half of 4 B N T^2 H, as FlashAttention reports it);
  decode   one token per sequence, 32 query / 8 kv heads, head_dim 128, batch 1/8/64,
           context 1k..32k: GB/s of K/V read (B S K H 2 bytes x 2), next to the card's
           measured copy bandwidth (a large device copy in the same run, read + write bytes).
  --paged  the paged decode kernel (kernels/paged_attention.py, pages of each row shuffled
           over the pool) against the contiguous decode kernel at the same shapes and tokens:
           us per call per page size and the ratio contiguous time / paged time (target:
           >= 0.9); with --kv-cache, both read int8 / fp8 codes; with --window / --softcap /
           --alibi, both kernels apply them. --smoke: one tiny shape (batch 2, context 128,
           4 q / 1 kv head, head_dim 64, pages 16 and 64); off a GPU both kernels run in the
           Mosaic GPU interpreter and the times are wall-clock (a plumbing check, not a
           measurement).
Before timing, every kernel is checked against the reference at the benchmark shapes.
--window W (and --softcap C): instead, our kernels with the sliding window (and cap) against
the same kernels without either (full causal) and XLA with both, in ms / us, with the share
of kv blocks the prefill CTAs stream (blocks before a window are never loaded, so at
seq >> W the windowed prefill should approach W / (seq / 2) of the full one's time).
Times are GPU kernel time from CUPTI (sum of the kernels of one call, launch gaps excluded),
median of 3 windows; inputs rotate over enough copies that one call's K/V is not in L2.
"""
from __future__ import annotations

import argparse
import datetime
import functools
import json
import math
import os
import sys
import time
import traceback

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from jaxformer.kernels import decode_attention as da  # noqa: E402
from jaxformer.kernels import flash_attention as fa  # noqa: E402
from jaxformer.kernels import paged_attention as pa  # noqa: E402
from jaxformer.kernels.attention import attention  # noqa: E402
from jaxformer.kernels.reference import attention_reference  # noqa: E402

L2_BYTES = 50 * 2**20


# ---- timing --------------------------------------------------------------------------------
def _cupti():
    try:
        from jax._src.lib import mosaic_gpu as lib
        return lib._mosaic_gpu_ext
    except Exception:  # noqa: BLE001
        return None


def gpu_time_ms(jf, arg_sets, iters: int, windows: int = 3, breakdown: dict | None = None,
                warm: bool = True):
    """Median over `windows` of (GPU kernel time of `iters` calls) / iters, in ms.
    warm=False: the caller already ran jf on every arg set."""
    for a in arg_sets if warm else ():
        jax.block_until_ready(jf(*a))
    ext = _cupti() if jax.devices()[0].platform == "gpu" else None
    res = []
    for _ in range(windows):
        if ext is not None:
            ext._cupti_init()
            try:
                outs = [jf(*arg_sets[i % len(arg_sets)]) for i in range(iters)]
                jax.block_until_ready(outs)
            finally:
                timings = ext._cupti_get_timings(True)
            res.append(sum(t for _, t in timings) / iters)
            if breakdown is not None:
                for name, t in timings:
                    breakdown[name] = breakdown.get(name, 0.0) + t / iters / windows
        else:
            jax.block_until_ready(jf(*arg_sets[0]))
            t0 = time.perf_counter()
            outs = [jf(*arg_sets[i % len(arg_sets)]) for i in range(iters)]
            jax.block_until_ready(outs)
            res.append((time.perf_counter() - t0) * 1e3 / iters)
    return float(np.median(res))


def copy_bandwidth_gbs(n: int = 2**29) -> float:
    """n bf16 elements (default 1 GiB) read and written."""
    x = jax.random.normal(jax.random.key(0), (n,), jnp.float32).astype(jnp.bfloat16)
    f = jax.jit(lambda x: x + jnp.bfloat16(1))
    ms = gpu_time_ms(f, [(x,)], iters=20)
    return 2 * n * 2 / (ms * 1e-3) / 1e9


def rotations(bytes_per_set: int, cap: int = 32) -> int:
    return int(min(cap, max(1, math.ceil(4 * L2_BYTES / max(bytes_per_set, 1)))))


# ---- correctness at the benchmark shapes ---------------------------------------------------
def rel_err(out, ref):
    out = np.asarray(out, np.float32)
    ref = np.asarray(ref, np.float32)
    if not np.all(np.isfinite(out)):
        return float("nan")
    return float(np.linalg.norm(out - ref) / max(np.linalg.norm(ref), 1e-30))


def check_prefill_rows(out, q, k, v, pos, kvl, scale, rows, **mods):
    """Relative error of out[:, rows] against the float32 reference on those rows."""
    errs = []
    for r0 in rows:
        sl = slice(r0, r0 + 128)
        ref = attention_reference(q[:, sl].astype(jnp.float32), k.astype(jnp.float32),
                                  v.astype(jnp.float32), pos[:, sl], kvl, causal=True,
                                  scale=scale, **mods)
        errs.append(rel_err(out[:, sl], ref))
    return max(errs)


# ---- problems ---------------------------------------------------------------------------
def prefill_inputs(key, B, T, N, K, H, dtype=jnp.bfloat16):
    kq, kk, kv = jax.random.split(key, 3)
    q = jax.random.normal(kq, (B, T, N, H), dtype)
    k = jax.random.normal(kk, (B, T, K, H), dtype)
    v = jax.random.normal(kv, (B, T, K, H), dtype)
    pos = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    kvl = jnp.full((B,), T, jnp.int32)
    return q, k, v, pos, kvl


def decode_inputs(key, B, S, N, K, H, dtype=jnp.bfloat16):
    kq, kk, kv = jax.random.split(key, 3)
    q = jax.random.normal(kq, (B, 1, N, H), dtype)
    k = jax.random.normal(kk, (B, S, K, H), dtype)
    v = jax.random.normal(kv, (B, S, K, H), dtype)
    kvl = jnp.full((B,), S, jnp.int32)
    pos = (kvl - 1)[:, None]
    return q, k, v, pos, kvl


def backend_fn(backend, scale, causal=True, **kw):
    if backend == "ours-prefill":
        return jax.jit(functools.partial(fa.flash_attention, causal=causal, scale=scale, **kw))
    if backend == "ours-decode":
        return jax.jit(functools.partial(da.decode_attention, causal=causal, scale=scale, **kw))
    return jax.jit(functools.partial(attention, causal=causal, scale=scale, backend=backend,
                                     **kw))


def run_prefill(seqs, tokens, N, H, log, variants=False):
    rows = []
    scale = 1 / math.sqrt(H)
    for T in seqs:
        B = max(1, tokens // T)
        sets = [prefill_inputs(jax.random.key(100 + i), B, T, N, N, H) for i in range(2)]
        flops = 4 * B * N * T * T * H / 2
        row = {"seq": T, "batch": B}
        impls = [("ours", backend_fn("ours-prefill", scale)), ("cudnn", backend_fn("cudnn", scale)),
                 ("xla", backend_fn("xla", scale))]
        if variants:
            for name, cfg in [
                ("ours-s3", fa.PrefillConfig(stages=3)),
                ("ours-fwd", fa.PrefillConfig(reverse_q=False)),
                ("ours-kv64", fa.PrefillConfig(block_kv=64, stages=4)),
                ("ours-kv192", fa.PrefillConfig(block_kv=192)),
            ]:
                impls.append((name, backend_fn("ours-prefill", scale, config=cfg)))
        for name, f in impls:
            try:
                q, k, v, pos, kvl = sets[0]
                if name != "xla":
                    out = f(q, k, v, pos, kvl)
                    err = check_prefill_rows(out, q, k, v, pos, kvl, scale,
                                             sorted({0, (T // 2) // 128 * 128, T - 128}))
                    row[f"{name}_err"] = err
                    if not err < 2e-2:
                        raise AssertionError(f"{name} prefill T={T}: rel err {err}")
                ms = gpu_time_ms(f, sets, iters=max(4, min(50, int(2e13 // flops) + 4)))
                row[name] = flops / (ms * 1e-3) / 1e12
                row[f"{name}_ms"] = ms
            except Exception as e:  # noqa: BLE001
                row[name] = float("nan")
                row[f"{name}_error"] = f"{type(e).__name__}: {str(e)[:2000]}"
                log(f"prefill T={T} {name}: {type(e).__name__}: {str(e)[:3000]}")
                log(traceback.format_exc()[-3000:])
        log(json.dumps(row))
        print("prefill " + _brief(row), flush=True)
        rows.append(row)
    return rows


def _brief(row):
    return " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                    for k, v in row.items() if not k.endswith(("_error", "_kernels_us")))


def run_decode(batches, ctxs, N, K, H, log, variants=False):
    rows = []
    scale = 1 / math.sqrt(H)
    for B in batches:
        for S in ctxs:
            nbytes = B * S * K * H * 2 * 2
            R = rotations(nbytes)
            sets = [decode_inputs(jax.random.key(200 + i), B, S, N, K, H) for i in range(R)]
            row = {"batch": B, "ctx": S, "rot": R}
            impls = [("ours", backend_fn("ours-decode", scale)),
                     ("cudnn", backend_fn("cudnn", scale)), ("xla", backend_fn("xla", scale))]
            if variants:
                for name, cfg in [
                    ("ours-pad64", da.DecodeConfig(q_rows_only=False)),
                    ("ours-bk64s4", da.DecodeConfig(block_kv=64, stages=4)),
                    ("ours-occ2", da.DecodeConfig(ctas_per_sm=2)),
                    ("ours-occ4", da.DecodeConfig(ctas_per_sm=4)),
                    ("ours-bk64occ4", da.DecodeConfig(block_kv=64, stages=4, ctas_per_sm=4)),
                ]:
                    impls.append((name, backend_fn("ours-decode", scale, config=cfg)))
            q, k, v, pos, kvl = sets[0]
            ref = attention_reference(q.astype(jnp.float32), k.astype(jnp.float32),
                                      v.astype(jnp.float32), pos, kvl, causal=True, scale=scale)
            for name, f in impls:
                try:
                    if name != "xla":
                        err = rel_err(f(q, k, v, pos, kvl), ref)
                        row[f"{name}_err"] = err
                        if not err < 2e-2:
                            raise AssertionError(f"{name} decode B={B} S={S}: rel err {err}")
                    bd = {} if name == "ours" else None
                    ms = gpu_time_ms(f, sets, iters=max(R, 40 // R * R), breakdown=bd)
                    row[name] = nbytes / (ms * 1e-3) / 1e9
                    row[f"{name}_us"] = ms * 1e3
                    if bd:
                        row["ours_kernels_us"] = {n[:60]: round(t * 1e3, 2) for n, t in bd.items()}
                except Exception as e:  # noqa: BLE001
                    row[name] = float("nan")
                    row[f"{name}_error"] = f"{type(e).__name__}: {str(e)[:2000]}"
                    log(f"decode B={B} S={S} {name}: {type(e).__name__}: {str(e)[:3000]}")
                    log(traceback.format_exc()[-3000:])
            log(json.dumps(row))
            print("decode " + _brief(row), flush=True)
            rows.append(row)
    return rows


def run_decode_quantized(batches, ctxs, N, K, H, log, mode="int8"):
    """Decode over an int8 / fp8 KV cache (codes + per-token, per-head scales, cache.py): our
    decode kernel reading the codes (tiles converted in shared memory), XLA dots reading
    them (both fold the scales into the scores and probabilities), the dequantize-then-kernel
    path both replaced, and the bf16 cache with our kernel, in us."""
    from jaxformer import cache as kvc
    rows = []
    scale = 1 / math.sqrt(H)

    def codes(q, k, v, pos, kvl):
        (kq, ks), (vq, vs) = kvc.quantize(k, mode), kvc.quantize(v, mode)
        return q, kq, vq, ks, vs, pos, kvl

    dots, quant_kernel = (jax.jit(lambda q, kq, vq, ks, vs, pos, kvl, b=b: attention(
        q, kq, vq, pos, kvl, causal=True, scale=scale, k_scale=ks, v_scale=vs, backend=b))
        for b in ("xla", "pallas"))
    kernel = backend_fn("ours-decode", scale)
    dequant = jax.jit(lambda q, kq, vq, ks, vs, pos, kvl: kernel(
        q, kvc.dequantize(kq, ks, q.dtype), kvc.dequantize(vq, vs, q.dtype), pos, kvl))
    for B in batches:
        for S in ctxs:
            R = rotations(B * S * K * H * 2)
            sets = [decode_inputs(jax.random.key(300 + i), B, S, N, K, H) for i in range(R)]
            qsets = [jax.jit(codes)(*a) for a in sets]
            row = {"batch": B, "ctx": S, "mode": mode}
            q, kq, vq, ks, vs, pos, kvl = qsets[0]
            ref = attention_reference(q.astype(jnp.float32),
                                      kvc.dequantize(kq, ks, jnp.float32),
                                      kvc.dequantize(vq, vs, jnp.float32), pos, kvl,
                                      causal=True, scale=scale)
            for name, f, a in [("bf16_kernel", kernel, sets), ("dots", dots, qsets),
                               ("quant_kernel", quant_kernel, qsets),
                               ("dequant_kernel", dequant, qsets)]:
                try:
                    if name != "bf16_kernel":
                        err = rel_err(f(*a[0]), ref)
                        row[f"{name}_err"] = err
                        if not err < 2e-2:
                            raise AssertionError(f"{name} B={B} S={S}: rel err {err}")
                    row[f"{name}_us"] = gpu_time_ms(f, a, iters=max(R, 40 // R * R)) * 1e3
                except Exception as e:  # noqa: BLE001
                    row[f"{name}_us"] = float("nan")
                    row[f"{name}_error"] = f"{type(e).__name__}: {str(e)[:2000]}"
                    log(f"quantized decode B={B} S={S} {name}: {traceback.format_exc()[-3000:]}")
            log(json.dumps(row))
            print("decode-kv " + _brief(row), flush=True)
            rows.append(row)
    return rows


def to_pages(x, ps, perm):
    """x [B, S, ...] -> a one-layer pool [1, 1 + B*S/ps, ps, ...] holding row b's page j at
    perm[b * S/ps + j] (page 0 unused, as a page table's padding)."""
    B, S = x.shape[:2]
    M = S // ps
    pool = jnp.zeros((1 + B * M, ps) + x.shape[2:], x.dtype)
    return pool.at[perm].set(x.reshape((B * M, ps) + x.shape[2:]))[None]


def alibi_slopes_for(N: int):
    """BLOOM's ALiBi slopes for N heads (a power of two), [N] float32."""
    return jnp.asarray(2.0 ** (-8.0 * np.arange(1, N + 1) / N), jnp.float32)


def run_decode_paged(batches, ctxs, N, K, H, log, page_sizes, mode=None, variants=False,
                     mods=None, smoke=False):
    """Paged decode (pages shuffled over the pool) vs the contiguous decode kernel over the
    same tokens, us per call; mode int8 / fp8: both read codes and per-token scales; mods:
    window / softcap / alibi_slopes for both kernels (and the reference). smoke: one rotation,
    few calls, and off a GPU the kernels in the Mosaic GPU interpreter."""
    from jaxformer import cache as kvc
    rows = []
    scale = 1 / math.sqrt(H)
    quant = mode is not None
    mods = dict(mods or {})
    interpret = jax.devices()[0].platform != "gpu"
    kmods = dict(mods, interpret=True) if interpret else mods
    contig = backend_fn("ours-decode", scale, **kmods)
    impls = [(f"ps{ps}", ps, pa.PagedDecodeConfig()) for ps in page_sizes]
    if variants:
        impls += [("ps64-bk64", 64, pa.PagedDecodeConfig(block_kv=64, stages=4)),
                  ("ps64-bk256", 64, pa.PagedDecodeConfig(block_kv=256, stages=2)),
                  ("ps64-s4", 64, pa.PagedDecodeConfig(stages=4)),
                  ("ps64-occ2", 64, pa.PagedDecodeConfig(ctas_per_sm=2))]
        if 16 in page_sizes:  # the serving default's page size
            impls += [("ps16-bk64", 16, pa.PagedDecodeConfig(block_kv=64, stages=4)),
                      ("ps16-bk256", 16, pa.PagedDecodeConfig(block_kv=256, stages=2)),
                      ("ps16-occ2", 16, pa.PagedDecodeConfig(ctas_per_sm=2)),
                      # two resident CTAs: half the shared memory and registers each
                      ("ps16-bk64-2cta", 16, pa.PagedDecodeConfig(
                          block_kv=64, stages=2, ctas_per_sm=2, compute_registers=208)),
                      # several rows per CTA through one ring: no per-row CTA start / drain
                      ("ps16-r2", 16, pa.PagedDecodeConfig(rows_per_cta=2)),
                      ("ps16-r4", 16, pa.PagedDecodeConfig(rows_per_cta=4)),
                      ("ps16-r8", 16, pa.PagedDecodeConfig(rows_per_cta=8)),
                      ("ps16-bk64-r4", 16, pa.PagedDecodeConfig(block_kv=64, stages=4,
                                                                rows_per_cta=4))]

    def codes(q, k, v, pos, kvl):
        (kq, ks), (vq, vs) = kvc.quantize(k, mode), kvc.quantize(v, mode)
        return q, kq, vq, pos, kvl, ks, vs

    def paged_fn(cfg):
        f = functools.partial(pa.paged_decode_attention, scale=scale, config=cfg, **kmods)
        if quant:
            return jax.jit(lambda q, kp, vp, pages, pos, kvl, ks, vs: f(
                q, kp, vp, pages, pos, kvl, layer=jnp.int32(0), k_scale=ks, v_scale=vs))
        return jax.jit(lambda q, kp, vp, pages, pos, kvl: f(q, kp, vp, pages, pos, kvl,
                                                             layer=jnp.int32(0)))

    contig_q = jax.jit(lambda q, k, v, pos, kvl, ks, vs: contig(q, k, v, pos, kvl, k_scale=ks,
                                                               v_scale=vs))
    for B in batches:
        for S in ctxs:
            per_key = K * (H + 4) * 2 if quant else K * H * 2 * 2
            R = 1 if smoke else rotations(B * S * per_key)
            sets = [decode_inputs(jax.random.key(400 + i), B, S, N, K, H) for i in range(R)]
            if quant:
                sets = [jax.jit(codes)(*a) for a in sets]
            q, k, v, pos, kvl = sets[0][:5]
            up = (lambda a, s: kvc.dequantize(a, s, jnp.float32)) if quant else \
                (lambda a, s: a.astype(jnp.float32))
            ref = attention_reference(q.astype(jnp.float32), up(k, sets[0][5] if quant else 0),
                                      up(v, sets[0][6] if quant else 0), pos, kvl,
                                      causal=True, scale=scale, **mods)
            row = {"batch": B, "ctx": S, "heads": N, "kv_heads": K, "head_dim": H,
                   "mode": mode or "bf16", "rot": R}
            runs = [("contig", contig_q if quant else contig, None, None)] + \
                [(name, paged_fn(cfg), ps, cfg) for name, ps, cfg in impls]
            for name, f, ps, _cfg in runs:
                try:
                    if ps is None:
                        args = sets
                    else:
                        if S % ps:
                            raise ValueError(f"context {S} is not a multiple of page size {ps}")
                        M = S // ps
                        perm = jnp.asarray(np.random.default_rng(B * S + ps).permutation(
                            B * M) + 1, jnp.int32)
                        pages = perm.reshape(B, M)
                        args = []
                        for a in sets:
                            pools = [to_pages(x, ps, perm) for x in
                                     (a[1], a[2]) + (a[5:7] if quant else ())]
                            args.append((a[0], pools[0], pools[1], pages, a[3], a[4],
                                         *pools[2:]))
                    err = rel_err(f(*args[0]), ref)
                    row[f"{name}_err"] = err
                    if not err < 2e-2:
                        raise AssertionError(f"{name} B={B} S={S}: rel err {err}")
                    # smoke: the check's call was the warm-up (an interpreted call costs
                    # seconds: it compiles each simulated warpgroup's program again)
                    iters, windows = (1, 1) if smoke else (max(R, 40 // R * R), 3)
                    row[f"{name}_us"] = gpu_time_ms(f, args, iters=iters, windows=windows,
                                                    warm=not smoke) * 1e3
                    del args
                except Exception as e:  # noqa: BLE001
                    row[f"{name}_us"] = float("nan")
                    row[f"{name}_error"] = f"{type(e).__name__}: {str(e)[:2000]}"
                    log(f"paged decode B={B} S={S} {name}: {traceback.format_exc()[-3000:]}")
            log(json.dumps(row))
            print("decode-paged " + _brief(row), flush=True)
            rows.append(row)
    return rows, [name for name, _, _ in impls], per_key


def print_paged(rows, names, per_key, bw, N, K, H, mode, mods_text=""):
    print(f"\npaged decode ({mode or 'bf16'} pool, pages shuffled): {N} q / {K} kv heads, "
          f"head_dim {H}{mods_text}; us per call; GB/s of K/V read (copy = {bw:.0f}); "
          f"x = contiguous time / paged time (target >= 0.90)")
    print(f"{'batch':>5} {'ctx':>6} {'contig us':>10} {'GB/s':>6}"
          + "".join(f" {n + ' us':>13} {'x':>5}" for n in names))
    for r in rows:
        c = r["contig_us"]
        gbs = r["batch"] * r["ctx"] * per_key / c / 1e3
        cells = ""
        for n in names:
            t = r.get(f"{n}_us", float("nan"))
            cells += f" {t:>13.1f} {c / t:>5.2f}"
        print(f"{r['batch']:>5} {r['ctx']:>6} {c:>10.1f} {gbs:>6.0f}" + cells)
    errs = [(k, r[k]) for r in rows for k in r if k.endswith("_error")]
    if errs:
        print(f"\n{len(errs)} failures; first: {errs[0][0]}: {errs[0][1][:800]}")

def streamed_blocks(pos, kvl, S, window, cfg=fa.PrefillConfig()):
    """kv blocks the prefill CTAs stream (sum over CTAs of the union of their two tiles'
    ranges), from the same ranges the kernel reads."""
    T = pos.shape[1]
    T_pad = -(-T // (2 * cfg.block_q)) * 2 * cfg.block_q
    lo, lim = fa.visible_range(pos, kvl, S, True, window)
    lo, lim = (jnp.pad(a, ((0, 0), (0, T_pad - T)), constant_values=c)
               for a, c in ((lo, 0), (lim, -1)))
    r = fa.cta_ranges(fa.tile_ranges(lo, lim, cfg.block_q, cfg.block_kv))
    r = r.reshape(r.shape[0], -1, 2, 4)
    return int(jnp.sum(jnp.maximum(r[..., 3].max(-1) - r[..., 0].min(-1), 0)))


def _timed(name, f, sets, iters, check, row, log):
    """row[name + '_ms'] = GPU ms of f over sets, after check(f) (a rel err) passes."""
    try:
        if check is not None:
            err = check(f)
            row[f"{name}_err"] = err
            if not err < 2e-2:
                raise AssertionError(f"{name}: rel err {err}")
        row[f"{name}_ms"] = gpu_time_ms(f, sets, iters=iters)
    except Exception as e:  # noqa: BLE001
        row[f"{name}_ms"] = float("nan")
        row[f"{name}_error"] = f"{type(e).__name__}: {str(e)[:2000]}"
        log(f"{name}: {traceback.format_exc()[-3000:]}")


def run_windowed(seqs, tokens, batches, ctxs, window, softcap, log):
    """Prefill (16 heads, head_dim 128, 32k tokens) and decode (32 q / 8 kv heads): our
    kernels with the window (and cap), without (the full causal baseline), and XLA with."""
    mods = {"window": window, "softcap": softcap}
    scale = 1 / math.sqrt(128)
    pre, dec = [], []
    for T in seqs:
        B = max(1, tokens // T)
        sets = [prefill_inputs(jax.random.key(500 + i), B, T, 16, 8, 128) for i in range(2)]
        q, k, v, pos, kvl = sets[0]
        rows = sorted({0, (T // 2) // 128 * 128, T - 128})

        def check(f, mods=mods):
            return check_prefill_rows(f(q, k, v, pos, kvl), q, k, v, pos, kvl, scale, rows,
                                      **mods)
        row = {"seq": T, "batch": B,
               "blocks": streamed_blocks(pos, kvl, T, window) / streamed_blocks(
                   pos, kvl, T, None)}
        iters = max(4, min(50, int(2e13 // (2 * B * 16 * T * min(T, window) * 128)) + 4))
        _timed("window", backend_fn("ours-prefill", scale, **mods), sets, iters, check, row, log)
        _timed("full", backend_fn("ours-prefill", scale), sets, iters,
               functools.partial(check, mods={}), row, log)
        _timed("xla", backend_fn("xla", scale, **mods), sets, iters, None, row, log)
        log(json.dumps(row))
        print("prefill-window " + _brief(row), flush=True)
        pre.append(row)
    for B in batches:
        for S in ctxs:
            R = rotations(B * S * 8 * 128 * 2 * 2)
            sets = [decode_inputs(jax.random.key(600 + i), B, S, 32, 8, 128) for i in range(R)]
            q, k, v, pos, kvl = sets[0]
            up = [a.astype(jnp.float32) for a in (q, k, v)]
            ref = attention_reference(*up, pos, kvl, causal=True, scale=scale, **mods)
            ref_full = attention_reference(*up, pos, kvl, causal=True, scale=scale)
            row = {"batch": B, "ctx": S}
            iters = max(R, 40 // R * R)
            for name, f, want in [("window", backend_fn("ours-decode", scale, **mods), ref),
                                  ("full", backend_fn("ours-decode", scale), ref_full),
                                  ("xla", backend_fn("xla", scale, **mods), None)]:
                check = None if want is None else (
                    lambda f, want=want: rel_err(f(q, k, v, pos, kvl), want))
                _timed(name, f, sets, iters, check, row, log)
            log(json.dumps(row))
            print("decode-window " + _brief(row), flush=True)
            dec.append(row)
    return pre, dec


def print_windowed(pre, dec, window, softcap):
    def f(x, fmt):
        return f"{'n/a':>{len(fmt.format(0.0))}}" if x != x else fmt.format(x)
    cap = f", softcap {softcap:g}" if softcap else ""
    print(f"\nprefill, sliding window {window}{cap}: 16 heads (8 kv), head_dim 128, bf16, "
          f"32k tokens per batch (ms per call)")
    print(f"{'seq':>6} {'batch':>5} {'window':>8} {'full':>8} {'xla':>8} {'full/window':>11} "
          f"{'xla/window':>10} {'blocks':>7}")
    for r in pre:
        w, fu, x = r["window_ms"], r["full_ms"], r["xla_ms"]
        print(f"{r['seq']:>6} {r['batch']:>5} {f(w, '{:8.3f}')} {f(fu, '{:8.3f}')} "
              f"{f(x, '{:8.3f}')} {f(fu / w, '{:10.2f}x')} {f(x / w, '{:9.2f}x')} "
              f"{r['blocks']:>6.0%}")
    print(f"\ndecode, sliding window {window}{cap}: 32 q / 8 kv heads, head_dim 128, bf16 "
          f"(us per call)")
    print(f"{'batch':>5} {'ctx':>6} {'window':>8} {'full':>8} {'xla':>8} {'full/window':>11} "
          f"{'xla/window':>10}")
    for r in dec:
        w, fu, x = (r[f"{n}_ms"] * 1e3 for n in ("window", "full", "xla"))
        print(f"{r['batch']:>5} {r['ctx']:>6} {f(w, '{:8.1f}')} {f(fu, '{:8.1f}')} "
              f"{f(x, '{:8.1f}')} {f(fu / w, '{:10.2f}x')} {f(x / w, '{:9.2f}x')}")
    errs = [(k, r[k]) for r in pre + dec for k in r if k.endswith("_error")]
    if errs:
        print(f"\n{len(errs)} failures; first: {errs[0][0]}: {errs[0][1][:800]}")


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="fewer sizes")
    ap.add_argument("--variants", action="store_true", help="also time alternative configs")
    ap.add_argument("--json", default=None, help="write all numbers here")
    ap.add_argument("--log", default=None, help="append details here")
    ap.add_argument("--seqs", default=None, help="prefill lengths, comma separated")
    ap.add_argument("--ctxs", default=None, help="decode contexts, comma separated")
    ap.add_argument("--batches", default="1,8,64", help="decode batch sizes")
    ap.add_argument("--tokens", type=int, default=32768, help="prefill tokens per batch")
    ap.add_argument("--kv-cache", default=None, choices=["int8", "fp8"],
                    help="instead: decode over a quantized KV cache (our kernel and XLA's "
                         "dots reading the codes, the old dequantize-then-kernel path, the "
                         "bf16 cache with our kernel)")
    ap.add_argument("--kv-heads", type=int, default=8, help="decode kv heads (32 query heads)")
    ap.add_argument("--heads", type=int, default=32, help="--paged: query heads")
    ap.add_argument("--head-dim", type=int, default=128, help="--paged: head_dim")
    ap.add_argument("--alibi", action="store_true", help="--paged: ALiBi slopes (BLOOM's)")
    ap.add_argument("--smoke", action="store_true",
                    help="--paged: one tiny shape, runs anywhere (CPU: the interpreter)")
    ap.add_argument("--paged", action="store_true",
                    help="instead: the paged decode kernel vs the contiguous one (with "
                         "--kv-cache: over int8 / fp8 codes)")
    ap.add_argument("--page-sizes", default="16,32,64,128", help="--paged page sizes")
    ap.add_argument("--window", type=int, default=None,
                    help="instead: our kernels with this sliding window vs without vs XLA")
    ap.add_argument("--softcap", type=float, default=None,
                    help="with --window: attention-logit soft-capping C")
    args = ap.parse_args(argv)
    if args.softcap is not None and args.window is None and not args.paged:
        ap.error("--softcap goes with --window (or --paged)")
    if (args.alibi or args.smoke) and not args.paged:
        ap.error("--alibi and --smoke go with --paged")

    logf = open(args.log, "a") if args.log else None  # noqa: SIM115 - lives for the run

    def log(msg):
        if logf:
            logf.write(msg + "\n")
            logf.flush()

    dev = jax.devices()[0]
    import jaxlib
    header = (f"device: {dev.device_kind} ({dev.platform}, {getattr(dev, 'core_count', '?')} SMs)"
              f" | jax {jax.__version__} jaxlib {jaxlib.__version__}"
              f" | {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}")
    print(header, flush=True)
    log(header)
    n_copy = 2**20 if args.smoke else 2**29
    bw = copy_bandwidth_gbs(n_copy)
    print(f"measured copy bandwidth ({n_copy * 2 / 2**20:.0f} MiB, read + write): "
          f"{bw:.0f} GB/s", flush=True)

    ints = lambda s: [int(x) for x in s.split(",") if x]  # noqa: E731
    seqs = [1024, 4096, 16384] if args.quick else [1024, 2048, 4096, 8192, 16384]
    ctxs = [1024, 4096, 32768] if args.quick else [1024, 2048, 4096, 8192, 16384, 32768]
    seqs = ints(args.seqs) if args.seqs is not None else seqs
    ctxs = ints(args.ctxs) if args.ctxs is not None else ctxs
    if args.paged:
        N, K, H = args.heads, args.kv_heads, args.head_dim
        batches, page_sizes = ints(args.batches), ints(args.page_sizes)
        if args.smoke:
            N, K, H, batches, ctxs, page_sizes = 4, 1, 64, [2], [128], [16, 64]
        mods = {"window": args.window, "softcap": args.softcap,
                "alibi_slopes": alibi_slopes_for(N) if args.alibi else None}
        mods = {k: v for k, v in mods.items() if v is not None}
        rows, names, per_key = run_decode_paged(batches, ctxs, N, K, H, log, page_sizes,
                                                args.kv_cache, args.variants, mods, args.smoke)
        text = "".join(f", {k} {v}" for k, v in (("window", args.window),
                                                  ("softcap", args.softcap)) if v is not None)
        print_paged(rows, names, per_key, bw, N, K, H, args.kv_cache,
                    text + (", ALiBi" if args.alibi else ""))
        if args.json:
            with open(args.json, "w") as fh:
                json.dump({"header": header, "copy_gbs": bw, "decode_paged": rows}, fh,
                          indent=1)
        return 1 if any(k.endswith("_error") for r in rows for k in r) else 0
    if args.window is not None:
        pre, dec = run_windowed(
            ints(args.seqs) if args.seqs else [4096, 8192, 16384, 32768], args.tokens,
            ints(args.batches), ints(args.ctxs) if args.ctxs else [4096, 16384, 32768],
            args.window, args.softcap, log)
        print_windowed(pre, dec, args.window, args.softcap)
        if args.json:
            with open(args.json, "w") as fh:
                json.dump({"header": header, "window": args.window, "softcap": args.softcap,
                           "prefill": pre, "decode": dec}, fh, indent=1)
        return 0
    if args.kv_cache:
        rows = run_decode_quantized(ints(args.batches), ctxs, 32, args.kv_heads, 128, log,
                                    args.kv_cache)
        print(f"\ndecode over a {args.kv_cache} KV cache: 32 q / {args.kv_heads} kv heads, "
              f"head_dim 128 (us per call; GB/s of the cache bytes each reads)")
        print(f"{'batch':>5} {'ctx':>6} {'bf16 kernel':>12} {args.kv_cache + ' kernel':>12} "
              f"{args.kv_cache + ' dots':>12} {'dequant+kernel':>15} {'kernel GB/s':>11} "
              f"{'dots GB/s':>9} {'kernel vs bf16':>14} {'kernel vs dots':>14}")
        for r in rows:
            cache_bytes = r["batch"] * r["ctx"] * args.kv_heads * (128 + 4) * 2
            dots, kern = r["dots_us"], r["quant_kernel_us"]
            print(f"{r['batch']:>5} {r['ctx']:>6} {r['bf16_kernel_us']:>12.1f} {kern:>12.1f} "
                  f"{dots:>12.1f} {r['dequant_kernel_us']:>15.1f} "
                  f"{cache_bytes / kern / 1e3:>11.0f} {cache_bytes / dots / 1e3:>9.0f} "
                  f"{r['bf16_kernel_us'] / kern:>13.2f}x {dots / kern:>13.2f}x")
        if args.json:
            with open(args.json, "w") as fh:
                json.dump({"header": header, "copy_gbs": bw, "decode_kv": rows}, fh, indent=1)
        return 0
    pre = run_prefill(seqs, args.tokens, 16, 128, log, variants=args.variants)
    dec = run_decode(ints(args.batches), ctxs, 32, 8, 128, log, variants=args.variants)

    def f(x, fmt="{:7.0f}"):
        return "    n/a" if math.isnan(x) else fmt.format(x)

    extra_p = [c for c in (pre[0] if pre else {}) if c.startswith("ours-") and
               not c.endswith(("_err", "_ms", "_error"))]
    print("\nprefill: causal, bf16, head_dim 128, 16 heads, 32k tokens per batch (TFLOP/s)")
    print(f"{'seq':>6} {'batch':>5} {'ours':>7} {'cudnn':>7} {'xla':>7} {'ours/cudnn':>10}"
          + "".join(f" {c:>12}" for c in extra_p))
    for r in pre:
        ratio = r["ours"] / r["cudnn"] if r["cudnn"] == r["cudnn"] and r["cudnn"] else float("nan")
        print(f"{r['seq']:>6} {r['batch']:>5} {f(r['ours'])} {f(r['cudnn'])} {f(r['xla'])} "
              f"{f(ratio, '{:10.2f}')}" + "".join(f" {f(r.get(c, float('nan')), '{:12.0f}')}"
                                                   for c in extra_p))
    extra_d = [c for c in (dec[0] if dec else {}) if c.startswith("ours-") and
               not c.endswith(("_err", "_us", "_error"))]
    print(f"\ndecode: 32 q / 8 kv heads, head_dim 128, bf16 (GB/s of K/V read; copy = {bw:.0f})")
    print(f"{'batch':>5} {'ctx':>6} {'ours':>7} {'cudnn':>7} {'xla':>7} {'ours/copy':>9} "
          f"{'ours us':>8}" + "".join(f" {c:>14}" for c in extra_d))
    for r in dec:
        print(f"{r['batch']:>5} {r['ctx']:>6} {f(r['ours'])} {f(r['cudnn'])} {f(r['xla'])} "
              f"{f(r['ours'] / bw, '{:9.2f}')} {f(r.get('ours_us', float('nan')), '{:8.1f}')}"
              + "".join(f" {f(r.get(c, float('nan')), '{:14.0f}')}" for c in extra_d))
    errs = [(k, r[k]) for r in pre + dec for k in r if k.endswith("_error")]
    if errs:
        print(f"\n{len(errs)} failures; first: {errs[0][0]}: {errs[0][1][:800]}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"header": header, "copy_gbs": bw, "prefill": pre, "decode": dec}, fh,
                      indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
