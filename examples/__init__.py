"""Runnable example services built on encx-async.

* :mod:`examples.fastapi_service`: a FastAPI user store (``python -m examples.fastapi_service``);
* :mod:`examples.aiohttp_service`: the same on aiohttp (``python -m examples.aiohttp_service``);
* :mod:`examples.s3_stream`: an aiohttp service that streams uploads, encrypted, into S3
  and back (``python -m examples.s3_stream``);
* :mod:`examples.users`: what the user stores share: settings from the environment, the user
  model with encrypted and blind-indexed fields, and the SQLite store.
"""
