"""Backend-specific tuning, in one place: which platform a program is compiled for, the measured per-platform
defaults, the XLA:CPU special cases, and the one XLA flag the package sets.

Every choice here changes speed or memory only, never a result: each special path computes the reference math
and the tests compare the two. The measurements behind each choice are in BENCHMARKS.md, "Measurements behind
design choices".

* `target_platform()`: the platform of the devices of the mesh the program is traced for ("tpu" when compiling
  for a TPU topology from a CPU host), else `jax.default_backend()`. Every switch below reads it.
* `BACKEND_TUNING` / `backend_default(platform, key)`: the per-platform defaults: `engine_kernel_layout`, the
  Engine's decode kernel layout ("out_in" on CPU, "in_out" on TPU and GPU; see `layers.Dense`), and `dtype`, the
  Pipeline's weights and compute dtype when none is given ("float32" on CPU, "bfloat16" on TPU and GPU), and
  `cache_layout`, the KV cache's device layout in the Engine's programs: "compiler" (TPU) lets the compiler choose
  it for the decode loop (`jax.experimental.layout.Layout.AUTO`) and makes the prefill and insert programs write
  that layout, "default" (CPU, GPU) keeps row-major. On a v5e-8 at batch 8 the TPU compiler's decode loop wants
  (S, K, B, H)-major, so with row-major arguments every chunk copied each layer's cache in and out (BENCHMARKS.md,
  "TPU plans"); only from `AUTO_CACHE_MIN_ROWS` (8) cache rows per device: at 1 row the compiler gains nothing and
  re-lays out weights per chunk instead (`engine.Engine._auto_cache_layout` has the figures). XLA:CPU takes only
  default layouts, and GPU is not measured yet. `quant_matmul`: how a
  weight-only int8 `layers.Dense` multiplies ("int8_dot" on CPU, "dequant" on TPU and GPU; the table's comment),
  `quant_matmul_int4` the same for int4, and `engine_kernel_layout_int4` the Engine's layout for an int4 model.
  `prefill_chunk`: the Engine's chunked prefill (tokens; `decode.prefill_logits`): a longer prompt bucket runs
  through the decoder in chunks of at most this many tokens inside the one prefill program.
* XLA:CPU special cases (no other module tests the platform for speed):
  - `use_blocked_attention(num_queries)`: prefill and vision attention (32+ queries) run
    `attention.blocked_attention`, the reference math over query chunks whose fp32 logits stay within
    `ATTENTION_BLOCK_BYTES`, in cache. The kernel lives in attention.py, next to the one-block math it reproduces.
  - `sum_of_squares(x)`: the fp32 sum of squares of a large array (the optimizer's global norm) as a loop over
    row blocks. XLA:CPU emits a reduction fused with its elementwise producer as a scalar loop; the blocks make it
    vectorise.
  - `embed_attend_rows_first(rows)`: the tied-embedding projection (`layers.Embed.attend`) of a few rows
    (decode) contracts the (V, D) table as E . x^T, the order the "out_in" Dense kernels use; more rows take
    x . E^T. Measured on CPU; on TPU and GPU the compiler picks the operand layouts itself, so the switch is
    applied on every platform (one program shape everywhere).
* The XLA:CPU flag (`XLA_CPU_FLAG`): importing `glm41v_jax` adds
  `--xla_cpu_experimental_ynn_fusion_type=individual_dot` to the `XLA_FLAGS` environment variable, so that each
  matmul is its own YNNPACK call. jaxlib 0.10 otherwise fuses a chain of matmuls and the elementwise ops between
  them into one YNNPACK subgraph, which ran the vision tower's last chain several times slower than its matmuls
  alone. It is added only when all of these hold: `GLM41V_XLA_CPU_TUNING` is not "0" (the off switch), XLA_FLAGS
  does not already choose a YNN fusion type, and the installed jaxlib is a 0.10.x release (XLA aborts on a flag it
  does not know, so it is not guessed for other versions). It concerns the CPU backend only, and has no effect
  when JAX started its backend before `glm41v_jax` was imported. `XLA_CPU_FLAG_ADDED` says whether this import
  added it. The README states it too ("Backend tuning and the XLA flag set at import").
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping
from importlib import metadata

import jax
import jax.numpy as jnp

# ---------------------------------------------------------------------------------------------------------------
# The XLA flag set at import.

XLA_CPU_FLAG = "--xla_cpu_experimental_ynn_fusion_type=individual_dot"
XLA_CPU_TUNING_ENV = "GLM41V_XLA_CPU_TUNING"  # "0" turns the flag off


def _jaxlib_version() -> str:
    try:
        return metadata.version("jaxlib")
    except metadata.PackageNotFoundError:
        return ""


def add_xla_cpu_flag(environ: MutableMapping[str, str] | None = None, jaxlib_version: str | None = None) -> bool:
    """Add `XLA_CPU_FLAG` to XLA_FLAGS in `environ` (default os.environ) when the rules in the module docstring
    allow; True if it was added."""
    env = os.environ if environ is None else environ
    flags = env.get("XLA_FLAGS", "")
    version = _jaxlib_version() if jaxlib_version is None else jaxlib_version
    if env.get(XLA_CPU_TUNING_ENV, "1") == "0" or "ynn_fusion_type" in flags or not version.startswith("0.10."):
        return False
    env["XLA_FLAGS"] = f"{flags} {XLA_CPU_FLAG}".strip()
    return True


# Run at import, before JAX starts its backend (glm41v_jax/__init__.py imports this module first).
XLA_CPU_FLAG_ADDED = add_xla_cpu_flag()


# ---------------------------------------------------------------------------------------------------------------
# The target platform and the per-platform defaults.


def target_platform() -> str:
    """The platform the traced program is compiled for: that of the context mesh's devices (`jax.set_mesh`;
    "tpu" when compiling for a TPU topology from a CPU host), else `jax.default_backend()`."""
    mesh = jax.sharding.get_abstract_mesh()
    dev = None if mesh.empty else getattr(mesh, "abstract_device", None)
    platform = getattr(dev, "platform", None)
    return str(platform) if platform else jax.default_backend()


# engine_kernel_layout: the Engine's decode kernel layout (layers.Dense).
#   cpu "out_in": XLA:CPU streams W . x^T at the memory bandwidth at small batch, where x . W does not.
#   tpu "in_out": both layouts read the same HBM bytes per decode step; the TPU compiler tiles each weight itself,
#       so the checkpoint layout needs no re-layout.
#   gpu "in_out": not measured on a GPU; like TPU, the checkpoint layout (cuBLAS takes either transpose).
# dtype: the Pipeline's default param/compute dtype. bfloat16 is native on TPU and GPU matrix units and halves the
#   weights' memory; XLA:CPU has no fast bf16 matmul, and float32 keeps CPU results comparable with transformers.
# quant_matmul: how a weight-only int8 Dense multiplies (layers.Dense; benchmarks/quant_matmul.py measures it).
#   cpu "int8_dot": XLA:CPU materialises codes.astype(f32) and reads it at fp32 width: "dequant" ran at 0.15-0.65x
#       the fp32 matmul at 1-4 rows. An int8 x int8 -> int32 dot of dynamically quantized activation rows, in the
#       Engine's "out_in" layout, ran at 1.3-2.7x fp32 at 1 row and 2.0-3.8x at 4 (small and 9B MLP shapes), and
#       0.87-1.06x at 320 rows (prefill); its 1-row GEMV is slow, so rows are zero-padded to
#       layers.INT8_DOT_MIN_ROWS. The activation's int8 rounding adds to the error: max 1.1-1.4% of the output
#       against 0.8-1.0% for the weights' alone (random std-0.02 weights).
#   tpu/gpu "dequant": the activations stay in the compute dtype; the TPU compiler fuses the convert into the dot
#       (no temporaries for a 4096 x 13696 int8 or int4 kernel on a v5e-1) and reads int4 packed two to a byte.
# quant_matmul_int4: the same for int4 Dense layers. cpu "int8_dot": the int4 codes (held as int8 on CPU) in an
#   int8 x int8 -> int32 dot batched over the groups, the partial sums times the group scales (layers.Dense), up to
#   layers.INT4_INT8_DOT_MAX_ROWS rows: in "in_out" 0.4-1.1x the fp32 matmul at 1 row and 1.0-3.2x at 4 (small
#   MLP and lm_head shapes, best of 7 and median of 5 on a loaded 2-core VM, 2026-12-01), where "dequant"
#   (materialised codes * scales in fp32) ran at 0.2-0.5x; at 320 rows (prefill) the grouped dot ran at 0.5x and
#   "dequant" at 0.85-0.9x, so more rows run "dequant". It cannot beat int8 on CPU: a code is a byte there too
#   (XLA:CPU has no packed int4) and the group sums add work (0.5-1x the int8 form's speed).
#   tpu "grouped": the same grouped dot with the activations in the compute dtype and the codes converted inside it
#       (layers.Dense `_int4_grouped_dot`), up to layers.INT4_GROUPED_MAX_ROWS["grouped"] rows. The TPU compiler
#       does not fuse "dequant"'s codes * group scales into the dot: it materialises the kernel, and a 4096 x 27392
#       int4 kernel at 1-512 rows moved 485-516 MiB of HBM against its 57-61 MiB minimum on v5e-1 and v6e-1
#       (ratio 0.12-0.17; the whole decode step on v6e-1: 0.27); the grouped dot reads its minimum (1.00) at 1, 8,
#       64 and 512 rows, with no temporaries (benchmarks/int4_tpu_forms.py, 2026-12-01). Above 512 rows (prefill
#       chunks) "dequant": the grouped dot's contraction is one group (128) wide, half of a v6e MXU, where the
#       materialised kernel is amortised over the rows (by MXU width; not timed on a TPU).
#   gpu "dequant", as int8 (not measured on a GPU).
# prefill_chunk: the Engine's chunked prefill setting (tokens; 0 = the prompt in one piece).
#   tpu/gpu "2048": a chunk's temporaries (MLP activations, attention over the cache) stay small against the
#       weights. The 9B in int4 at a 32k context on one v5e chip (TPU compiler; 31744-token prompt): one piece needed
#       19.57 GiB; chunks of 3968 tokens (setting 4096) peak at 12.69 GiB, of 2048 at 11.21 GiB, for the same
#       compile time (the loop body is one chunk); a 2048-row chunk still fills the MXU, and re-reading the weights
#       per chunk costs ~16 x 7 GiB at 819 GB/s (~0.14 s) against ~4.3 s of prefill FLOPs at peak (BENCHMARKS.md
#       "Weight-only quantization: TPU plans"). GPU: not measured; the same reasoning.
#   cpu "8192": prompts up to 8k run in one piece (their programs unchanged); longer ones are chunked to bound host
#       memory. Chunking costs no time on XLA:CPU: a 4096-token prefill ("small" config) in chunks of 2048 and 1024
#       ran at 0.93x and 0.89x the one-piece time with 0.50x and 0.25x its temporaries (benchmarks/chunked_prefill.py,
#       BENCHMARKS.md "Weight-only quantization: TPU plans").
# engine_kernel_layout_int4: the Engine's layout for an int4 model. cpu "in_out": the grouped dot's batch (group)
#   axes lead the codes, so YNNPACK reads them in place; in "out_in" XLA copies every kernel into that order first.
AUTO_CACHE_MIN_ROWS = 8  # cache_layout "compiler": from this many KV-cache rows per device (module docstring)
BACKEND_TUNING: dict[str, dict[str, str]] = {
    "cpu": {"engine_kernel_layout": "out_in", "dtype": "float32", "cache_layout": "default",
            "quant_matmul": "int8_dot", "quant_matmul_int4": "int8_dot", "engine_kernel_layout_int4": "in_out",
            "prefill_chunk": "8192"},
    "tpu": {"engine_kernel_layout": "in_out", "dtype": "bfloat16", "cache_layout": "compiler",
            "quant_matmul": "dequant", "quant_matmul_int4": "grouped", "engine_kernel_layout_int4": "in_out",
            "prefill_chunk": "2048"},
    "gpu": {"engine_kernel_layout": "in_out", "dtype": "bfloat16", "cache_layout": "default",
            "quant_matmul": "dequant", "quant_matmul_int4": "dequant", "engine_kernel_layout_int4": "in_out",
            "prefill_chunk": "2048"},
}

def backend_default(platform: str, key: str) -> str:
    """`BACKEND_TUNING[platform][key]`; "cuda"/"rocm" read "gpu", and platforms not in the table read "cpu"."""
    platform = {"cuda": "gpu", "rocm": "gpu"}.get(platform, platform)
    return BACKEND_TUNING.get(platform, BACKEND_TUNING["cpu"])[key]


# ---------------------------------------------------------------------------------------------------------------
# XLA:CPU special cases.

BLOCKED_ATTENTION_MIN_QUERIES = 32  # from this many queries per row, CPU attention runs blocked
ATTENTION_BLOCK_BYTES = 1 << 20  # fp32 logits per attention block (stays in cache)
BLOCKED_SUM_OF_SQUARES_MIN = 1 << 22  # arrays from this many elements up are summed in blocks on CPU
SUM_OF_SQUARES_BLOCK = 1 << 18  # elements per block (1 MiB of fp32)
EMBED_ATTEND_SMALL_ROWS = 16  # Embed.attend: up to this many rows E . x^T, above it x . E^T


def use_blocked_attention(num_queries: int) -> bool:
    """Whether the XLA attention of `num_queries` queries per row runs `attention.blocked_attention`: on CPU, for
    prefill and vision sizes. Decode (one query) and every other platform run the one-block math."""
    return num_queries >= BLOCKED_ATTENTION_MIN_QUERIES and target_platform() == "cpu"


def embed_attend_rows_first(rows: int) -> bool:
    """Whether `Embed.attend` contracts the (V, D) table as E . x^T (True: few rows, decode) or x . E^T."""
    return rows <= EMBED_ATTEND_SMALL_ROWS


def sum_of_squares(x: jax.Array) -> jax.Array:
    """sum(x ** 2) in fp32.

    On CPU, arrays of `BLOCKED_SUM_OF_SQUARES_MIN` elements and more are summed as a loop over ~1 MiB row blocks
    whose squares are materialised in cache and reduced over rows, which vectorises (a fused square-and-reduce is a
    scalar loop on XLA:CPU). Elsewhere it is the plain reduction, which also keeps sharded arrays in place.
    """
    if target_platform() != "cpu" or x.size < BLOCKED_SUM_OF_SQUARES_MIN:
        return jnp.sum(jnp.square(x.astype(jnp.float32)))
    width = 1024 if x.size % 1024 == 0 else x.shape[-1]
    flat = x.reshape(-1, width)  # a bitcast of the row-major buffer
    rows = max(1, SUM_OF_SQUARES_BLOCK // width)
    n = flat.shape[0] // rows
    if n == 0:
        return jnp.sum(jnp.square(x.astype(jnp.float32)))
    blocks = flat[: n * rows].reshape(n, rows, width)

    def body(i, acc):
        b = blocks[i].astype(jnp.float32)
        return acc + jnp.sum(jax.lax.optimization_barrier(b * b), axis=0)

    acc = jax.lax.fori_loop(0, n, body, jnp.zeros((width,), jnp.float32))
    rest = flat[n * rows :].astype(jnp.float32)
    return jnp.sum(acc) + jnp.sum(rest * rest)
