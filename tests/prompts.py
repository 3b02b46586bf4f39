"""Prompt builders and a reference pair (transformers model + our params/engine) shared by the generation tests.

Inputs are raw arrays (ids / pixels / grids) in the layout `Glm4vProcessor` returns, so the tests do not depend on
the processor; token ids are the real GLM-4.1V special ids.
"""

from __future__ import annotations

import numpy as np
import torch
from reference import build_hf_model, hf_config_dict, to_torch

from glm41v_jax import weights
from glm41v_jax.config import Glm4vConfig
from glm41v_jax.generate import Engine
from glm41v_jax.inputs import mm_token_types

N_NEW = 32
GMASK, SOP, USER, ASSISTANT, NL = 151331, 151333, 151336, 151337, 198
BOI, EOI, BOV, EOV, IMG = 151339, 151340, 151341, 151342, 151343
PAD = 151329


def text_ids(rng: np.random.Generator, n: int) -> list[int]:
    return rng.integers(100, 195, size=n).tolist()


def image_span(grid: tuple[int, int, int]) -> list[int]:
    t, h, w = grid
    return [BOI] + [IMG] * (t * h * w // 4) + [EOI]


def video_span(grid: tuple[int, int, int], timestamps: list[int]) -> list[int]:
    t, h, w = grid
    out = [BOV]
    for ts in timestamps[:t]:
        out += [BOI] + [IMG] * (h * w // 4) + [EOI] + [100 + ord(c) - 32 for c in str(ts)]
    return out + [EOV]


def chat(body: list[int]) -> list[int]:
    return [GMASK, SOP, USER, NL, *body, ASSISTANT, NL]


def pixels(rng: np.random.Generator, cfg: Glm4vConfig, grids: list[tuple[int, int, int]]) -> np.ndarray:
    n = sum(t * h * w for t, h, w in grids)
    return rng.standard_normal((n, cfg.vision.patch_dim)).astype(np.float32)


def make_inputs(cfg: Glm4vConfig, ids: list[int], images=None, image_grids=None, videos=None, video_grids=None):
    arr = np.asarray([ids], np.int64)
    d = {"input_ids": arr, "attention_mask": np.ones_like(arr), "mm_token_type_ids": mm_token_types(arr, cfg)}
    if images is not None:
        d["pixel_values"] = images
        d["image_grid_thw"] = np.asarray(image_grids, np.int64)
    if videos is not None:
        d["pixel_values_videos"] = videos
        d["video_grid_thw"] = np.asarray(video_grids, np.int64)
    return d


def hf_generate(hf, inputs, n=N_NEW) -> np.ndarray:
    with torch.no_grad():
        out = hf.generate(**to_torch(inputs), do_sample=False, max_new_tokens=n, min_new_tokens=n, eos_token_id=None,
                          pad_token_id=PAD)
    return out[:, inputs["input_ids"].shape[1]:].numpy()


class Ref:
    def __init__(self, name: str) -> None:
        d = hf_config_dict(name)
        self.hf = build_hf_model(d, seed=1)
        self.cfg = Glm4vConfig.from_hf(d)
        self.params = weights.hf_to_flax({k: v.numpy() for k, v in self.hf.state_dict().items()}, self.cfg)
        self.engine = Engine(self.params, self.cfg, chunk_size=8)

    def ours(self, inputs, n=N_NEW) -> list[int]:
        return self.engine.generate(inputs, max_new_tokens=n, eos_ids=()).token_ids
