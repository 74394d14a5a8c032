"""One scheduler over two processes (serving/multihost.py): a mesh spanning both (tensor=2,
one CPU device of each, collectives over gloo); process 0 takes the requests and broadcasts
each tick's inputs, both run the same calls. Greedy and seeded-sampled requests get the
tokens and log-probs of the same burst in one process, with the contiguous and the paged
scheduler, and an abort sent with its request ends it on both.

The same two processes (two devices each) then serve data-parallel replicas behind process
0's front (serving/replica_hosts.py), data=2 x tensor=2, each replica on one process's
devices. A burst of prompts of mixed lengths on a pool small enough to preempt gets, for
every request, generate()'s greedy tokens of that prompt alone and a teacher-forced pass's
log-probs within 1e-5; both replicas serve some; aborting a running request on each replica
frees its pages. Replicas that would share processes over several are refused in one line."""
import jax
import numpy as np
import pytest

import jaxformer as jf
from conftest import assert_top_matches, top_of
from jaxformer.config import ModelConfig
from jaxformer.serving import multihost
from jaxformer.serving.replica_hosts import HostReplicaScheduler
from jaxformer.serving.replicas import replica_processes
from jaxformer.serving.scheduler import Scheduler
from pipeline_models import LLAMA
from scheduler_burst import CONFIG, REPLICA_MAXN, REPLICA_PROMPTS, burst
from test_distributed import finish, free_port, result, start


def reference(model):
    """Per request of REPLICA_PROMPTS: generate()'s greedy tokens of the batch (a stop token
    ends a row), the log-softmax of one teacher-forced pass over each prompt + those
    tokens, right-padded into one batch (causal: padding after a row leaves it unchanged),
    and the top 3 (+1) of that pass (teacher_forced_top's ranking, one batched call)."""
    eos = model.config.eos_token_id
    gen = model.generate(REPLICA_PROMPTS, max(REPLICA_MAXN)).tokens
    want = []
    for g, n in zip(gen, REPLICA_MAXN):
        g = list(g[:n])
        want.append(g[: g.index(eos) + 1] if eos in g else g)
    seqs = [p + t for p, t in zip(REPLICA_PROMPTS, want)]
    T = max(map(len, seqs))
    logits = np.asarray(model.logits(np.asarray([s + [0] * (T - len(s)) for s in seqs])))
    lps, tops = [], []
    for row, p, t in zip(logits, REPLICA_PROMPTS, want):
        tops.append(top_of(row[len(p) - 1: len(p) - 1 + len(t)], 3))
        x = row[len(p) - 1: len(p) - 1 + len(t)].astype(np.float64)
        lse = x.max(-1) + np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1))
        lps.append(x[np.arange(len(t)), t] - lse)
    return want, lps, tops


def test_two_processes_serve_as_one(tmp_path):
    model = jf.Model.random(ModelConfig(**LLAMA), jf.make_mesh(tensor=2), seed=1)
    model.save(tmp_path / "ckpt")
    port = free_port()
    procs = [start("--mode", "serve", "--port", port, "--process-id", i, "--num-processes", 2,
                   "--local-devices", 2, "--mesh", 1, 1, 2, "--timeout", 120,
                   "--checkpoint", tmp_path / "ckpt") for i in (0, 1)]
    try:
        one = burst(model)  # meanwhile, the same burst in this process
        want, want_lp, want_top = reference(model)
    finally:
        outs = finish(procs, 420)
    two = [result(*o) for o in outs]
    assert [r["process"] for r in two] == [0, 1] and two[0]["devices"] == 4
    assert two[1]["contiguous"] == two[1]["paged"] == []  # process 1 submitted nothing
    for name in ("contiguous", "paged"):
        assert [s for s, *_ in one[name]] == ["finished"] * 4 + ["aborted"]
        assert [t for _, t, _ in two[0][name]] == [t for _, t, _ in one[name]], name
        assert [s for s, *_ in two[0][name]] == [s for s, *_ in one[name]]
        for (_, _, a), (_, _, b) in zip(two[0][name], one[name]):
            np.testing.assert_allclose(a, b, atol=1e-5)
    got = two[0]["replicas"]
    assert got["error"] == "" and two[1]["replicas"]["error"] == ""
    assert [s for s, *_ in got["outs"]] == ["finished"] * len(want)
    assert [t for _, t, *_ in got["outs"]] == want
    for (_, _, lp, top), ref, ref_top in zip(got["outs"], want_lp, want_top):
        np.testing.assert_allclose(lp, ref, atol=1e-5)
        # the alternatives too, from either replica (process 1's through its reports)
        assert_top_matches(top, ref_top, 3)
    burst_routed, all_routed = got["routed"]
    assert sum(burst_routed) == len(want) and min(burst_routed) > 0, got["routed"]
    assert got["preemptions"] > 0  # the pool was short
    # one long request on each replica
    assert [b - a for a, b in zip(burst_routed, all_routed)] == [1, 1], got["routed"]
    assert all(n > 0 for n in got["in_use"]) and got["aborted"] == ["aborted"] * 2
    assert got["in_use_after"] == [0, 0]  # the aborts freed their pages (process 1's too)


class _Dev:
    def __init__(self, p):
        self.process_index = p


def test_replicas_sharing_processes_over_several_are_refused_in_one_line():
    ok = [[_Dev(0), _Dev(0)], [_Dev(0), _Dev(0)], [_Dev(1), _Dev(2)], [_Dev(3), _Dev(3)]]
    assert replica_processes(ok) == [(0,), (0,), (1, 2), (3,)]
    for bad, (i, a, j, b) in (([[_Dev(0), _Dev(1)], [_Dev(1), _Dev(0)]], (0, "0,1", 1, "0,1")),
                              ([[_Dev(2), _Dev(2)], [_Dev(1), _Dev(2)]], (0, "2", 1, "1,2"))):
        with pytest.raises(ValueError) as e:
            replica_processes(bad)
        assert str(e.value).count("\n") == 0
        assert f"data replica {i} spans processes {a} and replica {j} processes {b}: a " \
               f"replica over several processes needs them to itself" in str(e.value)


@pytest.mark.parametrize("front", ["replicas", "one scheduler"])
def test_a_failed_collective_fails_what_is_pending_and_ends_the_loop(monkeypatch, front):
    """A tick's collective that fails (a process died: gloo's connection reset) ends the
    loop with the reason, and the requests of process 0 fail with it instead of waiting:
    the replicas' front, and one scheduler over several processes (here one process that
    acts as process 0 of two)."""
    if front == "replicas":
        model = jf.Model.random(ModelConfig(**LLAMA),
                                jf.make_mesh(data=2, devices=jax.devices()[:2]), seed=1)
        sched = HostReplicaScheduler(model, CONFIG)
    else:
        model = jf.Model.random(ModelConfig(**LLAMA), jf.make_mesh(devices=jax.devices()[:1]),
                                seed=1)
        sched = Scheduler(model, CONFIG)
        sched._hosts = 2  # its ticks broadcast as process 0's do

    def lost(events, stop):
        raise RuntimeError("Gloo all-reduce failed: Connection reset by peer")
    monkeypatch.setattr(multihost, "broadcast", lost)
    h = sched.submit([1, 2, 3], max_new_tokens=2)
    sched.start()
    try:
        out = h.result(timeout=30)
        assert sched.join(30)
    finally:
        sched.stop(30)
    assert out.status == "failed" and "lockstep tick failed" in out.reason
    assert "Connection reset by peer" in out.reason and sched.error == out.reason
