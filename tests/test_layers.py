"""Layer-level rewrites for the GPU (Dense.einsum's products, LayerNorm's statistics): the same
numbers as the plain formulas, another HLO."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxformer as jf
from jaxformer import sampling
from jaxformer import sharding as shd
from jaxformer.layers import base

CASES = [  # eq, x shape, kernel shape, contract
    ("btnh,nhd->btd", (1, 1, 4, 8), (4, 8, 16), 2),    # decode, batch 1: 2 rows
    ("btnh,nhd->btd", (3, 5, 4, 8), (4, 8, 16), 2),    # prefill: untouched
    ("btd,dkch->btkch", (1, 1, 16), (16, 2, 3, 5), 1),  # fused QKV, batch 1: 2 rows
    ("btf,fd->btd", (2, 1, 12), (12, 7), 1),           # two rows already: untouched
]


@pytest.mark.parametrize("eq,xs,ks,contract", CASES)
def test_rewritten_einsum_equals_plain(eq, xs, ks, contract):
    x = jax.random.normal(jax.random.key(0), xs)
    k = jax.random.normal(jax.random.key(1), ks)
    got = base._einsum_not_strength_reduced(eq, x, k)
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


def test_two_row_threshold_counts_one_devices_shard():
    """On tensor=2, a kernel of 1.5x the threshold is a 0.75x dot per device: padded."""
    x = jnp.ones((1, 1, 16))
    big = jax.ShapeDtypeStruct((16, 3 * base.XLA_GPU_DOT_REDUCE_BELOW // 32), jnp.float32)
    mesh = jf.make_mesh(1, 1, 2, devices=jax.devices()[:2])

    def lowered(active_mesh):
        def f(a, b):
            return base._einsum_not_strength_reduced("btd,df->btf", a, b)
        with shd.use(active_mesh, shd.load_rules("default")):  # jax's mesh for the trace
            return jax.jit(f).lower(x, big).as_text()

    assert "tensor<2x16xf32>" not in lowered(None)
    assert "tensor<2x16xf32>" in lowered(mesh)


def test_sharded_argmax_is_first_maximum_without_all_gather():
    """argmax over a vocabulary sharded on tensor: numpy's first-maximum answer (ties, -inf
    rows), and XLA partitions it into all-reduces, not the all-gathers of a pair reduce."""
    rng = np.random.default_rng(0)
    x = rng.integers(-3, 3, (5, 64)).astype(np.float32)  # many ties
    x[3] = -np.inf
    x[4, 40:] = 7.0
    mesh = jf.make_mesh(1, 1, 2, devices=jax.devices()[:2])
    logits = jax.device_put(x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(
        None, "tensor")))

    with shd.use(mesh, shd.load_rules("default")):
        got = jax.jit(sampling.argmax)(logits)
        hlo = jax.jit(sampling.argmax).lower(logits).compile().as_text()
    np.testing.assert_array_equal(np.asarray(got), np.argmax(x, -1))
    assert "all-reduce" in hlo and "all-gather" not in hlo


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


def test_vocab_parallel_lookup_and_chosen_logprob_equal_plain_formulas():
    """The tensor-sharded embedding lookup is table[ids]; the chosen log-probability is
    log_softmax's entry at the token (both written as reductions for the partitioner)."""
    from jaxformer.layers.embeddings import lookup_rows
    rng = np.random.default_rng(1)
    table = rng.standard_normal((64, 8)).astype(np.float32)
    ids = rng.integers(0, 64, (3, 5)).astype(np.int32)
    mesh = jf.make_mesh(1, 1, 2, devices=jax.devices()[:2])
    sharded = jax.device_put(table, jax.sharding.NamedSharding(
        mesh, jax.sharding.PartitionSpec("tensor", None)))

    with shd.use(mesh, shd.load_rules("default")):
        got = jax.jit(lookup_rows)(sharded, ids)
    np.testing.assert_array_equal(np.asarray(got), table[ids])
    logits = rng.standard_normal((4, 64)).astype(np.float32)
    logits[:, 60:] = -np.inf  # padded vocabulary
    tokens = np.array([0, 17, 59, 33], np.int32)
    want = np.asarray(jax.nn.log_softmax(logits, -1))[np.arange(4), tokens]
    np.testing.assert_allclose(np.asarray(sampling.chosen_logprob(logits, tokens)), want,
                               rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_exact_gelu_matches_torch(dtype):
    """The erf-form GELU (layers.mlp.gelu_erf) against torch's exact GELU, which computes
    bfloat16 inputs in float32 and rounds once: within 1e-6 absolute (the far negative tail,
    where 1 + erf cancels, in both) plus a few float32 ulps, and bfloat16 within one
    bfloat16 rounding."""
    torch = pytest.importorskip("torch")
    from jaxformer.layers.mlp import activation
    x = np.concatenate([np.linspace(-12, 12, 4001), np.random.default_rng(0).normal(0, 3, 4000)])
    x = x.astype(np.float32)
    tdt = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    ref = torch.nn.functional.gelu(torch.tensor(x).to(tdt)).float().numpy()
    ours = np.asarray(activation("gelu", jnp.asarray(x, dtype)).astype(jnp.float32))
    if dtype == "float32":
        np.testing.assert_allclose(ours, ref, rtol=4e-6, atol=1e-6)
    else:
        np.testing.assert_allclose(ours, ref, rtol=2 ** -7, atol=1e-6)  # one bf16 ulp
        assert np.mean(ours != ref) < 0.1
