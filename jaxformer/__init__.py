"""jaxformer: huge transformers served sharded over data x pipe x tensor meshes, in JAX."""
from jaxformer.config import ModelConfig, RunConfig, list_presets
from jaxformer.engine import Model, demo_model, enable_compilation_cache, load
from jaxformer.sharding import make_mesh

__all__ = ["Model", "ModelConfig", "RunConfig", "demo_model", "enable_compilation_cache",
           "list_presets", "load", "make_mesh"]

try:  # generation arrives with its own module
    from jaxformer.generate import GenerateOutput, Sampling, generate  # noqa: F401
    __all__ += ["GenerateOutput", "Sampling", "generate"]
except ImportError:  # pragma: no cover
    pass

__version__ = "0.1.0"
