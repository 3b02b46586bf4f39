"""Image / video pre-processing against transformers' Glm4vImageProcessorPil and Glm4vVideoProcessor.

torchvision is not installed, and transformers' Glm4vVideoProcessor needs it for resize, RGB conversion and
normalisation. The video reference therefore runs HF's own class with do_resize=False / do_convert_rgb=False on
frames whose size is already a multiple of 28 inside the limits (HF smart_resize is the identity there, asserted),
with do_normalize=False (exact rescale + patchify + sampling), and once with a 4-line torch stand-in for
torchvision's `normalize` (`(x - mean) / std`). The resize difference between our PIL bicubic and torchvision's CPU
path (torch native uint8 bicubic with antialias) is measured separately in `test_video_resize_tolerance`.
"""

from __future__ import annotations

import math
import struct
import types
import zlib

import numpy as np
import pytest
from PIL import Image

from glm41v_jax.processing import (
    ImageProcessor,
    ProcessingError,
    VideoMetadata,
    VideoProcessor,
    load_image,
    load_video,
    sample_frames,
    smart_resize,
)
from glm41v_jax.processing import image as image_mod
from glm41v_jax.tiny import TINY_PREPROCESSOR, TINY_VIDEO_PREPROCESSOR

MIN, MAX = 2 * 28 * 28 * 4, 2 * 28 * 28 * 64  # images between 4 and 64 merged tokens (fast)
VMIN, VMAX = 2 * 28 * 28 * 4, 8 * 28 * 28 * 64


@pytest.fixture(scope="module")
def hf_image():
    from transformers.models.glm4v.image_processing_pil_glm4v import Glm4vImageProcessorPil

    return Glm4vImageProcessorPil(size={"shortest_edge": MIN, "longest_edge": MAX})


@pytest.fixture(scope="module")
def ours_image():
    return ImageProcessor(min_pixels=MIN, max_pixels=MAX)


@pytest.fixture(scope="module")
def hf_video():
    from transformers.models.glm4v.video_processing_glm4v import Glm4vVideoProcessor

    return Glm4vVideoProcessor(size={"shortest_edge": VMIN, "longest_edge": VMAX})


def _moving_frames(n: int, h: int, w: int) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    frames = []
    for t in range(n):
        r = (127 + 120 * np.sin((xx + 3 * t) / 6.0)).astype(np.uint8)
        g = (127 + 120 * np.cos((yy - 2 * t) / 5.0)).astype(np.uint8)
        b = ((xx + yy + 7 * t) % 256).astype(np.uint8)
        frames.append(np.stack([r, g, b], -1))
    return np.stack(frames)


def write_mp4(path: str, frames: np.ndarray, fps: int) -> None:
    import av

    with av.open(path, "w") as c:
        s = c.add_stream("mpeg4", rate=fps)
        s.width, s.height, s.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        for f in frames:
            for p in s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)


@pytest.fixture(scope="module")
def mp4(tmp_path_factory):
    """40 frames at 20 fps (2 s), 56x84: a moving pattern; samples 4 frames at fps=2."""
    path = str(tmp_path_factory.mktemp("vid") / "moving.mp4")
    write_mp4(path, _moving_frames(40, 56, 84), fps=20)
    return path


# ---------------------------------------------------------------------------------------------------- smart_resize
def test_smart_resize_matches_hf_random():
    from transformers.models.glm4v.image_processing_pil_glm4v import smart_resize as hf_sr

    rng = np.random.default_rng(1)
    cases = [(int(h), int(w)) for h, w in rng.integers(1, 3000, size=(3000, 2))]
    cases += [(28 * k + 14, 28 * j + 14) for k in range(0, 12) for j in range(0, 12)]  # exact .5 -> banker's rounding
    cases += [(int(h), int(w)) for h, w in rng.integers(1, 40, size=(300, 2))]
    limits = [(MIN, MAX), (12544, 9633792), (3136, 25088), (112 * 112, 28 * 28 * 2 * 30000)]
    n_checked = 0
    for i, (h, w) in enumerate(cases):
        lo, hi = limits[i % len(limits)]
        t = 2 if i % 3 else int(rng.integers(2, 40))
        try:
            ref = hf_sr(t, h, w, temporal_factor=2, factor=28, min_pixels=lo, max_pixels=hi)
        except ValueError as e:
            with pytest.raises(ProcessingError, match="aspect ratio"):
                smart_resize(t, h, w, 2, 28, lo, hi)
            assert "aspect ratio" in str(e)
            continue
        assert smart_resize(t, h, w, 2, 28, lo, hi) == ref, (t, h, w, lo, hi)
        n_checked += 1
    assert n_checked > 3000


def test_smart_resize_bankers_rounding():
    # 42/28 = 1.5 -> round to 2 (even), 70/28 = 2.5 -> 2 (even, not 3), 98/28 = 3.5 -> 4
    assert smart_resize(2, 42, 70, min_pixels=1, max_pixels=10**9) == (56, 56)
    assert smart_resize(2, 98, 98, min_pixels=1, max_pixels=10**9) == (112, 112)


def test_smart_resize_aspect_limit():
    assert smart_resize(2, 28, 28 * 199, min_pixels=1, max_pixels=10**9) == (28, 28 * 199)
    with pytest.raises(ProcessingError, match=r"aspect ratio must be smaller than 200, got 201\.0"):
        smart_resize(2, 28, 28 * 201, min_pixels=1, max_pixels=10**9)


# ---------------------------------------------------------------------------------------------------- images vs HF
def _random_sizes(rng) -> list[tuple[int, int]]:
    sizes = [(int(h), int(w)) for h, w in rng.integers(28, 360, size=(70, 2))]
    sizes += [(int(h), int(w)) for h, w in rng.integers(3, 28, size=(15, 2))]  # sides < 28 px
    sizes += [(int(h), int(w)) for h, w in rng.integers(400, 900, size=(10, 2))]  # above max_pixels
    sizes += [(10, 1990), (1990, 10), (14, 2786), (3, 9), (1, 1), (5, 600), (28, 28 * 150), (60, 60), (90, 130)]
    return sizes


def test_image_processor_matches_hf(hf_image, ours_image):
    rng = np.random.default_rng(0)
    sizes = _random_sizes(rng)
    assert len(sizes) >= 100
    worst = 0.0
    for i, (h, w) in enumerate(sizes):
        arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        img = Image.fromarray(arr) if i % 2 else arr  # PIL and numpy inputs
        ref = hf_image(images=[img], return_tensors="np", input_data_format="channels_last")  # ours: always HWC
        ours = ours_image([img])
        np.testing.assert_array_equal(ours["image_grid_thw"], ref["image_grid_thw"], err_msg=f"{h}x{w}")
        assert ours["pixel_values"].dtype == np.float32
        assert ours["pixel_values"].shape == ref["pixel_values"].shape
        worst = max(worst, float(np.abs(ours["pixel_values"] - ref["pixel_values"]).max()))
        t, gh, gw = ref["image_grid_thw"][0]
        assert ours_image.num_image_tokens(h, w) == hf_image.get_number_of_image_patches(h, w) // 4 == gh * gw // 4
    assert worst <= 1e-5, worst  # measured: 0.0 (bit-identical)


def test_image_batch_modes_and_files(hf_image, ours_image, tmp_path):
    rng = np.random.default_rng(3)
    rgba = Image.fromarray(rng.integers(0, 256, (70, 90, 4), dtype=np.uint8), "RGBA")
    gray = Image.fromarray(rng.integers(0, 256, (50, 120), dtype=np.uint8), "L")
    rgba_np = rng.integers(0, 256, (64, 64, 4), dtype=np.uint8)
    gray_np = rng.integers(0, 256, (40, 200), dtype=np.uint8)
    png = tmp_path / "pic.png"
    Image.fromarray(rng.integers(0, 256, (77, 133, 3), dtype=np.uint8)).save(png)
    imgs = [rgba, gray, rgba_np, gray_np]
    hf_imgs = [rgba, gray, rgba_np, gray_np[..., None], Image.open(png).convert("RGB")]  # HF rejects 2-D arrays
    ref = hf_image(images=hf_imgs, return_tensors="np", input_data_format="channels_last")
    ours = ours_image(imgs + [str(png)])
    np.testing.assert_array_equal(ours["image_grid_thw"], ref["image_grid_thw"])
    assert np.abs(ours["pixel_values"] - ref["pixel_values"]).max() <= 1e-5


def test_image_aspect_over_200_error(hf_image, ours_image, tmp_path):
    ok = np.zeros((10, 1990, 3), np.uint8)  # 199:1
    assert ours_image([ok])["image_grid_thw"].tolist() == hf_image(images=[ok], return_tensors="np")[
        "image_grid_thw"].tolist()
    bad = np.zeros((10, 2010, 3), np.uint8)  # 201:1
    with pytest.raises(ValueError, match="aspect ratio"):
        hf_image(images=[bad])
    with pytest.raises(ProcessingError, match=r"aspect ratio must be smaller than 200, got 201\.0"):
        ours_image([bad])
    path = tmp_path / "strip.png"
    Image.fromarray(bad).save(path)
    with pytest.raises(ProcessingError, match=r"strip\.png.*aspect ratio.*201\.0.*height=10, width=2010"):
        ours_image([str(path)])


def test_image_processor_from_dict_and_dir(tmp_path):
    p = ImageProcessor.from_dict(TINY_PREPROCESSOR)
    assert (p.min_pixels, p.max_pixels, p.patch_size, p.merge_size) == (MIN, MAX, 14, 2)
    d = ImageProcessor.from_dir(tmp_path)  # no file: hub defaults
    assert (d.min_pixels, d.max_pixels) == (12544, 9633792)
    (tmp_path / "preprocessor_config.json").write_text('{"min_pixels": 3136, "max_pixels": 25088}')
    q = ImageProcessor.from_dir(tmp_path)
    assert (q.min_pixels, q.max_pixels) == (3136, 25088)
    assert q.num_image_tokens(90, 130) == 15 and q.num_image_tokens(60, 60) == 4  # docs/MODEL.md §5.1 examples
    with pytest.raises(ProcessingError, match="patch_size.*positive integer"):
        ImageProcessor.from_dict({"patch_size": "14"})
    (tmp_path / "preprocessor_config.json").write_text("{not json")
    with pytest.raises(ProcessingError, match="preprocessor_config.json.*cannot parse JSON"):
        ImageProcessor.from_dir(tmp_path)


# ---------------------------------------------------------------------------------------------------- image errors
def test_missing_image_file(ours_image, tmp_path):
    missing = tmp_path / "nope.png"
    with pytest.raises(ProcessingError, match=r"image file not found: .*nope\.png"):
        load_image(missing)
    with pytest.raises(ProcessingError, match=r"nope\.png"):
        ours_image([str(missing)])


def test_corrupt_image_file(tmp_path):
    p = tmp_path / "corrupt.png"
    p.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(ProcessingError, match=r"corrupt\.png.*not a readable image"):
        load_image(p)
    # A real PNG cut in half: header is fine, data is truncated.
    q = tmp_path / "truncated.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(q)
    q.write_bytes(q.read_bytes()[:600])
    with pytest.raises(ProcessingError, match=r"truncated\.png.*corrupt or truncated"):
        load_image(q)


def test_non_image_file(tmp_path):
    p = tmp_path / "notes.jpg"
    p.write_text("this is a text file, not a picture\n" * 20)
    with pytest.raises(ProcessingError, match=r"notes\.jpg.*not a readable image file"):
        load_image(p)


def test_decompression_bomb_limit(tmp_path, monkeypatch):
    p = tmp_path / "big.png"
    Image.new("RGB", (300, 200)).save(p)
    monkeypatch.setattr(image_mod, "MAX_IMAGE_PIXELS", 10000)
    with pytest.raises(ProcessingError, match=r"big\.png.*60000 pixels \(300x200\).*limit of 10000"):
        load_image(p)


def test_pil_decompression_bomb_warning_is_error(tmp_path, monkeypatch):
    p = tmp_path / "warn.png"
    Image.new("RGB", (100, 50)).save(p)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 3000)  # PIL warns above 3000 px, errors above 6000 px
    with pytest.raises(ProcessingError, match=r"warn\.png.*decompression bomb.*5000 pixels"):
        load_image(p)


def _png_header_only(width: int, height: int) -> bytes:
    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


def test_decompression_bomb_header(tmp_path):
    p = tmp_path / "bomb.png"
    p.write_bytes(_png_header_only(100000, 100000))  # claims 1e10 pixels in a few dozen bytes
    with pytest.raises(ProcessingError, match=r"bomb\.png.*(10000000000 pixels|decompression bomb)"):
        load_image(p)


# ---------------------------------------------------------------------------------------------------- video
def test_sample_frames_matches_hf(hf_video):
    from transformers.video_utils import VideoMetadata as HFMeta

    rng = np.random.default_rng(5)
    for i in range(400):
        fps = float(rng.choice([1, 5, 12, 23.976, 24, 25, 29.97, 30, 60]))
        n = int(rng.integers(1, 30000 if i % 4 == 0 else 400))
        dur = None if i % 5 == 0 else n / fps
        want = hf_video.sample_frames(HFMeta(total_num_frames=n, fps=fps, duration=dur), fps=2)
        got = sample_frames(VideoMetadata(n, fps, dur), fps=2, max_duration=300)
        np.testing.assert_array_equal(got, want, err_msg=f"{n=} {fps=} {dur=}")
        assert len(got) % 2 == 0
    # docs/MODEL.md §5.2 example: 300 frames @ 30 fps -> 0, 15, ..., 285
    assert sample_frames(VideoMetadata(300, 30.0, 10.0)).tolist() == list(range(0, 300, 15))
    with pytest.raises(ProcessingError, match="needs VideoMetadata with fps"):
        sample_frames(VideoMetadata(10, None))


def test_load_video(mp4):
    frames, meta = load_video(mp4)
    assert frames.dtype == np.uint8 and frames.shape == (40, 56, 84, 3)
    assert meta.total_num_frames == 40 and meta.fps == 20.0 and meta.duration == 2.0
    # the pattern moves: consecutive frames differ
    assert np.abs(frames[1].astype(int) - frames[0]).mean() > 5


def _hf_video_call(hf_video, frames, meta, **kw):
    from transformers.video_utils import VideoMetadata as HFMeta

    md = HFMeta(total_num_frames=meta.total_num_frames, fps=meta.fps, duration=meta.duration)
    return hf_video(videos=[frames], video_metadata=[md], do_sample_frames=True, return_metadata=True,
                    do_convert_rgb=False, do_resize=False, return_tensors="np", **kw)


def test_video_matches_hf_no_normalize(hf_video, mp4):
    from transformers.models.glm4v.video_processing_glm4v import smart_resize as hf_sr

    frames, meta = load_video(mp4)
    ref = _hf_video_call(hf_video, frames, meta, do_normalize=False)
    hf_meta = ref["video_metadata"][0]
    # no resize needed: HF's own smart_resize is the identity for these frames
    assert hf_sr(len(hf_meta.frames_indices), 56, 84, 2, 28, VMIN, VMAX) == (56, 84)
    ours = VideoProcessor(min_pixels=VMIN, max_pixels=VMAX, do_normalize=False)((frames, meta))
    assert ours["video_metadata"][0].frames_indices == list(hf_meta.frames_indices) == [0, 10, 20, 30]
    assert ours["timestamps"][0] == list(hf_meta.timestamps) == [0.0, 0.5, 1.0, 1.5]
    np.testing.assert_array_equal(ours["video_grid_thw"], ref["video_grid_thw"])
    np.testing.assert_array_equal(ours["pixel_values_videos"], ref["pixel_values_videos"])


def _torchvision_normalize_standin():
    import torch

    def normalize(t, mean, std, inplace=False):  # torchvision.transforms.v2.functional.normalize_image
        t = t if inplace else t.clone()
        mean = torch.as_tensor(mean, dtype=t.dtype).view(-1, 1, 1)
        std = torch.as_tensor(std, dtype=t.dtype).view(-1, 1, 1)
        return t.sub_(mean).div_(std)

    return types.SimpleNamespace(normalize=normalize)


def test_video_matches_hf_normalized(hf_video, mp4, monkeypatch):
    import transformers.image_processing_backends as backends

    monkeypatch.setattr(backends, "tvF", _torchvision_normalize_standin(), raising=False)
    frames, meta = load_video(mp4)
    # odd sampled count (3 -> last repeated) and a different sampling rate via a shorter clip
    for clip, m in ((frames, meta), (frames[:30], VideoMetadata(30, 20.0, 1.5))):
        ref = _hf_video_call(hf_video, clip, m)
        ours = VideoProcessor(min_pixels=VMIN, max_pixels=VMAX)((clip, m))
        assert ours["video_metadata"][0].frames_indices == list(ref["video_metadata"][0].frames_indices)
        np.testing.assert_array_equal(ours["video_grid_thw"], ref["video_grid_thw"])
        d = np.abs(ours["pixel_values_videos"] - ref["pixel_values_videos"]).max()
        assert d <= 1e-5, d  # measured: 0.0


def test_video_resize_tolerance():
    """Our video resize (PIL BICUBIC on uint8) vs HF's CPU torchvision path, which for uint8 bicubic calls torch's
    native `interpolate(uint8, mode="bicubic", antialias=True, align_corners=False)`.

    Measured (uint8 levels, moving test pattern): smooth channels <= 1 level for up- and down-scaling; a sharp
    sawtooth channel upscaled 200x300 -> 196x308 up to 16 levels at its edges (0.14 % of values > 2 levels, mean
    0.013); random noise with upscaling up to ~21 levels (mean ~0.4) where PIL clips its intermediate pass.
    In normalised units 1 level = 1/(255*0.26) ~= 0.015.
    """
    import torch

    vp = VideoProcessor(min_pixels=VMIN, max_pixels=VMAX)
    smooth = _moving_frames(4, 200, 300)
    h, w = vp.target_size(4, 200, 300)
    assert (h, w) != (200, 300)
    ref = torch.nn.functional.interpolate(torch.from_numpy(smooth).permute(0, 3, 1, 2).contiguous(), size=(h, w),
                                          mode="bicubic", align_corners=False, antialias=True)
    ref = ref.permute(0, 2, 3, 1).numpy().astype(int)
    ours = np.stack([image_mod.pil_resize(f, h, w) for f in smooth]).astype(int)
    d = np.abs(ours - ref)
    assert d[..., :2].max() <= 1, d[..., :2].max()  # smooth channels
    assert d.mean() < 0.05 and (d > 2).mean() < 0.005, (d.max(), d.mean(), (d > 2).mean())


def test_video_processor_from_dict_and_dir(tmp_path):
    v = VideoProcessor.from_dict(TINY_VIDEO_PREPROCESSOR)
    assert (v.min_pixels, v.max_pixels, v.fps, v.max_duration) == (VMIN, VMAX, 2.0, 300)
    d = VideoProcessor.from_dir(tmp_path)
    assert (d.min_pixels, d.max_pixels, d.fps) == (12544, 47040000, 2.0)
    (tmp_path / "preprocessor_config.json").write_text('{"size": {"shortest_edge": 3136, "longest_edge": 25088}}')
    assert VideoProcessor.from_dir(tmp_path).max_pixels == 25088  # falls back to the image config, like HF
    (tmp_path / "video_preprocessor_config.json").write_text('{"fps": 1, "size": {"shortest_edge": 1, '
                                                             '"longest_edge": 99}}')
    v2 = VideoProcessor.from_dir(tmp_path)
    assert (v2.fps, v2.max_pixels) == (1.0, 99)


def test_unreadable_video(tmp_path):
    p = tmp_path / "garbage.mp4"
    p.write_bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    with pytest.raises(ProcessingError, match=r"garbage\.mp4.*not a readable video"):
        load_video(p)
    t = tmp_path / "text.mp4"
    t.write_text("hello\n" * 100)
    with pytest.raises(ProcessingError, match=r"text\.mp4"):
        load_video(t)
    with pytest.raises(ProcessingError, match=r"video file not found: .*missing\.mp4"):
        load_video(tmp_path / "missing.mp4")
    with pytest.raises(ProcessingError, match=r"text\.mp4"):
        VideoProcessor()([str(t)])


def test_video_needs_metadata_for_sampling():
    frames = np.zeros((8, 56, 56, 3), np.uint8)
    with pytest.raises(ProcessingError, match="frame sampling needs VideoMetadata"):
        VideoProcessor()(frames)
    out = VideoProcessor(min_pixels=VMIN, max_pixels=VMAX)(frames, do_sample_frames=False)
    assert out["video_grid_thw"].tolist() == [[4, 4, 4]]
    assert out["video_metadata"][0].frames_indices == list(range(8))
    red = out["pixel_values_videos"][:, : 2 * 14 * 14]  # channel 0 of every patch row: black after CLIP norm
    assert np.allclose(red, -0.48145466 / 0.26862954, atol=1e-5)
    assert math.isclose(float(red[0, 0]), -1.79226, abs_tol=1e-4)


# ---------------------------------------------------------------------------------------------------- high bit depth
def _png16(arr: np.ndarray, color_type: int, trns: bytes | None = None) -> bytes:
    """A 16-bit PNG written by hand (PIL cannot write 16-bit RGB / grey+alpha): arr uint16 (H, W, C)."""
    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    h, w = arr.shape[:2]
    raw = b"".join(b"\0" + arr[y].astype(">u2").tobytes() for y in range(h))
    extra = chunk(b"tRNS", trns) if trns is not None else b""
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, color_type, 0, 0, 0)) + extra
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


GREY16 = np.array([[0, 255, 256, 1000, 32768], [40000, 65280, 65535, 12345, 770]], np.uint16)


def test_16bit_grey_png_is_scaled_not_clipped(tmp_path, ours_image, hf_image):
    p = tmp_path / "grey 16.png"
    Image.fromarray(GREY16).save(p)
    assert Image.open(p).mode == "I;16"
    msb = np.array([[0, 0, 1, 3, 128], [156, 255, 255, 48, 3]], np.uint8)  # value >> 8
    got = np.asarray(load_image(p))
    np.testing.assert_array_equal(got, np.repeat(msb[..., None], 3, axis=-1))
    # the same picture as a 16-bit RGB PNG: Pillow itself keeps the top byte, so both give the same input
    rgb = tmp_path / "rgb16.png"
    rgb.write_bytes(_png16(np.repeat(GREY16[..., None], 3, axis=-1), color_type=2))
    assert Image.open(rgb).mode == "RGB"
    np.testing.assert_array_equal(np.asarray(load_image(rgb)), got)
    np.testing.assert_array_equal(ours_image([str(p)])["pixel_values"], ours_image([str(rgb)])["pixel_values"])
    # PIL image and uint16 array inputs, big-endian too
    for img in (Image.open(p), Image.fromarray(GREY16.astype(">u2")), GREY16):
        np.testing.assert_array_equal(image_mod.to_rgb_array(img), np.repeat(msb[..., None], 3, axis=-1))
    # transformers clips instead (every value above 255 is white): the documented deviation
    ref = hf_image(images=[Image.open(p)], return_tensors="np")["pixel_values"]
    assert not np.allclose(ref, ours_image([str(p)])["pixel_values"])


def test_16bit_with_alpha(tmp_path):
    """A file path drops alpha like transformers' load_image; a PIL image is composited onto white."""
    ga = np.stack([GREY16, np.full_like(GREY16, 0)], -1)  # grey + alpha, 16 bits each
    ga[0, 0, 1] = ga[1, 1, 1] = 65535  # two opaque pixels
    p = tmp_path / "ga16.png"
    p.write_bytes(_png16(ga, color_type=4))
    assert np.asarray(load_image(p))[0, :, 0].tolist() == [0, 0, 1, 3, 128]  # top bytes, alpha dropped
    got = image_mod.to_rgb_array(Image.open(p))
    assert got[0, 0].tolist() == [0, 0, 0] and got[1, 1].tolist() == [255, 255, 255]
    assert (got[0, 1:] == 255).all()  # transparent -> white
    # 16-bit grey with a transparent grey value (tRNS): that value becomes white, the others keep their top byte
    q = tmp_path / "trns16.png"
    q.write_bytes(_png16(GREY16[..., None], color_type=0, trns=struct.pack(">H", 32768)))
    got = image_mod.to_rgb_array(Image.open(q))[..., 0]
    assert got[0, 4] == 255 and got[1, 0] == 156 and got[0, 3] == 3
    assert np.asarray(load_image(q))[0, 4, 0] == 128


def test_32bit_int_and_float_images():
    i32 = Image.fromarray(np.array([[-5, 70000, 25600, 255, 65535]], np.int32))
    assert i32.mode == "I"
    # "I" is read as 16-bit data: clipped to 0..65535, top byte
    assert image_mod.to_rgb_array(i32)[0, :, 0].tolist() == [0, 255, 100, 0, 255]
    f = Image.fromarray(np.array([[-3, 0.4, 1.5, 127.6, 254.9, 300, np.nan]], np.float32))
    assert f.mode == "F"
    # "F" keeps PIL's 0..255 convention (truncated, clipped; NaN -> 0), as transformers does
    assert image_mod.to_rgb_array(f)[0, :, 0].tolist() == [0, 0, 1, 127, 254, 255, 0]
    with pytest.raises(ProcessingError, match="expected a uint8 \\(or uint16\\) image array, got dtype float32"):
        image_mod.to_rgb_array(np.zeros((4, 4, 3), np.float32))


def test_palette_and_cmyk_match_hf(tmp_path, ours_image, hf_image):
    rng = np.random.default_rng(7)
    pal = Image.fromarray(rng.integers(0, 256, (60, 90, 3), dtype=np.uint8)).quantize(16)
    pal.info["transparency"] = 3
    pp = tmp_path / "pal.png"
    pal.save(pp, transparency=3)
    cmyk = Image.fromarray(rng.integers(0, 256, (64, 80, 4), dtype=np.uint8), "CMYK")
    cp = tmp_path / "cmyk.jpg"
    cmyk.save(cp)
    for path in (pp, cp):
        img = Image.open(path)
        assert img.mode in ("P", "CMYK")
        ref = hf_image(images=[img], return_tensors="np")
        ours = ours_image([img])
        np.testing.assert_array_equal(ours["image_grid_thw"], ref["image_grid_thw"])
        assert np.abs(ours["pixel_values"] - ref["pixel_values"]).max() <= 1e-5, path
