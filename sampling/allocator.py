"""Process-wide host-memory tuning for CPU sampling, applied by the entry points (never at import)."""

import ctypes
import ctypes.util


def tune_cpu_allocator() -> bool:
    """Keep freed host memory in the heap instead of returning it to the OS (glibc only).

    glibc serves blocks of 32 MiB and more (one 256x256 activation of a batch of two) with mmap and unmaps
    them on free, so every U-Net step page-faults its activations in again: on CPU that costs about a
    quarter of the time, more for larger batches. Process-wide: called by ``sampling.cli`` when a run
    samples on the CPU, and by ``scripts/bench_guidance.py``. Returns whether it took effect.
    """
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    m_trim_threshold, m_mmap_max = -1, -4
    return bool(mallopt(m_mmap_max, 0)) and bool(mallopt(m_trim_threshold, 2**31 - 1))
