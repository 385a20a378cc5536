"""Ctrl-C and SIGTERM in the middle of real work: one line, exit status 130 / 143, nothing half-written left.

Each test starts the CLI as users do (a subprocess), waits until the work has visibly started, then signals it.
A closed stdout (`... | head`) ends quietly too; bad input, in the CLIs and in every program of tools/, with one
`error:` line.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from ernie_paddle.cli.args import progress_printer
from ernie_paddle.errors import CheckpointError, InputError
from ernie_paddle.interrupts import deferred, run_command

STATUS = {signal.SIGINT: 130, signal.SIGTERM: 143}
MESSAGE = {signal.SIGINT: "interrupted (SIGINT)", signal.SIGTERM: "terminated (SIGTERM)"}


def start(module: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", module, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, bufsize=1)


def wait_for(condition, p: subprocess.Popen, what: str, timeout: float = 120) -> None:
    """Poll `condition` while the command runs; `timeout` only bounds a hang (the monotonic clock: no clock step)."""
    t0 = time.monotonic()
    while not condition():
        if p.poll() is not None:
            pytest.fail(f"the command ended (status {p.returncode}) before {what}: {p.stderr.read()}")
        if time.monotonic() - t0 > timeout:
            p.kill()
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.01)


def wait_for_line(p: subprocess.Popen, text: str) -> list[str]:
    seen = []
    for line in p.stderr:
        seen.append(line)
        if text in line:
            return seen
    pytest.fail(f"no line with {text!r} on stderr (status {p.wait()}): {''.join(seen)}")


def assert_ended_cleanly(p: subprocess.Popen, sig: int, prog: str = "ernie-paddle") -> str:
    _, err = p.communicate(timeout=120)
    assert p.returncode == STATUS[sig], err
    assert "Traceback" not in err and "Termination signal" not in err and "Error Message Summary" not in err, err
    assert err.strip().splitlines()[-1] == f"{prog}: {MESSAGE[sig]}", err
    return err


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_generate_interrupted_after_paddle_started(tiny_ckpt, sig):
    p = start("ernie_paddle.cli.paddle_cli", "generate", "--model", tiny_ckpt[0], "--input-ids", "5,6,7", "--max-new-tokens",
              "2000")
    assert p.stdout.read(4)  # tokens are streaming: Paddle is loaded and its signal handler would be installed
    p.send_signal(sig)
    err = assert_ended_cleanly(p, sig)
    assert err.strip().count("\n") == 0  # the interrupt line is all there is on stderr


@pytest.fixture(scope="module")
def small_ckpt(ckpt_factory):
    """Big enough (17M parameters) that building and verifying its export takes seconds, not a blink."""
    return ckpt_factory("interrupts-small", hidden_size=256, num_hidden_layers=4, moe_num_experts=16,
                        moe_intermediate_size=256, vocab_size=8192)


@pytest.mark.parametrize("sig,when", [(signal.SIGTERM, "export: verifying"), (signal.SIGINT, "temporary folder")])
def test_export_interrupted_leaves_nothing(small_ckpt, tmp_path, sig, when):
    out = tmp_path / "exports" / "small"
    p = start("ernie_paddle.cli.paddle_cli", "export", "--model", small_ckpt[0], "--out", str(out))
    if when == "temporary folder":  # while the graph is being built
        wait_for(lambda: out.parent.is_dir() and any(f.startswith(".tmp-export-") for f in os.listdir(out.parent)),
                 p, "the temporary folder")
    else:  # while Paddle is imported and the exported model is compared with it
        wait_for_line(p, when)
    p.send_signal(sig)
    assert_ended_cleanly(p, sig)
    assert os.listdir(out.parent) == []  # neither the output nor its hidden .tmp-export-* folder


def test_parity_interrupted_leaves_the_export_as_it_was(small_ckpt, tmp_path):
    from ernie_paddle.export.pipeline import export

    folder = tmp_path / "onnx"
    export(small_ckpt[0], str(folder), verify=False)
    before = sorted(os.listdir(folder))
    p = start("ernie_paddle.cli.paddle_cli", "parity", "--model", small_ckpt[0], "--onnx", str(folder), "--json",
              str(tmp_path / "parity.json"))
    wait_for_line(p, f"parity: {folder}")  # the candidate is being traced
    p.send_signal(signal.SIGTERM)
    assert_ended_cleanly(p, signal.SIGTERM)
    assert sorted(os.listdir(folder)) == before and os.listdir(tmp_path) == ["onnx"]


def test_make_checkpoint_interrupted_leaves_nothing(tmp_path):
    out = tmp_path / "ck"
    # one layer of the 0.3B preset: a 103424 x 1024 embedding, seconds of work once the staging folder exists
    p = start("ernie_paddle.cli.paddle_cli", "make-checkpoint", "--preset", "0.3b", "--num-layers", "1", "--layout", "pt",
              "--dtype", "float32", "--out", str(out))
    wait_for(lambda: any(f.startswith(".tmp-ck-") for f in os.listdir(tmp_path)), p, "the staging folder")
    p.send_signal(signal.SIGTERM)
    assert_ended_cleanly(p, signal.SIGTERM)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("next_step", [True, False])
def test_a_swallowed_interrupt_still_ends_the_command(capsys, next_step):
    """A handler's exception can be cleared by C code (a SIGTERM landing in numpy's import, inside
    abc.__subclasscheck__, was lost and the export ran to the end): the next step boundary raises it again, and
    a command that has none left still ends with the signal's status."""
    steps, before = [], signal.getsignal(signal.SIGTERM)

    def command() -> int:
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)  # the handler raises Terminated in here...
        except BaseException:
            pass  # ...and it is swallowed, as C code that clears errors does
        if next_step:
            progress_printer("work")(1, 2, "tensor")
        steps.append("went on")
        return 0

    assert run_command(command, "prog") == 143
    assert steps == ([] if next_step else ["went on"])
    assert capsys.readouterr().err.splitlines()[-1] == "prog: terminated (SIGTERM)"
    assert signal.getsignal(signal.SIGTERM) == before  # the handler in place before is back


def test_an_interrupt_inside_pyrun_string_still_ends_with_130(tmp_path):
    """C extensions run Python through PyRun_String; an interrupt escaping it is recorded by CPython, which then ends
    a `python -m` program by SIGINT after our status (the race seen in test_export_interrupted_leaves_nothing)."""
    (tmp_path / "interrupted_inside.py").write_text(
        "import ctypes, sys\n"
        "from ernie_paddle.interrupts import run_command\n"
        "def command():\n"
        "    ctypes.pythonapi.PyRun_SimpleString(b'import os, signal, time; os.kill(os.getpid(), signal.SIGINT); "
        "time.sleep(5)')\n"  # the handler's KeyboardInterrupt escapes the string, which prints and clears it
        "    return 0\n"
        "sys.exit(run_command(command, 'prog'))\n")
    r = subprocess.run([sys.executable, "-m", "interrupted_inside"], cwd=tmp_path, capture_output=True, text=True,
                       timeout=120, env={**os.environ, "PYTHONPATH": str(tmp_path)})
    assert r.returncode == 130, r.stderr
    assert r.stderr.strip().splitlines()[-1] == "prog: interrupted (SIGINT)"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_an_interrupt_turned_into_another_error_is_the_interrupt(capsys, sig):
    """A signal landing in a C extension's module init (`import onnx` under parity, on a loaded machine) makes the
    import fail with ImportError, its cause the handler's exception: the command still ends as interrupted."""
    def command() -> int:
        try:
            os.kill(os.getpid(), sig)
            time.sleep(1)  # the handler raises in here...
        except BaseException as e:
            raise ImportError("initialization failed") from e  # ...and the import reports its own error
        return 0

    assert run_command(command, "prog") == STATUS[sig]
    assert capsys.readouterr().err == f"prog: {MESSAGE[sig]}\n"


def test_an_interrupt_in_a_deferred_block_is_raised_when_it_ends(capsys):
    """`deferred()` (around Paddle's import, which a Ctrl-C cut short crashed or ended by the signal): the block
    runs to its end, then the interrupt ends the command."""
    steps = []

    def command() -> int:
        with deferred():
            os.kill(os.getpid(), signal.SIGINT)
            steps.append("the block went on")
        steps.append("after the block")
        return 0

    assert run_command(command, "prog") == 130
    assert steps == ["the block went on"]
    assert capsys.readouterr().err == "prog: interrupted (SIGINT)\n"


@pytest.mark.parametrize("error,status", [(InputError("--x 3: too big"), 2), (CheckpointError("a.bin: truncated"), 2),
                                          (FileNotFoundError(2, "No such file or directory", "w.bin"), 1),
                                          (MemoryError("out of memory"), 1)])
def test_every_program_ends_bad_input_with_one_line(capsys, error, status):
    """run_command is the runner of the CLIs and of every program in tools/: bad input (an ErnieError) ends with
    one `error:` line and status 2, a file or memory failure with one line and status 1, never a traceback."""
    def command() -> int:
        print("partial output")
        raise error

    assert run_command(command, "prog") == status
    out, err = capsys.readouterr()
    assert out == "partial output\n" and err == f"error: {error}\n"


def test_tool_program_ends_bad_input_with_one_line(tmp_path):
    """A program of tools/ run as users do: `gguf_export` of a folder with no checkpoint in it."""
    r = subprocess.run([sys.executable, "-m", "ernie_paddle.tools.gguf_export", "--model", str(tmp_path), "--out",
                        str(tmp_path / "m.gguf")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.startswith(f"error: {tmp_path}") and len(r.stderr.splitlines()) == 1, r.stderr
    assert not (tmp_path / "m.gguf").exists()


def test_closed_stdout_ends_quietly(tiny_ckpt):
    """`ernie-paddle generate ... | head -c 8`: no 'Broken pipe' error, and the status a shell gives `yes | head`."""
    p = start("ernie_paddle.cli.paddle_cli", "generate", "--model", tiny_ckpt[0], "--input-ids", "5,6,7", "--max-new-tokens",
              "2000")
    assert len(p.stdout.read(8)) == 8
    p.stdout.close()
    err = p.stderr.read()
    assert p.wait(timeout=120) == 141
    assert err == "", err


def test_bench_interrupted_while_measuring(tmp_path):
    """`ernie-paddle bench` is its own program, run by the same CLI entry: Ctrl-C ends it (and its engine) too."""
    p = start("ernie_paddle.cli.paddle_cli", "bench", "--preset", "tiny", "--engines", "paddle", "--work", str(tmp_path / "w"),
              "--json", str(tmp_path / "r.json"))
    wait_for_line(p, "bench: measuring paddle")
    p.send_signal(signal.SIGINT)
    assert_ended_cleanly(p, signal.SIGINT)
    assert not (tmp_path / "r.json").exists()
