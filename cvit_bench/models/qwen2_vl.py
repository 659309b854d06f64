"""Qwen2-VL's processor without its video processor.

``Qwen2VLProcessor`` always builds a video processor, which imports torchvision. The
harness feeds images only, so where torchvision is not installed (this project's CPU
environment) the image half is used alone; token expansion, ``image_grid_thw`` and
``mm_token_type_ids`` are the stock processor's.
"""
from __future__ import annotations

from transformers import Qwen2VLProcessor
from transformers.processing_utils import ProcessorMixin


class ImageOnlyQwen2VLProcessor(Qwen2VLProcessor):
    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs) -> None:
        # Stock __init__ passes a video processor to ProcessorMixin; the token bookkeeping is repeated here without it.
        self.image_token = getattr(tokenizer, "image_token", None) or "<|image_pad|>"
        self.video_token = getattr(tokenizer, "video_token", None) or "<|video_pad|>"
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)
