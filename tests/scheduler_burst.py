"""A small burst through both schedulers, run the same way in one process and in each of
two processes (tests/test_scheduler_meshes.py, tests/distributed_worker.py)."""
import time

import jaxformer as jf
from jaxformer.serving.paged_scheduler import PagedConfig, PagedScheduler
from jaxformer.serving.replica_hosts import HostReplicaScheduler
from jaxformer.serving.scheduler import Scheduler, SchedulerConfig

# compiles are most of the burst's time (in each of three processes): the prompts pair up
# (requests 0 and 1 finish together, so 2 and 3 are admitted together: one prefill shape of
# 2 rows; every paged chunk call has 2 rows of 4 columns), and BURST_CONFIG's max_length is
# the prompt bucket (16), so the empty state's prefill is the admissions' own program
PROMPTS = [[5, 17, 42, 8, 3], [61, 2, 33, 90, 14, 7, 25, 11], [70], [9, 4],
           [12, 88, 31, 45, 2]]
SAMPLED = jf.Sampling(temperature=0.9, top_p=0.9, logprobs=True)
CONFIG = SchedulerConfig(slots=2, max_length=32, steps_per_tick=2)
BURST_CONFIG = SchedulerConfig(slots=2, max_length=16, steps_per_tick=2)


def burst(model, leader: bool = True) -> dict:
    """{scheduler: [tokens of each request], ...}; the last request is aborted at once.
    Every process calls this; only the leader (process 0) submits."""
    out = {}
    for name, sched in (("contiguous", Scheduler(model, BURST_CONFIG)),
                        ("paged", PagedScheduler(model, BURST_CONFIG, PagedConfig(
                            page_size=4, num_pages=9, prefill_tokens=8, chunk=4)))):
        hs = []
        if leader:
            hs = [sched.submit(p, SAMPLED if i == 1 else jf.Sampling(temperature=0,
                                                                     logprobs=True),
                               max_new_tokens=5, seed=i) for i, p in enumerate(PROMPTS)]
            hs[-1].abort()
        sched.run_until_idle()
        outs = [h.result(timeout=0) for h in hs]
        out[name] = [[o.status, o.tokens, o.logprobs] for o in outs]
    return out


# data-parallel replicas over processes (tests/test_scheduler_multihost.py): prompts of mixed
# lengths and a pool of 6 pages of 4 tokens per replica, so requests are preempted; a prefill
# budget of one chunk, so every chunk call is one compiled shape (1 row x 4)
REPLICA_PROMPTS = [[5, 17, 42, 8, 3, 61, 2, 33, 90, 14, 7], [70], [12, 88, 31, 45, 2, 66],
                   [9, 4, 77, 21, 38, 50, 3, 8, 19], [33, 1], [81, 26, 7, 54, 12, 3, 90],
                   [2, 14, 64, 8], [45, 6, 71, 30, 11, 28, 59, 3, 17, 40]]
REPLICA_MAXN = [7, 5, 6, 7, 4, 6, 5, 7]
REPLICA_PAGED = PagedConfig(page_size=4, num_pages=7, prefill_tokens=4, chunk=4)


def replica_burst(model, leader: bool, timeout: float = 240.0) -> dict:
    """Every process: a HostReplicaScheduler over model's data replicas, started; process 0
    submits REPLICA_PROMPTS (greedy, log-probs, the top 3), then two long requests that it
    aborts once each has streamed a token, and stops the loop; the others follow until it
    does. Process 0 returns what its handles got, how many requests each replica was handed
    (after the burst, after the long ones), the preemptions and the pages in use before and
    after the aborts."""
    sched = HostReplicaScheduler(model, CONFIG, REPLICA_PAGED).start()
    deadline = time.monotonic() + timeout
    if not leader:
        while not sched.join(1.0):
            assert time.monotonic() < deadline, "process 0 did not stop the replicas' loop"
        sched.stop()
        return {"error": sched.error}
    try:
        lp = jf.Sampling(temperature=0, logprobs=True, top_logprobs=3)
        hs = [sched.submit(p, lp, max_new_tokens=n)
              for p, n in zip(REPLICA_PROMPTS, REPLICA_MAXN)]
        outs = [h.result(timeout=timeout) for h in hs]
        routed = list(sched.routed)
        longs = [sched.submit([3, 1, 4], lp, max_new_tokens=20, ignore_eos=True)
                 for _ in range(2)]
        for h in longs:
            next(h.stream(timeout=timeout))  # running, its pages taken
        in_use = [p.num_in_use for p in sched.pools]
        for h in longs:
            h.abort()
        aborted = [h.result(timeout=timeout).status for h in longs]
        while any(p.num_in_use for p in sched.pools) and time.monotonic() < deadline:
            time.sleep(0.05)
        return {"outs": [[o.status, o.tokens, o.logprobs, o.top_logprobs] for o in outs],
                "routed": [routed, list(sched.routed)],
                "preemptions": sched.preemptions, "in_use": in_use, "aborted": aborted,
                "in_use_after": [p.num_in_use for p in sched.pools], "error": sched.error}
    finally:
        sched.stop()
