"""Host-side page bookkeeping for the paged KV cache: which page holds what, who holds it.

The device pool holds P pages of `page_size` tokens each (the K/V of every layer for that token
range). Page 0 is the null page: never handed out, and page-table rows are padded with it.
Every other page is in exactly one of three states:

  free       refcount 0, contents meaningless, on the free list
  in use     refcount > 0, held by one or more sequences (shared prefix pages have several)
  evictable  refcount 0 but cached: a full page whose tokens are known, kept for prefix reuse
             until a fresh page is needed, then evicted least-recently-released first

so free + in use + evictable == P - 1 always. A full page may be published in the prefix cache
under its block hash, a chain over the sequence (h_i = H(h_{i-1}, tokens of block i), seeded
by an optional key such as a LoRA or model name), so equal hashes mean equal whole prefixes and
a page found by hash holds the K/V of exactly that prefix's block.

One thread (the scheduler's step loop) owns a pool and its tables; nothing here locks.
"""
from __future__ import annotations

import collections
import hashlib
import struct
from typing import Hashable, Sequence

NULL_PAGE = 0


class NoPages(RuntimeError):
    """allocate() asked for more pages than are free or evictable; the pool is unchanged."""


def hash_blocks(tokens: Sequence[int], page_size: int, seed: Hashable = None,
                parent: bytes | None = None) -> list[bytes]:
    """Chain hashes of the full blocks of `tokens` (a trailing partial block gets none).

    h_i = sha256(h_{i-1} || tokens of block i), starting from `parent` (the hash of the block
    before tokens[0]) or, when None, from the root of `seed` (repr(seed) names it: a str, int or
    tuple). A cryptographic digest rather than Python's hash(): hash(-1) == hash(-2), str
    hashes change per process, and a collision would silently serve another prompt's K/V.
    """
    return list(_chain(tokens, page_size, seed, parent))


def _chain(tokens, page_size, seed, parent):  # lazily, so lookup stops hashing at a miss
    h = parent if parent is not None else hashlib.sha256(
        b"jaxformer.pages\0" + repr(seed).encode()).digest()
    pack = struct.Struct(f"<{page_size}q").pack
    for i in range(len(tokens) // page_size):
        h = hashlib.sha256(h + pack(*tokens[i * page_size:(i + 1) * page_size])).digest()
        yield h


class PagePool:
    """Reference-counted pages 1..num_pages-1 with a prefix cache and LRU eviction.

    With prefix_caching False nothing is ever cached: lookup() finds nothing, register() is a
    no-op, released pages go straight back to the free list (a plain allocator).
    """

    def __init__(self, num_pages: int, page_size: int, prefix_caching: bool = True):
        if not isinstance(num_pages, int) or num_pages < 2:
            raise ValueError(f"PagePool.num_pages: need an int >= 2 (page 0 is the null page), "
                             f"got {num_pages!r}")
        if not isinstance(page_size, int) or page_size < 1:
            raise ValueError(f"PagePool.page_size: need a positive int, got {page_size!r}")
        self.num_pages, self.page_size, self.prefix_caching = num_pages, page_size, prefix_caching
        self._refs = [0] * num_pages
        self._free = collections.deque(range(1, num_pages))
        self._page_of: dict[bytes, int] = {}  # block hash -> page (the prefix cache)
        self._hash_of: dict[int, bytes] = {}  # page -> block hash, for cached pages
        # cached pages at refcount 0, least recently released first
        self._evictable: collections.OrderedDict[int, None] = collections.OrderedDict()
        self.num_in_use = 0  # pages with refcount > 0
        # monotonic counters for metrics: lookups, their prompt tokens, tokens found cached
        self.prefix_queries = self.prefix_query_tokens = self.prefix_hit_tokens = 0
        self.evictions = 0

    @property
    def num_free(self) -> int:
        """Pages on the free list (neither referenced nor cached)."""
        return len(self._free)

    @property
    def num_evictable(self) -> int:
        """Cached pages that no sequence references: reusable, at the cost of their cache entry."""
        return len(self._evictable)

    @property
    def num_cached(self) -> int:
        """Pages in the prefix cache, referenced or not."""
        return len(self._page_of)

    @property
    def num_available(self) -> int:
        """Pages allocate() can hand out now: free plus evictable."""
        return len(self._free) + len(self._evictable)

    @property
    def hit_rate(self) -> float:
        """Prompt tokens served from the prefix cache / prompt tokens looked up (0.0 if none)."""
        return self.prefix_hit_tokens / max(1, self.prefix_query_tokens)

    def stats(self) -> dict[str, float]:
        """The gauges and counters above, for a metrics exporter."""
        return {k: getattr(self, k) for k in (
            "num_in_use", "num_free", "num_evictable", "num_cached", "prefix_queries",
            "prefix_query_tokens", "prefix_hit_tokens", "hit_rate", "evictions")}

    def ref_count(self, page: int) -> int:
        """How many references `page` has (0 when free or evictable)."""
        return self._refs[page]

    def can_allocate(self, n: int) -> bool:
        """Whether allocate(n) would succeed; changes nothing."""
        return 0 <= n <= self.num_available

    def allocate(self, n: int) -> list[int]:
        """n fresh pages at refcount 1, contents meaningless (the caller writes them).

        Takes the free list first, then evicts the least recently released unreferenced cached
        pages (dropping their cache entries). Raises NoPages, changing nothing, when fewer than
        n pages are free or evictable.
        """
        if not isinstance(n, int) or n < 0:
            raise ValueError(f"allocate: n must be a non-negative int, got {n!r}")
        if n > self.num_available:
            raise NoPages(f"need {n} pages, {len(self._free)} free + "
                          f"{len(self._evictable)} evictable of {self.num_pages - 1}")
        out = []
        for _ in range(n):
            if self._free:
                page = self._free.popleft()
            else:
                page, _ = self._evictable.popitem(last=False)
                del self._page_of[self._hash_of.pop(page)]
                self.evictions += 1
            self._refs[page] = 1
            out.append(page)
        self.num_in_use += n
        return out

    def share(self, pages: Sequence[int]) -> None:
        """One more reference on each page. A page must hold valid contents: referenced, or
        cached (an evictable page is taken off the eviction list); a free page is an error."""
        for page in pages:
            self._check_page(page, "share")
            if self._refs[page] == 0 and page not in self._evictable:
                raise ValueError(f"share: page {page} is free; its contents are meaningless")
        for page in pages:
            self._acquire(page)

    def release(self, pages: Sequence[int]) -> None:
        """One reference fewer on each page, in order. A page reaching 0 becomes evictable if
        cached (most recently released last, so evicted last) or returns to the free list.
        Releasing a page nobody references is an error (a double free), raised before any
        change."""
        drops = collections.Counter(pages)
        for page, k in drops.items():
            self._check_page(page, "release")
            if self._refs[page] < k:
                raise ValueError(f"release: page {page} has {self._refs[page]} references, "
                                 f"released {k} times")
        for page in pages:
            self._refs[page] -= 1
            if self._refs[page] == 0:
                self.num_in_use -= 1
                if page in self._hash_of:
                    self._evictable[page] = None
                else:
                    self._free.append(page)

    def lookup(self, tokens: Sequence[int], seed: Hashable = None) -> tuple[list[int], int]:
        """The longest run of cached full blocks that prefixes `tokens`: (pages, n_tokens),
        n_tokens == len(pages) * page_size, with one reference taken on each page.

        At least one token is always left to compute, since the caller needs the logits of
        the last prompt token: the match is capped at (len(tokens) - 1) // page_size blocks,
        so a prompt of exactly k cached pages gets k - 1 of them. Counts a prefix query.
        """
        pages, _ = self._lookup(tokens, seed)
        return pages, len(pages) * self.page_size

    def _lookup(self, tokens, seed):  # lookup, and the hashes of the blocks found
        self.prefix_queries += 1
        self.prefix_query_tokens += len(tokens)
        if not self.prefix_caching or len(tokens) < 2:
            return [], []
        usable = tokens[:(len(tokens) - 1) // self.page_size * self.page_size]
        pages, hashes = [], []
        for h in _chain(usable, self.page_size, seed, None):
            page = self._page_of.get(h)
            if page is None:
                break
            pages.append(page)
            hashes.append(h)
        for page in pages:
            self._acquire(page)
        self.prefix_hit_tokens += len(pages) * self.page_size
        return pages, hashes

    def register(self, page: int, block_hash: bytes) -> int:
        """Publish a full, referenced page under its block hash; returns the page that holds
        that hash from now on.

        If another page already holds the hash, the existing one is kept (it may be shared by
        other sequences already, and the cache maps a hash to one page) and returned: the
        caller may switch to it (share it, release its own copy, which then goes back to the
        free list) or keep its private duplicate. Registering a page again under its own hash
        returns it; under another hash is an error (a full page never changes). With prefix
        caching off, returns `page` and caches nothing.
        """
        self._check_page(page, "register")
        if self._refs[page] == 0:
            raise ValueError(f"register: page {page} is not referenced")
        if not self.prefix_caching:
            return page
        old = self._hash_of.get(page)
        if old is not None:
            if old != block_hash:
                raise ValueError(f"register: page {page} is already cached under another hash")
            return page
        holder = self._page_of.get(block_hash)
        if holder is not None:
            return holder
        self._page_of[block_hash] = page
        self._hash_of[page] = block_hash
        return page

    def _acquire(self, page: int) -> None:
        if self._refs[page] == 0:
            del self._evictable[page]
            self.num_in_use += 1
        self._refs[page] += 1

    def _check_page(self, page: int, what: str) -> None:
        if not isinstance(page, int) or not 0 < page < self.num_pages:
            raise ValueError(f"{what}: page must be an int in [1, {self.num_pages}), got {page!r}")

    def check_invariants(self) -> None:
        """Raise AssertionError if the internal state is inconsistent (tests, debugging)."""
        free = set(self._free)
        assert len(free) == len(self._free), "a page is on the free list twice"
        assert NULL_PAGE not in free and self._refs[NULL_PAGE] == 0, "the null page was used"
        assert all(r >= 0 for r in self._refs), "negative refcount"
        used = {p for p, r in enumerate(self._refs) if r > 0}
        assert not free & used and not free & set(self._evictable) and not used & set(
            self._evictable), "a page is in two states"
        assert len(used) == self.num_in_use, "num_in_use drifted"
        assert len(free) + len(used) + len(self._evictable) == self.num_pages - 1, "a page leaked"
        assert set(self._evictable) == set(self._hash_of) - used, "evictable != cached unused"
        assert {p: h for h, p in self._page_of.items()} == self._hash_of, "cache maps disagree"
        assert self.prefix_caching or not self._hash_of, "cached with prefix caching off"


class BlockTable:
    """One sequence's pages, in order, and how many of its tokens have K/V written.

    Lifecycle: `match_prefix` (takes cached pages) -> `needed_pages` / `append` before each
    step that writes tokens -> `mark_computed` after it (publishes the blocks that filled) ->
    `release` when the sequence finishes, aborts or is preempted. A preempted sequence
    (recompute) releases everything and later calls match_prefix again with its prompt plus the
    tokens generated so far: its full blocks were registered as they filled, so those that
    were not evicted meanwhile come back without recomputation.
    """

    def __init__(self, page_size: int, seed: Hashable = None):
        if not isinstance(page_size, int) or page_size < 1:
            raise ValueError(f"BlockTable.page_size: need a positive int, got {page_size!r}")
        self.page_size, self.seed = page_size, seed
        self.pages: list[int] = []
        self.num_tokens = 0  # tokens whose K/V is in the pages
        self.block_hashes: list[bytes] = []  # chain hashes of the full computed blocks

    @property
    def tokens_capacity(self) -> int:
        return len(self.pages) * self.page_size

    def needed_pages(self, new_total_tokens: int) -> int:
        """Pages to append before the table can hold new_total_tokens tokens (0 if it can)."""
        return max(0, -(-new_total_tokens // self.page_size) - len(self.pages))

    def append(self, pages: Sequence[int]) -> None:
        """Add pages (already referenced for this sequence, e.g. from pool.allocate)."""
        if NULL_PAGE in pages:
            raise ValueError("BlockTable.append: the null page 0 cannot hold tokens")
        self.pages.extend(pages)

    def match_prefix(self, pool: PagePool, tokens: Sequence[int]) -> int:
        """Start an empty table from the pool's prefix cache: takes the cached pages that
        prefix `tokens` (see PagePool.lookup) and returns how many tokens they hold, i.e. the
        position where computation starts."""
        if self.pages:
            raise ValueError("BlockTable.match_prefix: the table is not empty")
        self._check_pool(pool)
        self.pages, self.block_hashes = pool._lookup(tokens, self.seed)
        self.num_tokens = len(self.pages) * self.page_size
        return self.num_tokens

    def fills_block(self, n: int) -> bool:
        """Whether n tokens computed complete a block not registered yet (else counting
        them, computed(n), needs no tokens)."""
        return n // self.page_size > len(self.block_hashes)

    def computed(self, n: int) -> None:
        """mark_computed of n tokens that complete no new block (fills_block(n) false), a
        decode window's usual case, without building the sequence."""
        if self.fills_block(n) or not self.num_tokens <= n <= self.tokens_capacity:
            raise ValueError(f"computed: {n} tokens complete a block or lie outside "
                             f"[{self.num_tokens}, {self.tokens_capacity}]: mark_computed")
        self.num_tokens = n

    def mark_computed(self, tokens: Sequence[int], pool: PagePool) -> None:
        """Record that the K/V of tokens[:len(tokens)] (the sequence so far, whose first
        num_tokens entries must be those already computed) is in the pages, and register the
        blocks that filled. Where the pool already held a block's hash in another page, the
        table switches to that page and releases its own copy, so duplicates are freed at
        once: call between steps, as the switch changes this table's row."""
        self._check_pool(pool)
        if not self.num_tokens <= len(tokens) <= self.tokens_capacity:
            raise ValueError(f"mark_computed: {len(tokens)} tokens, need between "
                             f"{self.num_tokens} computed and {self.tokens_capacity} capacity")
        full = len(self.block_hashes)
        parent = self.block_hashes[-1] if full else None
        new = hash_blocks(tokens[full * self.page_size:len(tokens) // self.page_size
                                 * self.page_size], self.page_size, self.seed, parent)
        for i, h in enumerate(new, start=full):
            page = pool.register(self.pages[i], h)
            if page != self.pages[i]:
                pool.share([page])
                pool.release([self.pages[i]])
                self.pages[i] = page
        self.block_hashes.extend(new)
        self.num_tokens = len(tokens)

    def fork(self, pool: PagePool) -> BlockTable:
        """A new table sharing this one's full computed blocks (one more reference each), e.g.
        for several samples of one prompt. A partial last block is not shared, since both
        sequences would write into it: the fork computes (or the device copies) it anew."""
        self._check_pool(pool)
        other = BlockTable(self.page_size, self.seed)
        other.pages = self.pages[:len(self.block_hashes)]
        pool.share(other.pages)
        other.block_hashes = list(self.block_hashes)
        other.num_tokens = len(other.block_hashes) * self.page_size
        return other

    def release(self, pool: PagePool) -> None:
        """Release every page and empty the table. Pages go last-block-first, so the tail of a
        prefix is evicted before its head: a chain stays findable from its start."""
        self._check_pool(pool)
        pool.release(self.pages[::-1])
        self.pages, self.num_tokens, self.block_hashes = [], 0, []

    def as_row(self, width: int) -> list[int]:
        """The page-table row: this table's pages padded with the null page to `width`."""
        if len(self.pages) > width:
            raise ValueError(f"as_row: {len(self.pages)} pages exceed the width {width}")
        return self.pages + [NULL_PAGE] * (width - len(self.pages))

    def _check_pool(self, pool: PagePool) -> None:
        if pool.page_size != self.page_size:
            raise ValueError(f"BlockTable.page_size {self.page_size} != the pool's "
                             f"{pool.page_size}")
