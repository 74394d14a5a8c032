"""The unrolled layer layout (RunConfig.layer_loop="unroll": one array per layer, the GPU
decode default) against transformers and against the stacked (scan) layout."""
import jax
import numpy as np
import pytest
import torch

import jaxformer as jf
from jaxformer import RunConfig

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [14, 15, 16, 17]]


def _hf_greedy(hf, prompt, n):
    ids = torch.tensor([prompt])
    out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                      do_sample=False, pad_token_id=0, eos_token_id=None)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("sizes", [(1, 1, 1), (2, 1, 2), (1, 1, 4), (1, 2, 1), (1, 4, 1),
                                   (2, 2, 2)])
def test_unrolled_matches_transformers_on_meshes(llama4, sizes):
    hf, path = llama4
    data, pipe, tensor = sizes
    mesh = jf.make_mesh(data=data, pipe=pipe, tensor=tensor,
                        devices=jax.devices()[:data * pipe * tensor])
    model = jf.load(path, mesh=mesh, layer_loop="unroll")
    assert model.run.layer_loop == "unroll"
    Ls = 4 // pipe
    assert sorted(model.params["layers"].keys()) == list(range(Ls))
    leaf = model.params["layers"][Ls - 1]["attn"]["qkv"]["kernel"][...]
    # position j holds layer j of each stage: [S, D, K, G+2, H], stages on pipe
    assert leaf.shape == (pipe, 64, 4, 4, 8)
    if pipe > 1:
        assert leaf.sharding.spec[0] == "pipe"
    if tensor > 1:
        assert leaf.sharding.spec[2] == "tensor"  # kv heads still on tensor
    ids = np.asarray([PROMPTS[0] * 2])
    with torch.no_grad():
        ref = hf(torch.tensor(ids)).logits.numpy()
    np.testing.assert_allclose(model.logits(ids), ref, atol=1e-4, rtol=1e-4)
    out = model.generate(PROMPTS, max_new_tokens=6)
    assert out.tokens == [_hf_greedy(hf, p, 6) for p in PROMPTS]


@pytest.mark.parametrize("pipe", [1, 2])
def test_unrolled_saves_the_stacked_checkpoint(llama4, tmp_path, pipe):
    _, path = llama4
    mesh = jf.make_mesh(pipe=pipe, devices=jax.devices()[:pipe])
    model = jf.load(path, mesh=mesh, layer_loop="unroll")
    model.save(tmp_path / "again")
    back = jf.load(tmp_path / "again", layer_loop="scan")
    assert back.params["layers"]["attn"]["qkv"]["kernel"][...].shape[0] == 4
    ids = np.asarray([PROMPTS[2]])
    np.testing.assert_array_equal(back.logits(ids), model.logits(ids))


def test_layer_loop_choices_and_errors():
    cpu = jf.make_mesh(devices=jax.devices()[:1])
    assert jf.model.resolve_layer_loop(cpu, "auto") == "scan"  # unroll is for GPUs
    with pytest.raises(ValueError, match="layer_loop"):
        RunConfig(layer_loop="loop")


@pytest.mark.parametrize("quantize,pipe", [("int8", 1), ("fp8", 1), ("fp8", 2), ("int4-g16", 2)])
def test_quantized_unrolled_equals_quantized_scan(llama4, tmp_path, quantize, pipe):
    """Quantized weights, FP8 calibration and quantized checkpoints in the unrolled layout
    give exactly the stacked layout's results: its logits, and as greedy tokens the argmax
    of its teacher-forced pass over each prompt + those tokens."""
    _, path = llama4
    mesh = jf.make_mesh(pipe=pipe, devices=jax.devices()[:pipe])
    scan = jf.load(path, mesh=mesh, quantize=quantize, layer_loop="scan")
    unrolled = jf.load(path, mesh=mesh, quantize=quantize, layer_loop="unroll")
    n = 4
    got = unrolled.generate(PROMPTS, max_new_tokens=n).tokens
    # one batch of prompt + tokens, right-padded (causal: padding after a row leaves it as is)
    seqs = [p + t for p, t in zip(PROMPTS, got)]
    T = max(map(len, seqs))
    ids = np.asarray([s + [0] * (T - len(s)) for s in seqs])
    want = np.asarray(scan.logits(ids))
    np.testing.assert_allclose(unrolled.logits(ids), want, atol=1e-5, rtol=1e-5)
    assert got == [want[i, len(p) - 1: len(p) - 1 + n].argmax(-1).tolist()
                   for i, p in enumerate(PROMPTS)]
    if quantize == "fp8":  # calibrated scales: [L] stacked vs [S] per position
        a = np.asarray(scan.params["layers"]["mlp"]["wo"]["act_scale"][...])
        b = np.stack([np.asarray(unrolled.params["layers"][j]["mlp"]["wo"]["act_scale"][...])
                      for j in range(4 // pipe)], 1).reshape(-1)
        np.testing.assert_allclose(b, a, rtol=1e-6)
    unrolled.save(tmp_path / "q")
    back = jf.load(tmp_path / "q", mesh=mesh, layer_loop="scan")
    assert back.run.quantize == scan.run.quantize
    np.testing.assert_allclose(back.logits(ids), want, atol=1e-5, rtol=1e-5)
