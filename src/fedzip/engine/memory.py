"""A client's peak memory during local training, measured where the platform allows it.

In-process clients share the server's process, so the CPU number is the process's peak resident set
while one client trains (Linux: the high-water mark is reset before each client through
``/proc/self/clear_refs``, then read from ``/proc/self/status``). It includes what the server holds
in the same process, so it bounds a deployed client's memory from above. On a GPU the CUDA allocator's
peak is reset and read per client: that one is the client's own.
"""

from __future__ import annotations

from pathlib import Path

import torch

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _status_kib(field: str) -> int | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


class PeakMemory:
    """``start()`` before a client trains, ``stop()`` after: {'peak_rss_bytes', 'cuda_peak_bytes'} where known."""

    def __init__(self, device: torch.device | None = None):
        self.cuda = device is not None and device.type == "cuda"
        self.device = device
        self.resettable = True

    def start(self) -> None:
        if self.resettable:
            try:
                _CLEAR_REFS.write_text("5")  # "5": reset the peak resident set size to the current one
            except OSError:
                self.resettable = False  # not Linux, or not allowed: peaks would include earlier clients
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)

    def stop(self) -> dict[str, int]:
        out = {}
        hwm = _status_kib("VmHWM") if self.resettable else None
        if hwm is not None:
            out["peak_rss_bytes"] = hwm * 1024
        if self.cuda:
            out["cuda_peak_bytes"] = int(torch.cuda.max_memory_allocated(self.device))
        return out
