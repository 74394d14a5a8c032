"""Generation speed against the card's ceilings and against Hugging Face, in one run.

    python benchmarks/generate.py --presets gpt3-1.3b gpt3-6.7b --batches 1 64 --prompts 128
    jaxformer bench --presets gpt3-1.3b --batches 1 64 --prompts 128   # the same command
    python benchmarks/generate.py --tiny        # a CPU smoke run of the same code
    python benchmarks/generate.py --presets llama-7b --batches 1 256 --prompts 128 2048 \
        --quantize none,int8,int4,fp8            # bf16 and quantized rows side by side

For each preset (random weights, bf16), prompt length and batch: time to first token (prefill
plus the first sample), per-token decode latency, output tokens/s and peak device memory.
The card's ceilings are measured in the same run (a large device copy for bandwidth, a large
bf16 matmul for FLOP/s), giving decode bandwidth utilisation (weights + KV bytes read per step
/ step time / measured bandwidth) and prefill FLOP utilisation. With --hf, the same shapes run
through transformers (static KV cache, torch.compile'd decode) for a ratio on every row.
With --quantize, every shape runs once per mode (none = the dtype alone; int8, int4,
int4-g<N>, fp8, fp8-tensor: jaxformer.quant, FP8 calibrated on random ids), rows side by
side: decode step time at batch 1 is the weight-only win, prefill (TTFT) at long prompts the
FP8 one. MFU stays relative to the measured bf16 matmul ceiling.
"""
from __future__ import annotations

import argparse
import gc
import json
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np


def _median_time(fn, reps=5):
    fn()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return float(np.median(ts))


def ceilings(tiny: bool) -> dict:
    """Measured copy bandwidth (bytes read + written per second) and bf16 matmul FLOP/s."""
    n = (1 << 20) if tiny else (1 << 30)  # 2 GiB of bf16 per buffer on the GPU
    x = jnp.ones((n,), jnp.bfloat16) * 1.5
    copy = jax.jit(lambda a: a + 1)
    t = _median_time(lambda: copy(x).block_until_ready())
    bw = 2 * x.nbytes / t
    m = 512 if tiny else 8192
    a = jax.random.normal(jax.random.key(0), (m, m), jnp.bfloat16)
    b = jax.random.normal(jax.random.key(1), (m, m), jnp.bfloat16)
    mm = jax.jit(lambda p, q: p @ q)
    t = _median_time(lambda: mm(a, b).block_until_ready())
    del x, a, b
    return {"copy_GBps": bw / 1e9, "matmul_TFLOPs": 2 * m ** 3 / t / 1e12}


def peak_bytes() -> int | None:
    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use")


def run_jax(cfg, batch: int, prompt: int, new: int, dtype: str, attention="auto",
            seed=0, quantize=None) -> dict:
    import jaxformer as jf
    from jaxformer import memory
    from jaxformer.generate import _Run

    model = jf.Model.random(cfg, dtype=dtype, seed=seed, attention=attention,
                            quantize=quantize)
    # counted from the plan: jax reports int4 arrays at a byte per element
    weight_bytes = memory.weights_bytes(cfg, None, dtype, quantize=quantize)
    rng = np.random.default_rng(seed)
    prompts = rng.integers(0, cfg.vocab_size, (batch, prompt)).tolist()
    run = _Run(model, prompts, new, None, seed, ignore_eos=True)

    def once():
        s = run.prefill()
        jax.block_until_ready(s.last)
        t1 = time.perf_counter()
        s = run.decode(s, new)
        jax.block_until_ready(s.out)
        return t1, time.perf_counter(), s

    t0 = time.perf_counter()
    once()  # compile
    compile_s = time.perf_counter() - t0
    ttft, step = [], []
    for _ in range(3):
        t0 = time.perf_counter()
        t1, t2, s = once()
        ttft.append(t1 - t0)
        step.append((t2 - t1) / (new - 1))
    assert int((np.asarray(s.out[:batch]) >= 0).sum()) == batch * new
    ttft, step = float(np.median(ttft)), float(np.median(step))
    L, K, H = cfg.num_layers, cfg.kv_heads, cfg.dims_per_head
    itemsize = jnp.dtype(dtype).itemsize
    avg_ctx = prompt + new / 2
    kv_bytes = 2 * L * batch * avg_ctx * K * H * itemsize  # k and v actually needed per step
    flops_prefill = 2 * batch * prompt * cfg.num_params() \
        + 2 * 2 * L * batch * prompt * prompt / 2 * cfg.num_heads * H
    out = dict(ttft_ms=ttft * 1e3, step_ms=step * 1e3,
               tok_s=batch * new / (ttft + step * (new - 1)),
               weight_GB=weight_bytes / 1e9, step_bytes=weight_bytes + kv_bytes,
               prefill_flops=flops_prefill, compile_s=compile_s, peak_GB=(peak_bytes() or 0) / 1e9)
    for leaf in jax.tree.leaves(model.params):  # free now: compiled closures keep models alive
        leaf.delete()
    del model, run, s
    gc.collect()
    return out


def run_hf(cfg, batch: int, prompt: int, new: int) -> dict | None:
    """transformers GPT-2 architecture at the preset's shapes, static cache, compiled decode."""
    try:
        import torch
        import transformers
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    hc = transformers.GPT2Config(
        vocab_size=cfg.vocab_size, n_positions=cfg.max_position_embeddings,
        n_embd=cfg.hidden_size, n_layer=cfg.num_layers, n_head=cfg.num_heads,
        n_inner=cfg.mlp_size, activation_function="gelu_new", bos_token_id=None,
        eos_token_id=None)
    with torch.device("cuda"):
        model = transformers.GPT2LMHeadModel(hc).to(torch.bfloat16).eval()
    # transformers compiles the decode step itself when the cache is static (its documented
    # fast path); wrapping forward by hand breaks its CUDA-graph bookkeeping.
    model.generation_config.cache_implementation = "static"
    ids = torch.randint(0, cfg.vocab_size, (batch, prompt), device="cuda")
    kw = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0,
              attention_mask=torch.ones_like(ids))

    def timed(n_new):
        torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.no_grad():
            model.generate(ids, **{**kw, "max_new_tokens": n_new, "min_new_tokens": n_new})
        torch.cuda.synchronize()
        return time.perf_counter() - t

    timed(new)
    timed(new)  # compile both graph shapes, warm the cudagraphs
    t_first = float(np.median([timed(1) for _ in range(3)]))
    t_all = float(np.median([timed(new) for _ in range(3)]))
    out = dict(ttft_ms=t_first * 1e3, step_ms=(t_all - t_first) / (new - 1) * 1e3,
               tok_s=batch * new / t_all)
    del model
    gc.collect()
    torch.cuda.empty_cache()
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", nargs="+", default=["gpt3-1.3b", "gpt3-6.7b", "gpt3-13b"])
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 8, 64, 256])
    ap.add_argument("--prompts", nargs="+", type=int, default=[128, 2048])
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--attention", default="auto", choices=["auto", "xla", "cudnn", "pallas"])
    ap.add_argument("--hf", action="store_true", help="also run transformers (needs CUDA torch)")
    ap.add_argument("--tiny", action="store_true", help="CPU smoke run on a tiny config")
    ap.add_argument("--json", help="write all rows to this file")
    ap.add_argument("--quantize", default="none",
                    help="comma-separated modes per shape: none,int8,int4,int4-g<N>,fp8,"
                         "fp8-tensor (default: none)")
    args = ap.parse_args(argv)
    import jaxformer as jf
    from jaxformer.quant.spec import name

    modes = [None if m.strip() in ("", "none") else name(m.strip(), "--quantize")
             for m in args.quantize.split(",")]

    dev = jax.devices()[0]
    print(f"# device: {dev.device_kind} x{jax.device_count()}  jax {jax.__version__}")
    ceil = ceilings(args.tiny)
    print(f"# measured ceilings: copy {ceil['copy_GBps']:.0f} GB/s, "
          f"bf16 matmul {ceil['matmul_TFLOPs']:.0f} TFLOP/s")
    rows = []
    presets = ["demo"] if args.tiny else args.presets
    for preset in presets:
        cfg = jf.ModelConfig.from_preset(preset)
        for prompt in args.prompts:
            for batch in args.batches:
                if prompt + args.new > cfg.max_position_embeddings:
                    continue
                hf = run_hf(cfg, batch, prompt, args.new) if args.hf else None
                for mode in modes:
                    try:
                        r = run_jax(cfg, batch, prompt, args.new, args.dtype, args.attention,
                                    quantize=mode)
                    except Exception as e:  # out of memory at large batch: report, go on
                        print(f"# {preset} b={batch} p={prompt} {mode or args.dtype}: jax "
                              f"failed: {type(e).__name__}: {str(e)[:200]}", flush=True)
                        continue
                    r.update(preset=preset, batch=batch, prompt=prompt, quant=mode or "none",
                             mbu=r["step_bytes"] / (r["step_ms"] / 1e3)
                             / (ceil["copy_GBps"] * 1e9),
                             mfu=r["prefill_flops"] / (r["ttft_ms"] / 1e3)
                             / (ceil["matmul_TFLOPs"] * 1e12), hf=hf)
                    rows.append(r)
                    _print_row(r)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=dev.device_kind, jax=jax.__version__, ceilings=ceil,
                           rows=rows), f, indent=1)
    return 0


HEADER = (f"{'preset':<11}{'quant':>9}{'batch':>6}{'prompt':>7}{'TTFT ms':>9}{'step ms':>9}"
          f"{'tok/s':>9}{'MBU':>6}{'MFU':>6}{'peak GB':>8}{'compile s':>10}{'HF step':>9}"
          f"{'HF tok/s':>9}{'x HF':>6}")
_printed = False


def _print_row(r):
    global _printed
    if not _printed:
        print(HEADER)
        _printed = True
    hf = r["hf"] or {}
    ratio = r["tok_s"] / hf["tok_s"] if hf else float("nan")
    print(f"{r['preset']:<11}{r['quant']:>9}{r['batch']:>6}{r['prompt']:>7}{r['ttft_ms']:>9.1f}"
          f"{r['step_ms']:>9.2f}{r['tok_s']:>9.0f}{r['mbu']:>6.0%}{r['mfu']:>6.0%}"
          f"{r['peak_GB']:>8.1f}{r['compile_s']:>10.1f}{hf.get('step_ms', float('nan')):>9.2f}"
          f"{hf.get('tok_s', float('nan')):>9.0f}{ratio:>6.2f}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
