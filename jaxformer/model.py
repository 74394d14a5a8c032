"""The public Model: weights sharded on a mesh, plus the compiled entry points.

    mesh = jf.make_mesh(data=1, pipe=1, tensor=4)
    model = jf.load("ckpt/gpt2", mesh=mesh, dtype="bfloat16")
    logits = model.logits(ids)                       # float32 numpy [B, T, V]
    out = model.generate(["Hello"], max_new_tokens=16)

Inputs are right-padded: an attention_mask row is ones then zeros.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxformer import checkpoint as ckpt
from jaxformer import hub, kv_replicate
from jaxformer import memory
from jaxformer import progress as pg
from jaxformer import sharding as shd
from jaxformer.cache import bucket
from jaxformer.compilation import Compiled
from jaxformer.config import ModelConfig, RunConfig
from jaxformer.distributed import check_mesh
from jaxformer.embed import embed as _embed
from jaxformer.generate import GenerateOutput, generate
from jaxformer.models import LayerStack, abstract_model, abstract_params, build, param_axes
from jaxformer.params_jit import PackPlan, ParamsJit, pack, pack_plan
from jaxformer.quant import calibrate
from jaxformer.quant import params as qp
from jaxformer.quant.spec import name, parse
from jaxformer.sampling import Sampling
from jaxformer.sharding import to_global, to_host
from jaxformer.tokenizer import ByteTokenizer, load_tokenizer

log = logging.getLogger(__name__)

def default_mesh() -> Mesh:
    return shd.make_mesh(1, 1, 1, devices=jax.devices()[:1])


def param_shardings(cfg: ModelConfig, mesh: Mesh, rules, quantize: str | None = None,
                    stages: int | None = None) -> dict:
    """Shardings of the params tree (quantized as `quantize` says, in the layer layout
    `stages` names: models.param_axes)."""
    return shd.tree_shardings(mesh, param_axes(cfg, quantize, stages), rules)


class Model:
    """A model whose weights live on `mesh`. Create with `load()` or `Model.random()`."""

    def __init__(self, config: ModelConfig, params: dict, mesh: Mesh, run: RunConfig,
                 rules: dict, tokenizer=None):
        self.config = config
        self.mesh = mesh
        self.run = run
        self.rules = rules
        self.tokenizer = tokenizer
        self.sentence = None  # a sentence-embedding model's SentenceConfig (load sets it)
        if run.layer_loop == "auto":
            run = dataclasses.replace(run, layer_loop=resolve_layer_loop(mesh, "auto"))
            self.run = run
        # the layer layout (models/stack.py): stacked, or unrolled for `pipe` stages
        self.stack = LayerStack.for_run(config, run.layer_loop, run.pipe)
        self.stages = self.stack.stages
        if self.stack.unrolled:
            params = self.stack.from_checkpoint(params, param_shardings(
                config, mesh, rules, run.quantize, self.stages))
        graphdef, abstract_state = abstract_model(config, self.stages, run.quant_spec)
        self.graphdef = graphdef
        state = jax.tree.map(lambda x: x, abstract_state)  # a copy to fill in
        nnx.replace_by_pure_dict(state, params)
        self.params = state
        # params as a flat tuple, built on first use (param_leaves); shared with with_run's
        # copies, which share the params
        self._params_cache: dict = {}
        self.compiled = Compiled()

    # ---- construction -------------------------------------------------------------------
    @classmethod
    def random(cls, config: ModelConfig, mesh: Mesh | None = None, *, dtype="float32",
               seed: int = 0, rules="default", attention="auto", tokenizer=None,
               quantize: str | None = None, calibration=None,
               layer_loop: str = "auto", kv_cache: str | None = None,
               quant_kernel: str = "off") -> "Model":
        """Seeded random (untrained) weights, initialised directly in their shardings.

        quantize (RunConfig.quantize): the float weights (in `dtype`) are then quantized on
        the devices, one stacked weight at a time; "fp8" also calibrates activation scales
        on `calibration` prompts (see `calibrate`). layer_loop, kv_cache: as `load`'s.
        """
        mesh = mesh or default_mesh()
        run, rules = _run_config(mesh, dtype, rules, attention, quantize, layer_loop,
                                 kv_cache, quant_kernel)
        shd.check_divisible(config, mesh, rules)
        qp.check_mesh(config, run.quantize, mesh, rules)
        memory.check_fits(config, mesh, run.dtype, rules if run.rules == "<custom>" else
                          run.rules, attention=attention)
        shardings = param_shardings(config, mesh, rules)

        @functools.partial(jax.jit, out_shardings=shardings,
                           compiler_options=_init_compiler_options(mesh))
        def init():
            _, state = nnx.split(build(config, seed))
            return jax.tree.map(lambda a: a.astype(run.dtype), nnx.to_pure_dict(state))

        params = init()
        if run.quantize is not None:
            params = qp.quantize_params(params, config, run.quantize, mesh, rules)
        model = cls(config, params, mesh, run, rules, tokenizer)
        if _needs_calibration(run.quantize, calibration, stored=False):
            model.calibrate(calibration)
        return model

    def with_run(self, **changes) -> "Model":
        """The same weights under a RunConfig with `changes` (attention,
        kv_cache, prefill_tokens: what does not change the weights or their layout), e.g.
        `model.with_run(prefill_tokens=4096)`; compiled functions are not shared."""
        fixed = {"data", "pipe", "tensor", "rules", "dtype", "quantize", "layer_loop"}
        if fixed & set(changes):
            raise ValueError(f"with_run cannot change {sorted(fixed & set(changes))}: they "
                             f"change the weights or their layout; load the model again")
        model = object.__new__(Model)
        model.__dict__.update(self.__dict__)
        model.run = dataclasses.replace(self.run, **changes)
        model.compiled = Compiled()
        return model

    # ---- helpers ------------------------------------------------------------------------
    def _batch_sharding(self, batch: int, ndim: int) -> NamedSharding:
        spec = shd.logical_to_spec(("batch",) + (None,) * (ndim - 1), self.rules)
        if batch % shd.mesh_size(self.mesh, spec[0]):
            spec = P()  # a batch the data axis does not divide is replicated
        return NamedSharding(self.mesh, spec)

    def check_ids(self, ids: np.ndarray, what: str = "token ids") -> np.ndarray:
        ids = np.asarray(ids)
        if ids.ndim != 2:
            raise ValueError(f"{what} must be a 2-D [batch, length] array, got shape {ids.shape}")
        if ids.size and (ids.min() < 0 or ids.max() >= self.config.vocab_size):
            bad = int(ids.max() if ids.max() >= self.config.vocab_size else ids.min())
            raise ValueError(f"{what}: id {bad} is outside the vocabulary "
                             f"[0, {self.config.vocab_size})")
        if ids.shape[1] > self.config.max_position_embeddings:
            raise ValueError(f"{what}: length {ids.shape[1]} exceeds the model's maximum of "
                             f"{self.config.max_position_embeddings} positions")
        return ids.astype(np.int32)

    def _lengths(self, ids: np.ndarray, attention_mask) -> np.ndarray:
        B, T = ids.shape
        if attention_mask is None:
            return np.full((B,), T, np.int32)
        m = np.asarray(attention_mask).astype(bool)
        if m.shape != ids.shape:
            raise ValueError(f"attention_mask shape {m.shape} != ids shape {ids.shape}")
        lengths = m.sum(1).astype(np.int32)
        if not (m == (np.arange(T)[None] < lengths[:, None])).all():
            raise ValueError("attention_mask must be right-padded (ones, then zeros) in each row")
        return lengths

    def _padded(self, ids, attention_mask, token_type_ids=None):
        """Pad to a length bucket; returns device arrays (ids, lengths, types) and T."""
        ids = self.check_ids(ids)
        lengths = self._lengths(ids, attention_mask)
        B, T = ids.shape
        Tb = bucket(T, self.config.max_position_embeddings)
        pad = lambda a: np.pad(a, ((0, 0), (0, Tb - T)))  # noqa: E731
        s2, s1 = self._batch_sharding(B, 2), self._batch_sharding(B, 1)
        types = None if token_type_ids is None else to_global(pad(np.asarray(token_type_ids,
                                                                            np.int32)), s2)
        return to_global(pad(ids), s2), to_global(lengths, s1), types, T

    def param_leaves(self) -> tuple:
        """self.params as a flat tuple of arrays, built once (params_changed() drops it)."""
        if "leaves" not in self._params_cache:
            self._params_cache["leaves"] = tuple(jax.tree.leaves(self.params))
        return self._params_cache["leaves"]

    def pack_plan(self) -> PackPlan:
        """Which of param_leaves travel packed (params_jit.pack_plan), built once."""
        if "plan" not in self._params_cache:
            self._params_cache["plan"] = pack_plan(self.param_leaves())
        return self._params_cache["plan"]

    def packed_params(self) -> tuple:
        """param_leaves split by pack_plan: (big arrays, packed buffers), built once and
        shared by every packing entry point (params_changed() drops them)."""
        if "packed" not in self._params_cache:
            self._params_cache["packed"] = pack(self.param_leaves(), self.pack_plan())
        return self._params_cache["packed"]

    def params_changed(self) -> None:
        """Call after changing self.params in place (calibration does)."""
        self._params_cache.clear()

    def jit(self, fn, *, pack_small: bool = False, **jit_kwargs) -> ParamsJit:
        """jax.jit for a compiled entry point fn(params, *args) of this model; pack_small
        for entry points called once per request (params_jit's docstring). Only the
        unrolled layer layout packs: the stacked one has a few arrays in all, and its scan
        would copy the unpacked slices into temporaries."""
        return ParamsJit(self, fn, pack_small=pack_small and self.stack.unrolled,
                         **jit_kwargs)

    def _fn(self, name: str):
        """Compiled entry points, built once per model."""
        return self.compiled.get((name,), lambda: _ENTRY_POINTS[name](self))

    # ---- public API ---------------------------------------------------------------------
    def logits(self, ids, attention_mask=None, token_type_ids=None) -> np.ndarray:
        """Full-sequence forward. ids [B, T] -> float32 numpy logits [B, T, vocab_size].

        Decoders: causal LM logits. Encoders: masked-LM logits (token_type_ids [B, T] are
        used when given). Positions past a row's attention_mask length are padding and hold
        unspecified values.
        """
        if token_type_ids is not None and self.config.arch != "encoder":
            raise ValueError("token_type_ids are for encoder models")
        ids_d, lengths, types, T = self._padded(ids, attention_mask, token_type_ids)
        out = self._fn("logits")(self.params, ids_d, lengths, types)
        return to_host(out)[:, :T, : self.config.vocab_size]

    def encode(self, ids, attention_mask=None, token_type_ids=None):
        """Encoder forward. ids [B, T] -> (hidden [B, T, D], pooled [B, D] or None), float32."""
        if self.config.arch != "encoder":
            raise ValueError(f"encode() needs an encoder model; {self.config.name or 'this'} "
                             f"is a {self.config.arch}")
        ids_d, lengths, types, T = self._padded(ids, attention_mask, token_type_ids)
        hidden, pooled = self._fn("encode")(self.params, ids_d, lengths, types)
        return to_host(hidden)[:, :T], None if pooled is None else to_host(pooled)

    def embed(self, texts_or_ids, pooling: str | None = None, normalize: bool | None = None,
              *, packed: bool = False, batch_size: int = 128) -> np.ndarray:
        """Sentence embeddings of an encoder: float32 numpy [B, D], one row per text.

        texts_or_ids: a string, a list of strings (tokenized with [CLS] / [SEP] and cut to
        the sentence config's max_length) or of token-id lists (used as given).
        pooling: "mean", "cls" or "pooler" (BERT's pooler head); normalize: unit L2 norm;
        None for either: the checkpoint's sentence.json (from sentence-transformers'
        modules), else mean and no normalisation. packed: texts back to back in rows with
        block-diagonal attention (no padding FLOPs; jaxformer.embed). Thread-safe; at most
        batch_size texts per compiled call, shapes bucketed.
        """
        return _embed(self, texts_or_ids, pooling, normalize, packed=packed,
                      batch_size=batch_size)

    def generate(self, prompts, max_new_tokens: int = 32, sampling=None, seed: int = 0,
                 *, progress: bool | None = None, **kwargs):
        """Generate from prompts (strings or lists of token ids); see jaxformer.generate.

        progress: a tqdm bar over new tokens for long generations (None: when the
        `jaxformer` logger is enabled for INFO; see jaxformer.progress).
        """
        if pg.enabled(progress) and max_new_tokens >= pg.MIN_GENERATE_TOKENS \
                and not kwargs.get("stream") and not _beams(sampling):
            return _generate_with_bar(self, prompts, max_new_tokens, sampling, seed, progress,
                                      **kwargs)
        return generate(self, prompts, max_new_tokens=max_new_tokens, sampling=sampling,
                        seed=seed, **kwargs)

    def save(self, path, *, overwrite=False) -> None:
        """Write a checkpoint (docs/checkpoint_format.md): always the stacked layout, one
        array on the host at a time; a quantized model writes its quantized weights and
        scales, which `load` restores directly."""
        ckpt.save(path, nnx.to_pure_dict(self.params), self.config, self.tokenizer,
                  overwrite=overwrite, quantize=self.run.quantize, sentence=self.sentence)

    def calibrate(self, prompts=None) -> dict:
        """Measure the static FP8 activation scales (quantize="fp8" / "fp8-tensor") on
        `prompts` (strings, or token-id lists; None: jaxformer.quant.calibrate's default
        prompts, or seeded random ids for a model without a tokenizer) and store them.

        Returns {linear layer name: max |input| per layer [L]} (float32 numpy).
        """
        return calibrate.calibrate(self, prompts)

    def traced(self):
        """Context for tracing model code (inside jit): the rules table shard() applies.
        The mesh is jax's context mesh: self.jit's functions run under
        jax.set_mesh(self.mesh), so the trace's abstract mesh is this model's."""
        return shd.use_rules(self.rules)

    def module(self, params):
        return nnx.merge(self.graphdef, params)


def resolve_layer_loop(mesh: Mesh, layer_loop: str) -> str:
    """RunConfig.layer_loop_on for the platform of the mesh's devices."""
    return RunConfig.layer_loop_on(layer_loop, list(mesh.devices.flat)[0].platform)


def _run_config(mesh: Mesh, dtype, rules, attention, quantize=None, layer_loop="auto",
                kv_cache=None, quant_kernel="off") -> tuple[RunConfig, dict]:
    if jax.process_count() > 1:  # [distributed] all processes must build the same mesh
        check_mesh(mesh)
    dtype = jnp.dtype(dtype).name
    layer_loop = resolve_layer_loop(mesh, layer_loop)  # so the RunConfig says what runs
    run = RunConfig(data=mesh.shape["data"], pipe=mesh.shape["pipe"],
                    tensor=mesh.shape["tensor"], dtype=dtype, attention=attention,
                    rules=rules if isinstance(rules, str) else "<custom>",
                    quantize=name(quantize), layer_loop=layer_loop, kv_cache=kv_cache,
                    quant_kernel=quant_kernel)
    return run, shd.load_rules(rules)


# ---- compiled entry points --------------------------------------------------------------
def _logits_fn(model: Model):
    backend = model.run.attention

    @functools.partial(model.jit, pack_small=True)
    def fn(params, ids, lengths, types=None):
        with model.traced():
            m = model.module(params)
            B, T = ids.shape
            positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
            if model.config.arch == "encoder":
                hidden, _ = m(ids, lengths, types, backend=backend)
                return m.mlm_logits(hidden)
            logits, _ = m(ids, positions, lengths, backend=backend)
            return logits

    return fn


def _encode_fn(model: Model):
    backend = model.run.attention

    @functools.partial(model.jit, pack_small=True)
    def fn(params, ids, lengths, types):
        with model.traced():
            hidden, pooled = model.module(params)(ids, lengths, types, backend=backend)
            f32 = lambda a: None if a is None else a.astype(jnp.float32)  # noqa: E731
            return f32(hidden), f32(pooled)

    return fn


_ENTRY_POINTS = {"logits": _logits_fn, "encode": _encode_fn}


# ---- loading ----------------------------------------------------------------------------
def load(path: str | os.PathLike, mesh: Mesh | None = None, dtype: str = "float32", *,
         rules="default", attention: str = "auto", tokenizer: bool = True,
         max_batch: int | None = None, max_length: int | None = None,
         quantize: str | None = None, calibration=None, layer_loop: str = "auto",
         kv_cache: str | None = None, quant_kernel: str = "off") -> Model:
    """Load a jaxformer checkpoint straight into the shardings `mesh` and `rules` imply.

    path: a jaxformer checkpoint directory, or any name jaxformer.hub.resolve knows: a known
    model ("smollm2-135m-instruct"), a Hugging Face id ("hf:org/name" or "org/name"), a
    .gguf file or a Hugging Face model directory, each converted once into the jaxformer
    cache. No host materialises the whole model: each array is restored shard by shard.
    Before anything is read, the memory plan (jaxformer.memory, `jaxformer info`) is checked
    against device memory: a ValueError explains a plan that cannot fit, for the weights
    alone and, when max_batch or max_length (prompt + new tokens) are given, for the KV
    cache and prefill of that workload too.
    layer_loop: "scan" (stacked layer weights, lax.scan), "unroll" (one array per layer
    position; the fast decode on GPUs) or "auto" (unroll on GPUs); see RunConfig.
    kv_cache: None, "int8" or "fp8" (RunConfig.kv_cache): the KV cache generate() allocates
    holds int8 / fp8 codes with a scale per token and kv head, about half the bytes.
    quant_kernel: RunConfig.quant_kernel (few-row quantized products on the Mosaic GPU
    kernel: "off", "auto", "log", "interpret").

    quantize (RunConfig.quantize: "int8", "int4", "int4-g<N>", "fp8", "fp8-tensor"): a float
    checkpoint is quantized on the devices as it is read, one stacked weight at a time;
    "fp8" then calibrates its activation scales on `calibration` prompts (Model.calibrate).
    A quantized checkpoint (Model.save of a quantized model) loads as it is stored with
    quantize None or its own value; any other value is a ValueError.
    """
    path = hub.resolve(path)
    config = ckpt.read_config(path)
    stored, wanted = ckpt.read_quantization(path), name(quantize)
    if stored is not None and wanted not in (None, stored):
        raise ValueError(f"load(quantize={quantize!r}): {path} holds {stored!r}-quantized "
                         f"weights, which cannot be re-quantized; load it with quantize=None "
                         f"or {stored!r}, or quantize its float checkpoint instead")
    mesh = mesh or default_mesh()
    run, rules_table = _run_config(mesh, dtype, rules, attention, stored or wanted, layer_loop,
                                   kv_cache, quant_kernel)
    # fewer kv heads than tensor (a multiple of them): each kv head copied (kv_replicate.py)
    stored_config, r = config, kv_replicate.factor(config, mesh, rules_table)
    if r > 1 and run.quantize is not None:
        raise ValueError(f"load(quantize={run.quantize!r}): kv-head replication "
                         f"({config.kv_heads} kv heads on tensor={mesh.shape['tensor']}) "
                         f"needs float weights")
    config = kv_replicate.replicated_config(config, r)
    shd.check_divisible(config, mesh, rules_table)
    qp.check_mesh(config, run.quantize, mesh, rules_table)
    plan = memory.check_fits(config, mesh, run.dtype,
                             rules if isinstance(rules, str) else rules_table,
                             max_batch=max_batch, max_length=max_length, attention=attention,
                             quantize=run.quantize, kv_cache=run.kv_cache,
                             layer_loop=run.layer_loop)
    if run.quantize is not None and stored is None:
        memory.check_quantize_at_load(plan, config, mesh, run.dtype, rules_table)
    if log.isEnabledFor(logging.INFO):
        log.info("loading %s: %s of %s%s weights per device on mesh %s", path,
                 memory.fmt_bytes(memory.weights_bytes(config, mesh, run.dtype, rules_table,
                                                       quantize=run.quantize)),
                 run.dtype, f" / {run.quantize}" if run.quantize else "", dict(mesh.shape))
    t0 = time.perf_counter()
    with pg.spinner(f"loading {path.name}"):
        if run.quantize is not None and stored is None:
            params = qp.restore_quantized(path, config, run.quantize, mesh, rules_table,
                                          run.dtype)
        else:
            shardings = param_shardings(config, mesh, rules_table, run.quantize)
            restore_rules = rules_table if r == 1 else \
                kv_replicate.unsharded_kv_rules(rules_table)
            stored_sh = param_shardings(stored_config, mesh, restore_rules, run.quantize)
            dtypes = qp.target_dtypes(stored_config, run.quantize, run.dtype)
            abstract = jax.tree.map(lambda s, d, sh: jax.ShapeDtypeStruct(s.shape, d, sharding=sh),
                                    _pure_abstract(stored_config, run.quantize), dtypes,
                                    stored_sh)
            params = ckpt.restore_params(path, abstract)
            if r > 1:
                params = kv_replicate.replicate_params(params, stored_config, r, shardings)
    log.info("restored %s in %.1fs", path, time.perf_counter() - t0)
    tok = None
    if tokenizer and (path / ckpt.TOKENIZER_DIR).is_dir():
        tok = load_tokenizer(path / ckpt.TOKENIZER_DIR)
    model = Model(config, params, mesh, run, rules_table, tok)
    model.sentence = ckpt.read_sentence(path)
    if _needs_calibration(run.quantize, calibration, stored=stored is not None):
        model.calibrate(calibration)
    return model


def _needs_calibration(quantize, calibration, *, stored: bool) -> bool:
    """FP8 models fresh from float weights calibrate (on `calibration` or the defaults); a
    stored FP8 checkpoint keeps its scales unless new prompts are given."""
    spec = parse(quantize)
    if spec is None or not spec.activations:
        if calibration is not None:
            raise ValueError(f"calibration prompts set FP8 activation scales; they do not "
                             f"apply to quantize={quantize!r}")
        return False
    return not stored or calibration is not None


def _beams(sampling) -> bool:
    items = [sampling] if isinstance(sampling, Sampling) else list(sampling or [])
    return any(s is not None and s.num_beams > 1 for s in items)  # None: a greedy row


def _generate_with_bar(model, prompts, max_new_tokens, sampling, seed, progress, **kwargs):
    """generate() through its streaming path, a tqdm bar advancing per chunk of steps."""
    kwargs.setdefault("chunk", max(8, max_new_tokens // 32))
    bar = pg.bar(max_new_tokens, "generating", "tok", progress)
    try:
        for item in generate(model, prompts, max_new_tokens=max_new_tokens, sampling=sampling,
                             seed=seed, stream=True, **kwargs):
            if isinstance(item, GenerateOutput):
                return item
            bar.update(max((len(t) for t in item), default=0))
    finally:
        bar.close()


# On a CPU, LLVM's default optimisation of the initialiser's random-number code takes several
# times as long as -O1 for a program that runs once, and gives the same bits (the RNG is
# integer arithmetic, the float transforms are not reassociated at either level). Other
# platforms keep their defaults.
_CPU_INIT_OPTIONS = {"xla_backend_optimization_level": 1}


def _init_compiler_options(mesh: Mesh) -> dict | None:
    return _CPU_INIT_OPTIONS if mesh.devices.flat[0].platform == "cpu" else None


def _pure_abstract(cfg: ModelConfig, quantize: str | None = None) -> dict:
    return abstract_params(cfg, quantize)


def demo_model(mesh: Mesh | None = None, dtype: str = "float32", seed: int = 0,
               quantize: str | None = None, kv_cache: str | None = None,
               attention: str = "auto") -> Model:
    """The built-in default: the `demo` preset with seeded random (UNTRAINED) weights and the
    byte tokenizer. It exercises the whole stack without any download; its text is noise.
    quantize, kv_cache: as in Model.random (int4 needs a group dividing ffn_size 344, e.g.
    int4-g8), attention (RunConfig.attention)."""
    return Model.random(ModelConfig.from_preset("demo"), mesh, dtype=dtype, seed=seed,
                        tokenizer=ByteTokenizer(), quantize=quantize, kv_cache=kv_cache,
                        attention=attention)
