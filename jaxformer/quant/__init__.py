"""Quantized inference: INT8 / INT4 weight-only and FP8 weights-and-activations for the linear
layers of the transformer blocks (docs/quantization.md).

    model = jf.load("ckpt/llama-7b", dtype="bfloat16", quantize="int8")
    model = jf.load("ckpt/llama-7b", dtype="bfloat16", quantize="fp8",
                    calibration=["prompts like", "the ones you serve"])
    model.save("ckpt/llama-7b-int8")      # a quantized checkpoint; load() reads it directly

Modules: spec (the `quantize` values), ops (quantize / dequantize and the matmuls),
params (which layers, their scales and shardings, quantizing on the devices), calibrate
(static FP8 activation scales from sample prompts), convert (quantized checkpoints from
float ones, for the converters).
"""
from jaxformer.quant.spec import QuantSpec, parse

__all__ = ["QuantSpec", "parse"]
