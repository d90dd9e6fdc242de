"""Helpers of benchmarks/bench_peers.py (moeflux's MoE layer against peer libraries), one purpose each:

- spec: the layer shape and the ONE set of weights and inputs every library gets (canonical layout);
- base: what a built layer offers the harness (a timed step, gradients in the canonical layout);
- moeflux_layer, hf_mixtral, torchtitan_moe, deepspeed_moe: build one library's layer with those weights
  (a library that cannot be imported or built raises base.Unavailable with a one-line reason);
- floor: the expert GEMMs alone (forward + backward over the same segment sizes), and moeflux's expert FFN
  op alone;
- suite: build a list of layers, one step each for the agreement, then interleaved timing (one process or
  every rank of a group);
- timing: interleaved rounds, order rotated each round; median and min-max;
- agreement: max abs differences of outputs and gradients against moeflux;
- ranks: the 2-rank gloo part (expert parallelism), run on spawned processes;
- report: JSON, markdown table and PNG.
"""
