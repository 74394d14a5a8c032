"""Text generation: generate() over the Engine (engine.py).

Prompts are right-padded into a [B, Tb] batch (Tb a power-of-two bucket, so compiles stay
few); row b's keys fill cache slots [0, len_b) and each decode step writes slot len_b of its
own row, so rows of any lengths decode together and each gets exactly the tokens it would get
alone. The whole batch is prefilled as one decode state (a prefill of every slot is itself a
decode state: no insert needed), then the Engine's decode loop runs on the device with the
cache donated; it stops a row at its stop token / stop sequence / max_new_tokens and the
whole batch when every row is done. Streaming runs the same loop a few steps at a time.
"""
from __future__ import annotations

import dataclasses
import time
from typing import TYPE_CHECKING, Iterator

import jax
import numpy as np

from jaxformer import beam
from jaxformer import cache as kvc
from jaxformer import sharding as shd
from jaxformer.decode_state import DecodeState
from jaxformer.engine import Engine, EngineConfig, generate_key_data, stop_arrays
from jaxformer.sampling import GREEDY, Sampling, alternatives, row_params
from jaxformer.serving.scheduler import Scheduler, SchedulerConfig
from jaxformer.sharding import to_host

if TYPE_CHECKING:  # Model.generate (model.py) calls generate()
    from jaxformer.model import Model


@dataclasses.dataclass
class GenerateOutput:
    """tokens: new token ids per prompt (a stop token, when hit, is included);
    texts: decoded new text (stop tokens and stop strings cut), when a tokenizer is present;
    logprobs: per-token log-probabilities, when asked; stats: timings; top_logprobs: per
    prompt, per token its Sampling.top_logprobs most likely (id, log-prob) pairs, when any
    prompt asks (beam search: none)."""
    tokens: list[list[int]]
    texts: list[str] | None = None
    logprobs: list[list[float]] | None = None
    stats: dict | None = None
    top_logprobs: list[list[list[tuple[int, float]]]] | None = None


# ---- host side ----------------------------------------------------------------------------
def _encode_prompts(model: Model, prompts) -> list[list[int]]:
    if isinstance(prompts, (str, bytes)) or (prompts and isinstance(prompts[0], (int, np.integer))):
        raise ValueError("prompts must be a list of strings or a list of token-id lists")
    if not prompts:
        raise ValueError("prompts is empty: give at least one prompt")
    out = []
    for i, p in enumerate(prompts):
        if isinstance(p, str):
            if model.tokenizer is None:
                raise ValueError("string prompts need a tokenizer; this model has none, so pass "
                                 "token ids")
            ids = model.tokenizer.encode(p)
            bos = model.tokenizer.bos_id
            if bos is not None and model.config.bos_token_id is not None:
                ids = [bos] + ids
        else:
            ids = [int(t) for t in p]
        if not ids:
            raise ValueError(f"prompt {i} is empty")
        out.append(ids)
    return out


def _samplings(sampling, n: int) -> list[Sampling]:
    if sampling is None:
        return [GREEDY] * n
    if isinstance(sampling, Sampling):
        return [sampling] * n
    s = [GREEDY if x is None else x for x in sampling]  # None in a list: a greedy row
    if len(s) != n or not all(isinstance(x, Sampling) for x in s):
        raise ValueError(f"sampling must be None, a Sampling, or one Sampling (or None for "
                         f"greedy) per prompt ({n}); got {sampling!r}")
    return s


class GenerateRun:
    """One generate() call: the prompts checked, an Engine for their shapes (prefill,
    decode; benchmarks drive it too)."""

    def __init__(self, model: Model, prompts, max_new_tokens, sampling, seed, ignore_eos):
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) \
                or max_new_tokens <= 0:
            raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
        if model.config.arch != "decoder":
            raise ValueError("generate() needs a decoder model; use encode() for encoders")
        self.model = model
        self.prompt_ids = _encode_prompts(model, prompts)
        n = len(self.prompt_ids)
        self.samplings = _samplings(sampling, n)
        beams = {(s.num_beams, s.length_penalty) for s in self.samplings}
        if len(beams) > 1 and any(s.num_beams > 1 for s in self.samplings):
            raise ValueError("beam search needs one num_beams and length_penalty for the "
                             f"whole batch, got {sorted(beams)}")
        self.num_beams, self.length_penalty = beams.pop()
        longest = max(len(p) for p in self.prompt_ids)
        limit = model.config.max_position_embeddings
        if longest + max_new_tokens > limit:
            raise ValueError(f"prompt of {longest} tokens + max_new_tokens {max_new_tokens} "
                             f"exceeds the model's maximum of {limit} positions")
        for p in self.prompt_ids:
            model.check_ids(np.asarray([p]), "prompt token ids")
        data = shd.mesh_size(model.mesh, model.rules.get("cache_batch"))
        self.batch = kvc.cache_rows(n, data)
        self.max_new = int(max_new_tokens)
        self.cache_len = kvc.cache_slots(kvc.bucket(longest, limit), longest, self.max_new,
                                         limit)
        self.rows = n
        self.seed, self.ignore_eos = seed, ignore_eos
        _, feats = row_params(self.samplings, self.batch)
        stop_ids, stop_seqs = self.engine_stop_arrays()
        self.widths = (stop_ids.shape[1], stop_seqs.shape[1])
        self.engine = Engine(model, EngineConfig(
            slots=self.batch, max_length=self.cache_len, window=self.max_new, features=feats,
            stop_ids=self.widths[0], stop_strings=self.widths[1]))

    def engine_stop_arrays(self):
        """(stop_ids [B, Ms], stop_seqs [B, Mq, W]) host arrays of these prompts."""
        return stop_arrays(self.model, self.samplings, self.batch, self.ignore_eos)

    def _prefill_kwargs(self) -> dict:
        return dict(key_data=generate_key_data(self.seed, self.batch), rows=self.batch,
                    cache_len=self.cache_len, ignore_eos=self.ignore_eos, widths=self.widths)

    def prefill(self) -> DecodeState:
        """Every prompt prefilled into its slot of the whole-batch decode state."""
        return self.engine.prefill(self.prompt_ids, self.samplings,
                                   [self.max_new] * self.rows, **self._prefill_kwargs())

    def prefill_call(self):
        """(compiled prefill, its arguments): Engine.prefill_call for these prompts."""
        return self.engine.prefill_call(self.prompt_ids, self.samplings,
                                        [self.max_new] * self.rows, **self._prefill_kwargs())

    def decode(self, state: DecodeState, until: int) -> DecodeState:
        return self.engine.step(state, until=until)

    def finish(self, out: np.ndarray, logprobs: np.ndarray, want_logprobs: bool, stats,
               state: DecodeState | None = None):
        """The GenerateOutput; with the final state, its rows' top log-probs too."""
        top = None if state is None else self.engine.top(state)
        tops = None if top is None else [
            alternatives(s.top_logprobs, int((out[b] >= 0).sum()), (top[0][b], top[1][b]))
            for b, s in enumerate(self.samplings[: self.rows])]
        return _output(self.model, self.samplings, self.rows, out, logprobs, want_logprobs,
                       stats, tops)


def _output(model: Model, samplings, rows: int, out: np.ndarray, logprobs: np.ndarray,
            want_logprobs: bool, stats, tops=None) -> GenerateOutput:
    """GenerateOutput of out / logprobs [B, M] (-1 padded tokens) for the first `rows`."""
    tokens, texts, lps = [], [], []
    tok = model.tokenizer
    for b in range(rows):
        n = int((out[b] >= 0).sum())
        tokens.append(out[b, :n].tolist())
        lps.append(logprobs[b, :n].tolist())
        if tok is not None:
            texts.append(_text(model, tokens[-1], samplings[b]))
    return GenerateOutput(tokens, texts if tok is not None else None,
                          lps if want_logprobs else None, stats,
                          tops if any(s.top_logprobs for s in samplings) else None)


def _text(model: Model, ids, s: Sampling) -> str:
    """Decoded new text: a final stop token and everything from a stop string on cut."""
    tok = model.tokenizer
    stops = set(s.stop_token_ids) | {tok.eos_id, model.config.eos_token_id}
    return cut_text(tok, ids, stops, s.stop_strings)


def cut_text(tokenizer, ids, stop_ids, stop_strings) -> str:
    """The text of generated ids as generate() gives it: a final stop token dropped,
    everything from the first stop string on cut (the server answers the same)."""
    if ids and ids[-1] in stop_ids:
        ids = ids[:-1]
    text = tokenizer.decode(ids)
    for stop in stop_strings:
        i = text.find(stop)
        if i >= 0:
            text = text[:i]
    return text


def generate(model: Model, prompts, max_new_tokens: int = 32, sampling=None, seed: int = 0,
             *, ignore_eos: bool = False, stream: bool = False, chunk: int = 8,
             max_batch: int | None = None):
    """Generate up to max_new_tokens for each prompt (strings or token-id lists).

    sampling: None (greedy), a Sampling for every prompt, or a list with one per prompt.
    Same seed, same output, on any mesh. With stream=True returns an iterator of
    per-chunk lists of new token ids per prompt (then a final GenerateOutput).
    max_batch: with more prompts than this, they run under continuous batching
    (serving.Scheduler) in a running batch of max_batch rows, each prompt joining as a row
    frees: any number of prompts of any lengths, no chunking by hand. Greedy tokens are
    those of the static batch; sampled row b draws from seed (seed, b).
    """
    if max_batch is not None and not stream and len(prompts) > max_batch:
        return _continuous(model, prompts, max_new_tokens, sampling, seed, ignore_eos,
                           max_batch)
    run = GenerateRun(model, prompts, max_new_tokens, sampling, seed, ignore_eos)
    want_lp = any(s.logprobs for s in run.samplings)
    if run.num_beams > 1:
        if stream:
            raise ValueError("beam search (num_beams > 1) cannot stream: the best hypothesis "
                             "is known only at the end")
        t0 = time.perf_counter()
        tokens, scores = beam.beam_search(run, run.num_beams, run.length_penalty)
        dt = time.perf_counter() - t0
        out = np.full((run.rows, run.max_new), -1, np.int32)
        for b, t in enumerate(tokens):
            out[b, : len(t)] = t
        n = sum(map(len, tokens))
        result = run.finish(out, np.zeros(out.shape, np.float32), False,
                            dict(total_s=dt, new_tokens=n, tokens_per_s=n / dt))
        result.stats["beam_scores"] = scores
        return result
    if stream:
        return _stream(run, chunk, want_lp)
    t0 = time.perf_counter()
    state = run.prefill()
    jax.block_until_ready(state.last)
    t1 = time.perf_counter()
    state = run.decode(state, run.max_new)
    out, lps = to_host(state.out), to_host(state.logprobs)
    t2 = time.perf_counter()
    n = int((out[: run.rows] >= 0).sum())
    stats = dict(prefill_s=t1 - t0, decode_s=t2 - t1, new_tokens=n,
                 tokens_per_s=n / max(t2 - t0, 1e-9))
    return run.finish(out, lps, want_lp, stats, state)


def _stream(run: GenerateRun, chunk: int, want_lp: bool) -> Iterator:
    t0 = time.perf_counter()
    state = run.prefill()
    sent = 0
    while True:
        step = int(to_host(state.step))
        out = to_host(state.out)
        if step > sent:
            yield [[int(t) for t in out[b, sent:step] if t >= 0] for b in range(run.rows)]
            sent = step
        if step >= run.max_new or bool(to_host(state.done)[: run.rows].all()):
            break
        state = run.decode(state, min(step + chunk, run.max_new))
    out, lps = to_host(state.out), to_host(state.logprobs)
    n = int((out[: run.rows] >= 0).sum())
    dt = time.perf_counter() - t0
    yield run.finish(out, lps, want_lp, dict(total_s=dt, new_tokens=n, tokens_per_s=n / dt),
                     state)


def _continuous(model: Model, prompts, max_new: int, sampling, seed: int, ignore_eos: bool,
                max_batch: int) -> GenerateOutput:
    """generate() over a Scheduler of max_batch slots (its docstring)."""
    if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch <= 0:
        raise ValueError(f"max_batch must be a positive integer, got {max_batch!r}")
    if not isinstance(max_new, int) or isinstance(max_new, bool) or max_new <= 0:
        raise ValueError(f"max_new_tokens must be a positive integer, got {max_new!r}")
    ids = _encode_prompts(model, prompts)
    samplings = _samplings(sampling, len(ids))
    if any(s.num_beams > 1 for s in samplings):
        raise ValueError("beam search runs on a static batch: leave max_batch unset")
    limit = model.config.max_position_embeddings
    length = min(limit, kvc.bucket(max(map(len, ids)) + max_new, limit))
    sched = Scheduler(model, SchedulerConfig(slots=max_batch, max_length=length,
                                             steps_per_tick=16, max_prefill=min(8, max_batch),
                                             max_queue=len(ids) + 1))
    t0 = time.perf_counter()
    handles = [sched.submit(p, s, max_new_tokens=max_new, seed=seed * 1_000_003 + b,
                            ignore_eos=ignore_eos)
               for b, (p, s) in enumerate(zip(ids, samplings))]
    sched.run_until_idle()
    outs = [h.result(timeout=0) for h in handles]
    bad = [o for o in outs if o.status != "finished"]
    if bad:
        raise ValueError(f"prompt {bad[0].id}: {bad[0].reason}")
    dt = time.perf_counter() - t0
    n = sum(len(o.tokens) for o in outs)
    out = np.full((len(ids), max_new), -1, np.int32)
    lps = np.zeros((len(ids), max_new), np.float32)
    for b, o in enumerate(outs):
        out[b, : len(o.tokens)], lps[b, : len(o.tokens)] = o.tokens, o.logprobs
    return _output(model, samplings, len(ids), out, lps, any(s.logprobs for s in samplings),
                   dict(total_s=dt, new_tokens=n, tokens_per_s=n / max(dt, 1e-9)),
                   [o.top_logprobs for o in outs])
