"""The embedded tiny random checkpoint, and the tiny tokenizer that tests and the offline demo share.

The real GLM-4.1V tokenizer cannot be downloaded here, so this module builds a character-level `tokenizers`
WordLevel tokenizer that keeps the **real special-token ids** (151329-151348, `"\\n"` = 198). Prompts rendered with
the real chat template therefore produce the same special-token layout as the released model.

The embedded checkpoint ships as a config plus a seed: `materialize_tiny_checkpoint()` draws the weights with
NumPy from that seed and writes an ordinary HF-layout directory (config.json, model.safetensors, tokenizer.json,
chat_template.jinja, preprocessor_config.json, generation_config.json). Everything downstream (loading, generation)
then runs the same code path as a real checkpoint. Its weights are random: its output is gibberish by design.
"""

from __future__ import annotations

import json
import os
import shutil
from importlib import resources
from typing import Any

import numpy as np
from safetensors.numpy import save_file
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

from .config import Glm4vConfig
from .weights import hf_param_shapes

# Real GLM-4 family special tokens (docs/MODEL.md §6.2).
SPECIAL_TOKENS: dict[str, int] = {
    "<|endoftext|>": 151329,
    "[MASK]": 151330,
    "[gMASK]": 151331,
    "[sMASK]": 151332,
    "<sop>": 151333,
    "<eop>": 151334,
    "<|system|>": 151335,
    "<|user|>": 151336,
    "<|assistant|>": 151337,
    "<|observation|>": 151338,
    "<|begin_of_image|>": 151339,
    "<|end_of_image|>": 151340,
    "<|begin_of_video|>": 151341,
    "<|end_of_video|>": 151342,
    "<|image|>": 151343,
    "<|video|>": 151344,
    "</answer>": 151348,
}
# Vocabulary tokens of the real tokenizer whose exact ids could not be verified offline. The tiny tokenizer gives
# them ids in the unused 151345-151360 range; code must look them up by string, never by id.
THINKING_TOKENS: dict[str, int] = {
    "<answer>": 151347,
    "<think>": 151350,
    "</think>": 151351,
    "<|begin_of_box|>": 151357,
    "<|end_of_box|>": 151358,
}
NEWLINE_ID = 198
UNK = "[UNK]"


def chat_template_text() -> str:
    """The published GLM-4.1V chat template (hub revision 3c1471e5), verbatim."""
    return resources.files("glm41v_jax").joinpath("assets/chat_template.jinja").read_text(encoding="utf-8")


def tiny_vocab() -> dict[str, int]:
    vocab: dict[str, int] = {UNK: 0}
    for i, c in enumerate(chr(c) for c in range(32, 127)):
        vocab[c] = 100 + i  # 100..194
    vocab["\n"] = NEWLINE_ID
    vocab["\t"] = 199
    for i, c in enumerate("éèàüöäßç°×–—…’“”"):
        vocab[c] = 200 + i
    vocab.update(SPECIAL_TOKENS)
    vocab.update(THINKING_TOKENS)
    return vocab


def build_tokenizer():
    """A character-level WordLevel tokenizer with the real GLM special-token ids. Returns a `tokenizers.Tokenizer`."""
    tok = Tokenizer(models.WordLevel(vocab=tiny_vocab(), unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    # Thinking tags are ordinary (non-special) vocabulary tokens in the real tokenizer: they survive
    # skip_special_tokens decoding.
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in THINKING_TOKENS])
    return tok


def write_tokenizer_files(directory: str | os.PathLike) -> None:
    """tokenizer.json + tokenizer_config.json + chat_template.jinja, loadable by transformers and by us."""
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    build_tokenizer().save(os.path.join(directory, "tokenizer.json"))
    cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "unk_token": UNK,
        "padding_side": "left",
        "clean_up_tokenization_spaces": False,
        "model_max_length": 65536,
    }
    with open(os.path.join(directory, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(cfg, f, indent=2)
    with open(os.path.join(directory, "chat_template.jinja"), "w", encoding="utf-8") as f:
        f.write(chat_template_text())


def tiny_hf_config(**text_overrides: Any) -> dict[str, Any]:
    """config.json (published spelling) of the embedded tiny checkpoint."""
    text = {
        "model_type": "glm4v_text",
        "vocab_size": 151552,
        "hidden_size": 64,
        "intermediate_size": 160,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-5,
        "max_position_embeddings": 65536,
        "rope_theta": 10000.0,
        "partial_rotary_factor": 0.5,
        "rope_scaling": {"type": "default", "rope_type": "default", "mrope_section": [2, 1, 1]},
        "pad_token_id": 151329,
        "eos_token_id": [151329, 151336, 151338, 151348],
        "attention_bias": True,
        "hidden_act": "silu",
    }
    text.update(text_overrides)
    return {
        "architectures": ["Glm4vForConditionalGeneration"],
        "model_type": "glm4v",
        "image_token_id": 151343,
        "video_token_id": 151344,
        "image_start_token_id": 151339,
        "image_end_token_id": 151340,
        "video_start_token_id": 151341,
        "video_end_token_id": 151342,
        "tie_word_embeddings": False,
        "text_config": text,
        "vision_config": {
            "model_type": "glm4v_vision",
            "depth": 2,
            "hidden_size": 32,
            "num_heads": 2,
            "in_channels": 3,
            "patch_size": 14,
            "temporal_patch_size": 2,
            "spatial_merge_size": 2,
            "image_size": 112,
            "out_hidden_size": 64,
            "intermediate_size": 128,
            "rms_norm_eps": 1e-5,
            "attention_bias": False,
            "hidden_act": "silu",
        },
    }


# Test-sized processor limits: images between 4 and 64 merged tokens.
TINY_PREPROCESSOR = {
    "image_processor_type": "Glm4vImageProcessor",
    "size": {"shortest_edge": 2 * 28 * 28 * 4, "longest_edge": 2 * 28 * 28 * 64},
    "patch_size": 14,
    "temporal_patch_size": 2,
    "merge_size": 2,
    "do_resize": True,
    "do_rescale": True,
    "rescale_factor": 1 / 255,
    "do_normalize": True,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "do_convert_rgb": True,
}
TINY_VIDEO_PREPROCESSOR = {
    **TINY_PREPROCESSOR,
    "video_processor_type": "Glm4vVideoProcessor",
    "size": {"shortest_edge": 2 * 28 * 28 * 4, "longest_edge": 8 * 28 * 28 * 64},
    "fps": 2.0,
    "max_duration": 300,
    "do_sample_frames": True,
}


def random_hf_state_dict(hf_config: dict[str, Any], seed: int = 0, dtype=np.float32) -> dict[str, np.ndarray]:
    """HF-named weights with O(1) scale (norm weights 1 +- 0.1, embeddings N(0,1), matrices N(0, 1/fan_in))."""

    cfg = Glm4vConfig.from_hf(hf_config)
    rng = np.random.default_rng(seed)
    out: dict[str, np.ndarray] = {}
    for name, shape in hf_param_shapes(cfg).items():
        if "norm" in name and name.endswith(".weight"):
            a = 1.0 + 0.1 * rng.standard_normal(shape)
        elif name.endswith(".bias"):
            a = 0.1 * rng.standard_normal(shape)
        elif "embed_tokens" in name and cfg.tie_word_embeddings:  # it is also the output head: keep logits O(1)
            a = rng.standard_normal(shape) / np.sqrt(shape[1])
        elif "embed_tokens" in name or "position_embedding" in name:
            a = rng.standard_normal(shape)
        else:
            fan_in = int(np.prod(shape[1:]))
            a = rng.standard_normal(shape) / np.sqrt(fan_in)
        out[name] = a.astype(dtype)
    return out


TINY_SEED = 20250701


def write_random_hf_dir(directory: str | os.PathLike, seed: int = 0, **text_overrides: Any) -> str:
    """A weights-only HF checkpoint folder (config.json + model.safetensors, no tokenizer) of the tiny config with
    random fp32 weights: what the converter and loader tests feed. Returns the folder."""

    d = os.fspath(directory)
    os.makedirs(d, exist_ok=True)
    cfg = tiny_hf_config(**text_overrides)
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(cfg, f)
    save_file(random_hf_state_dict(cfg, seed), os.path.join(d, "model.safetensors"), metadata={"format": "pt"})
    return d


def default_cache_dir() -> str:
    base = os.environ.get("GLM41V_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.join(os.path.expanduser("~"), ".cache")), "glm41v_jax"
    )
    return os.path.join(base, f"tiny-{TINY_SEED}-v2")  # bump when the recipe changes


def materialize_tiny_checkpoint(directory: str | None = None) -> str:
    """Write the embedded tiny random checkpoint as an HF-layout directory (once) and return its path."""

    directory = directory or default_cache_dir()
    marker = os.path.join(directory, "model.safetensors")
    if os.path.exists(marker):
        return directory
    tmp = directory + f".tmp-{os.getpid()}"
    os.makedirs(tmp, exist_ok=True)
    cfg = tiny_hf_config()
    with open(os.path.join(tmp, "config.json"), "w", encoding="utf-8") as f:
        json.dump(cfg, f, indent=2)
    with open(os.path.join(tmp, "generation_config.json"), "w", encoding="utf-8") as f:
        json.dump({"eos_token_id": cfg["text_config"]["eos_token_id"], "pad_token_id": 151329,
                   "do_sample": False}, f, indent=2)
    with open(os.path.join(tmp, "preprocessor_config.json"), "w", encoding="utf-8") as f:
        json.dump(TINY_PREPROCESSOR, f, indent=2)
    with open(os.path.join(tmp, "video_preprocessor_config.json"), "w", encoding="utf-8") as f:
        json.dump(TINY_VIDEO_PREPROCESSOR, f, indent=2)
    write_tokenizer_files(tmp)
    state = random_hf_state_dict(cfg, TINY_SEED)
    # Random weights over a 151552-word vocabulary would almost never pick one of the ~130 ids the tiny tokenizer
    # can print. Zero the other rows of the output head and boost the known ones, so the demo shows characters.
    known = np.zeros(state["lm_head.weight"].shape[0], bool)
    known[list(tiny_vocab().values())] = True
    state["lm_head.weight"] = np.where(known[:, None], 3.0 * state["lm_head.weight"], 0.0).astype(np.float32)
    save_file(state, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(tmp, "README.txt"), "w", encoding="utf-8") as f:
        f.write(f"glm41v_jax embedded tiny checkpoint: RANDOM weights (seed {TINY_SEED}). Output is meaningless.\n")
    os.makedirs(os.path.dirname(directory) or ".", exist_ok=True)
    try:
        os.replace(tmp, directory)
    except OSError:  # another process won the race

        shutil.rmtree(tmp, ignore_errors=True)
    return directory
