"""The ``encx-async`` command line (also ``python -m encx_async``).

``main`` parses the arguments, runs one command on a fresh event loop, and
turns every failure into one error line, one hint line and an exit code
(:class:`~encx_async._cli._errors.ExitCode`); docs/cli.md is the reference.
"""

from ._main import main

__all__ = ["main"]
