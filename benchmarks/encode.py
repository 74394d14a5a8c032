"""Encoder speed (BERT, sentence embeddings) against the card's matmul rate and transformers.

    python benchmarks/encode.py --hf                     # the full table on a GPU
    python benchmarks/encode.py --presets bert-large --dtypes float16 --seqs 384 \
        --batches 128 --hf                               # TensorRT's BERT-large row
    python benchmarks/encode.py --varlen --hf            # + variable lengths: padded vs packed
    python benchmarks/encode.py --smoke                  # a CPU run of the same code, tiny

Per preset (random weights), dtype, quantization, sequence length S and batch B: one
compiled call of Model.embed's program (the encoder plus mean pooling, inputs already on
the device, output [B, D]) timed `--iters` times after warm-up: latency average and p99,
tokens/s (B x S / average), and FLOP utilisation (2 x B x S x the non-embedding weights
+ 4 x B x S^2 x D x L for attention, over the average, against the bf16 matmul rate
measured in the same run: harness.ceilings). With --hf, transformers' BertModel (or
MegatronBertModel) runs the same shapes in a child process first (sdpa attention, eager
and torch.compile'd), so the two never share the GPU, and every row gets the ratio.
With --varlen each batch's lengths are drawn uniformly from [S/4, S] (seeded; the same for
both layouts and transformers, whose rows are padded to S with an attention mask): the
padded layout against the packed one (jaxformer.embed: no padding FLOPs), tokens/s counting
real tokens only, and FLOP utilisation the real tokens' FLOPs.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, HERE)

import jax  # noqa: E402
import numpy as np  # noqa: E402

import harness  # noqa: E402
import jaxformer as jf  # noqa: E402
from jaxformer import embed as E  # noqa: E402
from jaxformer.quant.spec import name as quant_name  # noqa: E402

PRESETS = ["bert-base", "bert-large", "megatron-bert-345m"]
FULL = dict(dtypes=["bfloat16", "float16"], seqs=[128, 384], batches=[1, 8, 32, 128],
            iters=100)
# --smoke: a 2-layer BERT of width 64 on the CPU, transformers eager on the CPU too
SMOKE = dict(dtypes=["float32"], seqs=[16], batches=[1, 2], iters=3)
SMOKE_CFG = dict(vocab_size=512, hidden_size=64, num_layers=2, num_heads=4, ffn_size=128,
                 max_position_embeddings=64, mlm_head=False, binary_head=False)


def config(preset: str) -> jf.ModelConfig:
    if preset == "bert-smoke":
        return jf.ModelConfig.from_preset("bert-base").replace(name=preset, **SMOKE_CFG)
    cfg = jf.ModelConfig.from_preset(preset)
    if cfg.arch != "encoder":
        raise ValueError(f"preset {preset!r} is a {cfg.arch}, not an encoder")
    return cfg


def flops(cfg, lengths) -> float:
    """Forward FLOPs of texts of these lengths: 2 per weight per token (embeddings and
    heads aside) plus QK^T and PV (4 S^2 D per layer per text)."""
    D, F, L = cfg.hidden_size, cfg.mlp_size, cfg.num_layers
    per_token = 2 * L * (4 * D * D + 2 * D * F)
    return float(sum(per_token * n + 4 * L * n * n * D for n in lengths))


def low_id(cfg) -> int:
    """Random ids from here up: past BERT's special and unused tokens."""
    return min(1000, cfg.vocab_size // 2)


def lengths_for(batch: int, seq: int, varlen: bool, seed: int = 0) -> list[int]:
    if not varlen:
        return [seq] * batch
    rng = np.random.default_rng(seed + 1000 * batch + seq)
    return rng.integers(max(1, seq // 4), seq + 1, batch).tolist()


def timed(call, iters: int) -> tuple[float, float, float, float]:
    """(average, p99, median until the call returns, average per call back to back) seconds
    of `iters` blocking calls after three warm-up calls. The third is the host's dispatch;
    the fourth, with `iters` calls in flight before one wait, hides it behind the device."""
    for _ in range(3):
        jax.block_until_ready(call())
    ts, rets = [], []
    for _ in range(iters):
        t = time.perf_counter()
        out = call()
        rets.append(time.perf_counter() - t)
        jax.block_until_ready(out)
        ts.append(time.perf_counter() - t)
    t = time.perf_counter()
    outs = [call() for _ in range(iters)]
    jax.block_until_ready(outs)
    piped = (time.perf_counter() - t) / iters
    return float(np.mean(ts)), float(np.percentile(ts, 99)), float(np.median(rets)), piped


def jax_call(model, lengths: list[int], packed: bool, seed: int = 0):
    """(Model.embed's compiled program, its arguments after params on the device, the
    batch's ids shape) for random texts of these lengths."""
    cfg = model.config
    rng = np.random.default_rng(seed)
    seqs = [(rng.integers(low_id(cfg), cfg.vocab_size, n).astype(np.int32),
             np.zeros(n, np.int32))
            for n in lengths]
    data = model.mesh.shape["data"]
    b = E.packed_batch(seqs, data) if packed else \
        E.padded_batch(seqs, cfg.max_position_embeddings, data)
    # everything on the device before the clock starts: the call alone is timed
    rep = jax.sharding.NamedSharding(model.mesh, jax.sharding.PartitionSpec())
    args = E.device_args(model, b) + [jax.device_put(x, rep) for x in E.knobs("mean", False)]
    return E.compiled(model, packed), args, list(b.ids.shape)


def run_jax(model, lengths: list[int], packed: bool, iters: int, seed: int = 0) -> dict:
    fn, args, shape = jax_call(model, lengths, packed, seed)
    t0 = time.perf_counter()
    jax.block_until_ready(fn(model.params, *args))
    compile_s = time.perf_counter() - t0
    avg, p99, ret, piped = timed(lambda: fn(model.params, *args), iters)
    return dict(avg_ms=avg * 1e3, p99_ms=p99 * 1e3, return_ms=ret * 1e3, piped_ms=piped * 1e3,
                compile_s=compile_s,
                tokens=int(sum(lengths)), shape=shape)


# ---- transformers, in a child process -------------------------------------------------
def hf_model(cfg, dtype: str, device: str):
    import torch
    import transformers
    kw = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
              num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
              intermediate_size=cfg.mlp_size, max_position_embeddings=cfg.max_position_embeddings,
              type_vocab_size=cfg.type_vocab_size or 2, layer_norm_eps=cfg.norm_eps,
              attn_implementation="sdpa")
    pre_ln = cfg.norm_position == "pre"
    cls = transformers.MegatronBertModel if pre_ln else transformers.BertModel
    hc = (transformers.MegatronBertConfig if pre_ln else transformers.BertConfig)(**kw)
    with torch.device(device):
        model = cls(hc, add_pooling_layer=cfg.pooler).to(getattr(torch, dtype)).eval()
    return model


def run_hf(cfg, dtype, lengths, seq, iters, compile_: bool, device: str) -> dict:
    import torch
    model = hf_model(cfg, dtype, device)
    B = len(lengths)
    ids = torch.randint(low_id(cfg), cfg.vocab_size, (B, seq), device=device)
    mask = (torch.arange(seq, device=device)[None] < torch.tensor(lengths, device=device)[:, None])
    mask = mask.long()
    fwd = torch.compile(model) if compile_ else model

    def call():
        with torch.no_grad():
            h = fwd(input_ids=ids, attention_mask=mask).last_hidden_state
            m = mask[..., None].to(h.dtype)
            out = (h * m).sum(1) / m.sum(1)  # the same mean pooling
        if device == "cuda":
            torch.cuda.synchronize()
        return out

    t0 = time.perf_counter()
    call()
    compile_s = time.perf_counter() - t0
    for _ in range(3):
        call()
    ts = []
    for _ in range(iters):
        t = time.perf_counter()
        call()
        ts.append(time.perf_counter() - t)
    del model  # (fwd and call go with this frame)
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return dict(avg_ms=float(np.mean(ts)) * 1e3, p99_ms=float(np.percentile(ts, 99)) * 1e3,
                compile_s=compile_s)


def _hf_worker(shapes: list, iters: int, smoke: bool) -> None:
    """Child: transformers at each (preset, dtype, seq, batch, varlen, compile); a JSON
    line each (HFROW ...)."""
    import torch
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch._dynamo.config.cache_size_limit = 64
    for preset, dtype, seq, batch, varlen, comp in shapes:
        key = [preset, dtype, seq, batch, varlen, comp]
        if device == "cpu" and not smoke:
            r = {"error": "no CUDA build of torch"}
        else:
            try:
                r = run_hf(config(preset), dtype, lengths_for(batch, seq, varlen), seq, iters,
                           comp, device)
            except Exception as e:  # noqa: BLE001 - report and go on with the next shape
                r = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
        print("HFROW " + json.dumps(dict(key=key, **r)), flush=True)


def hf_rows(shapes: list, iters: int, smoke: bool, timeout: float | None) -> dict:
    """_hf_worker in a fresh process (before this one's jax claims the GPU)."""
    rows = harness.child_rows(
        "encode", f"_hf_worker(json.loads(sys.argv[1]), {int(iters)}, {bool(smoke)})", shapes,
        timeout)
    return {tuple(r.pop("key")): r for r in rows}


# ---- the table ------------------------------------------------------------------------
def parser():
    ap = argparse.ArgumentParser(prog="benchmarks/encode.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", nargs="+", default=PRESETS)
    ap.add_argument("--dtypes", nargs="+", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--quantize", default="none",
                    help="comma-separated: none,int8,fp8,... (jaxformer.quant; FP8 calibrated "
                         "on random ids)")
    ap.add_argument("--seqs", nargs="+", type=int, help="sequence lengths (default 128 384)")
    ap.add_argument("--batches", nargs="+", type=int, help="batch sizes (default 1 8 32 128)")
    ap.add_argument("--iters", type=int, help="timed calls per row (default 100)")
    ap.add_argument("--attention", default="auto", choices=["auto", "xla", "cudnn", "pallas"])
    ap.add_argument("--varlen", action="store_true",
                    help="also variable lengths in [S/4, S]: padded and packed rows")
    ap.add_argument("--hf", action="store_true", help="also transformers (sdpa, compiled)")
    ap.add_argument("--no-compile", action="store_true", help="transformers eager only")
    ap.add_argument("--hf-timeout", type=float, default=None)
    ap.add_argument("--smoke", action="store_true", help="tiny CPU run of the same code")
    ap.add_argument("--json", help="write all rows to this file")
    return ap


def main(argv=None) -> int:
    ap = parser()
    args = ap.parse_args(argv)
    defaults = SMOKE if args.smoke else FULL
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    presets = ["bert-smoke"] if args.smoke else args.presets
    try:
        modes = [None if m.strip() in ("", "none") else quant_name(m.strip(), "--quantize")
                 for m in args.quantize.split(",")]
        for p in presets:
            config(p)
    except (ValueError, FileNotFoundError) as e:
        ap.error(str(e))
    for field in ("seqs", "batches"):
        if any(v < 1 for v in getattr(args, field)):
            ap.error(f"--{field}: must be positive")
    layouts = [(False, False)] + ([(True, False), (True, True)] if args.varlen else [])
    comps = [False] if args.no_compile or args.smoke else [False, True]
    hf = {}
    if args.hf or args.smoke:
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
        shapes = [[p, d, s, b, v, c] for p in presets for d in args.dtypes for s in args.seqs
                  for b in args.batches for v in sorted({v for v, _ in layouts}) for c in comps
                  if s <= config(p).max_position_embeddings]
        hf = hf_rows(shapes, args.iters, args.smoke, args.hf_timeout)
    from harness import ceilings  # after the child: jax claims the GPU here
    dev = jax.devices()[0]
    print(f"# device: {dev.device_kind}  jax {jax.__version__}")
    ceil = ceilings(args.smoke)
    print(f"# measured bf16 matmul {ceil['matmul_TFLOPs']:.4g} TFLOP/s (FLOP utilisation is "
          f"against it)")
    print(HEADER)
    rows = []
    for preset in presets:
        cfg = config(preset)
        for dtype in args.dtypes:
            for mode in modes:
                model = jf.Model.random(cfg, dtype=dtype, attention=args.attention,
                                        quantize=mode)
                for seq in args.seqs:
                    if seq > cfg.max_position_embeddings:
                        continue
                    for batch in args.batches:
                        for varlen, packed in layouts:
                            r = _row(model, preset, dtype, mode, seq, batch, varlen, packed,
                                     args, ceil, hf, comps)
                            if r is not None:
                                rows.append(r)
                                _print(r)
                for leaf in jax.tree.leaves(model.params):
                    leaf.delete()
                del model
                gc.collect()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=dev.device_kind, jax=jax.__version__, ceilings=ceil,
                           rows=rows), f, indent=1)
    return 0


def _row(model, preset, dtype, mode, seq, batch, varlen, packed, args, ceil, hf, comps):
    lengths = lengths_for(batch, seq, varlen)
    try:
        r = run_jax(model, lengths, packed, args.iters)
    except Exception as e:  # out of memory and the like: report, go on
        print(f"# {preset} {dtype} {mode} S={seq} B={batch}: jax failed: "
              f"{type(e).__name__}: {str(e)[:200]}", flush=True)
        return None
    fl = flops(model.config, lengths)
    r.update(preset=preset, dtype=dtype, quant=mode or "none", seq=seq, batch=batch,
             layout=("packed" if packed else "padded") + (" varlen" if varlen else ""),
             tok_s=r["tokens"] / (r["avg_ms"] / 1e3),
             mfu=fl / (r["avg_ms"] / 1e3) / (ceil["matmul_TFLOPs"] * 1e12))
    if mode is None:  # transformers runs the float model (padded, with a mask)
        for c in comps:
            h = hf.get((preset, dtype, seq, batch, varlen, c))
            if h is not None:
                r["hf_compile" if c else "hf_sdpa"] = h
    return r


HEADER = (f"{'preset':<19}{'dtype':>9}{'quant':>10}{'S':>5}{'B':>5}{'layout':>15}"
          f"{'avg ms':>9}{'p99 ms':>9}{'ret ms':>8}{'pipe ms':>8}{'tok/s':>10}{'MFU':>6}"
          f"{'HF ms':>9}{'HFc ms':>9}"
          f"{'x HF':>7}{'compile s':>10}")


def _print(r):
    nan = float("nan")
    hf = [r.get(k, {}).get("avg_ms", nan) for k in ("hf_sdpa", "hf_compile")]
    best = min((h for h in hf if h == h), default=nan)
    print(f"{r['preset']:<19}{r['dtype']:>9}{r['quant']:>10}{r['seq']:>5}{r['batch']:>5}"
          f"{r['layout']:>15}{r['avg_ms']:>9.3f}{r['p99_ms']:>9.3f}{r['return_ms']:>8.3f}"
          f"{r['piped_ms']:>8.3f}{r['tok_s']:>10.0f}"
          f"{r['mfu']:>6.0%}{hf[0]:>9.3f}{hf[1]:>9.3f}{best / r['avg_ms']:>7.2f}"
          f"{r['compile_s']:>10.1f}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
