"""Where a tensor's bytes live: lazy readers must hand out views of the mapped file, not copies."""

from __future__ import annotations


def mapped_file(ptr: int) -> str | None:
    """The file mapped at address ``ptr`` in this process, from /proc/self/maps."""
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split()
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            if lo <= ptr < hi:
                return parts[5] if len(parts) > 5 else None
    return None
