"""The host-side page bookkeeping (jaxformer.serving.pages) against a model kept by the test.

The random driver plays a scheduler over a small pool: sequences are admitted through the
prefix cache, computed in chunks, decoded, forked, preempted and resumed, finished. The test
keeps its own "device": for every page slot, the (seed, whole token prefix) whose K/V a step
wrote there. A page found in the prefix cache must hold exactly the prefix it is claimed for,
and every refcount must equal the number of tables the test knows hold the page.
"""
import collections
import copy
import random

import pytest

from jaxformer.serving.pages import NULL_PAGE, BlockTable, NoPages, PagePool, hash_blocks

PS = 4


def pool_state(pool):
    return copy.deepcopy(pool.__dict__)


def compute(pool, table, tokens, upto, device):
    """Write the K/V of tokens[table.num_tokens:upto] (the device's part), then tell the table;
    returns the pages allocated for it."""
    start, fresh = table.num_tokens, pool.allocate(table.needed_pages(upto))
    table.append(fresh)
    for pos in range(start, upto):
        device[table.pages[pos // PS]][pos % PS] = (table.seed, tuple(tokens[:pos + 1]))
    table.mark_computed(tokens[:upto], pool)
    return fresh


def assert_holds(table, tokens, device):
    """Every computed slot of the table holds the K/V of the prefix it claims."""
    for pos in range(table.num_tokens):
        assert device[table.pages[pos // PS]][pos % PS] == (table.seed, tuple(tokens[:pos + 1]))


# ---- the random driver ---------------------------------------------------------------------
class Driver:
    def __init__(self, prefix_caching, seed, num_pages=24):
        self.rng = random.Random(seed)
        self.pool = PagePool(num_pages, PS, prefix_caching)
        self.device = collections.defaultdict(lambda: [None] * PS)
        self.running = []  # [table, tokens, length to reach]
        self.waiting = []  # preempted: (seed, tokens, length to reach)
        self.bases = [[self.rng.randrange(3) for _ in range(12)] for _ in range(3)]
        self.query_tokens = self.hit_tokens = self.no_pages = 0

    def admit(self, seed, tokens, target):
        table = BlockTable(PS, seed)
        n = table.match_prefix(self.pool, tokens)
        assert n == table.num_tokens == len(table.pages) * PS and n <= len(tokens) - 1
        self.query_tokens += len(tokens)
        self.hit_tokens += n
        assert_holds(table, tokens, self.device)
        self.running.append([table, tokens, target])

    def new(self):
        prompt = self.rng.choice(self.bases)[:self.rng.randrange(0, 13)]
        prompt = prompt + [self.rng.randrange(3) for _ in range(self.rng.randrange(1, 6))]
        self.admit(self.rng.choice([None, "lora"]), prompt, len(prompt) + self.rng.randrange(1, 9))

    def step(self):
        seq = self.rng.choice(self.running)
        table, tokens, target = seq
        if table.num_tokens == len(tokens):  # decode: sample a token, compute it
            if len(tokens) == target:
                return self.finish(seq)
            tokens.append(self.rng.randrange(3))
        upto = min(len(tokens), table.num_tokens + self.rng.randrange(1, 7))  # a prompt chunk
        need = table.needed_pages(upto)
        if not self.pool.can_allocate(need):
            before = pool_state(self.pool)
            with pytest.raises(NoPages):
                self.pool.allocate(need)
            assert pool_state(self.pool) == before
            self.no_pages += 1
            return self.preempt(self.rng.choice(self.running))
        held = self.expected_refs()
        fresh = compute(self.pool, table, tokens, upto, self.device)
        assert all(held[p] == 0 for p in fresh) and NULL_PAGE not in fresh
        assert_holds(table, tokens, self.device)

    def finish(self, seq):
        self.running.remove(seq)
        seq[0].release(self.pool)

    def preempt(self, seq):
        self.finish(seq)
        self.waiting.append((seq[0].seed, seq[1], seq[2]))

    def resume(self):
        self.admit(*self.waiting.pop(self.rng.randrange(len(self.waiting))))

    def fork(self):
        table, tokens, target = self.rng.choice(self.running)
        other = table.fork(self.pool)
        assert_holds(other, tokens, self.device)
        self.running.append([other, list(tokens), target])

    def expected_refs(self):
        refs = collections.Counter(p for t, _, _ in self.running for p in t.pages)
        assert NULL_PAGE not in refs
        return refs

    def check(self):
        pool = self.pool
        pool.check_invariants()
        refs = self.expected_refs()
        assert [pool.ref_count(p) for p in range(pool.num_pages)] == [
            refs[p] for p in range(pool.num_pages)]
        assert pool.num_in_use == len(refs)
        assert pool.num_free + pool.num_in_use + pool.num_evictable == pool.num_pages - 1
        assert pool.prefix_query_tokens == self.query_tokens
        assert pool.prefix_hit_tokens == self.hit_tokens
        if not pool.prefix_caching:
            assert pool.num_cached == pool.num_evictable == pool.evictions == 0
            assert pool.prefix_hit_tokens == 0

    def run(self, ops):
        for _ in range(ops):
            r = self.rng.random()
            if not self.running or r < 0.15:
                self.new()
            elif r < 0.2 and self.waiting:
                self.resume()
            elif r < 0.25:
                self.fork()
            elif r < 0.3:
                self.finish(self.rng.choice(self.running))
            elif r < 0.33:
                self.preempt(self.rng.choice(self.running))
            else:
                self.step()
            self.check()
        for seq in list(self.running):
            self.finish(seq)
        self.check()
        assert self.pool.num_in_use == 0


@pytest.mark.parametrize("prefix_caching, seed", [(True, 0), (True, 1), (False, 0)])
def test_random_operations_keep_the_invariants(prefix_caching, seed):
    d = Driver(prefix_caching, seed)
    d.run(2000)
    assert d.no_pages > 10  # the pool ran short often enough to test the failure path
    if prefix_caching:  # the driver exercised the cache, hits and eviction
        assert d.pool.hit_rate > 0.2 and d.pool.evictions > 50


# ---- targeted ------------------------------------------------------------------------------
def test_block_hashes_chain_over_the_whole_prefix():
    t = list(range(10))
    h = hash_blocks(t, PS)
    assert len(h) == 2 and len(set(h)) == 2  # the partial block has no hash
    assert hash_blocks(t[:8] + [99], PS) == h  # only full blocks count
    changed = hash_blocks([7] + t[1:], PS)
    assert changed[0] != h[0] and changed[1] != h[1]  # block 1's hash covers block 0
    assert hash_blocks(t[:4] + [0] + t[5:], PS)[0] == h[0]
    assert hash_blocks(t, PS, seed="lora")[0] != h[0]
    assert hash_blocks(t[4:], PS, parent=h[0]) == h[1:]
    assert hash_blocks([1, 2, 3, -1], PS) != hash_blocks([1, 2, 3, -2], PS)


def test_lookup_leaves_one_token_to_compute_and_takes_references():
    pool, device = PagePool(8, PS), collections.defaultdict(lambda: [None] * PS)
    a, prompt = BlockTable(PS), list(range(8))
    assert a.match_prefix(pool, prompt) == 0
    compute(pool, a, prompt, 8, device)
    assert pool.num_cached == 2
    b = BlockTable(PS)
    assert b.match_prefix(pool, prompt) == 4  # exactly 2 cached pages: the last is recomputed
    assert b.pages == a.pages[:1] and pool.ref_count(a.pages[0]) == 2
    c = BlockTable(PS)
    assert c.match_prefix(pool, prompt + [5]) == 8 and c.pages == a.pages
    assert BlockTable(PS, "lora").match_prefix(pool, prompt + [5]) == 0  # another seed
    assert pool.lookup([0, 1, 2, 99, 4], None) == ([], 0)
    assert pool.lookup([0], None) == ([], 0)


def test_hit_rate_counts_prompt_tokens():
    pool, device = PagePool(8, PS), collections.defaultdict(lambda: [None] * PS)
    t = BlockTable(PS)
    t.match_prefix(pool, list(range(10)))
    compute(pool, t, list(range(10)), 10, device)
    BlockTable(PS).match_prefix(pool, list(range(10)))  # 8 of 10 hit
    BlockTable(PS).match_prefix(pool, list(range(5)))  # 4 of 5
    assert (pool.prefix_queries, pool.prefix_query_tokens, pool.prefix_hit_tokens) == (3, 25, 12)
    assert pool.hit_rate == pytest.approx(12 / 25)
    assert pool.stats()["hit_rate"] == pytest.approx(12 / 25)


def one_page_sequence(pool, first_token, device):
    t = BlockTable(PS)
    t.match_prefix(pool, [first_token] * 5)
    compute(pool, t, [first_token] * 5, 5, device)  # a full page and a partial one
    return t


def test_eviction_is_least_recently_released_first_and_free_pages_go_first():
    pool, device = PagePool(8, PS), collections.defaultdict(lambda: [None] * PS)
    a, b, c = (one_page_sequence(pool, i, device) for i in range(3))
    full = {k: t.pages[0] for k, t in zip("abc", (a, b, c))}
    for t in (a, b, c):
        t.release(pool)
    assert (pool.num_free, pool.num_evictable, pool.num_cached) == (4, 3, 3)
    assert pool.allocate(4) and pool.evictions == 0  # the free list first
    # b is looked up again and released: now a, c, b from least to most recent
    t = BlockTable(PS)
    assert t.match_prefix(pool, [1] * 5) == 4
    t.release(pool)
    assert pool.allocate(1) == [full["a"]] and pool.evictions == 1
    assert pool.allocate(1) == [full["c"]]
    assert pool.lookup([0] * 5) == ([], 0) and pool.lookup([2] * 5) == ([], 0)
    assert pool.lookup([1] * 5) == ([full["b"]], 4)


def test_release_evicts_the_tail_of_a_prefix_first():
    pool, device = PagePool(5, PS), collections.defaultdict(lambda: [None] * PS)
    t, prompt = BlockTable(PS), list(range(13))
    t.match_prefix(pool, prompt)
    compute(pool, t, prompt, 13, device)  # 3 full pages and one token: the whole pool
    pages = list(t.pages)
    t.release(pool)
    assert pool.allocate(2) == [pages[3], pages[2]]  # the partial page was free
    assert pool.lookup(prompt) == (pages[:2], 8)


def test_allocate_failure_and_bad_release_change_nothing():
    pool, device = PagePool(6, PS), collections.defaultdict(lambda: [None] * PS)
    a = one_page_sequence(pool, 0, device)
    a.release(pool)  # 1 evictable, 4 free
    held = pool.allocate(2)
    before = pool_state(pool)
    assert pool.can_allocate(3) and not pool.can_allocate(4)
    with pytest.raises(NoPages, match="need 4 pages, 2 free"):
        pool.allocate(4)
    with pytest.raises(ValueError, match="page .* has 1 references, released 2 times"):
        pool.release([held[1], held[0], held[0]])
    with pytest.raises(ValueError, match="share: page .* is free"):
        pool.share([held[0], pool._free[0]])
    assert pool_state(pool) == before


def test_duplicate_blocks_switch_to_the_cached_page():
    pool, device = PagePool(8, PS), collections.defaultdict(lambda: [None] * PS)
    prompt = list(range(6))
    a, b = BlockTable(PS), BlockTable(PS)
    assert a.match_prefix(pool, prompt) == b.match_prefix(pool, prompt) == 0  # both miss
    compute(pool, a, prompt, 6, device)
    compute(pool, b, prompt, 6, device)  # b wrote its own copy of block 0, then switches
    assert b.pages[0] == a.pages[0] and pool.ref_count(a.pages[0]) == 2
    assert pool.num_in_use == 3 and pool.num_free == 4  # b's copy went back to the free list
    assert_holds(b, prompt, device)


def test_preempted_sequence_recovers_its_computed_blocks():
    pool, device = PagePool(8, PS), collections.defaultdict(lambda: [None] * PS)
    t, tokens = BlockTable(PS, "m"), list(range(6))
    t.match_prefix(pool, tokens)
    compute(pool, t, tokens, 6, device)
    for tok in (6, 7, 8, 9):  # decode four tokens: block 1 fills with generated ones
        tokens.append(tok)
        compute(pool, t, tokens, len(tokens), device)
    assert len(t.block_hashes) == 2 and pool.num_cached == 2
    t.release(pool)
    assert (t.pages, t.num_tokens, t.block_hashes) == ([], 0, [])
    assert pool.num_in_use == 0
    assert t.match_prefix(pool, tokens) == 8  # prompt and generated blocks come back
    assert_holds(t, tokens, device)


def test_prefix_caching_off_is_a_plain_allocator():
    pool, device = PagePool(4, PS, prefix_caching=False), collections.defaultdict(
        lambda: [None] * PS)
    t = one_page_sequence(pool, 0, device)
    assert pool.register(t.pages[0], b"x") == t.pages[0] and pool.num_cached == 0
    t.release(pool)
    assert pool.num_free == 3 and pool.num_evictable == 0
    assert BlockTable(PS).match_prefix(pool, [0] * 5) == 0
    assert sorted(pool.allocate(3)) == [1, 2, 3] and pool.evictions == 0


def test_block_table_rows_and_sizes():
    t = BlockTable(PS)
    assert t.needed_pages(0) == 0 and t.needed_pages(1) == 1 and t.needed_pages(9) == 3
    t.append([3, 5])
    assert t.tokens_capacity == 8 and t.needed_pages(8) == 0 and t.needed_pages(9) == 1
    assert t.as_row(4) == [3, 5, NULL_PAGE, NULL_PAGE]
    with pytest.raises(ValueError, match="2 pages exceed the width 1"):
        t.as_row(1)


def test_counting_tokens_that_fill_no_block_is_mark_computed():
    """computed(n) (no new full block, no tokens built) leaves a table as mark_computed of
    the same n tokens does, and refuses an n that completes a block."""
    pool, seq = PagePool(16, PS), list(range(1, 3 * PS + 1))
    a, b = BlockTable(PS), BlockTable(PS)
    for t in (a, b):
        t.append(pool.allocate(3))
    a.mark_computed(seq[:PS + 1], pool)
    b.mark_computed(seq[:PS + 1], pool)  # (its first block switches to a's page)
    pages = (list(a.pages), list(b.pages))
    for n in range(PS + 2, 2 * PS):
        assert not a.fills_block(n)
        a.computed(n)
        b.mark_computed(seq[:n], pool)
        assert (a.num_tokens, a.block_hashes) == (b.num_tokens, b.block_hashes) == \
            (n, a.block_hashes[:1])
        assert (a.pages, b.pages) == pages
    assert a.fills_block(2 * PS)
    with pytest.raises(ValueError, match="complete a block"):
        a.computed(2 * PS)


@pytest.mark.parametrize("make, match", [
    (lambda: PagePool(1, 4), "PagePool.num_pages"),
    (lambda: PagePool(4, 0), "PagePool.page_size"),
    (lambda: BlockTable(0), "BlockTable.page_size"),
    (lambda: PagePool(4, 4).allocate(-1), "allocate: n"),
    (lambda: PagePool(4, 4).release([0]), "release: page must be"),
    (lambda: PagePool(4, 4).register(1, b"h"), "register: page 1 is not referenced"),
    (lambda: BlockTable(4).append([0]), "null page"),
    (lambda: BlockTable(4).match_prefix(PagePool(4, 8), [1]), "page_size 4 != the pool's 8"),
    (lambda: BlockTable(4).mark_computed([1], PagePool(4, 4)), "1 tokens, need between 0"),
])
def test_bad_input_is_named(make, match):
    with pytest.raises(ValueError, match=match):
        make()
