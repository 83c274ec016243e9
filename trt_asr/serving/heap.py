"""The serving process's Python heap: frozen once the model is ready, and its collector pauses counted.

A full (generation-2) collection stops every thread of the process while it walks every tracked object. After
``torch.compile`` and CUDA-graph warm-up a worker holds millions of long-lived objects (FX graphs, guards, sympy
expressions), so each full collection stalled all of its streams for hundreds of milliseconds, every few seconds
under load: a bimodal latency (p50 tens of ms, p95 near a second) with the CPU and the GPU mostly idle.
``freeze_heap`` moves everything alive at start-up into the collector's permanent generation, so later collections
walk only what serving allocates. ``GcPauses`` measures the pauses that remain (``GET /health`` reports them).
"""

from __future__ import annotations

import gc
import os
import threading
import time


def freeze_heap() -> int:
    """Collect once, then freeze what is left (it lives as long as the process). Returns the frozen object count.
    ``TRT_ASR_GC_FREEZE=0`` leaves the heap as it is (for A/B measurements)."""
    if os.environ.get("TRT_ASR_GC_FREEZE", "1") == "0":
        return 0
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


class GcPauses:
    """Collector pauses of this process, per generation, from ``gc.callbacks``."""

    def __init__(self):
        self._lock = threading.Lock()
        self._start: float | None = None
        self.count = [0, 0, 0]
        self.total = [0.0, 0.0, 0.0]
        self.max = [0.0, 0.0, 0.0]
        self.installed = False

    def install(self) -> "GcPauses":
        if not self.installed:
            gc.callbacks.append(self._callback)
            self.installed = True
        return self

    def uninstall(self) -> None:
        if self.installed:
            gc.callbacks.remove(self._callback)
            self.installed = False

    def _callback(self, phase: str, info: dict) -> None:
        # runs inside the collection, which holds the GIL: no other Python code runs between "start" and "stop"
        if phase == "start":
            self._start = time.perf_counter()
        elif self._start is not None:
            dt, gen = time.perf_counter() - self._start, info["generation"]
            self._start = None
            with self._lock:
                self.count[gen] += 1
                self.total[gen] += dt
                self.max[gen] = max(self.max[gen], dt)

    def summary(self) -> dict:
        with self._lock:
            return {"collections": list(self.count), "pause_ms_total": [round(t * 1000, 3) for t in self.total],
                    "pause_ms_max": [round(t * 1000, 3) for t in self.max], "frozen_objects": gc.get_freeze_count()}


PAUSES = GcPauses()
