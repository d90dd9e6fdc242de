"""moeflux.hf over the transformers MoE families: every supported family converts
expert-parallel on 2 ranks with the transformers model's logits and gradients
(and reverts bit for bit), and the MoE blocks of the others are found, by what
they hold as well as by name, and refused naming each block and why, with
nothing replaced. Dense models and non-MoE blocks are left alone."""

from __future__ import annotations

import copy
import traceback

import pytest
import torch
import torch.distributed as dist

transformers = pytest.importorskip("transformers")

import moeflux  # noqa: E402
import test_hf  # noqa: E402  (the supported families' tiny models; imported as a module: its tests are not rerun)
from moeflux import hf  # noqa: E402
from multiprocess import GROUP_TIMEOUT, run_ranks  # noqa: E402

COMMON = test_hf.COMMON
ROPE = test_hf.ROPE


def phimoe():
    return transformers.PhimoeForCausalLM(transformers.PhimoeConfig(
        **COMMON, intermediate_size=16, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2))


def dbrx():
    return transformers.DbrxForCausalLM(transformers.DbrxConfig(
        d_model=32, n_heads=4, n_layers=2, max_seq_len=64, vocab_size=64,
        attn_config={"kv_n_heads": 2, "rope_theta": 10000.0},
        ffn_config={"ffn_hidden_size": 16, "moe_num_experts": 4, "moe_top_k": 2}, rope_parameters=ROPE))


def jetmoe():  # mixture of experts in the MLP and of attention heads (MoA)
    return transformers.JetMoeForCausalLM(transformers.JetMoeConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_key_value_heads=2, kv_channels=8, intermediate_size=16,
        num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=64))


def layers(prefix, attr, n=2):
    return ", ".join(f"{prefix}.{i}.{attr}" for i in range(n))


UNSUPPORTED = {  # name -> (model, the message naming every block and why)
    "Phi-MoE": (phimoe, rf"{layers('model.layers', 'mlp')} \(PhimoeSparseMoeBlock\): Phi-MoE is not supported: its "
                        r"sparsemixer router .* Gumbel sampling while training .*\(PhimoeMultiplier\)"),
    "Llama 4 (top-2)": (lambda: test_hf.llama4(top_k=2),
                        rf"{layers('model.layers', 'feed_forward')} \(Llama4TextMoe\): num_experts_per_tok=2: "
                        r"Llama 4 scales each expert's input by its sigmoid weight; moeflux's weight_expert_input "
                        r"needs num_experts_per_tok=1"),
    "MiniMax-M2 (router_jitter_noise)": (lambda: test_hf.minimax_m2(router_jitter_noise=0.1),
                                         rf"{layers('model.layers', 'mlp')} \(MiniMaxM2SparseMoeBlock\): "
                                         r"router_jitter_noise=0.1 jitters the experts' input"),
    "DBRX": (dbrx, rf"{layers('transformer.blocks', 'ffn')} \(DbrxFFN\): DBRX is not supported"),
    "JetMoE": (jetmoe, rf"{layers('model.layers', 'mlp')} \(JetMoeMoE\): JetMoE is not supported: its MLP block "
                       r"adds a bias(.|\n)*"
                       rf"{layers('model.layers', 'self_attention')} \(JetMoeAttention\): JetMoE's mixture of "
                       r"attention experts \(JetMoeMoA\) is not supported"),
    "DeepSeek-V2 (mlp_bias)": (lambda: test_hf.deepseek_v2(mlp_bias=True),
                               r"^model\.layers\.1\.mlp \(DeepseekV2Moe\): mlp_bias=True: its shared experts have "
                               r"biases"),
    "DeepSeek-V2 (noaux_tc)": (lambda: test_hf.deepseek_v2("noaux_tc"),
                               r"^model\.layers\.1\.mlp \(DeepseekV2Moe\): topk_method='noaux_tc' is not supported"),
}


def module_types(model):
    return [(name, type(m)) for name, m in model.named_modules()]


@pytest.mark.parametrize("family", UNSUPPORTED)
def test_unsupported_families_are_refused_naming_every_block(family):
    build, message = UNSUPPORTED[family]
    torch.manual_seed(0)
    model = build()
    before = module_types(model)
    with pytest.raises(hf.UnsupportedBlockError, match=message):
        hf.convert_model(model)
    assert module_types(model) == before  # nothing replaced


def test_a_supported_block_next_to_an_unsupported_one_is_not_converted_either():
    torch.manual_seed(0)
    model = test_hf.qwen3_moe()
    model.model.layers[1].mlp = phimoe().model.layers[1].mlp
    before = module_types(model)
    with pytest.raises(hf.UnsupportedBlockError,
                       match=r"^model\.layers\.1\.mlp \(PhimoeSparseMoeBlock\): Phi-MoE") as e:
        hf.convert_model(model)
    assert "layers.0" not in str(e.value) and module_types(model) == before


def test_blocks_are_found_by_what_they_hold():
    class Router(torch.nn.Module):  # no MoE-like class name anywhere
        pass

    class FeedForward(torch.nn.Module):
        def __init__(self, experts):
            super().__init__()
            self.router, self.experts = Router(), experts

    class Layer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.ffn, self.other = FeedForward(torch.nn.ModuleList()), torch.nn.Linear(2, 2)
            self.bank = torch.nn.Sequential(Router(), type("TokenExperts", (torch.nn.Module,), {})())

    model = torch.nn.Sequential(Layer(), Layer())
    with pytest.raises(hf.UnsupportedBlockError) as e:
        hf.convert_model(model)
    assert str(e.value).startswith("0.ffn, 1.ffn (FeedForward): not a supported MoE block")
    assert "\n0.bank, 1.bank (Sequential): not a supported MoE block" in str(e.value)
    assert "other" not in str(e.value) and "experts" not in str(e.value)  # nothing inside a block, nothing else


@pytest.mark.parametrize("build", [
    lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(**COMMON, intermediate_size=16,
                                                                   num_key_value_heads=2)),
    lambda: transformers.Qwen3MoeForCausalLM(transformers.Qwen3MoeConfig(  # only dense layers
        **COMMON, intermediate_size=48, moe_intermediate_size=24, num_key_value_heads=2, head_dim=8, num_experts=8,
        num_experts_per_tok=2, mlp_only_layers=[0, 1])),
], ids=["Llama", "Qwen3-MoE with mlp_only_layers"])
def test_dense_models_are_left_alone(build):
    model = build()
    before = copy.deepcopy(model)
    assert hf.convert_model(model) == [] and hf.revert_model(model) == []
    test_hf.assert_same_tensors(model, before)
    assert module_types(model) == module_types(before)


# ---- every supported family, expert-parallel on 2 ranks (spawned once; each test reports one family)


def check_expert_parallel(family, groups):
    """Same logits and gradients as the transformers model on each rank's own batch (the experts' gradients
    summed over the ranks), this rank holding half of the experts; then revert_model gives the model back."""
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)  # the same model on every rank
    reference = test_hf.MODELS[family]()
    reference.set_experts_implementation("eager")
    original = copy.deepcopy(reference)
    model = copy.deepcopy(reference)
    report = hf.convert_model(model, ep_group=groups)
    moes = {name: model.get_submodule(name) for name, _ in report}
    assert moes and all(m.ep_size == world and m.experts.num_experts == m.num_experts // world for m in moes.values())

    gen = torch.Generator().manual_seed(10 + rank)
    ids, targets = torch.randint(0, 64, (2, 10), generator=gen), torch.randint(0, 64, (2, 10), generator=gen)
    expected, got = test_hf.run(reference, ids, targets), test_hf.run(model, ids, targets)
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=2e-5)

    theirs = dict(reference.named_parameters())
    for name, p in model.named_parameters():
        other, transform = test_hf.hf_name(name, theirs, family)
        ref_grad = theirs[other].grad if theirs[other].grad is not None else torch.zeros_like(theirs[other])
        if transform is not None:  # an expert weight: every rank's tokens reach it; this rank holds some rows
            dist.all_reduce(ref_grad)
            moe = moes[name.rsplit(".experts.", 1)[0]]
            ref_grad = transform(ref_grad)[list(moe.experts.global_experts)]
        grad = p.grad if p.grad is not None else torch.zeros_like(p)
        torch.testing.assert_close(grad, ref_grad, atol=1e-6, rtol=1e-5, msg=lambda m: f"{name}: {m}")

    model.zero_grad(set_to_none=True)
    assert hf.revert_model(model) == report  # collective: gathers the experts
    test_hf.assert_same_tensors(model, original)


def check_uneven_split_is_refused_before_anything_is_replaced(groups):
    model = test_hf.mixtral(num_local_experts=3)
    before = module_types(model)
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp, model\.layers\.1\.mlp: the number of experts is "
                                         r"not a multiple of the expert-parallel size \(2\)"):
        hf.convert_model(model, ep_group=groups)
    assert module_types(model) == before


UNEVEN = "3 experts on 2 ranks"
EXPERT_PARALLEL_CHECKS = [*test_hf.MODELS, UNEVEN]


def expert_parallel_worker(rank, world, checks):
    groups = moeflux.init_expert_parallel(world, timeout=GROUP_TIMEOUT)
    results, failed = {}, None
    for check in checks:
        if failed is not None:
            results[check] = ("skipped", f"not run: {failed} failed first")
            continue
        try:
            if check == UNEVEN:
                check_uneven_split_is_refused_before_anything_is_replaced(groups)
            else:
                check_expert_parallel(check, groups)
            results[check] = ("ok", None)
        except Exception:  # noqa: BLE001 - reported by this family's test
            results[check] = ("error", traceback.format_exc())
        flags = [None] * world
        dist.all_gather_object(flags, results[check][0] == "error")
        if any(flags):  # the ranks stop together, so no collective waits for a rank that gave up
            failed = check
    return results


@pytest.fixture(scope="module")
def expert_parallel_results():
    return run_ranks(2, expert_parallel_worker, EXPERT_PARALLEL_CHECKS)


@pytest.mark.parametrize("check", EXPERT_PARALLEL_CHECKS)
def test_every_family_converts_expert_parallel_on_two_ranks(expert_parallel_results, check):
    for rank, results in enumerate(expert_parallel_results):
        status, detail = results[check]
        assert status == "ok", f"rank {rank}: {detail}"
