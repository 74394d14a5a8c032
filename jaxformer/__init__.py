"""jaxformer: huge transformers served sharded over data x pipe x tensor meshes, in JAX."""
from jaxformer import hub
from jaxformer.config import ModelConfig, RunConfig, list_presets
from jaxformer.compilation import enable_compilation_cache
from jaxformer.model import Model, demo_model, load
from jaxformer.models import num_params
from jaxformer.generate import GenerateOutput, generate
from jaxformer.engine import Engine, EngineConfig
from jaxformer.sampling import Sampling
from jaxformer.sharding import make_mesh

__all__ = ["Engine", "EngineConfig", "GenerateOutput", "Model", "ModelConfig", "RunConfig",
           "Sampling", "demo_model", "enable_compilation_cache", "generate", "hub",
           "list_presets", "load", "make_mesh", "num_params"]

__version__ = "0.1.0"
