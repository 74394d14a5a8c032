"""`python -m conversion.megatron`: argument parsing around convert()."""
from __future__ import annotations

import argparse
import json
import logging
import sys

from conversion import error_line


# flag -> ModelConfig field, for what a checkpoint's args may lack or get wrong
OVERRIDES = {
    "num_attention_heads": ("num_heads", int, "attention heads (when args are missing)"),
    "num_query_groups": ("num_kv_heads", int, "query groups / kv heads"),
    "kv_channels": ("head_dim", int, "head dimension"),
    "max_position_embeddings": ("max_position_embeddings", int, "maximum positions"),
    "norm_eps": ("norm_eps", float, "norm epsilon"),
    "activation": ("activation", str, "gelu | gelu_tanh | relu | squared_relu | silu"),
    "normalization": ("norm", str, "layernorm | rmsnorm"),
    "position_embedding": ("position_embedding", str, "learned | rope | none"),
    "rope_theta": ("rope_theta", float, "rotary base"),
    "rope_fraction": ("rope_fraction", float, "rotary percent as a fraction"),
    "model_type": ("arch", str, "decoder (GPT) | encoder (BERT)"),
}


def _bool(s: str) -> bool:
    if s.lower() in ("1", "true", "yes", "on"):
        return True
    if s.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean, got {s!r}")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m conversion.megatron",
        description="Convert a Megatron-LM checkpoint (legacy or megatron-core, per-rank "
                    "torch files or torch_dist, any TP/PP) into a jaxformer checkpoint.")
    p.add_argument("--input", required=True, help="checkpoint root, iter_XXXXXXX/release "
                   "folder, torch_dist folder or a model_optim_rng.pt")
    p.add_argument("--output", required=True, help="jaxformer checkpoint directory to write")
    t = p.add_argument_group("tokenizer (copied into the checkpoint; gives the true vocab)")
    t.add_argument("--vocab-file", help="GPT-2 BPE vocab.json (with --merges-file)")
    t.add_argument("--merges-file", help="GPT-2 BPE merges.txt")
    t.add_argument("--tokenizer-model", help="sentencepiece tokenizer.model (or an HF "
                   "tokenizer directory)")
    t.add_argument("--vocab-txt", help="BERT WordPiece vocab.txt")
    t.add_argument("--tokenizer", help="a directory or file jaxformer.tokenizer.load_tokenizer "
                   "understands")
    t.add_argument("--cased", action="store_true", help="WordPiece without lower-casing")
    v = p.add_argument_group("weights")
    v.add_argument("--dtype", help="float32 | bfloat16 | float16 (default: the source's)")
    v.add_argument("--true-vocab-size", type=int, help="true vocabulary size (default: the "
                   "tokenizer's); Megatron's padding rows beyond it are dropped")
    v.add_argument("--keep-vocab-padding", action="store_true", help="keep Megatron's padded "
                   "embedding rows (logits beyond the true vocabulary are still masked)")
    v.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    v.add_argument("--quantize", help="write quantized linear layers: int8 | int4 | int4-g<N> "
                   "| fp8 | fp8-tensor (docs/quantization.md)")
    c = p.add_argument_group("config overrides (win over args and shapes)")
    for flag, (_, typ, help_) in OVERRIDES.items():
        c.add_argument("--" + flag.replace("_", "-"), type=typ, help=help_)
    c.add_argument("--rope-interleaved", type=_bool, help="rotary pairs (2i, 2i+1)")
    c.add_argument("--residual-from-norm", type=_bool,
                   help="apply_residual_connection_post_layernorm")
    c.add_argument("--layernorm-1p", type=_bool, help="stored norm weights are gamma - 1")
    c.add_argument("--name", help="model name stored in config.json")
    c.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="any ModelConfig field (VALUE parsed as JSON, else a string)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("-q", "--quiet", action="store_true", help="only errors")
    return p


TORCH_MISSING = ("reading Megatron torch checkpoints needs PyTorch, which is not installed: "
                 "pip install 'jaxformer[megatron]' (or any torch build)")


def main(argv=None) -> int:
    ap = parser()
    ns = ap.parse_args(argv)
    logging.basicConfig(level=logging.ERROR if ns.quiet else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if not ns.quiet:  # our own progress notes; not every library's INFO chatter
        logging.getLogger("conversion").setLevel(logging.INFO)
    overrides = {}
    for flag, (fld, _, _) in OVERRIDES.items():
        val = getattr(ns, flag)
        if val is not None:
            overrides[fld] = val
    if overrides.get("arch") in ("gpt", "bert"):
        overrides["arch"] = {"gpt": "decoder", "bert": "encoder"}[overrides["arch"]]
    if ns.rope_interleaved is not None:
        overrides["rope_interleaved"] = ns.rope_interleaved
    if ns.residual_from_norm is not None:
        overrides["residual_from_norm"] = ns.residual_from_norm
    for item in ns.set:
        key, sep, raw = item.partition("=")
        if not sep:
            print(error_line(ap.prog, f"--set expects FIELD=VALUE, got {item!r}"),
                  file=sys.stderr)
            return 2
        try:
            overrides[key] = json.loads(raw)
        except json.JSONDecodeError:
            overrides[key] = raw
    from conversion.megatron.driver import convert
    echo = (lambda *_: None) if ns.quiet else print
    try:
        convert(ns.input, ns.output, tokenizer=ns.tokenizer, vocab_file=ns.vocab_file,
                merges_file=ns.merges_file, tokenizer_model=ns.tokenizer_model,
                vocab_txt=ns.vocab_txt, lower_case=False if ns.cased else None,
                dtype=ns.dtype, true_vocab_size=ns.true_vocab_size,
                keep_vocab_padding=ns.keep_vocab_padding, overwrite=ns.overwrite,
                overrides=overrides, layernorm_1p=ns.layernorm_1p, name=ns.name,
                progress=not ns.no_progress, echo=echo, quantize=ns.quantize)
    except (ValueError, FileExistsError, FileNotFoundError) as e:  # incl. MegatronConversionError
        print(error_line(ap.prog, e), file=sys.stderr)
        return 1
    except ModuleNotFoundError as e:
        if e.name != "torch":
            raise
        print(error_line(ap.prog, TORCH_MISSING), file=sys.stderr)
        return 1
    return 0
