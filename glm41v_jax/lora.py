"""LoRA adapters: which dense layers carry them, their tree, PEFT's tensors, merging, and the adapter directory.

The math lives in the one dense layer (`layers.Dense`, with `RuntimeConfig.lora`): y = W x + B A dropout(x) * alpha/r.
A = `lora_a` (*in, r) and B = `lora_b` (r, *out) sit in the "lora" variable collection beside "params", float32,
with the kernel's logical axes (in axes + None; None + out axes), so `sharding.param_shardings` places them with the
rules table. A model runs with adapters as `Glm4v(cfg).apply({"params": base, "lora": adapters}, ...)`.

Targets: `LoraConfig.targets` are patterns over the HF module names (`model.language_model.layers.3.mlp.down_proj`),
matched as PEFT matches a `target_modules` list: a name that equals the pattern or ends with "." + pattern, with `*`
and `?` wildcards (fnmatch). The candidates are the linear layers of the checkpoint (`lora_modules`): the decoder's
q/k/v/o_proj, gate_up_proj, down_proj; the vision blocks' attn.qkv, attn.proj, mlp.gate/up/down_proj; the merger's
proj, gate/up/down_proj. Not the convolutions (patch_embed, downsample) nor lm_head (the loss reads its kernel
directly). A pattern must match something, and the same modules in every layer (one set of sites serves the scanned
and the unrolled layouts): `resolve_lora` raises `LoraError` otherwise.

The adapter directory (`save_adapters` / `load_adapters`): `adapter.safetensors` (the unrolled tree, keys such as
`language_model/layers_0/self_attn/q_proj/lora_a`) and `adapter_config.json` (format, rank, alpha, dropout, targets,
sites, and the base model's identity). The identity (`base_identity`) is the SHA-256 of the model's config and of its
norm scales (the final norm and every decoder layer's post-MLP norm, rounded to bfloat16 first, so the same checkpoint
loaded in float32, bfloat16 or quantized (norms are never quantized) has one identity): small, cheap, and different
for another architecture or another fine-tune of the same one. An adapter whose identity differs from the model's is
refused (`check_base`).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import functools
import hashlib
import json
import math
import os
import shutil
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from .config import Glm4vConfig, LoraConfig
from .errors import Glm41vError
from .weights import build_rules, get_path, iter_leaves, set_path

ADAPTER_FORMAT = "glm41v-lora"
ADAPTER_VERSION = 1
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter.safetensors"
NOT_TARGETS = ("patch_embed.proj", "downsample", "lm_head")  # convolutions, and the head the loss reads directly


class LoraError(Glm41vError, ValueError):
    """A LoRA config or adapter that cannot be used: a target that matches nothing, a base model that is not the
    adapter's, a damaged adapter directory. The message names the field or file."""


@dataclasses.dataclass(frozen=True)
class LoraModule:
    """One linear layer that may carry an adapter."""

    hf_name: str  # e.g. "model.language_model.layers.3.self_attn.q_proj"
    path: tuple[str, ...]  # its Flax module path in the unrolled tree
    site: str  # the path with the layer index dropped, "/"-joined (layers.lora_site)
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]


def _split(flax_shape: tuple[int, ...], hf_shape: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """A kernel's (in shape, out shape) from its Flax shape (*in, *out) and torch's (out, in)."""
    o, i = hf_shape
    for k in range(1, len(flax_shape)):
        if math.prod(flax_shape[:k]) == i and math.prod(flax_shape[k:]) == o:
            return flax_shape[:k], flax_shape[k:]
    raise AssertionError((flax_shape, hf_shape))


@functools.lru_cache(maxsize=16)
def lora_modules(cfg: Glm4vConfig) -> dict[str, LoraModule]:
    """Every linear layer of `cfg` that may carry an adapter, by HF module name (module docstring)."""
    from .layers import lora_site

    out = {}
    for name, rule in build_rules(cfg).items():
        if not name.endswith(".weight") or rule.path[-1] != "kernel" or len(rule.hf_shape) != 2:
            continue
        module = name[: -len(".weight")]
        if any(module == n or module.endswith("." + n) for n in NOT_TARGETS):
            continue
        in_shape, out_shape = _split(rule.flax_shape, rule.hf_shape)
        out[module] = LoraModule(module, rule.path[:-1], lora_site(rule.path[:-1]), in_shape, out_shape)
    return out


def matches(pattern: str, name: str) -> bool:
    """PEFT's `target_modules` rule with wildcards: `name` equals `pattern` or ends with "." + it (fnmatch)."""
    parts = name.split(".")
    return any(fnmatch.fnmatchcase(".".join(parts[i:]), pattern) for i in range(len(parts)))


def resolve_lora(cfg: Glm4vConfig, lora: LoraConfig) -> LoraConfig:
    """`lora` with `sites` filled in for `cfg`'s model; LoraError for a target that matches no module, or modules
    matched in some layers only."""
    modules = lora_modules(cfg)
    chosen: dict[str, list[str]] = {}
    for pattern in lora.targets:
        hit = [m for m in modules.values() if matches(pattern, m.hf_name)]
        if not hit:
            kinds = sorted({m.hf_name.split(".")[-1] for m in modules.values()})
            raise LoraError(f"lora.targets: {pattern!r} matches no linear layer of the model (module names such as "
                            f"'model.language_model.layers.0.self_attn.q_proj'; last parts: {', '.join(kinds)}; "
                            "convolutions and lm_head take no adapter)")
        for m in hit:
            chosen.setdefault(m.site, []).append(m.hf_name)
    for site, names in chosen.items():
        every = [m.hf_name for m in modules.values() if m.site == site]
        if len(set(names)) != len(every):
            missing = sorted(set(every) - set(names))
            raise LoraError(f"lora.targets {list(lora.targets)} select {site.replace('/', '.')} in some layers only "
                            f"(not {missing[0]}, ...): adapters go on the same modules of every layer")
    return dataclasses.replace(lora, sites=tuple(sorted(chosen)))


def with_lora(cfg: Glm4vConfig, lora: LoraConfig | None) -> Glm4vConfig:
    """`cfg` running `lora` (resolved for it), or without adapters (None)."""
    return cfg.with_runtime(lora=None if lora is None else resolve_lora(cfg, lora))


def targeted(cfg: Glm4vConfig) -> list[LoraModule]:
    """The modules that carry adapters under `cfg.runtime.lora` (in checkpoint order)."""
    lora = cfg.runtime.lora
    return [] if lora is None else [m for m in lora_modules(cfg).values() if m.site in lora.sites]


# ---------------------------------------------------------------------------------------------------------------
# The adapter tree.


def abstract_adapters(cfg: Glm4vConfig) -> Any:
    """Shapes, dtypes and logical axes (boxed) of `cfg`'s adapters, in `cfg`'s layout (scanned or unrolled)."""
    from .model import Glm4v, _dummy_inputs

    if cfg.runtime.lora is None:
        raise LoraError("the model config has no LoRA adapters (runtime.lora is None)")
    return jax.eval_shape(lambda: Glm4v(cfg).init(jax.random.PRNGKey(0), **_dummy_inputs(cfg))["lora"])


def init_adapters(cfg: Glm4vConfig, rng: jax.Array) -> Any:
    """Fresh adapters (A random as PEFT's, B zero) in `cfg`'s layout, computed from their shapes alone (the base
    model's weights are not initialised)."""
    boxed = abstract_adapters(cfg)
    leaves, tree = jax.tree.flatten(nn.meta.unbox(boxed))
    keys = jax.random.split(rng, max(len(leaves), 1))
    paths = [p for p, _ in jax.tree_util.tree_flatten_with_path(nn.meta.unbox(boxed))[0]]
    out = []
    for key, path, leaf in zip(keys, paths, leaves, strict=True):
        if str(getattr(path[-1], "key", "")) == "lora_b":
            out.append(jnp.zeros(leaf.shape, leaf.dtype))
        else:  # lora_a (..., *in, r): fan_in = the product of the in axes (behind any scanned layer axis)
            fan_in = math.prod(leaf.shape[_n_lead(path):-1])
            bound = 1.0 / math.sqrt(max(fan_in, 1))
            out.append(jax.random.uniform(key, leaf.shape, leaf.dtype, -bound, bound))
    return jax.tree.unflatten(tree, out)


def _n_lead(path: Any) -> int:
    """1 when a key path is inside a scanned layer stack ("layers" / "blocks"), else 0."""
    names = [str(getattr(k, "key", k)) for k in path]
    return int(len(names) > 1 and names[1] in ("layers", "blocks"))


# ---------------------------------------------------------------------------------------------------------------
# PEFT's tensors: lora_A.weight (r, in), lora_B.weight (out, r) per HF module.


def adapters_from_hf(tensors: Mapping[str, tuple[np.ndarray, np.ndarray]], cfg: Glm4vConfig) -> dict:
    """{HF module name: (lora_A (r, in), lora_B (out, r))} -> the unrolled adapter tree (float32)."""
    r = cfg.runtime.lora.rank
    tree: dict = {}
    want = {m.hf_name: m for m in targeted(cfg)}
    if set(tensors) != set(want):
        raise LoraError(f"adapter tensors for {sorted(set(tensors) ^ set(want))[:4]} ... do not match the targets")
    for name, (a, b) in tensors.items():
        m = want[name]
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        if a.shape != (r, math.prod(m.in_shape)) or b.shape != (math.prod(m.out_shape), r):
            raise LoraError(f"{name}: lora_A {a.shape} / lora_B {b.shape}, expected ({r}, {math.prod(m.in_shape)}) /"
                            f" ({math.prod(m.out_shape)}, {r})")
        set_path(tree, m.path + ("lora_a",), np.ascontiguousarray(a.T.reshape(*m.in_shape, r)))
        set_path(tree, m.path + ("lora_b",), np.ascontiguousarray(b.T.reshape(r, *m.out_shape)))
    return tree


def adapters_to_hf(adapters: Mapping, cfg: Glm4vConfig) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The unrolled adapter tree -> {HF module name: (lora_A (r, in), lora_B (out, r))} (the inverse)."""
    r = cfg.runtime.lora.rank
    out = {}
    for m in targeted(cfg):
        a = np.asarray(get_path(adapters, m.path + ("lora_a",)), np.float32)
        b = np.asarray(get_path(adapters, m.path + ("lora_b",)), np.float32)
        out[m.hf_name] = (a.reshape(-1, r).T.copy(), b.reshape(r, -1).T.copy())
    return out


# ---------------------------------------------------------------------------------------------------------------
# Merging into a float base.


@functools.partial(jax.jit, static_argnums=3)
def _merged(kernel: jax.Array, a: jax.Array, b: jax.Array, scale: float) -> jax.Array:
    delta = jnp.tensordot(a.astype(jnp.float32), b.astype(jnp.float32), axes=1) * scale
    return (kernel.astype(jnp.float32) + delta.reshape(kernel.shape)).astype(kernel.dtype)


def merge_adapters(params: Mapping, adapters: Mapping, cfg: Glm4vConfig) -> dict:
    """W + A B * alpha / r folded into each targeted float kernel, in float32, rounded once to the kernel's dtype
    (the unrolled tree, "in_out" kernels; a sharded kernel keeps its sharding). Returns a new tree; the others are
    the caller's arrays. The merged model computes what the base + adapters compute, with no extra matmul."""
    from .quant import is_quantized

    if is_quantized(params):
        raise LoraError("adapters cannot be merged into quantized weights (the integer codes would be requantized); "
                        "load the float checkpoint")
    if cfg.runtime.kernel_layout != "in_out":
        raise ValueError("merge_adapters takes 'in_out' kernels (the checkpoint layout)")
    out = jax.tree.map(lambda x: x, dict(params))
    for m in targeted(cfg):
        kernel = get_path(out, m.path + ("kernel",))
        a, b = (get_path(adapters, m.path + (k,)) for k in ("lora_a", "lora_b"))
        merged = _merged(jnp.asarray(kernel), jnp.asarray(a), jnp.asarray(b), cfg.runtime.lora.scale)
        set_path(out, m.path + ("kernel",), np.asarray(merged) if isinstance(kernel, np.ndarray) else merged)
    return out


# ---------------------------------------------------------------------------------------------------------------
# The base model's identity.


def _host(x: Any) -> np.ndarray:
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        x = x.addressable_data(0)  # norm scales are replicated: every host holds the whole array
    return np.asarray(x)


def base_identity(params: Mapping, cfg: Glm4vConfig) -> dict[str, str]:
    """{"config_sha256", "norms_sha256"} of a model (module docstring); params unrolled or stacked, any dtype."""
    hf = cfg.to_hf()
    conf = hashlib.sha256(json.dumps(hf, sort_keys=True).encode()).hexdigest()
    lm = params["language_model"]
    if "layers" in lm:
        post = _host(lm["layers"]["post_mlp_layernorm"]["scale"])
    else:
        post = np.stack([_host(lm[f"layers_{i}"]["post_mlp_layernorm"]["scale"])
                         for i in range(cfg.text.num_hidden_layers)])
    h = hashlib.sha256()
    for x in (_host(lm["norm"]["scale"]), post):
        h.update(np.ascontiguousarray(np.asarray(x, np.float32).astype(ml_dtypes.bfloat16)).tobytes())
    return {"config_sha256": conf, "norms_sha256": h.hexdigest()}


def check_base(meta: Mapping[str, Any], identity: Mapping[str, str], adapter_dir: str, model: str) -> None:
    """LoraError unless the adapter's recorded base is `identity` (the model it is put on)."""
    base = meta.get("base", {})
    for key, what in (("config_sha256", "architecture (config.json)"), ("norms_sha256", "weights")):
        if base.get(key) != identity[key]:
            raise LoraError(f"adapter {adapter_dir}: it was trained on another base model than {model} (its "
                            f"{what} differ{'s' if key == 'config_sha256' else ''}: {key} {str(base.get(key))[:12]}"
                            f" != {identity[key][:12]}); use the model it was trained on"
                            + (f" ({base['model']})" if base.get("model") else ""))


# ---------------------------------------------------------------------------------------------------------------
# The adapter directory.


def adapter_meta(cfg: Glm4vConfig, identity: Mapping[str, str], model: str | None = None, **extra: Any) -> dict:
    lora = cfg.runtime.lora
    return {"format": ADAPTER_FORMAT, "version": ADAPTER_VERSION, "rank": lora.rank, "alpha": lora.alpha,
            "dropout": lora.dropout, "targets": list(lora.targets), "sites": list(lora.sites),
            "modules": [m.hf_name for m in targeted(cfg)], "base": {**identity, "model": model}, **extra}


def save_adapters(directory: str, adapters: Mapping, cfg: Glm4vConfig, identity: Mapping[str, str],
                  model: str | None = None, files: Mapping[str, Any] | None = None, **extra: Any) -> str:
    """Write the adapter directory (module docstring) atomically: into `directory`.tmp-new, then swapped in with two
    renames (the previous one moved to `directory`.old, then removed). `adapters` unrolled or stacked, host or
    device (fully addressable: gather multi-host ones first). `files`: more JSON files to put in it ({name: obj});
    `extra`: more adapter_config.json fields."""
    from safetensors.numpy import save_file

    from .weights import unstack_layers

    directory = os.path.abspath(directory)
    flat = {"/".join(p): np.ascontiguousarray(np.asarray(v, np.float32))
            for p, v in iter_leaves(unstack_layers(dict(adapters)))}
    tmp = directory + ".tmp-new"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    save_file(flat, os.path.join(tmp, ADAPTER_WEIGHTS), metadata={"format": "np"})
    for name, obj in {ADAPTER_CONFIG: adapter_meta(cfg, identity, model, **extra), **(files or {})}.items():
        with open(os.path.join(tmp, name), "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=1)
    old = directory + ".old"
    if os.path.isdir(directory):
        shutil.rmtree(old, ignore_errors=True)
        os.rename(directory, old)
    os.rename(tmp, directory)
    shutil.rmtree(old, ignore_errors=True)
    return directory


def read_adapter_config(directory: str) -> tuple[dict, LoraConfig]:
    """(the adapter_config.json dict, its LoraConfig); LoraError naming the file and field otherwise."""
    path = os.path.join(directory, ADAPTER_CONFIG)
    if not os.path.isdir(directory):
        raise LoraError(f"adapter {directory}: not a directory")
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
    except FileNotFoundError:
        raise LoraError(f"adapter {directory}: no {ADAPTER_CONFIG} (not an adapter directory written by "
                        "`glm41v train` with a lora: section)") from None
    except (OSError, ValueError, RecursionError) as e:
        raise LoraError(f"{path}: not readable JSON ({' '.join(str(e).split())[:120]})") from None
    if not isinstance(meta, dict) or meta.get("format") != ADAPTER_FORMAT:
        raise LoraError(f"{path}: field 'format' must be {ADAPTER_FORMAT!r}, got "
                        f"{meta.get('format') if isinstance(meta, dict) else type(meta).__name__!r}")
    if meta.get("version") != ADAPTER_VERSION:
        raise LoraError(f"{path}: field 'version' must be {ADAPTER_VERSION}, got {meta.get('version')!r}")
    if not isinstance(meta.get("base"), dict):
        raise LoraError(f"{path}: field 'base' must be an object")
    try:
        lora = LoraConfig(rank=meta.get("rank"), alpha=meta.get("alpha"), targets=tuple(meta.get("targets") or ()),
                          dropout=meta.get("dropout", 0.0))
    except Glm41vError as e:
        raise LoraError(f"{path}: {e}") from None
    return meta, lora


def load_adapters(directory: str, cfg: Glm4vConfig) -> tuple[dict, Glm4vConfig, dict]:
    """(adapters: the unrolled host tree, `cfg` with the adapter's LoRA config resolved, the adapter_config dict).
    Every tensor is checked against the model's adapter shapes (LoraError naming it)."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    directory = os.path.abspath(directory)
    meta, lora = read_adapter_config(directory)
    try:
        lcfg = with_lora(cfg.with_runtime(scan_layers=False), lora)
    except LoraError as e:
        raise LoraError(f"adapter {directory}: {e}") from None
    if list(lcfg.runtime.lora.sites) != list(meta.get("sites", [])):
        raise LoraError(f"adapter {directory}: its targets select {list(lcfg.runtime.lora.sites)} on this model, the "
                        f"adapter holds {meta.get('sites')}")
    path = os.path.join(directory, ADAPTER_WEIGHTS)
    try:
        flat = load_file(path)
    except FileNotFoundError:
        raise LoraError(f"adapter {directory}: {ADAPTER_WEIGHTS} is missing") from None
    except (SafetensorError, OSError, ValueError) as e:
        raise LoraError(f"{path}: not a readable safetensors file ({' '.join(str(e).split())[:120]})") from None
    want = {"/".join(p): v for p, v in iter_leaves(nn.meta.unbox(abstract_adapters(lcfg)))}
    if set(flat) != set(want):
        extra, missing = sorted(set(flat) - set(want)), sorted(set(want) - set(flat))
        raise LoraError(f"{path}: tensors do not match the adapter config (missing {missing[:3]}, unexpected "
                        f"{extra[:3]})")
    tree: dict = {}
    for key, a in want.items():
        x = flat[key]
        if x.shape != a.shape or x.dtype != np.float32:
            raise LoraError(f"{path}: tensor {key} has shape {x.shape} {x.dtype}, expected {a.shape} float32")
        if not np.isfinite(x).all():
            raise LoraError(f"{path}: tensor {key} holds non-finite values")
        set_path(tree, tuple(key.split("/")), x)
    return tree, lcfg.with_runtime(scan_layers=cfg.runtime.scan_layers), meta


__all__ = ["ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "LoraError", "LoraModule", "abstract_adapters", "adapter_meta",
           "adapters_from_hf", "adapters_to_hf", "base_identity", "check_base", "init_adapters", "load_adapters",
           "lora_modules", "matches", "merge_adapters", "read_adapter_config", "resolve_lora", "save_adapters",
           "targeted", "with_lora"]
