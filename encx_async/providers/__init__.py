"""Key management services that :class:`~encx_async.Crypto` can wrap data keys with.

* :mod:`encx_async.providers.aws`: AWS KMS through aiobotocore, for production.
* :mod:`encx_async.providers.local`: an in-process stand-in for development,
  demos and tests; never for production.

Import the provider you need from its own module, so that importing this
package never pulls in aiobotocore by accident.
"""

from __future__ import annotations

__all__: list[str] = []
