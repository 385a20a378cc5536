"""The server processes the benchmark programs measure: `ernie-onnx serve` and llama.cpp's server
(llama-cpp-python[server]), each started on a free local port and stopped when the measurement is done."""

from __future__ import annotations

import socket
import subprocess
import sys
import time

from ernie_paddle.sysinfo import proc_kib


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(cmd: list[str], port: int, timeout: float = 600.0, stderr_file: str | None = None) -> subprocess.Popen:
    """Start a server process and wait until /v1/models answers on `port`. Its stderr goes to a pipe, or to
    `stderr_file` (a long run's log cannot fill a pipe nobody reads); a process that exits first is an error quoting
    the end of its stderr."""
    import httpx

    sink = open(stderr_file, "w") if stderr_file else subprocess.PIPE
    try:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=sink, text=True)
    finally:
        if stderr_file:
            sink.close()  # the child holds its own descriptor
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"{' '.join(cmd[:4])} exited: {_stderr_tail(proc, stderr_file)}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.5)
    proc.kill()
    proc.wait()
    raise RuntimeError(f"{cmd[0]} did not start within {timeout:.0f} s")


def _stderr_tail(proc: subprocess.Popen, stderr_file: str | None) -> str:
    if stderr_file:
        with open(stderr_file, errors="replace") as f:
            return f.read()[-500:]
    return proc.stderr.read()[-500:]


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL if the process is still there after 30 s."""
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def rss_kib(pid: int) -> int:
    """The process's resident memory now, in KiB (Linux)."""
    return proc_kib(f"/proc/{pid}/status", "VmRSS") // 1024


def peak_rss_kib(pid: int) -> int:
    """The process's peak resident memory so far, in KiB (Linux)."""
    return proc_kib(f"/proc/{pid}/status", "VmHWM") // 1024


def ours_cmd(folder: str, port: int, threads: int, max_batch: int, max_len: int) -> list[str]:
    """`ernie-onnx serve` on an exported folder (append more flags to the list)."""
    return [sys.executable, "-m", "ernie_paddle.cli.onnx_cli", "serve", "--model", folder, "--port", str(port),
            "--threads", str(threads), "--max-batch", str(max_batch), "--max-queue", "1024",
            "--max-model-len", str(max_len)]


def llama_cmd(gguf: str, port: int, threads: int, max_len: int) -> list[str]:
    """llama-cpp-python's server on a GGUF file: one slot, prompts evaluated 512 tokens at a time."""
    return [sys.executable, "-m", "llama_cpp.server", "--model", gguf, "--host", "127.0.0.1", "--port", str(port),
            "--n_threads", str(threads), "--n_threads_batch", str(threads), "--n_ctx", str(max_len),
            "--n_batch", "512", "--interrupt_requests", "False"]  # queue concurrent requests (its default cuts one off)
