"""Mixtures of experts (layers/moe.py) against independent references.

- The dispatches: the router's top-k and both expert paths (sorted-by-expert ragged_dot, and
  the decode path that gathers the chosen experts' weights) against a dense numpy twin that
  runs every expert on every token and weights it by the renormalised (or not) top-k
  softmax; an expert-parallel split (two shards, each its half of the experts) sums to it.
- Tiny random Mixtral and Qwen2-MoE (norm_topk_prob off, gated shared expert) from
  transformers, converted by conversion.hf: logits within TOL = 1e-4 of transformers' in
  float32 on one device, tensor=2 and an expert-parallel layout (experts over data=2, each
  expert's F over tensor=2; Mixtral also with two pipeline stages); greedy tokens equal to transformers' generate (the prefill takes
  the ragged path, each decode step of one row the gather path).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxformer as jf
from jaxformer.config import ModelConfig
from jaxformer.layers import moe

TOL = 1e-4
VOCAB = 96


# ---- the dispatches against a dense reference ------------------------------------------------
def silu(x):
    return x / (1 + np.exp(-x))


def dense_reference(x, router, wi, wo, k, norm, gated):
    """Every expert on every token (numpy float64), weighted by the top-k softmax."""
    x, router, wi, wo = (np.asarray(a, np.float64) for a in (x, router, wi, wo))
    logits = x @ router  # [M, E]
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    top = np.argsort(-p, axis=-1)[:, :k]
    combine = np.zeros_like(p)
    np.put_along_axis(combine, top, np.take_along_axis(p, top, -1), -1)
    if norm:
        combine /= combine.sum(-1, keepdims=True)
    out = np.zeros_like(x)
    for e in range(router.shape[1]):
        if gated:
            h = silu(x @ wi[e][:, 0]) * (x @ wi[e][:, 1])
        else:
            h = np.maximum(x @ wi[e], 0)
        out += combine[:, e:e + 1] * (h @ wo[e])
    return out


def _tiny(gated, E=6, k=2, M=9, D=8, F=12, seed=0):
    rng = np.random.RandomState(seed)
    shape = (E, D, 2, F) if gated else (E, D, F)
    x = rng.randn(M, D).astype(np.float32)
    router = rng.randn(D, E).astype(np.float32)
    wi = (rng.randn(*shape) / np.sqrt(D)).astype(np.float32)
    wo = (rng.randn(E, F, D) / np.sqrt(F)).astype(np.float32)
    cfg = ModelConfig(vocab_size=VOCAB, hidden_size=D, num_layers=1, num_heads=2,
                      activation="silu" if gated else "relu", gated_mlp=gated,
                      linear_bias=False, num_experts=E, experts_per_token=k)
    return cfg, x, router, wi, wo


@pytest.mark.parametrize("gated,norm", [(True, True), (True, False), (False, True)])
def test_ragged_and_gather_dispatch_match_dense_reference(gated, norm):
    cfg, x, router, wi, wo = _tiny(gated)
    k = cfg.experts_per_token
    ref = dense_reference(x, router, wi, wo, k, norm, gated)
    w, ids = moe.route(jnp.asarray(x)[None], jnp.asarray(router), k, norm)
    w, ids = w[0], ids[0]
    ragged = jax.jit(lambda *a: moe.ragged_experts(*a, cfg))(x, w, ids, wi, wo)
    np.testing.assert_allclose(ragged, ref, atol=1e-5, rtol=0)
    take = (lambda a: lambda e: jnp.take(jnp.asarray(a), e, axis=0))
    gather = moe.gather_experts(jnp.asarray(x), w, ids, take(wi), take(wo), cfg, 0, len(wi))
    np.testing.assert_allclose(gather, ref, atol=1e-5, rtol=0)
    # expert parallelism: each of two shards runs its half of the experts; the sum is whole
    half = len(wi) // 2
    parts = [moe.ragged_experts(jnp.asarray(x), w, ids, wi[s * half:(s + 1) * half],
                                wo[s * half:(s + 1) * half], cfg, s * half) for s in (0, 1)]
    np.testing.assert_allclose(parts[0] + parts[1], ref, atol=1e-5, rtol=0)
    parts = [moe.gather_experts(jnp.asarray(x), w, ids, take(wi[s * half:(s + 1) * half]),
                                take(wo[s * half:(s + 1) * half]), cfg, s * half, half)
             for s in (0, 1)]
    np.testing.assert_allclose(parts[0] + parts[1], ref, atol=1e-5, rtol=0)


def test_gather_only_below_the_expert_count():
    assert moe.use_gather(2, 8) and not moe.use_gather(8, 8)


@pytest.mark.parametrize("field,value,msg", [
    ("experts_per_token", 5, "experts_per_token"),
    ("experts_per_token", 0, "experts_per_token"),
    ("linear_bias", True, "linear_bias"),
    ("shared_expert_gate", True, "shared_expert_gate"),
    ("num_experts", -1, "num_experts"),
])
def test_config_refuses_bad_moe_fields(field, value, msg):
    kw = dict(vocab_size=VOCAB, hidden_size=8, num_layers=1, num_heads=2, linear_bias=False,
              num_experts=4, experts_per_token=2)
    kw[field] = value
    with pytest.raises(ValueError, match=f"ModelConfig.{msg}"):
        ModelConfig(**kw)
    with pytest.raises(ValueError, match="ModelConfig.experts_per_token"):
        ModelConfig(vocab_size=VOCAB, hidden_size=8, num_layers=1, num_heads=2,
                    experts_per_token=2)  # no experts


# ---- tiny transformers models ------------------------------------------------------------------
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from conversion import hf as conv  # noqa: E402
from conftest import randomize  # noqa: E402
from jaxformer.hf_config import from_hf_config  # noqa: E402


def test_qwen2_moe_with_dense_layers_is_refused():
    with pytest.raises(ValueError, match="mlp_only_layers"):
        from_hf_config(transformers.Qwen2MoeConfig(mlp_only_layers=[1]))

COMMON = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, num_experts_per_tok=2, max_position_embeddings=64,
              bos_token_id=None, eos_token_id=None, pad_token_id=None,
              tie_word_embeddings=False)
MODELS = {
    "mixtral": lambda: transformers.MixtralForCausalLM(transformers.MixtralConfig(
        intermediate_size=48, num_local_experts=4, **COMMON)),
    "qwen2_moe": lambda: transformers.Qwen2MoeForCausalLM(transformers.Qwen2MoeConfig(
        intermediate_size=64, moe_intermediate_size=24, shared_expert_intermediate_size=32,
        num_experts=4, norm_topk_prob=False, **COMMON)),
}
# (data, pipe, tensor, rules): one device, tensor parallel, experts over data with F over
# tensor; for Mixtral also all three with two pipeline stages (the MoE shard_map inside a stage)
LAYOUTS = [(1, 1, 1, "default"), (1, 1, 2, "default"), (2, 1, 2, "expert_parallel")]
EXTRA = {"mixtral": [(2, 2, 2, "expert_parallel")]}
PROMPT = list(range(3, 12))
NEW = 6


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("moe")


_built = {}


def converted(name, root):
    """(transformers model, converted checkpoint) of MODELS[name], built once."""
    if name not in _built:
        hf = randomize(MODELS[name](), sum(map(ord, name)))
        hf.save_pretrained(root / name)
        assert conv.main(["--input", str(root / name), "--output", str(root / f"{name}_jf")]) == 0
        _built[name] = hf, root / f"{name}_jf"
    return _built[name]


def batch(seed):
    rng = np.random.RandomState(seed)
    lengths = np.array([12, 7, 3, 1])
    mask = (np.arange(12)[None] < lengths[:, None]).astype(np.int64)
    return np.where(mask, rng.randint(0, VOCAB, (4, 12)), 0), mask


@pytest.mark.parametrize("name", list(MODELS))
def test_logits_and_greedy_match_transformers(name, root):
    hf, out = converted(name, root)
    ids, mask = batch(len(name))
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
    valid = mask.astype(bool)
    for data, pipe, tensor, rules in LAYOUTS + EXTRA.get(name, []):
        mesh = jf.make_mesh(data=data, pipe=pipe, tensor=tensor,
                            devices=jax.devices()[: data * pipe * tensor])
        jm = jf.load(out, mesh=mesh, dtype="float32", rules=rules)
        wi = jm.params["layers"]["mlp"]["wi"]["kernel"][...]
        # [L, E, D, 2, F]: E split over data (expert parallel), F over tensor
        assert wi.addressable_shards[0].data.shape[1] == 4 // (data if rules != "default"
                                                                 else 1)
        assert wi.addressable_shards[0].data.shape[-1] == wi.shape[-1] // tensor
        diff = float(np.abs(jm.logits(ids, mask)[valid] - ref[valid]).max())
        assert diff <= TOL, f"{name} {(data, pipe, tensor, rules)}: max abs diff {diff:.3g}"
        if (data, tensor) == (1, 1):
            got = jm.generate([PROMPT], max_new_tokens=NEW).tokens[0]
            p = torch.tensor([PROMPT])
            with torch.no_grad():
                want = hf.generate(p, attention_mask=torch.ones_like(p), max_new_tokens=NEW,
                                   do_sample=False, eos_token_id=None, pad_token_id=0)
            assert got == want[0, len(PROMPT):].tolist(), name


# ---- weight-only quantization of the experts --------------------------------------------------
def roundtripped(hf, mode):
    """A copy of `hf` whose block weights went through jaxformer's quantization in torch
    (symmetric, one scale per output channel over the input dim: int8 rounded to nearest even,
    fp8 e4m3 saturated at 448); the routers and the shared expert's gate stay float, as do
    embeddings, norms and the head."""
    import copy
    ref = copy.deepcopy(hf)
    qmax = 127.0 if mode == "int8" else 448.0
    with torch.no_grad():
        for name, p in ref.model.layers.named_parameters():
            if p.ndim < 2 or name.endswith(".gate.weight") or name.endswith("expert_gate.weight"):
                continue
            amax = p.abs().amax(-1, keepdim=True)
            scale = torch.where(amax > 0, amax, 1.0) * torch.tensor(1.0 / qmax)
            if mode == "int8":
                q = torch.clamp(torch.round(p / scale), -127, 127)
            else:
                q = torch.clamp(p / scale, -448, 448).to(torch.float8_e4m3fn).float()
            p.copy_(q * scale)
    return ref


@pytest.mark.parametrize("mode,data,tensor,rules", [("int8", 2, 2, "expert_parallel"),
                                                     ("fp8", 1, 1, "default")])
def test_quantized_experts_match_roundtripped_weights(root, mode, data, tensor, rules):
    hf, out = converted("qwen2_moe", root)
    mesh = jf.make_mesh(data=data, pipe=1, tensor=tensor, devices=jax.devices()[: data * tensor])
    jm = jf.load(out, mesh=mesh, dtype="float32", rules=rules, quantize=mode)
    mlp = jm.params["layers"]["mlp"]
    codes = mlp["wi"]["kernel"][...]
    # stored contraction-minor [L, E, 2, F, D], one scale per layer, expert and channel
    assert codes.shape == (2, 4, 2, 24, 32) and codes.dtype.itemsize == 1
    assert mlp["wi"]["kernel_scale"][...].shape == (2, 4, 2, 24)
    assert mlp["router"][...].dtype == np.float32
    ids, mask = batch(7)  # 48 tokens: FP8 runs weight-only up to 64 rows (quant/ops.py)
    with torch.no_grad():
        ref = roundtripped(hf, mode)(input_ids=torch.tensor(ids),
                                     attention_mask=torch.tensor(mask)).logits.numpy()
    valid = mask.astype(bool)
    diff = float(np.abs(jm.logits(ids, mask)[valid] - ref[valid]).max())
    assert diff <= TOL, f"{mode}: max abs diff {diff:.3g}"
