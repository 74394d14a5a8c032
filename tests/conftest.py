"""Test setup: 8 emulated CPU devices (set before jax is imported), a compilation cache shared
by the whole session (many tests compile the same programs for fresh model instances), and
the `gpu` marker."""
import os
import tempfile

_flag = "--xla_force_host_platform_device_count=8"
if _flag not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _flag).strip()

import jax  # noqa: E402  (after XLA_FLAGS)
import pytest  # noqa: E402

jax.config.update("jax_compilation_cache_dir",
                  os.environ.get("JAXFORMER_TEST_JIT_CACHE") or tempfile.mkdtemp(prefix="jf-jit-"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a GPU; skipped on CPU-only machines")


@pytest.fixture(scope="session")
def llama4(tmp_path_factory):
    """A 4-layer LLaMA with GQA (8 query / 4 kv heads) and random weights from transformers,
    and its checkpoint converted by conversion.hf: (hf model, checkpoint path)."""
    import torch
    import transformers

    from conversion.hf import convert
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
        num_attention_heads=8, num_key_value_heads=4, head_dim=8, max_position_embeddings=64,
        tie_word_embeddings=False, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    d = tmp_path_factory.mktemp("llama4")
    hf.save_pretrained(d / "hf")
    convert(d / "hf", d / "ckpt")
    return hf, d / "ckpt"
