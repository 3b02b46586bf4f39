"""GLM-4.1V multimodal pre-processing (NumPy/PIL/PyAV only, no torch): images, videos, chat template, tokens.

Matches transformers' `Glm4vImageProcessorPil`, `Glm4vVideoProcessor` and `Glm4vProcessor` (docs/MODEL.md §5-6).
"""

from .image import (
    MAX_IMAGE_PIXELS,
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    ImageProcessor,
    ProcessingError,
    load_image,
    smart_resize,
)
from .processor import Processor
from .video import VideoMetadata, VideoProcessor, sample_frames
from .video_decode import load_video

__all__ = [
    "MAX_IMAGE_PIXELS",
    "OPENAI_CLIP_MEAN",
    "OPENAI_CLIP_STD",
    "ImageProcessor",
    "ProcessingError",
    "Processor",
    "VideoMetadata",
    "VideoProcessor",
    "load_image",
    "load_video",
    "sample_frames",
    "smart_resize",
]
