"""The text of a `glm41v plan` report (`glm41v plan` without `--json`): a few aligned lines, per chip.

`format_report` renders the dict that `glm41v_jax.plan.plan_generate` / `plan_train` return: the slice and mesh,
the bucket or train step, the memory per chip against HBM, each compiled program's figures, the roofline bounds and
efficiency ratios, and whether it fits (with what would fit when it does not).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .buckets import format_bytes


def _fmt_flops(x: float | None) -> str:
    if not x:
        return "-"
    for unit, f in (("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9)):
        if x >= f:
            return f"{x / f:.2f} {unit}"
    return f"{x:.3g} FLOP"


def _weights(r: dict[str, Any]) -> str:
    """', int8 weights (groups of 128, float: vision)' for a quantized plan, '' for a float one."""
    q = r.get("quantize") or {"scheme": "none"}
    if q["scheme"] == "none":
        return ""
    group = f"groups of {q['group_size']}, " if q["scheme"] == "int4" else ""
    return f", {q['scheme']} weights ({group}float: {', '.join(q['skip']) or 'nothing'})"


def format_report(r: Mapping[str, Any]) -> str:
    """The plan as a few aligned lines (per chip)."""
    lines = [f"plan: {r['kind']} on {r['tpu']} ({r['topology']}: {r['chips']} chips, {r['hosts']} host"
             f"{'s' if r['hosts'] > 1 else ''}, {r['devices']} devices), mesh {r['mesh']}",
             f"model: {r['model']}"]
    if r["kind"] == "generate":
        b = r["bucket"]
        lines.append(f"bucket: batch {b['batch']}, prompt {b['prompt_tokens']} tokens ({b['vision_patches']} vision "
                     f"patches), {b['max_new_tokens']} new tokens, KV cache {b['cache_slots']} slots; {r['dtype']}"
                     f"{_weights(r)}, attention {r['attention_impl']}")
        pc_len = r.get("prefill_chunk")
        if pc_len:
            n = -(-b["prompt_tokens"] // pc_len)
            vision = "; the vision tower runs once, before them" if b["vision_patches"] else ""
            lines.append(f"prefill: chunked, {n} chunks of {pc_len} tokens in one program (setting "
                         f"{r['prefill_chunk_setting']}{vision})")
        elif "prefill_chunk" in r:
            lines.append(f"prefill: one piece (the prompt fits the chunk setting {r['prefill_chunk_setting']})"
                         if r["prefill_chunk_setting"] else "prefill: one piece (chunking off)")
    else:
        s = r["step"]
        lines.append(f"step: {s['global_rows']} rows x {s['seq_len']} tokens x {s['accum_steps']} micro-batches = "
                     f"{s['tokens_per_step']} tokens, {s['patches_per_step']} patches; remat {s['remat_policy']}, "
                     f"grads {s['grad_dtype']}, moments {s['state_dtype']}, frozen "
                     f"{'the base (LoRA)' if r.get('lora') else s['freeze'] or 'none'}")
        if r.get("lora"):
            lo = r["lora"]
            lines.append(f"lora: rank {lo['rank']}, alpha {lo['alpha']} on {lo['modules']} modules "
                         f"({', '.join(lo['targets'])}): {lo['adapter_params'] / 1e6:.1f} M adapter params "
                         f"({format_bytes(lo['adapter_bytes_per_chip'])} per chip) trained; base "
                         f"{lo['base_params'] / 1e9:.2f} B params ({format_bytes(lo['base_bytes_per_chip'])} per chip"
                         f"{_weights(r)}) frozen")
    pc = r["per_chip"]
    hbm = pc["hbm_bytes"]
    lines.append("per chip:")
    for label, key in (("parameters", "params_bytes"), ("optimizer state", "opt_state_bytes"),
                       ("KV cache", "kv_cache_bytes"), ("temporaries", "temp_bytes"), ("total", "total_bytes")):
        lines.append(f"  {label:<18}{format_bytes(pc[key]):>12}  {100 * pc[key] / hbm:5.1f}% of "
                     f"{format_bytes(hbm)} HBM")
    if r["programs"]:
        lines.append("programs (per chip; the compiler counts a loop body once):")
        for p in r["programs"]:
            lines.append(f"  {p['name']:<30} compile {p['compile_s']:7.2f} s  {_fmt_flops(p['flops']):>12}  "
                         f"HBM {format_bytes(p.get('hbm_bytes', p['bytes_accessed'])):>11}  "
                         f"total {format_bytes(p['memory']['total_bytes'])}")
    an = r.get("analytic", {})
    ro = r.get("roofline", {})
    ef = r.get("efficiency", {})
    if r["kind"] == "generate" and ro:
        lines.append(f"prefill: {_fmt_flops(an['prefill_flops'])} ({_fmt_flops(an['prefill_flops_per_chip'])} per chip)"
                     f", {ro['prefill_s_at_peak'] * 1e3:.1f} ms at peak")
        lines.append(f"decode: minimum {format_bytes(an['decode_min_bytes_per_chip'])} per chip per step -> at most "
                     f"{ro['decode_tokens_per_s_bound']:.0f} tokens/s ({ro['decode_step_s_bound'] * 1e3:.2f} ms/step)")
        if ef.get("decode_bytes_ratio") is not None:
            dec = next(p for p in r["programs"] if p["name"] == "decode")
            sp = dec["hbm_bytes_split"]
            lines.append(f"efficiency: decode bytes ratio {ef['decode_bytes_ratio']:.2f} (minimum / the compiled "
                         f"step's HBM bytes, {format_bytes(dec['hbm_bytes_per_step'])}: the loop body's "
                         f"{format_bytes(sp['loops'])} + 1/{r['chunk_size']} of the chunk's "
                         f"{format_bytes(sp['entry'])} outside it; {ef['decode_bytes_ratio_uncalibrated']:.2f} against "
                         "the compiler's 'bytes accessed')")
    if r["kind"] == "train" and ro:
        lines.append(f"model FLOPs per step: {_fmt_flops(an['model_flops_per_step'])} "
                     f"({_fmt_flops(an['model_flops_per_chip'])} per chip); step {ro['step_s_at_peak']:.2f} s at peak, "
                     f"{ro['step_s_at_50pct_mfu']:.2f} s at 50% MFU ({ro['tokens_per_s_at_50pct_mfu']:.0f} tokens/s)")
        if "mfu_at_step_time" in ro:
            lines.append(f"a measured step of {ro['step_time_s']:.3g} s means MFU {100 * ro['mfu_at_step_time']:.1f}%")
        if ef.get("flops_ratio") is not None:
            lines.append(f"efficiency: decoder-layer FLOPs ratio {ef['flops_ratio']:.2f} (model / compiled; remat "
                         "recompute)")
    if r.get("compile_error"):
        ce = r["compile_error"]
        req, avail = ce.get("required_bytes"), ce.get("available_bytes")
        figs = f"{format_bytes(req)} needed, {format_bytes(avail)} available" if req else ce["message"]
        lines.append(f"DOES NOT FIT: the TPU compiler refused the {ce['program']} program: {figs}")
        lines.append(f"  compiler: {ce['message']}")
    elif not r["fits"]:
        lines.append("DOES NOT FIT")
    else:
        lines.append(f"fits: {format_bytes(pc['total_bytes'])} of {format_bytes(hbm)} per chip")
    for a in r.get("advice", []):
        lines.append(f"  would fit: {a}" if not r["fits"] else f"  {a}")
    return "\n".join(lines)
