"""Decoding a video file (PyAV) into the frames that frame sampling keeps, in memory bounded by those frames.

`load_video` reads the frame count, fps and size from the stream first, asks `sample(metadata)` which frame indices
to keep, then decodes front to back dropping every other frame at once, or seeks to the keyframe before each kept
frame when they are sparse and the demuxed timestamps map every frame to its index. The result equals decoding
every frame and sampling afterwards (HF's indices and timestamps). Deviation from HF: a display-matrix rotation is
applied (HF's PyAV reader ignores it). Budget: `VIDEO_MAX_FRAMES`, `VIDEO_MAX_FRAME_PIXELS` (per call).
"""

from __future__ import annotations

import array
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import av
import numpy as np

from .image import ProcessingError, pil_resize


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


# What one seek costs, in decoded frames (it flushes the decoder and repositions the demuxer): about one frame
# (BENCHMARKS.md, "Measurements behind design choices"); 2 leaves a margin.
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
