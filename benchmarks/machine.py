"""The machine a benchmark runs on: its CPU, and this process's memory as the kernel reports it."""

import ctypes
import platform

#: glibc's mallopt parameter for the size from which an allocation gets its own mapping
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 128 * 1024  # glibc's starting value


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), else what platform knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def proc_status_kb(field: str):
    """A kB field of /proc/self/status (``VmRSS``, ``VmHWM``...), or None."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return None


def fix_mmap_threshold(size: int = MMAP_THRESHOLD) -> bool:
    """Makes glibc serve every allocation of ``size`` bytes or more with its own mapping, unmapped when
    it is freed, for the rest of the process; whether that was possible (glibc only).

    By default glibc raises this threshold (up to 32 MiB) each time a mapped block is freed, after
    which tensors of that size come from the heap, where freed blocks stay resident until the blocks
    around them are freed too. Which tensors came from where then depends on what ran before, so the
    peak RSS of the same call moved by tens of MiB between fresh processes. With a fixed threshold the
    tensors' memory is mapped and unmapped as they live and die, and the RSS follows it."""
    try:
        return bool(ctypes.CDLL("libc.so.6").mallopt(_M_MMAP_THRESHOLD, size))
    except (OSError, AttributeError):
        return False
