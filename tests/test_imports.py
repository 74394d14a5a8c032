"""The package's floors: imports flow one way (docs/architecture.md).

Every import of a jaxformer module, at any depth, is read from the source (ast, nothing is
executed) and must go to a module of the same floor or a lower one. Library floors import
at module level only: a function-level import of a jaxformer module is how cycles used to be
dodged, so it is refused there (the CLI floor may import lazily, for start-up time). A
module missing from FLOORS fails too: a new module must say where it stands.
"""
import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent

# lower number = lower floor; within the runtime, the order in which its modules may use
# each other (the Engine never imports the Model that drives it)
FLOORS = {
    # config and sharding
    "jaxformer.config": 0, "jaxformer.hf_config": 0, "jaxformer.sharding": 0,
    "jaxformer.quant": 0, "jaxformer.quant.spec": 0, "jaxformer.progress": 0,
    "jaxformer.tokenizer": 0, "jaxformer.distributed": 0, "jaxformer.chat_template": 0,
    "jaxformer.sentence": 0,
    # layers, kernels, the cache, sampling, quantized layer math
    "jaxformer.layers": 1, "jaxformer.kernels": 1, "jaxformer.cache": 1,
    "jaxformer.sampling": 1, "jaxformer.quant.ops": 1, "jaxformer.quant.module": 1,
    "jaxformer.kv_replicate": 1,
    # models and the layer stack
    "jaxformer.models": 2,
    # the runtime
    "jaxformer.params_jit": 3.0, "jaxformer.decode_state": 3.0, "jaxformer.checkpoint": 3.0,
    "jaxformer.memory": 3.0, "jaxformer.hub": 3.0, "jaxformer.memory_plan": 3.0,
    "jaxformer.quant.params": 3.0, "jaxformer.compilation": 3.0,
    "jaxformer.quant.calibrate": 3.0, "jaxformer.pipeline": 3.1, "jaxformer.engine": 3.2,
    "jaxformer.paged_engine": 3.21, "jaxformer.paged_prefill": 3.21,
    # the scheduler drives the Engine and generate() uses it; its page bookkeeping (pages.py)
    # imports nothing of jaxformer
    "jaxformer.serving": 3.25, "jaxformer.serving.replica_hosts": 3.25,
    "jaxformer.serving.request": 3.25,
    "jaxformer.beam": 3.3, "jaxformer.generate": 3.4, "jaxformer.embed": 3.45,
    "jaxformer.model": 3.5,
    "jaxformer.__init__": 3.6,
    # the HTTP server: above the runtime (it loads models and drives their schedulers)
    "jaxformer.serving.protocol": 3.7, "jaxformer.serving.metrics": 3.7,
    "jaxformer.serving.embeddings": 3.7,
    "jaxformer.serving.bridge": 3.71, "jaxformer.serving.openai_api": 3.72,
    "jaxformer.serving.triton_api": 3.72, "jaxformer.serving.app": 3.73,
    "jaxformer.serving.server": 3.74,
    # command line and tools
    "jaxformer.cli": 4, "jaxformer.cli_args": 4, "jaxformer.cli_chat": 4,
    "jaxformer.cli_serve": 4,
    "jaxformer.quant.convert": 4, "conversion": 4,
}
CLI_FLOOR = 4
# same-floor lazy imports that remain (each names why)
LAZY_ALLOWED = {
    # ModelConfig.from_hf_config: hf_config builds ModelConfigs
    ("jaxformer.config", "jaxformer.hf_config"),
}


def floor(module: str) -> float:
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        key = ".".join(parts[:n])
        if key in FLOORS:
            return FLOORS[key]
        if key + ".__init__" in FLOORS and n == len(parts):
            return FLOORS[key + ".__init__"]
    raise KeyError(module)


def modules():
    for path in sorted(list(ROOT.glob("jaxformer/**/*.py")) + list(ROOT.glob("conversion/**/*.py"))):
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        yield (name if not name.endswith(".__init__") or name == "jaxformer.__init__"
               else name[: -len(".__init__")]), path


def imports(path: pathlib.Path):
    """(imported module, line, inside a function or class) of every jaxformer import,
    skipping `if TYPE_CHECKING:` blocks (annotations only)."""
    tree = ast.parse(path.read_text())
    out = []

    def walk(node, nested):
        for ch in ast.iter_child_nodes(node):
            if isinstance(ch, ast.If) and "TYPE_CHECKING" in ast.unparse(ch.test):
                continue
            inner = nested or isinstance(ch, (ast.FunctionDef, ast.AsyncFunctionDef,
                                              ast.ClassDef))
            if isinstance(ch, ast.Import):
                out.extend((a.name, ch.lineno, nested) for a in ch.names)
            elif isinstance(ch, ast.ImportFrom) and ch.module and ch.level == 0:
                for a in ch.names:  # `from jaxformer import cache` imports jaxformer.cache
                    sub = f"{ch.module}.{a.name}"
                    out.append((sub if _is_module(sub) else ch.module, ch.lineno, nested))
            walk(ch, inner)

    walk(tree, False)
    return [(m, line, nested) for m, line, nested in out
            if m.split(".")[0] in ("jaxformer", "conversion")]


def _is_module(name: str) -> bool:
    p = ROOT.joinpath(*name.split("."))
    return p.with_suffix(".py").exists() or (p / "__init__.py").exists()


def _target(module: str) -> str:
    return "jaxformer.__init__" if module == "jaxformer" else module


def test_every_module_has_a_floor():
    missing = [name for name, _ in modules() if _safe_floor(name) is None]
    assert not missing, f"add these modules to FLOORS: {missing}"


def _safe_floor(name):
    try:
        return floor(name)
    except KeyError:
        return None


def test_imports_flow_one_way():
    bad = []
    for name, path in modules():
        mine = floor(name)
        for target, line, nested in imports(path):
            theirs = floor(_target(target))
            if theirs > mine:
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {target} (floor "
                           f"{theirs} above {mine})")
            elif nested and mine < CLI_FLOOR and (name, target) not in LAZY_ALLOWED:
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {target} inside a "
                           f"function")
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("source, want", [
    ("def f():\n    from jaxformer.model import Model\n", [("jaxformer.model", 2, True)]),
    ("from jaxformer import cache as kvc\n", [("jaxformer.cache", 1, False)]),
    ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from jaxformer import model\n",
     []),
])
def test_the_import_reader_sees_what_it_must(tmp_path, source, want):
    f = tmp_path / "m.py"
    f.write_text(source)
    assert imports(f) == want
    assert floor("jaxformer.layers.attention") < floor("jaxformer.models.stack") \
        < floor("jaxformer.engine") < floor("jaxformer.model") < floor("jaxformer.cli")
