"""The engine library: model, paged KV cache, scheduler, sampler and per-head telemetry.

Nothing here imports fastapi, pydantic, prometheus_client or server.api.
"""
