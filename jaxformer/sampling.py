"""Sampling settings and the on-device token sampler.

Every numeric setting becomes a per-row array, so one batch can mix requests with different
temperatures, top-k/p, penalties and stop tokens without a recompile. Only which *kinds* of
processing are needed (sorting for top-k/top-p, token counts for penalties) is static.
"""
from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxformer import sharding as shd

# K: the most likely alternatives the compiled step computes per token when a row asks
# (Sampling.top_logprobs <= K; OpenAI's maximum for top_logprobs / logprobs)
TOP_LOGPROBS = 20


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How to choose each next token. `Sampling()` samples at temperature 1; greedy is
    `temperature=0` (or `sampling=None` in generate(), or None for a row of a list).

    repetition_penalty follows Hugging Face/CTRL (over prompt and generated tokens: positive
    logits divided by it, negative ones multiplied); presence_penalty and frequency_penalty
    follow OpenAI (subtracted per generated occurrence). Beam search: num_beams > 1,
    deterministic, scored by sum of log-probs / length ** length_penalty.
    top_logprobs: the n (0..TOP_LOGPROBS) most likely tokens and their log-probs at each
    generated position, under the same unprocessed distribution as `logprobs`.
    prompt_logprobs: also each prompt token's log-prob given its prefix (and its top_logprobs
    alternatives), computed by the paged scheduler's chunked prefill (OpenAI's echo).
    """

    temperature: float = 1.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stop_token_ids: tuple[int, ...] = ()
    stop_strings: tuple[str, ...] = ()
    num_beams: int = 1
    length_penalty: float = 1.0
    logprobs: bool = False
    top_logprobs: int = 0
    prompt_logprobs: bool = False

    def __post_init__(self):
        def fail(field, msg):
            raise ValueError(f"Sampling.{field}: {msg}, got {getattr(self, field)!r}")

        for field in ("temperature", "top_p", "min_p", "repetition_penalty",
                      "presence_penalty", "frequency_penalty", "length_penalty"):
            v = getattr(self, field)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                fail(field, "must be a finite number")
        if self.temperature < 0:
            fail("temperature", "must be >= 0 (0 means greedy)")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            fail("top_k", "must be an integer >= 0 (0 disables it)")
        if isinstance(self.top_logprobs, bool) or not isinstance(self.top_logprobs, int) \
                or not 0 <= self.top_logprobs <= TOP_LOGPROBS:
            fail("top_logprobs", f"must be an integer in [0, {TOP_LOGPROBS}]")
        if not isinstance(self.prompt_logprobs, bool):
            fail("prompt_logprobs", "must be a bool")
        if not 0 < self.top_p <= 1:
            fail("top_p", "must be in (0, 1]")
        if not 0 <= self.min_p <= 1:
            fail("min_p", "must be in [0, 1]")
        if self.repetition_penalty <= 0:
            fail("repetition_penalty", "must be > 0 (1 disables it)")
        if isinstance(self.num_beams, bool) or not isinstance(self.num_beams, int) \
                or self.num_beams < 1:
            fail("num_beams", "must be an integer >= 1")
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
        if any(t < 0 for t in self.stop_token_ids):
            fail("stop_token_ids", "must be non-negative token ids")
        if isinstance(self.stop_strings, str):
            object.__setattr__(self, "stop_strings", (self.stop_strings,))
        if any(not isinstance(s, str) or not s for s in self.stop_strings):
            fail("stop_strings", "must be non-empty strings")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def penalised(self) -> bool:
        """Any of the repetition, presence and frequency penalties set."""
        return bool(self.repetition_penalty != 1 or self.presence_penalty
                    or self.frequency_penalty)

    @property
    def plain(self) -> bool:
        """Greedy, with no penalties and no top log-probs: the row needs only an argmax and
        its log-prob (Features all off)."""
        return self.greedy and not self.penalised and not self.top_logprobs


GREEDY = Sampling(temperature=0.0)


class RowParams(NamedTuple):
    """Per-row sampling values, [B] each."""
    greedy: jax.Array
    temperature: jax.Array
    top_k: jax.Array
    top_p: jax.Array
    min_p: jax.Array
    repetition: jax.Array
    presence: jax.Array
    frequency: jax.Array
    top_logprobs: jax.Array  # [B] int32 alternatives the row asks for (0: none)


class Features(NamedTuple):
    """Static: which processing any row needs (part of the compile key). top_logprobs: the
    state keeps K alternatives per token (computed only in steps where a row asks)."""
    sample: bool
    sort: bool
    min_p: bool
    penalties: bool
    top_logprobs: bool = False


def row_params(samplings: Sequence[Sampling], batch: int) -> tuple[RowParams, Features]:
    """Host arrays for `batch` rows (rows past len(samplings) are padding, set greedy)."""
    s = [GREEDY if x is None else x for x in samplings] + [GREEDY] * (batch - len(samplings))
    arr = lambda f, dt: np.asarray([f(x) for x in s], dt)  # noqa: E731
    rp = RowParams(
        greedy=arr(lambda x: x.greedy, bool),
        temperature=arr(lambda x: x.temperature if not x.greedy else 1.0, np.float32),
        top_k=arr(lambda x: x.top_k, np.int32),
        top_p=arr(lambda x: x.top_p, np.float32),
        min_p=arr(lambda x: x.min_p, np.float32),
        repetition=arr(lambda x: x.repetition_penalty, np.float32),
        presence=arr(lambda x: x.presence_penalty, np.float32),
        frequency=arr(lambda x: x.frequency_penalty, np.float32),
        top_logprobs=arr(lambda x: x.top_logprobs, np.int32))
    live = [x for x in s if not x.greedy]
    feats = Features(
        sample=bool(live),
        sort=any(x.top_k > 0 or x.top_p < 1 for x in live),
        min_p=any(x.min_p > 0 for x in live),
        penalties=any(x.penalised for x in s),
        top_logprobs=any(x.top_logprobs > 0 for x in s))
    return rp, feats


def apply_penalties(logits, p: RowParams, seen, gen_counts):
    """logits [B, V] f32; seen [B, V] bool (prompt or generated); gen_counts [B, V] int32."""
    r = p.repetition[:, None]
    penalised = jnp.where(logits > 0, logits / r, logits * r)
    logits = jnp.where(seen, penalised, logits)
    counts = gen_counts.astype(jnp.float32)
    return logits - p.presence[:, None] * (counts > 0) - p.frequency[:, None] * counts


def filter_logits(logits, p: RowParams, feats: Features):
    """Temperature, then top-k, top-p and min-p masks (-inf outside the allowed set)."""
    x = logits / p.temperature[:, None]
    neg = jnp.float32(-jnp.inf)
    if feats.sort:  # the sort over the vocabulary runs only when a row asks for it
        wants = (~p.greedy & ((p.top_k > 0) | (p.top_p < 1))).any()
        x = jax.lax.cond(wants, _top_k_top_p, lambda x, p: x, x, p)
    if feats.min_p:
        x = jax.lax.cond((~p.greedy & (p.min_p > 0)).any(), _min_p, lambda x, p: x, x, p)
    return x


def _top_k_top_p(x, p: RowParams):
    B, V = x.shape
    neg = jnp.float32(-jnp.inf)
    order = jnp.argsort(-x, axis=-1)  # descending, ties by index
    xs = jnp.take_along_axis(x, order, axis=-1)
    rank = jnp.arange(V)[None]
    keep = (p.top_k[:, None] <= 0) | (rank < p.top_k[:, None])
    xs_k = jnp.where(keep, xs, neg)
    probs = jax.nn.softmax(xs_k, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass strictly ahead of each token
    keep = keep & ((before < p.top_p[:, None]) | (rank == 0))
    mask = jnp.zeros((B, V), bool).at[jnp.arange(B)[:, None], order].set(keep)
    return jnp.where(mask, x, neg)


def _min_p(x, p: RowParams):
    probs = jax.nn.softmax(x, axis=-1)
    return jnp.where(probs >= p.min_p[:, None] * probs.max(-1, keepdims=True), x,
                     jnp.float32(-jnp.inf))


def argmax(x):
    """jnp.argmax(x, -1) as int32 (the first index of the maximum).

    With the vocabulary sharded over `tensor`, XLA partitions argmax's (value, index) pair
    reduction into two NCCL all-gathers every decode step (slow: docs/benchmarks.md).
    There it runs as a max and then a min over the indices that reach it: two
    plain reductions, which XLA partitions into all-reduces (its fast collective kernels).
    """
    if shd.active_axis_size("tensor") == 1:
        return jnp.argmax(x, axis=-1).astype(jnp.int32)
    top = x.max(-1, keepdims=True)
    index = jax.lax.broadcasted_iota(jnp.int32, x.shape, x.ndim - 1)
    first = jnp.where(x == top, index, x.shape[-1]).min(-1)
    return jnp.minimum(first, x.shape[-1] - 1)  # a NaN row: the last id, not out of range


def sample(logits, p: RowParams, feats: Features, keys, seen=None, gen_counts=None):
    """logits [B, V] float32 (padded vocab at -inf) -> (tokens [B] int32, logprobs [B]).

    keys [B] are per-row PRNG keys. logprobs are of the chosen token under the model's
    unprocessed distribution (log_softmax of the raw logits).
    """
    # Features say what any request may ask for (compiled in); each stage also runs only
    # when a row of this batch asks for it (lax.cond), so a greedy batch of a server
    # compiled for everything skips the vocabulary-wide penalties, sort and draw.
    x = logits
    if feats.penalties:
        on = ((p.repetition != 1) | (p.presence != 0) | (p.frequency != 0)).any()
        x = jax.lax.cond(on, apply_penalties, lambda x, *_: x, x, p, seen, gen_counts)
    tokens = argmax(x)
    if feats.sample:
        def draw(x, p, keys, tokens):
            filtered = filter_logits(x, p, feats)
            drawn = jax.vmap(jax.random.categorical)(keys, filtered).astype(jnp.int32)
            return jnp.where(p.greedy, tokens, drawn)
        tokens = jax.lax.cond(p.greedy.all(), lambda x, p, keys, tokens: tokens, draw, x, p,
                              keys, tokens)
    return tokens, chosen_logprob(logits, tokens)


def chosen_logprob(logits, tokens):
    """log_softmax(logits)[b, tokens[b]], [B, V], [B] -> [B], the same arithmetic as
    jax.nn.log_softmax. The chosen entry is picked by a masked sum (a reduction, an
    all-reduce when V is sharded) rather than an index into the log-probabilities, which XLA
    partitions by all-gathering all V of them."""
    shifted = logits - jax.lax.stop_gradient(logits.max(-1, keepdims=True))
    lse = jnp.log(jnp.exp(shifted).sum(-1))
    index = jax.lax.broadcasted_iota(jnp.int32, logits.shape, logits.ndim - 1)
    return jnp.where(index == tokens[:, None], shifted, 0.0).sum(-1) - lse


def top_logprobs(logits, p: RowParams, feats: Features):
    """logits [B, V] float32 (padded vocab at -inf) -> (ids [B, K] int32, log-probs [B, K]
    float32): top_k_logprobs of each row, None when feats has no top_logprobs, zeros in a
    step where no row asks (a lax.cond: such a batch skips the vocabulary-wide top-k)."""
    if not feats.top_logprobs:
        return None
    B = logits.shape[0]
    K = TOP_LOGPROBS
    none = lambda _: (jnp.zeros((B, K), jnp.int32), jnp.zeros((B, K), jnp.float32))  # noqa
    return jax.lax.cond((p.top_logprobs > 0).any(), top_k_logprobs, none, logits)


def top_k_logprobs(logits):
    """logits [N, V] -> (ids [N, K] int32, log-probs [N, K] float32): the K = TOP_LOGPROBS
    most likely tokens under the unprocessed distribution (log_softmax of the raw logits,
    padded vocab at -inf excluded), best first (ties: the lower id first), in
    chosen_logprob's arithmetic (a chosen token among them has exactly its logprob). A
    vocabulary smaller than K leaves the missing ranks at -inf. With V sharded over
    `tensor`, XLA partitions the top-k (gathering the rows' logits): callers run it only
    where a row asks."""
    N, V = logits.shape
    k = min(TOP_LOGPROBS, V)
    shifted = logits - jax.lax.stop_gradient(logits.max(-1, keepdims=True))
    lse = jnp.log(jnp.exp(shifted).sum(-1))
    vals, ids = jax.lax.top_k(shifted, k)
    ids, lps = ids.astype(jnp.int32), vals - lse[:, None]
    if k < TOP_LOGPROBS:
        pad = ((0, 0), (0, TOP_LOGPROBS - k))
        ids, lps = jnp.pad(ids, pad), jnp.pad(lps, pad, constant_values=-jnp.inf)
    return ids, lps


def alternatives(k: int, n: int, top) -> list[list[tuple[int, float]]]:
    """Per token of n, its k most likely (id, log-prob) pairs from top = (ids [n, K],
    log-probs [n, K]); ranks at -inf (past a vocabulary smaller than K) dropped; empty lists
    when k is 0 or top is None."""
    if not k or top is None:
        return [[] for _ in range(n)]
    ids, lps = np.asarray(top[0])[:n, :k], np.asarray(top[1])[:n, :k]
    return [[(int(a), float(v)) for a, v in zip(ri, rv) if np.isfinite(v)]
            for ri, rv in zip(ids, lps)]
