"""glm41v_jax: GLM-4.1V-9B-Thinking in JAX/Flax (Linen).

Public API:
  load(model, ...) -> (params, cfg)        HF dir (single/sharded safetensors), converted dir, or hub id
  Processor.from_dir(dir)                  chat template + tokenizer + image/video processors (NumPy/PIL)
  forward(params, cfg, **processor_arrays) logits, comparable to transformers' Glm4vForConditionalGeneration
  generate(params, cfg, inputs, ...)       compiled prefill + on-device decode loop
  Pipeline.load(model).generate([Request(...), ...])   batched requests, in order (the --json records)
  Engine(params, cfg, mesh=...)            the engine: buckets, warmup, sharded KV cache
  Glm4vConfig, Glm4v (the Linen module)
"""

from . import backend  # noqa: F401  (first: adds the XLA:CPU flag before JAX starts its backend; see backend.py)
from .config import ConfigError, Glm4vConfig, RuntimeConfig, TextConfig, VisionConfig
from .generate import Engine, GenerationError, generate, generate_batch
from .loading import load, load_config
from .model import Glm4v, forward
from .pipeline import Pipeline, Request
from .processing import ProcessingError, Processor

__all__ = [
    "ConfigError", "Engine", "GenerationError", "Glm4v", "Glm4vConfig", "Pipeline", "ProcessingError", "Processor",
    "Request", "RuntimeConfig", "TextConfig", "VisionConfig", "forward", "generate", "generate_batch", "load",
    "load_config",
]
__version__ = "0.1.0"
