"""One process of a multi-process test run (tests/test_distributed.py starts these).

    python tests/distributed_worker.py --mode generate --port P --process-id I --num-processes N
        [--mesh DATA PIPE TENSOR] [--timeout S] [--env] [--checkpoint DIR]

Each process emulates --local-devices CPU devices; the mesh spans every process's devices.
The last line on stdout is `RESULT <json>`; errors are printed as `ERROR <type>: <message>`
and exit with status 3.
"""
import argparse
import json
import os
import sys
import time
import traceback

ap = argparse.ArgumentParser()
ap.add_argument("--mode", choices=["generate", "mesh", "connect", "serve"], default="generate")
ap.add_argument("--port", type=int, required=True)
ap.add_argument("--process-id", type=int, required=True)
ap.add_argument("--num-processes", type=int, default=2)
ap.add_argument("--local-devices", type=int, default=4)
ap.add_argument("--mesh", type=int, nargs=3, default=[2, 2, 2])
ap.add_argument("--timeout", type=float, default=60)
ap.add_argument("--checkpoint", default=None, help="load this checkpoint (else random)")
ap.add_argument("--env", action="store_true", help="configure through JAXFORMER_* variables")
args = ap.parse_args()

os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.local_devices}"
os.environ["JAX_PLATFORMS"] = "cpu"
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax

jax.config.update("jax_cpu_collectives_implementation", "gloo")


def main():
    from jaxformer import distributed

    if args.env:  # the environment variables a launcher would set
        os.environ.update(JAXFORMER_COORDINATOR=f"127.0.0.1:{args.port}",
                          JAXFORMER_NUM_PROCESSES=str(args.num_processes),
                          JAXFORMER_PROCESS_ID=str(args.process_id))
        info = distributed.initialize(timeout_s=args.timeout)
    else:
        info = distributed.initialize(f"127.0.0.1:{args.port}", args.num_processes,
                                      args.process_id, timeout_s=args.timeout)
    if args.mode == "connect":
        return {"process": info.process_id, "devices": jax.device_count()}
    import jaxformer as jf
    from jaxformer.config import ModelConfig

    if args.mode == "serve":
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        return serve(args.checkpoint, args.mesh)
    mesh = jf.make_mesh(*args.mesh)
    if args.mode == "mesh":
        distributed.check_mesh(mesh, timeout_s=args.timeout)
        return {"mesh": dict(mesh.shape)}
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from pipeline_models import LLAMA, PROMPTS

    if args.checkpoint:  # each process restores only the shards of its own devices
        model = jf.load(args.checkpoint, mesh)
    else:
        model = jf.Model.random(ModelConfig(**LLAMA), mesh, seed=1)
    greedy = model.generate(PROMPTS, max_new_tokens=6).tokens
    sampled = model.generate(PROMPTS, max_new_tokens=6, seed=7,
                             sampling=jf.Sampling(temperature=0.9, top_p=0.9)).tokens
    import numpy as np
    logits = model.logits(np.asarray([p[:3] for p in PROMPTS]))
    return {"greedy": greedy, "sampled": sampled, "logits": logits.tolist(),
            "process": jax.process_index(), "devices": jax.device_count()}


def serve(checkpoint, sizes):
    """Both schedulers over a mesh of one device of each process: process 0 submits (and
    aborts one request), every process ticks; process 0 reports what its handles got. With
    two devices per process, then data-parallel replicas (data=2 x tensor=2) behind process
    0's front, each replica on one process's devices."""
    import jaxformer as jf
    from scheduler_burst import burst, replica_burst

    P, leader = jax.process_count(), jax.process_index() == 0
    firsts = [jax.local_devices(process_index=p)[0] for p in range(P)]
    out = {"process": jax.process_index(), "devices": jax.device_count(), "seconds": {}}
    t = time.monotonic()
    out.update(burst(jf.load(checkpoint, jf.make_mesh(*sizes, devices=firsts)), leader))
    out["seconds"]["burst"] = time.monotonic() - t
    if args.local_devices == 2:  # replica d on process d's two devices
        t = time.monotonic()
        devs = [d for p in range(P) for d in jax.local_devices(process_index=p)]
        out["replicas"] = replica_burst(jf.load(checkpoint, jf.make_mesh(2, 1, 2, devices=devs)),
                                        leader)
        out["seconds"]["replicas"] = time.monotonic() - t
    return out


if __name__ == "__main__":
    try:
        out = main()
    except Exception as e:  # noqa: BLE001 - reported to the parent test
        # the line the test reads first: once the other process exits, the coordination
        # service may abort this one at any moment
        print(f"ERROR {type(e).__name__}: {e}", flush=True)
        traceback.print_exc()
        sys.stdout.flush()
        if jax.process_count() > 1 and jax.process_index() == 0:
            # the coordination service lives in process 0: leaving at once can abort a
            # process that failed too before it prints its own line (a loaded CI machine
            # deschedules it between the check's last barrier and its print)
            time.sleep(3)
        os._exit(3)  # skip the atexit shutdown barrier: the other process may be gone
    print("RESULT " + json.dumps(out), flush=True)
