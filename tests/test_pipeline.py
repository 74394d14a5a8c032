"""Pipeline parallelism: every data x pipe x tensor layout equals the single-device result.

Tiny float32 models on 8 emulated CPU devices: logits (<= 1e-5) and greedy tokens (exact) of
a GPT-style and a LLaMA-style decoder, BERT encodings, sampled tokens with a seed, stop
conditions and streaming through the circular decode schedule, and the stage-split errors.
"""
import functools
import os
import sys

import jax
import numpy as np
import pytest

import jaxformer as jf
from jaxformer import pipeline
from jaxformer.config import ModelConfig
from jaxformer.model import _run_config, param_shardings
from jaxformer.models import abstract_params
from jaxformer.sharding import check_divisible

sys.path.insert(0, os.path.dirname(__file__))
from pipeline_models import BERT, GPT, LLAMA, LLAMA_GQA8, PROMPTS

# hashable, for the caches below
GPT, LLAMA, BERT, LLAMA_GQA8 = (tuple(sorted(d.items()))
                                for d in (GPT, LLAMA, BERT, LLAMA_GQA8))
FAMILIES = {"gpt": GPT, "llama": LLAMA, "llama-gqa8": LLAMA_GQA8}

MESHES = [(1, 2, 1), (1, 4, 1), (1, 8, 1), (1, 2, 2), (2, 2, 2)]
TOL = 1e-5
NEW = 6
IDS = np.asarray([[5, 17, 42, 8, 3, 9, 61], [2, 33, 90, 14, 7, 25, 11], [70, 9, 6, 12, 88, 0, 0],
                  [31, 45, 2, 66, 7, 19, 0]])
MASK = (IDS > 0) | (np.arange(IDS.shape[1]) < 3)


def mesh_id(m):
    return "data{}-pipe{}-tensor{}".format(*m)


@functools.cache
def weights(cfg: ModelConfig) -> dict:
    """Seeded numpy weights, no init program to compile per mesh; scaled so that greedy
    decoding of these tiny random models does not collapse onto one repeated token."""
    rng = np.random.default_rng(1)

    def init(path, a):
        keys = [p.key for p in path]
        if keys[-1] == "scale":
            return (1.0 + rng.normal(0.0, 0.1, a.shape)).astype(np.float32)
        std = (0.02 if keys[-1] == "bias" else 0.15 if "token" in keys
               else 0.1 if "lm_head" in keys else 0.25)
        return rng.normal(0.0, std, a.shape).astype(np.float32)

    return jax.tree_util.tree_map_with_path(init, abstract_params(cfg))


@functools.cache
def make(cfg_dict, mesh=(1, 1, 1)):
    """The same weights on `mesh` (one model per family and mesh, so compiles are shared)."""
    cfg = ModelConfig(**dict(cfg_dict))
    m = jf.make_mesh(*mesh, devices=jax.devices()[: int(np.prod(mesh))])
    run, rules = _run_config(m, "float32", "default", "auto")
    check_divisible(cfg, m, rules)
    params = jax.device_put(weights(cfg), param_shardings(cfg, m, rules))
    return jf.Model(cfg, params, m, run, rules)


@functools.cache
def reference(name):
    """Single-device logits and greedy tokens (computed once per family)."""
    model = make(FAMILIES[name])
    return model.logits(IDS, MASK), model.generate(PROMPTS, max_new_tokens=NEW).tokens


def valid_close(a, b):
    assert a.shape == b.shape
    return float(np.abs(a - b)[MASK].max())


@pytest.mark.parametrize("mesh", MESHES, ids=mesh_id)
@pytest.mark.parametrize("family", ["gpt", "llama"])
def test_decoder_matches_single_device(family, mesh):
    ref_logits, ref_tokens = reference(family)
    model = make(FAMILIES[family], mesh)
    assert valid_close(model.logits(IDS, MASK), ref_logits) <= TOL
    assert model.generate(PROMPTS, max_new_tokens=NEW).tokens == ref_tokens


@pytest.mark.parametrize("mesh", [(1, 1, 8), (1, 2, 4)], ids=mesh_id)
def test_eight_device_layouts_of_a_70b_head_layout(mesh):
    """The 8-GPU layouts of the scale-out benchmarks (tensor=8; tensor=4 x pipe=2) on a
    model with LLaMA-70B's grouped heads: single-device logits and greedy tokens."""
    ref_logits, ref_tokens = reference("llama-gqa8")
    model = make(LLAMA_GQA8, mesh)
    assert valid_close(model.logits(IDS, MASK), ref_logits) <= TOL
    assert model.generate(PROMPTS, max_new_tokens=NEW).tokens == ref_tokens


def test_long_inputs_use_more_microbatches_than_stages():
    ids = np.random.default_rng(0).integers(0, 100, (16, 64))
    mask = np.arange(64)[None] < np.asarray([64, 60, 33, 64, 10, 64, 50, 2] * 2)[:, None]
    assert pipeline.num_microbatches(16, 4) == 4  # what run_stages picks for 16 x 64 tokens
    want = make(LLAMA).logits(ids, mask)
    got = make(LLAMA, (1, 2, 1)).logits(ids, mask)  # 4 microbatches over 2 stages
    assert np.abs(got - want)[mask].max() <= TOL


@pytest.mark.parametrize("mesh", [(1, 2, 1), (1, 8, 1), (2, 2, 2)], ids=mesh_id)
def test_bert_encode_matches_single_device(mesh):
    types = (np.arange(IDS.shape[1]) >= 4).astype(np.int32)[None].repeat(len(IDS), 0)
    ref = make(BERT)
    h0, p0 = ref.encode(IDS, MASK, types)
    model = make(BERT, mesh)
    h1, p1 = model.encode(IDS, MASK, types)
    assert valid_close(h1, h0) <= TOL
    assert np.abs(p1 - p0).max() <= TOL
    assert valid_close(model.logits(IDS, MASK), ref.logits(IDS, MASK)) <= TOL


SAMPLINGS = [jf.Sampling(temperature=0.9, top_p=0.9, logprobs=True),
             jf.Sampling(temperature=1.0, top_k=5, repetition_penalty=1.3,
                         frequency_penalty=0.5),
             jf.Sampling(temperature=0.0, stop_token_ids=(54,)),
             jf.Sampling(temperature=1.2, min_p=0.05, presence_penalty=0.3)]


@pytest.mark.parametrize("mesh", [(2, 2, 2)], ids=mesh_id)
def test_sampling_modes_match_single_device(mesh):
    def run(model):
        out = model.generate(PROMPTS, max_new_tokens=8, sampling=SAMPLINGS, seed=3)
        return out.tokens, out.logprobs

    t0, l0 = run(make(LLAMA))
    t1, l1 = run(make(LLAMA, mesh))
    assert t1 == t0
    assert max(abs(a - b) for x, y in zip(l0, l1) for a, b in zip(x, y)) <= TOL


def test_stops_streaming_and_small_batches():
    ref, model = make(GPT), make(GPT, (1, 2, 1))
    greedy = reference("gpt")[1]
    # a stop token taken from the greedy output ends that row early, the others go on
    row = greedy[1]
    j = next(j for j in range(1, NEW) if row[j] not in row[:j])
    stop = jf.Sampling(temperature=0.0, stop_token_ids=(row[j],))
    kw = dict(max_new_tokens=NEW, sampling=stop, ignore_eos=True)  # same shapes: no recompile
    want = ref.generate(PROMPTS, **kw).tokens
    assert want[1] == row[: j + 1]
    assert model.generate(PROMPTS, **kw).tokens == want
    # streaming resumes the pipelined loop chunk by chunk
    *chunks, final = model.generate(PROMPTS, max_new_tokens=NEW, stream=True, chunk=2)
    assert final.tokens == greedy
    assert [[t for c in chunks for t in c[b]] for b in range(len(PROMPTS))] == greedy
    # one prompt: fewer rows than stages (one microbatch in flight)
    assert model.generate(PROMPTS[:1], max_new_tokens=NEW).tokens == greedy[:1]


def test_uneven_split_is_refused():
    with pytest.raises(ValueError, match=r"num_layers.*6.*pipe=4"):
        jf.Model.random(ModelConfig(**dict(GPT, num_layers=6)),
                        jf.make_mesh(1, 4, 1, devices=jax.devices()[:4]))
    with pytest.raises(ValueError, match=r"num_layers=6 cannot be split evenly over pipe=4"):
        pipeline.check_split(6, 4)
    with pytest.raises(ValueError, match="layers: pipe"):
        pipeline.check_split(8, 2, {"layers": None})


def test_microbatch_choice():
    assert pipeline.num_microbatches(16, 4, data=2) == 4
    assert pipeline.num_microbatches(4, 2, data=2) == 2
    assert pipeline.num_microbatches(2, 2, data=2) == 1  # keeps the data split
    assert pipeline.num_microbatches(1, 8) == 1
    assert pipeline.num_microbatches(6, 4) == 3
