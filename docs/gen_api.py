"""Generate docs/api.md from the docstrings of the public API.

    python docs/gen_api.py            # rewrite docs/api.md
    python docs/gen_api.py --check    # exit 1 when docs/api.md is out of date

tests/test_readme.py runs the check, so a changed signature or docstring fails the suite
until this script is rerun. What is public is the list below; everything else is internal.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import inspect
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "docs" / "api.md"

# (section, intro, [dotted names]); a class lists its public methods that have docstrings.
SECTIONS = [
    ("Meshes and loading", "Everything starts from a mesh and a checkpoint (or a preset).",
     ["jaxformer.make_mesh", "jaxformer.load", "jaxformer.demo_model", "jaxformer.list_presets"]),
    ("Models by name", "What `load` accepts besides a checkpoint directory "
     "([conversion.md](conversion.md#models-by-name)).",
     ["jaxformer.hub.resolve", "jaxformer.hub.fetch_smollm2", "jaxformer.hub.cache_root",
      "jaxformer.hub.DownloadError"]),
    ("Model", "Returned by `load`, `demo_model` and `Model.random`.", ["jaxformer.Model"]),
    ("Generation", "", ["jaxformer.generate", "jaxformer.Sampling", "jaxformer.GenerateOutput"]),
    ("Engine", "One model on its mesh driven a step at a time (what generate() and a "
     "scheduler run on); [architecture](architecture.md) shows a request's way through it.",
     ["jaxformer.Engine", "jaxformer.EngineConfig", "jaxformer.num_params"]),
    ("Configuration", "", ["jaxformer.ModelConfig", "jaxformer.RunConfig"]),
    ("Memory plan", "What `jaxformer info` prints and what `load(max_batch=, max_length=)` "
     "checks.",
     ["jaxformer.memory.plan", "jaxformer.memory.MemoryPlan", "jaxformer.memory.check_fits",
      "jaxformer.memory.OutOfMemoryPlan", "jaxformer.memory.weights_bytes",
      "jaxformer.memory.kv_cache_bytes", "jaxformer.memory.activation_bytes",
      "jaxformer.cache.cache_rows", "jaxformer.memory.cache_length",
      "jaxformer.memory.device_memory_limit"]),
    ("Sharding", "Logical axis names and the rule tables in `configs/sharding/`.",
     ["jaxformer.sharding.load_rules", "jaxformer.sharding.logical_to_spec",
      "jaxformer.sharding.shard", "jaxformer.sharding.check_divisible"]),
    ("Multi-host", "See [multihost.md](multihost.md) for launches.",
     ["jaxformer.distributed.initialize", "jaxformer.distributed.check_mesh",
      "jaxformer.distributed.ProcessInfo", "jaxformer.distributed.DistributedError"]),
    ("Tokenizers", "", ["jaxformer.tokenizer.load_tokenizer", "jaxformer.tokenizer.Tokenizer"]),
    ("Checkpoints", "The format is in [checkpoint_format.md](checkpoint_format.md).",
     ["jaxformer.checkpoint.save", "jaxformer.checkpoint.read_config",
      "jaxformer.checkpoint.CheckpointWriter", "jaxformer.checkpoint.CheckpointError"]),
    ("Quantization", "See [quantization.md](quantization.md). `load(..., quantize=)`, "
     "`Model.random(..., quantize=)`, `Model.calibrate` and `RunConfig.quantize` are above.",
     ["jaxformer.quant.spec.QuantSpec", "jaxformer.quant.calibrate.calibrate",
      "jaxformer.quant.convert.quantize_checkpoint", "jaxformer.checkpoint.read_quantization"]),
    ("Conversion", "See [conversion.md](conversion.md).",
     ["conversion.hf.convert", "conversion.hf.ConversionError", "conversion.gguf.convert",
      "conversion.megatron.convert",
      "conversion.megatron.MegatronConversionError"]),
    ("Progress and logging", "", ["jaxformer.progress"]),
]


NO_CONSTRUCTOR = {"jaxformer.Model"}  # built by load / demo_model / Model.random, not by hand


def resolve(dotted: str):
    """The object a dotted name means; an attribute wins over a submodule of the same name
    (`jaxformer.generate` is the function the package exports)."""
    parts = dotted.split(".")
    for i in range(len(parts) - 1, 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
            for p in parts[i:]:
                obj = getattr(obj, p)
            return obj
        except (ImportError, AttributeError):
            continue
    return importlib.import_module(dotted)


def _annotation(a) -> str:
    text = a if isinstance(a, str) else getattr(a, "__name__", repr(a))
    return text.strip("'\"")


def _default(v) -> str:
    """repr, except classes and functions by name (np.float32, print), not <class ...>."""
    if isinstance(v, type) or inspect.isroutine(v):
        mod = getattr(v, "__module__", "") or ""
        return ("np." if mod.startswith("numpy") else "") + v.__name__
    return repr(v)


def signature(obj, name: str) -> str:
    """name(a: int = 1, *, b='x') -> R, from string annotations as written in the source."""
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):
        return name
    P = inspect.Parameter
    out, star = [], False
    for p in sig.parameters.values():
        if p.name in ("self", "cls") and not out:
            continue
        if p.kind == P.KEYWORD_ONLY and not star:
            out.append("*")
            star = True
        s = {P.VAR_POSITIONAL: "*", P.VAR_KEYWORD: "**"}.get(p.kind, "") + p.name
        star = star or p.kind == P.VAR_POSITIONAL
        if p.annotation is not P.empty:
            s += ": " + _annotation(p.annotation)
        if p.default is not P.empty:
            s += (" = " if p.annotation is not P.empty else "=") + _default(p.default)
        out.append(s)
    ret = "" if sig.return_annotation is P.empty else " -> " + _annotation(sig.return_annotation)
    return f"{name}({', '.join(out)}){ret}"


def code(lines: list[str], text: str) -> None:
    lines += ["```python", text, "```", ""]


def doc(obj) -> str:
    d = inspect.getdoc(obj) or ""
    return d.strip()


def fields_table(cls) -> list[str]:
    rows = ["| field | type | default |", "|---|---|---|"]
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            default = repr(f.default)
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = f"{f.default_factory.__name__}()"  # type: ignore[misc]
        else:
            default = "required"
        cells = (f.name, _annotation(f.type), default)
        rows.append("| " + " | ".join(f"`{c}`".replace("|", "\\|") for c in cells) + " |")
    return rows


def block(lines: list[str], text: str) -> None:
    if text:
        lines += ["```text", text, "```", ""] if _is_code_like(text) else [text, ""]


def _is_code_like(text: str) -> bool:
    # docstrings here are prose with indented examples; keep them verbatim as preformatted
    return any(line.startswith("    ") for line in text.splitlines())


def entry(lines: list[str], dotted: str) -> None:
    obj = resolve(dotted)
    short = dotted.replace("jaxformer.", "jf.", 1) if dotted.count(".") == 1 else dotted
    if inspect.ismodule(obj):
        lines += [f"### `{dotted}`", ""]
        block(lines, doc(obj))
        for name, member in inspect.getmembers(obj, inspect.isfunction):
            if name.startswith("_") or member.__module__ != obj.__name__:
                continue
            lines += [f"#### `{dotted}.{name}`", ""]
            code(lines, signature(member, f"{dotted}.{name}"))
            block(lines, doc(member))
        return
    if inspect.isclass(obj):
        kind = "exception" if issubclass(obj, BaseException) else "class"
        lines += [f"### {kind} `{short}`", ""]
        if not dataclasses.is_dataclass(obj) and kind == "class" and "__init__" in obj.__dict__ \
                and dotted not in NO_CONSTRUCTOR:
            code(lines, signature(obj.__init__, short))
        block(lines, doc(obj))
        if dataclasses.is_dataclass(obj):
            lines += fields_table(obj) + [""]
        for name, member in obj.__dict__.items():
            if name.startswith("_"):
                continue
            fn = member.__func__ if isinstance(member, (classmethod, staticmethod)) else member
            if isinstance(member, property):
                if member.__doc__:
                    lines += [f"#### property `{name}`", "", member.__doc__.strip(), ""]
                continue
            if not inspect.isfunction(fn) or not doc(fn):
                continue
            prefix = "classmethod " if isinstance(member, classmethod) else ""
            cls_name = short.split(".")[-1]
            lines += [f"#### {prefix}`{cls_name}.{name}`", ""]
            code(lines, signature(fn, f"{cls_name}.{name}"))
            block(lines, doc(fn))
        return
    lines += [f"### `{short}`", ""]
    code(lines, signature(obj, short))
    block(lines, doc(obj))


def generate() -> str:
    lines = ["# API reference", "",
             "Generated from the docstrings by `docs/gen_api.py`; do not edit by hand "
             "(`python docs/gen_api.py` rewrites it, and the test suite checks it is current).",
             "`jf` is `import jaxformer as jf`. Shapes use the legend of `jaxformer/config.py`: "
             "B batch, T length, S cache length, D embed, N heads, K kv heads, H head dim, "
             "F mlp, V vocabulary, L layers.", ""]
    lines += ["Contents: " + " · ".join(
        f"[{title}](#{title.lower().replace(' ', '-')})" for title, _, _ in SECTIONS), ""]
    for title, intro, names in SECTIONS:
        lines += [f"## {title}", ""]
        if intro:
            lines += [intro, ""]
        for name in names:
            entry(lines, name)
    while lines and not lines[-1]:
        lines.pop()
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="fail if docs/api.md is stale")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    text = generate()
    if args.check:
        if not OUT.exists() or OUT.read_text() != text:
            print("docs/api.md is out of date: run python docs/gen_api.py", file=sys.stderr)
            return 1
        return 0
    OUT.write_text(text)
    print(f"wrote {OUT.relative_to(ROOT)} ({len(text.splitlines())} lines)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
