"""What a process started by ``os.fork()`` must not keep of its parent: live data keys.

A forked child starts with a copy of its parent's memory, cached DEKs and their
use counts included. Were both processes to go on using such a key, each would
count its own uses, so the key's message limit, which bounds the chance of two
random nonces colliding, would hold in neither. Objects that hold keys register
here, and in every child, before the code that called ``fork()`` resumes, each
forgets its keys. Registration is weak: it keeps nothing alive.
"""

from __future__ import annotations

import os
import weakref
from typing import Protocol

__all__ = ["forget_in_child"]


class _Forgetful(Protocol):
    def _after_fork_in_child(self) -> None: ...


_live: weakref.WeakSet[_Forgetful] = weakref.WeakSet()


def forget_in_child(obj: _Forgetful) -> None:
    """Have ``obj._after_fork_in_child()`` run in each child forked from now on."""
    _live.add(obj)


def _after_fork_in_child() -> None:
    for obj in list(_live):
        obj._after_fork_in_child()


if hasattr(os, "register_at_fork"):  # not on Windows, which has no fork
    # Once per interpreter, at import; a child inherits the registration.
    os.register_at_fork(after_in_child=_after_fork_in_child)
