"""GLM-4.1V video pre-processing (PyAV decode, fps frame sampling, resize, patchify); docs/MODEL.md §5.2.

What is special here (checked against transformers 5.23 `Glm4vVideoProcessor`):

* `sample_frames` samples `fps` (default 2) frames per second of video: `idx_i = min(N-1, ceil(i*F/fps))`, for videos
  longer than `max_duration` (300 s) `int(300*fps)` frames spread over the whole duration; duplicates are dropped
  (order kept) and **an odd count repeats the last index**. Timestamps are `idx / F` seconds.
* smart_resize for a video uses num_frames = number of sampled frames (pixels compared as round(T/2)*2*h*w).
* Rescale+normalise are fused like torchvision: `(x - 255*mean) / (255*std)` in float32.
* Patchify: T padded to even by repeating the last frame; the two temporal slots of a patch are two real frames.
* Resize deviation: HF resizes video frames with torchvision `resize(antialias=True)` (bicubic on float32, then
  rounded to uint8); torchvision is not a dependency here, so frames are resized with PIL BICUBIC on uint8 like the
  image processor. Where no resize is needed the outputs are bit-identical; otherwise frames may differ by about
  one uint8 level (see tests/test_processing.py for the measured tolerance).
* Files are decoded in memory bounded by the kept frames (`load_video`): indices come from the stream's metadata,
  frames that are not kept are dropped as they are decoded, kept ones are resized at once. The result equals
  decoding every frame and sampling afterwards (HF's indices and timestamps). Deviation: a display-matrix rotation
  is applied (HF's PyAV reader ignores it). Budget: `VideoProcessor.max_frames`, `max_frame_pixels`.
"""

from __future__ import annotations

import array
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .image import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    ProcessingError,
    _fields_from_dict,
    patchify_frames,
    pil_resize,
    read_processor_config,
    smart_resize,
    to_rgb_array,
)

# transformers' Glm4vVideoProcessor class defaults (used when no config file gives a size).
VIDEO_MIN_PIXELS = 112 * 112
VIDEO_MAX_PIXELS = 28 * 28 * 2 * 30000


@dataclass
class VideoMetadata:
    """Video facts needed for frame sampling and timestamps (mirrors `transformers.video_utils.VideoMetadata`)."""

    total_num_frames: int
    fps: float | None = None
    duration: float | None = None
    frames_indices: list[int] | None = None
    width: int | None = None
    height: int | None = None

    @property
    def timestamps(self) -> list[float]:
        """Seconds of the (sampled) frames: frames_indices / fps."""
        if self.fps is None or self.frames_indices is None:
            raise ProcessingError("cannot compute video timestamps: VideoMetadata.fps or frames_indices is None")
        return [int(i) / self.fps for i in self.frames_indices]


VideoInput = str | os.PathLike | np.ndarray | Sequence[Any] | tuple[Any, VideoMetadata]


# Video budget (per video; `VideoProcessor.max_frames` / `max_frame_pixels`, or the same keys in
# video_preprocessor_config.json). Past it a video fails with one ProcessingError before any large allocation.
# 600 frames is the most that HF's default sampling keeps (2 fps x 300 s); 8K UHD is the largest common frame.
VIDEO_MAX_FRAMES = 1024
VIDEO_MAX_FRAME_PIXELS = 7680 * 4320
# The most frame indices `fps` x `max_duration` may ask the sampler for, before duplicates are dropped and before the
# `max_frames` budget is checked (HF's defaults ask for 600): past it, building the index list itself would hang.
VIDEO_MAX_SAMPLES = 1 << 20

# ffmpeg demuxers of single still images: such a file is refused as a video (give it as an image instead).
_IMAGE_DEMUXERS = ("image2", "_pipe")

SampleFn = Callable[[VideoMetadata], Sequence[int]]
SizeFn = Callable[[int, int, int], tuple[int, int]]


def load_video(
    path: str | os.PathLike,
    sample: SampleFn | None = None,
    size: SizeFn | None = None,
    *,
    resample: int = 3,
    max_frames: int = VIDEO_MAX_FRAMES,
    max_frame_pixels: int = VIDEO_MAX_FRAME_PIXELS,
) -> tuple[np.ndarray, VideoMetadata]:
    """Decode a video file with PyAV -> (uint8 (T, H, W, 3) RGB, VideoMetadata), in memory bounded by the kept frames.

    * The frame count, fps and size come from the stream first (the container's frame count, else the number of
      demuxed packets: no decoding). `sample(metadata)` then gives the frame indices to keep (`None`: every frame,
      `frames_indices` left None). The file is decoded front to back, a frame that is not kept being dropped as
      soon as it is decoded; or, when the kept frames are sparse (long clips, short keyframe intervals) and the
      demuxed timestamps map every frame to its index, by seeking to the keyframe before each kept frame
      (`_SeekPlan`). A kept frame is converted to RGB and resized at once to `size(num_kept, height, width)` (PIL,
      `resample`; `None`: no resize). Peak memory is the kept frames plus the decoder's few working frames.
    * `total_num_frames` is the number of frames decoded front to back (when seeking: the number of packets, which
      the header's count confirms). When the stream's own count was wrong, the indices are sampled again from the
      true count and the file is decoded a second time, so the result is always that of decoding every frame and
      sampling afterwards. fps is the stream's average rate (guessed rate as fallback); duration = frames / fps.
    * A display-matrix rotation (phone videos) is applied to every kept frame (by multiples of 90 degrees).
    * Budget: more than `max_frames` kept frames, or a frame over `max_frame_pixels` pixels (checked in the header
      before decoding and on every decoded frame), raise ProcessingError. So do a missing, corrupt, audio-only or
      empty file, a still image, and frames that change size mid-stream; every message names the file.
    """
    import av  # local import: only needed for file decoding

    path = os.fspath(path)
    if not os.path.exists(path):
        raise ProcessingError(f"video file not found: {path!r}")
    if os.path.isdir(path):
        raise ProcessingError(f"video path is a directory, expected a file: {path!r}")
    for name, v in (("max_frames", max_frames), ("max_frame_pixels", max_frame_pixels)):
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            raise ProcessingError(f"video budget {name} must be a positive integer, got {v!r}")
    try:
        meta, packets = _probe_video(av, path, max_frame_pixels)
        if meta.total_num_frames <= 0:
            raise ProcessingError(f"{path!r}: video contains no decodable frames (no video packets)")
        for attempt in range(2):
            idx = None if sample is None else [int(i) for i in sample(meta)]
            want = meta.total_num_frames if idx is None else len(idx)
            if want > max_frames:
                raise ProcessingError(_too_many_frames(path, want, max_frames, sampled=idx is not None))
            if idx is not None and idx and min(idx) < 0:
                raise ProcessingError(f"{path!r}: negative frame index {min(idx)} to keep")
            if size is not None and meta.height and meta.width:  # early size/aspect check, from the header
                size(want, meta.height, meta.width)
            plan = packets.seek_plan(idx, meta.total_num_frames) if idx and attempt == 0 else None
            frames, n, hw = _decode(av, path, idx, want, size, resample, max_frames, max_frame_pixels, plan)
            if n == 0:
                raise ProcessingError(f"{path!r}: video contains no decodable frames")
            exact = n == meta.total_num_frames
            if exact and frames is None:
                raise ProcessingError(f"{path!r}: frame index {max(idx or [0])} to keep, but the video has {n} frames")
            meta = VideoMetadata(total_num_frames=n, fps=meta.fps, duration=n / meta.fps if meta.fps else None,
                                 frames_indices=idx, width=hw[1], height=hw[0])
            if exact or (idx is None and size is None):
                return frames, meta
    except ProcessingError as e:
        if path in str(e):
            raise
        raise ProcessingError(f"{path!r}: {e}") from e  # e.g. from `sample`: name the file
    except (av.FFmpegError, OSError, ValueError, EOFError, IndexError) as e:
        raise ProcessingError(f"{path!r}: not a readable video file: {' '.join(str(e).split())}") from e
    raise ProcessingError(f"{path!r}: the number of decodable frames changed between two decoding passes")


def _too_many_frames(path: str, n: int, limit: int, sampled: bool) -> str:
    what = "sampling keeps" if sampled else "decoding every frame (frame sampling off) keeps"
    return (f"{path!r}: {what} {n} frames, more than the video budget of max_frames={limit} "
            "(raise VideoProcessor.max_frames, or lower fps / max_duration)")


def _probe_video(av: Any, path: str, max_frame_pixels: int) -> tuple[VideoMetadata, _Packets]:
    """Stream facts without decoding: fps, size, the frame count (header, else the demuxed packets) and the
    packets' timestamps and keyframe flags (one demux pass: it reads the file but decodes nothing)."""
    with av.open(path) as container:
        fmt = container.format.name or ""
        if not container.streams.video:
            raise ProcessingError(f"{path!r}: file has no video stream (format {fmt!r})")
        if fmt == _IMAGE_DEMUXERS[0] or fmt.endswith(_IMAGE_DEMUXERS[1]):
            raise ProcessingError(f"{path!r}: this is a still image (format {fmt!r}), not a video; give it as an image")
        stream = container.streams.video[0]
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        w, h = int(stream.codec_context.width or 0), int(stream.codec_context.height or 0)
        _check_frame_pixels(path, w, h, max_frame_pixels)
        header = int(stream.frames or 0)
        packets = _Packets()
        for pkt in container.demux(stream):
            if pkt.size:
                packets.add(pkt.pts, bool(pkt.is_keyframe))
    n = header if header > 0 else len(packets)
    fps = float(rate) if rate else None
    meta = VideoMetadata(total_num_frames=n, fps=fps, duration=(n / fps) if fps else None,
                         width=w or None, height=h or None)
    return meta, packets


# What one seek costs, in decoded frames (it flushes the decoder and repositions the demuxer). Measured on a 1080p
# mpeg4 clip (benchmarks/video_memory.py): a plan of 120 seeks decoding ~570 frames took 4.5 s against 11.2 s for
# the 1786 frames of a front-to-back pass, i.e. a seek costs about one frame; 2 leaves a margin.
SEEK_COST = 2


class _Packets:
    """Presentation timestamps and keyframe flags of a stream's packets, from the demux pass: 9 bytes a packet
    (arrays, not Python objects), so a file of millions of tiny packets stays small."""

    def __init__(self) -> None:
        self.pts = array.array("q")
        self.keyframes = array.array("b")
        self.complete = True  # every packet has a timestamp

    def add(self, pts: int | None, keyframe: bool) -> None:
        if pts is None:
            self.complete, pts = False, 0
        self.pts.append(pts)
        self.keyframes.append(keyframe)

    def __len__(self) -> int:
        return len(self.pts)

    def seek_plan(self, idx: list[int], total: int) -> _SeekPlan | None:
        """A plan that seeks to keyframes when it costs under 80% of one front-to-back pass (`total` frames);
        None when the timestamps cannot map frames to indices (missing, repeated, count unlike the header's)."""
        if not idx or not self.complete or len(self) != total or max(idx) >= total:
            return None
        pts = np.frombuffer(self.pts, np.int64)
        order = np.argsort(pts, kind="stable")
        ordered = pts[order]
        if (np.diff(ordered) <= 0).any():
            return None
        keys = np.flatnonzero(np.frombuffer(self.keyframes, np.int8)[order])  # frame indices of the keyframes
        if not len(keys) or keys[0] != 0:
            return None
        plan = _SeekPlan(ordered, keys)
        return plan if plan.cost(idx) < 0.8 * total else None


@dataclass
class _SeekPlan:
    pts: np.ndarray  # frame index -> pts (presentation order, increasing)
    keys: np.ndarray  # frame indices of the keyframes, increasing, keys[0] == 0

    def index_of(self, pts: int | None) -> int | None:
        """Frame index of a decoded frame's pts (None if it is not a demuxed packet's)."""
        if pts is None:
            return None
        i = int(np.searchsorted(self.pts, pts))
        return i if i < len(self.pts) and int(self.pts[i]) == pts else None

    def keyframe_before(self, i: int) -> int:
        return int(self.keys[int(np.searchsorted(self.keys, i, side="right")) - 1])

    def seeks(self, idx: list[int]) -> list[tuple[int, bool]]:
        """(wanted frame, seek first?) in decoding order."""
        out, cur = [], -1
        for t in sorted(set(idx)):
            k = self.keyframe_before(t)
            seek = cur < 0 or k - cur > SEEK_COST
            out.append((t, seek))
            cur = t
        return out

    def cost(self, idx: list[int]) -> int:
        """Frames decoded, plus SEEK_COST per seek."""
        n, cur = 0, -1
        for t, seek in self.seeks(idx):
            n += (t - self.keyframe_before(t) + 1 + SEEK_COST) if seek else t - cur
            cur = t
        return n


class _SeekMismatch(Exception):
    """The decoder's frames after a seek do not match the demuxed timestamps: decode front to back instead."""


def _check_frame_pixels(path: str, w: int, h: int, limit: int) -> None:
    if w * h > limit:
        raise ProcessingError(
            f"{path!r}: video frames of {w}x{h} = {w * h} pixels are over the video budget of "
            f"max_frame_pixels={limit} pixels"
        )


class _Keeper:
    """Collects the kept frames: RGB, rotated upright, resized at once into their slots of one output array."""

    def __init__(self, path: str, idx: list[int] | None, num_kept: int, size: SizeFn | None, resample: int):
        self.path, self.idx, self.num_kept, self.size, self.resample = path, idx, num_kept, size, resample
        self.slots: dict[int, list[int]] = {}
        for pos, i in enumerate(idx or ()):
            self.slots.setdefault(i, []).append(pos)
        self.out: np.ndarray | None = None
        self.kept: list[np.ndarray] = []  # idx=None: frames past num_kept
        self.hw: tuple[int, int] | None = None
        self.target: tuple[int, int] | None = None

    def keep(self, frame: Any, i: int) -> None:
        arr = frame.to_ndarray(format="rgb24")
        k = round((frame.rotation or 0) / 90) % 4
        if k:
            arr = np.ascontiguousarray(np.rot90(arr, k))
        if self.hw is None:
            self.hw = arr.shape[:2]
            self.target = self.size(self.num_kept, *self.hw) if self.size is not None else self.hw
        elif arr.shape[:2] != self.hw:
            raise ProcessingError(
                f"{self.path!r}: frames change size mid-stream ({self.hw[0]}x{self.hw[1]} then "
                f"{arr.shape[0]}x{arr.shape[1]}), which is not supported"
            )
        arr = pil_resize(arr, *self.target, self.resample)
        if self.out is None:  # one array for the expected frames: no list + stack copy at the end
            self.out = np.empty((self.num_kept if self.idx is None else len(self.idx), *arr.shape), np.uint8)
        if self.idx is not None:
            self.out[self.slots[i]] = arr
        elif i < len(self.out):
            self.out[i] = arr
        else:  # more frames than the stream's header said
            self.kept.append(arr)

    def all_frames(self, n: int) -> np.ndarray:
        """The n frames kept with idx=None (the expected count was num_kept)."""
        assert self.out is not None
        if n == len(self.out):
            return self.out
        return np.concatenate([self.out[:n], *(f[None] for f in self.kept)])


def _decode(
    av: Any, path: str, idx: list[int] | None, num_kept: int, size: SizeFn | None, resample: int, max_frames: int,
    max_frame_pixels: int, plan: _SeekPlan | None = None,
) -> tuple[np.ndarray | None, int, tuple[int, int]]:
    """Decode keeping the frames in `idx` (None: all) -> (kept frames, frames in the video, (H, W)).

    Front to back (every frame decoded, the unwanted ones dropped at once), or with `plan` by seeking to the
    keyframe before each wanted frame when that skips enough frames (the count is then the plan's). The frames are
    resized to `size(num_kept, H, W)`; kept frames are None when an index is past the last frame.
    """
    if plan is not None and idx:
        try:
            keeper = _Keeper(path, idx, num_kept, size, resample)
            _decode_seeking(av, path, plan, keeper, max_frame_pixels)
            return keeper.out, len(plan.pts), keeper.hw or (0, 0)
        except (_SeekMismatch, av.FFmpegError):  # a format that cannot seek, or a decoder error: front to back
            pass
    keeper = _Keeper(path, idx, num_kept, size, resample)
    n = 0
    with av.open(path) as container:
        stream = container.streams.video[0]
        for frame in container.decode(stream):
            i = n
            n += 1
            _check_frame_pixels(path, frame.width, frame.height, max_frame_pixels)
            if idx is None:
                if n > max_frames:
                    raise ProcessingError(_too_many_frames(path, n, max_frames, sampled=False))
            elif i not in keeper.slots:
                continue
            keeper.keep(frame, i)
    if keeper.hw is None:
        return None, n, (0, 0)
    if idx is None:
        return keeper.all_frames(n), n, keeper.hw
    if n <= max(idx):  # the stream was shorter than its header said (the caller samples again), or a bad index
        return None, n, keeper.hw
    return keeper.out, n, keeper.hw


def _decode_seeking(av: Any, path: str, plan: _SeekPlan, keeper: _Keeper, max_frame_pixels: int) -> None:
    with av.open(path) as container:
        stream = container.streams.video[0]
        frames = None
        for target, seek in plan.seeks(keeper.idx or []):
            if seek or frames is None:
                pts = int(plan.pts[plan.keyframe_before(target)])
                container.seek(pts, stream=stream, backward=True, any_frame=False)
                frames = container.decode(stream)
            frame = None
            for frame in frames:
                i = plan.index_of(frame.pts)
                if i is None:
                    raise _SeekMismatch
                _check_frame_pixels(path, frame.width, frame.height, max_frame_pixels)
                if i >= target:
                    break
            if frame is None or plan.index_of(frame.pts) != target:
                raise _SeekMismatch
            keeper.keep(frame, target)


def sample_frames(metadata: VideoMetadata, fps: float = 2, max_duration: float = 300) -> np.ndarray:
    """Frame indices to keep, exactly like `Glm4vVideoProcessor.sample_frames` (dedupe, odd count -> repeat last).

    `fps` and `max_duration` must be finite and > 0 with `fps * max_duration <= VIDEO_MAX_SAMPLES`, and the
    metadata's fps finite and > 0 (duration, when given, finite and >= 0); otherwise ProcessingError."""
    check_sampling(fps, max_duration, "video sampling")
    if metadata is None or metadata.fps is None:
        raise ProcessingError(
            "sampling video frames needs VideoMetadata with fps (pass (frames, VideoMetadata) or a file path), "
            "or disable sampling with do_sample_frames=False"
        )
    if not _finite(metadata.fps) or metadata.fps <= 0:
        raise ProcessingError(f"video metadata fps must be a finite number > 0, got {metadata.fps!r}")
    if metadata.duration is not None and (not _finite(metadata.duration) or metadata.duration < 0):
        raise ProcessingError(f"video metadata duration must be a finite number >= 0, got {metadata.duration!r}")
    total = int(metadata.total_num_frames)
    if total <= 0:
        raise ProcessingError(f"video has no frames (total_num_frames={total})")
    max_idx = total - 1
    duration = metadata.duration or round(max_idx / metadata.fps) + 1
    if duration <= max_duration:
        n = max(int(math.floor(duration * fps)), 1)
        idx = [min(max_idx, int(math.ceil(i * metadata.fps / fps))) for i in range(n)]
    else:
        num_samples = int(max_duration * fps)
        if num_samples >= total:
            idx = list(range(total))
        else:
            secs = np.linspace(0, duration, num_samples, endpoint=True)
            idx = [min(max_idx, int(math.ceil(t * metadata.fps))) for t in secs]
    uniq = list(dict.fromkeys(idx))
    if len(uniq) & 1:
        uniq.append(uniq[-1])
    return np.array(uniq, dtype=np.int64)


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool) and math.isfinite(v)


def check_sampling(fps: Any, max_duration: Any, source: str) -> None:
    """ProcessingError unless fps and max_duration are finite numbers > 0 asking for at most VIDEO_MAX_SAMPLES
    frame indices (fps x max_duration)."""
    for name, v in (("fps", fps), ("max_duration", max_duration)):
        if not _finite(v) or v <= 0:
            raise ProcessingError(f"{source}: field {name!r} must be a finite number > 0, got {v!r}")
    if fps * max_duration > VIDEO_MAX_SAMPLES:
        raise ProcessingError(f"{source}: fps x max_duration = {fps:g} x {max_duration:g} asks for "
                              f"{fps * max_duration:.4g} frame samples, more than {VIDEO_MAX_SAMPLES}; lower one")


@dataclass
class VideoProcessor:
    """NumPy/PIL port of `Glm4vVideoProcessor`. Build with `from_dict` / `from_dir`; call on videos + metadata."""

    min_pixels: int = VIDEO_MIN_PIXELS
    max_pixels: int = VIDEO_MAX_PIXELS
    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    image_mean: tuple[float, ...] = OPENAI_CLIP_MEAN
    image_std: tuple[float, ...] = OPENAI_CLIP_STD
    rescale_factor: float = 1 / 255
    do_resize: bool = True
    do_rescale: bool = True
    do_normalize: bool = True
    do_convert_rgb: bool = True
    do_sample_frames: bool = True
    fps: float = 2.0
    max_duration: float = 300
    resample: int = 3
    max_frames: int = VIDEO_MAX_FRAMES
    max_frame_pixels: int = VIDEO_MAX_FRAME_PIXELS
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size

    @classmethod
    def from_dict(cls, cfg: dict[str, Any], source: str = "video preprocessor config") -> VideoProcessor:
        """HF video_preprocessor_config.json fields (plus fps, max_duration, do_sample_frames and the budget
        max_frames / max_frame_pixels)."""
        out = _fields_from_dict(cfg, source, VIDEO_MIN_PIXELS, VIDEO_MAX_PIXELS)
        extra = out["extra"]
        for k in ("fps", "max_duration"):
            v = extra.pop(k, None)
            if v is not None:
                if not _finite(v) or v <= 0:
                    raise ProcessingError(f"{source}: field {k!r} must be a finite number > 0, got {v!r}")
                out[k] = float(v) if k == "fps" else v
        check_sampling(out.get("fps", cls.fps), out.get("max_duration", cls.max_duration), source)
        for k in ("max_frames", "max_frame_pixels"):
            v = extra.pop(k, None)
            if v is not None:
                if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                    raise ProcessingError(f"{source}: field {k!r} must be a positive integer, got {v!r}")
                out[k] = v
        if extra.get("do_sample_frames") is not None:
            v = extra.pop("do_sample_frames")
            if not isinstance(v, bool):
                raise ProcessingError(f"{source}: field 'do_sample_frames' must be true or false, got {v!r}")
            out["do_sample_frames"] = v
        return cls(**out)

    @classmethod
    def from_dir(cls, checkpoint_dir: str | os.PathLike) -> VideoProcessor:
        """processor_config.json["video_processor"], video_preprocessor_config.json, preprocessor_config.json
        (same priority as transformers), else the HF class defaults."""
        cfg, src = read_processor_config(
            checkpoint_dir, ["video_preprocessor_config.json", "preprocessor_config.json"], nested_key="video_processor"
        )
        return cls.from_dict(cfg, src)

    def target_size(self, num_frames: int, height: int, width: int, source: str | None = None) -> tuple[int, int]:
        return smart_resize(
            num_frames, height, width, temporal_factor=self.temporal_patch_size, factor=self.factor,
            min_pixels=self.min_pixels, max_pixels=self.max_pixels, source=source,
        )

    def normalize(self, frames: np.ndarray) -> np.ndarray:
        """uint8 (..., C) -> float32, torchvision-fused: (x - mean/rescale) / (std/rescale) in float32."""
        x = frames.astype(np.float32)  # a new array: the operations below work in place on it
        inv = np.float32(1.0 / self.rescale_factor)
        if self.do_rescale and self.do_normalize:
            x -= np.asarray(self.image_mean, dtype=np.float32) * inv
            x /= np.asarray(self.image_std, dtype=np.float32) * inv
        elif self.do_normalize:
            x -= np.asarray(self.image_mean, np.float32)
            x /= np.asarray(self.image_std, np.float32)
        elif self.do_rescale:
            x *= np.float32(self.rescale_factor)
        return x

    def load(
        self, path: str | os.PathLike, metadata: VideoMetadata | None = None, do_sample_frames: bool | None = None
    ) -> tuple[np.ndarray, VideoMetadata]:
        """Decode a video file keeping only the sampled frames, each resized as it comes (see `load_video`).

        -> (uint8 (T, h, w, 3) frames at the processor's size, metadata with frames_indices). `metadata`, when
        given, is used for sampling instead of the file's own and must agree with its frame count.
        """
        source = os.fspath(path)
        sample = self.do_sample_frames if do_sample_frames is None else do_sample_frames

        def sample_fn(file_meta: VideoMetadata) -> np.ndarray:
            return sample_frames(metadata or file_meta, fps=self.fps, max_duration=self.max_duration)

        def size_fn(t: int, h: int, w: int) -> tuple[int, int]:
            return self.target_size(t, h, w, source)

        frames, file_meta = load_video(
            path, sample_fn if sample else None, size_fn if self.do_resize else None, resample=self.resample,
            max_frames=self.max_frames, max_frame_pixels=self.max_frame_pixels,
        )
        if metadata is None:
            metadata = file_meta
        elif metadata.total_num_frames != file_meta.total_num_frames:
            raise ProcessingError(
                f"{source}: VideoMetadata.total_num_frames={metadata.total_num_frames} but the file has "
                f"{file_meta.total_num_frames} frames"
            )
        idx = file_meta.frames_indices if sample else list(range(len(frames)))
        return frames, VideoMetadata(**{**metadata.__dict__, "frames_indices": idx})

    def _frames_and_metadata(
        self, video: Any, metadata: VideoMetadata | dict | None, source: str | None, do_sample_frames: bool | None
    ) -> tuple[np.ndarray, VideoMetadata | None, str | None, bool]:
        """-> (frames, metadata, source, prepared): `prepared` frames (from a file) are already sampled and resized."""
        if isinstance(video, tuple) and len(video) == 2 and isinstance(video[1], (VideoMetadata, dict)):
            video, metadata = video
        if isinstance(metadata, dict):
            try:
                metadata = VideoMetadata(**metadata)
            except TypeError as e:
                fields = ", ".join(VideoMetadata.__annotations__)
                raise ProcessingError(f"video metadata: {e} (fields: {fields})") from e
        if isinstance(video, (str, os.PathLike)):
            frames, metadata = self.load(video, metadata, do_sample_frames)
            return frames, metadata, os.fspath(video), True
        if isinstance(video, np.ndarray):
            frames = video
        elif isinstance(video, (list, tuple)) and video:
            frames = np.stack([to_rgb_array(f, self.do_convert_rgb, source) for f in video])
        else:
            raise ProcessingError(
                f"{source or 'video'}: expected a file path, a (T, H, W, 3) uint8 array, a list of frames or "
                f"(frames, VideoMetadata), got {type(video).__name__}"
            )
        return frames, metadata, source, False

    def preprocess_one(
        self, video: Any, metadata: VideoMetadata | dict | None = None, do_sample_frames: bool | None = None
    ) -> tuple[np.ndarray, tuple[int, int, int], VideoMetadata]:
        """One video -> (patches (gt*gh*gw, 1176) float32, (gt, gh, gw), metadata with frames_indices set)."""
        frames, metadata, source, prepared = self._frames_and_metadata(video, metadata, None, do_sample_frames)
        what = source or "video"
        if frames.dtype != np.uint8:
            raise ProcessingError(f"{what}: expected uint8 frames, got dtype {frames.dtype}")
        if frames.ndim == 3:
            frames = frames[..., None]
        if frames.ndim != 4 or frames.shape[-1] not in (1, 3, 4) or frames.shape[0] == 0:
            raise ProcessingError(f"{what}: expected frames of shape (T, H, W, 3) with T >= 1, got {frames.shape}")
        sample = self.do_sample_frames if do_sample_frames is None else do_sample_frames
        if sample and not prepared:
            if metadata is None:
                raise ProcessingError(
                    f"{what}: frame sampling needs VideoMetadata (fps, total_num_frames); pass (frames, metadata) "
                    "or a file path, or use do_sample_frames=False"
                )
            if metadata.total_num_frames != len(frames):
                raise ProcessingError(
                    f"{what}: VideoMetadata.total_num_frames={metadata.total_num_frames} but {len(frames)} frames given"
                )
            idx = sample_frames(metadata, fps=self.fps, max_duration=self.max_duration)
            frames = frames[idx]
            metadata = VideoMetadata(**{**metadata.__dict__, "frames_indices": [int(i) for i in idx]})
        elif not prepared:
            if metadata is None:
                metadata = VideoMetadata(len(frames), fps=None, frames_indices=list(range(len(frames))))
            elif metadata.frames_indices is None:
                metadata = VideoMetadata(**{**metadata.__dict__, "frames_indices": list(range(len(frames)))})
        if len(frames) > self.max_frames:
            raise ProcessingError(
                f"{what}: {len(frames)} frames kept, more than the video budget of max_frames={self.max_frames}"
            )
        if frames.shape[-1] != 3:
            frames = np.stack([to_rgb_array(f, self.do_convert_rgb, source) for f in frames])
        t, height, width = frames.shape[:3]
        if self.do_resize:
            if not prepared:  # a decoded file is resized frame by frame in `load`
                h, w = self.target_size(t, height, width, source)
                if (h, w) != (height, width):
                    frames = np.stack([pil_resize(f, h, w, self.resample) for f in frames])
        elif height % self.factor or width % self.factor:
            raise ProcessingError(
                f"{what}: with do_resize=False the frame size must be a multiple of {self.factor}, got {height}x{width}"
            )
        return (*self._patchify(frames), metadata)

    def _patchify(self, frames: np.ndarray) -> tuple[np.ndarray, tuple[int, int, int]]:
        """uint8 (T, h, w, C) -> normalised patches, one temporal group at a time (float32 peak: the output plus one
        group). Rows are temporal-group-major, so each group fills its own block of rows; T is padded to a multiple
        of temporal_patch_size by repeating the last frame (as `patchify_frames` does)."""
        tp = self.temporal_patch_size
        if len(frames) % tp:
            frames = np.concatenate([frames, np.repeat(frames[-1:], tp - len(frames) % tp, axis=0)])
        out: np.ndarray | None = None
        gt = len(frames) // tp
        for g in range(gt):
            x = self.normalize(frames[g * tp:(g + 1) * tp]).transpose(0, 3, 1, 2)  # (tp, C, h, w)
            rows, (_, gh, gw) = patchify_frames(x, self.patch_size, self.merge_size, tp)
            if out is None:
                out = np.empty((gt * len(rows), rows.shape[1]), np.float32)
            out[g * len(rows):(g + 1) * len(rows)] = rows
        assert out is not None
        return out, (gt, gh, gw)

    def __call__(
        self,
        videos: VideoInput | Sequence[VideoInput],
        video_metadata: VideoMetadata | dict | Sequence[VideoMetadata | dict | None] | None = None,
        do_sample_frames: bool | None = None,
    ) -> dict[str, Any]:
        """Videos -> {"pixel_values_videos" float32, "video_grid_thw" int64 (n, 3),
        "timestamps" (per video, seconds of each kept frame), "video_metadata" (per video, frames_indices set)}.

        A video is a file path, a uint8 (T, H, W, 3) array, a list of frames, or a (frames, VideoMetadata) tuple.
        """
        if isinstance(videos, (str, os.PathLike, np.ndarray)) or (
            isinstance(videos, tuple) and len(videos) == 2 and isinstance(videos[1], (VideoMetadata, dict))
        ):
            videos = [videos]
        videos = list(videos)
        if not videos:
            raise ProcessingError("no videos given")
        if video_metadata is None or isinstance(video_metadata, (VideoMetadata, dict)):
            metas = [video_metadata] * len(videos) if len(videos) == 1 or video_metadata is None else None
            if metas is None:
                raise ProcessingError(f"got {len(videos)} videos but a single VideoMetadata; pass one per video")
        else:
            metas = list(video_metadata)
        if len(metas) != len(videos):
            raise ProcessingError(f"got {len(videos)} videos but {len(metas)} video_metadata entries")
        rows, grids, out_meta = [], [], []
        for v, m in zip(videos, metas, strict=True):
            p, g, md = self.preprocess_one(v, m, do_sample_frames)
            rows.append(p)
            grids.append(g)
            out_meta.append(md)
        return {
            "pixel_values_videos": rows[0] if len(rows) == 1 else np.concatenate(rows, axis=0),
            "video_grid_thw": np.asarray(grids, dtype=np.int64),
            "timestamps": [m.timestamps if m.fps is not None else None for m in out_meta],
            "video_metadata": out_meta,
        }
