"""The weight-only INT8 / FP8 matmul kernel (jaxformer.kernels.quant_matmul) and its dispatch
from jaxformer.quant.ops.

CPU: the split choice, the support checks, lowering for Hopper (Mosaic GPU validates the
wgmma operands and register layouts at lowering time, no GPU needed), the kernel in the
Mosaic GPU interpreter (race detector on, NaN-filled memory) on small shapes, and
ops.einsum through the kernel. GPU (`-m gpu`, Hopper only): the compiled kernel on the
benchmark shapes and ragged ones, with the output memory poisoned first.

Tolerance: the kernel and numpy both see exact products (codes are exact in bf16, x is
bf16) accumulated in float32; the bf16 output rounds to nearest, within 2^-8 of |y|. So
|y - y64| <= 2^-8 |y64| + (float32 accumulation: ~K 2^-24 sum|x w| scale, bounded by 1e-5).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxformer as jf
from jaxformer.kernels import attention as attn
from jaxformer.kernels import quant_matmul as qm
from jaxformer.quant import ops
from jaxformer.quant.spec import parse
from test_kernels import poison

_seed = iter(range(20_000, 1_000_000))
FP8 = jnp.float8_e4m3fn


def problem(M, N, K, dtype=jnp.int8):
    """Random x [M, K] bf16, codes [N, K] (every int8 code, or fp8 over its whole range,
    subnormals included) and positive scales [N]: nothing is zero."""
    rng = np.random.default_rng(next(_seed))
    x = jnp.asarray(rng.standard_normal((M, K), np.float32)).astype(jnp.bfloat16)
    if jnp.dtype(dtype) == jnp.int8:
        codes = jnp.asarray(rng.integers(-127, 128, (N, K), dtype=np.int8))
    else:
        w = rng.standard_normal((N, K)).astype(np.float32) * np.exp2(rng.integers(-9, 8, (N, K)))
        codes = jnp.asarray(np.clip(w, -448, 448)).astype(dtype)
    scale = jnp.asarray(rng.uniform(0.5, 2.0, N).astype(np.float32) / 127)
    return x, codes, scale


def check(y, x, codes, scale):
    """y [M, N] bf16 against float64 numpy within the bound of the module docstring."""
    assert y.shape == (x.shape[0], codes.shape[0]) and y.dtype == jnp.bfloat16
    y = np.asarray(y.astype(jnp.float32), np.float64)
    assert np.isfinite(y).all(), "non-finite output (unwritten or NaN)"
    xf = np.asarray(x.astype(jnp.float32), np.float64)
    wf = np.asarray(codes.astype(jnp.float32), np.float64)
    s = np.asarray(scale, np.float64)
    want = xf @ wf.T * s
    bound = 2.0 ** -8 * np.abs(want) + 1e-5 * (np.abs(xf) @ np.abs(wf).T * s)
    assert (np.abs(y - want) <= bound).all(), float((np.abs(y - want) / bound).max())
    twin = np.asarray(qm.int8_matmul_reference(x, codes, scale).astype(jnp.float32))
    assert (np.abs(twin - want) <= bound).all()


# ---- plain Python ---------------------------------------------------------------------------
@pytest.mark.parametrize("n_blocks, k_steps, want", [
    (32, 16, 4),    # N = 4096, K = 4096, 128 x 256 tiles: 128 CTAs of 4 steps
    (128, 16, 1),   # N = 16384: one wave already
    (96, 16, 4),    # N = 12288: 3 waves of 4 steps beat 1 wave of 16
    (32, 64, 4),    # K = 16384, N = 4096
    (1, 3, 3),      # never more splits than steps
])
def test_choose_splits_balances_the_busiest_sm(n_blocks, k_steps, want):
    assert qm.choose_splits(n_blocks, k_steps, sms=132) == want


def test_fit_config_avoids_padding():
    assert qm.fit_config(4096, 4096) == qm.QuantMatmulConfig()
    cfg = qm.fit_config(4160, 11008 + 128)  # 65 * 64 channels, 87 * 128 contraction
    assert (cfg.block_n, cfg.block_k) == (64, 128)
    assert not qm.needs_padding(4160, 11136) and qm.needs_padding(100, 4096)


@pytest.mark.parametrize("x, codes, scale, match", [
    ((1, 64), (32, 64), (32,), None),
    ((65, 64), (32, 64), (32,), "65 rows"),
    ((1, 64), (32, 48), (32,), "disagree"),
    ((1, 64), (32, 64), (31,), "disagree"),
    ((64,), (32, 64), (32,), "expected"),
])
def test_check_supported_names_the_problem(x, codes, scale, match):
    sd = jax.ShapeDtypeStruct
    reason = qm.check_supported(sd(x, jnp.bfloat16), sd(codes, jnp.int8), sd(scale, jnp.float32))
    assert (reason is None) if match is None else (match in reason)


def test_unsupported_dtypes_raise():
    x, codes, scale = problem(1, 64, 128)
    with pytest.raises(ValueError, match="x dtype float32"):
        qm.int8_matmul(x.astype(jnp.float32), codes, scale)
    with pytest.raises(ValueError, match="codes dtype int16"):
        qm.int8_matmul(x, codes.astype(jnp.int16), scale)
    with pytest.raises(ValueError, match="block_n must be 64 or 128"):
        qm.int8_matmul(x, codes, scale, config=qm.QuantMatmulConfig(block_n=256))
    with pytest.raises(ValueError, match="consumers 1 or 2"):
        qm.int8_matmul(x, codes, scale, config=qm.QuantMatmulConfig(consumers=3))


# ---- lowering for Hopper on any machine -----------------------------------------------------
@pytest.mark.parametrize("M, N, K, dtype, block_n", [
    (1, 4096, 4096, jnp.int8, 128),
    (16, 1024, 2048, jnp.int8, 64),
    (64, 512, 512, jnp.int8, 128),
    (3, 512, 1024, FP8, 128),
    (1, 512, 1024, jnp.int8, (128, 1)),  # one consumer warpgroup of 128 rows
])
def test_kernel_lowers_for_hopper(M, N, K, dtype, block_n):
    """Lowers the real (non-interpreted) kernel for CUDA: Mosaic GPU checks the register
    layouts, the conversion and the wgmma operands here, which the interpreter skips."""
    sd = jax.ShapeDtypeStruct
    block_n, consumers = block_n if isinstance(block_n, tuple) else (block_n, 2)
    cfg = qm.QuantMatmulConfig(block_n=block_n, consumers=consumers)
    f = jax.jit(functools.partial(qm.int8_matmul, config=cfg))
    text = f.trace(sd((M, K), jnp.bfloat16), sd((N, K), dtype), sd((N,), jnp.float32)).lower(
        lowering_platforms=("cuda",)).as_text()
    assert "mosaic_gpu" in text


# ---- the kernel in the Mosaic GPU interpreter (CPU): the `interpreted` fixture (conftest) ---


INTERP = [
    # M, N, K, dtype, block_n, splits
    (1, 128, 256, jnp.int8, 128, None),  # two consumer warpgroups
    (3, 100, 300, jnp.int8, 64, None),   # N, K not block multiples: padded
    (9, 128, 640, jnp.int8, 64, 4),      # Mp = 16; 5 steps over 4 splits: 2, 2, 1, 0
    (2, 128, 256, FP8, 64, 1),           # fp8 codes
]


@pytest.mark.parametrize("case", INTERP)
def test_kernel_interpreted(case, interpreted):
    M, N, K, dtype, block_n, splits = case
    x, codes, scale = problem(M, N, K, dtype)
    cfg = qm.QuantMatmulConfig(block_n=block_n, block_k=128, stages=2, splits=splits)
    y = jax.jit(functools.partial(qm.int8_matmul, interpret=True, config=cfg))(x, codes, scale)
    check(y, x, codes, scale)
    assert not interpreted(), "the interpreter's race detector found a race"


# ---- ops.einsum through the kernel -------------------------------------------------------
def _einsum_case(site, name, rows):
    eq, shape, contract = {
        "out": ("btnh,nhd->btd", (2, 64, 64), 2),       # two contraction dims
        "qkv": ("btd,dkch->btkch", (128, 2, 2, 16), 1),  # three output dims
    }[site]
    spec = parse(name)
    rng = np.random.default_rng(next(_seed))
    w = jnp.asarray(rng.normal(0, 0.05, shape).astype(np.float32))
    q, scale = ops.quantize_kernel(w, spec, 0, contract)
    x = jnp.asarray(rng.normal(0, 1, rows + shape[:contract]).astype(np.float32))
    return eq, x.astype(jnp.bfloat16), q, scale, spec, contract


def uses_kernel(eq, x, q, scale, spec, contract) -> bool:
    jaxpr = jax.make_jaxpr(lambda x, q, s: ops.einsum(eq, x, q, s, spec, contract))(x, q, scale)
    return "name=_int8_matmul_jit" in str(jaxpr)  # the jit around the kernel call


@pytest.mark.parametrize("site, name, rows", [("out", "int8", (1, 1)),
                                              ("qkv", "fp8-tensor", (1, 3))])
def test_einsum_takes_the_kernel_when_asked(site, name, rows, interpreted):
    eq, x, q, scale, spec, contract = _einsum_case(site, name, rows)
    want = ops.einsum(eq, x, q, scale, spec, contract)
    spec = spec.with_kernel("interpret")  # RunConfig.quant_kernel
    assert uses_kernel(eq, x, q, scale, spec, contract)
    got = ops.einsum(eq, x, q, scale, spec, contract)
    assert got.shape == want.shape and got.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                               rtol=2.0 ** -7, atol=1e-2 * float(np.abs(want).max()))


def test_einsum_default_is_xla_and_the_switch_is_a_run_config_field():
    """The default (quant_kernel "off") is the XLA path, "auto" off Hopper too; the switch
    is RunConfig.quant_kernel, validated, and reaches the model's layers (compiled programs
    are keyed by it), never an environment variable."""
    eq, x, q, scale, spec, contract = _einsum_case("out", "int8", (1, 1))
    assert spec.kernel == "off" and not uses_kernel(eq, x, q, scale, spec, contract)
    if not attn.is_hopper(jax.devices()[0]):
        assert not uses_kernel(eq, x, q, scale, spec.with_kernel("auto"), contract)
    with pytest.raises(ValueError, match="RunConfig.quant_kernel"):
        jf.RunConfig(quant_kernel="yes")
    run = jf.RunConfig(quantize="int8", quant_kernel="interpret")
    assert run.quant_spec == parse("int8").with_kernel("interpret")
    from jaxformer.models import abstract_model
    graphdef, _ = abstract_model(jf.ModelConfig.from_preset("demo"), None, run.quant_spec)
    assert "kernel='interpret'" in repr(graphdef)


# ---- the compiled kernel (Hopper GPU) -------------------------------------------------------
gpu = pytest.mark.gpu
needs_hopper = pytest.mark.skipif(not attn.is_hopper(jax.devices()[0]),
                                  reason="needs a Hopper GPU")

GPU_CASES = [
    # M, N, K, dtype, config overrides
    (1, 4096, 4096, jnp.int8, {}),
    (1, 12288, 4096, jnp.int8, {}),
    (1, 16384, 4096, jnp.int8, {}),
    (1, 4096, 16384, jnp.int8, {}),
    (4, 4096, 4096, jnp.int8, {}),
    (16, 16384, 4096, jnp.int8, {}),
    (64, 1024, 4096, jnp.int8, {}),
    (8, 4096, 4096, jnp.int8, {"block_n": 64, "block_k": 128, "stages": 6}),
    (1, 4096, 4096, jnp.int8, {"consumers": 1}),         # one warpgroup of 128 rows
    (1, 4096, 4096, jnp.int8, {"block_k": 512, "splits": 8}),
    (5, 1000, 1000, jnp.int8, {}),                       # padded N and K
    (1, 11008, 4096, jnp.int8, {"splits": 3}),           # block_n 64, odd splits
    (2, 4096, 11008, jnp.int8, {}),                      # block_k 128, ragged splits
    (1, 4096, 4096, FP8, {}),
    (16, 2048, 4096, FP8, {"block_n": 64}),
]


@gpu
@needs_hopper
@pytest.mark.parametrize("case", GPU_CASES)
def test_kernel_gpu(case):
    M, N, K, dtype, over = case
    x, codes, scale = problem(M, N, K, dtype)
    cfg = qm.QuantMatmulConfig(**over)
    poison((8, N + 128, 64), (M, N))
    y = jax.jit(functools.partial(qm.int8_matmul, config=cfg))(x, codes, scale)
    check(y, x, codes, scale)


@gpu
@needs_hopper
def test_einsum_takes_the_kernel_on_hopper():
    eq, x, q, scale, spec, contract = _einsum_case("out", "int8", (1, 1))
    want = ops.einsum(eq, x, q, scale, spec, contract)
    spec = spec.with_kernel("auto")
    assert uses_kernel(eq, x, q, scale, spec, contract)
    got = jax.jit(lambda x, q, s: ops.einsum(eq, x, q, s, spec, contract))(x, q, scale)
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                               rtol=2.0 ** -7, atol=1e-2 * float(np.abs(want).max()))
