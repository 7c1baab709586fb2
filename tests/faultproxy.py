"""A loopback HTTP fault proxy to put in front of the moto server.

:class:`FaultProxy` listens on ``127.0.0.1`` and forwards each HTTP/1.1
request to an upstream server on loopback (the moto server of the
``moto_endpoint`` fixture), unless a fault is set. Point a client's
``endpoint_url`` at :attr:`FaultProxy.url`; the ``fault_proxy`` fixture of
``tests/conftest.py`` gives a started one in front of a freshly reset moto::

    async def test_x(fault_proxy: FaultProxy) -> None:
        async with KMSService(Config(region=..., endpoint_url=fault_proxy.url)) as kms:
            fault_proxy.error(500, "KMSInternalException")  # every request from now on
            fault_proxy.throttle(times=2)  # the next two requests, then pass-through again
            fault_proxy.stall()  # read requests, never answer
            fault_proxy.reset()  # answer requests with a TCP RST
            fault_proxy.pass_through()
            fault_proxy.latency = 0.2  # seconds before any request is handled

One fault at a time is in force; setting one replaces the last. ``times=n``
limits it to the next ``n`` requests, after which the proxy passes requests
through again; without it the fault stays until replaced. What a request gets
is decided when it has been read whole, so :attr:`latency` adds to every mode.

* :meth:`pass_through`: forward to the upstream and relay its answer.
* :meth:`stall`: read the request and never answer. The connection stays open
  until the client closes it (its read timeout, a cancelled call) or the proxy
  closes; the client's connection-pool slot stays taken meanwhile.
* :meth:`reset`: close the connection with a TCP RST instead of answering.
* :meth:`respond`: answer with a fixed HTTP response, without the upstream.
* :meth:`error`: :meth:`respond` with an AWS JSON 1.1 error document
  (``{"__type": code, "message": message}``, what KMS and Secrets Manager
  send); :meth:`throttle` is ``error(400, "ThrottlingException", ...)``.

:attr:`requests` counts the requests read (in every mode) and
:attr:`connections` the connections accepted; ``await proxy.wait_requests(n)``
waits until ``n`` requests have been read (for instance, until a call is
stalled). :meth:`aclose` closes every connection and waits for their tasks, so
nothing is left pending.

:class:`TCPFaultProxy` does the same for any TCP protocol (PostgreSQL), below
the level of requests: it relays bytes both ways and, while :meth:`~TCPFaultProxy.stall`
is in force, holds them back with every connection left open, as a server that
stopped answering (or a network path that went dark) does;
:meth:`~TCPFaultProxy.pass_through` delivers what was held and relays again.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import struct
from dataclasses import dataclass
from typing import Literal, Self
from urllib.parse import urlsplit

__all__ = ["FaultProxy", "TCPFaultProxy"]

Mode = Literal["pass", "stall", "reset", "respond"]


@dataclass(frozen=True, slots=True)
class _Fault:
    mode: Mode
    response: bytes = b""


_PASS_THROUGH = _Fault("pass")


class _Listener:
    """What both proxies share: a listener on 127.0.0.1, the connections it
    accepted and their handlers, all dropped by ``aclose``."""

    def __init__(self) -> None:
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        self._closing = False

    @property
    def _port(self) -> int:
        if self._server is None:
            raise RuntimeError("the proxy is not started")
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        raise NotImplementedError

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)

    async def aclose(self) -> None:
        """Stop listening, drop every connection, and wait for their handlers."""
        self._closing = True
        server, self._server = self._server, None
        if server is not None:
            server.close()
        for writer in list(self._writers):
            writer.transport.abort()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if server is not None:
            await server.wait_closed()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()


class FaultProxy(_Listener):
    """An HTTP proxy on 127.0.0.1 that forwards to ``upstream`` or injects a fault."""

    def __init__(self, upstream: str) -> None:
        parts = urlsplit(upstream)
        if parts.scheme != "http" or parts.hostname not in ("127.0.0.1", "localhost"):
            raise ValueError(f"the upstream must be an http URL on loopback, not {upstream!r}")
        self._upstream = (parts.hostname, parts.port or 80)
        self._fault = _PASS_THROUGH
        self._remaining: int | None = None
        super().__init__()
        self._arrived = asyncio.Condition()
        self.latency = 0.0
        """Seconds to wait after reading a request, before handling it."""
        self.requests = 0
        """Requests read so far, whatever was done with them."""
        self.connections = 0
        """Connections accepted so far."""

    @property
    def url(self) -> str:
        """``http://127.0.0.1:<port>``, to use as ``endpoint_url``."""
        return f"http://127.0.0.1:{self._port}"

    # -- faults ------------------------------------------------------------

    def pass_through(self) -> None:
        """Forward every request from now on."""
        self._set(_PASS_THROUGH, None)

    def stall(self, *, times: int | None = None) -> None:
        """Read requests and never answer them."""
        self._set(_Fault("stall"), times)

    def reset(self, *, times: int | None = None) -> None:
        """Close connections with a TCP RST instead of answering."""
        self._set(_Fault("reset"), times)

    def respond(
        self,
        status: int,
        body: bytes,
        *,
        content_type: str = "application/x-amz-json-1.1",
        times: int | None = None,
    ) -> None:
        """Answer requests with ``status`` and ``body``, keeping the connection open."""
        head = (
            f"HTTP/1.1 {status} Injected\r\n"
            f"Content-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\n"
            "x-amzn-RequestId: 00000000-0000-4000-8000-000000000000\r\n"
            "\r\n"
        )
        self._set(_Fault("respond", head.encode("ascii") + body), times)

    def error(
        self, status: int, code: str, message: str = "injected", *, times: int | None = None
    ) -> None:
        """Answer with an AWS JSON 1.1 error: ``{"__type": code, "message": message}``."""
        body = json.dumps({"__type": code, "message": message}).encode()
        self.respond(status, body, times=times)

    def throttle(self, *, times: int | None = None) -> None:
        """Answer as KMS does when its request quota is exceeded."""
        self.error(400, "ThrottlingException", "Rate exceeded", times=times)

    def _set(self, fault: _Fault, times: int | None) -> None:
        if times is not None and times < 1:
            raise ValueError("times must be >= 1")
        self._fault, self._remaining = fault, times

    def _take(self) -> _Fault:
        fault = self._fault
        if self._remaining is not None:
            self._remaining -= 1
            if self._remaining == 0:
                self._fault, self._remaining = _PASS_THROUGH, None
        return fault

    async def wait_requests(self, count: int) -> None:
        """Wait until :attr:`requests` is at least ``count``."""
        async with self._arrived:
            await self._arrived.wait_for(lambda: self.requests >= count)

    # -- lifecycle ---------------------------------------------------------

    # -- serving -----------------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.add(writer)
        self.connections += 1
        try:
            while await self._one_request(reader, writer):
                pass
        except (OSError, ValueError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass  # the client went away; nothing to answer
        except asyncio.CancelledError:
            # Python 3.11's stream server logs a cancelled handler as an error;
            # aclose's own cancellation ends the handler quietly instead.
            if not self._closing:
                raise
        finally:
            self._writers.discard(writer)
            writer.transport.abort()
            self._tasks.discard(task)

    async def _one_request(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> bool:
        """Read one request and handle it; False when the connection is done."""
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError:
            return False  # closed between requests
        body = await reader.readexactly(_content_length(head) or 0)
        self.requests += 1
        async with self._arrived:
            self._arrived.notify_all()
        fault = self._take()
        if self.latency > 0:
            await asyncio.sleep(self.latency)
        if fault.mode == "stall":
            while await reader.read(65536):
                pass  # keep reading (and discarding) until the client hangs up
            return False
        if fault.mode == "reset":
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()
            return False
        if fault.mode == "respond":
            writer.write(fault.response)
            await writer.drain()
            return True
        return await self._forward(head + body, writer)

    async def _forward(self, request: bytes, writer: asyncio.StreamWriter) -> bool:
        """Send one request upstream on a connection of its own; relay the answer."""
        host, port = self._upstream
        up_reader, up_writer = await asyncio.open_connection(host, port)
        try:
            up_writer.write(request)
            await up_writer.drain()
            head = await up_reader.readuntil(b"\r\n\r\n")
            length = _content_length(head)
            if length is None:
                body = await up_reader.read()  # delimited by the upstream closing
            else:
                body = await up_reader.readexactly(length)
        finally:
            up_writer.transport.abort()
            with contextlib.suppress(OSError):
                await up_writer.wait_closed()
        writer.write(head + body)
        await writer.drain()
        return length is not None and not _closes(head)


def _headers(head: bytes) -> dict[str, str]:
    lines = head.decode("latin-1").split("\r\n")[1:]
    pairs = (line.split(":", 1) for line in lines if ":" in line)
    return {name.strip().lower(): value.strip() for name, value in pairs}


def _content_length(head: bytes) -> int | None:
    value = _headers(head).get("content-length")
    return None if value is None else int(value)


def _closes(head: bytes) -> bool:
    return _headers(head).get("connection", "").lower() == "close"


class TCPFaultProxy(_Listener):
    """A TCP relay on 127.0.0.1 to ``host:port`` (loopback) that can stall."""

    def __init__(self, host: str, port: int) -> None:
        if host not in ("127.0.0.1", "localhost"):
            raise ValueError(f"the upstream must be on loopback, not {host!r}")
        self._upstream = (host, port)
        self._flowing = asyncio.Event()
        self._flowing.set()
        super().__init__()
        self.connections = 0
        """Connections accepted so far."""

    @property
    def port(self) -> int:
        return self._port

    def stall(self) -> None:
        """Hold back every byte, both ways, on every connection (new ones too)."""
        self._flowing.clear()

    def pass_through(self) -> None:
        """Deliver what was held back and relay again."""
        self._flowing.set()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._writers.add(writer)
        up_writer: asyncio.StreamWriter | None = None
        try:
            await self._flowing.wait()
            up_reader, up_writer = await asyncio.open_connection(*self._upstream)
            self._writers.add(up_writer)
            pumps = [
                asyncio.ensure_future(self._pump(reader, up_writer)),
                asyncio.ensure_future(self._pump(up_reader, writer)),
            ]
            self._tasks.update(pumps)
            try:
                # Either side closing ends the relay (after what was held is sent).
                await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for pump in pumps:
                    pump.cancel()
                await asyncio.gather(*pumps, return_exceptions=True)
                self._tasks.difference_update(pumps)
        except (OSError, asyncio.CancelledError):
            pass
        finally:
            for end in (writer, up_writer):
                if end is not None:
                    self._writers.discard(end)
                    end.transport.abort()

    async def _pump(self, source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            while data := await source.read(65536):
                await self._flowing.wait()
                sink.write(data)
                await sink.drain()
