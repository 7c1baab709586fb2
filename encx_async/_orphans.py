"""Keys a new-key rotation made but could not record: find out, and clean up.

A rotation creates a KMS key, points the alias at it, and records it as the
next version, under the store's write lock. When the recording fails (the
database is away, the task is cancelled, the SQLite file was deleted) the key
is of no use, yet the KMS bills it every month until it is deleted. What is
done then, shielded from cancellation and within a bound:

1. the store is asked whether the version was recorded after all (a failure
   can come after the commit: a cancellation while the COMMIT was answered);
2. if it was not, the alias is pointed back where it was (if it still names
   the new key), and the key is scheduled for deletion;
3. a key that could not be scheduled (the provider does not implement
   :class:`~encx_async.kms.KeyDeletion`, the KMS failed, the store could not
   say) is logged with its id and kept, for the next rotation to try again;
   the rotation's error names it in ``orphan_key_ids``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Literal, TypeVar

from ._exceptions import DatabaseUnavailableError, EncxError
from ._keystore import KeyStore, UncommittedError
from ._tasks import to_the_end
from .kms import KeyDeletion, KeyManagementService, KeyRotationService

__all__ = ["DELETION_PENDING_DAYS", "Unrecorded", "create_and_learn_id", "discard"]

logger = logging.getLogger("encx_async.keys")
_T = TypeVar("_T")

#: the shortest waiting period KMS allows: the key is useless, but a mistake
#: in deciding so can still be undone (CancelKeyDeletion) for a week
DELETION_PENDING_DAYS = 7
#: how long a cancelled rotation may wait for the key it was creating
_CREATE_WAIT = 30.0
#: the bound on one clean-up (a store read, an alias check and move, a deletion)
_CLEANUP_TIMEOUT = 60.0

Outcome = Literal["recorded", "scheduled", "kept"]


@dataclass(slots=True)
class Unrecorded:
    """A key a rotation made, and where the alias pointed before."""

    key_id: str
    previous_key_id: str
    alias_moved: bool = False


async def create_and_learn_id(call: Awaitable[str]) -> str:
    """Await a CreateKey; if cancelled meanwhile, still learn the new key's id.

    The request may reach the KMS whatever happens here; a key whose id was
    never seen could not be cleaned up. A cancellation waits (a bounded
    while) for the answer, and the id travels on the CancelledError as
    ``created_key_id``.
    """
    creating = asyncio.ensure_future(call)
    try:
        return await asyncio.shield(creating)
    except asyncio.CancelledError as cancelled:
        key_id = await to_the_end(_answer(creating))
        if key_id is not None:
            cancelled.created_key_id = key_id  # type: ignore[attr-defined]
        raise


async def _answer(creating: asyncio.Future[str]) -> str | None:
    done, _ = await asyncio.wait([creating], timeout=_CREATE_WAIT)
    if not done or creating.cancelled() or creating.exception() is not None:
        creating.cancel()
        return None
    return creating.result()


async def discard(
    kms: KeyManagementService,
    store: KeyStore,
    alias: str,
    key: Unrecorded,
    failure: BaseException | None,
) -> Outcome:
    """Clean up after ``key``: ``"recorded"`` (it is a version after all),
    ``"scheduled"`` (deleted in a week) or ``"kept"`` (logged; try again later)."""
    try:
        async with asyncio.timeout(_CLEANUP_TIMEOUT):
            return await _discard(kms, store, alias, key, failure)
    except (EncxError, TimeoutError) as exc:
        reason = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    logger.warning(
        "KEK %s: rotation made KMS key %s but did not record it, and it could not be "
        "scheduled for deletion (%s); it costs money until deleted: schedule its deletion, "
        "or it is tried again at the next rotation",
        alias,
        key.key_id,
        reason,
    )
    return "kept"


async def _discard(
    kms: KeyManagementService,
    store: KeyStore,
    alias: str,
    key: Unrecorded,
    failure: BaseException | None,
) -> Outcome:
    try:
        versions = await store.versions(alias)
    except DatabaseUnavailableError:
        if not isinstance(failure, UncommittedError):
            raise  # cannot tell: deleting a recorded key would be far worse than keeping it
        versions = []
    if any(v.key_id == key.key_id for v in versions):
        return "recorded"
    if not isinstance(kms, KeyDeletion):
        raise _NoDeletion(f"{type(kms).__name__} does not implement KeyDeletion")
    # The alias goes back only if it names the new key still: another rotation
    # may have moved it since.
    if (
        key.alias_moved
        and isinstance(kms, KeyRotationService)
        and await kms.get_key_id(alias) == key.key_id
    ):
        active = [v.key_id for v in versions if v.state == "active"]
        await kms.update_alias(alias, active[-1] if active else key.previous_key_id)
    await kms.schedule_key_deletion(key.key_id, pending_days=DELETION_PENDING_DAYS)
    logger.warning(
        "KEK %s: rotation made KMS key %s but did not record it; scheduled its deletion in %d days",
        alias,
        key.key_id,
        DELETION_PENDING_DAYS,
    )
    return "scheduled"


class _NoDeletion(EncxError):
    """Internal: the provider cannot schedule deletions. Logged, never raised out."""
