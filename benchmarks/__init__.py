"""Benchmarks for encx-async.

* ``python -m benchmarks.core``: the per-message cost of the low- and high-level
  APIs against bare AES-GCM, and how long large payloads stall the event loop.
* ``python -m benchmarks.cache``: what the DEK cache saves in KMS calls, time and
  money, and how encx-async compares with the AWS Encryption SDK's caching CMM.

Both start an in-process moto server when they need a KMS, so they run offline.
"""
