"""SFT data pipeline (train/data.py, train/packing.py, train/tfds_builder.py).

References are independent of the code under test: the rendered tokens come from transformers' Glm4vProcessor
(HF tokenizer + chat template + image processor), assistant spans are located by hand from the known layout
(`<|assistant|>` `\\n` content), M-RoPE positions from transformers' `Glm4vModel.get_rope_index`, vision-token
routing from the patch rows themselves, and a packed batch's logits from the model run on each sample alone.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import types

import jax
import numpy as np
import pytest
from PIL import Image

from glm41v_jax import tiny
from glm41v_jax.inputs import VisionInputs
from glm41v_train.data import DataConfig, make_iterator
from glm41v_train.encode import ConversationEncoder, DataError
from glm41v_train.packing import FirstFitPacker, assemble_batch

ASSISTANT, NL, EOT, IMG, BOV, EOV = 151337, 198, 151329, 151343, 151341, 151342


# ---------------------------------------------------------------------------------------------------------------
# Fixtures.


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tiny.materialize_tiny_checkpoint(str(tmp_path_factory.mktemp("sft") / "ckpt"))


def _png(path, h, w, seed):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)


def _mp4(path, n=40, h=56, w=84, fps=20):
    import av

    rng = np.random.default_rng(5)
    with av.open(path, "w") as c:
        s = c.add_stream("mpeg4", rate=fps)
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        for _ in range(n):
            frame = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            for p in s.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)


IMAGES = {"a": (56, 84), "b": (84, 56), "c": (112, 140), "big": (448, 448)}


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    for i, (name, (h, w)) in enumerate(IMAGES.items()):
        _png(str(d / "img" / f"{name}.png"), h, w, i)
    _png(str(d.parent / "outside.png"), 56, 56, 9)  # exists, but outside the dataset root
    (d / "img" / "broken.png").write_bytes(b"not a png")
    os.makedirs(d / "vid")
    _mp4(str(d / "vid" / "v.mp4"))
    return str(d)


@pytest.fixture(scope="module")
def hf_proc(ckpt):
    """transformers' Glm4vProcessor on the tiny tokenizer (same test-only shims as test_processor.py)."""
    import torch
    import transformers.image_processing_backends as backends
    import transformers.processing_utils as pu
    import transformers.video_processing_utils as vpu
    from transformers import AutoTokenizer
    from transformers.models.glm4v.image_processing_pil_glm4v import Glm4vImageProcessorPil
    from transformers.models.glm4v.processing_glm4v import Glm4vProcessor
    from transformers.models.glm4v.video_processing_glm4v import Glm4vVideoProcessor

    def normalize(t, mean, std, inplace=False):
        t = t if inplace else t.clone()
        return t.sub_(torch.as_tensor(mean, dtype=t.dtype).view(-1, 1, 1)).div_(
            torch.as_tensor(std, dtype=t.dtype).view(-1, 1, 1))

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pu.transformers_module, "VideoProcessorMixin", vpu.VideoProcessorMixin, raising=False)
        mp.setattr(backends, "tvF", types.SimpleNamespace(normalize=normalize), raising=False)
        yield Glm4vProcessor(
            image_processor=Glm4vImageProcessorPil(size=tiny.TINY_PREPROCESSOR["size"]),
            tokenizer=AutoTokenizer.from_pretrained(ckpt),
            video_processor=Glm4vVideoProcessor(size=tiny.TINY_VIDEO_PREPROCESSOR["size"]),
            chat_template=tiny.chat_template_text(),
        )


@pytest.fixture(scope="module")
def hf_rope(ckpt):
    """transformers' Glm4vModel.get_rope_index (it reads only the config)."""
    from transformers import Glm4vConfig as HFConfig
    from transformers.models.glm4v.modeling_glm4v import Glm4vModel

    return Glm4vModel(HFConfig(**tiny.tiny_hf_config())).eval().get_rope_index


def _img(name):
    return {"type": "image", "image": f"img/{name}.png"}


def _text(t):
    return {"type": "text", "text": t}


def _hf_ids(hf_proc, root, msgs):
    """HF rendering of a conversation (assistant content as strings), media expanded, + the appended eos."""
    text = hf_proc.apply_chat_template(msgs, tokenize=False, add_generation_prompt=False)
    images = [Image.open(os.path.join(root, it["image"])) for m in msgs if isinstance(m["content"], list)
              for it in m["content"] if it["type"] == "image"]
    out = hf_proc(text=[text], images=images or None, return_tensors="np")
    return [int(t) for t in out["input_ids"][0]] + [EOT], out


def _hand_labels(hf_proc, ids, contents, loss_on_thinking):
    """Label the tokens of each assistant content (found after `<|assistant|>` `\\n`, in order) + the final eos."""
    tok = hf_proc.tokenizer
    labels = [-100] * len(ids)
    starts = [i + 2 for i in range(len(ids) - 1) if ids[i] == ASSISTANT and ids[i + 1] == NL]
    assert len(starts) == len(contents)
    for start, content in zip(starts, contents, strict=True):
        c = tok(content, add_special_tokens=False)["input_ids"]
        assert ids[start:start + len(c)] == c
        think = re.match(r"<think>.*?</think>", content, re.S)
        skip = len(tok(think.group(0), add_special_tokens=False)["input_ids"]) if think and not loss_on_thinking else 0
        for j in range(start + skip, start + len(c)):
            labels[j] = ids[j]
    labels[-1] = EOT
    return labels


# ---------------------------------------------------------------------------------------------------------------
# Labels.


@pytest.mark.parametrize("list_content", [False, True], ids=["str", "list"])
@pytest.mark.parametrize("loss_on_thinking", [True, False], ids=["think", "nothink"])
def test_labels_match_hf_rendering(ckpt, root, hf_proc, loss_on_thinking, list_content):
    """2 turns, an image in each user turn (the second after the text), a system prompt; think-exclusion; eos."""
    a1 = "<think>look at it</think><answer>a cat</answer>"
    a2 = "<think>again</think>\n<answer>two cats</answer>"
    msgs = [{"role": "system", "content": "You are helpful."},
            {"role": "user", "content": [_img("a"), _text("What is this?")]},
            {"role": "assistant", "content": a1},
            {"role": "user", "content": [_text("And this?"), _img("b")]},
            {"role": "assistant", "content": [_text("<think>again</think>\n"), _text("<answer>two cats</answer>")]
             if list_content else a2}]
    sample = ConversationEncoder(ckpt, 1024, 1024, loss_on_thinking).encode(msgs, root, where="t:1")
    ref_msgs = msgs[:4] + [{"role": "assistant", "content": a2}]
    ids, out = _hf_ids(hf_proc, root, ref_msgs)
    labels = _hand_labels(hf_proc, ids, [a1, a2], loss_on_thinking)
    assert sample["input_ids"].tolist() == ids
    assert sample["labels"].tolist() == labels
    assert sample["input_ids"].dtype == sample["labels"].dtype == np.int32
    np.testing.assert_array_equal(sample["image_grid_thw"], out["image_grid_thw"])
    assert np.abs(sample["pixel_values"] - out["pixel_values"]).max() <= 1e-5
    assert not sample["truncated"]
    # thinking text is in the input either way, and in the labels only with loss_on_thinking
    think_id = hf_proc.tokenizer.convert_tokens_to_ids("<think>")
    assert think_id in ids and (think_id in labels) == loss_on_thinking


def test_only_thinking_and_no_labels(ckpt, root):
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "<think>only thoughts"}]
    assert (ConversationEncoder(ckpt, 256, 64, True).encode(msgs, root)["labels"] != -100).sum() > 1
    with pytest.raises(DataError) as e:
        ConversationEncoder(ckpt, 256, 64, False).encode(msgs, root, where="f.jsonl:3")
    assert e.value.reason == "no_labels" and "f.jsonl:3" in str(e.value)


def test_trailing_user_turn_dropped(ckpt, root, hf_proc):
    msgs = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"},
            {"role": "user", "content": [_text("unanswered"), _img("a")]}]
    sample = ConversationEncoder(ckpt, 256, 64).encode(msgs, root)
    assert sample["input_ids"].tolist() == _hf_ids(hf_proc, root, msgs[:2])[0]
    assert len(sample["pixel_values"]) == 0 and not sample["truncated"]


def test_truncation_keeps_whole_turns(ckpt, root, hf_proc):
    msgs = [{"role": "user", "content": [_img("a"), _text("Q1")]}, {"role": "assistant", "content": "A1"},
            {"role": "user", "content": [_text("Q2"), _img("c")]}, {"role": "assistant", "content": "A2 longer"},
            {"role": "user", "content": "Q3"}, {"role": "assistant", "content": "A3"}]
    one, out1 = _hf_ids(hf_proc, root, msgs[:2])
    two, out2 = _hf_ids(hf_proc, root, msgs[:4])
    patches_a = len(out1["pixel_values"])
    for seq_len, want, grids in ((len(two), two, out2["image_grid_thw"]), (len(two) - 1, one, out1["image_grid_thw"])):
        s = ConversationEncoder(ckpt, seq_len, 4096).encode(msgs, root)
        assert s["input_ids"].tolist() == want and s["truncated"]
        np.testing.assert_array_equal(s["image_grid_thw"], grids)  # the cut turn's image is gone, whole
        assert (s["input_ids"] == IMG).sum() == np.prod(grids, -1).sum() // 4
        assert s["labels"][-1] == EOT
    with pytest.raises(DataError) as e:
        ConversationEncoder(ckpt, len(one) - 1, 4096).encode(msgs, root, where="x.jsonl:7")
    assert e.value.reason == "too_long" and "x.jsonl:7" in str(e.value)
    s = ConversationEncoder(ckpt, 4096, patches_a).encode(msgs, root)  # the second image does not fit the patches
    assert s["input_ids"].tolist() == one and s["truncated"]
    with pytest.raises(DataError) as e:
        ConversationEncoder(ckpt, 4096, patches_a - 4).encode(msgs, root)
    assert e.value.reason == "too_many_patches"


# ---------------------------------------------------------------------------------------------------------------
# Packing.


def _samples(ckpt, root):
    enc = ConversationEncoder(ckpt, 512, 4096)
    convs = [
        [{"role": "user", "content": [_img("a"), _text("Describe.")]}, {"role": "assistant", "content": "A red one."}],
        [{"role": "user", "content": "Text only?"}, {"role": "assistant", "content": "<think>x</think>Yes."}],
        [{"role": "user", "content": [_img("b"), _text("and")]}, {"role": "assistant", "content": "one"},
         {"role": "user", "content": [_img("c")]}, {"role": "assistant", "content": "two"}],
        [{"role": "user", "content": [{"type": "video", "video": "vid/v.mp4"}, _text("What moves?")]},
         {"role": "assistant", "content": "Noise."}],
    ]
    return [enc.encode(c, root, where=f"s{i}") for i, c in enumerate(convs)]


def _hand_types(ids):
    depth = np.cumsum(ids == BOV) - np.cumsum(ids == EOV)
    return np.where(ids == IMG, np.where(depth > 0, 2, 1), 0)


def test_packed_batch_layout(ckpt, root, hf_rope):
    import torch

    from glm41v_jax.config import Glm4vConfig

    cfg = Glm4vConfig.from_file(ckpt)
    s = _samples(ckpt, root)
    assert len(s[3]["video_grid_thw"]) == 1 and len(s[2]["image_grid_thw"]) == 2
    rows = [[s[0], s[1]], [s[2], s[3]], []]
    T = max(len(s[0]["input_ids"]) + len(s[1]["input_ids"]), len(s[2]["input_ids"]) + len(s[3]["input_ids"])) + 3
    n_patch = sum(len(x["pixel_values"]) + len(x["pixel_values_videos"]) for x in s)
    P = n_patch + 8
    b = assemble_batch(rows, seq_len=T, max_patches=P, model_cfg=cfg, pad_id=EOT)
    assert b["input_ids"].shape == b["labels"].shape == b["segment_ids"].shape == b["vision_index"].shape == (3, T)
    assert b["positions"].shape == (3, 3, T)
    assert all(b[k].dtype == np.int32 for k in ("input_ids", "labels", "segment_ids", "positions", "vision_index"))
    v = b["vision"]
    assert v.pixel_values.shape == (P, cfg.vision.patch_dim)
    assert (v.segment_ids[:n_patch] > 0).all() and (v.segment_ids[n_patch:] == 0).all()
    assert (b["segment_ids"][2] == 0).all() and (b["labels"][2] == -100).all() and (b["vision_index"][2] == -1).all()
    packed = v.pixel_values.reshape(P // 4, 4, -1)  # one vision token = 4 consecutive (block-major) patches
    used = set()
    for r, row in enumerate(rows):
        t = 0
        for seg, x in enumerate(row, 1):
            n = len(x["input_ids"])
            sl = slice(t, t + n)
            assert (b["segment_ids"][r, sl] == seg).all()
            np.testing.assert_array_equal(b["input_ids"][r, sl], x["input_ids"])
            assert b["labels"][r, t] == -100
            np.testing.assert_array_equal(b["labels"][r, sl], x["labels"])
            ids = x["input_ids"].astype(np.int64)
            grid = {k: torch.from_numpy(x[k]) if len(x[k]) else None for k in ("image_grid_thw", "video_grid_thw")}
            ref, _ = hf_rope(torch.from_numpy(ids[None]), torch.from_numpy(_hand_types(ids)[None]), **grid)
            np.testing.assert_array_equal(b["positions"][:, r, sl], ref.numpy()[:, 0])
            vi = b["vision_index"][r, sl]
            kinds = _hand_types(ids)
            assert ((vi >= 0) == (kinds > 0)).all()
            for kind, key in ((1, "pixel_values"), (2, "pixel_values_videos")):
                own = x[key].reshape(-1, 4, x[key].shape[-1])
                np.testing.assert_array_equal(packed[vi[kinds == kind]], own)
                used.update(vi[kinds == kind].tolist())
            t += n
        assert (b["segment_ids"][r, t:] == 0).all() and (b["positions"][:, r, t:] == 0).all()
    assert used == set(range(n_patch // 4))  # every vision token of the batch is used exactly by its sample
    empty = VisionInputs.empty(P, cfg.vision.patch_dim)  # a batch without media: the same structure, shapes, dtypes
    assert jax.tree.structure(empty) == jax.tree.structure(v)
    assert all(e.shape == x.shape and e.dtype == x.dtype
               for e, x in zip(jax.tree.leaves(empty), jax.tree.leaves(v), strict=True))


def test_packed_logits_equal_each_sample_alone(ckpt, root):
    """The batch contract end to end: Glm4v.apply on the packed batch == forward on each sample unpacked."""
    from glm41v_jax import load
    from glm41v_jax.model import Glm4v, forward

    params, cfg = load(ckpt, compute_dtype="float32")
    s = _samples(ckpt, root)
    rows = [[s[0], s[1], s[3]], [s[2]]]
    T = len(s[0]["input_ids"]) + len(s[1]["input_ids"]) + len(s[3]["input_ids"]) + 5
    b = assemble_batch(rows, seq_len=T, max_patches=512, model_cfg=cfg, pad_id=EOT)
    kw = {k: v for k, v in b.items() if k != "labels"}
    logits = np.asarray(jax.jit(lambda p, kw: Glm4v(cfg).apply({"params": p}, **kw))(params, kw))
    for r, row in enumerate(rows):
        t = 0
        for x in row:
            n = len(x["input_ids"])
            arrays = {k: x[k] for k in ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw")
                      if len(x[k])}
            ref = np.asarray(forward(params, cfg, x["input_ids"][None], **arrays))[0]
            np.testing.assert_allclose(logits[r, t:t + n], ref, atol=2e-4, rtol=0, err_msg=x["where"])
            t += n


def _dummy(n, p, name):
    return {"input_ids": np.zeros(n, np.int32), "labels": np.zeros(n, np.int32), "pixel_values": np.zeros((p, 1)),
            "pixel_values_videos": np.zeros((0, 1)), "where": name}


def test_first_fit_packer_by_hand():
    packer = FirstFitPacker(seq_len=10, batch_size=2, max_patches=8, packing=True, open_batches=2)
    for name, n, p in [("a", 6, 4), ("b", 5, 0), ("c", 4, 4), ("d", 3, 0), ("e", 2, 4), ("f", 1, 0), ("g", 9, 0)]:
        assert packer.add(_dummy(n, p, name)), name
    # a -> b0r0; b -> b0r1; c -> b0r0 (6+4 = 10, patches 8); d -> b0r1; e: b0 has no patch room -> b1r0; f -> b0r1
    # (5+3+1 = 9); g -> b1r1
    got = [[[x["where"] for x in row] for row in batch] for batch in packer.take()]
    assert got == [[["a", "c"], ["b", "d", "f"]], [["e"], ["g"]]]
    assert len(packer) == 0 and packer.add(_dummy(10, 8, "h")) and len(packer) == 1  # emptied by take()
    unpacked = FirstFitPacker(seq_len=10, batch_size=2, max_patches=8, packing=False, open_batches=1)
    assert unpacked.add(_dummy(2, 0, "a")) and unpacked.add(_dummy(2, 0, "b")) and not unpacked.add(_dummy(2, 0, "c"))
    assert [[[x["where"] for x in r] for r in bt] for bt in unpacked.take()] == [[["a"], ["b"]]]
    with pytest.raises(ValueError, match="exceeds"):
        unpacked.add(_dummy(11, 0, "long"))


# ---------------------------------------------------------------------------------------------------------------
# The grain pipeline: order, shards, resume, workers, TFDS.

N_CONV = 14


def _conversation(i):
    user = [_text(f"Q{i}:" + "w" * (7 * (i % 5)))]
    if i % 3 == 0:
        user.insert(0, _img("abc"[i % 2 + (i % 4 == 0)]))
    msgs = [{"role": "user", "content": user}, {"role": "assistant", "content": f"<think>t</think>A{i}"}]
    if i % 4 == 1:
        msgs += [{"role": "user", "content": [_img("b"), _text("more")]}, {"role": "assistant", "content": "ok"}]
    return {"messages": msgs}


@pytest.fixture(scope="module")
def jsonl(root):
    path = os.path.join(root, "train.jsonl")
    with open(path, "w") as f:
        for i in range(N_CONV):
            f.write(json.dumps(_conversation(i)) + "\n")
    return path


def _cfg(path, **kw):
    base = dict(jsonl=path, seq_len=160, batch_size=2, max_patches=192, num_epochs=1, open_batches=2)
    return DataConfig(**{**base, **kw})


def _sample_ids(batch):
    """Conversation numbers in each batch, read from the tokens: 'Q' then digits (tiny tokenizer: chr(c) = id-68)."""
    out = []
    for r in range(batch["input_ids"].shape[0]):
        for seg in range(1, batch["segment_ids"][r].max() + 1):
            text = "".join(chr(t - 68) for t in batch["input_ids"][r][batch["segment_ids"][r] == seg] if 100 <= t < 195)
            out.append(int(re.search(r"Q(\d+):", text).group(1)))
    return out


def _run(ckpt, cfg, shard=(0, 1), state=None):
    it = make_iterator(cfg, ckpt, *shard)
    if state is not None:
        it.set_state(state)
    out = []
    for b in it:
        out.append((b, dict(it.stats)))
    it.close()
    return out


def _same(a, b):
    assert len(a) == len(b)
    for (x, sx), (y, sy) in zip(a, b, strict=True):
        assert jax.tree.structure(x) == jax.tree.structure(y)
        assert all(jax.tree.leaves(jax.tree.map(np.array_equal, x, y)))
        assert sx == sy


def test_order_is_seeded_and_epochs_reshuffle(ckpt, jsonl):
    a = _run(ckpt, _cfg(jsonl, seed=1, num_epochs=2))
    _same(a, _run(ckpt, _cfg(jsonl, seed=1, num_epochs=2)))
    order = [i for b, _ in a for i in _sample_ids(b)]
    assert sorted(order) == sorted(list(range(N_CONV)) * 2)
    other = [i for b, _ in _run(ckpt, _cfg(jsonl, seed=2)) for i in _sample_ids(b)]
    first = [i for b, _ in _run(ckpt, _cfg(jsonl, seed=1)) for i in _sample_ids(b)]
    assert sorted(other) == sorted(first) == list(range(N_CONV)) and other != first
    unshuffled = [i for b, _ in _run(ckpt, _cfg(jsonl, shuffle=False, open_batches=1, batch_size=1)) for i in
                  _sample_ids(b)]
    assert unshuffled == list(range(N_CONV))  # one open row: the file order comes through unchanged
    stats = a[-1][1]
    assert stats["samples"] == stats["records"] == 2 * N_CONV and stats["skipped"] == 0
    assert stats["batches"] == len(a) and stats["slots"] == len(a) * 2 * 160
    real = sum(int((b["segment_ids"] > 0).sum()) for b, _ in a)
    assert stats["tokens"] == real and stats["packing_efficiency"] == pytest.approx(real / (len(a) * 2 * 160))
    assert stats["label_tokens"] == sum(int((b["labels"] != -100).sum()) for b, _ in a)
    last = a[-1][0]
    assert a[-1][1]["batch_efficiency"] == pytest.approx((last["segment_ids"] > 0).sum() / last["segment_ids"].size)


def test_packing_beats_padding(ckpt, jsonl):
    packed = _run(ckpt, _cfg(jsonl, open_batches=4))
    padded = _run(ckpt, _cfg(jsonl, packing=False, open_batches=1))
    for b, _ in padded:
        assert (b["segment_ids"] <= 1).all()  # one sample per row, the rest padding
        for r in range(b["segment_ids"].shape[0]):
            n = int((b["segment_ids"][r] == 1).sum())
            assert (b["segment_ids"][r, :n] == 1).all() and (b["input_ids"][r, n:] == EOT).all()
    assert packed[-1][1]["tokens"] == padded[-1][1]["tokens"]
    assert packed[-1][1]["packing_efficiency"] > padded[-1][1]["packing_efficiency"]
    assert len(packed) < len(padded)


def test_host_shards_are_disjoint_and_cover(ckpt, jsonl):
    parts = [[i for b, _ in _run(ckpt, _cfg(jsonl, seed=3), shard=(k, 2)) for i in _sample_ids(b)] for k in range(2)]
    assert not set(parts[0]) & set(parts[1])
    assert sorted(parts[0] + parts[1]) == list(range(N_CONV))
    assert abs(len(parts[0]) - len(parts[1])) <= 1


@pytest.mark.parametrize("stop", [1, 3, 4, 6])
def test_resume_from_state_is_exact(ckpt, jsonl, stop, tmp_path):
    import grain
    from etils import epath

    cfg = _cfg(jsonl, seed=4, num_epochs=2, batch_size=1, open_batches=3)  # restores mid-group and across epochs
    full = _run(ckpt, cfg)
    assert len(full) > stop + 1
    it = make_iterator(cfg, ckpt, 0, 1)
    for _ in range(stop):
        next(it)
    state = json.loads(json.dumps(it.get_state()))  # JSON-able, as orbax stores it
    d = epath.Path(tmp_path / "it")
    d.mkdir()
    grain.checkpoint.CheckpointHandler().save(d, args=grain.checkpoint.CheckpointSave(item=it))
    rest = [(b, dict(it.stats)) for b in it]
    _same(rest, full[stop:])
    _same(_run(ckpt, cfg, state=state), full[stop:])
    it3 = make_iterator(cfg, ckpt, 0, 1)
    it3.set_state(state)
    assert it3.get_state() == state  # a restored iterator checkpoints to the same state before it advances
    it3.close()
    it2 = make_iterator(cfg, ckpt, 0, 1)
    grain.checkpoint.CheckpointHandler().restore(d, args=grain.checkpoint.CheckpointRestore(item=it2))
    _same([(b, dict(it2.stats)) for b in it2], full[stop:])


def test_worker_processes_give_the_same_batches(ckpt, jsonl):
    _same(_run(ckpt, _cfg(jsonl, seed=5, worker_count=2)), _run(ckpt, _cfg(jsonl, seed=5)))


def test_tfds_dataset_gives_the_same_batches(ckpt, root, tmp_path):
    import shutil

    from glm41v_train.tfds_builder import build_tfds

    src = tmp_path / "src"
    shutil.copytree(os.path.join(root, "img"), src / "img")
    path = str(src / "train.jsonl")
    with open(path, "w") as f:
        for i in range(N_CONV):
            rec = _conversation(i)
            if i == 5:  # a missing image: both readers apply the same policy to it
                rec["messages"][0]["content"].insert(0, {"type": "image", "image": "img/nope.png"})
            f.write(json.dumps(rec) + "\n")
    data_dir = str(tmp_path / "tfds")
    builder_dir = build_tfds(path, data_dir, name="tiny")
    runs = {}
    for kw in (dict(seed=6), dict(seed=6, num_epochs=2, packing=False)):
        cfg = _cfg(path, **kw)
        a = _run(ckpt, cfg)
        _same(a, _run(ckpt, dataclasses.replace(cfg, jsonl=None, tfds_dir=builder_dir)))
        assert a[-1][1]["skipped_missing_media"] == kw.get("num_epochs", 1) and a[-1][1]["samples"] > 0
        runs[len(runs)] = a
    shutil.rmtree(src / "img")  # the media are embedded: the TFDS dataset no longer needs the files
    by_name = dataclasses.replace(_cfg(path, seed=6), jsonl=None, tfds_name="glm41v_sft/tiny", tfds_data_dir=data_dir)
    _same(_run(ckpt, by_name), runs[0])


# ---------------------------------------------------------------------------------------------------------------
# Bad data.


def _bad_records(root):
    outside = os.path.join(os.path.dirname(root), "outside.png")
    good = lambda i: json.dumps(_conversation(i))  # noqa: E731
    conv = lambda img, q="Q": json.dumps({"messages": [  # noqa: E731
        {"role": "user", "content": [{"type": "image", "image": img}, _text(q)]},
        {"role": "assistant", "content": "A"}]})
    return {
        "malformed_json": '{"messages": [',
        "no_assistant": json.dumps({"messages": [{"role": "user", "content": "hello?"}]}),
        "missing_media": conv("img/missing.png"),
        "path_escape": conv("../outside.png"),
        "path_escape_abs": conv(outside),
        "too_long": json.dumps({"messages": [{"role": "user", "content": "x" * 400},
                                             {"role": "assistant", "content": "A"}]}),
        "too_many_patches": conv("img/big.png"),
        "bad_record": json.dumps({"messages": [{"role": "tool", "content": "?"}, {"role": "assistant",
                                                                                  "content": "A"}]}),
        "media_error": conv("img/broken.png"),  # exists, is not an image
        "good": [good(0), good(1), good(2)],
    }


def test_bad_data_is_skipped_and_counted(ckpt, root):
    recs = _bad_records(root)
    lines = [recs["good"][0], recs["malformed_json"], "", recs["no_assistant"], recs["missing_media"],
             recs["good"][1], recs["path_escape"], recs["path_escape_abs"], recs["too_long"],
             recs["too_many_patches"], recs["bad_record"], recs["media_error"], recs["good"][2]]
    path = os.path.join(root, "bad.jsonl")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    out = _run(ckpt, _cfg(path, shuffle=False))  # the whole epoch completes
    assert sorted(i for b, _ in out for i in _sample_ids(b)) == [0, 1, 2]
    stats = out[-1][1]
    assert stats["records"] == 12 and stats["samples"] == 3 and stats["skipped"] == 9  # the blank line is no record
    for reason, n in (("malformed_json", 1), ("no_assistant", 1), ("missing_media", 1), ("path_escape", 2),
                      ("too_long", 1), ("too_many_patches", 1), ("bad_record", 1), ("media_error", 1)):
        assert stats[f"skipped_{reason}"] == n, reason


@pytest.mark.parametrize("case", ["malformed_json", "no_assistant", "missing_media", "path_escape", "path_escape_abs",
                                  "too_long", "too_many_patches", "bad_record", "media_error"])
def test_bad_data_raises_with_file_and_line(ckpt, root, case, tmp_path):
    recs = _bad_records(root)
    path = os.path.join(root, f"raise_{case}.jsonl")
    with open(path, "w") as f:
        f.write(recs["good"][0] + "\n\n" + recs[case] + "\n")  # the bad record is on line 3
    it = make_iterator(_cfg(path, shuffle=False, on_error="raise"), ckpt, 0, 1)
    with pytest.raises(DataError) as e:
        list(it)
    assert e.value.reason == case.removesuffix("_abs")
    assert f"{path}:3" in str(e.value)


def test_config_is_validated(jsonl):
    with pytest.raises(ValueError, match="exactly one"):
        DataConfig()
    with pytest.raises(ValueError, match="on_error"):
        DataConfig(jsonl=jsonl, on_error="ignore")
    with pytest.raises(ValueError, match="seq_len"):
        DataConfig(jsonl=jsonl, seq_len=0)
