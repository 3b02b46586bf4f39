"""GLM-4.1V image pre-processing in NumPy/PIL, matching transformers' `Glm4vImageProcessorPil` (docs/MODEL.md §5.1).

What is special here (all checked against transformers 5.23):

* `smart_resize` uses Python `round` (banker's rounding) and compares `temporal_factor * h * w` (i.e. 2·h·w for an
  image) against `min_pixels` / `max_pixels`, so an image effectively gets between min/2 and max/2 pixels.
* The resize is PIL BICUBIC on the **uint8** image (PIL's own fixed-point arithmetic, output uint8), exactly what
  `Glm4vImageProcessorPil` does via `transformers.image_transforms.resize`.
* Rescale is computed in float64 (`x.astype(float64) * (1/255)`) and cast to float32; normalisation is then
  `(x - mean) / std` in float32 (HF `image_transforms.rescale` / `normalize`).
* Patchify is 2×2-merge-block-major, each row ordered (C, T, py, px), with the single image frame duplicated along T.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from ..errors import Glm41vError

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# Hub preprocessor_config.json of GLM-4.1V-9B-Thinking (docs/MODEL.md §5.1).
HUB_MIN_PIXELS = 12544
HUB_MAX_PIXELS = 9633792
MAX_ASPECT_RATIO = 200
# Largest image (in pixels) that `load_image` accepts; larger files are treated as decompression bombs. PIL's own
# bomb warning (above PIL.Image.MAX_IMAGE_PIXELS, ~89.5M px by default) is also turned into an error, so the
# effective limit is min(MAX_IMAGE_PIXELS, PIL.Image.MAX_IMAGE_PIXELS); the PIL global is left untouched.
MAX_IMAGE_PIXELS = 16384 * 16384

ImageLike = str | os.PathLike | Image.Image | np.ndarray


class ProcessingError(Glm41vError, ValueError):
    """Invalid multimodal input: unreadable/corrupt file, bad shape or aspect ratio, placeholder/media mismatch."""


def smart_resize(
    num_frames: int,
    height: int,
    width: int,
    temporal_factor: int = 2,
    factor: int = 28,
    min_pixels: int = 112 * 112,
    max_pixels: int = 14 * 14 * 2 * 2 * 2 * 6144,
    source: str | None = None,
) -> tuple[int, int]:
    """Target (height, width), multiples of `factor`, exactly like HF `glm4v.smart_resize`.

    Sides < `factor` are first scaled up (truncating with `int`); the aspect ratio (after that) must be <= 200;
    sides are rounded with Python's banker's `round`; then `round(num_frames/temporal_factor)*temporal_factor*h*w`
    is clamped into [min_pixels, max_pixels] by rescaling. `source` (a file name) only goes into error messages.
    """
    what = source or "input"
    if height <= 0 or width <= 0:
        raise ProcessingError(f"{what}: image/frame size must be positive, got height={height}, width={width}")
    if num_frames < temporal_factor:
        raise ProcessingError(
            f"{what}: number of frames must be at least temporal_factor={temporal_factor}, got {num_frames}"
        )
    orig_h, orig_w = height, width
    if height < factor or width < factor:
        scale = max(factor / height, factor / width)
        height = int(height * scale)
        width = int(width * scale)
    ratio = max(height, width) / min(height, width)
    if ratio > MAX_ASPECT_RATIO:
        raise ProcessingError(
            f"{what}: absolute aspect ratio must be smaller than {MAX_ASPECT_RATIO}, got {ratio} "
            f"(height={orig_h}, width={orig_w})"
        )
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    t_bar = round(num_frames / temporal_factor) * temporal_factor
    if t_bar * h_bar * w_bar > max_pixels:
        beta = math.sqrt((num_frames * height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif t_bar * h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (num_frames * height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def load_image(path: str | os.PathLike) -> Image.Image:
    """Open an image file as an RGB PIL image (EXIF orientation applied, like transformers' `load_image`).

    Raises `ProcessingError` naming the file for a missing file, a non-image/corrupt/truncated file, and for images
    larger than `MAX_IMAGE_PIXELS` or PIL's `Image.MAX_IMAGE_PIXELS` (decompression bombs: PIL's bomb warning is
    turned into an error; the message gives the pixel count).
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise ProcessingError(f"image file not found: {path!r}")
    if os.path.isdir(path):
        raise ProcessingError(f"image path is a directory, expected a file: {path!r}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as probe:
                w, h = probe.size
                _check_pixel_count(path, w, h)
                probe.verify()
            img = Image.open(path)
            img.load()
    except ProcessingError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ProcessingError(f"{path!r}: image rejected as a possible decompression bomb: {e}") from e
    except Image.UnidentifiedImageError as e:
        raise ProcessingError(f"{path!r}: not a readable image file (PIL cannot identify it)") from e
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise ProcessingError(f"{path!r}: corrupt or truncated image file: {e}") from e
    img = ImageOps.exif_transpose(img)
    return to_8bit(img).convert("RGB")


def to_8bit(image: Image.Image) -> Image.Image:
    """A high-bit-depth grey PIL image -> 8-bit "L" (or "LA" when it has a transparent grey value); others as given.

    * 16-bit ("I;16", "I;16B", "I;16L", "I;16N") and 32-bit integer ("I", read as 16-bit data: clipped to
      0..65535) keep their top 8 bits (`value >> 8`). That is what Pillow itself does when it reads a 16-bit RGB,
      RGBA or grey+alpha PNG, so a 16-bit grey PNG gives the same 8-bit values as the same picture saved as 16-bit
      RGB. (PIL's and transformers' `convert("RGB")` would clip every value above 255 to white.)
    * Float ("F") follows PIL's own convention, 0..255, values outside clipped (as transformers does); there is no
      standard range to scale from.
    """
    mode = image.mode
    if mode.startswith("I;16") or mode == "I":
        raw = np.asarray(image)
        grey = (np.clip(raw, 0, 65535).astype(np.uint16) >> 8).astype(np.uint8)
    elif mode == "F":
        return image.convert("L")
    else:
        return image
    out = Image.fromarray(grey, "L")
    t = image.info.get("transparency")
    if isinstance(t, int) and not isinstance(t, bool):
        out = Image.merge("LA", (out, Image.fromarray(np.where(raw == t, 0, 255).astype(np.uint8), "L")))
    return out


def _check_pixel_count(path: str, width: int, height: int) -> None:
    if width * height > MAX_IMAGE_PIXELS:
        raise ProcessingError(
            f"{path!r}: image has {width * height} pixels ({width}x{height}), more than the limit of "
            f"{MAX_IMAGE_PIXELS} pixels (possible decompression bomb)"
        )


def to_rgb_array(image: ImageLike, do_convert_rgb: bool = True, source: str | None = None) -> np.ndarray:
    """Image (path, PIL or HWC/HW uint8 array) -> uint8 (H, W, 3), with HF `convert_to_rgb` semantics.

    Transparency is composited onto white (PIL images and 4-channel arrays), grayscale is repeated to 3 channels.
    16-bit images and uint16 arrays keep their top 8 bits (`to_8bit`).
    """
    if isinstance(image, (str, os.PathLike)):
        source = os.fspath(image)
        image = load_image(image)
    what = source or "image"
    if isinstance(image, Image.Image):
        image = to_8bit(image)
        if do_convert_rgb:
            has_alpha = "A" in image.getbands() or image.info.get("transparency") is not None
            if has_alpha:
                rgba = image.convert("RGBA")
                bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                image = Image.alpha_composite(bg, rgba).convert("RGB")
            else:
                image = image.convert("RGB")
        arr = np.asarray(image)
    elif isinstance(image, np.ndarray):
        arr = image
    else:
        raise ProcessingError(
            f"{what}: expected a file path, PIL image or uint8 numpy array, got {type(image).__name__}"
        )
    if arr.dtype == np.uint16:  # 16-bit data: the top 8 bits, like `to_8bit`
        arr = (arr >> 8).astype(np.uint8)
    if arr.dtype != np.uint8:
        raise ProcessingError(f"{what}: expected a uint8 (or uint16) image array, got dtype {arr.dtype}")
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3 or arr.shape[-1] not in (1, 3, 4):
        raise ProcessingError(f"{what}: expected an (H, W, C) image with C in (1, 3, 4), got shape {arr.shape}")
    if arr.shape[-1] == 1:
        arr = np.repeat(arr, 3, axis=-1)
    elif arr.shape[-1] == 4:
        alpha = arr[..., 3:4] / 255
        arr = np.round(alpha * arr[..., :3] + (1 - alpha) * 255).astype(np.uint8)
    return np.ascontiguousarray(arr)


def pil_resize(arr: np.ndarray, height: int, width: int, resample: int = Image.BICUBIC) -> np.ndarray:
    """uint8 (H, W, 3) -> uint8 (height, width, 3) with PIL (what `Glm4vImageProcessorPil` does)."""
    if arr.shape[:2] == (height, width):
        return arr
    return np.asarray(Image.fromarray(arr).resize((width, height), resample=resample))


@dataclass
class ImageProcessor:
    """NumPy/PIL port of `Glm4vImageProcessorPil`. Build with `from_dict` / `from_dir`; call on a list of images."""

    min_pixels: int = HUB_MIN_PIXELS
    max_pixels: int = HUB_MAX_PIXELS
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
    resample: int = 3  # PIL BICUBIC
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    CONFIG_NAME = "preprocessor_config.json"

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size

    @classmethod
    def from_dict(cls, cfg: dict[str, Any], source: str = "preprocessor config") -> ImageProcessor:
        """Read HF preprocessor_config.json fields: size.{shortest,longest}_edge (or min/max_pixels), patch sizes…"""
        return cls(**_fields_from_dict(cfg, source, HUB_MIN_PIXELS, HUB_MAX_PIXELS))

    @classmethod
    def from_dir(cls, checkpoint_dir: str | os.PathLike) -> ImageProcessor:
        """preprocessor_config.json (or processor_config.json's "image_processor"), else hub defaults."""
        cfg, src = read_processor_config(checkpoint_dir, [cls.CONFIG_NAME], nested_key="image_processor")
        return cls.from_dict(cfg, src)

    def target_size(self, height: int, width: int, source: str | None = None) -> tuple[int, int]:
        """Resized (height, width) of an image of the given original size."""
        return smart_resize(
            self.temporal_patch_size, height, width, temporal_factor=self.temporal_patch_size, factor=self.factor,
            min_pixels=self.min_pixels, max_pixels=self.max_pixels, source=source,
        )

    def grid_thw(self, height: int, width: int) -> tuple[int, int, int]:
        h, w = self.target_size(height, width) if self.do_resize else (height, width)
        return 1, h // self.patch_size, w // self.patch_size

    def num_image_tokens(self, height: int, width: int) -> int:
        """Number of LLM (merged) tokens for an image of original size (height, width)."""
        t, gh, gw = self.grid_thw(height, width)
        return t * gh * gw // (self.merge_size**2)

    def normalize(self, arr: np.ndarray) -> np.ndarray:
        """uint8 (..., H, W, C) -> float32 with HF PIL-backend rescale (float64 multiply) then (x-mean)/std in f32."""
        x = arr
        if self.do_rescale:
            x = (x.astype(np.float64) * self.rescale_factor).astype(np.float32)
        if self.do_normalize:
            x = x.astype(np.float32, copy=False)
            mean = np.asarray(self.image_mean, dtype=np.float32)
            std = np.asarray(self.image_std, dtype=np.float32)
            x = (x - mean) / std
        return x.astype(np.float32, copy=False)

    def preprocess_one(self, image: ImageLike, source: str | None = None) -> tuple[np.ndarray, tuple[int, int, int]]:
        """One image -> (patches float32 (gh*gw, C*T*p*p), (1, gh, gw))."""
        if isinstance(image, (str, os.PathLike)):
            source = os.fspath(image)
        arr = to_rgb_array(image, self.do_convert_rgb, source)
        height, width = arr.shape[:2]
        if self.do_resize:
            h, w = self.target_size(height, width, source)
            arr = pil_resize(arr, h, w, self.resample)
        elif height % self.factor or width % self.factor:
            raise ProcessingError(
                f"{source or 'image'}: with do_resize=False the size must be a multiple of {self.factor}, "
                f"got {height}x{width}"
            )
        x = self.normalize(arr)  # (h, w, C)
        patches = patchify_frames(x[None].transpose(0, 3, 1, 2), self.patch_size, self.merge_size,
                                  self.temporal_patch_size)
        _, gh, gw = patches[1]
        return patches[0], (1, gh, gw)

    def __call__(self, images: ImageLike | Sequence[ImageLike]) -> dict[str, np.ndarray]:
        """Images -> {"pixel_values": float32 (sum gh*gw, 1176), "image_grid_thw": int64 (n, 3)}."""
        if not isinstance(images, (list, tuple)):
            images = [images]
        if not images:
            raise ProcessingError("no images given")
        rows, grids = [], []
        for img in images:
            p, g = self.preprocess_one(img)
            rows.append(p)
            grids.append(g)
        return {
            "pixel_values": np.concatenate(rows, axis=0),
            "image_grid_thw": np.asarray(grids, dtype=np.int64),
        }


def patchify_frames(
    frames: np.ndarray, patch_size: int, merge_size: int, temporal_patch_size: int
) -> tuple[np.ndarray, tuple[int, int, int]]:
    """(T, C, H, W) float32 -> ((gt*gh*gw, C*tp*p*p), (gt, gh, gw)), block-major as in HF glm4v.

    A single frame (T=1) is duplicated along the temporal axis (image case); otherwise T is padded to a multiple
    of `temporal_patch_size` by repeating the last frame (video case).
    """
    t, c, h, w = frames.shape
    if t == 1:
        frames = np.broadcast_to(frames, (temporal_patch_size, c, h, w))
        t = temporal_patch_size
    elif t % temporal_patch_size:
        pad = temporal_patch_size - t % temporal_patch_size
        frames = np.concatenate([frames, np.repeat(frames[-1:], pad, axis=0)], axis=0)
        t += pad
    gt, gh, gw = t // temporal_patch_size, h // patch_size, w // patch_size
    x = frames.reshape(gt, temporal_patch_size, c, gh // merge_size, merge_size, patch_size,
                       gw // merge_size, merge_size, patch_size)
    # -> (gt, gh/m, gw/m, m, m, C, tp, p, p)
    x = x.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return np.ascontiguousarray(x.reshape(gt * gh * gw, c * temporal_patch_size * patch_size * patch_size),
                                dtype=np.float32), (gt, gh, gw)


def read_json_object(path: str) -> dict[str, Any] | None:
    """A JSON object from `path`; None if the file does not exist; ProcessingError if it is not a JSON object."""
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError, RecursionError) as e:  # ValueError: bad JSON, not UTF-8, too many digits
        raise ProcessingError(f"{path!r}: cannot parse JSON: {type(e).__name__}: {e}") from None
    if not isinstance(data, dict):
        raise ProcessingError(f"{path!r}: expected a JSON object, got {type(data).__name__}")
    return data


def read_processor_config(
    checkpoint_dir: str | os.PathLike, names: Sequence[str], nested_key: str
) -> tuple[dict[str, Any], str]:
    """First existing JSON among processor_config.json[nested_key] and `names` in the directory; ({}, "defaults")."""
    d = os.fspath(checkpoint_dir)
    if not os.path.isdir(d):
        raise ProcessingError(f"checkpoint directory not found: {d!r}")
    candidates: list[tuple[str, str | None]] = [("processor_config.json", nested_key)]
    candidates += [(n, None) for n in names]
    for name, key in candidates:
        path = os.path.join(d, name)
        data = read_json_object(path)
        if data is None:
            continue
        if key is None:
            return data, path
        if isinstance(data.get(key), dict):
            return data[key], f"{path}[{key!r}]"
    return {}, "defaults"


def _fields_from_dict(cfg: dict[str, Any], source: str, default_min: int, default_max: int) -> dict[str, Any]:
    """Common image/video processor fields from an HF config dict (unknown keys go to `extra`)."""
    size = {} if cfg.get("size") is None else cfg["size"]
    if not isinstance(size, dict):
        raise ProcessingError(f"{source}: field 'size' must be an object, got {size!r}")
    min_px = size.get("shortest_edge", size.get("min_pixels", cfg.get("min_pixels", default_min)))
    max_px = size.get("longest_edge", size.get("max_pixels", cfg.get("max_pixels", default_max)))
    out: dict[str, Any] = {"min_pixels": min_px, "max_pixels": max_px}
    ints = ("patch_size", "temporal_patch_size", "merge_size", "resample")
    bools = ("do_resize", "do_rescale", "do_normalize", "do_convert_rgb")
    for k in ints + bools + ("rescale_factor", "image_mean", "image_std"):
        if cfg.get(k) is not None:
            out[k] = cfg[k]
    def number(v: Any) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

    for k in ("min_pixels", "max_pixels", *ints):
        if k in out and (not number(out[k]) or not 0 < out[k] <= 2**31 - 1 or int(out[k]) != out[k]):
            raise ProcessingError(f"{source}: field {k!r} must be a positive integer, got {str(out[k])[:40]!r}")
        if k in out:
            out[k] = int(out[k])
    for k in bools:
        if k in out and not isinstance(out[k], bool):
            raise ProcessingError(f"{source}: field {k!r} must be true or false, got {str(out[k])[:40]!r}")
    for k in ("image_mean", "image_std"):
        if k in out:
            v = out[k]
            if number(v):
                v = [v] * 3
            if not isinstance(v, (list, tuple)) or len(v) != 3 or not all(number(x) for x in v) or (
                    k == "image_std" and not all(x > 0 for x in v)):
                what = "3 finite numbers" + (" > 0" if k == "image_std" else "")
                raise ProcessingError(f"{source}: field {k!r} must be {what}, got {str(out[k])[:60]}")
            out[k] = tuple(float(x) for x in v)
    if "rescale_factor" in out:
        if not number(out["rescale_factor"]) or out["rescale_factor"] <= 0:
            raise ProcessingError(f"{source}: field 'rescale_factor' must be a finite number > 0, got "
                                  f"{str(out['rescale_factor'])[:40]!r}")
        out["rescale_factor"] = float(out["rescale_factor"])
    if out["min_pixels"] > out["max_pixels"]:
        raise ProcessingError(
            f"{source}: size.shortest_edge (min_pixels={out['min_pixels']}) is larger than "
            f"size.longest_edge (max_pixels={out['max_pixels']})"
        )
    known = set(out) | {"size"}
    out["extra"] = {k: v for k, v in cfg.items() if k not in known}
    return out
