"""Module-level stand-ins for ``serve_workers``' builds (spawned processes import them by name): they record when
each process started building and when it was built, so a test can check the supervisor's start order."""

from __future__ import annotations

import os
import time
from types import SimpleNamespace


def _record(log: str, event: str) -> None:
    with open(log, "a") as f:
        f.write(f"{os.getpid()} {event} {time.monotonic():.6f}\n")


class StubEngineHost:
    def __init__(self):
        self.scheduler = SimpleNamespace(stats=SimpleNamespace(summary=lambda: {}))

    def start(self, listener):
        self.listener = listener
        return self

    def stop(self, drain_timeout):
        self.listener.close()


def build_engine(log: str, warmup_s: float) -> StubEngineHost:
    _record(log, "engine-start")
    time.sleep(warmup_s)  # a model load and warm-up
    _record(log, "engine-ready")
    return StubEngineHost()


def build_app(log: str, warmup_s: float, admission=None, health=None, remote=None):
    from starlette.applications import Starlette

    _record(log, "worker-start")
    time.sleep(warmup_s)
    _record(log, "worker-ready")
    return Starlette()
