"""The Engine over a paged KV cache (paged_engine.py): prompts prefilled in chunks through
page tables, pages shared by a common prefix, decode over the rows' pages; greedy tokens
and log-probs against a teacher-forced pass over each sequence alone."""
import numpy as np
import pytest

import jaxformer as jf
from conftest import teacher_forced
from jaxformer.engine import EngineConfig
from jaxformer.paged_engine import Chunk, PagedEngine

GREEDY = jf.Sampling(temperature=0, logprobs=True)


@pytest.fixture(scope="module")
def model(llama4):
    return jf.load(llama4[1])


def test_chunked_paged_prefill_and_decode_with_a_shared_prefix(model):
    ps = 4
    eng = PagedEngine(model, EngineConfig(slots=2, max_length=48, window=4, page_size=ps,
                                          num_pages=40), chunk=8)
    state = eng.init_state()
    rng = np.random.default_rng(3)
    shared = rng.integers(1, 96, 12).tolist()             # three full pages
    a = shared + rng.integers(1, 96, 7).tolist()         # 19 tokens
    b = shared + rng.integers(1, 96, 3).tolist()         # 15 tokens
    pa = list(range(1, 12))                              # a's pages: 11 x 4 = 44 slots
    pb = pa[:3] + list(range(20, 28))                    # b shares a's first three pages
    # a: chunks of 8, 8, 3; its first chunk alone, then with b's tail (prefix cached)
    state, *_ = eng.prefill_chunks(state, [Chunk(0, a[:8], 0, pa, False)])
    state, *_ = eng.prefill_chunks(state, [Chunk(0, a[8:16], 8, pa, False)])
    state, out = eng.prefill_chunks(state, [
        Chunk(0, a[16:], 16, pa, True, GREEDY, max_new=6),
        Chunk(1, b[12:], 12, pb, True, GREEDY, max_new=6)])
    first, lp = out.tokens, out.logprobs
    got = {0: [int(first[0])], 1: [int(first[1])]}
    lps = {0: [float(lp[0])], 1: [float(lp[1])]}
    for _ in range(2):
        state = eng.step(state, 4)
        toks, lpw = eng.tokens(state)
        for r in (0, 1):
            keep = toks[r] >= 0
            got[r] += toks[r][keep].tolist()
            lps[r] += lpw[r][keep].tolist()
    for r, prompt in ((0, a), (1, b)):
        want, want_lp = teacher_forced(model, prompt, got[r])
        assert got[r] == want and len(got[r]) == 6, r
        np.testing.assert_allclose(lps[r], want_lp, atol=1e-5)
    # a freed slot's table is cleared: its decode writes go to the null page
    state = eng.free(state, [0])
    assert (np.asarray(state.pages)[0] == 0).all() and np.asarray(state.done)[0]
