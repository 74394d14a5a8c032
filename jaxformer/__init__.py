"""jaxformer: huge transformers served sharded over data x pipe x tensor meshes, in JAX."""
import functools as _functools
import os as _os

from jaxformer import engine as _engine
from jaxformer import hub
from jaxformer.config import ModelConfig, RunConfig, list_presets
from jaxformer.engine import Model, demo_model, enable_compilation_cache
from jaxformer.sharding import make_mesh


@_functools.wraps(_engine.load)
def load(path: "str | _os.PathLike", *args, **kwargs) -> Model:
    # `path` may also name a model any way jaxformer.hub.resolve knows: a known model
    # ("smollm2-135m-instruct"), a Hugging Face id ("hf:org/name", "org/name"), a .gguf
    # file or a Hugging Face directory, each converted once into the jaxformer cache.
    return _engine.load(hub.resolve(path), *args, **kwargs)


load.__doc__ = (_engine.load.__doc__ or "") + """
    path: a jaxformer checkpoint directory, or any name jaxformer.hub.resolve knows: a known
    model ("smollm2-135m-instruct"), a Hugging Face id ("hf:org/name" or "org/name"), a .gguf
    file or a Hugging Face model directory; those are converted once into the jaxformer cache.
    """

__all__ = ["Model", "ModelConfig", "RunConfig", "demo_model", "enable_compilation_cache",
           "hub", "list_presets", "load", "make_mesh"]

try:  # generation arrives with its own module
    from jaxformer.generate import GenerateOutput, Sampling, generate  # noqa: F401
    __all__ += ["GenerateOutput", "Sampling", "generate"]
except ImportError:  # pragma: no cover
    pass

__version__ = "0.1.0"
