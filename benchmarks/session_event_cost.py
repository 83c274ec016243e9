"""Host cost of turning one stream's step result into its event (``StreamSession._on_step``), per stream-step.

At thousands of streams this runs for every stream on every step, on the scheduler's worker thread:

    python benchmarks/session_event_cost.py [--model trt_asr/assets/demo-tdt-cache-aware.nemo] [--streams 256]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trt_asr.checkpoint import load_model  # noqa: E402
from trt_asr.streaming.session import Recognizer, StepResult, Token  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="trt_asr/assets/demo-tdt-cache-aware.nemo")
    ap.add_argument("--streams", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=20)
    args = ap.parse_args()
    rec = Recognizer(load_model(args.model), "cache_aware")
    sessions = [rec.open() for _ in range(args.streams)]
    cases = {"no tokens": StepResult(committed=[], tentative=[], finished=False),
             "2 tokens": StepResult(committed=[Token(5, 10, 1), Token(7, 11, 1)], tentative=[], finished=False)}
    for name, result in cases.items():
        t0 = time.perf_counter()
        for _ in range(args.rounds):
            for s in sessions:
                s._on_step(result)
            for s in sessions:
                s.poll()
        us = (time.perf_counter() - t0) / (args.rounds * len(sessions)) * 1e6
        print(f"{name}: {us:.1f} us per stream-step")


if __name__ == "__main__":
    main()
