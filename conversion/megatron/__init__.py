"""Megatron-LM checkpoints -> jaxformer checkpoints.

    python -m conversion.megatron --input megatron/345m --output ckpt/345m \
        --vocab-file gpt2-vocab.json --merges-file gpt2-merges.txt

Accepts every layout of MEGATRON_FORMAT.md: legacy per-rank files of checkpoint_version 0,
1.0, 2.0, 3.0 (GPT and BERT, any TP x PP, virtual pipeline chunks), megatron-core per-rank files
(Transformer-Engine and local-spec names), and torch_dist (PyTorch DCP) folders. Streams
one layer at a time; writes atomically through jaxformer.checkpoint.CheckpointWriter.

Modules: torchio (reading torch / DCP files without Megatron), source (directory detection,
rank files, pipeline numbering), layout (key names, TP merges, QKV orders, target layout),
args (ModelConfig from args + shapes), convert (the streaming driver), cli.
"""
from conversion.megatron.errors import MegatronConversionError
from conversion.megatron.driver import convert
from conversion.megatron.cli import main

__all__ = ["MegatronConversionError", "convert", "main"]
