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
    # tied embeddings, qkv bias in the vision tower, 7-px patches, full (not partial) text rotary
    "d": dict(text=dict(hidden_size=96, intermediate_size=64, num_hidden_layers=2, num_attention_heads=3,
                        num_key_value_heads=3, partial_rotary_factor=1.0,
                        rope_scaling={"rope_type": "default", "mrope_section": [8, 4, 4]}),
              vision=dict(depth=2, hidden_size=32, num_heads=2, out_hidden_size=96, intermediate_size=40,
                          image_size=35, patch_size=7, attention_bias=True),
              top=dict(tie_word_embeddings=True)),
}


def hf_config_dict(name: str) -> dict[str, Any]:
    spec = CONFIGS[name]
    d = tiny.tiny_hf_config()
    d["text_config"].update(spec["text"])
    d["vision_config"].update(spec["vision"])
    d.update(spec.get("top", {}))
    return copy.deepcopy(d)  # callers may mutate it


SPECIAL_IDS = ("image_token_id", "video_token_id", "image_start_token_id", "image_end_token_id",
               "video_start_token_id", "video_end_token_id")


def small_vocab_dict(name: str, vocab: int = 700) -> dict[str, Any]:
    """hf_config_dict(name) with a `vocab`-token head: the special ids 151xxx move to 300 + (id - 151000), so the
    embedding and lm_head are (700, D) instead of (151552, D) (init, quantization and logits cost milliseconds).
    For tests of code that is the same at any vocabulary size; the parity tests keep the real one."""
    def small(i: int) -> int:
        return i - 151000 + 300 if i >= 151000 else i

    d = hf_config_dict(name)
    t = d["text_config"]
    t.update(vocab_size=vocab, pad_token_id=small(t["pad_token_id"]),
             eos_token_id=[small(i) for i in t["eos_token_id"]])
    for key in SPECIAL_IDS:
        d[key] = small(d[key])
    assert max(d[k] for k in SPECIAL_IDS) < vocab
    return d


def numpy_params(cfg_dict: dict[str, Any], cfg: Any, seed: int = 0) -> dict:
    """Float params of `cfg` (a Glm4vConfig of `cfg_dict`: its kernel layout, scanned or not) as NumPy arrays: O(1)
    random HF weights (tiny.random_hf_state_dict) through weights.hf_to_flax. No compile: model.init_params runs
    the model's init op by op (~20 s of CPU per config). Checked against model.abstract_params."""
    import jax

    from glm41v_jax import model as M
    from glm41v_jax import weights
    from glm41v_jax.sharding import unbox

    fcfg = cfg.with_runtime(quantize="none")
    unrolled = fcfg.with_runtime(kernel_layout="in_out", scan_layers=False)
    params = weights.hf_to_flax(tiny.random_hf_state_dict(cfg_dict, seed), unrolled)
    params = M.to_kernel_layout(params, unrolled, fcfg.runtime.kernel_layout)[0]
    if fcfg.runtime.scan_layers:
        params = weights.stack_layers(params)
    params = jax.tree.map(np.asarray, params)
    shapes = jax.tree.map(lambda a: (a.shape, a.dtype), unbox(M.abstract_params(fcfg)))
    assert jax.tree.map(lambda a: (a.shape, a.dtype), params) == shapes
    return params


def build_hf_model(cfg_dict: dict[str, Any], seed: int = 0) -> Glm4vForConditionalGeneration:
    cfg = HFConfig(**copy.deepcopy(cfg_dict))
    torch.manual_seed(seed)
    model = Glm4vForConditionalGeneration(cfg).eval().to(torch.float32)
    state = tiny.random_hf_state_dict(cfg_dict, seed)
    own = model.state_dict()
    tied = {"lm_head.weight"} if cfg.tie_word_embeddings else set()
    assert set(state) == set(own) - tied, (sorted(set(state) ^ set(own)))[:10]
    result = model.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, strict=False)
    assert set(result.missing_keys) == tied and not result.unexpected_keys, result
    if tied:
        assert model.lm_head.weight.data_ptr() == model.model.language_model.embed_tokens.weight.data_ptr()
    return model


def hf_and_params(name: str, seed: int = 0) -> tuple[Glm4vForConditionalGeneration, Any, dict]:
    """(transformers model, our config, our params converted from its state dict) for the named tiny config."""
    from glm41v_jax.config import Glm4vConfig
    from glm41v_jax.weights import hf_to_flax

    d = hf_config_dict(name)
    hf = build_hf_model(d, seed=seed)
    cfg = Glm4vConfig.from_hf(d)
    return hf, cfg, hf_to_flax({k: v.numpy() for k, v in hf.state_dict().items()}, cfg)


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


# ---------------------------------------------------------------------------------------------------------------
# Raw processor-like inputs (ids + pixel rows + grids), built without the processor so model tests stand alone.

GMASK, SOP, USER, ASSISTANT, NL = 151331, 151333, 151336, 151337, 198
BOI, EOI, BOV, EOV, IMG = 151339, 151340, 151341, 151342, 151343


def text_ids(rng: np.random.Generator, n: int) -> list[int]:
    return [int(x) for x in rng.integers(100, 195, size=n)]


def build_prompt(rng: np.random.Generator, images=(), video=None, n_text: int = 5, patch_dim: int = 1176,
                 merge: int = 2) -> dict[str, np.ndarray]:
    """[gMASK]<sop><|user|>\\n + images + video + text + <|assistant|>\\n, with random pixel rows per grid.

    `images`: grids (1, h, w) in patches; `video`: (t, h, w) with t even (t/2 temporal groups after the
    temporal patch of 2, i.e. grid t counts groups) and timestamps 0, 1, 2, ... as digit tokens.
    """
    ids = [GMASK, SOP, USER, NL]
    out: dict[str, np.ndarray] = {}
    if images:
        pix = []
        for g in images:
            ids += [BOI] + [IMG] * (g[0] * g[1] * g[2] // merge**2) + [EOI]
            pix.append(rng.standard_normal((g[0] * g[1] * g[2], patch_dim)).astype(np.float32))
        out["pixel_values"] = np.concatenate(pix)
        out["image_grid_thw"] = np.asarray(images, np.int64)
    if video is not None:
        t, h, w = video
        ids += [BOV]
        for k in range(t):
            ids += [BOI] + [IMG] * (h * w // merge**2) + [EOI] + [100 + 16 + k % 10]  # '0'..'9' are ids 116..125
        ids += [EOV]
        out["pixel_values_videos"] = rng.standard_normal((t * h * w, patch_dim)).astype(np.float32)
        out["video_grid_thw"] = np.asarray([video], np.int64)
    ids += text_ids(rng, n_text) + [ASSISTANT, NL]
    out["input_ids"] = np.asarray([ids], np.int64)
    return out


def mm_types(ids: np.ndarray) -> np.ndarray:
    depth = np.cumsum(ids == BOV, -1) - np.cumsum(ids == EOV, -1)
    return np.where(ids == IMG, np.where(depth > 0, 2, 1), 0).astype(np.int64)


def left_pad_batch(prompts: list[dict[str, np.ndarray]], pad_id: int = 151329) -> dict[str, np.ndarray]:
    """Left-pad several single-row prompts into one batch; vision arrays concatenated in row order."""
    n = max(p["input_ids"].shape[1] for p in prompts)
    ids = np.full((len(prompts), n), pad_id, np.int64)
    mask = np.zeros((len(prompts), n), np.int64)
    for i, p in enumerate(prompts):
        L = p["input_ids"].shape[1]
        ids[i, n - L:] = p["input_ids"][0]
        mask[i, n - L:] = 1
    out = {"input_ids": ids, "attention_mask": mask}
    for key, grid in (("pixel_values", "image_grid_thw"), ("pixel_values_videos", "video_grid_thw")):
        parts = [p for p in prompts if key in p]
        if parts:
            out[key] = np.concatenate([p[key] for p in parts])
            out[grid] = np.concatenate([p[grid] for p in parts])
    return out
