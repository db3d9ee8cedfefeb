"""Shared fixtures: an ideal profile (peaks reached, no fixed costs) isolates the roofline arithmetic."""

from __future__ import annotations

import os

import pytest

try:  # CPU only: Triton's kernels run in its interpreter (read when Triton is imported)
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
except ImportError:
    pass

from hardware.profile import OP_KINDS, KindEfficiency, Overheads, Profile  # noqa: E402


@pytest.fixture
def ideal_profile() -> Profile:
    return Profile(
        gpu="ideal",
        efficiency={k: KindEfficiency(compute=1.0, memory=1.0) for k in OP_KINDS},
        overheads=Overheads(launch_eager=0.0, launch_graph=0.0, step_eager=0.0, step_graph=0.0),
    )
