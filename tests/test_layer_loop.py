"""The unrolled layer layout (RunConfig.layer_loop="unroll": one array per layer, the GPU
decode default) against transformers and against the stacked (scan) layout."""
import jax
import numpy as np
import pytest
import torch
import transformers

import jaxformer as jf
from conversion.hf import convert
from jaxformer import RunConfig

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [14, 15, 16, 17]]


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
        num_attention_heads=8, num_key_value_heads=4, head_dim=8, max_position_embeddings=64,
        tie_word_embeddings=False, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    d = tmp_path_factory.mktemp("llama")
    hf.save_pretrained(d / "hf")
    convert(d / "hf", d / "ckpt")
    return hf, d / "ckpt"


def _hf_greedy(hf, prompt, n):
    ids = torch.tensor([prompt])
    out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                      do_sample=False, pad_token_id=0, eos_token_id=None)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("sizes", [(1, 1), (2, 2), (1, 4)])
def test_unrolled_matches_transformers_on_meshes(llama, sizes):
    hf, path = llama
    data, tensor = sizes
    mesh = jf.make_mesh(data=data, tensor=tensor, devices=jax.devices()[:data * tensor])
    model = jf.load(path, mesh=mesh, layer_loop="unroll")
    assert model.run.layer_loop == "unroll"
    leaf = model.params["layers"][2]["attn"]["qkv"]["kernel"][...]
    assert leaf.shape == (64, 4, 4, 8)  # one layer's [D, K, G+2, H]: nothing stacked
    if tensor > 1:
        assert leaf.sharding.spec[1] == "tensor"  # kv heads still on tensor
    ids = np.asarray([PROMPTS[0] * 2])
    with torch.no_grad():
        ref = hf(torch.tensor(ids)).logits.numpy()
    np.testing.assert_allclose(model.logits(ids), ref, atol=1e-4, rtol=1e-4)
    out = model.generate(PROMPTS, max_new_tokens=6)
    assert out.tokens == [_hf_greedy(hf, p, 6) for p in PROMPTS]


def test_unrolled_saves_the_stacked_checkpoint(llama, tmp_path):
    _, path = llama
    model = jf.load(path, layer_loop="unroll")
    model.save(tmp_path / "again")
    back = jf.load(tmp_path / "again", layer_loop="scan")
    assert back.params["layers"]["attn"]["qkv"]["kernel"][...].shape[0] == 3
    ids = np.asarray([PROMPTS[2]])
    np.testing.assert_array_equal(back.logits(ids), model.logits(ids))


def test_layer_loop_choices_and_errors():
    cpu = jf.make_mesh(devices=jax.devices()[:1])
    assert jf.engine.resolve_layer_loop(cpu, "auto") == "scan"  # unroll is for GPUs
    with pytest.raises(ValueError, match="layer_loop"):
        RunConfig(layer_loop="loop")
    with pytest.raises(ValueError, match="needs pipe=1"):
        RunConfig(pipe=2, layer_loop="unroll")
