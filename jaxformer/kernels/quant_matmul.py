"""Weight-only INT8 (and FP8) skinny matmul for Hopper, in Pallas for the Mosaic GPU backend.

    y[M, N] = (x[M, K] @ codes[N, K]^T) * scale[N]

Legend: M rows of x (1..64: decode steps), K contraction, N output channels, Mp = M rounded
up to 8, P splits of K. codes are K-minor (jaxformer.quant.ops' stored layout), one float32
scale per output channel.

Why a kernel: at M = 1 the product is bound by the bytes of codes read; XLA's best
formulation (a row reduction fused with the convert) reads them well below copy bandwidth
(docs/benchmarks.md). Design (CUTLASS's mixed-input GEMM, transposed so the weights are
the big operand):

- Each CTA owns `block_n` output channels and one of P contiguous ranges of K (split-K, so
  small N still fills every SM; `choose_splits` balances waves against steps per CTA).
- A producer warpgroup streams [block_n, block_k] code tiles and the matching [Mp, block_k]
  tiles of x through a ring of `stages` shared-memory slots with TMA.
- Each of `consumers` (2) compute warpgroups owns R = block_n / consumers rows of the tile:
  it loads them into registers (the 8-bit WGMMA_UPCAST_2X layout: 32-bit shared-memory
  loads), frees its part of the slot at once, converts to bf16 in registers (prmt/and/sub,
  no shared-memory round trip), and issues wgmma with the weights as the register A operand:
  acc[R, Mp] += w[R, block_k] @ x^T[block_k, Mp]. x^T is the shared-memory B operand, shared
  by both (wgmma's N = Mp >= 8, so M = 1 wastes 7/8 of tiny tensor-core work, never
  bandwidth). Two consumers because at ~12 B/cycle/SM the unpack-convert-wgmma-wait chain of
  one warpgroup is close to the budget; the second overlaps it.
- Each CTA writes its float32 partial y^T [block_n, Mp]; one small XLA fusion sums the P
  partials, applies the scale, casts and transposes.

The codes travel HBM -> shared memory (TMA) -> registers exactly once, in 8 bits; x is read
from L2 by every CTA of a column (2 Mp / block_n of the code bytes).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax

from jaxformer.kernels import flash_attention as fa
from jaxformer.kernels.decode_attention import num_sms

MAX_M = 64  # rows of x; wgmma's N is Mp <= 256, but past 64 a GEMM is compute-light anyway
CODE_DTYPES = (jnp.dtype(jnp.int8), jnp.dtype(jnp.float8_e4m3fn))


@dataclasses.dataclass(frozen=True)
class QuantMatmulConfig:
    block_n: int = 128       # output channels per CTA: 64 or 128
    consumers: int = 2       # compute warpgroups, block_n / consumers rows each (wgmma M)
    block_k: int = 256       # contraction per pipeline step, a multiple of 128
    stages: int = 4          # shared-memory ring depth (clipped to what fits)
    splits: int | None = None  # K ranges per column of CTAs; None: choose_splits
    ctas_per_sm: int = 1     # occupancy assumed by choose_splits
    semantics: str = "lane"  # Mosaic GPU lowering semantics


def choose_splits(n_blocks: int, k_steps: int, ctas_per_sm: int = 1,
                  sms: int | None = None) -> int:
    """P minimising waves(P) * steps-per-CTA(P), the time of the busiest SM (ties: fewer
    splits, so fewer partials). E.g. 132 SMs, 32 column blocks of 16 steps: P = 4."""
    slots = (sms or num_sms()) * ctas_per_sm
    best, best_cost = 1, None
    for p in range(1, k_steps + 1):
        cost = -(-n_blocks * p // slots) * -(-k_steps // p)
        if best_cost is None or cost < best_cost:
            best, best_cost = p, cost
    return best


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def _quant_pallas(xp, codes, *, cfg: QuantMatmulConfig, splits: int, interpret: bool):
    """xp [Mp, K] bf16 (Mp % 8 == 0); codes [N, K] int8 / float8_e4m3fn
    (N % block_n == 0, K % block_k == 0).
    Returns partial y^T [P, N, Mp] float32, unscaled.
    """
    pl, plgpu = fa._plgpu()
    Mp, K = xp.shape
    N = codes.shape[0]
    bn, bk, P, C = cfg.block_n, cfg.block_k, splits, cfg.consumers
    R = bn // C  # rows of each consumer warpgroup (wgmma M)
    k_steps = K // bk
    per = -(-k_steps // P)  # steps per split; the last splits may get fewer (or none)
    stages = fa.fit_stages(cfg.stages, bn * Mp * 4, bn * bk + Mp * bk * 2, per)
    fp8 = jnp.dtype(codes.dtype) == jnp.dtype(jnp.float8_e4m3fn)

    def to_bf16(w):
        # fp8 -> f16 is one hardware cvt per pair; every e4m3 value is exact in f16 and bf16
        return w.astype(jnp.float16).astype(jnp.bfloat16) if fp8 else w.astype(jnp.bfloat16)

    def kernel(x_ref, w_ref, o_ref, o_smem, x_smem, w_smem, x_bar, w_bar, x_free, w_free):
        p = lax.axis_index("split")
        nb = lax.axis_index("nblk")
        wg = lax.axis_index("wg")
        first = jnp.minimum(p * per, k_steps)
        n_steps = jnp.minimum(first + per, k_steps) - first

        @pl.when(wg < C)
        def _compute():
            if not interpret:
                plgpu.set_max_registers(232, action="increase")
            o_rows = o_smem.at[wg]

            def step(i, mma):
                slot = lax.rem(i, jnp.int32(stages))
                plgpu.barrier_wait(w_bar.at[slot * C + wg])
                w_tile = w_smem.at[slot, wg]
                if interpret:
                    w = w_tile[...]
                else:
                    w = plgpu.load(w_tile, (), layout=plgpu.Layout.WGMMA_UPCAST_2X)
                # The codes are in registers now: give the slot back before converting.
                plgpu.barrier_arrive(w_free.at[slot])
                if not interpret:
                    w = plgpu.layout_cast(w, plgpu.Layout.WGMMA)
                w = to_bf16(w)
                plgpu.barrier_wait(x_bar.at[slot])
                mma(w, x_smem.at[slot])
                plgpu.barrier_arrive(x_free.at[slot])

            if interpret:
                # jax 0.10's interpreter runs no wgmma with a register A operand (see
                # flash_attention): a jnp dot into the output tile, same pipeline otherwise.
                o_rows[...] = jnp.zeros((R, Mp), jnp.float32)

                def mma(w, xs):
                    o_rows[...] += jnp.dot(w, xs[...].T, preferred_element_type=jnp.float32)

                @pl.loop(0, n_steps)
                def _(i):
                    step(i, mma)
            else:
                def body(acc_ref):
                    def mma(w, xs):
                        plgpu.wgmma(acc_ref, w, plgpu.transpose_ref(xs, (1, 0)))
                        # The x slot and the A registers stay live until the wgmma is done.
                        # Waiting here keeps the register reuse safe; the other consumer
                        # warpgroup and the TMA ring keep the SM busy meanwhile.
                        plgpu.wgmma_wait(0)

                    @pl.loop(0, n_steps)
                    def _(i):
                        step(i, mma)
                    return acc_ref[...]
                o_rows[...] = pl.run_scoped(body, plgpu.ACC((R, Mp), jnp.float32))
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(o_rows, o_ref.at[p, pl.ds(nb * bn + wg * R, R)])
            plgpu.wait_smem_to_gmem(0)

        @pl.when(wg == C)
        def _memory():
            if not interpret:
                plgpu.set_max_registers(40, action="decrease")

            def issue_w(i, slot):
                cols = pl.ds((first + i) * bk, bk)
                for c in range(C):  # one copy and one barrier per consumer's rows
                    plgpu.copy_gmem_to_smem(w_ref.at[pl.ds(nb * bn + c * R, R), cols],
                                            w_smem.at[slot, c], w_bar.at[slot * C + c])

            def issue_x(i, slot):
                cols = pl.ds((first + i) * bk, bk)
                plgpu.copy_gmem_to_smem(x_ref.at[:, cols], x_smem.at[slot], x_bar.at[slot])

            fa.ring_producer(n_steps, stages, [(issue_w, w_free), (issue_x, x_free)])

    # 128-byte swizzled tiles: the layout both wgmma's B descriptor and the conflict-free
    # 8-bit register loads want (rows of 128 int8 codes, of 64 bf16 x values).
    w_tiled = (plgpu.TilingTransform((8, 128)), plgpu.SwizzleTransform(128))
    x_tiled = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
    scratch = [
        plgpu.SMEM((C, R, Mp), jnp.float32),                               # partial y^T
        plgpu.SMEM((stages, Mp, bk), xp.dtype, transforms=x_tiled),        # x ring
        plgpu.SMEM((stages, C, R, bk), codes.dtype, transforms=w_tiled),   # codes ring
        plgpu.Barrier(num_barriers=stages),                                # x slot loaded
        plgpu.Barrier(num_barriers=stages * C),                            # codes rows loaded
        plgpu.Barrier(num_arrivals=C, num_barriers=stages),                # x slot free
        plgpu.Barrier(num_arrivals=C, num_barriers=stages),                # codes slot free
    ]
    kwargs = {"interpret": fa.interpret_params()} if interpret else {}
    return plgpu.kernel(
        kernel,
        out_type=jax.ShapeDtypeStruct((P, N, Mp), jnp.float32),
        scratch_types=scratch,
        grid=(P, N // bn),
        grid_names=("split", "nblk"),
        num_threads=C + 1,
        thread_name="wg",
        compiler_params=fa.compiler_params(cfg.semantics),
        **kwargs,
    )(xp, codes)


def check_supported(x, codes, scale) -> str | None:
    """None if int8_matmul takes these operands (after padding), else the reason."""
    if x.ndim != 2 or codes.ndim != 2 or scale.ndim != 1:
        return f"x [M, K], codes [N, K], scale [N] expected, got {x.shape}, {codes.shape}, " \
               f"{scale.shape}"
    (M, K), (N, K2) = x.shape, codes.shape
    if K != K2 or scale.shape[0] != N:
        return f"x {x.shape}, codes {codes.shape} and scale {scale.shape} disagree"
    if jnp.dtype(x.dtype) != jnp.dtype(jnp.bfloat16):
        return f"x dtype {jnp.dtype(x.dtype).name} (supported: bfloat16)"
    if jnp.dtype(codes.dtype) not in CODE_DTYPES:
        return f"codes dtype {jnp.dtype(codes.dtype).name} (supported: int8, float8_e4m3fn)"
    if not 1 <= M <= MAX_M:
        return f"{M} rows (supported: 1..{MAX_M})"
    return None


def fit_config(N: int, K: int, config: QuantMatmulConfig | None = None) -> QuantMatmulConfig:
    """The config with block sizes shrunk (to 64 channels, 128 contraction) to divide N and
    K where they can, so the codes need no padded copy."""
    cfg = config or QuantMatmulConfig()
    bn, bk = cfg.block_n, cfg.block_k
    while bn > 64 and N % bn:
        bn //= 2
    while bk > 128 and K % bk:
        bk //= 2
    # each consumer warpgroup needs 64 rows at least (one wgmma M)
    return dataclasses.replace(cfg, block_n=bn, block_k=bk, consumers=min(cfg.consumers,
                                                                          bn // 64))


def needs_padding(N: int, K: int, config: QuantMatmulConfig | None = None) -> bool:
    """Whether int8_matmul must copy the codes into a padded array (N % 64 or K % 128)."""
    cfg = fit_config(N, K, config)
    return bool(N % cfg.block_n or K % cfg.block_k)


def int8_matmul(x, codes, scale, *, interpret: bool = False,
                config: QuantMatmulConfig | None = None):
    """(x @ codes^T) * scale with the Mosaic GPU kernel.

    x      [M, K] bfloat16, 1 <= M <= 64
    codes  [N, K] int8 (or float8_e4m3fn), K-minor
    scale  [N] float32, one per output channel
    Returns y [M, N] bfloat16, accumulated in float32 and scaled in float32.

    M is padded to a multiple of 8 (x is tiny). N and K that are not multiples of 64 / 128
    are zero-padded, which copies the codes: callers that care (jaxformer.quant.ops) check
    `needs_padding` first.
    """
    reason = check_supported(x, codes, scale)
    if reason is not None:
        raise ValueError(f"int8_matmul: unsupported {reason}")
    (M, K), N = x.shape, codes.shape[0]
    cfg = config or QuantMatmulConfig()
    if cfg.block_n not in (64, 128) or cfg.block_k % 128 or cfg.block_k <= 0 \
            or cfg.consumers not in (1, 2):
        raise ValueError(f"int8_matmul: block_n must be 64 or 128, block_k a multiple of 128 "
                         f"and consumers 1 or 2, got {cfg.block_n}, {cfg.block_k}, "
                         f"{cfg.consumers}")
    cfg = fit_config(N, K, cfg)
    Mp, Np, Kp = _round_up(M, 8), _round_up(N, cfg.block_n), _round_up(K, cfg.block_k)
    if (Np, Kp) != (N, K):
        codes = jnp.pad(codes, ((0, Np - N), (0, Kp - K)))
    xp = jnp.pad(x, ((0, Mp - M), (0, Kp - K)))
    k_steps = Kp // cfg.block_k
    P = min(cfg.splits or choose_splits(Np // cfg.block_n, k_steps, cfg.ctas_per_sm), k_steps)
    yt = _quant_pallas(xp, codes, cfg=cfg, splits=P, interpret=interpret)  # [P, Np, Mp]
    y = yt.sum(axis=0)[:N, :M] * scale.astype(jnp.float32)[:, None]
    return y.T.astype(x.dtype)


def int8_matmul_reference(x, codes, scale):
    """The pure-jnp twin of int8_matmul (same operands, same output)."""
    y = jnp.dot(x.astype(jnp.float32), codes.astype(jnp.float32).T,
                precision=lax.Precision.HIGHEST)
    return (y * scale.astype(jnp.float32)).astype(x.dtype)
