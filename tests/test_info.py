"""The memory plan (jaxformer.memory, `jaxformer info`): estimates equal the bytes of the arrays
actually created on emulated CPU devices; load() refuses plans that cannot fit; quiet logging."""
import importlib

import jax
import numpy as np
import pytest

import jaxformer as jf
from jaxformer import cli, memory

gen = importlib.import_module("jaxformer.generate")  # the package re-exports generate()

DECODER = jf.ModelConfig(
    name="tiny-gqa", vocab_size=300, hidden_size=64, num_layers=4, num_heads=8, num_kv_heads=4,
    ffn_size=96, gated_mlp=True, activation="silu", position_embedding="rope", norm="rmsnorm",
    qkv_bias=False, linear_bias=False, tie_embeddings=False, max_position_embeddings=512)
GPT = jf.ModelConfig(name="tiny-gpt", vocab_size=200, hidden_size=32, num_layers=2, num_heads=4,
                     max_position_embeddings=256)
ENCODER = jf.ModelConfig(
    name="tiny-bert", arch="encoder", vocab_size=150, hidden_size=32, num_layers=2, num_heads=4,
    type_vocab_size=2, norm_position="post", embed_norm=True, final_norm=False, pooler=True,
    mlm_head=True, binary_head=True, max_position_embeddings=64)


def mesh(data=1, pipe=1, tensor=1):
    return jf.make_mesh(data, pipe, tensor, devices=jax.devices()[: data * pipe * tensor])


def per_device_bytes(arrays) -> int:
    """Bytes held on the busiest device by these jax.Arrays."""
    held: dict = {}
    for a in jax.tree.leaves(arrays):
        for s in a.addressable_shards:
            held[s.device] = held.get(s.device, 0) + s.data.nbytes
    return max(held.values())


@pytest.fixture(autouse=True)
def no_env_limit(monkeypatch):
    monkeypatch.delenv(memory.ENV_DEVICE_MEMORY, raising=False)


@pytest.fixture(scope="module")
def tp_dp_model():
    return jf.Model.random(DECODER, mesh(data=2, tensor=2))


def test_weight_bytes_equal_a_real_model(tp_dp_model):
    assert memory.weights_bytes(DECODER, tp_dp_model.mesh) == per_device_bytes(
        tp_dp_model.params)
    assert memory.plan(DECODER, {"data": 2, "tensor": 2}).weights == per_device_bytes(
        tp_dp_model.params)


@pytest.mark.parametrize("cfg,sizes,dtype,rules", [
    (DECODER, (2, 2, 2), "bfloat16", "default"),
    (GPT, (1, 2, 4), "float32", "default"),
    (ENCODER, (2, 1, 2), "bfloat16", "default"),
    (DECODER, (2, 2, 2), "float32", "data_parallel"),
])
def test_weight_bytes_equal_arrays_in_the_model_shardings(cfg, sizes, dtype, rules):
    """The same placement as Model.random / load (engine.param_shardings), without the init."""
    from jaxformer import sharding as shd
    from jaxformer.model import param_shardings
    from jaxformer.models import abstract_params
    m = mesh(*sizes)
    shardings = param_shardings(cfg, m, shd.load_rules(rules))
    arrays = jax.tree.map(lambda s, sh: jax.device_put(np.zeros(s.shape, dtype), sh),
                          abstract_params(cfg), shardings)
    assert memory.weights_bytes(cfg, m, dtype, rules) == per_device_bytes(arrays)


@pytest.mark.parametrize("prompts,prompt_len,new", [(1, 48, 16), (3, 184, 16), (20, 29, 171)])
def test_kv_cache_and_activations_of_a_real_prefill(tp_dp_model, prompts, prompt_len, new):
    model = tp_dp_model
    run = gen.GenerateRun(model, [[5] * prompt_len] * prompts, new, None, 0, False)
    state = run.prefill()
    f, args = run.prefill_call()
    p = memory.plan(DECODER, model.mesh, "float32", batch=prompts, max_length=prompt_len + new,
                    prompt_length=prompt_len)
    assert (p.rows, p.slots) == state.cache.k.shape[1:3]
    assert p.kv_cache == per_device_bytes(state.cache)
    assert p.prefill_tokens == args[1].shape[1]
    # the worst case over prompt / new splits never allocates less
    assert memory.plan(DECODER, model.mesh, batch=prompts,
                       max_length=prompt_len + new).kv_cache >= p.kv_cache
    # activations are an estimate: compare with what XLA reserves for the prefill's temporaries
    temp = f.lower(*args).compile().memory_analysis().temp_size_in_bytes
    assert 0.5 * temp <= p.activations <= 2.5 * temp, (p.activations, temp)
    # the decode working set: what the compiled decode loop reserves besides its arguments
    loop = run.engine.decode_loop()
    temp = loop.lower(model.params, state, np.int32(new)).compile() \
        .memory_analysis().temp_size_in_bytes
    assert 0.6 * temp <= p.decode <= 1.6 * temp, (p.decode, temp)
    assert p.total == p.weights + p.kv_cache + max(p.activations, p.decode)


def test_largest_batch_is_the_boundary():
    p = memory.plan(DECODER, {"data": 2, "tensor": 2}, batch=1, max_length=256,
                    device_memory=200 << 20)
    best = p.largest_batch(256)
    assert best >= 16
    fits = memory.plan(DECODER, {"data": 2, "tensor": 2}, batch=best, max_length=256,
                       device_memory=200 << 20)
    over = memory.plan(DECODER, {"data": 2, "tensor": 2}, batch=best * 2, max_length=256,
                       device_memory=200 << 20)
    assert fits.fits and not over.fits
    assert dict(p.fit_table([256]))[256] == best


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, tp_dp_model):
    path = tmp_path_factory.mktemp("info") / "ckpt"
    tp_dp_model.save(path)
    return path


def test_load_refuses_a_workload_that_cannot_fit(ckpt, monkeypatch):
    m = mesh(data=2, tensor=2)
    weights = memory.weights_bytes(DECODER, m, "float32")
    monkeypatch.setenv(memory.ENV_DEVICE_MEMORY, str(weights + (4 << 20)))
    model = jf.load(ckpt, mesh=m, max_batch=1, max_length=64)  # fits
    assert model.generate([[1, 2, 3]], max_new_tokens=4).tokens
    with pytest.raises(ValueError) as e:
        jf.load(ckpt, mesh=m, max_batch=64, max_length=512)
    msg = str(e.value)
    assert "batch 64 x length 512 cannot fit" in msg
    assert "DOES NOT FIT" in msg and "KV cache" in msg and "largest batch that fits" in msg
    assert isinstance(e.value, memory.OutOfMemoryPlan)


def test_load_always_refuses_weights_that_cannot_fit(ckpt, monkeypatch):
    m = mesh(tensor=2)
    monkeypatch.setenv(memory.ENV_DEVICE_MEMORY, str(memory.weights_bytes(DECODER, m) - 1))
    with pytest.raises(ValueError, match="the weights cannot fit device memory") as e:
        jf.load(ckpt, mesh=m)
    assert "the weights alone need" in str(e.value)
    monkeypatch.setenv(memory.ENV_DEVICE_MEMORY, "1KiB")
    with pytest.raises(ValueError, match="the weights alone need"):
        jf.Model.random(DECODER, m)


def test_unknown_device_memory_gives_no_verdict():
    assert memory.device_memory_limit()[0] is None  # CPU
    p = memory.plan(DECODER, {"tensor": 2}, batch=4, max_length=128)
    assert p.fits is None and "--device-memory" in p.explain()


def test_parse_bytes():
    assert memory.parse_bytes("80GiB") == 80 << 30
    assert memory.parse_bytes("1.5G") == 3 << 29
    assert memory.parse_bytes("8e10") == 80_000_000_000
    with pytest.raises(ValueError, match="memory size"):
        memory.parse_bytes("lots")


def test_cli_info(ckpt, capsys):
    args = ["info", "--checkpoint", str(ckpt), "--tensor", "2", "--data", "2", "--batch", "4",
            "--max-length", "128", "--dtype", "float32"]
    assert cli.main(args + ["--device-memory", "1"]) == 0
    out = capsys.readouterr().out
    p = memory.plan(DECODER, {"data": 2, "tensor": 2}, batch=4, max_length=128)
    assert memory.fmt_bytes(p.weights) in out and memory.fmt_bytes(p.kv_cache) in out
    assert "fits" in out and "largest batch that fits" in out
    assert cli.main(args + ["--device-memory", "0.0001"]) == 1
    assert "DOES NOT FIT" in capsys.readouterr().out
    assert cli.main(["info", "--preset", "llama-70b", "--tensor", "8", "--pipe", "2"]) == 0
    out = capsys.readouterr().out
    assert "llama-70b" in out and "pipe=2 x tensor=8" in out
    assert cli.main(["info", "--preset", "llama-70b", "--tensor", "3"]) == 2
    assert "not divisible" in capsys.readouterr().err


def test_quiet_by_default_and_progress_when_asked(tp_dp_model, capsys):
    out = tp_dp_model.generate([[7, 8, 9]], max_new_tokens=64)
    assert capsys.readouterr().err == ""  # no bar, no log output
    with_bar = tp_dp_model.generate([[7, 8, 9]], max_new_tokens=64, progress=True)
    assert "generating" in capsys.readouterr().err
    assert with_bar.tokens == out.tokens


def test_chunked_prefill_counts_one_chunk():
    """A batch past RunConfig.prefill_tokens prefills in chunks of rows: the plan counts one
    chunk (cache.prefill_rows), within the bounds of XLA's reserved temporaries that a whole
    prefill meets, and less than the whole batch's; a pipe mesh prefills whole, its
    estimate the unchunked formula."""
    prompts, prompt_len, new = 16, 32, 8
    model = jf.Model.random(DECODER, mesh()).with_run(prefill_tokens=64)
    run = gen.GenerateRun(model, [[5] * prompt_len] * prompts, new, None, 0, False)
    f, args = run.prefill_call()
    p = memory.plan(DECODER, model.mesh, batch=prompts, max_length=prompt_len + new,
                    prompt_length=prompt_len, prefill_tokens=64)
    assert (p.rows, p.prefill_chunk) == (16, 64 // args[1].shape[1])
    temp = f.lower(*args).compile().memory_analysis().temp_size_in_bytes
    assert 0.5 * temp <= p.activations <= 2.5 * temp, (p.activations, temp)
    whole = memory.plan(DECODER, model.mesh, batch=prompts, max_length=prompt_len + new,
                        prompt_length=prompt_len, prefill_tokens=1 << 20)
    assert whole.prefill_chunk == 16 and whole.activations > 2 * p.activations
    sizes = {"data": 1, "pipe": 2, "tensor": 1}
    piped = memory.plan(DECODER, sizes, batch=prompts, max_length=prompt_len + new,
                        prompt_length=prompt_len, prefill_tokens=64)
    assert piped.prefill_chunk == 16
    assert piped.activations == memory.activation_bytes(DECODER, sizes, "float32", 16,
                                                        piped.prefill_tokens)


def test_pool_plan_pages_are_the_paged_cache_bytes_and_fit_what_is_left():
    """A page's bytes are those of the PagedKVCache arrays of one page (sharded over tensor),
    and weights + reserve + the pages fit the device memory with less than a page left."""
    from jaxformer.cache import PagedKVCache
    cfg = jf.ModelConfig.from_preset("llama3-8b")
    for kv, sizes in ((None, None), ("int8", {"data": 1, "pipe": 1, "tensor": 2})):
        plan = memory.pool_plan(cfg, sizes, "bfloat16", page_size=16, slots=128,
                                prefill_tokens=2048, kv_cache=kv, device_memory="80GiB")
        one = PagedKVCache.abstract(cfg, 1, 16, "bfloat16", kv)
        t = 1 if sizes is None else 2
        want = sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(one)) // t
        assert plan.page_bytes == want
        left = 80 * 2 ** 30 - plan.weights - plan.reserve - plan.num_pages * plan.page_bytes
        assert 0 <= left < plan.page_bytes
        assert plan.tokens == (plan.num_pages - 1) * 16


class _Dev:
    def __init__(self, stats):
        self.stats = stats

    def memory_stats(self):
        return self.stats


def test_fit_pool_caps_pages_by_free_memory_and_the_largest_free_block():
    """After loading, the pool gets at most what the devices have free less the plan's
    reserve, and at most their largest free block less the margin (each pool array is one
    allocation); devices without stats (CPU) leave the plan as it is."""
    cfg = jf.ModelConfig.from_preset("llama3-8b")
    plan = memory.pool_plan(cfg, None, "bfloat16", page_size=16, slots=64,
                            prefill_tokens=2048, device_memory="80GiB")
    G, page = 2 ** 30, plan.page_bytes
    assert memory.fit_pool(plan, [_Dev(None)]) == plan
    roomy = {"bytes_limit": 80 * G, "bytes_in_use": 0, "largest_free_block_bytes": 80 * G}
    assert memory.fit_pool(plan, [_Dev(roomy)]).num_pages == plan.num_pages
    # 60 GiB limit, 16 GiB in use, but the free 44 GiB lies in a 20 GiB and a 24 GiB hole
    holes = {"bytes_limit": 60 * G, "bytes_in_use": 16 * G,
             "largest_free_block_bytes": 24 * G}
    fitted = memory.fit_pool(plan, [_Dev(roomy), _Dev(holes)], margin=0.05)
    assert fitted.num_pages == (24 * G - 3 * G) // page  # the block, less 5% of 60 GiB
    assert "largest free block 24" in fitted.explain()
    # no fragmentation: the free total less the reserve binds
    tight = {"bytes_limit": 60 * G, "bytes_in_use": 50 * G}
    assert memory.fit_pool(plan, [_Dev(tight)]).num_pages == (10 * G - plan.reserve) // page
