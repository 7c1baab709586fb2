"""Streaming envelopes: the Cobblestone-256 envelope, made and opened piece by piece.

A stream is the same envelope :meth:`Crypto.encrypt` makes for a large payload
(``docs/format.md``): a header that names the DEK, then a Cobblestone-256
ciphertext bound to the header's commitment, the encryption context and the
caller's aad. So a stream written here opens with ``decrypt`` when it fits in
memory, and a ``encrypt`` blob opens here.

Cobblestone cuts the body into segments, each authenticated together with its
position and whether it is the last one. That is what the Go library's framing
lacked: a dropped, repeated or reordered segment fails its tag, and a stream cut
short fails at the end because its last segment never arrives. The decryptor
only releases a segment once its tag checked, and keeps the last one back until
``finalize``, which is why the guarantee in ``docs/streaming.md`` holds: every
byte handed out is authentic and in place, and an iteration that *ends* without
an error has seen the whole stream.

Nothing here talks to the KMS: the caller (Crypto) supplies the sealer.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable
from pathlib import Path
from typing import BinaryIO, Protocol

from anyio.lowlevel import checkpoint
from cryptography.exceptions import InvalidTag

from ._aead import Bytes
from ._envelope import (
    BODY_GCM,
    FIXED_SIZE,
    MIN_BODY,
    Envelope,
    header_size,
    parse_stream_header,
)
from ._exceptions import DecryptionError, InvalidValueError

__all__ = [
    "MAX_BUFFERED_GCM_BODY",
    "READ_SIZE",
    "STREAM_FAILED",
    "GcmBody",
    "Source",
    "StreamTransform",
    "check_paths",
    "check_source",
    "open_body",
    "read_file_header",
    "read_header",
    "seal_body",
    "transform_file",
]

Source = AsyncIterable[Bytes] | Iterable[Bytes]
"""What the streaming calls read: chunks of bytes, from an async or a plain iterable."""

#: The most Cobblestone gets in one call from the event loop: ~0.2 ms of work at
#: the 5-7 GB/s measured here, short enough to run inline. A thread hop (~75 µs
#: each) per chunk would cost more than the cipher itself.
_SLICE = 1024 * 1024
#: How long (seconds) a stream may keep the event loop before other tasks get a
#: turn, when its source never suspends by itself.
_TURN = 0.002
#: what the file helpers read at a time
READ_SIZE = 1024 * 1024
#: An AES-GCM envelope can only be checked whole, so a stream that turns out to
#: be one is buffered; past this size it is refused instead (``encrypt`` never
#: makes a GCM body near it: large payloads get a Cobblestone body).
MAX_BUFFERED_GCM_BODY = 16 * 1024 * 1024
STREAM_FAILED = (
    "decryption failed: wrong key, context or aad, or a modified, reordered, "
    "truncated or extended stream"
)


class StreamTransform(Protocol):
    """What a Cobblestone encryptor or decryptor offers, and the AES-GCM adapter below."""

    def update(self, data: Bytes, /) -> bytes: ...
    def finalize(self) -> bytes: ...


def check_source(source: object) -> AsyncIterator[Bytes]:
    """``source`` as an async iterator of chunks; TypeError for what cannot be one.

    Bytes themselves are refused: iterating them yields ints, and a caller
    holding the whole payload wants :meth:`Crypto.encrypt`.
    """
    if isinstance(source, bytes | bytearray | memoryview | str):
        raise TypeError(
            "source must be an iterable of byte chunks, not a single "
            f"{type(source).__name__} (use encrypt/decrypt for a payload in memory, "
            "or pass [data])"
        )
    if isinstance(source, AsyncIterable):
        return _checked_async(source)
    if isinstance(source, Iterable):
        return _checked_sync(source)
    raise TypeError(
        f"source must be an async or plain iterable of bytes, not {type(source).__name__}"
    )


def _check_chunk(chunk: object) -> Bytes:
    if not isinstance(chunk, bytes | bytearray | memoryview):
        raise TypeError(f"a stream chunk must be bytes-like, not {type(chunk).__name__}")
    return chunk


async def _checked_async(source: AsyncIterable[Bytes]) -> AsyncIterator[Bytes]:
    async for chunk in source:
        yield _check_chunk(chunk)


async def _checked_sync(source: Iterable[Bytes]) -> AsyncIterator[Bytes]:
    for chunk in source:
        yield _check_chunk(chunk)


class _Turns:
    """Lets other tasks run once a stream has had the event loop for a while.

    A source may never suspend (a list, an async generator over memory, a
    socket with data waiting), so a stream cannot count on its reads to let
    others run. Not after every chunk either: a trip round the event loop costs
    tens of µs, as much as the cipher spends on a few hundred KiB.
    """

    __slots__ = ("_since",)

    def __init__(self) -> None:
        self._since = time.perf_counter()

    async def maybe_yield(self) -> None:
        now = time.perf_counter()
        if now - self._since >= _TURN:
            await checkpoint()
            self._since = time.perf_counter()


async def _run(transform: StreamTransform, chunk: Bytes, turn: _Turns) -> bytes:
    """``transform.update(chunk)``, a slice at a time, giving other tasks their turns."""
    if len(chunk) <= _SLICE:
        out = transform.update(chunk)
        await turn.maybe_yield()
        return out
    view = memoryview(chunk)
    parts = []
    for at in range(0, len(view), _SLICE):
        parts.append(transform.update(view[at : at + _SLICE]))
        await turn.maybe_yield()
    return b"".join(parts)


async def seal_body(
    header: bytes, encryptor: StreamTransform, chunks: AsyncIterator[Bytes]
) -> AsyncIterator[bytes]:
    """``header``, then the Cobblestone body of ``chunks``, as it is made."""
    pending = header  # sent with the first ciphertext, so no chunk is just a header
    turn = _Turns()
    async for chunk in chunks:
        out = await _run(encryptor, chunk, turn)
        if out:
            yield pending + out if pending else out
            pending = b""
    yield pending + encryptor.finalize()


async def read_header(chunks: AsyncIterator[Bytes]) -> tuple[Envelope, bytes]:
    """Read one envelope header off the front of ``chunks``.

    Returns it (as an :class:`Envelope` with no body) and whatever of the body
    came in with it. DecryptionError if the stream is not an envelope or ends
    inside the header.
    """
    buffer = bytearray()
    need = FIXED_SIZE
    async for chunk in chunks:
        buffer += chunk
        if need == FIXED_SIZE and len(buffer) >= FIXED_SIZE:
            need = header_size(bytes(buffer[:FIXED_SIZE]))
        if len(buffer) >= need > FIXED_SIZE:
            return parse_stream_header(bytes(buffer[:need])), bytes(buffer[need:])
    if len(buffer) < FIXED_SIZE:
        raise DecryptionError("not an encx-async stream: it ends before its header")
    raise DecryptionError("the stream is truncated: it ends inside its header")


async def open_body(
    decryptor: StreamTransform, first: bytes, chunks: AsyncIterator[Bytes]
) -> AsyncIterator[bytes]:
    """The plaintext of a body: ``first`` (read with the header), then ``chunks``.

    Each piece is yielded once its segments authenticated; the end of the
    iteration comes only after the final segment did (DecryptionError if not).
    """
    turn = _Turns()
    try:
        if first:
            out = await _run(decryptor, first, turn)
            if out:
                yield out
        async for chunk in chunks:
            out = await _run(decryptor, chunk, turn)
            if out:
                yield out
        out = decryptor.finalize()
    except (InvalidTag, ValueError):
        raise DecryptionError(STREAM_FAILED) from None
    if out:
        yield out


class GcmBody:
    """An AES-GCM envelope's body seen as a stream: buffered, opened at the end.

    ``open_envelope`` opens the whole envelope (header and body) in one go.
    """

    __slots__ = ("_body", "_header", "_open")

    def __init__(self, header: bytes, open_envelope: Callable[[Envelope], bytes]) -> None:
        self._header = header
        self._open = open_envelope
        self._body = bytearray()

    def update(self, data: Bytes, /) -> bytes:
        self._body += data
        if len(self._body) > MAX_BUFFERED_GCM_BODY:
            raise DecryptionError(
                "an AES-GCM envelope over 16 MiB cannot be streamed: encx-async never "
                "makes one, so this stream is not one of its ciphertexts"
            )
        return b""

    def finalize(self) -> bytes:
        envelope = parse_stream_header(self._header)
        blob = self._header + bytes(self._body)
        if len(self._body) < MIN_BODY[BODY_GCM]:
            raise DecryptionError("ciphertext is truncated")
        return self._open(Envelope(BODY_GCM, envelope.kek_version, blob, envelope.body_at))


# -- files: every byte of I/O and cipher work in one worker thread --------------------


def read_file_header(path: Path) -> Envelope:
    """The envelope header at the start of the file ``path``."""
    with path.open("rb") as file:
        fixed = file.read(FIXED_SIZE)
        if len(fixed) < FIXED_SIZE:
            raise DecryptionError("not an encx-async ciphertext: the file ends before its header")
        rest = _read_exactly(file, header_size(fixed) - FIXED_SIZE)
        if rest is None:
            raise DecryptionError("the file is truncated: it ends inside its header")
    return parse_stream_header(fixed + rest)


def _read_exactly(file: BinaryIO, size: int) -> bytes | None:
    data = file.read(size)
    # A read may return less than asked before the end of a file (a pipe, a
    # FUSE mount): keep reading until the end really is the end.
    while len(data) < size:
        more = file.read(size - len(data))
        if not more:
            return None
        data += more
    return data


def transform_file(
    src: Path,
    dst: Path,
    *,
    skip: int,
    prefix: bytes,
    transform: StreamTransform | None,
) -> int:
    """Write ``prefix`` then ``transform`` of ``src`` (after its first ``skip`` bytes) to ``dst``.

    ``transform=None`` copies. ``dst`` appears only complete: the output goes to
    a private temporary file next to it (mode 0600), is flushed to disk, and is
    renamed over ``dst`` at the end; on any error it is deleted and ``dst`` is
    left as it was. Returns the number of bytes read from ``src``.
    """
    fd, temp_name = tempfile.mkstemp(dir=dst.parent, prefix=f".{dst.name}.", suffix=".part")
    temp = Path(temp_name)
    try:
        with src.open("rb") as source, os.fdopen(fd, "wb") as out:
            source.seek(skip)
            out.write(prefix)
            total = 0
            while chunk := source.read(READ_SIZE):
                total += len(chunk)
                out.write(transform.update(chunk) if transform is not None else chunk)
            if transform is not None:
                out.write(transform.finalize())
            out.flush()
            os.fsync(out.fileno())
        temp.replace(dst)
    except BaseException as exc:
        temp.unlink(missing_ok=True)
        if isinstance(exc, InvalidTag):
            raise DecryptionError(STREAM_FAILED) from None
        raise
    return total


def check_paths(src: object, dst: object) -> tuple[Path, Path]:
    """``src`` and ``dst`` as paths; InvalidValueError when they name one file."""
    if not isinstance(src, str | os.PathLike) or not isinstance(dst, str | os.PathLike):
        raise TypeError("src and dst must be paths (str or os.PathLike)")
    source, target = Path(src), Path(dst)
    if target.exists() and source.exists() and source.samefile(target):
        raise InvalidValueError(
            f"src and dst are the same file ({str(target)!r}): write to another path"
        )
    return source, target
