"""Every Python snippet of the README runs, in the order a reader meets them, and the
expert-parallel ones compose: the layer of the expert-parallel example goes into the
DataParallel, balancing and profiling examples on 2 gloo ranks. The names the text
leaves to the reader (the tokens `x`, a `model`, an `optimizer`, a `loss_fn`, a
`loader`, a pretrained model) are defined here, small."""

from __future__ import annotations

import re
import socket
from pathlib import Path

import pytest
import torch

import moeflux
from multiprocess import run_ranks

README = Path(__file__).resolve().parent.parent / "README.md"


def python_snippets() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def snippet_with(*needles: str) -> str:
    found = [s for s in python_snippets() if all(n in s for n in needles)]
    assert len(found) == 1, f"expected one README snippet with {needles}, found {len(found)}"
    return found[0]


def test_every_snippet_is_run_here():
    snippets = python_snippets()
    covered = [SINGLE_PROCESS, *[needles for needles, _ in DISTRIBUTED]]
    assert len(snippets) == len(covered), "a README snippet that no test runs (or one that is gone)"
    for needles in covered:
        snippet_with(*needles)


SINGLE_PROCESS = ("class Block", "moeflux.aux_loss(model)")


def test_use_it_snippet():
    namespace: dict = {}
    exec(compile(snippet_with(*SINGLE_PROCESS), "README.md", "exec"), namespace)
    assert namespace["y"].shape == (4, 128, 512)
    assert all(p.grad is not None for p in namespace["model"].mlp.parameters() if p.requires_grad)


def _tiny_pretrained_model():
    """What `AutoModelForCausalLM.from_pretrained(...)` gives the HF snippet: a small Qwen3-MoE."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(0)
    config = Qwen3MoeConfig(vocab_size=64, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, num_experts=4,
                            num_experts_per_tok=2, decoder_sparse_step=1, mlp_only_layers=[])
    return Qwen3MoeForCausalLM(config)


class _Transformers:
    class AutoModelForCausalLM:
        @staticmethod
        def from_pretrained(*args, **kwargs):
            return _tiny_pretrained_model()


def _before_expert_parallel(ns: dict, rank: int) -> None:
    ns["x"] = torch.randn(24 + 8 * rank, 512)  # this rank's tokens: a different number on each rank


def _before_balancing(ns: dict, rank: int) -> None:
    ns["model"] = torch.nn.Sequential(torch.nn.Linear(512, 512), ns["moe"])  # the expert-parallel layer inside
    ns["optimizer"] = torch.optim.AdamW(ns["model"].parameters(), lr=1e-3)


def _before_data_parallel(ns: dict, rank: int) -> None:
    ns["loss_fn"] = lambda out, target: (out - target).square().mean()
    for name in ("x", "y", "x2", "y2"):
        ns[name] = torch.randn(16 + 4 * rank, 512)


def _before_profiling(ns: dict, rank: int) -> None:
    ns["loader"] = range(2)


def _before_hf(ns: dict, rank: int) -> None:
    pytest.importorskip("transformers")
    ns["transformers"] = _Transformers


DISTRIBUTED = [
    (("init_process_group", "init_expert_parallel"), _before_expert_parallel),
    (("ShadowCostModel", "ExpertReplacement"), _before_balancing),
    (("moeflux.DataParallel(model)", "no_sync"), _before_data_parallel),
    (("comm_stats", "stats.table()"), _before_profiling),
    (("convert_model", "revert_model"), _before_hf),
]


def _run_snippets_on_a_rank(rank: int, world: int, port: int) -> dict:
    import os

    import torch.distributed as dist

    dist.destroy_process_group()  # the README's snippet makes its own, from the environment torchrun would set
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.manual_seed(rank)
    ns: dict = {}
    for needles, before in DISTRIBUTED:
        before(ns, rank)
        exec(compile(snippet_with(*needles), "README.md", "exec"), ns)
    return {"experts_here": ns["moe"].experts.w_in.shape[0], "table": ns["stats"].table(),
            "reverted": type(ns["model"].module).__name__,
            "moe_blocks_left": sum(isinstance(m, moeflux.MoE) for m in ns["model"].modules())}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_expert_parallel_snippets_compose_on_2_ranks():
    pytest.importorskip("transformers")
    results = run_ranks(2, _run_snippets_on_a_rank, _free_port())
    for result in results:
        assert result["experts_here"] == 8  # 16 experts over 2 ranks
        assert result["reverted"] == "Qwen3MoeForCausalLM" and result["moe_blocks_left"] == 0
    print(results[0]["table"])
