"""A small burst through both schedulers, run the same way in one process and in each of
two processes (tests/test_scheduler_meshes.py, tests/distributed_worker.py)."""
import jaxformer as jf
from jaxformer.serving.paged_scheduler import PagedConfig, PagedScheduler
from jaxformer.serving.scheduler import Scheduler, SchedulerConfig

PROMPTS = [[5, 17, 42, 8, 3], [61, 2, 33, 90, 14, 7, 25, 11, 40], [70], [12, 88, 31, 45, 2]]
SAMPLED = jf.Sampling(temperature=0.9, top_p=0.9, logprobs=True)
CONFIG = SchedulerConfig(slots=2, max_length=32, steps_per_tick=2)


def burst(model, leader: bool = True) -> dict:
    """{scheduler: [tokens of each request], ...}; the last request is aborted at once.
    Every process calls this; only the leader (process 0) submits."""
    out = {}
    for name, sched in (("contiguous", Scheduler(model, CONFIG)),
                        ("paged", PagedScheduler(model, CONFIG, PagedConfig(
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
