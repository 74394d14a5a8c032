"""ModelConfig: presets, validation errors naming the field, Hugging Face config mapping."""
import dataclasses

import pytest

from jaxformer.config import CONFIG_DIR, ModelConfig, RunConfig, list_presets
from jaxformer.models import num_params

PRESETS = sorted(p.stem for p in (CONFIG_DIR / "models").glob("*.yaml"))
REQUIRED = ["gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl", "megatron-gpt-345m", "gpt3-1.3b",
            "gpt3-2.7b", "gpt3-6.7b", "gpt3-13b", "gpt3-20b", "gpt3-175b", "llama-7b",
            "llama-13b", "llama-70b", "bert-base", "bert-large", "megatron-bert-345m", "demo"]


def test_required_presets_exist():
    assert set(REQUIRED) <= set(list_presets()), set(REQUIRED) - set(list_presets())


@pytest.mark.parametrize("name", PRESETS)
def test_preset_loads_by_name(name, tmp_path):
    cfg = ModelConfig.from_preset(name)
    assert cfg.name == name
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    cfg.save_json(tmp_path / "c.json")
    assert ModelConfig.load_json(tmp_path / "c.json") == cfg
    assert cfg.padded_vocab_size % 128 == 0 and cfg.padded_vocab_size >= cfg.vocab_size


@pytest.mark.parametrize("name,expected", [
    ("gpt2", 124.44e6), ("gpt2-medium", 354.8e6), ("gpt2-large", 774.0e6),
    ("gpt2-xl", 1557.6e6), ("gpt3-175b", 175e9), ("gpt3-6.7b", 6.7e9), ("gpt3-1.3b", 1.3e9),
    ("llama-7b", 6.74e9), ("llama-13b", 13.02e9), ("llama-70b", 68.98e9),
    ("bert-base", 110e6), ("bert-large", 340e6)])
def test_num_params(name, expected):
    n = num_params(ModelConfig.from_preset(name))
    assert abs(n - expected) / expected < 0.02, (name, n)


def test_demo_preset_is_small_llama_style():
    c = ModelConfig.from_preset("demo")
    assert (c.vocab_size, c.position_embedding, c.norm, c.gated_mlp) == \
        (259, "rope", "rmsnorm", True)
    assert c.kv_heads < c.num_heads
    assert (c.eos_token_id, c.bos_token_id, c.pad_token_id) == (256, 257, 258)


def test_llama_70b_is_gqa():
    c = ModelConfig.from_preset("llama-70b")
    assert (c.num_heads, c.kv_heads, c.mlp_size, c.vocab_size) == (64, 8, 28672, 32000)


BASE = dict(vocab_size=100, hidden_size=64, num_layers=2, num_heads=4)


@pytest.mark.parametrize("changes,field", [
    (dict(num_heads=5), "num_heads"),
    (dict(num_kv_heads=3), "num_kv_heads"),
    (dict(activation="tanh"), "activation"),
    (dict(norm="batchnorm"), "norm"),
    (dict(norm_position="middle"), "norm_position"),
    (dict(arch="seq2seq"), "arch"),
    (dict(position_embedding="sinusoidal"), "position_embedding"),
    # model-family variants: each unsupported combination names its field
    (dict(rope_scaling="ntk"), "rope_scaling"),
    (dict(rope_scaling="linear", rope_factor=2.0), "rope_scaling"),  # not a rope model
    (dict(position_embedding="rope", rope_scaling="yarn", rope_factor=4.0),
     "rope_original_max_positions"),
    (dict(position_embedding="rope", rope_scaling="linear", rope_factor=0.5), "rope_factor"),
    (dict(position_embedding="rope", rope_scaling="longrope", rope_original_max_positions=16,
          rope_long_factor=(1.0,), rope_short_factor=(1.0,)), "rope_long_factor"),
    (dict(position_embedding="rope", rope_scaling="llama3", rope_original_max_positions=16,
          rope_low_freq_factor=4.0, rope_high_freq_factor=1.0), "rope_low_freq_factor"),
    (dict(sliding_window=0), "sliding_window"),
    (dict(arch="encoder", sliding_window=4), "sliding_window"),
    (dict(layer_types=("full",)), "layer_types"),
    (dict(layer_types=("sliding", "full")), "layer_types"),  # no sliding_window
    (dict(rope_local_theta=10.0), "rope_local_theta"),
    (dict(attn_softcap=0.0), "attn_softcap"),
    (dict(final_softcap=-1.0), "final_softcap"),
    (dict(parallel_residual=True, sandwich_norm=True), "parallel_residual"),
    (dict(parallel_norms=1), "parallel_norms"),
    (dict(parallel_norms=3, parallel_residual=True), "parallel_norms"),
    (dict(norm_position="post", sandwich_norm=True), "sandwich_norm"),
    (dict(position_embedding="rope", position_offset=2), "position_offset"),
    (dict(lm_head_bias=True), "lm_head_bias"),
    (dict(arch="encoder", position_embedding="alibi"), "position_embedding"),
    (dict(hidden_size=0), "hidden_size"),
    (dict(num_layers=-1), "num_layers"),
    (dict(vocab_size=2.5), "vocab_size"),
    (dict(ffn_size=0), "ffn_size"),
    (dict(norm_eps=0.0), "norm_eps"),
    (dict(position_embedding="rope", head_dim=7), "rope_fraction"),
    (dict(rope_fraction=1.5), "rope_fraction"),
    (dict(type_vocab_size=-1), "type_vocab_size"),
    (dict(pooler=True), "arch"),
    (dict(arch="encoder", binary_head=True), "binary_head"),
    (dict(eos_token_id=100), "eos_token_id"),
    (dict(norm_position="post", residual_from_norm=True), "residual_from_norm"),
])
def test_invalid_config_names_field(changes, field):
    with pytest.raises(ValueError, match=rf"\b{field}\b"):
        ModelConfig(**{**BASE, **changes})


def test_unknown_field_and_preset():
    with pytest.raises(ValueError, match="hidden_sise"):
        ModelConfig.from_dict({**BASE, "hidden_sise": 3})
    with pytest.raises(ValueError, match="no-such-model"):
        ModelConfig.from_preset("no-such-model")


def test_config_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        ModelConfig(**BASE).hidden_size = 3


# ---- Hugging Face configs ---------------------------------------------------------------------
transformers = pytest.importorskip("transformers")


def _hf_num_params(model) -> int:
    return sum(p.numel() for p in model.parameters())  # tied weights counted once


def _check_hf(hf_cfg, model_cls, **replace):
    """from_hf_config: object and dict agree, and the parameter count equals the HF model's
    plus the zero rows of vocabulary padding."""
    import torch
    cfg = ModelConfig.from_hf_config(hf_cfg)
    assert ModelConfig.from_hf_config(hf_cfg.to_dict()) == cfg
    cfg = cfg.replace(**replace)
    torch.manual_seed(0)
    hf_model = model_cls(hf_cfg)
    pad = cfg.padded_vocab_size - cfg.vocab_size
    per_row = cfg.hidden_size * (1 if cfg.tie_embeddings else 2) + (1 if cfg.mlm_head else 0)
    assert num_params(cfg) == _hf_num_params(hf_model) + pad * per_row
    return cfg


def test_from_hf_gpt2():
    hf = transformers.GPT2Config(n_embd=64, n_layer=3, n_head=4, vocab_size=300, n_positions=96,
                                 layer_norm_epsilon=1e-6, bos_token_id=1, eos_token_id=2)
    cfg = _check_hf(hf, transformers.GPT2LMHeadModel)
    assert (cfg.arch, cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.mlp_size) == \
        ("decoder", 64, 3, 4, 256)
    assert (cfg.activation, cfg.norm, cfg.norm_eps, cfg.position_embedding) == \
        ("gelu_tanh", "layernorm", 1e-6, "learned")
    assert cfg.max_position_embeddings == 96 and cfg.tie_embeddings and cfg.qkv_bias
    assert (cfg.bos_token_id, cfg.eos_token_id) == (1, 2)
    # the full-size defaults are the gpt2 preset
    assert ModelConfig.from_hf_config(transformers.GPT2Config()).replace(name="gpt2") == \
        ModelConfig.from_preset("gpt2")


def test_from_hf_llama_gqa():
    hf = transformers.LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                  num_attention_heads=8, num_key_value_heads=2, head_dim=16,
                                  vocab_size=250, max_position_embeddings=128,
                                  rms_norm_eps=1e-5, rope_theta=500000.0)
    cfg = _check_hf(hf, transformers.LlamaForCausalLM)
    assert (cfg.num_heads, cfg.kv_heads, cfg.dims_per_head, cfg.mlp_size) == (8, 2, 16, 96)
    assert (cfg.position_embedding, cfg.norm, cfg.activation, cfg.gated_mlp) == \
        ("rope", "rmsnorm", "silu", True)
    assert cfg.rope_theta == 500000.0 and cfg.norm_eps == 1e-5
    assert not (cfg.qkv_bias or cfg.linear_bias or cfg.tie_embeddings)
    full = transformers.LlamaConfig(max_position_embeddings=4096, rms_norm_eps=1e-5)
    assert ModelConfig.from_hf_config(full).replace(name="llama-7b") == \
        ModelConfig.from_preset("llama-7b")


def test_from_hf_llama_biases_and_tying():
    hf = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                  num_attention_heads=4, vocab_size=100, attention_bias=True,
                                  tie_word_embeddings=True)
    cfg = ModelConfig.from_hf_config(hf)
    assert cfg.qkv_bias and cfg.linear_bias and cfg.tie_embeddings
    qwen = ModelConfig.from_hf_config(transformers.Qwen2Config(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=100))
    assert qwen.qkv_bias and not qwen.linear_bias and qwen.kv_heads == 2
    mistral = ModelConfig.from_hf_config(transformers.MistralConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=100, sliding_window=256))
    assert mistral.sliding_window == 256 and mistral.layer_types is None  # every layer


def test_from_hf_bert():
    hf = transformers.BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                 intermediate_size=128, vocab_size=300, max_position_embeddings=64,
                                 type_vocab_size=3)
    cfg = _check_hf(hf, transformers.BertForPreTraining)
    assert (cfg.arch, cfg.norm_position, cfg.embed_norm, cfg.final_norm) == \
        ("encoder", "post", True, False)
    assert (cfg.type_vocab_size, cfg.norm_eps, cfg.activation) == (3, 1e-12, "gelu")
    assert cfg.pooler and cfg.mlm_head and cfg.binary_head and cfg.pad_token_id == 0
    assert ModelConfig.from_hf_config(transformers.BertConfig()).replace(name="bert-base") == \
        ModelConfig.from_preset("bert-base")


def test_from_hf_megatron_bert():
    hf = transformers.MegatronBertConfig(hidden_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, intermediate_size=128,
                                         vocab_size=300, max_position_embeddings=64)
    cfg = _check_hf(hf, transformers.MegatronBertForPreTraining)
    assert (cfg.norm_position, cfg.embed_norm, cfg.final_norm) == ("pre", False, True)


@pytest.mark.parametrize("hf,match", [
    ({"model_type": "t5"}, "t5"),
    (dict(transformers.LlamaConfig().to_dict(), rope_parameters={"rope_type": "proportional",
                                                                  "rope_theta": 1e4}), "rope"),
    (dict(transformers.FalconConfig(alibi=True).to_dict()), "alibi"),
    (dict(transformers.OPTConfig(word_embed_proj_dim=16).to_dict()), "word_embed_proj_dim"),
    (dict(transformers.GPT2Config(scale_attn_by_inverse_layer_idx=True).to_dict()),
     "scale_attn_by_inverse_layer_idx"),
    (dict(transformers.GPT2Config(activation_function="tanh").to_dict()), "tanh"),
    (dict(transformers.BertConfig().to_dict(), position_embedding_type="relative_key"),
     "position_embedding_type"),
])
def test_from_hf_refuses(hf, match):
    with pytest.raises(ValueError, match=match):
        ModelConfig.from_hf_config(hf)


def test_layer_loop_resolves_by_platform():
    """One rule for load (engine.resolve_layer_loop, by the mesh's devices) and the memory
    plan (by jax's default backend): auto unrolls on GPUs only; explicit values stay."""
    assert RunConfig.layer_loop_on("auto", "gpu") == "unroll"
    assert RunConfig.layer_loop_on("auto", "cpu") == "scan"
    assert RunConfig.layer_loop_on("scan", "gpu") == "scan"
    assert RunConfig.layer_loop_on("unroll", "cpu") == "unroll"
