"""What ``trt-asr live`` and ``trt-asr serve`` share: loading the caption service, with clear errors."""

from __future__ import annotations

import sys


def load_caption_service(args):
    """The CaptionService for the parsed args, or None after printing why it could not be loaded."""
    from ..captions.service import CaptionService
    from ..checkpoint import ModelLoadError

    try:
        svc = CaptionService.from_args(args)
    except (ModelLoadError, FileNotFoundError, ValueError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return None
    if svc.model_name.startswith("random:"):
        print(f"note: model {svc.model_name} has RANDOM weights; its captions are meaningless", file=sys.stderr)
    return svc
