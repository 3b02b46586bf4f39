"""Video files: the bounded loader (sampled indices from the stream's metadata, one decode pass keeping only those
frames, resized as they come) against an independent decode-everything reference and transformers' sampling.

The reference (`_decode_all`) is the loader as it was before: PyAV decodes every frame to RGB, the metadata is the
decoded count and the stream's average rate, and HF's own `Glm4vVideoProcessor.sample_frames` picks the indices.
The processor's array path ((frames, metadata) -> sample, resize, normalise, patchify) on those frames is what a
file gave before, so a file must now give bit-identical pixel values.
"""

from __future__ import annotations

import os
import struct
import tracemalloc
import wave

import av
import numpy as np
import pytest
from PIL import Image

from glm41v_jax.processing import (
    ProcessingError,
    VideoMetadata,
    VideoProcessor,
    load_video,
    sample_frames,
    video_decode,
)
from glm41v_jax.processing import video as video_mod

VMIN, VMAX = 2 * 28 * 28 * 4, 8 * 28 * 28 * 64


def _pattern(n: int, h: int, w: int, seed: int = 0) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    out = np.empty((n, h, w, 3), np.uint8)
    for t in range(n):
        out[t, ..., 0] = (127 + 120 * np.sin((xx + 3 * t + seed) / 6.0)).astype(np.uint8)
        out[t, ..., 1] = (127 + 120 * np.cos((yy - 2 * t) / 5.0)).astype(np.uint8)
        out[t, ..., 2] = (xx + yy + 7 * t) % 256
    return out


def write_video(path, frames: np.ndarray, fps: int, pts: list[int] | None = None, codec: str = "mpeg4",
                options: dict | None = None) -> str:
    """Encode frames with PyAV; `pts` (in 1/fps units) gives variable frame timing."""
    path = str(path)
    with av.open(path, "w", options=options or {}) as c:
        s = c.add_stream(codec, rate=fps)
        s.width, s.height, s.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        for i, f in enumerate(frames):
            vf = av.VideoFrame.from_ndarray(f, format="rgb24")
            if pts is not None:
                vf.pts = pts[i]
            for p in s.encode(vf):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return path


def _read(path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _decode_all(path) -> tuple[np.ndarray, VideoMetadata]:
    """Independent reference: every frame decoded (the pre-issue-10 loader)."""
    with av.open(str(path)) as c:
        s = c.streams.video[0]
        rate = s.average_rate or s.guessed_rate or s.base_rate
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(s)]
    n, fps = len(frames), float(rate)
    return np.stack(frames), VideoMetadata(n, fps, n / fps)


def _hf_indices(meta: VideoMetadata) -> list[int]:
    from transformers.models.glm4v.video_processing_glm4v import Glm4vVideoProcessor
    from transformers.video_utils import VideoMetadata as HFMeta

    hf = Glm4vVideoProcessor.__new__(Glm4vVideoProcessor)  # sample_frames only reads its arguments
    md = HFMeta(total_num_frames=meta.total_num_frames, fps=meta.fps, duration=meta.duration)
    return [int(i) for i in hf.sample_frames(md, fps=2)]


def _check_file_vs_reference(path, vp: VideoProcessor) -> dict:
    frames, meta = _decode_all(path)
    want_idx = _hf_indices(meta)
    got = vp(str(path))
    ref = vp((frames, meta))
    md = got["video_metadata"][0]
    assert md.frames_indices == want_idx == ref["video_metadata"][0].frames_indices
    assert md.total_num_frames == meta.total_num_frames and md.fps == meta.fps
    assert got["timestamps"][0] == [i / meta.fps for i in want_idx]
    np.testing.assert_array_equal(got["video_grid_thw"], ref["video_grid_thw"])
    np.testing.assert_array_equal(got["pixel_values_videos"], ref["pixel_values_videos"])
    return got


@pytest.fixture(scope="module")
def vdir(tmp_path_factory):
    return tmp_path_factory.mktemp("videos dir")  # a space in the path, as users have


@pytest.fixture
def vp():
    return VideoProcessor(min_pixels=VMIN, max_pixels=VMAX)


# ------------------------------------------------------------------------------------ same result as decode-all
@pytest.mark.parametrize("n,fps,h,w", [
    (40, 20, 56, 84),   # no resize needed, 4 frames kept
    (45, 30, 50, 70),   # 1.5 s -> 3 samples, odd: last repeated; resized 50x70 -> 56x84
    (7, 5, 61, 47),     # 1.4 s at 5 fps: indices 0, 3; odd frame count
    (1, 30, 40, 40),    # shorter than one frame at 2 fps: [0, 0]
    (3, 24, 33, 90),    # 3 frames, 0.125 s
    (301, 25, 36, 64),  # 12 s, 24 samples, resize
])
def test_file_matches_decode_all_and_hf(vdir, vp, n, fps, h, w):
    path = write_video(vdir / f"clip {n}x{fps}.mp4", _pattern(n, h, w, seed=n), fps)
    got = _check_file_vs_reference(path, vp)
    assert len(got["video_metadata"][0].frames_indices) % 2 == 0


def test_longer_than_max_duration(vdir):
    """Over max_duration the samples spread over the whole clip (HF); here max_duration=3 s on a 5 s clip."""
    path = write_video(vdir / "long.mp4", _pattern(50, 28, 28), 10)
    vp = VideoProcessor(min_pixels=VMIN, max_pixels=VMAX, max_duration=3)
    frames, meta = _decode_all(path)
    got = vp(path)
    want = sample_frames(meta, fps=2, max_duration=3).tolist()
    assert got["video_metadata"][0].frames_indices == want and len(want) == 6 and want[-1] == 49
    np.testing.assert_array_equal(got["pixel_values_videos"], vp((frames, meta))["pixel_values_videos"])


def test_no_frame_count_in_header(vdir, vp):
    """Matroska stores no frame count: the loader counts demuxed packets (no decoding)."""
    path = write_video(vdir / "clip.mkv", _pattern(37, 56, 56), 12)
    with av.open(path) as c:
        assert c.streams.video[0].frames == 0
    assert video_decode._probe_video(av, path, 10**9)[0].total_num_frames == 37
    _check_file_vs_reference(path, vp)


def test_variable_frame_rate(vdir, vp):
    """Irregular timestamps: sampling is by frame index with the average rate, like HF's PyAV reader."""
    pts = np.cumsum([0] + [1 + (i % 3) * 2 for i in range(59)]).tolist()
    path = write_video(vdir / "vfr.mp4", _pattern(60, 56, 84), 30, pts=pts)
    frames, meta = _decode_all(path)
    assert abs(meta.fps - 60 / (pts[-1] + 1) * 30) < 0.5  # the average rate reflects the gaps (~10.2 fps)
    _check_file_vs_reference(path, vp)


def test_header_count_wrong_two_passes(vdir, vp):
    """A faststart mp4 cut short: the header still claims every frame, fewer decode. The second pass samples from
    the true count, so the result equals decoding everything."""
    full = write_video(vdir / "full.mp4", _pattern(90, 56, 84), 30, options={"movflags": "faststart"})
    data = _read(full)
    cut = vdir / "cut.mp4"
    cut.write_bytes(data[: len(data) // 2])
    with av.open(str(cut)) as c:
        header = c.streams.video[0].frames
    frames, meta = _decode_all(cut)
    assert header == 90 and 10 < meta.total_num_frames < 90
    _check_file_vs_reference(cut, vp)
    every, every_meta = load_video(cut)  # every frame, no resize: fewer frames than the header's count
    np.testing.assert_array_equal(every, frames)
    assert every_meta.total_num_frames == meta.total_num_frames and every_meta.frames_indices is None
    unsampled = vp(str(cut), do_sample_frames=False)
    np.testing.assert_array_equal(unsampled["pixel_values_videos"],
                                  vp((frames, meta), do_sample_frames=False)["pixel_values_videos"])


@pytest.mark.parametrize("codec,gop,bframes", [("mpeg4", 12, 0), ("libx264", 10, 2), ("libx264", 25, 3)])
def test_seeking_matches_front_to_back(vdir, monkeypatch, codec, gop, bframes):
    """Sparse samples (40 s clip, max_duration 4 s: every 57th frame) seek to the keyframe before each one; the
    frames equal a front-to-back decode, also with B-frames (decode order unlike presentation order)."""
    path = str(vdir / f"seek {codec} {gop} {bframes}.mp4")
    frames = _pattern(400, 56, 84)
    with av.open(path, "w") as c:
        s = c.add_stream(codec, rate=10)
        s.width, s.height, s.pix_fmt = 84, 56, "yuv420p"
        s.gop_size = gop
        s.codec_context.max_b_frames = bframes
        for f in frames:
            for p in s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    vp = VideoProcessor(min_pixels=VMIN, max_pixels=VMAX, max_duration=4)
    seeks = []
    real = video_decode._decode_seeking

    def spy(*a, **k):
        real(*a, **k)
        seeks.append(a[2].seeks(a[3].idx))

    monkeypatch.setattr(video_decode, "_decode_seeking", spy)
    got = vp(path)
    assert seeks and sum(s for _, s in seeks[0]) >= 4, seeks  # the seek path ran to the end, seeking
    monkeypatch.setattr(video_decode._Packets, "seek_plan", lambda *a: None)
    seq = vp(path)
    ref_frames, ref_meta = _decode_all(path)
    ref = vp((ref_frames, ref_meta))
    assert got["video_metadata"][0].frames_indices == ref["video_metadata"][0].frames_indices
    assert got["video_metadata"][0].total_num_frames == 400
    np.testing.assert_array_equal(got["pixel_values_videos"], seq["pixel_values_videos"])
    np.testing.assert_array_equal(got["pixel_values_videos"], ref["pixel_values_videos"])


def test_header_count_too_low(vdir, vp, monkeypatch):
    """A header that claims fewer frames than the file holds. No container written here keeps such a count (mp4 and
    avi take it from their index), so the probe's count is lowered by a wrapper around the real probe."""
    path = write_video(vdir / "more.mp4", _pattern(30, 56, 84), 10)
    frames, meta = _decode_all(path)
    real = video_decode._probe_video

    def low_count(*a):
        m, packets = real(*a)
        return VideoMetadata(7, m.fps, 7 / m.fps, width=m.width, height=m.height), packets

    monkeypatch.setattr(video_decode, "_probe_video", low_count)
    every, every_meta = load_video(path)
    np.testing.assert_array_equal(every, frames)
    assert every_meta.total_num_frames == 30
    _check_file_vs_reference(path, vp)  # sampled from 7 frames first, then again from the 30 decoded
    got = vp(path, do_sample_frames=False)
    np.testing.assert_array_equal(got["pixel_values_videos"],
                                  vp((frames, meta), do_sample_frames=False)["pixel_values_videos"])


def test_seek_failure_falls_back_to_front_to_back(vdir, vp, monkeypatch):
    """A format that cannot seek: stood in for by a seek pass that raises FFmpeg's error (every container written
    here can seek)."""
    path = write_video(vdir / "noseek.mp4", _pattern(400, 28, 28), 10)
    calls = []

    def failing(*a, **k):
        calls.append(1)
        raise av.FFmpegError(1, "seek not supported")

    monkeypatch.setattr(video_decode, "_decode_seeking", failing)
    frames, meta = _decode_all(path)
    got = VideoProcessor(min_pixels=VMIN, max_pixels=VMAX, max_duration=4)(path)
    ref = VideoProcessor(min_pixels=VMIN, max_pixels=VMAX, max_duration=4)((frames, meta))
    assert calls == [1]
    np.testing.assert_array_equal(got["pixel_values_videos"], ref["pixel_values_videos"])


def test_unsampled_file_is_bounded_by_budget(vdir):
    path = write_video(vdir / "all.mp4", _pattern(12, 56, 84), 10)
    frames, meta = _decode_all(path)
    got = VideoProcessor(min_pixels=VMIN, max_pixels=VMAX)(path, do_sample_frames=False)
    ref = VideoProcessor(min_pixels=VMIN, max_pixels=VMAX)((frames, meta), do_sample_frames=False)
    assert got["video_metadata"][0].frames_indices == list(range(12))
    np.testing.assert_array_equal(got["pixel_values_videos"], ref["pixel_values_videos"])
    with pytest.raises(ProcessingError, match=r"all\.mp4.*frame sampling off.*12 frames.*max_frames=8"):
        VideoProcessor(max_frames=8)(path, do_sample_frames=False)


def test_load_video_keeps_only_sampled_frames_in_memory(vdir):
    """Decoding 300 frames while keeping 20: the traced NumPy peak is a few kept frames, not the clip."""
    n, h, w = 300, 96, 128
    path = write_video(vdir / "ten seconds.mp4", _pattern(n, h, w), 30)
    vp = VideoProcessor(min_pixels=VMIN, max_pixels=VMAX)
    tracemalloc.start()
    try:
        frames, meta = vp.load(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    all_frames = n * h * w * 3
    assert len(frames) == 20 and meta.total_num_frames == n
    assert peak < all_frames / 5, (peak, all_frames)  # measured: ~0.5 MB vs 11 MB for every frame


def test_user_metadata_with_a_path(vdir, vp):
    path = write_video(vdir / "meta.mp4", _pattern(40, 56, 84), 20)
    frames, meta = _decode_all(path)
    got = vp((path, VideoMetadata(40, 10.0, 4.0)))  # a different fps: sampling follows the given metadata
    ref = vp((frames, VideoMetadata(40, 10.0, 4.0)))
    assert got["video_metadata"][0].frames_indices == ref["video_metadata"][0].frames_indices == [0, 5, 10, 15, 20,
                                                                                                  25, 30, 35]
    np.testing.assert_array_equal(got["pixel_values_videos"], ref["pixel_values_videos"])
    with pytest.raises(ProcessingError, match=r"meta\.mp4.*total_num_frames=41.*file has 40 frames"):
        vp((path, VideoMetadata(41, 20.0, 2.05)))
    with pytest.raises(ProcessingError, match=r"video metadata: .*'frames'.*fields: total_num_frames, fps"):
        vp((path, {"frames": 40, "fps": 20.0}))


def _rotate_tkhd(data: bytes, degrees: int) -> bytes:
    """Set the mp4 track header's display matrix (what phones write for portrait video)."""
    cos, sin = {90: (0, 1), 180: (-1, 0), 270: (0, -1)}[degrees]
    out = bytearray(data)
    i = out.find(b"tkhd")
    assert out[i + 4] == 0  # version 0 box: the matrix starts 40 bytes after the box type
    m = (cos << 16, sin << 16, 0, (-sin) << 16, cos << 16, 0, 0, 0, 1 << 30)
    out[i + 44:i + 80] = struct.pack(">9i", *m)
    return bytes(out)


@pytest.mark.parametrize("degrees", [90, 180, 270])
def test_rotated_video(vdir, vp, degrees):
    """A display-matrix rotation is applied to the kept frames (like ffmpeg's autorotate)."""
    path = write_video(vdir / "upright.mp4", _pattern(20, 56, 84), 10)
    rot = vdir / f"rot{degrees}.mp4"
    rot.write_bytes(_rotate_tkhd(_read(path), degrees))
    with av.open(str(rot)) as c:
        assert next(c.decode(video=0)).rotation == (180 - degrees) % 360 - 180  # ffmpeg: counter-clockwise, +-180
    upright, _ = VideoProcessor(do_resize=False).load(path)
    frames, meta = VideoProcessor(do_resize=False).load(str(rot))
    k = {90: 3, 180: 2, 270: 1}[degrees]  # np.rot90 turns counter-clockwise
    np.testing.assert_array_equal(frames, np.rot90(upright, k, axes=(1, 2)))
    assert (meta.height, meta.width) == ((84, 56) if degrees != 180 else (56, 84))
    assert vp(str(rot))["video_grid_thw"].tolist() == [[2, 6, 4] if degrees != 180 else [2, 4, 6]]


# ------------------------------------------------------------------------------------ budget
def test_max_frames_budget(vdir):
    path = write_video(vdir / "budget.mp4", _pattern(40, 56, 84), 10)  # 4 s -> 8 kept frames
    with pytest.raises(ProcessingError, match=r"budget\.mp4.*sampling keeps 8 frames.*max_frames=6"):
        VideoProcessor(max_frames=6)(path)
    assert VideoProcessor(max_frames=8, min_pixels=VMIN, max_pixels=VMAX)(path)["video_grid_thw"].tolist()[0][0] == 4
    frames, meta = _decode_all(path)
    with pytest.raises(ProcessingError, match=r"8 frames kept.*max_frames=6"):
        VideoProcessor(max_frames=6)((frames, meta))


def test_max_frame_pixels_budget(vdir):
    path = write_video(vdir / "pixels.mp4", _pattern(4, 56, 84), 10)
    with pytest.raises(ProcessingError, match=r"pixels\.mp4.*84x56 = 4704 pixels.*max_frame_pixels=4000"):
        VideoProcessor(max_frame_pixels=4000)(path)
    assert VideoProcessor(max_frame_pixels=4704, min_pixels=VMIN, max_pixels=VMAX)(path)["video_grid_thw"].size


def test_budget_from_config(tmp_path):
    v = VideoProcessor.from_dict({"max_frames": 64, "max_frame_pixels": 1920 * 1080})
    assert (v.max_frames, v.max_frame_pixels) == (64, 1920 * 1080)
    d = VideoProcessor.from_dict({})
    assert (d.max_frames, d.max_frame_pixels) == (video_mod.VIDEO_MAX_FRAMES, video_mod.VIDEO_MAX_FRAME_PIXELS)
    for bad in (0, -3, 2.5, "10", True):
        with pytest.raises(ProcessingError, match=r"video_preprocessor_config\.json.*'max_frames'.*positive integer"):
            VideoProcessor.from_dict({"max_frames": bad}, source="video_preprocessor_config.json")
    with pytest.raises(ProcessingError, match="max_frame_pixels must be a positive integer"):
        load_video(__file__, max_frame_pixels=0)


def test_extreme_aspect_fails_before_decoding(vdir, monkeypatch):
    path = write_video(vdir / "strip.mp4", _pattern(4, 16, 3392), 10)  # 212:1

    def no_decode(*a, **k):
        raise AssertionError("decoded a video whose size is already known to be refused")

    monkeypatch.setattr(video_decode, "_decode", no_decode)
    with pytest.raises(ProcessingError, match=r"strip\.mp4.*aspect ratio must be smaller than 200"):
        VideoProcessor()(path)


def _blank_video(path, w: int, h: int, codec: str) -> str:
    with av.open(str(path), "w") as c:
        s = c.add_stream(codec, rate=2)
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        if codec == "libx264":
            s.options = {"preset": "ultrafast"}
        f = av.VideoFrame(w, h, "yuv420p")
        for plane in f.planes:
            plane.update(bytes(plane.buffer_size))
        for i in range(2):
            f.pts = i
            for p in s.encode(f):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return str(path)


@pytest.mark.slow
def test_8k_video_decodes_and_larger_is_refused_from_the_header(tmp_path, monkeypatch):
    """8K UHD (the default max_frame_pixels) decodes; 8200x4400 is refused before any frame is decoded."""
    k8 = _blank_video(tmp_path / "8k.mp4", 7680, 4320, "mpeg4")
    frames, meta = VideoProcessor(do_resize=False).load(k8)
    assert frames.shape == (2, 4320, 7680, 3) and meta.frames_indices == [0, 1]
    big = _blank_video(tmp_path / "huge.mp4", 8200, 4400, "libx264")

    def no_decode(*a, **k):
        raise AssertionError("decoded a video whose frame size is over the budget")

    monkeypatch.setattr(video_decode, "_decode", no_decode)
    with pytest.raises(ProcessingError, match=r"huge\.mp4.*8200x4400 = 36080000 pixels.*max_frame_pixels=33177600"):
        VideoProcessor()(big)


# ------------------------------------------------------------------------------------ hostile files
def _audio_only(path) -> str:
    with wave.open(str(path), "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(8000)
        f.writeframes(np.zeros(8000, np.int16).tobytes())
    return str(path)


def _no_frames(path) -> str:
    """A faststart mp4 cut right after its header: the header lists 20 frames, the file holds none."""
    full = write_video(str(path) + ".full.mp4", _pattern(20, 32, 32), 10, options={"movflags": "faststart"})
    data = _read(full)
    with open(path, "wb") as f:
        f.write(data[: data.find(b"mdat") + 4])
    return str(path)


def hostile_videos(d) -> dict[str, tuple[str, str]]:
    """name -> (path, regex of the one-line error)."""
    d = str(d)
    out = {}
    garbage = os.path.join(d, "garbage.mp4")
    with open(garbage, "wb") as f:
        f.write(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    out["garbage"] = (garbage, r"garbage\.mp4.*not a readable video")
    good = write_video(os.path.join(d, "good.mp4"), _pattern(20, 32, 32), 10)
    head = os.path.join(d, "head only.mp4")
    with open(head, "wb") as f:
        f.write(_read(good)[:48])
    out["truncated header"] = (head, r"head only\.mp4.*(not a readable video|no video stream|no decodable)")
    data = bytearray(_read(good))  # the frames' data overwritten with zeros: every packet fails to decode
    start, moov = data.find(b"mdat") + 4, data.find(b"moov")
    data[start:moov - 4 if moov > start else len(data)] = bytes((moov - 4 if moov > start else len(data)) - start)
    zeros = os.path.join(d, "zeroed.mp4")
    with open(zeros, "wb") as f:
        f.write(bytes(data))
    out["undecodable packets"] = (zeros, r"zeroed\.mp4.*not a readable video")
    out["audio only"] = (_audio_only(os.path.join(d, "sound.wav")), r"sound\.wav.*no video stream")
    out["no frames"] = (_no_frames(os.path.join(d, "empty.mp4")), r"empty\.mp4.*no decodable frames")
    png = os.path.join(d, "photo.png")
    Image.fromarray(_pattern(1, 40, 60)[0]).save(png)
    out["png"] = (png, r"photo\.png.*still image.*not a video; give it as an image")
    jpg = os.path.join(d, "photo.jpg")
    Image.fromarray(_pattern(1, 40, 60)[0]).save(jpg)
    out["jpeg"] = (jpg, r"photo\.jpg.*still image")
    out["directory"] = (d, r"directory")
    out["missing"] = (os.path.join(d, "nope.mp4"), r"video file not found: .*nope\.mp4")
    return out


def test_hostile_video_files(tmp_path):
    for name, (path, msg) in hostile_videos(tmp_path).items():
        with pytest.raises(ProcessingError, match=msg) as e:
            VideoProcessor()(path)
        assert "\n" not in str(e.value), name


def test_gif_as_video(tmp_path, vp):
    """An animated GIF is a video (ffmpeg's gif demuxer); a one-frame GIF is a one-frame video."""
    frames = [Image.fromarray(f) for f in _pattern(6, 56, 84)]
    anim = tmp_path / "anim.gif"
    frames[0].save(anim, save_all=True, append_images=frames[1:], duration=250, loop=0)
    got = vp(str(anim))
    ref_frames, ref_meta = _decode_all(anim)
    assert ref_meta.total_num_frames == 6 and ref_meta.fps == 4.0
    assert got["video_metadata"][0].frames_indices == _hf_indices(ref_meta) == [0, 2, 4, 4]
    np.testing.assert_array_equal(got["pixel_values_videos"], vp((ref_frames, ref_meta))["pixel_values_videos"])
    one = tmp_path / "one.gif"
    frames[0].save(one)
    assert vp(str(one))["video_grid_thw"].tolist() == [[1, 4, 6]]


def test_cli_hostile_video_one_line(tmp_path, run_cli):
    """`glm41v generate --video` on bad files: exit 2 and one `error:` line naming the file, no traceback."""
    cases = hostile_videos(tmp_path)
    for name in ("garbage", "audio only", "png"):
        path, msg = cases[name]
        rc, out, err = run_cli("generate", "--video", path, "--prompt", "describe", "--max-new-tokens", "2")
        assert rc == 2, (name, rc, err)
        lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
        assert len(lines) == 1 and "Traceback" not in err, (name, err)
        assert os.path.basename(path) in lines[0], (name, lines[0])


def test_hostile_sampling_numbers_one_error(tmp_path):
    """fps / max_duration that are not finite, <= 0, or ask for more than VIDEO_MAX_SAMPLES frame indices (fps 1e308
    used to overflow in sample_frames, fps 1e9 to build a list of 6e10 indices) are one ProcessingError naming the
    file and field; so are metadata with fps 0, NaN or a NaN duration; do_sample_frames must be a JSON bool and size
    an object."""
    src = "video_preprocessor_config.json"
    for cfg, field in (({"fps": 1e308}, "fps x max_duration"), ({"fps": 1e9}, "fps x max_duration"),
                       ({"max_duration": 1e12}, "fps x max_duration"), ({"fps": float("inf")}, "'fps'"),
                       ({"fps": float("nan")}, "'fps'"), ({"max_duration": -1}, "'max_duration'"),
                       ({"do_sample_frames": "yes"}, "'do_sample_frames'"), ({"size": []}, "'size'")):
        with pytest.raises(ProcessingError, match=rf"{src}.*{field}") as e:
            VideoProcessor.from_dict(cfg, source=src)
        assert "\n" not in str(e.value), cfg
    ok = VideoProcessor.from_dict({"fps": 4, "max_duration": 10})
    assert (ok.fps, ok.max_duration) == (4.0, 10)
    meta = VideoMetadata(total_num_frames=60, fps=30.0, duration=2.0)
    assert sample_frames(meta, fps=2, max_duration=300).tolist() == [0, 15, 30, 45]
    for fps, dur in ((float("inf"), 300), (2, float("nan")), (1e9, 300), (0, 300)):
        with pytest.raises(ProcessingError, match="fps|max_duration"):
            sample_frames(meta, fps=fps, max_duration=dur)
    for bad in (VideoMetadata(total_num_frames=60, fps=0.0), VideoMetadata(total_num_frames=60, fps=float("nan")),
                VideoMetadata(total_num_frames=60, fps=30.0, duration=float("nan"))):
        with pytest.raises(ProcessingError, match="video metadata"):
            sample_frames(bad)


def test_cli_hostile_sampling_config_one_line(tmp_path, run_cli):
    """`glm41v generate --video` with fps 1e308 in the model's video_preprocessor_config.json: exit 2, one line
    naming the file (was an OverflowError traceback), the model and clip given as relative paths."""
    import json

    from glm41v_jax import tiny

    model = tmp_path / "my model"
    tiny.materialize_tiny_checkpoint(str(model))
    cfg_path = model / "video_preprocessor_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["fps"] = 1e308
    cfg_path.write_text(json.dumps(cfg))
    clip = write_video(tmp_path / "clip.mp4", _pattern(4, 56, 84), 10)
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        rc, out, err = run_cli("generate", "--model", "my model", "--video", os.path.basename(clip), "--prompt", "x",
                               "--max-new-tokens", "2")
    finally:
        os.chdir(cwd)
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert rc == 2 and "Traceback" not in err, err
    assert len(lines) == 1 and "video_preprocessor_config.json" in lines[0] and "fps" in lines[0], lines
