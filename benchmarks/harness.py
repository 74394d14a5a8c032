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
through transformers (static KV cache, torch.compile'd decode) for a ratio on every row;
transformers runs first, all of its rows in one child process, so the two never share GPU
memory (and jax then runs without preallocating the card: XLA_PYTHON_CLIENT_PREALLOCATE).
--largest adds, per preset and prompt, the largest batch the memory plan fits (jaxformer) and
transformers' best throughput at up to that batch (halved until it fits). Shapes the memory
plan says cannot fit are skipped with the plan's numbers.
With --quantize, every shape runs once per mode (none = the dtype alone; int8, int4,
int4-g<N>, fp8, fp8-tensor: jaxformer.quant, FP8 calibrated on random ids), rows side by
side: decode step time at batch 1 is the weight-only win, prefill (TTFT) at long prompts the
FP8 one. MFU stays relative to the measured bf16 matmul ceiling. --kv-cache none,int8 runs each
of those once per KV-cache mode too (RunConfig.kv_cache); the memory plan is asked per mode,
so a batch that fits only with an int8 cache runs for that mode and is skipped for the other.
"""
from __future__ import annotations

import gc
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import jaxformer as jf
from jaxformer import cache as kvc
from jaxformer import memory
from jaxformer.cache import KV_MODES
from jaxformer.cli_args import ATTENTION, Parser, UsageError, positive_float, positive_int
from jaxformer.engine import Engine, EngineConfig
from jaxformer.models import expert_params, num_active_params
from jaxformer.quant.spec import name
from jaxformer.sampling import GREEDY, row_params

# timed prefill + decode runs per row, medians reported: a TTFT is a few ms, and a median of
# three cannot settle a 3% comparison
TIMED_RUNS = 7


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


def gpu_kernel_events(trace_dir: str, plane: str | None = None) -> list[tuple[int, int, str]]:
    """(start ns, duration ns, kernel name) of every GPU kernel in a jax.profiler trace
    directory (CUPTI's device times); `plane` (e.g. "/device:GPU:0") keeps one device's.
    Empty off GPUs."""
    import glob
    import os
    events = []
    for path in glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True):
        for pl in jax.profiler.ProfileData.from_file(path).planes:
            if not pl.name.startswith("/device:GPU") or (plane and pl.name != plane):
                continue
            for line in pl.lines:
                if "Stream" in line.name or "Kernels" in line.name:
                    events += [(ev.start_ns, ev.duration_ns, ev.name) for ev in line.events]
    return events


def host_spans(trace_dir: str, prefix: str) -> list[tuple[int, int, str]]:
    """(start ns, duration ns, name) of every host event whose name starts with prefix (a
    jax.profiler.TraceAnnotation's) in a trace directory, in the GPU kernels' time base,
    by start."""
    import glob
    import os
    out = []
    for path in glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True):
        for pl in jax.profiler.ProfileData.from_file(path).planes:
            if pl.name.startswith("/device:"):
                continue
            for line in pl.lines:
                out += [(ev.start_ns, ev.duration_ns, ev.name) for ev in line.events
                        if ev.name.startswith(prefix)]
    return sorted(out)


def host_event(trace_dir: str, name: str) -> tuple[int, int] | None:
    """(start ns, duration ns) of the first host event called `name` (a
    jax.profiler.TraceAnnotation) in a trace directory, in the GPU kernels' time base."""
    return next(((s, d) for s, d, n in host_spans(trace_dir, name) if n == name), None)


def timeline(events: list[tuple[int, int, str]], call: tuple[int, int] | None) -> dict:
    """Where a traced call's wall time went, from its kernels (gpu_kernel_events) and the
    host annotation around it (host_event), all in ms: `before` the first kernel starts
    (host dispatch), the device `span` from first start to last end, the `kernels`' summed
    time, the `idle` time inside the span and what is left `after` the last kernel."""
    if not events:
        return {}
    events = sorted(events)
    first, last = events[0][0], max(s + d for s, d, _ in events)
    idle, end = 0, first
    for s, d, _ in events:
        idle += max(0, s - end)
        end = max(end, s + d)
    out = dict(span=(last - first) / 1e6, kernels=sum(d for _, d, _ in events) / 1e6,
               idle=idle / 1e6)
    if call is not None:
        out.update(before=(first - call[0]) / 1e6, after=(call[0] + call[1] - last) / 1e6)
    return out


def decode_kv_bytes(cfg, batch: int, prompt: int, new: int, dtype, kv_cache=None) -> float:
    """K and V bytes a decode step reads on average over `new` steps after `prompt` (a
    quantized cache: its codes and scales), on one device."""
    per_slot = memory.kv_cache_bytes(cfg, None, dtype, batch, 1, kv_cache=kv_cache)
    return (prompt + new / 2) * per_slot


def read_weight_bytes(cfg, batch: int, weight_bytes: float, dtype, quantize=None) -> float:
    """Weight bytes a decode step of `batch` rows reads: a mixture of experts reads, per
    layer, only the experts its rows chose: E (1 - (1 - k/E)^B) of them expected under
    uniform routing (k at batch 1), not all E."""
    if not cfg.num_experts:
        return weight_bytes
    E, k = cfg.num_experts, cfg.experts_per_token
    spec = jf.RunConfig(quantize=quantize).quant_spec
    per_expert = expert_params(cfg) * (spec.weight_bits / 8 if spec else
                                       jnp.dtype(dtype).itemsize)
    idle = E - E * (1 - (1 - k / E) ** batch)
    return weight_bytes - cfg.num_layers * idle * per_expert


def run_jax(cfg, batch: int, prompt: int, new: int, dtype: str, attention="auto",
            seed=0, quantize=None, kv_cache=None) -> dict:

    model = jf.Model.random(cfg, dtype=dtype, seed=seed, attention=attention,
                            quantize=quantize, kv_cache=kv_cache)
    # counted from the plan: jax reports int4 arrays at a byte per element
    weight_bytes = memory.weights_bytes(cfg, None, dtype, quantize=quantize)
    rng = np.random.default_rng(seed)
    prompts = rng.integers(0, cfg.vocab_size, (batch, prompt)).tolist()
    rows = kvc.cache_rows(batch, 1)
    slots = kvc.cache_slots(kvc.bucket(prompt, cfg.max_position_embeddings), prompt, new,
                            cfg.max_position_embeddings)
    engine = Engine(model, EngineConfig(slots=rows, max_length=slots, window=new,
                                        features=row_params([GREEDY], 1)[1], stop_ids=1,
                                        stop_strings=1))

    # the request's arrays are built once, as a server builds them on arrival: TTFT times
    # the compiled prefill (and the decode loop compiled ahead of it once)
    prefill, args = engine.prefill_call(prompts, [GREEDY] * batch, [new] * batch,
                                        [seed] * batch, rows=rows, cache_len=slots,
                                        ignore_eos=True)
    engine.compile_decode(prefill, args)

    def once():
        s = prefill(*args)
        jax.block_until_ready(s.last)
        t1 = time.perf_counter()
        s = engine.step(s, until=new)
        jax.block_until_ready(s.out)
        return t1, time.perf_counter(), s

    t0 = time.perf_counter()
    once()  # compile
    compile_s = time.perf_counter() - t0
    ttft, step = [], []
    for _ in range(TIMED_RUNS):
        s = None  # the last run's cache goes before the next prefill allocates one
        t0 = time.perf_counter()
        t1, t2, s = once()
        ttft.append(t1 - t0)
        step.append((t2 - t1) / (new - 1))
    assert int((np.asarray(s.out[:batch]) >= 0).sum()) == batch * new
    ttft, step = float(np.median(ttft)), float(np.median(step))
    kv_bytes = decode_kv_bytes(cfg, batch, prompt, new, dtype, kv_cache)
    L, H = cfg.num_layers, cfg.dims_per_head
    flops_prefill = 2 * batch * prompt * num_active_params(cfg) \
        + 2 * 2 * L * batch * prompt * prompt / 2 * cfg.num_heads * H
    out = dict(ttft_ms=ttft * 1e3, step_ms=step * 1e3,
               tok_s=batch * new / (ttft + step * (new - 1)),
               weight_GB=weight_bytes / 1e9,
               step_bytes=read_weight_bytes(cfg, batch, weight_bytes, dtype, quantize) + kv_bytes,
               prefill_flops=flops_prefill, compile_s=compile_s, peak_GB=(peak_bytes() or 0) / 1e9)
    for leaf in jax.tree.leaves(model.params):  # free now: compiled closures keep models alive
        leaf.delete()
    del model, engine, s
    gc.collect()
    return out


def run_hf(cfg, batch: int, prompt: int, new: int) -> dict | None:
    """transformers at the preset's shapes (GPT-2 architecture; Mixtral for a mixture of
    experts), static cache, compiled decode."""
    try:
        import torch
        import transformers
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    if cfg.num_experts:  # a mixture of experts: transformers' Mixtral at the same shapes
        hc = transformers.MixtralConfig(
            vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
            intermediate_size=cfg.expert_mlp_size, num_hidden_layers=cfg.num_layers,
            num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.kv_heads,
            max_position_embeddings=cfg.max_position_embeddings,
            num_local_experts=cfg.num_experts, num_experts_per_tok=cfg.experts_per_token,
            bos_token_id=None, eos_token_id=None)
        make = transformers.MixtralForCausalLM
    else:
        hc = transformers.GPT2Config(
            vocab_size=cfg.vocab_size, n_positions=cfg.max_position_embeddings,
            n_embd=cfg.hidden_size, n_layer=cfg.num_layers, n_head=cfg.num_heads,
            n_inner=cfg.mlp_size, activation_function="gelu_new", bos_token_id=None,
            eos_token_id=None)
        make = transformers.GPT2LMHeadModel
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # built in bf16: Mixtral-8x7B in fp32 is 187 GB
    try:
        with torch.device("cuda"):
            model = make(hc).eval()
    finally:
        torch.set_default_dtype(default)
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

    t0 = time.perf_counter()
    timed(new)
    compile_s = time.perf_counter() - t0
    timed(new)  # compile both graph shapes, warm the cudagraphs
    t_first = float(np.median([timed(1) for _ in range(3)]))
    t_all = float(np.median([timed(new) for _ in range(3)]))
    out = dict(ttft_ms=t_first * 1e3, step_ms=(t_all - t_first) / (new - 1) * 1e3,
               tok_s=batch * new / t_all, compile_s=compile_s, batch=batch,
               peak_GB=torch.cuda.max_memory_allocated() / 1e9)
    del model
    gc.collect()
    torch.cuda.empty_cache()
    return out


def _hf_worker(shapes: list, new: int) -> None:
    """Child process: transformers at each (preset, batch, prompt, largest), one JSON line
    each. With largest, a batch that runs out of memory is halved until one fits."""
    import torch

    # one compiled decode graph per batch shape: keep dynamo from falling back to eager
    # after its default 8 recompilations
    torch._dynamo.config.cache_size_limit = 64
    torch._dynamo.config.accumulated_cache_size_limit = 512
    for preset, batch, prompt, largest in shapes:
        cfg = jf.ModelConfig.from_preset(preset)
        while True:
            torch.cuda.reset_peak_memory_stats()
            try:
                r = run_hf(cfg, batch, prompt, new)
            except torch.cuda.OutOfMemoryError as e:
                gc.collect()
                torch.cuda.empty_cache()
                r = {"oom": str(e)[:120], "batch": batch}
                if largest and batch > 1:
                    batch //= 2
                    continue
            except Exception as e:  # noqa: BLE001 - report and go on with the next shape
                r = {"error": f"{type(e).__name__}: {str(e)[:200]}", "batch": batch}
            break
        if r is None:
            r = {"error": "no CUDA build of torch and transformers", "batch": batch}
        print("HFROW " + json.dumps(dict(key=[preset, prompt, largest], **r)), flush=True)
        print(f"# transformers {preset} batch {r['batch']} prompt {prompt}: "
              + (f"compile {r['compile_s']:.0f} s, step {r['step_ms']:.2f} ms, "
                 f"{r['tok_s']:.0f} tokens/s" if "tok_s" in r else
                 r.get("oom", r.get("error", ""))[:120]), file=sys.stderr, flush=True)


def hf_rows(shapes: list, new: int, timeout: float | None = None) -> dict:
    """Run _hf_worker in a fresh process (before this one's jax claims the GPU) and return
    {(preset, prompt, batch or 'largest'): row}."""
    rows = {}
    for r in child_rows("harness", f"_hf_worker(json.loads(sys.argv[1]), {int(new)})", shapes,
                        timeout):
        preset, prompt, largest = r.pop("key")
        rows[(preset, prompt, "largest" if largest else r["batch"])] = r
    return rows


def child_rows(module: str, call: str, payload, timeout: float | None) -> list[dict]:
    """`module.call` (a module of benchmarks/, its call reading the JSON payload from
    sys.argv[1]) in a fresh process with jax on the CPU, so transformers there has the GPU
    to itself; the JSON rows it printed on lines starting "HFROW ", those of a run stopped
    at `timeout` included."""
    import os
    import subprocess
    env = dict(os.environ, JAX_PLATFORMS="cpu")  # the child needs only configs from jax
    code = (f"import json, sys; sys.path.insert(0, {os.path.dirname(__file__)!r}); "
            f"import {module}; {module}.{call}")
    try:
        stdout = subprocess.run([sys.executable, "-c", code, json.dumps(payload)], env=env,
                                stdout=subprocess.PIPE, text=True, timeout=timeout).stdout
    except subprocess.TimeoutExpired as e:  # keep the rows that finished
        stdout = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        print(f"# transformers stopped at --hf-timeout {timeout:.0f} s", flush=True)
    return [json.loads(line[6:]) for line in stdout.splitlines() if line.startswith("HFROW ")]


def plan_shapes(presets, prompts, batches, new: int, dtype: str, largest: bool,
                modes) -> list[dict]:
    """The (preset, prompt, batch) rows to run, in order, each with `skip_modes` ({mode: why
    the memory plan says it cannot fit}), `skip` (the first reason when no mode fits, else
    None) and `largest` (the row added by --largest: the largest batch the plan fits for that
    prompt, for the first of `modes`). A mode is a quantize value or a (quantize, kv_cache)
    pair."""
    modes = [m if isinstance(m, tuple) else (m, None) for m in modes]
    # without preallocation (--hf) the allocator, and its bytes_limit, exist only once
    # something is allocated: a scalar, not the 75% of the card preallocation would take
    jax.block_until_ready(jnp.zeros(()))
    out = []
    for preset in presets:
        cfg = jf.ModelConfig.from_preset(preset)
        for prompt in prompts:
            # a prompt the context cannot hold with `new` tokens after it is shortened to
            # fit (GPT-3's 2048 positions: prompt 2048 runs as 1920 + 128 new)
            prompt = min(prompt, cfg.max_position_embeddings - new)
            length = prompt + new
            if prompt < 1 or any(s["preset"] == preset and s["prompt"] == prompt for s in out):
                continue
            for batch in batches:
                skip_modes = {}
                for mode in modes:
                    p = memory.plan(cfg, None, dtype, batch=batch, max_length=length,
                                    prompt_length=prompt, quantize=mode[0], kv_cache=mode[1])
                    if p.fits is False:
                        skip_modes[mode] = (f"plan {p.total / 1e9:.1f} GB > "
                                            f"{p.device_memory / 1e9:.1f} GB of device memory")
                skip = next(iter(skip_modes.values())) if len(skip_modes) == len(modes) else None
                out.append(dict(preset=preset, prompt=prompt, batch=batch, largest=False,
                                skip=skip, skip_modes=skip_modes))
            if largest:
                big = _largest_fitting(cfg, dtype, prompt, length, modes[0])
                if big > max(batches):
                    out.append(dict(preset=preset, prompt=prompt, batch=big, largest=True,
                                    skip=None, skip_modes={}))
    return out


def _largest_fitting(cfg, dtype: str, prompt: int, length: int, mode) -> int:
    """The largest batch (a multiple of 8) the memory plan fits for mode (quantize,
    kv_cache), bisected; 0 if unknown."""

    def fits(b):
        return memory.plan(cfg, None, dtype, batch=b, max_length=length,
                           prompt_length=prompt, quantize=mode[0], kv_cache=mode[1]).fits
    if not fits(8):
        return 0
    lo, hi = 8, 16
    while fits(hi) and hi < 1 << 20:
        lo, hi = hi, hi * 2
    while hi - lo > 8:  # fits(lo), not fits(hi)
        mid = (lo + hi) // 16 * 8
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


TINY = dict(batches=[1, 2], prompts=[16], new=8)  # --tiny: a smoke run of about a minute
FULL = dict(batches=[1, 8, 64, 256], prompts=[128, 2048], new=128)


def parser():
    ap = Parser(prog="jaxformer bench", description=__doc__)
    ap.add_argument("--presets", nargs="+", default=["gpt3-1.3b", "gpt3-6.7b", "gpt3-13b"],
                    help="model presets (random weights); --tiny: demo")
    ap.add_argument("--batches", nargs="+", type=positive_int,
                    help=f"batch sizes (default: {' '.join(map(str, FULL['batches']))}; "
                         f"--tiny: {' '.join(map(str, TINY['batches']))})")
    ap.add_argument("--prompts", nargs="+", type=positive_int,
                    help=f"prompt lengths (default: {' '.join(map(str, FULL['prompts']))}; "
                         f"--tiny: {' '.join(map(str, TINY['prompts']))})")
    ap.add_argument("--new", type=positive_int,
                    help=f"new tokens per row (default: {FULL['new']}; --tiny: {TINY['new']})")
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"],
                    help="weights and activations")
    ap.add_argument("--attention", default="auto", choices=ATTENTION, help="attention kernels")
    ap.add_argument("--hf", action="store_true", help="also run transformers (needs CUDA torch)")
    ap.add_argument("--hf-timeout", type=positive_float, default=None,
                    help="seconds for all transformers rows (the rows done by then are kept)")
    ap.add_argument("--force", action="store_true",
                    help="run shapes the memory plan says do not fit (failures are reported)")
    ap.add_argument("--largest", action="store_true",
                    help="also the largest batch the memory plan fits, per preset and prompt")
    ap.add_argument("--tiny", action="store_true",
                    help="CPU smoke run: the demo preset at small shapes, about a minute")
    ap.add_argument("--json", help="write all rows to this file")
    ap.add_argument("--quantize", default="none",
                    help="comma-separated modes per shape: none,int8,int4,int4-g<N>,fp8,"
                         "fp8-tensor")
    ap.add_argument("--kv-cache", default="none",
                    help="comma-separated KV-cache modes per shape: none,int8,fp8 (none: the "
                         "cache in --dtype)")
    return ap


def main(argv=None) -> int:
    """`jaxformer bench`; bad input prints one line and returns 2."""
    try:
        return _main(argv)
    except UsageError as e:
        print(e, file=sys.stderr)
        return 2
    except SystemExit as e:  # --help
        return e.code if isinstance(e.code, int) else 0


def _main(argv) -> int:
    ap = parser()
    args = ap.parse_args(argv)
    for key, value in (TINY if args.tiny else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)

    kv_modes = [None if m.strip() in ("", "none") else m.strip()
                for m in args.kv_cache.split(",")]
    for kv in kv_modes:
        if kv is not None and kv not in KV_MODES:
            ap.error(f"--kv-cache: {kv!r} is not none, int8 or fp8")
    try:
        modes = [(None if m.strip() in ("", "none") else name(m.strip(), "--quantize"), kv)
                 for m in args.quantize.split(",") for kv in kv_modes]
        for preset in ["demo"] if args.tiny else args.presets:
            jf.ModelConfig.from_preset(preset)
    except (ValueError, FileNotFoundError) as e:
        raise UsageError(f"{ap.prog}: error: {e}") from None
    if args.json and not os.path.isdir(os.path.dirname(os.path.abspath(args.json))):
        ap.error(f"--json {args.json}: its directory does not exist")

    presets = ["demo"] if args.tiny else args.presets
    if args.hf:  # transformers runs in a child first: jax must not claim the GPU up front
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    shapes = plan_shapes(presets, args.prompts, args.batches, args.new, args.dtype,
                         args.largest, modes)
    if args.force:
        for shape in shapes:
            shape["skip"], shape["skip_modes"] = None, {}
    hf_all = {}
    if args.hf:
        hf_all = hf_rows([[s["preset"], s["batch"], s["prompt"], s["largest"]]
                          for s in shapes if s["skip"] is None], args.new, args.hf_timeout)
    dev = jax.devices()[0]
    print(f"# device: {dev.device_kind} x{jax.device_count()}  jax {jax.__version__}")
    ceil = ceilings(args.tiny)
    print(f"# measured ceilings: copy {ceil['copy_GBps']:.0f} GB/s, "
          f"bf16 matmul {ceil['matmul_TFLOPs']:.0f} TFLOP/s")
    rows = []
    for shape in shapes:
        preset, prompt, batch = shape["preset"], shape["prompt"], shape["batch"]
        if shape["skip"]:
            print(f"# {preset} batch {batch} prompt {prompt}: skipped, {shape['skip']}",
                  flush=True)
            continue
        cfg = jf.ModelConfig.from_preset(preset)
        hf = hf_all.get((preset, prompt, "largest" if shape["largest"] else batch))
        for mode, kv in modes:
            label = (mode or args.dtype) + (f" kv {kv}" if kv else "")
            if (mode, kv) in shape["skip_modes"]:
                print(f"# {preset} batch {batch} prompt {prompt} {label}: skipped, "
                      f"{shape['skip_modes'][(mode, kv)]}", flush=True)
                continue
            try:
                r = run_jax(cfg, batch, prompt, args.new, args.dtype, args.attention,
                            quantize=mode, kv_cache=kv)
            except Exception as e:  # out of memory past the plan: report, go on
                print(f"# {preset} b={batch} p={prompt} {label}: jax "
                      f"failed: {type(e).__name__}: {str(e)[:200]}", flush=True)
                continue
            r.update(preset=preset, batch=batch, prompt=prompt, quant=mode or "none",
                     kv=kv or "-",
                     largest=shape["largest"],
                     mbu=r["step_bytes"] / (r["step_ms"] / 1e3) / (ceil["copy_GBps"] * 1e9),
                     mfu=r["prefill_flops"] / (r["ttft_ms"] / 1e3)
                     / (ceil["matmul_TFLOPs"] * 1e12), hf=hf)
            rows.append(r)
            _print_row(r)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=dev.device_kind, jax=jax.__version__, ceilings=ceil,
                           rows=rows), f, indent=1)
    return 0


HEADER = (f"{'preset':<11}{'quant':>9}{'kv':>5}{'batch':>6}{'prompt':>7}{'TTFT ms':>9}"
          f"{'step ms':>9}"
          f"{'tok/s':>9}{'MBU':>6}{'MFU':>6}{'peak GB':>8}{'compile s':>10}{'HF batch':>9}"
          f"{'HF TTFT':>8}{'HF step':>8}{'HF tok/s':>9}{'x HF':>6}")
_printed = False


def _print_row(r):
    global _printed
    if not _printed:
        print(HEADER)
        _printed = True
    hf = r["hf"] or {}
    nan = float("nan")
    ratio = r["tok_s"] / hf["tok_s"] if hf.get("tok_s") else nan
    hf_batch = ("oom" if "oom" in hf else "-") if "tok_s" not in hf else str(hf["batch"])
    print(f"{r['preset']:<11}{r['quant']:>9}{r['kv']:>5}{r['batch']:>6}{r['prompt']:>7}"
          f"{r['ttft_ms']:>9.1f}"
          f"{r['step_ms']:>9.2f}{r['tok_s']:>9.0f}{r['mbu']:>6.0%}{r['mfu']:>6.0%}"
          f"{r['peak_GB']:>8.1f}{r['compile_s']:>10.1f}{hf_batch:>9}"
          f"{hf.get('ttft_ms', nan):>8.1f}{hf.get('step_ms', nan):>8.2f}"
          f"{hf.get('tok_s', nan):>9.0f}{ratio:>6.2f}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
