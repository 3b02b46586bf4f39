"""LoRA adapters (glm41v_jax/lora.py, layers.Dense) and LoRA training (train/lora_step.py).

Parity: PEFT's `LoraConfig` / `get_peft_model` on transformers' `Glm4vForConditionalGeneration` (tiny O(1)-weight
config "a" of tests/reference.py), with the same adapter values (random A and nonzero B, copied into PEFT's
lora_A / lora_B): logits, the training loss and every adapter gradient against torch autograd. The PEFT model is
the reference: nothing it computes comes from the code under test (the adapter values are drawn here and copied into
both). Training: step 0 is the base exactly, the base and the optimizer state stay as they should, a few hundred
steps overfit, a quantized (int8) base trains (QLoRA), bad targets and ranks are refused.
"""

from __future__ import annotations

import json
import os
import shutil
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference as R
import test_train_loop as TL
import torch
from test_train_step import FP32, SMALL_VOCAB, _batch_rows, hf_arrays, hf_loss, media_samples, our_batch, small_ids

from glm41v_jax import lora as LO
from glm41v_jax import tiny, weights
from glm41v_jax.config import Glm4vConfig, LoraConfig
from glm41v_jax.inputs import prepare_inputs
from glm41v_jax.model import Glm4v
from glm41v_jax.weights import stack_layers, unstack_layers
from glm41v_train import loss as L
from glm41v_train import optim as O
from glm41v_train import step as S
from glm41v_train.lora_step import LoraTrainStep

peft = pytest.importorskip("peft", reason="peft is in the test extra")
REPO = TL.REPO

# Text decoder modules, vision block and merger modules: every kind of shape (fused gate_up (D, 2, F), q (D, N, H),
# o_proj's two input axes, the vision qkv (Dv, 3, Nv, Hv)). "down_proj" matches the decoder's, the vision blocks'
# and the merger's, as it does in PEFT.
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_up_proj", "down_proj", "attn.qkv", "attn.proj",
           "merger.proj")
RANK, ALPHA = 4, 12.0


def _rel(d: np.ndarray, g: np.ndarray) -> float:
    return float(np.linalg.norm(d - g) / max(np.linalg.norm(g), 1e-30))


@pytest.fixture(scope="module")
def peft_pair():
    """(PEFT model, our cfg with LoRA, base params, adapters): the same random A and B (B nonzero) in both."""
    hf, cfg, params = R.hf_and_params("a", seed=3)
    pm = peft.get_peft_model(hf, peft.LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0,
                                                 target_modules=list(TARGETS)))
    pm.eval()
    lcfg = LO.with_lora(cfg, LoraConfig(rank=RANK, alpha=ALPHA, targets=TARGETS))
    rng = np.random.default_rng(11)
    tensors = {}
    wrapped = {n for n, m in pm.base_model.model.named_modules() if hasattr(m, "lora_A")}
    assert wrapped == {m.hf_name for m in LO.targeted(lcfg)}  # the same modules carry adapters
    for name in sorted(wrapped):
        mod = pm.base_model.model.get_submodule(name)
        a_w, b_w = mod.lora_A["default"].weight, mod.lora_B["default"].weight
        a = rng.uniform(-1, 1, a_w.shape).astype(np.float32) / np.sqrt(a_w.shape[1])
        b = rng.standard_normal(b_w.shape).astype(np.float32) / np.sqrt(RANK)
        with torch.no_grad():
            a_w.copy_(torch.from_numpy(a))
            b_w.copy_(torch.from_numpy(b))
        tensors[name] = (a, b)
    return pm, lcfg, params, LO.adapters_from_hf(tensors, lcfg)


@pytest.mark.slow
def test_logits_match_peft(peft_pair):
    pm, lcfg, params, adapters = peft_pair
    rng = np.random.default_rng(2)
    pd = lcfg.vision.patch_dim
    for case in (R.build_prompt(rng, images=[(1, 4, 6), (1, 2, 2)], patch_dim=pd), R.build_prompt(rng, n_text=9)):
        kw = R.to_torch(case)
        kw["mm_token_type_ids"] = torch.from_numpy(R.mm_types(case["input_ids"]))
        with torch.no_grad():
            want = pm(**kw).logits.numpy()
            with pm.disable_adapter():
                base = pm(**kw).logits.numpy()
        inp = prepare_inputs(lcfg, **case).as_kwargs()
        got = np.asarray(Glm4v(lcfg).apply({"params": params, "lora": adapters}, **inp))
        assert np.abs(want - base).max() > 0.1  # the adapters change the output
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)  # test_model_parity's TOL


@pytest.mark.slow
def test_loss_and_adapter_gradients_match_peft(peft_pair):
    pm, lcfg, params, adapters = peft_pair
    rows, groups = media_samples(lcfg, seed=4)
    pm.zero_grad()
    loss = hf_loss(pm, groups)
    loss.backward()
    tcfg = S.train_config(lcfg, FP32)
    batch = our_batch(lcfg, hf_arrays(rows))
    stacked, ad = stack_layers(params), stack_layers(adapters)

    def mean_loss(a):
        s, n = L.loss_and_count(stacked, batch, tcfg, chunk_size=16, lora=a)
        return s / n

    got, grads = jax.jit(jax.value_and_grad(mean_loss))(ad)
    np.testing.assert_allclose(float(got), loss.item(), rtol=1e-5)
    ours = LO.adapters_to_hf(jax.tree.map(np.asarray, unstack_layers(grads)), lcfg)
    assert len(ours) == len(LO.targeted(lcfg))
    for name, (ga, gb) in ours.items():
        mod = pm.base_model.model.get_submodule(name)
        ta, tb = mod.lora_A["default"].weight.grad.numpy(), mod.lora_B["default"].weight.grad.numpy()
        assert np.linalg.norm(tb) > 0 and np.linalg.norm(ta) > 0, name
        assert _rel(ga, ta) <= 1e-4, (name, "lora_A", _rel(ga, ta))
        assert _rel(gb, tb) <= 1e-4, (name, "lora_B", _rel(gb, tb))


@pytest.mark.slow
def test_fresh_adapters_are_the_base_exactly():
    _, cfg, params = R.hf_and_params("a", seed=3)
    lcfg = LO.with_lora(cfg, LoraConfig(rank=8, alpha=16, targets=TARGETS))
    adapters = LO.init_adapters(lcfg, jax.random.PRNGKey(0))
    a = adapters["language_model"]["layers_0"]["self_attn"]["q_proj"]["lora_a"]
    bound = 1 / np.sqrt(cfg.text.hidden_size)  # PEFT's kaiming-uniform bound
    assert float(jnp.abs(a).max()) <= bound and float(jnp.abs(a).max()) > 0.9 * bound
    rng = np.random.default_rng(5)
    inp = prepare_inputs(cfg, **R.build_prompt(rng, images=[(1, 4, 6)], patch_dim=cfg.vision.patch_dim)).as_kwargs()
    base = np.asarray(Glm4v(cfg).apply({"params": params}, **inp))
    got = np.asarray(Glm4v(lcfg).apply({"params": params, "lora": adapters}, **inp))
    np.testing.assert_array_equal(got, base)


@pytest.mark.slow
def test_merged_equals_unmerged(peft_pair):
    _, lcfg, params, adapters = peft_pair
    rng = np.random.default_rng(6)
    inp = prepare_inputs(lcfg, **R.build_prompt(rng, images=[(1, 4, 4)], patch_dim=lcfg.vision.patch_dim)).as_kwargs()
    want = np.asarray(Glm4v(lcfg).apply({"params": params, "lora": adapters}, **inp))
    merged = LO.merge_adapters(params, adapters, lcfg)
    base_cfg = lcfg.with_runtime(lora=None)
    got = np.asarray(Glm4v(base_cfg).apply({"params": merged}, **inp))
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
    assert params["language_model"]["layers_0"]["self_attn"]["q_proj"]["kernel"] is not \
        merged["language_model"]["layers_0"]["self_attn"]["q_proj"]["kernel"]


def test_adapters_shard_with_the_rules_table():
    from glm41v_jax.sharding import make_mesh, param_shardings

    _, cfg, _ = R.hf_and_params("a", seed=3)
    lcfg = LO.with_lora(cfg.with_runtime(scan_layers=True), LoraConfig(rank=4, alpha=8, targets=("q_proj", "o_proj")))
    sh = param_shardings(LO.abstract_adapters(lcfg), make_mesh("fsdp=2,tensor=4"))
    q = sh["language_model"]["layers"]["self_attn"]["q_proj"]
    o = sh["language_model"]["layers"]["self_attn"]["o_proj"]
    assert tuple(q["lora_a"].spec) == (None, "fsdp", None)  # (layers, embed, r)
    assert tuple(q["lora_b"].spec) == (None, None, "tensor", None)  # (layers, r, heads, head_dim)
    assert tuple(o["lora_a"].spec) == (None, "tensor", None, None)  # (layers, heads, head_dim, r)
    assert tuple(o["lora_b"].spec) == (None, None, "fsdp")  # (layers, r, embed)


@pytest.mark.parametrize("lora,why", [
    (dict(targets=("nothing_proj",)), "'nothing_proj' matches no linear layer"),
    (dict(targets=("lm_head",)), "'lm_head' matches no linear layer"),
    (dict(targets=("layers.0.self_attn.q_proj",)), "in some layers only"),
])
def test_bad_targets_are_one_clear_error(lora, why):
    _, cfg, _ = R.hf_and_params("a", seed=3)
    with pytest.raises(LO.LoraError, match=why):
        LO.with_lora(cfg, LoraConfig(**lora))


@pytest.mark.parametrize("field,value,why", [
    ("rank", 0, "lora.rank: must be a positive integer"), ("rank", -2, "lora.rank: must be a positive integer"),
    ("alpha", 0.0, "lora.alpha: must be"), ("dropout", 1.0, "lora.dropout: must be"),
    ("targets", (), "lora.targets: must be"),
])
def test_bad_lora_config_is_one_clear_error(field, value, why):
    from glm41v_jax.config import ConfigError

    with pytest.raises(ConfigError, match=why):
        LoraConfig(**{field: value})


# ---------------------------------------------------------------------------------------------------------------
# Training (the small-vocabulary twin of config "a" from test_train_step: a step costs milliseconds).

@pytest.fixture(scope="module")
def small_base():
    """test_train_step's `small`: config "a" with a 700-token vocabulary (special ids moved), random O(1) weights."""
    d = R.hf_config_dict("a")
    eos = int(small_ids(151329))
    d["text_config"].update(vocab_size=SMALL_VOCAB, pad_token_id=eos, eos_token_id=[eos])
    for key in ("image_token_id", "video_token_id", "image_start_token_id", "image_end_token_id",
                "video_start_token_id", "video_end_token_id"):
        d[key] = int(small_ids(d[key]))
    cfg = Glm4vConfig.from_hf(d)
    return cfg, weights.hf_to_flax(tiny.random_hf_state_dict(d, seed=5), cfg)


DECODER = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_up_proj", "language_model.*.down_proj")


def _lora_run(ts, adapters, batches):
    st = ts.init_opt_state(adapters)
    losses = []
    for b in batches:
        adapters, st, m = ts(adapters, st, b)
        losses.append(float(m["loss"]))
    return adapters, st, losses


@pytest.mark.slow
def test_lora_step_trains_adapters_only(small_base):
    """Step 0's loss is the base model's; the base is bit-identical after the steps (never updated, never donated);
    the optimizer state is over the adapters only (its arrays: two Adam moments per adapter plus scalars)."""
    cfg, params = small_base
    batch, _ = _batch_rows(cfg, 21, 4, 40, 64)
    oc = O.OptimConfig(peak_lr=1e-2, warmup_steps=0, total_steps=10, weight_decay=0.0)
    ts = LoraTrainStep(cfg, oc, sc=FP32, lora=LoraConfig(rank=4, alpha=8, targets=DECODER + ("attn.qkv",)))
    ts.set_base(params)
    base_before = jax.tree.map(np.array, ts.base)
    adapters = ts.init_adapters(0)
    n_adapter = sum(x.size for x in jax.tree.leaves(adapters))
    tcfg = S.train_config(cfg, FP32)
    s, n = jax.jit(lambda p, b: L.loss_and_count(p, b, tcfg, chunk_size=16))(stack_layers(params), batch)
    out, st, losses = _lora_run(ts, adapters, [batch] * 5)
    # B = 0: the base model's loss (a different program: the gradient's forward, fused differently, so to fp32
    # rounding; the model-level equality is bit for bit, test_fresh_adapters_are_the_base_exactly)
    np.testing.assert_allclose(losses[0], np.float32(s) / np.float32(n), rtol=1e-6)
    assert losses[-1] < 0.9 * losses[0], losses
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.array, ts.base), base_before)
    moments = [x for x in jax.tree.leaves(st) if x.ndim > 0]
    assert sum(x.size for x in moments) == 2 * n_adapter
    assert sum(x.size for x in jax.tree.leaves(st)) <= 2 * n_adapter + 8  # + counts and scalars
    b = out["language_model"]["layers"]["self_attn"]["q_proj"]["lora_b"]
    assert float(jnp.abs(b).max()) > 0 and "visual" in out  # B moved from zero; vision adapters present


@pytest.mark.slow
def test_lora_overfits_a_packed_image_text_set(small_base):
    """A few hundred steps of rank-4 adapters on 8 image + text samples, two per row: the loss falls to a fraction
    of the base model's."""
    cfg, params = small_base
    batch, _ = _batch_rows(cfg, 22, 8, 40, 64)
    oc = O.OptimConfig(peak_lr=1e-2, warmup_steps=10, total_steps=200, end_lr=1e-3, weight_decay=0.0)
    ts = LoraTrainStep(cfg, oc, sc=FP32, lora=LoraConfig(rank=4, alpha=8, targets=DECODER))
    ts.set_base(params)
    _, _, losses = _lora_run(ts, ts.init_adapters(1), [batch] * 200)
    assert np.all(np.isfinite(losses))
    assert np.mean(losses[-10:]) < 0.1 * losses[0], (losses[0], losses[-10:])
    assert np.mean(losses[100:110]) > np.mean(losses[-10:])  # still falling in the second half


@pytest.mark.slow
def test_qlora_on_an_int8_base(small_base):
    """QLoRA: the base's decoder and lm_head as int8 codes + fp32 scales (quant.quantize_params), float adapters:
    the step runs, the loss is finite and falls, and the codes are untouched."""
    from glm41v_jax import quant

    cfg, params = small_base
    qcfg = cfg.with_runtime(quantize="int8")
    qparams = quant.quantize_params(jax.tree.map(np.asarray, params), qcfg)
    batch, _ = _batch_rows(cfg, 23, 4, 40, 64)
    oc = O.OptimConfig(peak_lr=1e-2, warmup_steps=0, total_steps=30, weight_decay=0.0)
    ts = LoraTrainStep(cfg, oc, sc=FP32, lora=LoraConfig(rank=4, alpha=8, targets=DECODER),
                       quant={"quantize": "int8"})
    ts.set_base(qparams)
    codes = ts.base["language_model"]["layers"]["self_attn"]["q_proj"]["kernel"]
    assert codes.dtype == jnp.int8 and ts.base["lm_head"]["kernel"].dtype == jnp.int8
    before = np.array(codes)
    _, _, losses = _lora_run(ts, ts.init_adapters(2), [batch] * 30)
    assert np.all(np.isfinite(losses)) and losses[-1] < 0.7 * losses[0], losses
    np.testing.assert_array_equal(np.array(ts.base["language_model"]["layers"]["self_attn"]["q_proj"]["kernel"]),
                                  before)
    # the first loss is the int8 model's: the float model's within int8 weight error
    tcfg = S.train_config(cfg, FP32)
    s, n = jax.jit(lambda p, b: L.loss_and_count(p, b, tcfg, chunk_size=16))(stack_layers(params), batch)
    np.testing.assert_allclose(losses[0], float(s) / float(n), rtol=2e-2)


# ---------------------------------------------------------------------------------------------------------------
# Runs: `glm41v train` with train/configs/cpu_lora.yaml (subprocesses sharing one compilation cache, as in
# test_train_loop), kill -9 and resume, the adapter directory, `glm41v loss|generate --adapter`, refusals.

LORA_YAML = os.path.join(REPO, "train", "configs", "cpu_lora.yaml")
DATA = os.path.join(REPO, "train", "configs", "smoke_data", "train.jsonl")
RUN_SET = ["--set", "steps=8", "--set", "save_every=2", "--set", "keep_last=3", "--set", "progress=false",
           "--set", f"data.jsonl={DATA}", "--set", f"eval.jsonl={DATA}", "--set", "eval.every=8"]


@pytest.fixture(scope="module")
def lora_cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("lora_jax_cache"))


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tiny_cache_dir, lora_cache):
    """An uninterrupted 8-step LoRA run of cpu_lora.yaml: (output_dir, argv)."""
    out = str(tmp_path_factory.mktemp("lora") / "run")
    argv = ["train", "--config", LORA_YAML, "--set", f"output_dir={out}", *RUN_SET]
    p = TL._start(argv, out + ".log", TL._env(tiny_cache_dir, lora_cache))
    assert TL._finish(p) == 0, TL._tail(out + ".log")
    return out, argv


def _du(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


@pytest.mark.slow
def test_lora_run_writes_adapters_that_loss_and_generate_take(lora_run, run_cli, tmp_path):
    out, _ = lora_run
    m = TL._metrics(out)
    assert [r["step"] for r in m] == list(range(1, 9)) and m[-1]["loss"] < 0.7 * m[0]["loss"], m
    final = os.path.join(out, "final")
    assert sorted(os.listdir(final)) == sorted([LO.ADAPTER_CONFIG, LO.ADAPTER_WEIGHTS, "training.json"])
    with open(os.path.join(final, "training.json")) as f:
        assert json.load(f) == {"step": 8, "status": "completed"}
    meta, lora = LO.read_adapter_config(final)
    assert (lora.rank, lora.alpha, meta["base"]["model"]) == (8, 16.0, tiny.materialize_tiny_checkpoint())
    # checkpoints hold the adapters + optimizer + data state, not the 40 MB base
    for step in TL._committed(out):
        assert 0 < _du(os.path.join(out, "checkpoints", str(step))) < 2_000_000
    # `glm41v loss --adapter` runs the adapters unmerged on the base: the run's own held-out loss at step 8
    rc, stdout, err = run_cli("loss", "--model", "tiny", "--adapter", final, "--data", DATA, "--seq-len", "128",
                              "--batch-size", "2", "--max-patches", "128", "--mesh", "none", "--json")
    assert rc == 0, err
    np.testing.assert_allclose(json.loads(stdout.splitlines()[-1])["loss"], m[-1]["eval_loss"], rtol=1e-5)
    img = os.path.join(REPO, "train", "configs", "smoke_data", "images", "red_square.png")
    gen = ["generate", "--prompt", "What color is this?", "--image", img, "--max-new-tokens", "3", "--greedy",
           "--mesh", "none", "--json"]
    rc, stdout, err = run_cli(*gen, "--adapter", final)
    assert rc == 0, err
    # an adapter of another base (its recorded weights identity changed): one error line, exit 2
    other = str(tmp_path / "other")
    shutil.copytree(final, other)
    meta["base"]["norms_sha256"] = "0" * 64
    with open(os.path.join(other, LO.ADAPTER_CONFIG), "w") as f:
        json.dump(meta, f)
    for argv in (gen + ["--adapter", other],
                 ["loss", "--model", "tiny", "--adapter", other, "--data", DATA, "--seq-len", "128", "--mesh",
                  "none"]):
        rc, stdout, err = run_cli(*argv)
        errors = [ln for ln in err.splitlines() if not ln.startswith("note: no --model given")]  # generate's note
        assert rc == 2 and len(errors) == 1 and "trained on another base model" in errors[0], (argv[0], err)
        assert "Traceback" not in err and not stdout.strip()
    rc, _, err = run_cli(*gen, "--adapter", str(tmp_path / "missing"))
    assert rc == 2 and "error: adapter" in err and "not a directory" in err, err


@pytest.mark.parametrize("override,why", [
    ("lora.targets=[nothing_proj]", "'nothing_proj' matches no linear layer"),
    ("lora.rank=0", "lora.rank: must be a positive integer"),
    ("lora.rank=-3", "lora.rank: expected an integer in [0,"),
    ("lora.alpha=abc", "lora.alpha: expected a number"),
    ("lora=null", None),  # with quantize=int8 below: full-weight training on a quantized base
])
def test_bad_lora_section_is_one_error_and_writes_nothing(override, why, run_cli, tmp_path):
    out = str(tmp_path / "run")
    more = ["--set", "quantize=int8"] if why is None else []
    why = why or "quantize: a quantized base trains adapters only: add a lora: section"
    rc, stdout, err = run_cli("train", "--config", LORA_YAML, "--set", f"output_dir={out}", "--set", override, *more)
    assert rc == 2 and err.count("\n") == 1 and why in err and "Traceback" not in err, err
    assert not os.path.exists(out)


@pytest.mark.slow
def test_lora_kill9_after_checkpoint_then_resume_is_identical(lora_run, tmp_path, tiny_cache_dir, lora_cache):
    ref_out, argv = lora_run
    ref = TL._losses(ref_out)
    out = str(tmp_path / "run")
    argv = [a.replace(ref_out, out) for a in argv]
    env = TL._env(tiny_cache_dir, lora_cache)
    p = TL._start(argv, out + ".1.log", env)
    TL._wait_for(lambda: 2 in TL._committed(out) and TL._last_step(out) >= 3, p, "checkpoint 2 and step 3")
    p.send_signal(signal.SIGKILL)
    assert TL._finish(p) == -signal.SIGKILL
    restored = TL._committed(out)[-1]
    assert restored < 8 and TL._last_step(out) < 8
    p = TL._start(argv, out + ".2.log", env)
    assert TL._finish(p) == 0, TL._tail(out + ".2.log")
    assert f"resumed from {out}/checkpoints/{restored} at step {restored}" in TL._tail(out + ".2.log", 100000)
    got = TL._losses(out)
    assert sorted(got) == list(range(1, 9))
    assert got == ref  # bit for bit: adapters, optimizer state and data order all resumed exactly
    cfg = Glm4vConfig.from_hf(tiny.tiny_hf_config())
    a, b = (LO.load_adapters(os.path.join(d, "final"), cfg)[0] for d in (out, ref_out))
    jax.tree.map(np.testing.assert_array_equal, a, b)


def test_qlora_base_quantized_at_load(tiny_cache_dir, monkeypatch):
    """`quantize: int8` in a LoRA run: make_train_step reads a float checkpoint into int8 codes + fp32 scales (the
    decoder and lm_head; vision in float), the same codes as quantizing the loaded float weights."""
    from glm41v_jax import quant
    from glm41v_jax.loading import load
    from glm41v_train.lora_step import make_train_step

    monkeypatch.setenv("GLM41V_CACHE", tiny_cache_dir)
    model_dir = tiny.materialize_tiny_checkpoint()
    cfg = Glm4vConfig.from_file(os.path.join(model_dir, "config.json"))
    ts = make_train_step(cfg, O.OptimConfig(), None, FP32, LoraConfig(rank=2, targets=("q_proj",)), model_dir,
                         {"quantize": "int8"})
    assert isinstance(ts, LoraTrainStep) and ts.cfg.runtime.quantize == "int8"
    ts.load_base(model_dir)
    q = ts.base["language_model"]["layers"]["self_attn"]["q_proj"]
    assert q["kernel"].dtype == jnp.int8 and q["scale"].dtype == jnp.float32
    assert ts.base["visual"]["blocks"]["attn"]["qkv"]["kernel"].dtype == jnp.float32
    params, _ = load(model_dir, as_numpy=True)
    want = quant.quantize_array(params["language_model"]["layers_1"]["self_attn"]["q_proj"]["kernel"], "int8")
    np.testing.assert_array_equal(np.asarray(q["kernel"][1]), want[0])
    np.testing.assert_array_equal(np.asarray(q["scale"][1]), want[1])


def test_dropout_only_with_a_dropout_rng(small_base):
    """Adapter dropout (on A's input) runs when the apply gets a "dropout" rng (training), is the same for the same
    key, and is off without one (evaluation, generation)."""
    cfg, params = small_base
    lcfg = LO.with_lora(cfg, LoraConfig(rank=4, alpha=8, targets=("q_proj", "attn.qkv"), dropout=0.5))
    adapters = LO.init_adapters(lcfg, jax.random.PRNGKey(3))
    adapters = jax.tree_util.tree_map_with_path(  # B nonzero, so the adapters' input matters
        lambda p, x: jnp.full_like(x, 0.1) if str(p[-1].key) == "lora_b" else x, adapters)
    rng = np.random.default_rng(5)
    p = R.build_prompt(rng, images=[(1, 4, 4)], patch_dim=cfg.vision.patch_dim)
    p["input_ids"] = small_ids(p["input_ids"])
    inp = prepare_inputs(cfg, **p).as_kwargs()
    model, v = Glm4v(lcfg), {"params": params, "lora": adapters}
    plain = np.asarray(model.apply(v, **inp))
    np.testing.assert_array_equal(np.asarray(model.apply(v, **inp)), plain)
    k = jax.random.PRNGKey(7)
    d1, d2 = (np.asarray(model.apply(v, rngs={"dropout": k}, **inp)) for _ in range(2))
    d3 = np.asarray(model.apply(v, rngs={"dropout": jax.random.PRNGKey(8)}, **inp))
    np.testing.assert_array_equal(d1, d2)
    assert np.abs(d1 - plain).max() > 1e-3 and np.abs(d1 - d3).max() > 1e-3


@pytest.mark.slow
def test_lora_step_sharded_equals_one_device(small_base):
    """The LoRA step on 8 devices (fsdp=4, tensor=2: the base and the adapters in their rules-table shardings, the
    batch over fsdp) gives the one-device losses; `compile` lowers it from shapes alone (no base needed: what
    `glm41v plan` does for a TPU topology)."""
    from glm41v_jax.sharding import make_mesh

    cfg, params = small_base
    batch, _ = _batch_rows(cfg, 24, 4, 40, 64)
    oc = O.OptimConfig(peak_lr=1e-2, warmup_steps=0, total_steps=10, weight_decay=0.0)
    lora = LoraConfig(rank=4, alpha=8, targets=DECODER + ("attn.qkv",))
    losses = []
    for mesh in (None, make_mesh({"fsdp": 4, "tensor": 2})):
        ts = LoraTrainStep(cfg, oc, mesh, FP32, lora)
        if mesh is not None:
            assert ts.compile(batch) is not None and ts.base is None
        ts.set_base(params)
        _, _, got = _lora_run(ts, ts.init_adapters(0), [ts.shard_batch(batch)] * 3)
        losses.append(got)
    q = ts.base["language_model"]["layers"]["self_attn"]["q_proj"]["kernel"]
    assert tuple(q.sharding.spec)[:3] == (None, "fsdp", "tensor")
    np.testing.assert_allclose(losses[1], losses[0], rtol=2e-5)


@pytest.mark.slow
def test_adapters_run_unmerged_on_an_int8_base(tmp_path):
    """`glm41v generate|chat --adapter` on a quantized base (`Pipeline.load(quantize="int8", adapter=DIR)`): the
    adapters run unmerged beside the int8 codes in the Engine's programs (merging would requantize the codes).
    Greedy tokens (eos off, 10 steps, an image and a text prompt in one batch) equal those of the float base with
    the adapter merged in (fp32), on one device and on an fsdp x tensor mesh, and differ from the int8 base's own:
    the adapter (B nonzero) changes what the model says, the int8 weight error does not."""
    from PIL import Image

    from glm41v_jax import loading
    from glm41v_jax.pipeline import Pipeline, Request
    from glm41v_jax.sampling import SamplingParams

    hf = tiny.materialize_tiny_checkpoint()
    params, cfg = loading.load(hf, as_numpy=True)
    lcfg = LO.with_lora(cfg, LoraConfig(rank=8, alpha=16.0, targets=("q_proj", "v_proj", "o_proj", "gate_up_proj",
                                                                      "language_model.*.down_proj")))
    rng = np.random.default_rng(0)
    adapters = jax.tree_util.tree_map_with_path(
        lambda p, x: rng.normal(0, 0.5, x.shape).astype(np.float32) if p[-1].key == "lora_b" else np.asarray(x),
        LO.init_adapters(lcfg, jax.random.PRNGKey(1)))
    ad = LO.save_adapters(str(tmp_path / "adapter"), adapters, lcfg, LO.base_identity(params, cfg))
    img = str(tmp_path / "img.png")
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (56, 84, 3), dtype=np.uint8)).save(img)
    reqs = [Request("Describe this.", images=[img], max_new_tokens=10), Request("Hello there!", max_new_tokens=10)]

    def tokens(**kw):
        pipe = Pipeline.load(None, **kw)
        pipe.eos_ids = ()
        out = [r["token_ids"] for r in pipe.generate(reqs, batch_size=2, max_new_tokens=10,
                                                     sampling=SamplingParams(greedy=True))]
        return out, pipe.engine

    merged, eng = tokens(mesh=None, adapter=ad)
    assert eng.cfg.runtime.lora is None  # float: folded into the weights
    unmerged, eng = tokens(mesh=None, adapter=ad, quantize="int8")
    assert eng.cfg.runtime.quantize == "int8" and eng.cfg.runtime.lora is not None
    assert eng.params["params"]["lm_head"]["kernel"].dtype == jnp.int8 and set(eng.params) == {"params", "lora"}
    sharded, eng = tokens(mesh="fsdp=2,tensor=4", adapter=ad, quantize="int8")
    lora_q = eng.params["lora"]["language_model"]["layers_0"]["self_attn"]["q_proj"]
    assert lora_q["lora_b"].sharding == eng.param_shardings["lora"]["language_model"]["layers_0"]["self_attn"][
        "q_proj"]["lora_b"]
    base_only, _ = tokens(mesh=None, quantize="int8")
    assert [len(t) for t in unmerged] == [10, 10]
    assert unmerged == merged and sharded == merged
    assert base_only != merged
