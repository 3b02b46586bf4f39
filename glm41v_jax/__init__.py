"""glm41v_jax: GLM-4.1V-9B-Thinking in JAX/Flax (Linen).

Public API:
  load(model, ...) -> (params, cfg)        HF dir (single/sharded safetensors), converted dir, or hub id
  Processor.from_dir(dir)                  chat template + tokenizer + image/video processors (NumPy/PIL)
  forward(params, cfg, **processor_arrays) logits, comparable to transformers' Glm4vForConditionalGeneration
  generate(params, cfg, inputs, ...)       compiled prefill + on-device decode loop
  Glm4vConfig, Glm4v (the Linen module)
"""

from .config import ConfigError, Glm4vConfig, RuntimeConfig, TextConfig, VisionConfig
from .generate import generate, generate_batch
from .loading import load, load_config
from .model import Glm4v, forward
from .processing import ProcessingError, Processor

__all__ = [
    "ConfigError", "Glm4v", "Glm4vConfig", "ProcessingError", "Processor", "RuntimeConfig", "TextConfig",
    "VisionConfig", "forward", "generate", "generate_batch", "load", "load_config",
]
__version__ = "0.1.0"
