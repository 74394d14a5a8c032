"""Generation speed against the card's ceilings and against Hugging Face, in one run.

    python benchmarks/generate.py --presets gpt3-1.3b gpt3-6.7b --batches 1 64 --prompts 128
    jaxformer bench --presets gpt3-1.3b --batches 1 64      # the same, from a checkout

The code lives in benchmarks/harness.py, which `jaxformer bench` runs too.
"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from harness import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
