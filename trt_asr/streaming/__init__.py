"""Streaming recognition: one session API (``session``) over two modes -- buffered windows for full-attention models
(``buffered``) and cache-aware steps for models trained for streaming (``cache_aware``) -- plus the incremental mel
front end (``frontend``). See docs/streaming.md for what equals what."""

from .session import (MODES, Recognizer, StepResult, StreamEvent, StreamingMode, StreamSession,
                      TimedToken, Token, Word, make_mode, stream_tokens, transcribe_streaming)

__all__ = ["MODES", "Recognizer", "StepResult", "StreamEvent", "StreamingMode", "StreamSession",
           "TimedToken", "Token", "Word", "make_mode", "stream_tokens", "transcribe_streaming"]
