"""``encx-async bench``: the DEK cache benchmark of a source checkout, run as is."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence

from ._errors import CLIError
from ._kms import MOTO_HINT

__all__ = ["bench"]

_MODULE = "benchmarks.cache"


def bench(argv: Sequence[str]) -> int:
    """Hand ``argv`` to ``benchmarks.cache.main``; its exit status."""
    try:
        module = importlib.import_module(_MODULE)
    except ImportError as exc:
        if exc.name in ("benchmarks", _MODULE):
            raise CLIError(
                "the benchmark is not installed: it ships with a source checkout of "
                "encx-async, not with the package",
                hint='in a checkout, pip install -e ".[dev]" and run encx-async bench '
                "(or python -m benchmarks.cache) from its root",
            ) from exc
        if exc.name is not None and exc.name.split(".")[0] in ("moto", "flask", "werkzeug"):
            raise CLIError(
                f"the benchmark needs moto, which is not installed (no module {exc.name!r})",
                hint=MOTO_HINT,
            ) from exc
        raise
    main: Callable[[Sequence[str]], int] | None = getattr(module, "main", None)
    if not callable(main):
        raise CLIError(
            f"{_MODULE} has no main(): this is not encx-async's benchmark",
            hint="run encx-async bench from the root of an encx-async checkout",
        )
    return int(main(list(argv)))
