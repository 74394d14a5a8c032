"""Multi-process runs on localhost: two processes (CPU collectives over gloo, 4 emulated
devices each, one 8-device mesh spanning both, each restoring only its shards of a
checkpoint) produce the tokens of one process, and a process that cannot reach the
coordinator, or whose mesh disagrees, fails fast and says why.

The processes are tests/distributed_worker.py, started as subprocesses and bounded in time
(killed on failure or time-out).
"""
import json
import os
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

import jaxformer as jf
from jaxformer import distributed
from jaxformer.config import ModelConfig

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from pipeline_models import LLAMA, PROMPTS

WORKER = os.path.join(HERE, "distributed_worker.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(*args):
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("JAXFORMER_", "SLURM_", "OMPI_", "JAX_COORDINATOR"))}
    return subprocess.Popen([sys.executable, WORKER, *map(str, args)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(procs, timeout_s):
    """Wait for every process (killing all of them past the deadline); (returncode, output)."""
    deadline = time.monotonic() + timeout_s
    out = []
    try:
        for p in procs:
            text, _ = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
            out.append((p.returncode, text))
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        logs = "\n---\n".join((p.communicate()[0] or "")[-3000:] for p in procs)
        pytest.fail(f"processes still running after {timeout_s}s; output:\n{logs}")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return out


def result(rc, text):
    lines = [ln for ln in text.splitlines() if ln.startswith("RESULT ")]
    assert rc == 0 and lines, f"worker failed (rc {rc}):\n{text[-3000:]}"
    return json.loads(lines[-1][len("RESULT "):])


def error(rc, text):
    lines = [ln for ln in text.splitlines() if ln.startswith("ERROR ")]
    assert rc != 0 and lines, f"worker should have failed (rc {rc}):\n{text[-3000:]}"
    return lines[-1]


def test_two_processes_match_one_process(tmp_path):
    model = jf.Model.random(ModelConfig(**LLAMA), jf.make_mesh(2, 2, 2), seed=1)
    model.save(tmp_path / "ckpt")
    port = free_port()
    procs = [start("--mode", "generate", "--port", port, "--process-id", i,
                   "--num-processes", 2, "--mesh", 2, 2, 2, "--timeout", 120,
                   "--checkpoint", tmp_path / "ckpt") for i in (0, 1)]
    try:
        # meanwhile, the same program in this one process over its 8 devices
        greedy = model.generate(PROMPTS, max_new_tokens=6).tokens
        sampled = model.generate(PROMPTS, max_new_tokens=6, seed=7,
                                 sampling=jf.Sampling(temperature=0.9, top_p=0.9)).tokens
        logits = model.logits(np.asarray([p[:3] for p in PROMPTS]))
    finally:
        outs = finish(procs, 300)
    results = [result(*o) for o in outs]
    assert [r["process"] for r in results] == [0, 1]
    for r in results:
        assert r["devices"] == 8
        assert r["greedy"] == greedy
        assert r["sampled"] == sampled
        assert np.abs(np.asarray(r["logits"]) - logits).max() <= 1e-5


def test_unreachable_coordinator_fails_fast():
    port = free_port()  # nobody listens there
    t0 = time.monotonic()
    [(rc, text)] = finish([start("--mode", "connect", "--env", "--port", port,
                                 "--process-id", 1, "--timeout", 3)], 90)
    msg = error(rc, text)
    assert f"cannot reach the coordinator at 127.0.0.1:{port} within 3s" in msg
    assert time.monotonic() - t0 < 60


def test_disagreeing_meshes_fail_fast():
    port = free_port()
    procs = [start("--mode", "mesh", "--port", port, "--process-id", i, "--mesh", *mesh,
                   "--timeout", 30) for i, mesh in ((0, (2, 2, 2)), (1, (1, 2, 4)))]
    for rc, text in finish(procs, 120):
        msg = error(rc, text)
        assert "processes disagree on the mesh sizes" in msg
        assert "process 0: data=2, pipe=2, tensor=2; process 1: data=1, pipe=2, tensor=4" in msg


@pytest.fixture
def clean_env(monkeypatch):
    for k in list(os.environ):
        if k.startswith(("JAXFORMER_", "SLURM_", "OMPI_", "JAX_COORDINATOR")):
            monkeypatch.delenv(k)
    return monkeypatch


def test_single_process_initialize_is_a_no_op(clean_env):
    info = distributed.initialize()
    assert (info.num_processes, info.process_id, info.source) == (1, 0, "single")
    assert not jax.distributed.is_initialized()
    distributed.check_mesh(jf.make_mesh(2, 2, 2))  # one process: nothing to compare


def test_incomplete_configuration_is_explained(clean_env):
    clean_env.setenv("JAXFORMER_NUM_PROCESSES", "2")
    with pytest.raises(distributed.DistributedError, match="JAXFORMER_COORDINATOR"):
        distributed.initialize()
    clean_env.setenv("JAXFORMER_PROCESS_ID", "x")
    with pytest.raises(distributed.DistributedError, match="not an integer"):
        distributed.initialize("127.0.0.1:1234")
    with pytest.raises(distributed.DistributedError, match="host:port"):
        distributed.initialize("localhost", 2, 1)
    with pytest.raises(distributed.DistributedError, match="outside"):
        distributed.initialize("127.0.0.1:1234", 2, 2)
    assert not jax.distributed.is_initialized()
