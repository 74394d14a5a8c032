"""FP8 calibration's recording (Dense.observe, quant.calibrate.observe / recorded) against
numpy: max |x| over the valid tokens only, with the activations left unquantized."""
import jax
import ml_dtypes
import numpy as np
from flax import nnx

from jaxformer.layers.base import Dense
from jaxformer.quant import calibrate
from jaxformer.quant.module import quantize_module


class _Holder(nnx.Module):
    """One Dense under `layers`, where quantization covers it."""

    def __init__(self):
        self.layers = Dense(nnx.Rngs(0), (16, 8), ("embed", "mlp"))


def test_observed_input_is_max_abs_over_valid_tokens_and_product_is_weight_only():
    holder = quantize_module(_Holder(), "fp8")
    dense = holder.layers
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 5, 16)).astype(np.float32)
    mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], bool)
    x[0, 3:] = 100.0  # padding: larger than any valid token, must not count
    x[1, 2, 7] = -9.0  # the valid maximum, negative

    denses = calibrate.observe(holder)
    assert denses == [dense] and dense.observe
    y = dense.einsum("btd,df->btf", jax.numpy.asarray(x))
    got = calibrate.recorded(denses, mask)

    assert float(got[dense.qname]) == 9.0
    # the weight-only product: x (not quantized) times the dequantized FP8 kernel [F, D]
    codes = np.asarray(dense.kernel[...]).astype(ml_dtypes.float8_e4m3fn).astype(np.float64)
    w = codes * np.asarray(dense.kernel_scale[...], np.float64)[:, None]
    np.testing.assert_allclose(np.asarray(y, np.float64), x.astype(np.float64) @ w.T,
                               rtol=1e-5, atol=1e-5)


def test_a_dense_called_twice_keeps_the_elementwise_maximum():
    holder = quantize_module(_Holder(), "fp8")
    dense = holder.layers
    a = np.zeros((1, 2, 16), np.float32)
    b = np.zeros((1, 2, 16), np.float32)
    a[0, 0, 0], b[0, 1, 3] = 2.0, -5.0
    denses = calibrate.observe(holder)
    dense.einsum("btd,df->btf", jax.numpy.asarray(a))
    dense.einsum("btd,df->btf", jax.numpy.asarray(b))
    np.testing.assert_array_equal(np.asarray(dense.observed[...]), [[2.0, 5.0]])
    assert float(calibrate.recorded(denses, np.array([[True, False]]))[dense.qname]) == 2.0
