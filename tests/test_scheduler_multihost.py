"""One scheduler over two processes (serving/multihost.py): a mesh spanning both (tensor=2,
one CPU device each, collectives over gloo); process 0 takes the requests and broadcasts
each tick's inputs, both run the same calls. Greedy and seeded-sampled requests get the
tokens and log-probs of the same burst in one process, with the contiguous and the paged
scheduler, and an abort sent with its request ends it on both."""
import numpy as np

import jaxformer as jf
from jaxformer.config import ModelConfig
from pipeline_models import LLAMA
from scheduler_burst import burst
from test_distributed import finish, free_port, result, start


def test_two_processes_serve_as_one(tmp_path):
    model = jf.Model.random(ModelConfig(**LLAMA), jf.make_mesh(tensor=2), seed=1)
    model.save(tmp_path / "ckpt")
    port = free_port()
    procs = [start("--mode", "serve", "--port", port, "--process-id", i, "--num-processes", 2,
                   "--local-devices", 1, "--mesh", 1, 1, 2, "--timeout", 120,
                   "--checkpoint", tmp_path / "ckpt") for i in (0, 1)]
    try:
        one = burst(model)  # meanwhile, the same burst in this process
    finally:
        outs = finish(procs, 300)
    two = [result(*o) for o in outs]
    assert [r["process"] for r in two] == [0, 1] and two[0]["devices"] == 2
    assert two[1]["contiguous"] == two[1]["paged"] == []  # process 1 submitted nothing
    for name in ("contiguous", "paged"):
        assert [s for s, *_ in one[name]] == ["finished"] * 3 + ["aborted"]
        assert [t for _, t, _ in two[0][name]] == [t for _, t, _ in one[name]], name
        assert [s for s, *_ in two[0][name]] == [s for s, *_ in one[name]]
        for (_, _, a), (_, _, b) in zip(two[0][name], one[name]):
            np.testing.assert_allclose(a, b, atol=1e-5)
