"""The HTTP server behind every syncd listener: waitress, with one set of limits.

The daemon's listener (webhooks, ``/healthz``, ``/metrics``) is built here, and
any later listener must be too, so every port syncd opens has the same
defences:

- a real listen backlog (:data:`LISTEN_BACKLOG_CONNECTIONS`) and a cap on open
  connections (:data:`CONNECTION_LIMIT`); a burst past the cap waits in the
  backlog instead of being reset;
- HTTP/1.1 parsing by waitress, which reads the whole request before the app
  runs: a malformed ``Content-Length`` (``-1``) is a 400, a body over
  :data:`REQUEST_BODY_LIMIT_BYTES` (with a length, chunked or not) a 413,
  headers over :data:`REQUEST_HEADER_LIMIT_BYTES` a 431, and the app threads
  (:data:`THREADS`) are never held by a slow client;
- a whole-request time limit (:data:`REQUEST_TIME_LIMIT_SECONDS` from a
  request's first byte to its last, however steadily the bytes drip) and an
  idle limit (:data:`IDLE_TIMEOUT_SECONDS` of silence); either closes the
  connection, with one log line when a request was cut short;
- no tracebacks: an app that raises answers 500 and logs one line (the
  exception type); waitress's own messages become one line each, without the
  request path (a webhook path holds its secret); the "task queue depth"
  warning that a burst raises on every request is logged at most once per
  :data:`QUEUE_NOTE_EVERY_SECONDS`.

There is no access log: paths can hold secrets.

Usage::

    server = serve(app, "127.0.0.1", 8787)
    server.port    # the bound port (useful with port 0)
    server.stop()  # stop accepting, let answers in progress finish, close
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import structlog
from waitress import wasyncore
from waitress.adjustments import Adjustments
from waitress.channel import HTTPChannel
from waitress.server import TcpWSGIServer
from waitress.task import ThreadedTaskDispatcher

log = structlog.get_logger(__name__)

THREADS = 8  # requests the app serves at once; the rest wait in waitress's queue
CONNECTION_LIMIT = 512  # open connections; past it, new ones wait in the backlog
LISTEN_BACKLOG_CONNECTIONS = 1024  # connections the kernel holds until accepted
REQUEST_BODY_LIMIT_BYTES = 64 * 1024  # the largest body any syncd endpoint takes
REQUEST_HEADER_LIMIT_BYTES = 16 * 1024  # request line plus headers
REQUEST_TIME_LIMIT_SECONDS = 10.0  # a request's first byte to its last
IDLE_TIMEOUT_SECONDS = 10.0  # silence after which a connection is closed
STOP_GRACE_SECONDS = 3.0  # how long stop() lets answers in progress finish
STOP_THREADS_SECONDS = 1.0  # then how long it waits for the app threads to end
LOOP_TICK_SECONDS = 0.5  # the longest the I/O loop sleeps, so limits are checked this often
QUEUE_NOTE_EVERY_SECONDS = 60.0  # at most one "requests queued" line per this
WAITRESS_LOGGERS = ("waitress", "waitress.queue")


@dataclass(frozen=True)
class Limits:
    """What one listener allows; the defaults are the module constants.

    Attributes:
        threads: requests served at once.
        connections: open connections before new ones wait in the backlog.
        backlog: connections the kernel queues until accepted.
        body_bytes: the largest request body (413 beyond).
        header_bytes: the largest request line plus headers (431 beyond).
        request_seconds: a request's first byte to its last.
        idle_seconds: silence after which a connection is closed.
    """

    threads: int = THREADS
    connections: int = CONNECTION_LIMIT
    backlog: int = LISTEN_BACKLOG_CONNECTIONS
    body_bytes: int = REQUEST_BODY_LIMIT_BYTES
    header_bytes: int = REQUEST_HEADER_LIMIT_BYTES
    request_seconds: float = REQUEST_TIME_LIMIT_SECONDS
    idle_seconds: float = IDLE_TIMEOUT_SECONDS


WsgiApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


class HttpServer:
    """A listener serving one WSGI app on a thread of its own, until :meth:`stop`.

    Build it with :func:`serve`.
    """

    def __init__(self, servers: list[_Server], socket_map: dict[int, Any],
                 dispatcher: ThreadedTaskDispatcher, name: str) -> None:
        self._servers = servers
        self._map = socket_map
        self._dispatcher = dispatcher
        self._stopping = threading.Event()
        self.port = int(servers[0].effective_port)
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop accepting, give answers in progress a few seconds, then close everything.

        Returns within about :data:`STOP_GRACE_SECONDS` plus
        :data:`STOP_THREADS_SECONDS`, whatever the clients do.
        """
        self._stopping.set()
        try:
            self._servers[0].pull_trigger()  # wake the loop now, not at its next tick
        except OSError:  # already closed: the loop has ended
            pass
        self._thread.join(timeout=STOP_GRACE_SECONDS + STOP_THREADS_SECONDS + 2 * LOOP_TICK_SECONDS)

    def _run(self) -> None:
        # Every socket is touched on this thread only, so closing cannot race the loop.
        try:
            while not self._stopping.is_set():
                wasyncore.loop(timeout=LOOP_TICK_SECONDS, map=self._map, use_poll=True, count=1)
            for server in self._servers:  # the listening socket only; the trigger stays
                wasyncore.dispatcher.close(server)
            deadline = time.monotonic() + STOP_GRACE_SECONDS
            while self._answering() and time.monotonic() < deadline:
                wasyncore.loop(timeout=LOOP_TICK_SECONDS, map=self._map, use_poll=True, count=1)
        except Exception as error:  # the loop itself broke: say so in one line, then close
            log.error("http_server_failed", error=type(error).__name__)
        finally:
            self._dispatcher.shutdown(cancel_pending=True, timeout=STOP_THREADS_SECONDS)
            wasyncore.close_all(self._map, ignore_all=True)

    def _answering(self) -> bool:
        return any(channel.requests for server in self._servers
                   for channel in list(server.active_channels.values()))


def serve(app: WsgiApp, host: str, port: int, *, limits: Limits | None = None,
          name: str = "syncd-http") -> HttpServer:
    """Serve ``app`` on ``host:port`` (port 0: any free port) with waitress.

    Args:
        app: the WSGI application.
        host: an address or a name; a name with several addresses gets a
            socket for each, all on one port.
        port: the port, or 0 for one the kernel picks (see ``HttpServer.port``).
        limits: the listener's limits (default: the module constants).
        name: the serving thread's name.

    Returns:
        The running server.

    Raises:
        OSError: the address cannot be bound.
    """
    limits = limits or Limits()
    _tame_waitress_logging()
    adjustments = Adjustments(
        host=host, port=port, threads=limits.threads, backlog=limits.backlog,
        connection_limit=limits.connections,
        # waitress refuses a body whose length is >= this: allow exactly body_bytes.
        max_request_body_size=limits.body_bytes + 1,
        max_request_header_size=limits.header_bytes,
        # _Server.maintenance (not waitress's channel_timeout) closes idle and slow
        # connections; have waitress run it every second.
        cleanup_interval=1,
        ident=None,  # no Server header
        clear_untrusted_proxy_headers=True, expose_tracebacks=False,
        log_socket_errors=False,  # a client that resets is not news (and it was a traceback)
        asyncore_use_poll=True,  # select() fails past 1024 descriptors
    )
    socket_map: dict[int, Any] = {}
    dispatcher = ThreadedTaskDispatcher()
    dispatcher.set_thread_count(limits.threads)
    guarded = _guarded(app)
    servers: list[_Server] = []
    try:
        for sockinfo in adjustments.listen:
            servers.append(_Server(guarded, limits, map=socket_map, dispatcher=dispatcher,
                                   adj=adjustments, sockinfo=sockinfo))
    except BaseException:
        dispatcher.shutdown(timeout=0)
        wasyncore.close_all(socket_map, ignore_all=True)
        raise
    return HttpServer(servers, socket_map, dispatcher, name)


class _Channel(HTTPChannel):
    """A connection that notes when the request it is receiving began."""

    request_began: float | None = None
    _timed: object = None

    def received(self, data: bytes) -> bool:
        result: bool = super().received(data)
        if self.request is None:  # nothing half-received
            self.request_began, self._timed = None, None
        elif self.request is not self._timed:  # the first bytes of a new request
            self.request_began, self._timed = time.time(), self.request
        return result


class _Server(TcpWSGIServer):
    """waitress's TCP server, with a time limit on whole requests as well as on silence."""

    channel_class = _Channel

    def __init__(self, app: WsgiApp, limits: Limits, **kwargs: Any) -> None:
        self.limits = limits
        super().__init__(app, **kwargs)

    def maintenance(self, now: float) -> None:
        """Close connections that are silent, or too slow sending their request.

        Runs on the I/O loop (waitress calls it about every second). A
        connection whose request the app is answering is left alone: that
        time is ours, not the client's.
        """
        for channel in list(self.active_channels.values()):
            if channel.requests or channel.will_close:
                continue
            began = getattr(channel, "request_began", None)
            if began is not None and now - began > self.limits.request_seconds:
                log.info("http_request_cut", reason="not received in time",
                         limit_seconds=self.limits.request_seconds)
                channel.will_close = True
            elif now - channel.last_activity > self.limits.idle_seconds:
                if began is not None:
                    log.info("http_request_cut", reason="client went silent",
                             limit_seconds=self.limits.idle_seconds)
                channel.will_close = True


def _guarded(app: WsgiApp) -> WsgiApp:
    """``app``, but an exception answers 500 and logs one line instead of a traceback."""

    def guarded(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        try:
            return list(app(environ, start_response))
        except Exception as error:
            log.error("http_app_failed", error=type(error).__name__)
            body = b"internal error\n"
            start_response("500 Internal Server Error",
                           [("Content-Type", "text/plain; charset=utf-8"),
                            ("Content-Length", str(len(body)))], sys.exc_info())
            return [body]

    return guarded


class _WaitressNotes(logging.Handler):
    """waitress's log records as one structlog line each, without paths or tracebacks."""

    def __init__(self) -> None:
        super().__init__()
        self._last_queue_note = -QUEUE_NOTE_EVERY_SECONDS

    def emit(self, record: logging.LogRecord) -> None:
        if record.name == "waitress.queue":  # "Task queue depth is N", raised per request
            now = time.monotonic()
            if now - self._last_queue_note < QUEUE_NOTE_EVERY_SECONDS:
                return
            self._last_queue_note = now
            depth = record.args[0] if isinstance(record.args, tuple) and record.args else None
            log.info("http_requests_queued", depth=depth)
            return
        try:
            message = record.getMessage()
        except (TypeError, ValueError):
            message = str(record.msg)
        # First line only, cut before the first path or URL: "Exception while serving /x".
        note = message.splitlines()[0] if message else ""
        note = note.split("/", 1)[0].rstrip(" :") or "(no message)"
        log.log(record.levelno, "http_server_note", note=note)


def _tame_waitress_logging() -> None:
    """Route waitress's loggers through :class:`_WaitressNotes` (once per process)."""
    for name in WAITRESS_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(h, _WaitressNotes) for h in logger.handlers):
            logger.addHandler(_WaitressNotes())
        logger.propagate = False
        logger.setLevel(logging.INFO)
