"""Memory facts from /proc (Linux), for the exporter's memory check and the benchmarks' peak RSS."""

from __future__ import annotations


def proc_kib(path: str, key: str) -> int | None:
    """The `key:` line of a /proc file in bytes (its value is in kB), or None when unavailable."""
    try:
        with open(path, encoding="ascii", errors="ignore") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def available_memory() -> int | None:
    """Bytes of memory available without swapping (MemAvailable), or None when /proc does not say: callers then
    skip their memory checks rather than decide on a made-up number."""
    return proc_kib("/proc/meminfo", "MemAvailable")


def peak_rss() -> int:
    """This process's peak resident set (VmHWM; unlike ru_maxrss it does not inherit the parent's at fork)."""
    v = proc_kib("/proc/self/status", "VmHWM")
    if v is None:
        import resource

        v = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return v
