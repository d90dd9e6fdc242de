"""moeflux: a drop-in Mixture-of-Experts layer for PyTorch on C++/CUDA ops.

    import moeflux
    mlp = moeflux.MoE(d_model=512, d_ffn=1024, num_experts=8, top_k=2)
    y = mlp(x)                                  # x: [..., 512]
    loss = task_loss + moeflux.aux_loss(model)  # load balancing

The ops are ``torch.ops.moeflux.*``; :mod:`moeflux.ops` has typed wrappers.
"""

import torch  # noqa: F401  (the extension links against torch's libraries)

from . import _C, balance, ops
from .balance import FixedShadows, ShadowCostModel
from .instrumentation import CommStats, comm_stats
from .data_parallel import CommHookState, DataParallel
from .distributed import ExpertParallelGroups, init_expert_parallel
from .exchange import ExchangeConfig
from .experts import GroupedExperts, SharedExpert
from .moe import ExpertParameter, MoE, aux_loss, expert_parameters
from .placement import ExpertPlacement
from .replacement import ExpertReplacement, Replacement
from .router import Router, Routing
from .sample_placement import SampleOrder, SamplePlacement
from .topology import NodeGroups, init_node_groups

__all__ = [
    "MoE",
    "ExchangeConfig",
    "Router",
    "Routing",
    "GroupedExperts",
    "SharedExpert",
    "aux_loss",
    "expert_parameters",
    "ExpertParameter",
    "ExpertPlacement",
    "ShadowCostModel",
    "FixedShadows",
    "ExpertReplacement",
    "Replacement",
    "balance",
    "ops",
    "init_expert_parallel",
    "ExpertParallelGroups",
    "init_node_groups",
    "NodeGroups",
    "SamplePlacement",
    "SampleOrder",
    "DataParallel",
    "CommHookState",
    "cuda_kernels_built",
    "comm_stats",
    "CommStats",
]
__version__ = "0.1.0"


def cuda_kernels_built() -> bool:
    """Whether this build of moeflux contains the CUDA kernels."""
    return bool(_C.with_cuda)
