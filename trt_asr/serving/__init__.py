"""HTTP / WebSocket serving for live captions and offline transcription (``trt-asr serve``); see ``app``."""
