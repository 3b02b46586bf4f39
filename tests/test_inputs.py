"""The typed input contract (glm41v_jax/inputs.py): padding, offsets, shardings from the fields' logical axes, the
token rules, and their users (packing, the train step's batch shardings, the multi-host offsets)."""

from __future__ import annotations

import jax
import numpy as np
import pytest
import reference as R
from jax.sharding import PartitionSpec

from glm41v_jax import inputs
from glm41v_jax.config import Glm4vConfig
from glm41v_jax.errors import Glm41vError
from glm41v_jax.inputs import InputError, ModelInputs, VisionInputs
from glm41v_jax.processing.processor import Processor
from glm41v_jax.sharding import logical_to_spec, make_mesh

GRIDS = np.array([[1, 4, 6], [1, 2, 2], [1, 6, 4]])  # 24 + 4 + 24 = 52 patches


@pytest.fixture(scope="module")
def cfg():
    return Glm4vConfig.from_hf(R.hf_config_dict("a"))


def _pixels(cfg, n, seed=0):
    return np.random.default_rng(seed).standard_normal((n, cfg.vision.patch_dim)).astype(np.float32)


@pytest.mark.parametrize("plan", ["dense", "grouped"])
def test_pad_to_equals_packing_padded(cfg, plan):
    """Padding a pack later gives exactly the pack padded when built; padding rows hold each field's pad value."""
    pix = _pixels(cfg, 52)
    late = inputs.pack_vision(cfg, pix, GRIDS, None, None, vision_attention=plan).pad_to(64)
    built = inputs.pack_vision(cfg, pix, GRIDS, None, None, pad_to=64, vision_attention=plan)
    assert jax.tree.structure(late) == jax.tree.structure(built)
    for a, b in zip(jax.tree.leaves(late), jax.tree.leaves(built), strict=True):
        np.testing.assert_array_equal(a, b)
        assert a.dtype == b.dtype
    assert (built.segment_ids[52:] == 0).all() and (built.seg_h[52:] == 1).all() and (built.seg_w[52:] == 1).all()
    assert (built.pixel_values[52:] == 0).all() and (built.hpos[52:] == 0).all()
    assert built.grouped == (plan == "grouped")
    if built.grouped:  # padding rows point one past the last slot (they read 0)
        assert (built.attn_inverse[52:] == sum(g.size for g in built.attn_groups)).all()
    with pytest.raises(InputError, match="shorter"):
        built.pad_to(60)


def test_empty_and_empty_like(cfg):
    e = VisionInputs.empty(8, cfg.vision.patch_dim)
    assert e.pixel_values.shape == (8, cfg.vision.patch_dim) and e.pixel_values.dtype == np.float32
    assert not e.grouped and e.attn_inverse is None and (e.segment_ids == 0).all() and (e.seg_h == 1).all()
    g = inputs.pack_vision(cfg, _pixels(cfg, 52), GRIDS, None, None, pad_to=64, vision_attention="grouped")
    blank = g.empty_like()  # same structure (the same compiled program), nothing real in it
    assert jax.tree.structure(blank) == jax.tree.structure(g)
    assert all(a.shape == b.shape and a.dtype == b.dtype
               for a, b in zip(jax.tree.leaves(blank), jax.tree.leaves(g), strict=True))
    assert (blank.segment_ids == 0).all() and all((t == -1).all() for t in blank.attn_groups)
    assert (blank.attn_inverse == sum(t.size for t in g.attn_groups)).all()


def test_offset(cfg):
    v = inputs.pack_vision(cfg, _pixels(cfg, 52), GRIDS, None, None, pad_to=64, vision_attention="dense")
    moved = v.offset(64)
    np.testing.assert_array_equal(moved.segment_ids, np.where(v.segment_ids > 0, v.segment_ids + 64, 0))
    np.testing.assert_array_equal(moved.pixel_values, v.pixel_values)
    g = inputs.pack_vision(cfg, _pixels(cfg, 52), GRIDS, None, None, pad_to=64, vision_attention="grouped")
    with pytest.raises(InputError, match="dense"):
        g.offset(64)
    np.testing.assert_array_equal(inputs.offset_vision_index(np.array([[-1, 0, 3, -1]]), 16), [[-1, 16, 19, -1]])


def test_token_rules_written_once(cfg):
    """The token-type rule matches an independent hand-written one (tests/reference.py) and is what the processor
    uses; vision_index numbers image tokens, then video tokens, in row-major order."""
    ids = np.array([[1, R.IMG, R.IMG, R.BOV, R.IMG, 5, R.IMG, R.EOV, R.IMG],
                    [R.BOV, R.IMG, R.EOV, R.IMG, 7, 7, 7, 7, 7]])
    types = inputs.mm_token_types(ids, cfg)
    np.testing.assert_array_equal(types, R.mm_types(ids))
    proc = Processor.__new__(Processor)  # the rule alone: no tokenizer or image processor needed
    proc.image_token_id, proc.video_start_id, proc.video_end_id = R.IMG, R.BOV, R.EOV
    np.testing.assert_array_equal(proc.mm_token_type_ids(ids), R.mm_types(ids))
    np.testing.assert_array_equal(inputs.vision_index(types, 10, 100),
                                  [[-1, 10, 11, -1, 100, -1, 101, -1, 12], [-1, 102, -1, 13, -1, -1, -1, -1, -1]])


def test_errors_are_one_base(cfg):
    with pytest.raises(InputError, match="more image token runs than grids") as e:
        inputs.prepare_inputs(cfg, np.array([[1, R.IMG, 2]]))
    assert isinstance(e.value, Glm41vError) and isinstance(e.value, ValueError)
    with pytest.raises(InputError, match="placeholder tokens do not match the media"):
        inputs.prepare_inputs(cfg, np.array([[1, 2, 3]]), pixel_values=_pixels(cfg, 4),
                              image_grid_thw=np.array([[1, 2, 2]]))
    with pytest.raises(InputError, match="pixel rows"):
        inputs.pack_vision(cfg, _pixels(cfg, 50), GRIDS, None, None)
    with pytest.raises(InputError, match="multiple of 4"):
        inputs.pack_vision(cfg, _pixels(cfg, 52), GRIDS, None, None, pad_to=54)
    with pytest.raises(InputError, match="vision_attention must be one of auto, dense, grouped; got 'banded'"):
        inputs.prepare_inputs(cfg, np.array([[1, 2]]), vision_attention="banded")  # refused even without media


def test_model_inputs_is_a_pytree(cfg):
    c = R.build_prompt(np.random.default_rng(0), images=[(1, 4, 6)], patch_dim=cfg.vision.patch_dim)
    mi = inputs.prepare_inputs(cfg, **c)
    kw = mi.as_kwargs()
    assert set(kw) == {"input_ids", "positions", "segment_ids", "vision", "vision_index"}  # rope_deltas is host-only
    assert isinstance(kw["vision"], VisionInputs)
    moved = jax.tree.map(np.asarray, mi)
    assert isinstance(moved, ModelInputs) and jax.tree.structure(moved) == jax.tree.structure(mi)
    axes = ModelInputs.axes()
    assert axes["positions"] == (None, "batch", "length") and axes["input_ids"] == ("batch", "length")
    assert ModelInputs.pad_values()["vision_index"] == -1


def test_shardings_follow_the_fields(cfg):
    """map_with_axes gives each array its field's logical axes: the packed patch axis splits like a batch axis, the
    grouped plan's tables are replicated."""
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    g = inputs.pack_vision(cfg, _pixels(cfg, 52), GRIDS, None, None, pad_to=64, vision_attention="grouped")
    specs = g.map_with_axes(lambda axes, x: logical_to_spec(axes, np.shape(x), mesh))
    assert specs.pixel_values == PartitionSpec(("data", "fsdp"), None)
    assert specs.segment_ids == specs.attn_inverse == PartitionSpec(("data", "fsdp"))
    assert all(s == PartitionSpec(None, None) for s in specs.attn_groups)


def test_train_batch_shardings(cfg):
    """The train step's batch shardings come from the same fields (labels as input_ids); an unknown key is refused."""
    from glm41v_train.optim import OptimConfig
    from glm41v_train.step import StepConfig, TrainStep

    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    ts = TrainStep(cfg, OptimConfig(), mesh, StepConfig(compute_dtype="float32", remat_policy="none"))
    b, t = 4, 16
    batch = {"input_ids": np.zeros((b, t), np.int32), "labels": np.zeros((b, t), np.int32),
             "segment_ids": np.zeros((b, t), np.int32), "positions": np.zeros((3, b, t), np.int32),
             "vision_index": np.full((b, t), -1, np.int32), "vision": VisionInputs.empty(64, cfg.vision.patch_dim)}
    sh = ts.batch_shardings(batch)
    assert sh["labels"].spec == sh["input_ids"].spec == PartitionSpec(("data", "fsdp"), None)
    assert sh["positions"].spec == PartitionSpec(None, ("data", "fsdp"), None)
    assert sh["vision"].pixel_values.spec == PartitionSpec(("data", "fsdp"), None)
    odd = {**batch, "vision": VisionInputs.empty(20, cfg.vision.patch_dim)}  # 20 patches: not 4 x 4 shards
    assert ts.batch_shardings(odd)["vision"].pixel_values.spec == PartitionSpec()
    with pytest.raises(ValueError, match="unexpected batch key 'extra'"):
        ts.batch_shardings({**batch, "extra": batch["labels"]})
