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

from server.vllm_plugin.layer import LayerTelemetry
from server.vllm_plugin.paged import StepSampler
from server.vllm_plugin.snapshot import LayerReport, RankReport
from server.vllm_plugin.settings import PluginSettings

SNAPSHOT_METHOD = "headwise_snapshot"
SET_RATE_METHOD = "headwise_set_sample_rate"


class HeadwiseWorkerExtension:
    """Mixed into vLLM's worker class by vLLM itself (ParallelConfig.worker_extension_cls)."""

    def headwise_set_sample_rate(self, rate: float) -> int:
        """Change the fraction of steps that compute telemetry from now on (a check or a benchmark
        sets 1.0; 0 stops the computation). Returns the number of layers changed."""
        rate = StepSampler(float(rate)).rate                            # validates 0..1
        layers = self._headwise_layers().values()
        for state in layers:                                            # all restart at step 0: still in step
            state.sampler = StepSampler(rate)
        return len(layers)

    def headwise_snapshot(self) -> dict:
        from vllm.distributed import get_tensor_model_parallel_rank
        from vllm.model_executor.models.utils import extract_layer_index

        rank = get_tensor_model_parallel_rank()
        stock: list[str] = []
        found = self._headwise_layers(stock)
        layers = [LayerReport.from_stats(extract_layer_index(name), rank * state.spec.num_heads, state.snapshot(),
                                         state.disabled) for name, state in found.items()]
        rate = next(iter(found.values())).sampler.rate if found else 0.0
        return RankReport(rank=rank, buckets=PluginSettings.from_env().buckets, sample_rate=rate,
                          layers=tuple(sorted(layers, key=lambda r: r.layer)), stock_layers=tuple(stock)).to_wire()

    def _headwise_layers(self, stock: list[str] | None = None) -> dict[str, LayerTelemetry]:
        """Attention layer name -> its LayerTelemetry; names of layers without one go to stock."""
        from vllm.model_executor.layers.attention import Attention

        found: dict[str, LayerTelemetry] = {}
        for name, module in self.vllm_config.compilation_config.static_forward_context.items():
            if not isinstance(module, Attention):
                continue
            state = getattr(getattr(module, "impl", None), "headwise", None)
            if isinstance(state, LayerTelemetry):
                found[name] = state
            elif stock is not None:
                stock.append(name)
        return found
