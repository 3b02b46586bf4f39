"""XLA:CPU tuning applied when the package is imported (before JAX starts its backend).

jaxlib 0.10 fuses chains of matmuls and the elementwise ops between them into one YNNPACK subgraph. On the
vision tower with several images (4096 patches) one such chain (last block's MLP, post-norm, downsample, merger
projection: ~21 GFLOP of matmuls, ~0.13 s at this machine's 170-178 GFLOP/s) ran 1.03 s. With
`--xla_cpu_experimental_ynn_fusion_type=individual_dot` (each matmul its own YNNPACK call) the batch-4 prefill of
the generation benchmark drops from ~3.7 s to ~2.8 s and nothing gets slower (BENCHMARKS.md, "XLA:CPU flags").
The flag only concerns the CPU backend.

It is added to XLA_FLAGS only when: XLA_FLAGS does not already choose a YNN fusion type, the installed jaxlib is a
0.10.x release (an unknown flag aborts XLA, so it is not guessed for other versions), and GLM41V_XLA_CPU_TUNING is
not "0". It has no effect when JAX's backend was already started before this package was imported.
"""

from __future__ import annotations

import os
from importlib import metadata

FLAG = "--xla_cpu_experimental_ynn_fusion_type=individual_dot"


def _jaxlib_version() -> str:
    try:
        return metadata.version("jaxlib")
    except metadata.PackageNotFoundError:
        return ""


def tune(environ: dict[str, str] | None = None, jaxlib_version: str | None = None) -> bool:
    """Add FLAG to XLA_FLAGS in `environ` (default os.environ) when the rules above allow; True if added."""
    env = os.environ if environ is None else environ
    flags = env.get("XLA_FLAGS", "")
    version = _jaxlib_version() if jaxlib_version is None else jaxlib_version
    if env.get("GLM41V_XLA_CPU_TUNING", "1") == "0" or "ynn_fusion_type" in flags or not version.startswith("0.10."):
        return False
    env["XLA_FLAGS"] = f"{flags} {FLAG}".strip()
    return True


tune()
