"""The public surface: a complete, sorted __all__ and the documented error tree."""

from __future__ import annotations

import inspect

import encx_async
from encx_async import _exceptions


def test_all_is_sorted_and_complete() -> None:
    names = encx_async.__all__

    def isort_style(name: str) -> tuple[int, str]:  # constants, classes, then functions
        return (0 if name.isupper() else 1 if name[:1].isupper() else 2, name)

    assert names == sorted(names, key=isort_style)
    public = {
        name
        for name, value in vars(encx_async).items()
        if not name.startswith("_") and not inspect.ismodule(value) and name != "annotations"
    }
    assert public | {"__version__"} == set(names)


def test_every_error_is_an_encx_error_and_in_the_docstring() -> None:
    doc = _exceptions.__doc__ or ""
    for name in _exceptions.__all__:
        error = getattr(_exceptions, name)
        assert issubclass(error, encx_async.EncxError)
        assert name in doc, f"{name} is missing from the tree in the docstring"
        assert getattr(encx_async, name) is error


def test_input_errors_are_value_errors() -> None:
    assert issubclass(encx_async.ConfigurationError, ValueError)
    assert issubclass(encx_async.KMSRegionMismatchError, ValueError)
    assert issubclass(encx_async.KeyVersionNotFoundError, encx_async.DecryptionError)
