"""moto's KMS server in this process, on 127.0.0.1 and a port the OS picks.

For the ``encx-async demo`` and ``--kms moto`` commands and the benchmarks: a
stand-in for AWS KMS that needs no account. moto is not a dependency of the
library; ``pip install "encx-async[moto]"`` brings it.
"""

from __future__ import annotations

import logging
import os
from types import TracebackType
from typing import TYPE_CHECKING, Self

if TYPE_CHECKING:
    from moto.server import ThreadedMotoServer

__all__ = ["MotoServer", "use_fake_credentials"]

_FAKE_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def use_fake_credentials() -> None:
    """Give botocore moto's dummy credentials and region, unless some are set already.

    Only a process with no credentials of its own is changed, so a developer's
    real keys are never overwritten (moto accepts any keys anyway).
    """
    if not (os.environ.get("AWS_ACCESS_KEY_ID") or os.environ.get("AWS_PROFILE")):
        os.environ["AWS_ACCESS_KEY_ID"] = _FAKE_ENV["AWS_ACCESS_KEY_ID"]
        os.environ["AWS_SECRET_ACCESS_KEY"] = _FAKE_ENV["AWS_SECRET_ACCESS_KEY"]
    if not (os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION")):
        os.environ["AWS_DEFAULT_REGION"] = _FAKE_ENV["AWS_DEFAULT_REGION"]


class MotoServer:
    """``moto.server.ThreadedMotoServer`` on 127.0.0.1 and a port the OS picks.

    Use it as a context manager; :attr:`endpoint_url` is valid inside. The
    server runs in a daemon thread of this process, so its request handling
    shares the GIL with the code being measured, as a sidecar would share a core.
    :meth:`start` raises ``ImportError`` when moto (with its server extra) is
    not installed.
    """

    def __init__(self) -> None:
        self._server: ThreadedMotoServer | None = None
        self.endpoint_url = ""

    def start(self) -> str:
        from moto.server import ThreadedMotoServer

        use_fake_credentials()
        # werkzeug logs every request at INFO to stderr unless told otherwise.
        logging.getLogger("werkzeug").setLevel(logging.WARNING)
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        self._server = server
        host, port = server.get_host_and_port()
        self.endpoint_url = f"http://{host}:{port}"
        return self.endpoint_url

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.stop()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
