"""The worker side of the drain: a vLLM worker extension answering collective_rpc.

Start vLLM with `--worker-extension-cls server.vllm_plugin.worker.HeadwiseWorkerExtension`
(offline: `LLM(..., worker_extension_cls=...)`). The API process then calls
`collective_rpc("headwise_snapshot")` and every rank answers with a RankReport in wire form:
the cumulative per-(layer, head) sums of the layers it runs. Sums are cumulative, never reset,
so a lost or repeated RPC loses nothing (and no inference-mode tensor is modified from the RPC
thread). Chosen over shared memory because vLLM routes it to every rank of every parallel layout
through its own channel, and a rank that cannot answer surfaces as an error, which the API
process turns into headwise_telemetry_up 0.
"""

from __future__ import annotations

from server.vllm_plugin.snapshot import LayerReport, RankReport
from server.vllm_plugin.settings import PluginSettings

SNAPSHOT_METHOD = "headwise_snapshot"


class HeadwiseWorkerExtension:
    """Mixed into vLLM's worker class by vLLM itself (ParallelConfig.worker_extension_cls)."""

    def headwise_snapshot(self) -> dict:
        from vllm.distributed import get_tensor_model_parallel_rank
        from vllm.model_executor.layers.attention import Attention
        from vllm.model_executor.models.utils import extract_layer_index

        rank = get_tensor_model_parallel_rank()
        layers: list[LayerReport] = []
        stock: list[str] = []
        settings = PluginSettings.from_env()
        for name, module in self.vllm_config.compilation_config.static_forward_context.items():
            if not isinstance(module, Attention):
                continue
            state = getattr(getattr(module, "impl", None), "headwise", None)
            if state is None:
                stock.append(name)
                continue
            h = state.spec.num_heads
            layers.append(LayerReport.from_stats(extract_layer_index(name), rank * h, state.snapshot(),
                                                 state.disabled))
        return RankReport(rank=rank, buckets=settings.buckets, sample_rate=settings.sample_rate,
                          layers=tuple(sorted(layers, key=lambda r: r.layer)), stock_layers=tuple(stock)).to_wire()
