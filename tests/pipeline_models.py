"""Tiny models and prompts shared by the pipeline and multi-process tests (8 layers, so
every pipe size up to 8 divides them)."""

# GPT-2 / Megatron style: learned positions, LayerNorm, GeLU, biases, tied head.
GPT = dict(name="tiny-gpt", vocab_size=100, hidden_size=32, num_layers=8, num_heads=4,
           ffn_size=64, max_position_embeddings=64, activation="gelu_tanh", eos_token_id=99)

# LLaMA style: RoPE, RMSNorm, SwiGLU, grouped-query attention (2 kv heads), no biases.
LLAMA = dict(name="tiny-llama", vocab_size=100, hidden_size=32, num_layers=8, num_heads=4,
             num_kv_heads=2, ffn_size=64, max_position_embeddings=64, position_embedding="rope",
             norm="rmsnorm", activation="silu", gated_mlp=True, qkv_bias=False,
             linear_bias=False, tie_embeddings=False, eos_token_id=99)

# LLaMA-70B's head layout scaled down (8 kv heads shared by 16 query heads): tensor=8 leaves
# one kv head per device, as the 70B preset does on 8 GPUs.
LLAMA_GQA8 = dict(LLAMA, name="tiny-llama-gqa8", hidden_size=64, num_heads=16, num_kv_heads=8,
                  ffn_size=128)

# BERT (Hugging Face layout): post-LN, token types, pooler, MLM and binary heads.
BERT = dict(name="tiny-bert", arch="encoder", vocab_size=100, hidden_size=32, num_layers=8,
            num_heads=4, ffn_size=64, max_position_embeddings=64, norm_position="post",
            type_vocab_size=2, embed_norm=True, final_norm=False, pooler=True, mlm_head=True,
            binary_head=True, norm_eps=1e-12)

PROMPTS = [[5, 17, 42, 8, 3], [61, 2, 33, 90, 14, 7, 25, 11, 40], [70, 9, 6],
           [12, 88, 31, 45, 2, 66, 7]]
