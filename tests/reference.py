"""Builds tiny random HF reference checkpoints with transformers (tests only: torch lives here, not in the package).

Weights are redrawn at O(1) scale (norms 1 +- 0.1, embeddings N(0, 1), matrices N(0, 1/fan_in)) so that a wrong
detail anywhere changes the argmax; the default 0.02 init would hide most bugs.
"""

from __future__ import annotations

import copy
import json
import os
from typing import Any

import numpy as np
import torch
from transformers import Glm4vConfig as HFConfig
from transformers import Glm4vForConditionalGeneration

from glm41v_jax import tiny

# Several shapes: head counts, kv heads, mrope sections, depths differ.
CONFIGS: dict[str, dict[str, Any]] = {
    "a": dict(text=dict(hidden_size=128, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, rope_scaling={"rope_type": "default", "mrope_section": [2, 3, 3]}),
              vision=dict(depth=2, hidden_size=48, num_heads=3, out_hidden_size=128, intermediate_size=80,
                          image_size=84)),
    "b": dict(text=dict(hidden_size=96, intermediate_size=64, num_hidden_layers=3, num_attention_heads=3,
                        num_key_value_heads=1, rope_scaling={"rope_type": "default", "mrope_section": [4, 2, 2]}),
              vision=dict(depth=3, hidden_size=32, num_heads=2, out_hidden_size=96, intermediate_size=72,
                          image_size=112)),
    "c": dict(text=dict(hidden_size=128, intermediate_size=160, num_hidden_layers=1, num_attention_heads=8,
                        num_key_value_heads=8, rope_scaling={"rope_type": "default", "mrope_section": [2, 1, 1]}),
              vision=dict(depth=1, hidden_size=64, num_heads=4, out_hidden_size=128, intermediate_size=96,
                          image_size=56)),
}


def hf_config_dict(name: str) -> dict[str, Any]:
    spec = CONFIGS[name]
    d = tiny.tiny_hf_config()
    d = copy.deepcopy(d)
    d["text_config"].update(spec["text"])
    d["vision_config"].update(spec["vision"])
    return d


def build_hf_model(cfg_dict: dict[str, Any], seed: int = 0) -> Glm4vForConditionalGeneration:
    cfg = HFConfig(**copy.deepcopy(cfg_dict))
    torch.manual_seed(seed)
    model = Glm4vForConditionalGeneration(cfg).eval().to(torch.float32)
    state = tiny.random_hf_state_dict(cfg_dict, seed)
    own = model.state_dict()
    assert set(state) == set(own), (sorted(set(state) ^ set(own)))[:10]
    model.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, strict=True)
    return model


def write_checkpoint(directory: str, cfg_dict: dict[str, Any], seed: int = 0) -> Glm4vForConditionalGeneration:
    """save_pretrained + tokenizer + chat template + processor configs: a complete tiny HF checkpoint dir."""
    model = build_hf_model(cfg_dict, seed)
    model.save_pretrained(directory)
    tiny.write_tokenizer_files(directory)
    with open(os.path.join(directory, "preprocessor_config.json"), "w") as f:
        json.dump(tiny.TINY_PREPROCESSOR, f)
    with open(os.path.join(directory, "video_preprocessor_config.json"), "w") as f:
        json.dump(tiny.TINY_VIDEO_PREPROCESSOR, f)
    return model


def to_torch(batch: dict[str, Any]) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in batch.items():
        if v is None:
            continue
        a = np.asarray(v)
        out[k] = torch.from_numpy(a.astype(np.int64) if a.dtype.kind in "iu" else a.astype(np.float32))
    return out
