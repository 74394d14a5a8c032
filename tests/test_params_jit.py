"""jaxformer.params_jit: compiled entry points get the weights as a tuple, with the small
replicated arrays packed into one buffer per dtype; the unpacked leaves are the originals."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import jaxformer as jf
from jaxformer import params_jit as pj


def test_pack_then_unpack_gives_back_every_array():
    mesh = jax.make_mesh((2,), ("tensor",), axis_types=(jax.sharding.AxisType.Auto,),
                         devices=jax.devices()[:2])
    rep, split = NamedSharding(mesh, P()), NamedSharding(mesh, P("tensor"))
    rng = np.random.default_rng(0)
    host = [rng.normal(size=(pj.SMALL_PARAM_ELEMENTS + 1,)).astype(np.float32),  # too big
            rng.normal(size=(3, 4)).astype(np.float32),
            rng.normal(size=(8,)).astype(jnp.bfloat16),
            np.arange(6, dtype=np.int8).reshape(2, 3),          # not floating
            rng.normal(size=(4,)).astype(np.float32),           # sharded below
            rng.normal(size=(5,)).astype(jnp.bfloat16),
            np.float32(0.25).reshape(()),                       # a scalar
            rng.normal(size=(2,)).astype(np.float16)]           # the only float16: kept
    leaves = [jax.device_put(a, split if i == 4 else rep) for i, a in enumerate(host)]
    plan = pj.pack_plan(leaves)
    assert plan.big == (0, 3, 4, 7)
    assert {name: [i for i, _, _ in entries] for name, entries in plan.groups} == {
        "float32": [1, 6], "bfloat16": [2, 5]}
    big, packed = pj.pack(leaves, plan)
    assert len(big) + len(packed) == 6 < len(leaves)
    assert all(b.sharding.is_fully_replicated for b in packed)
    out = jax.jit(lambda big, packed: pj.unpack(big, packed, plan))(big, packed)
    for a, b in zip(host, out):
        assert b.dtype == a.dtype and b.shape == a.shape
        np.testing.assert_array_equal(np.asarray(b), a)
    with pytest.raises(ValueError, match="params have 7 arrays, the packing plan 8"):
        pj.pack(leaves[:-1], plan)
    with pytest.raises(ValueError, match=r"param 1: float32\[4, 3\], the packing plan"):
        pj.pack([leaves[0], leaves[1].reshape(4, 3)] + leaves[2:], plan)


@pytest.mark.parametrize("tensor", [1, 2])
def test_packed_entry_point_computes_what_the_unpacked_one_does(tensor):
    """The logits entry point of the unrolled layout with its small arrays packed against
    the same program handed every array on its own; under tensor=2 the sharded arrays stay
    unpacked."""
    from jaxformer import model as model_mod
    cfg = jf.ModelConfig.from_preset("demo")
    mesh = jf.make_mesh(1, 1, tensor, devices=jax.devices()[:tensor])
    model = jf.Model.random(cfg, mesh, dtype="float32", seed=3, layer_loop="unroll")
    stacked = jf.Model.random(cfg, mesh, dtype="float32", seed=3, layer_loop="scan")
    assert model_mod._logits_fn(stacked).plan is None  # a few stacked arrays: nothing to pack
    ids, lengths, _, _ = model._padded(
        np.random.default_rng(1).integers(0, cfg.vocab_size, (2, 9)), None)
    packed = model_mod._logits_fn(model)
    leaves = model.param_leaves()
    assert packed.plan is not None and [g[0] for g in packed.plan.groups] == ["float32"]
    n_small = len(packed.plan.groups[0][1])
    assert n_small > 0 and len(packed.plan.big) + n_small == len(leaves)
    sharded = [i for i, a in enumerate(leaves) if not a.sharding.is_fully_replicated]
    assert (len(sharded) > 0) == (tensor > 1)
    assert set(sharded) <= set(packed.plan.big)
    orig = model_mod.Model.jit
    try:  # the same entry point, every array handed to jit on its own
        model_mod.Model.jit = lambda self, fn, pack_small=False, **kw: orig(self, fn, **kw)
        unpacked = model_mod._logits_fn(model)
    finally:
        model_mod.Model.jit = orig
    assert unpacked.plan is None
    want = np.asarray(unpacked(model.params, ids, lengths))
    np.testing.assert_array_equal(np.asarray(packed(model.params, ids, lengths)), want)
    # other params of the same structure are packed on the fly
    other = jax.tree.map(lambda a: a * 2, model.params)
    np.testing.assert_array_equal(np.asarray(packed(other, ids, lengths)),
                                  np.asarray(unpacked(other, ids, lengths)))


def test_packed_buffers_follow_recalibration():
    """FP8 activation scales travel packed: calibrating again after a call reaches the next
    call, whose logits are those of a model calibrated on the same prompts before any call."""
    cfg = jf.ModelConfig.from_preset("demo")
    kw = dict(dtype="float32", seed=3, quantize="fp8", layer_loop="unroll",
              calibration=[[1, 2, 3, 4]])
    model = jf.Model.random(cfg, **kw)
    ids = np.random.default_rng(2).integers(0, cfg.vocab_size, (96, 8))  # past ops.SMALL_M
    before = model.logits(ids)
    packed = {name for name, _ in model._fn("logits").plan.groups}
    assert "float32" in packed
    prompts = [[7, 7, 7, 7], [99, 98, 97]]
    model.calibrate(prompts)
    after = model.logits(ids)
    fresh = jf.Model.random(cfg, **kw)
    fresh.calibrate(prompts)
    assert np.abs(after - before).max() > 1e-3
    np.testing.assert_array_equal(after, fresh.logits(ids))
