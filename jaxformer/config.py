"""Model and run configuration: one frozen dataclass per concern.

`ModelConfig` says what the network is (shapes, numerics) and nothing about how it runs.
`RunConfig` says how it runs (mesh sizes, sharding rules, dtype, kernel backend).

Shape legend used across the package: B batch, T length, S cache length, D embed,
N query heads, K kv heads, G = N // K query heads per kv head, H head dim, F mlp,
V vocabulary (padded), L layers.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Any, Literal, Mapping

import yaml

from jaxformer.quant import spec as quant_spec

ARCHS = ("decoder", "encoder")
POSITION_EMBEDDINGS = ("learned", "rope", "alibi", "none")
ROPE_SCALINGS = ("none", "linear", "dynamic", "yarn", "llama3", "longrope")
LAYER_TYPES = ("full", "sliding")
NORMS = ("layernorm", "rmsnorm")
NORM_POSITIONS = ("pre", "post")
ACTIVATIONS = ("gelu", "gelu_tanh", "relu", "squared_relu", "silu")
DTYPES = ("float32", "bfloat16", "float16")

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """What the network is. Validated on construction; errors name the field at fault.

    Covers GPT-2, Megatron GPT-3 (learned positions, LayerNorm, GeLU tanh/erf, tied or untied
    head, biases), LLaMA-style decoders (RoPE, RMSNorm, SwiGLU, GQA, no biases) and BERT
    (token types, post-LN, pooler, MLM head, binary head), and the variants of the families
    in docs/models.md (rope scalings, sliding windows, QK-norm, soft-capping, sandwich norms,
    parallel residuals, ALiBi, offset positions); each variant is a field below, and
    combinations jaxformer does not implement are refused naming the field.
    """

    vocab_size: int  # true vocabulary; logits are returned for exactly these ids
    hidden_size: int  # D
    num_layers: int  # L
    num_heads: int  # N
    arch: Literal["decoder", "encoder"] = "decoder"
    num_kv_heads: int | None = None  # K; None means K = N (multi-head attention)
    head_dim: int | None = None  # H; None means D // N
    ffn_size: int | None = None  # F; None means 4 * D
    max_position_embeddings: int = 2048
    position_embedding: Literal["learned", "rope", "none"] = "learned"
    rope_theta: float = 10000.0
    rope_fraction: float = 1.0  # Megatron's rotary_percent: share of H that rotates
    rope_interleaved: bool = False  # pairs (0,1),(2,3).. instead of halves (GPT-J vs NeoX style)
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"
    norm_eps: float = 1e-5
    norm_position: Literal["pre", "post"] = "pre"  # post: BERT's LN after each residual add
    residual_from_norm: bool = False  # Megatron apply_residual_connection_post_layernorm
    activation: Literal["gelu", "gelu_tanh", "relu", "squared_relu", "silu"] = "gelu"
    gated_mlp: bool = False  # GLU: act(x W_gate) * (x W_up); with silu this is SwiGLU
    qkv_bias: bool = True
    linear_bias: bool = True  # attention output and MLP biases
    tie_embeddings: bool = True
    type_vocab_size: int = 0  # BERT token types; 0 disables the table
    embed_norm: bool = False  # BERT (HF) normalises the embedding sum
    final_norm: bool = True  # norm after the last block (pre-LN models)
    pooler: bool = False  # BERT pooler: tanh(dense(x[:, 0]))
    mlm_head: bool = False  # BERT LM head: dense -> act -> norm -> tied decoder + bias
    binary_head: bool = False  # BERT next-sentence head on the pooled output
    mlm_activation: str | None = None  # the LM head's activation; None: same as `activation`
    attn_scale: float | None = None  # None means 1 / sqrt(H)
    vocab_pad_multiple: int = 128  # embedding rows are padded so `vocab` shards evenly
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None
    # ---- rope scaling (transformers' rope_type; layers/rope.py gives the formulas) ----
    rope_scaling: str = "none"  # none | linear | dynamic | yarn | llama3 | longrope
    rope_factor: float = 1.0
    rope_original_max_positions: int | None = None  # the pre-training context
    rope_low_freq_factor: float = 1.0  # llama3
    rope_high_freq_factor: float = 4.0  # llama3
    rope_beta_fast: float = 32.0  # yarn
    rope_beta_slow: float = 1.0  # yarn
    rope_truncate: bool = True  # yarn: integer correction range
    rope_attention_factor: float | None = None  # yarn / longrope cos-sin scale; None: derived
    rope_long_factor: tuple[float, ...] | None = None  # longrope, rotary_dim / 2 each
    rope_short_factor: tuple[float, ...] | None = None
    rope_local_theta: float | None = None  # Gemma 3: plain rope of this theta on sliding layers
    # ---- attention variants ----
    sliding_window: int | None = None  # W: a query sees its last W keys (itself included)
    layer_types: tuple[str, ...] | None = None  # per layer "full" | "sliding"; None: all sliding
    qk_norm: bool = False  # `norm` over H of q and k before rope (Qwen 3, Gemma 3, Megatron)
    attn_softcap: float | None = None  # scores -> c * tanh(scores / c) (Gemma 2)
    # ---- block and head variants ----
    norm_offset: float = 0.0  # Gemma: norms scale by (offset + w)
    sandwich_norm: bool = False  # Gemma 2/3: norms on the attention and MLP outputs too
    parallel_residual: bool = False  # x + attn(n1(x)) + mlp(n2(x)) (GPT-NeoX, GPT-J, Falcon)
    parallel_norms: int = 2  # 1: one norm feeds both branches (GPT-J, Falcon-7B)
    embed_scale: float | None = None  # token embeddings times this (Gemma: sqrt(D))
    position_offset: int = 0  # learned positions read row position + offset (OPT: 2)
    lm_head_bias: bool = False  # untied LM head with a bias (GPT-J)
    final_softcap: float | None = None  # logits -> c * tanh(logits / c) (Gemma 2)
    # ---- mixture of experts (layers/moe.py): every block's MLP is E routed experts ----
    num_experts: int = 0  # E; 0: a dense MLP
    experts_per_token: int = 0  # k: experts each token is routed to (top-k)
    moe_ffn_size: int | None = None  # F of one expert; None: ffn_size
    router_norm_topk: bool = True  # renormalise the top-k probabilities to sum to 1 (Mixtral)
    shared_expert_size: int = 0  # F of an always-on shared expert (Qwen2-MoE); 0: none
    shared_expert_gate: bool = False  # shared expert output times sigmoid(x w) (Qwen2-MoE)
    name: str = ""

    def __post_init__(self):
        def fail(field, msg):
            raise ValueError(f"ModelConfig.{field}: {msg}")

        for field in ("vocab_size", "hidden_size", "num_layers", "num_heads",
                      "max_position_embeddings", "vocab_pad_multiple"):
            v = getattr(self, field)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                fail(field, f"must be a positive integer, got {v!r}")
        for field, allowed in (("arch", ARCHS), ("position_embedding", POSITION_EMBEDDINGS),
                               ("norm", NORMS), ("norm_position", NORM_POSITIONS),
                               ("activation", ACTIVATIONS)):
            if getattr(self, field) not in allowed:
                fail(field, f"must be one of {allowed}, got {getattr(self, field)!r}")
        for field in ("num_kv_heads", "head_dim", "ffn_size"):
            v = getattr(self, field)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v <= 0):
                fail(field, f"must be a positive integer or None, got {v!r}")
        if self.head_dim is None and self.hidden_size % self.num_heads:
            fail("num_heads", f"{self.num_heads} heads do not divide hidden_size "
                 f"{self.hidden_size} (set head_dim explicitly if that is intended)")
        if self.num_heads % self.kv_heads:
            fail("num_kv_heads", f"{self.kv_heads} kv heads do not divide num_heads "
                 f"{self.num_heads}")
        if not 0.0 < self.rope_fraction <= 1.0:
            fail("rope_fraction", f"must be in (0, 1], got {self.rope_fraction}")
        if self.position_embedding == "rope":
            rot = self.rotary_dim
            if rot % 2 or rot <= 0:
                fail("rope_fraction", f"rotary dim {rot} (head_dim {self.dims_per_head} x "
                     f"{self.rope_fraction}) must be a positive even number")
        self._check_variants(fail)
        self._check_moe(fail)
        if not self.norm_eps > 0:
            fail("norm_eps", f"must be positive, got {self.norm_eps}")
        if self.type_vocab_size < 0:
            fail("type_vocab_size", f"must be >= 0, got {self.type_vocab_size}")
        if self.arch == "decoder" and (self.pooler or self.mlm_head or self.binary_head):
            fail("arch", "pooler / mlm_head / binary_head belong to encoder models")
        if self.mlm_activation is not None and self.mlm_activation not in ACTIVATIONS:
            fail("mlm_activation", f"must be None or one of {ACTIVATIONS}, got "
                 f"{self.mlm_activation!r}")
        if self.binary_head and not self.pooler:
            fail("binary_head", "needs pooler=True (it reads the pooled output)")
        if self.norm_position == "post" and self.residual_from_norm:
            fail("residual_from_norm", "only meaningful with norm_position='pre'")
        for field in ("bos_token_id", "eos_token_id", "pad_token_id"):
            v = getattr(self, field)
            if v is not None and not 0 <= v < self.vocab_size:
                fail(field, f"{v} is outside the vocabulary [0, {self.vocab_size})")

    def _check_variants(self, fail):
        for field in ("rope_long_factor", "rope_short_factor", "layer_types"):
            v = getattr(self, field)
            if isinstance(v, list):  # from JSON
                object.__setattr__(self, field, tuple(v))
        if self.rope_scaling not in ROPE_SCALINGS:
            fail("rope_scaling", f"must be one of {ROPE_SCALINGS}, got {self.rope_scaling!r}")
        if self.rope_scaling != "none":
            if self.position_embedding != "rope":
                fail("rope_scaling", f"needs position_embedding='rope', got "
                     f"{self.position_embedding!r}")
            if self.rope_scaling != "longrope" and not self.rope_factor >= 1.0:
                fail("rope_factor", f"must be >= 1, got {self.rope_factor}")
            if self.rope_scaling in ("dynamic", "yarn", "llama3", "longrope") and \
                    not self.rope_original_max_positions:
                fail("rope_original_max_positions", f"rope_scaling={self.rope_scaling!r} "
                     f"needs the pre-training context length")
        if self.rope_scaling == "llama3" and \
                not 0 < self.rope_low_freq_factor < self.rope_high_freq_factor:
            fail("rope_low_freq_factor", "llama3 needs 0 < low_freq_factor < high_freq_factor")
        if self.rope_scaling == "longrope":
            for field in ("rope_long_factor", "rope_short_factor"):
                v = getattr(self, field)
                if v is None or len(v) != self.rotary_dim // 2:
                    fail(field, f"longrope needs rotary_dim / 2 = {self.rotary_dim // 2} "
                         f"factors, got {None if v is None else len(v)}")
        elif self.rope_long_factor is not None or self.rope_short_factor is not None:
            fail("rope_long_factor", "long / short factors belong to rope_scaling='longrope'")
        if self.rope_local_theta is not None and (self.layer_types is None or
                                                  self.position_embedding != "rope"):
            fail("rope_local_theta", "needs rope and layer_types naming the sliding layers")
        if self.sliding_window is not None:
            if not isinstance(self.sliding_window, int) or self.sliding_window <= 0:
                fail("sliding_window", f"must be a positive integer or None, got "
                     f"{self.sliding_window!r}")
            if not self.causal:
                fail("sliding_window", "only decoders attend through a sliding window")
        if self.layer_types is not None:
            if len(self.layer_types) != self.num_layers or \
                    any(t not in LAYER_TYPES for t in self.layer_types):
                fail("layer_types", f"must be {self.num_layers} entries of {LAYER_TYPES}, "
                     f"got {self.layer_types!r}")
            if "sliding" in self.layer_types and self.sliding_window is None:
                fail("layer_types", "sliding layers need sliding_window")
        for field in ("attn_softcap", "final_softcap", "embed_scale"):
            v = getattr(self, field)
            if v is not None and not v > 0:
                fail(field, f"must be positive or None, got {v!r}")
        if self.parallel_residual and (self.norm_position != "pre" or self.sandwich_norm
                                       or self.residual_from_norm):
            fail("parallel_residual", "is a pre-LN block without sandwich norms or "
                 "residual_from_norm")
        if self.parallel_norms not in (1, 2):
            fail("parallel_norms", f"must be 1 or 2, got {self.parallel_norms!r}")
        if self.parallel_norms == 1 and not self.parallel_residual:
            fail("parallel_norms", "one shared norm needs parallel_residual=True")
        if self.sandwich_norm and self.norm_position != "pre":
            fail("sandwich_norm", "needs norm_position='pre'")
        if self.position_offset < 0 or (self.position_offset and
                                        self.position_embedding != "learned"):
            fail("position_offset", "is a non-negative row offset of learned positions")
        if self.lm_head_bias and self.tie_embeddings:
            fail("lm_head_bias", "needs an untied head (tie_embeddings=False)")
        if self.position_embedding == "alibi" and not self.causal:
            fail("position_embedding", "ALiBi is implemented for decoders only")

    def _check_moe(self, fail):
        for field in ("num_experts", "experts_per_token", "shared_expert_size"):
            v = getattr(self, field)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                fail(field, f"must be a non-negative integer, got {v!r}")
        if not self.num_experts:
            for field in ("experts_per_token", "moe_ffn_size", "shared_expert_size",
                          "shared_expert_gate"):
                if getattr(self, field):
                    fail(field, "belongs to a mixture of experts (set num_experts)")
            return
        if not 1 <= self.experts_per_token <= self.num_experts:
            fail("experts_per_token", f"must be in [1, num_experts={self.num_experts}], got "
                 f"{self.experts_per_token!r}")
        v = self.moe_ffn_size
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v <= 0):
            fail("moe_ffn_size", f"must be a positive integer or None, got {v!r}")
        if self.linear_bias:
            fail("linear_bias", "mixture-of-experts MLPs carry no biases (set linear_bias=False)")
        if self.arch != "decoder":
            fail("num_experts", "mixtures of experts are implemented for decoders only")
        if self.shared_expert_gate and not self.shared_expert_size:
            fail("shared_expert_gate", "needs a shared expert (shared_expert_size > 0)")

    def layer_is_sliding(self) -> tuple[bool, ...]:
        """Per layer: does it attend through the sliding window?"""
        if self.sliding_window is None:
            return (False,) * self.num_layers
        if self.layer_types is None:
            return (True,) * self.num_layers
        return tuple(t == "sliding" for t in self.layer_types)

    # ---- derived sizes -------------------------------------------------------------
    @property
    def kv_heads(self) -> int:
        """K: number of key/value heads."""
        return self.num_kv_heads or self.num_heads

    @property
    def q_per_kv(self) -> int:
        """G = N // K: query heads sharing one kv head."""
        return self.num_heads // self.kv_heads

    @property
    def dims_per_head(self) -> int:
        """H."""
        return self.head_dim or self.hidden_size // self.num_heads

    @property
    def mlp_size(self) -> int:
        """F."""
        return self.ffn_size or 4 * self.hidden_size

    @property
    def expert_mlp_size(self) -> int:
        """F of one routed expert."""
        return self.moe_ffn_size or self.mlp_size

    @property
    def rotary_dim(self) -> int:
        return int(self.dims_per_head * self.rope_fraction)

    @property
    def padded_vocab_size(self) -> int:
        """Rows of the embedding table: vocab_size rounded up to vocab_pad_multiple."""
        m = self.vocab_pad_multiple
        return math.ceil(self.vocab_size / m) * m

    @property
    def scale(self) -> float:
        return self.attn_scale if self.attn_scale is not None else self.dims_per_head ** -0.5

    @property
    def causal(self) -> bool:
        return self.arch == "decoder"

    # ---- (de)serialisation ----------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"ModelConfig: unknown field(s) {unknown}")
        return cls(**d)

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    def save_json(self, path: str | os.PathLike) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")

    @classmethod
    def load_json(cls, path: str | os.PathLike) -> "ModelConfig":
        try:
            d = json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"no model config at {path}") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from None
        return cls.from_dict(d)

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "ModelConfig":
        """A YAML preset from configs/models/ (by name, e.g. 'gpt2', or a path)."""
        path = Path(name)
        if path.suffix not in (".yaml", ".yml"):  # a name like "gpt3-1.3b" has a "suffix" too
            path = CONFIG_DIR / "models" / f"{name}.yaml"
        if not path.exists():
            raise ValueError(f"unknown model preset {name!r}; available: {list_presets()}")
        d = yaml.safe_load(path.read_text()) or {}
        d.update(overrides)
        return cls.from_dict(d)

    @classmethod
    def from_hf_config(cls, hf: Any) -> "ModelConfig":
        """From a Hugging Face config (object or dict) of GPT-2, LLaMA(-style) or BERT."""
        from jaxformer.hf_config import from_hf_config
        return from_hf_config(hf)


def list_presets() -> list[str]:
    return sorted(p.stem for p in (CONFIG_DIR / "models").glob("*.yaml"))


# RunConfig.prefill_tokens' default, also the memory plan's and `jaxformer info`'s
PREFILL_TOKENS = 16384


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """How a model runs: mesh sizes, sharding rules, dtype, attention backend, quantization.

    quantize: None (weights in `dtype`), "int8", "int4" (groups of 128), "int4-g<N>" (groups
    of N), "fp8" or "fp8-tensor"; see jaxformer.quant and docs/quantization.md.
    kv_cache: None (the cache in `dtype`), "int8" or "fp8": codes plus a float32 scale per
    token and kv head (jaxformer/cache.py), about half the bytes of a bf16 cache.
    """

    data: int = 1
    pipe: int = 1
    tensor: int = 1
    rules: str = "default"  # a table in configs/sharding/ (name) or a YAML path
    dtype: str = "float32"  # compute and weight dtype on the device
    attention: str = "auto"  # "auto" | "xla" | "pallas" | "cudnn"
    # "scan": stacked layer weights and lax.scan; "unroll": one array per layer position and
    # a Python loop (no per-layer weight copies on GPUs); "auto": unroll on GPUs, else scan.
    # See models/stack.py.
    layer_loop: str = "auto"
    quantize: str | None = None  # linear-layer weight (and FP8 activation) quantization
    kv_cache: str | None = None  # KV-cache quantization: None, "int8" or "fp8"
    # few-row int8 / fp8 products on the Mosaic GPU kernel: "off", "auto", "log", "interpret"
    # (jaxformer.quant.ops; off by default: XLA's products were faster in the model)
    quant_kernel: str = "off"
    # most prompt tokens (rows x padded prompt length) one prefill pass computes: a larger
    # batch prefills in chunks of rows (cache.prefill_rows), so its temporaries stay those
    # of this many tokens and the KV cache, not the prefill, bounds the batch
    prefill_tokens: int = PREFILL_TOKENS
    # XLA:GPU runs lax.cond and data-dependent while loops as CUDA-graph conditional nodes
    # (command buffers) instead of copying each predicate to the host and waiting for the
    # stream, so a decode loop's dispatch returns before the device finishes and the host
    # can work ahead (docs/benchmarks.md, session 15); off until measured
    graph_control_flow: bool = False

    @property
    def quant_spec(self):
        """`quantize` parsed once (a QuantSpec carrying quant_kernel), None when float."""
        spec = quant_spec.parse(self.quantize)
        return None if spec is None else spec.with_kernel(self.quant_kernel)

    @staticmethod
    def layer_loop_on(layer_loop: str, platform: str) -> str:
        """The layer loop that runs: "auto" is "unroll" on GPUs (models/stack.py),
        else "scan" (compile time flat in depth); other values pass through."""
        if layer_loop != "auto":
            return layer_loop
        return "unroll" if platform == "gpu" else "scan"

    def __post_init__(self):
        for field in ("data", "pipe", "tensor"):
            v = getattr(self, field)
            if not isinstance(v, int) or v <= 0:
                raise ValueError(f"RunConfig.{field}: must be a positive integer, got {v!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"RunConfig.dtype: must be one of {DTYPES}, got {self.dtype!r}")
        if not isinstance(self.graph_control_flow, bool):
            raise ValueError(f"RunConfig.graph_control_flow: must be True or False, got "
                             f"{self.graph_control_flow!r}")
        if self.layer_loop not in ("auto", "scan", "unroll"):
            raise ValueError(f"RunConfig.layer_loop: must be auto, scan or unroll, "
                             f"got {self.layer_loop!r}")
        if self.attention not in ("auto", "xla", "pallas", "cudnn"):
            raise ValueError(f"RunConfig.attention: must be auto, xla, pallas or cudnn, "
                             f"got {self.attention!r}")
        if self.quantize is not None:
            quant_spec.parse(self.quantize, "RunConfig.quantize")
        if self.quant_kernel not in quant_spec.KERNEL_MODES:
            raise ValueError(f"RunConfig.quant_kernel: must be one of "
                             f"{quant_spec.KERNEL_MODES}, got {self.quant_kernel!r}")
        if isinstance(self.prefill_tokens, bool) or not isinstance(self.prefill_tokens, int) \
                or self.prefill_tokens <= 0:
            raise ValueError(f"RunConfig.prefill_tokens: must be a positive integer, "
                             f"got {self.prefill_tokens!r}")
        if self.kv_cache not in (None, "int8", "fp8"):
            raise ValueError(f"RunConfig.kv_cache: must be None, 'int8' or 'fp8', "
                             f"got {self.kv_cache!r}")
