"""Process settings that must be in place before `import paddle` (imported first by every Paddle module).

* Threads: Paddle forces `OMP_NUM_THREADS=1` at import when it is unset, and MKL then runs one thread, which
  leaves the other cores idle in every matmul (docs/performance.md, "CPU settings"). So all cores are used by
  default; `ERNIE_PADDLE_THREADS=N` (or an exported `OMP_NUM_THREADS`) chooses. Paddle's import-time warning
  about it is silenced.
* `MKL_DEBUG_CPU_TYPE=5` on AMD CPUs only: Paddle's bundled MKL otherwise takes a slow generic path there; on Intel
  the setting makes the MoE layer slower, so it is not set.
A value the user already exported always wins.
* SIGTERM: Paddle installs a C++ handler at import that prints a "Termination signal" stack dump; the handler in
  place before the import (the CLI's, which turns SIGTERM into an exception so cleanup runs) is put back.
"""

from __future__ import annotations

import contextlib
import io
import os
import signal
import sys
import threading
import warnings

from ernie_paddle import interrupts


def _is_amd() -> bool:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="ignore") as f:
            return "AuthenticAMD" in f.read(4096)
    except OSError:
        return False


if "paddle" not in sys.modules:
    if _is_amd():
        os.environ.setdefault("MKL_DEBUG_CPU_TYPE", "5")
    threads = os.environ.get("ERNIE_PADDLE_THREADS") or str(os.cpu_count() or 1)
    os.environ.setdefault("OMP_NUM_THREADS", threads)
    os.environ.setdefault("MKL_NUM_THREADS", os.environ["OMP_NUM_THREADS"])
    # Paddle warns at import that ccache (for compiling custom C++ ops, which we never do) is missing.
    warnings.filterwarnings("ignore", message="No ccache found")
    captured = io.StringIO()
    sigterm = signal.getsignal(signal.SIGTERM)
    with interrupts.deferred():  # Ctrl-C or SIGTERM in Paddle's import: raised once it is done
        with contextlib.redirect_stderr(captured):
            import paddle  # noqa: F401
        if sigterm is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, sigterm)
    for line in captured.getvalue().splitlines():  # pass on anything but the OMP_NUM_THREADS advice
        if "OMP_NUM_THREADS" not in line:
            print(line, file=sys.stderr)


def set_device(device: str) -> None:
    """`paddle.set_device(--device)`, with one-line errors that name the flag (a CPU build asked for a GPU, too)."""
    import paddle

    from ernie_paddle.errors import ErnieError

    if device.split(":")[0] == "gpu" and not paddle.device.is_compiled_with_cuda():
        raise ErnieError(f"--device {device}: this Paddle build has no CUDA support; use --device cpu, or install "
                         f"Paddle's GPU build")
    try:
        paddle.set_device(device)
    except (ValueError, RuntimeError) as e:
        raise ErnieError(f"--device {device}: {str(e).strip().splitlines()[0]}") from None
