"""Cheap α-β cost model of expert-parallel MoE communication (numpy only: no torch, no extension).

Used as a simulator for clusters of 16-1024 GPUs (``python -m moeflux.sim``) and at runtime for decisions
(which experts to shadow, whether re-placing experts pays), so every cost function is vectorised over leading
batch dimensions.

- :mod:`.links`: :class:`LinkClass` (α, β) with public-spec presets, :class:`Topology`.
- :mod:`.cost_model`: all-to-all (direct, hierarchical), ring all-reduce, a step's time.
- :mod:`.routing`: token-slot counts (uniform, zipf, recorded traces: ``save_trace`` / ``load_trace``) and the
  traffic matrices they imply for a placement.
- :mod:`.calibrate`: fit link parameters to measured all-to-alls.
"""

from .calibrate import (FittedLinks, Measurement, RoutingSpec, fit, load_fitted, load_measurements, predict,
                        save_fitted)
from .cost_model import (AllToAllBreakdown, StepTime, algbw, all_to_all_breakdown, all_to_all_phases,
                         all_to_all_time, busbw_from_algbw, moe_layer_all_to_all_time, ring_all_reduce_time,
                         pipelined_layer_time, step_time, uniform_all_to_all_time, uniform_traffic)
from .links import ETH_1G, ETH_10G, ETH_25G, ETH_100G, IB_400G, LINK_PRESETS, NVLINK_H100, LinkClass, Topology
from .routing import (DEFAULT_TRACE_PATH, LoadStats, RoutingTrace, expert_ranks, load_stats, load_trace,
                      node_dedup, save_trace, scale_counts, traffic_matrix, uniform, zipf)

__all__ = [
    "LinkClass", "Topology", "LINK_PRESETS", "NVLINK_H100", "IB_400G", "ETH_100G", "ETH_25G", "ETH_10G", "ETH_1G",
    "AllToAllBreakdown", "StepTime", "all_to_all_time", "all_to_all_breakdown", "all_to_all_phases",
    "uniform_traffic", "uniform_all_to_all_time", "algbw", "busbw_from_algbw", "ring_all_reduce_time",
    "moe_layer_all_to_all_time", "step_time", "pipelined_layer_time",
    "DEFAULT_TRACE_PATH", "RoutingTrace", "LoadStats", "load_trace", "save_trace", "expert_ranks",
    "traffic_matrix", "node_dedup", "uniform", "zipf", "scale_counts", "load_stats",
    "RoutingSpec", "Measurement", "FittedLinks", "fit", "predict", "load_measurements", "load_fitted", "save_fitted",
]
