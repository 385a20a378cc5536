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


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), for the record every benchmark figure carries; else the machine type."""
    import platform

    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="ignore") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_int8")  # what the CPU kernels pick from


def cpu_isa() -> list[str]:
    """Which of ISA_FLAGS the CPU advertises (/proc/cpuinfo): machines of one model name can differ in these."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="ignore") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        flags = []
    return [x for x in ISA_FLAGS if x in flags]


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
