"""Benchmarks for encx-async.

* ``python -m benchmarks.core``: the per-message cost of the low- and high-level
  APIs against bare AES-GCM, and how long large payloads stall the event loop.
* ``python -m benchmarks.cache``: what the DEK cache saves in KMS calls, time and
  money, and how encx-async compares with the AWS Encryption SDK's caching CMM.
* ``python -m benchmarks.hashing``: blind indexes against raw HMAC, and Argon2id.
* ``python -m benchmarks.load``: the FastAPI example service under load.
* ``python -m benchmarks.stream``: streaming memory and throughput.
* ``python -m benchmarks.soak``: a long mixed run with KEK rotations and a KMS
  outage, every record written checked at the end.

Each starts an in-process moto server when it needs a KMS, so they run offline.
"""
