"""glm41v_convert: HF safetensors -> Orbax conversion for glm41v_jax (`glm41v convert SRC DST`).

`convert(src, dst, dtype=..., quantize=None|"int8"|"int4")` streams one tensor at a time (quantizing it when asked)
into an Orbax checkpoint and commits atomically; see
`hf_to_orbax` for the format and `glm41v_jax.loading.load` for reading it back onto any mesh.
"""

from .hf_to_orbax import convert, save_converted

__all__ = ["convert", "save_converted"]
