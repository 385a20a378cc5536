"""Running the app under uvicorn with an orderly stop: SIGTERM (or Ctrl-C) stops accepting, lets the requests in
flight finish for the grace period, aborts the rest, and returns.

uvicorn raises a signal it caught again once it has stopped, which would end the program with 143 after a clean
stop; here SIGTERM is the normal way to stop a server, so it returns (exit status 0). Ctrl-C still ends the command
as every command ends on Ctrl-C (KeyboardInterrupt: status 130), after the same orderly stop.
"""

from __future__ import annotations

import contextlib
import signal
import socket
import threading
from typing import Callable, Iterator

import uvicorn

from ernie_paddle.serving.app import Service, create_app

SHUTDOWN_MARGIN = 5.0  # seconds uvicorn waits for connections beyond the grace period (aborted answers to send)


class GracefulServer(uvicorn.Server):
    """uvicorn's server; its shutdown starts the engine's, and a stop signal is not raised again afterwards."""

    def __init__(self, config: uvicorn.Config, service: Service, grace: float, ready: Callable[[], None]):
        super().__init__(config)
        self.service, self.grace, self.ready = service, grace, ready
        self.engine_stop: threading.Thread | None = None
        self.signals: list[int] = []  # the stop signals received

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started:
            self.ready()  # serving, and the stop signals are ours

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():  # only the main thread receives signals
            yield
            return
        previous = {s: signal.signal(s, self._signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    def _signal(self, sig: int, frame) -> None:
        self.signals.append(sig)
        self.handle_exit(sig, frame)  # uvicorn's: stop (a second Ctrl-C: at once)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self.stop_engine()  # first: uvicorn then waits for the connections, which end as their requests do
        await super().shutdown(sockets)

    def stop_engine(self) -> None:
        """Refuse new requests (503) and give those in flight the grace period (once)."""
        if self.engine_stop is None:
            self.engine_stop = threading.Thread(target=self.service.engine.shutdown, args=(self.grace,),
                                                name="ernie-engine-shutdown")
            self.engine_stop.start()

    @property
    def interrupted(self) -> bool:
        """Ctrl-C stopped it (SIGTERM did not)."""
        return signal.SIGINT in self.signals


def listening_socket(host: str, port: int) -> socket.socket:
    """A socket bound and listening on host:port (port 0: a free one), made before the model loads so that a port in
    use is reported at once; connections wait in its backlog until the server runs."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.listen(2048)
    return sock


def run(service: Service, sock: socket.socket, grace: float, ready: Callable[[], None],
        log_level: str = "info") -> None:
    """Serve until a stop signal, calling `ready()` once serving; the engine has stopped when this returns. Ctrl-C
    raises KeyboardInterrupt then."""
    config = uvicorn.Config(create_app(service), log_level=log_level,
                            timeout_graceful_shutdown=grace + SHUTDOWN_MARGIN)
    server = GracefulServer(config, service, grace, ready)
    try:
        server.run(sockets=[sock])
    finally:
        server.stop_engine()  # already under way after a signal; else (a failure) abort what is left
        server.engine_stop.join()
    if server.interrupted:
        raise KeyboardInterrupt
