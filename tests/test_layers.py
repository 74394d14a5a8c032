"""Layer-level rewrites for the GPU (Dense.einsum's products, LayerNorm's statistics): the same
numbers as the plain formulas, another HLO."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxformer.layers import base

CASES = [  # eq, x shape, kernel shape, contract
    ("btnh,nhd->btd", (1, 1, 4, 8), (4, 8, 16), 2),    # decode, batch 1: merged + 2 rows
    ("btnh,nhd->btd", (3, 5, 4, 8), (4, 8, 16), 2),    # prefill: merged only
    ("btd,dkch->btkch", (1, 1, 16), (16, 2, 3, 5), 1),  # fused QKV, batch 1: 2 rows
    ("btf,fd->btd", (2, 1, 12), (12, 7), 1),           # two rows already: untouched
]


@pytest.mark.parametrize("eq,xs,ks,contract", CASES)
def test_rewritten_einsum_equals_plain(eq, xs, ks, contract):
    x = jax.random.normal(jax.random.key(0), xs)
    k = jax.random.normal(jax.random.key(1), ks)
    eq2, x2, k2 = base._one_contraction(eq, x, k, contract)
    got = base._einsum_not_strength_reduced(eq2, x2, k2)
    want = np.einsum(eq, np.asarray(x, np.float64), np.asarray(k, np.float64))
    assert got.shape == want.shape
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


def test_single_row_against_a_small_kernel_becomes_two_rows():
    x, k = jnp.ones((1, 1, 16)), jnp.ones((16, 32))
    text = jax.jit(lambda a, b: base._einsum_not_strength_reduced("btd,df->btf", a, b)
                   ).lower(x, k).as_text()
    assert "tensor<2x16xf32>" in text  # the dot sees two rows, so XLA:GPU keeps a GEMM
    big = jax.ShapeDtypeStruct((16, base.XLA_GPU_DOT_REDUCE_BELOW // 16), jnp.float32)
    text = jax.jit(lambda a, b: base._einsum_not_strength_reduced("btd,df->btf", a, b)
                   ).lower(x, big).as_text()
    assert "tensor<2x16xf32>" not in text  # large kernels are left alone


@pytest.mark.parametrize("rows", [1, 3, 64, 65, 300])
def test_layernorm_one_pass_and_two_pass_equal_numpy(rows):
    """Decode-sized inputs take the one-pass Welford statistics, larger ones two passes;
    both must be LayerNorm, also with a mean far from zero."""
    from flax import nnx

    from jaxformer.layers.norms import Norm
    norm = Norm(48, "layernorm", 1e-5, nnx.Rngs(0))
    norm.scale[...] = jax.random.normal(jax.random.key(2), (48,))
    norm.bias[...] = jax.random.normal(jax.random.key(3), (48,))
    x = jax.random.normal(jax.random.key(4), (rows, 48)) * 3 + 50
    got = np.asarray(jax.jit(lambda a: norm(a))(x), np.float64)
    xd = np.asarray(x, np.float64)
    ref = (xd - xd.mean(-1, keepdims=True)) / np.sqrt(xd.var(-1, keepdims=True) + 1e-5)
    ref = ref * np.asarray(norm.scale[...]) + np.asarray(norm.bias[...])
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)
