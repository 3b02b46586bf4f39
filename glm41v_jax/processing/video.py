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
* Files are decoded in memory bounded by the kept frames (`video_decode.load_video`). Budget:
  `VideoProcessor.max_frames`, `max_frame_pixels`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
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
from .video_decode import VIDEO_MAX_FRAME_PIXELS, VIDEO_MAX_FRAMES, VideoInput, VideoMetadata, load_video

# transformers' Glm4vVideoProcessor class defaults (used when no config file gives a size).
VIDEO_MIN_PIXELS = 112 * 112
VIDEO_MAX_PIXELS = 28 * 28 * 2 * 30000
# The most frame indices `fps` x `max_duration` may ask the sampler for, before duplicates are dropped and before the
# `max_frames` budget is checked (HF's defaults ask for 600): past it, building the index list itself would hang.
VIDEO_MAX_SAMPLES = 1 << 20


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
