"""Prometheus exposition: the only importer of prometheus_client; owns its CollectorRegistry.

Histogram boundaries live here so that the load-test client (loadtests/) bins its own
observations exactly as the server does, and server- and client-side percentiles compare.
"""

from __future__ import annotations

# Time to first token (seconds): from a millisecond on a GPU to minutes on a loaded CPU.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                10.0, 20.0, 40.0, 80.0, 160.0, 640.0)
# Inter-token latency and time per output token (seconds).
TOKEN_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75,
                         1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
# Whole-request intervals: end-to-end, queue, prefill, decode (seconds).
REQUEST_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0,
                           20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
# Sampled attention time of one layer in one step (seconds).
ATTENTION_TIME_BUCKETS = (1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2,
                          5e-2, 0.1, 0.25)
