"""The train step of every TPU config in train/configs/ compiled by the TPU compiler (libtpu) for its own slice at
the real 9B shapes, on this CPU machine (no TPU, no weights): the pod config on 8 hosts; the LoRA configs' LoRA step,
the Colab one on an int8 base within 15 GB of one v5e chip. One compile per config."""

from __future__ import annotations

import os

import pytest

from glm41v_jax.plan import format_report, model_config, parse_tpu, plan_train

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, "train", "configs")
# Each TPU training config and the slice it is written for (a new config must be added here).
TRAIN_CONFIG_TPU = {"kaggle_v5e8.yaml": "v5e-8", "v5p_pod.yaml": "v5p-64", "colab_v5e1_qlora.yaml": "v5e-1",
                    "kaggle_v5e8_lora.yaml": "v5e-8"}
# The per-chip budget of a config (issue 14: the Colab QLoRA step within 15 GB of the v5e's 16 GiB).
TRAIN_CONFIG_LIMIT = {"colab_v5e1_qlora.yaml": 15e9}
CPU_CONFIGS = {"cpu_smoke.yaml", "cpu_lora.yaml"}


def test_every_tpu_train_config_is_mapped():
    found = {f for f in os.listdir(CONFIGS) if f.endswith((".yaml", ".yml"))}
    assert found - CPU_CONFIGS == set(TRAIN_CONFIG_TPU), "map each TPU training config to its slice above"


@pytest.mark.parametrize("name", sorted(TRAIN_CONFIG_TPU))
def test_train_config_step_compiles_on_its_slice(name):
    from glm41v_train.config import load_config  # the train extra (pyyaml)

    tpu = parse_tpu(TRAIN_CONFIG_TPU[name])
    # no per-layer FLOPs count here: it compiles two more 9B-wide programs (unrolled 1- and 2-layer steps, 400 s
    # on a loaded 2-core VM for the Kaggle config); test_plan counts a tiny config's, BENCHMARKS.md the 9B's
    r = plan_train(load_config(os.path.join(CONFIGS, name)), model_config(None, "9b"), tpu, count_flops=False)
    assert r["fits"], format_report(r)
    pc = r["per_chip"]
    assert pc["total_bytes"] < tpu.spec.hbm_bytes
    assert pc["params_bytes"] > 0 and pc["opt_state_bytes"] > 0
    if name in TRAIN_CONFIG_LIMIT:
        assert pc["total_bytes"] <= TRAIN_CONFIG_LIMIT[name], format_report(r)
        assert all(p["memory"]["peak_bytes"] <= TRAIN_CONFIG_LIMIT[name] for p in r["programs"]), r["programs"]
    if "lora" in name:  # the LoRA step: a frozen base, the adapters and their moments only
        lo = r["lora"]
        assert (lo["rank"], lo["alpha"], lo["modules"]) == (8, 16, 6 * 40)  # every linear layer of the text decoder
        assert pc["params_bytes"] == lo["base_bytes_per_chip"] + lo["adapter_bytes_per_chip"]
        assert lo["adapter_params"] < lo["base_params"] / 200
        # two fp32 Adam moments of the adapters (and the step count): nothing for the base
        assert 2 * lo["adapter_bytes_per_chip"] <= pc["opt_state_bytes"] < 2 * lo["adapter_bytes_per_chip"] + 2**20
        assert pc["opt_state_bytes"] < lo["base_bytes_per_chip"] / 10  # full SFT's moments: 2x the trained weights
        assert r["quantize"]["scheme"] == ("int8" if "qlora" in name else "none")
    if tpu.family == "v5p":
        assert r["hosts"] >= 2 and r["devices"] == 32
