"""``cdcsync demo``: two throwaway clusters, a live workload, the sync and its lag."""

from __future__ import annotations


def run_demo(*, seconds: float, rate: int) -> int:
    raise NotImplementedError
