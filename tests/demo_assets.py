"""The shipped demo models, for the tests that need real speech recognition."""

from __future__ import annotations

from importlib import resources

import pytest

ASSETS = resources.files("trt_asr.assets")


def demo_nemo(name: str = "demo-tdt-buffered") -> str:
    """Path of a shipped demo .nemo; skips the test when this checkout does not ship it."""
    path = ASSETS.joinpath(f"{name}.nemo")
    if not path.is_file():
        pytest.skip(f"{name}.nemo is not shipped in this checkout")
    return str(path)
