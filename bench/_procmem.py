"""Peak memory of a process tree, sampled from /proc (not max RSS, which counts mapped file pages)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path


def descendants(pid: int) -> list[int]:
    """``pid`` and every process below it."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for tid in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{tid}/children") as f:
                    todo += [int(c) for c in f.read().split()]
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            pass
    return out


def memory(pid: int) -> tuple[int, int]:
    """(VmRSS, RssAnon) in bytes, summed over the process tree of ``pid``."""
    rss = anon = 0
    for p in descendants(pid):
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        rss += int(line.split()[1]) * 1024
                    elif line.startswith("RssAnon:"):
                        anon += int(line.split()[1]) * 1024
        except (FileNotFoundError, ProcessLookupError):
            continue
    return rss, anon


class PeakSampler(threading.Thread):
    """Samples :func:`memory` of a process tree every ``interval`` seconds; keeps the peaks (bytes)."""

    def __init__(self, pid: int, interval: float = 0.02):
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.peak_rss = self.peak_anon = 0
        self.samples = 0
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.is_set():
            rss, anon = memory(self.pid)
            self.peak_rss, self.peak_anon = max(self.peak_rss, rss), max(self.peak_anon, anon)
            self.samples += 1
            self._done.wait(self.interval)

    def stop(self) -> None:
        self._done.set()
        self.join()


def run_sampled(cmd: list[str], *, cwd: Path, env: dict[str, str] | None = None,
                ok_codes: tuple[int, ...] = (0,)) -> dict:
    """Run ``cmd`` in a fresh process: wall seconds, peak RSS and RssAnon of its tree (MB), stdout, exit status.
    Exits the benchmark, with the command's stderr, when the status is not in ``ok_codes``."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=cwd)
    sampler = PeakSampler(proc.pid)
    sampler.start()
    out, err = proc.communicate()
    wall = time.perf_counter() - t0
    sampler.stop()
    if proc.returncode not in ok_codes:
        sys.stderr.write(err.decode(errors="replace")[-3000:])
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}")
    return {"wall_s": wall, "peak_rss_mb": sampler.peak_rss / 1e6, "peak_anon_mb": sampler.peak_anon / 1e6,
            "stdout": out.decode(errors="replace"), "rc": proc.returncode}
