"""Starting a sampling process (stage 2 of a run, once per process, by the entry points): the process group made
for the runs' device, the CPU allocator, and each run's device."""

import ctypes
import ctypes.util

import torch as th

from guided_diffusion import dist_util

from .settings import SampleConfigError


def tune_cpu_allocator() -> bool:
    """Keep freed host memory in the heap (glibc only; process-wide, so for entry points only); whether it took effect.
    glibc mmaps blocks of 32 MiB and more (one 256x256 activation of a batch of two) and unmaps them on free, so every
    U-Net step page-faults its activations in again: about a quarter of the time on CPU."""
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    m_trim_threshold, m_mmap_max = -1, -4
    return bool(mallopt(m_mmap_max, 0)) and bool(mallopt(m_trim_threshold, 2**31 - 1))


def resolve_device(settings):
    """``--device`` (a bare ``cuda``: the local rank's GPU), else the local rank's GPU, else the CPU."""
    name = settings.runtime.device
    if not name:
        return dist_util.dev()
    device = th.device(name)
    if device.type == "cuda":
        if not th.cuda.is_available():
            raise SampleConfigError(f"device {name!r} requested but CUDA is not available")
        if device.index is None:
            local = dist_util.dev()
            return local if local.type == "cuda" else th.device("cuda", 0)
    return device


def group_device(settings_list):
    """The device the process group is made for (``dist_util.setup_dist(device=...)``): the runs' device when
    they all name one, "cpu" when each names a CPU, else None (the local rank's GPU when CUDA is available)."""
    names = {s.runtime.device or "" for s in settings_list}
    if len(names) == 1:
        return names.pop() or None
    if "" not in names and all(th.device(name).type == "cpu" for name in names):
        return "cpu"
    return None


def start_process(settings_list):
    """The process group for these runs (their settings resolved first: that needs no group), and the CPU allocator."""
    try:
        dist_util.setup_dist(device=group_device(settings_list))
    except ValueError as e:  # a bad launcher or PAG_DIST_* variable: the same on every rank
        raise dist_util.DistSetupError(str(e), everywhere=True) from None
    if any(resolve_device(s).type == "cpu" for s in settings_list):
        tune_cpu_allocator()  # large activations would page-fault in at every step
