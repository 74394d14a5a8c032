"""The Engine (engine.py): requests prefilled and inserted into slots at different times
decode exactly as transformers does each prompt alone; seeded sampling does not depend on
the slot or on the other requests; freed slots record nothing; bad calls are refused."""
import numpy as np
import pytest
import torch

import jaxformer as jf
from jaxformer.engine import Engine, EngineConfig

GREEDY = jf.Sampling(temperature=0, logprobs=True)


@pytest.fixture(scope="module")
def model(llama4):
    return jf.load(llama4[1])


def hf_greedy(hf, prompt, n):
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n,
                          do_sample=False, pad_token_id=0)
    return out[0, len(prompt):].tolist()


class Driver:
    """The host loop a scheduler runs: insert when a slot is free, step, collect."""

    def __init__(self, engine):
        self.engine = engine
        self.state = engine.init_state()
        self.got = {}

    def insert(self, rid, prompt, slot, sampling=GREEDY, max_new=6, seed=0):
        pre = self.engine.prefill([prompt], [sampling], [max_new], seeds=[seed])
        first, _ = self.engine.tokens(pre)
        self.got[rid] = (slot, [int(first[0, 0])])
        self.state = self.engine.insert(self.state, pre, [slot])

    def step(self, n):
        self.state = self.engine.step(self.state, n)
        toks, _ = self.engine.tokens(self.state)
        for slot, out in self.got.values():
            out.extend(int(t) for t in toks[slot] if t >= 0)


def test_requests_inserted_at_any_time_decode_as_alone(llama4, model):
    hf, _ = llama4
    prompts = {"a": [5, 6, 7, 8, 9, 10, 11], "b": [12, 13], "c": list(range(20, 39))}
    d = Driver(Engine(model, EngineConfig(slots=4, max_length=48, window=4)))
    d.insert("a", prompts["a"], slot=2)
    d.step(3)
    d.insert("b", prompts["b"], slot=0)
    d.step(2)
    d.insert("c", prompts["c"], slot=3)
    for _ in range(3):
        d.step(4)
    for rid, p in prompts.items():
        assert d.got[rid][1] == hf_greedy(hf, p, 6), rid
    # every row stopped at its max_new: nothing more is recorded
    d.step(4)
    assert all(len(out) == 6 for _, out in d.got.values())


def test_seeded_sampling_does_not_depend_on_slot_or_neighbours(model):
    s = jf.Sampling(temperature=0.9, top_k=20, top_p=0.9, repetition_penalty=1.2)
    alone = Driver(Engine(model, EngineConfig(slots=2, max_length=32, window=8)))
    alone.insert("x", [3, 4, 5], slot=0, sampling=s, max_new=8, seed=11)
    alone.step(8)
    crowd = Driver(Engine(model, EngineConfig(slots=2, max_length=32, window=8)))
    crowd.insert("y", [9, 9, 9, 9], slot=0, sampling=jf.Sampling(temperature=1.3), seed=5)
    crowd.step(2)
    crowd.insert("x", [3, 4, 5], slot=1, sampling=s, max_new=8, seed=11)
    crowd.step(8)
    assert crowd.got["x"][1] == alone.got["x"][1]
    other = Driver(Engine(model, EngineConfig(slots=2, max_length=32, window=8)))
    other.insert("x", [3, 4, 5], slot=0, sampling=s, max_new=8, seed=12)
    other.step(8)
    assert other.got["x"][1] != alone.got["x"][1]


def test_free_slot_records_nothing_and_bad_calls_are_refused(model):
    eng = Engine(model, EngineConfig(slots=2, max_length=32, window=4))
    d = Driver(eng)
    d.insert("a", [1, 2, 3], slot=1, max_new=20)
    d.step(2)
    d.state = eng.free(d.state, [1])
    d.state = eng.step(d.state, 4)
    toks, _ = eng.tokens(d.state)
    assert (toks == -1).all()
    pre = eng.prefill([[1, 2]], [GREEDY], [4])
    with pytest.raises(ValueError, match=r"insert: need 1 to 1 distinct slots in \[0, 2\)"):
        eng.insert(d.state, pre, [2])
    with pytest.raises(ValueError, match="step: 5 steps exceed the window of 4"):
        eng.step(d.state, 5)
    with pytest.raises(ValueError, match="EngineConfig.max_length: 100 exceeds"):
        Engine(model, EngineConfig(slots=2, max_length=100))
    with pytest.raises(ValueError, match="EngineConfig.window: must be a positive"):
        EngineConfig(slots=2, max_length=32, window=0)
    with pytest.raises(ValueError, match="does not fit the engine's 16 cache slots"):
        Engine(model, EngineConfig(slots=2, max_length=16)).prefill([list(range(1, 20))],
                                                                    [GREEDY], [1])


def test_host_key_data_is_jax_key_data():
    """Request keys are built on the host (no device op per request): the same bits as
    jax.random.key and generate()'s fold_in(key(seed), row)."""
    import jax

    from jaxformer.engine import generate_key_data, key_data
    for s in (0, 7, 2 ** 31 - 1, 123456789):
        np.testing.assert_array_equal(key_data(s), jax.random.key_data(jax.random.key(s)))
    base = jax.random.key(5)
    want = [jax.random.key_data(jax.random.fold_in(base, b)) for b in range(4)]
    np.testing.assert_array_equal(generate_key_data(5, 4), np.stack(want))


def test_graph_control_flow_compiles_the_same_tokens(llama4, model, monkeypatch):
    """RunConfig.graph_control_flow hands XLA the command-buffer option (a bad value of it
    fails the compile, naming the value) and changes no token: transformers' greedy tokens
    with it on."""
    from jaxformer import params_jit
    hf, _ = llama4
    prompt = [5, 17, 33, 2, 9]
    on = model.with_run(graph_control_flow=True)
    out = on.generate([prompt], max_new_tokens=6, ignore_eos=True)
    assert out.tokens[0] == hf_greedy(hf, prompt, 6)
    monkeypatch.setattr(params_jit, "GRAPH_CONTROL_FLOW",
                        {"xla_gpu_enable_command_buffer": "FUSION,NOT_A_COMMAND"})
    with pytest.raises(Exception, match="NOT_A_COMMAND"):
        model.with_run(graph_control_flow=True).generate([prompt], max_new_tokens=2)
    with pytest.raises(ValueError, match="RunConfig.graph_control_flow"):
        jf.RunConfig(graph_control_flow="yes")
