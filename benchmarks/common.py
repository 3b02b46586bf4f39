"""What the generation and training benchmarks share: the "small" config of issue 3 (text hidden 1024, 8 layers,
16 q / 2 kv heads, MLP 2816, mrope [4, 6, 6], vocab 151552; vision hidden 512, depth 4, 4 heads, out 1024), its
random transformers model, and the same-run setup of torch and JAX."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

SMALL = {
    "text": dict(vocab_size=151552, hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
                 num_attention_heads=16, num_key_value_heads=2,
                 rope_scaling={"rope_type": "default", "mrope_section": [4, 6, 6]}),
    "vision": dict(depth=4, hidden_size=512, num_heads=4, out_hidden_size=1024, intermediate_size=2816,
                   image_size=336, patch_size=14),
}


def small_config() -> dict:
    """The "small" config as an HF config dict."""
    from glm41v_jax import tiny

    d = tiny.tiny_hf_config()
    d["text_config"].update(SMALL["text"])
    d["vision_config"].update(SMALL["vision"])
    return d


def setup(threads: int) -> None:
    """torch on `threads` threads, JAX fp32 matmuls at full precision, and this package's XLA:CPU flag (imported
    before JAX's backend starts, as in the product)."""
    import torch

    torch.set_num_threads(threads)
    import jax

    jax.config.update("jax_default_matmul_precision", "highest")
    import glm41v_jax  # noqa: F401


def hf_small_model(seed: int = 0) -> tuple[dict, Any, dict]:
    """(HF config dict, the random transformers model, a NumPy copy of its state dict)."""
    import torch
    from transformers import Glm4vConfig, Glm4vForConditionalGeneration

    hf_cfg = small_config()
    torch.manual_seed(seed)
    model = Glm4vForConditionalGeneration(Glm4vConfig(**hf_cfg))
    state = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    return hf_cfg, model, state


def print_table(columns: list[tuple[str, str]], rows: Iterable[Mapping[str, Any]], left: int = 0) -> None:
    """Print a Markdown table. `columns`: (header, format string over a row's keys, e.g. "{speedup:.2f}x"); the
    first `left` columns are left-aligned, the rest right-aligned."""
    print("| " + " | ".join(h for h, _ in columns) + " |")
    print("|" + "|".join("---" if i < left else "---:" for i in range(len(columns))) + "|")
    for r in rows:
        print("| " + " | ".join(f.format(**r) for _, f in columns) + " |")
