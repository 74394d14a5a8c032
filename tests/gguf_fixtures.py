"""Tiny GGUF files written the way llama.cpp's convert_hf_to_gguf.py writes them, from tiny
random transformers models, for tests/test_gguf.py and tests/test_hub.py.

`write_gguf(path, hf_model, types)` stores each tensor in the GGML type `types(name, array)`
picks: F32 / F16 / BF16 / Q8_0 / Q4_0 / Q4_1 / Q5_0 / Q5_1 through gguf's own quantizer, and
Q4_K / Q5_K / Q6_K (which gguf cannot quantize) as random but valid blocks. A llama model's
Q and K rows are permuted as llama.cpp permutes them.
"""
from __future__ import annotations

import json

import gguf
import numpy as np
from conftest import randomize  # noqa: E402

Q = gguf.GGMLQuantizationType
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + "
          "message['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
TEXT = ("The quick brown fox jumps over the lazy dog. It's 2024, and we'll see 12345 "
        "numbers!\nNew lines,\ttabs and   spaces. Héllo wörld — naïve café. ") * 4


def tiny_bpe(vocab_size: int = 320):
    """(tokens by id, merges) of a byte-level BPE trained on TEXT; ids 0-2 are SPECIALS."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator([TEXT], trainer)
    vocab = tok.get_vocab()
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    merges = [" ".join(m) if isinstance(m, list) else m
              for m in json.loads(tok.to_str())["model"]["merges"]]
    return tokens, merges


def permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py LlamaModel.permute (rows [heads*H, ...])."""
    return (w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
_BLOCK = {
    "input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight":
    "ffn_norm.weight", "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight", "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight", "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.bias": "attn_k.bias", "self_attn.v_proj.bias": "attn_v.bias",
    "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def gguf_name(hf_name: str) -> str:
    if hf_name in _NAMES:
        return _NAMES[hf_name]
    _, _, layer, rest = hf_name.split(".", 3)  # model.layers.{i}.rest
    return f"blk.{layer}.{_BLOCK[rest]}"


# K-quant block layouts (ggml-common.h; Q2_K only for a refusal test): bytes per 256 values, and where the f16 super-block
# scales sit with the values that keep |w| ~ 0.05 with random sub-scales and codes
_K_BLOCKS = {Q.Q4_K: (144, {0: 1.5e-4, 2: 1.0e-4}), Q.Q5_K: (176, {0: 8e-5, 2: 1.0e-4}),
             Q.Q6_K: (210, {208: 1.2e-5}), Q.Q2_K: (84, {80: 1e-3, 82: 1e-3})}


def random_k_blocks(shape, qtype, rng) -> np.ndarray:
    """Valid random K-quant data for a float tensor of `shape` (last dim % 256 == 0)."""
    nbytes, scales = _K_BLOCKS[qtype]
    rows, cols = int(np.prod(shape[:-1])), shape[-1]
    blocks = rng.randint(0, 256, (rows * cols // 256, nbytes)).astype(np.uint8)
    for offset, value in scales.items():
        blocks[:, offset:offset + 2] = np.frombuffer(np.float16(value).tobytes(), np.uint8)
    return blocks.reshape(*shape[:-1], cols // 256 * nbytes)


def encode(x: np.ndarray, qtype, rng) -> np.ndarray:
    if qtype == Q.F32:
        return x.astype(np.float32)
    if qtype == Q.F16:
        return x.astype(np.float16)
    if qtype in _K_BLOCKS:
        return random_k_blocks(x.shape, qtype, rng)
    return gguf.quants.quantize(x.astype(np.float32), qtype)


def tiny_spm(vocab_size: int = 400):
    """A SentencePiece BPE model trained on TEXT as LLaMA's was (byte fallback, no
    normalisation; <unk>, <s>, </s> = 0, 1, 2):
    (processor, tokens, scores, GGUF token types)."""
    import io

    import sentencepiece as spm
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(TEXT.split(". ") * 20), model_writer=buf, model_type="bpe",
        vocab_size=vocab_size, byte_fallback=True, character_coverage=1.0, unk_id=0,
        bos_id=1, eos_id=2, minloglevel=2,
        # as LLaMA's: text is not normalised (llama.cpp and transformers do not either)
        normalization_rule_name="identity", remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True)
    sp = spm.SentencePieceProcessor(model_proto=buf.getvalue())
    n = sp.get_piece_size()
    kinds = [(sp.is_unknown, 2), (sp.is_control, 3), (sp.is_byte, 6)]  # else 1 (normal)
    types = [next((t for f, t in kinds if f(i)), 1) for i in range(n)]
    return (sp, [sp.id_to_piece(i) for i in range(n)], [sp.get_score(i) for i in range(n)],
            types)


def write_gguf(path, hf_model, types=lambda name, x: Q.F32, *, arch="llama", pre="gpt-2",
               tokens=None, merges=None, chat_template=CHATML, seed=0, extra=None,
               tokenizer_model="gpt2", scores=None, token_types=None, extra_tensors=None):
    """Write hf_model (a tiny LlamaForCausalLM / Qwen2ForCausalLM) as llama.cpp would."""
    c = hf_model.config
    N, K = c.num_attention_heads, c.num_key_value_heads
    H = getattr(c, "head_dim", None) or c.hidden_size // N
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("tiny")
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(N)
    w.add_head_count_kv(K)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"] if getattr(c, "rope_parameters", None)
                         else c.rope_theta)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_dimension_count(H)
    w.add_key_length(H)
    w.add_value_length(H)
    w.add_vocab_size(c.vocab_size)
    if tokens is None:
        tokens, merges = tiny_bpe(c.vocab_size)
    assert len(tokens) == c.vocab_size, (len(tokens), c.vocab_size)
    w.add_tokenizer_model(tokenizer_model)
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(token_types or [3 if t in SPECIALS else 1 for t in tokens])
    if merges is not None:
        w.add_token_merges(merges)
    if scores is not None:
        w.add_token_scores(scores)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(False)
    if chat_template:
        w.add_chat_template(chat_template)
    for key, value in (extra or {}).items():
        w.add_string(key, value)
    rng = np.random.RandomState(seed)
    for name, p in hf_model.state_dict().items():
        if name == "lm_head.weight" and c.tie_word_embeddings:
            continue
        x = p.detach().float().numpy()
        if arch == "llama" and ".q_proj." in name:
            x = permute(x, N)
        elif arch == "llama" and ".k_proj." in name:
            x = permute(x, K)
        gname = gguf_name(name)
        qtype = Q.F32 if x.ndim == 1 else types(gname, x)
        data = encode(x, qtype, rng)
        w.add_tensor(gname, data, raw_dtype=None if qtype in (Q.F32, Q.F16) else qtype)
    for name, x in (extra_tensors or {}).items():
        w.add_tensor(name, x)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def tiny_llama(vocab=320, D=256, F=512, N=4, K=2, L=2, tie=False, qwen2=False, seed=0):
    """A random LlamaForCausalLM (or Qwen2ForCausalLM) whose row lengths are multiples of
    256, so every GGML type (K-quants: 256-value blocks) can store every matrix."""
    import torch
    import transformers
    torch.manual_seed(seed)
    kw = dict(vocab_size=vocab, hidden_size=D, intermediate_size=F, num_hidden_layers=L,
              num_attention_heads=N, num_key_value_heads=K, max_position_embeddings=128,
              tie_word_embeddings=tie, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2,
              pad_token_id=None)
    if qwen2:
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**kw))
    else:
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(head_dim=D // N, **kw))
    return randomize(model, seed)
