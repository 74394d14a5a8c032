"""Shared by the quantization tests: a mesh helper and seeded float checkpoints."""
import jax
import numpy as np

import jaxformer as jf

F32 = np.float32


def mesh(data=1, pipe=1, tensor=1):
    return jf.make_mesh(data, pipe, tensor, devices=jax.devices()[: data * pipe * tensor])


def seeded_weights(cfg, seed=0):
    """Kernels ~ N(0, 1 / fan_in) (activations keep their scale), norm scales 1 + N(0, 0.1),
    biases N(0, 0.05), head (or tied table) scaled for logits of std ~3, so the next-token
    distributions are peaked like a trained model's rather than near uniform."""
    from jaxformer.models import abstract_params
    rng = np.random.default_rng(seed)
    D = cfg.hidden_size

    def init(path, a):
        keys = [p.key for p in path]
        if keys[-1] == "scale":
            return (1 + rng.normal(0, 0.1, a.shape)).astype(F32)
        if keys[-1] == "bias":
            return rng.normal(0, 0.05, a.shape).astype(F32)
        if keys[-1] == "embedding":
            tied = "token" in keys and cfg.tie_embeddings
            return rng.normal(0, 3 / np.sqrt(D) if tied else 1.0, a.shape).astype(F32)
        if keys[0] == "lm_head":
            return rng.normal(0, 3 / np.sqrt(D), a.shape).astype(F32)
        fan_in = np.prod(a.shape[1:3]) if keys[-2] == "out" else a.shape[1]  # [L, in.., out..]
        return rng.normal(0, 1 / np.sqrt(fan_in), a.shape).astype(F32)

    return jax.tree_util.tree_map_with_path(init, abstract_params(cfg))


def float_checkpoint(cfg, path):
    from jaxformer.model import _run_config, default_mesh
    m = default_mesh()
    jf.Model(cfg, seeded_weights(cfg), m, *_run_config(m, "float32", "default", "auto")).save(path)
    return path
