"""Chunked reading and writing of stdio and files, off the event loop.

Files are read and written in anyio's worker threads. stdin and stdout go
through their file descriptors in daemon threads of their own: a read from a
pipe nobody writes to (or a write to one nobody reads) can wait for ever, and
such a thread neither holds up Ctrl-C nor the interpreter's exit, where a
worker thread would be waited for. Nothing holds more than a chunk.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import stat
import sys
import tempfile
import threading
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterator
from functools import partial
from pathlib import Path
from typing import BinaryIO, TypeVar

import anyio
import anyio.to_thread

from encx_async._stream import fsync_directory

from ._errors import CLIError, ExitCode

__all__ = [
    "CHUNK_SIZE",
    "STDIO",
    "atomic_output",
    "check_output",
    "file_size",
    "is_temporary_of",
    "naming",
    "read_file_chunks",
    "read_stdin",
    "replace_file",
    "stdin_lines",
    "stdin_size",
    "stdout_is_terminal",
    "write_chunks",
    "write_stdout",
]

T = TypeVar("T")

#: what is read at a time: big enough that a thread per chunk costs nothing
CHUNK_SIZE = 1024 * 1024
STDIO = "-"


async def _in_daemon(func: Callable[[], T]) -> T:
    """``func()`` in a daemon thread; abandoned (not waited for) on cancellation."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(outcome: tuple[T] | BaseException) -> None:
        if future.done():
            return  # cancelled meanwhile
        if isinstance(outcome, BaseException):
            future.set_exception(outcome)
        else:
            future.set_result(outcome[0])

    def run() -> None:
        outcome: tuple[T] | BaseException
        try:
            outcome = (func(),)
        except BaseException as exc:
            outcome = exc
        with contextlib.suppress(RuntimeError):  # the loop is gone: nobody is waiting
            loop.call_soon_threadsafe(settle, outcome)

    threading.Thread(target=run, name="encx-async stdio", daemon=True).start()
    return await future


def _read_up_to(fd: int, size: int) -> bytes:
    """``size`` bytes from ``fd``, fewer only at its end (a pipe hands out 64 KiB at a time)."""
    parts: list[bytes] = []
    wanted = size
    while wanted > 0:
        part = os.read(fd, wanted)
        if not part:
            break
        parts.append(part)
        wanted -= len(part)
    return b"".join(parts)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


async def read_stdin(counted: Callable[[int], object]) -> AsyncIterator[bytes]:
    """stdin in chunks; ``counted(n)`` after each."""
    fd = sys.stdin.fileno()
    while chunk := await _in_daemon(partial(_read_up_to, fd, CHUNK_SIZE)):
        counted(len(chunk))
        yield chunk


async def stdin_lines() -> AsyncIterator[bytes]:
    """stdin's lines (without their line ends), read a chunk at a time."""
    rest = b""
    async for chunk in read_stdin(lambda _: None):
        lines = (rest + chunk).split(b"\n")
        rest = lines.pop()
        for line in lines:
            yield line
    if rest:
        yield rest


async def write_stdout(data: bytes) -> None:
    """Write ``data`` to stdout's file descriptor (anything buffered in sys.stdout first)."""
    sys.stdout.flush()
    await _in_daemon(partial(_write_all, sys.stdout.fileno(), data))


def stdin_size() -> int | None:
    """The size of stdin when it is a regular file (``< file``), else None."""
    status = os.fstat(sys.stdin.fileno())
    return status.st_size if stat.S_ISREG(status.st_mode) else None


def stdout_is_terminal() -> bool:
    return os.isatty(sys.stdout.fileno())


async def read_file_chunks(path: str, counted: Callable[[int], object]) -> AsyncIterator[bytes]:
    """The file ``path`` in chunks (anyio reads them in a worker thread)."""
    async with await anyio.open_file(path, "rb") as file:
        while chunk := await file.read(CHUNK_SIZE):
            counted(len(chunk))
            yield chunk


async def write_chunks(chunks: AsyncIterable[bytes], file: BinaryIO | None) -> int:
    """Write every chunk to ``file``, or to stdout when None; the number of bytes written."""
    total = 0
    async for chunk in chunks:
        if file is None:
            await write_stdout(chunk)
        else:
            await anyio.to_thread.run_sync(file.write, chunk)
        total += len(chunk)
    if file is not None:
        await anyio.to_thread.run_sync(file.flush)
    return total


async def file_size(path: str) -> int:
    stat = await anyio.Path(path).stat()
    return stat.st_size


def check_output(path: str, *, force: bool, source: str) -> None:
    """Refuse an output that cannot be written, an existing file without --force, or the input.

    A missing directory is caught here, before any work: later, the error
    would name the hidden temporary file the output is written to first.
    """
    target = Path(path)
    parent = target.parent
    if not parent.is_dir():
        reason = "is not a directory" if parent.exists() else "does not exist"
        raise CLIError(
            f"{path}: the directory {str(parent)!r} {reason}",
            hint="create the directory first, or write somewhere else",
            code=ExitCode.IO,
        )
    if target.is_dir():
        raise CLIError(
            f"{path} is a directory",
            hint="give -o the path of a file, not a directory",
            code=ExitCode.IO,
        )
    if not target.exists():
        return
    if source != STDIO and Path(source).exists() and target.samefile(source):
        raise CLIError(
            f"{path} is both the input and the output",
            hint="write to another file, then rename it",
        )
    if not force:
        raise CLIError(f"{path} exists", hint="pass --force to replace it")


def is_temporary_of(name: object, path: str | Path) -> bool:
    """Whether ``name`` is one of the hidden temporary files that become ``path``.

    Those are ``.NAME.*`` beside it: this module's and the library's
    (``.NAME.*.part``), and rewrap's (``.NAME.*.rewrap``, itself written
    through the library's ``..NAME.*.rewrap.*.part``).
    """
    if not isinstance(name, str | os.PathLike):
        return False
    temp, target = Path(name), Path(path)
    stem = target.name.lstrip(".")
    return (
        temp.parent == target.parent
        and temp.name.startswith(".")
        and temp.name.lstrip(".").startswith(f"{stem}.")
    )


@contextlib.contextmanager
def naming(path: str) -> Iterator[None]:
    """Make an OSError about one of ``path``'s temporary files name ``path`` itself.

    The user never sees those hidden files, so "``.out.x1y2.part``: Permission
    denied" would only puzzle them.
    """
    try:
        yield
    except OSError as exc:
        if not is_temporary_of(exc.filename, path):
            raise
        # OSError picks the subclass from the errno, as it did for the original.
        raise OSError(exc.errno, exc.strerror, path) from exc


def replace_file(temp: Path, target: Path, *, mode_of: Path | None = None) -> None:
    """Rename ``temp`` over ``target`` durably (the directory synced too).

    With ``mode_of``, ``temp`` first gets that file's permission bits.
    """
    if mode_of is not None:
        shutil.copymode(mode_of, temp)
    os.replace(temp, target)
    fsync_directory(target.parent)


@contextlib.asynccontextmanager
async def atomic_output(path: str) -> AsyncIterator[BinaryIO]:
    """A file that appears at ``path`` only once the block ends without an error.

    The bytes go to a private temporary file beside ``path`` (mode 0600), which
    is flushed to disk and renamed over ``path`` at the end, or deleted on any
    error or cancellation; ``path`` is left as it was then.
    """
    target = Path(path)
    with naming(path):
        fd, temp_name = await anyio.to_thread.run_sync(
            partial(tempfile.mkstemp, dir=target.parent, prefix=f".{target.name}.", suffix=".part")
        )
    try:
        with naming(path), os.fdopen(fd, "wb") as out:
            yield out
            await anyio.to_thread.run_sync(out.flush)
            await anyio.to_thread.run_sync(os.fsync, out.fileno())
        with naming(path):
            await anyio.to_thread.run_sync(replace_file, Path(temp_name), target)
    except BaseException:
        with contextlib.suppress(OSError):
            # Not awaited: this also runs while the task is being cancelled.
            os.unlink(temp_name)
        raise
