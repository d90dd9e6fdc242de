"""moeflux.hf: small random transformers models of every supported family give
the same logits and gradients with their MoE blocks converted to moeflux."""

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

import moeflux  # noqa: E402
from moeflux import hf  # noqa: E402

COMMON = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64)


def mixtral():
    return transformers.MixtralForCausalLM(transformers.MixtralConfig(
        **COMMON, intermediate_size=24, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2))


def qwen2_moe(norm_topk_prob=False):
    return transformers.Qwen2MoeForCausalLM(transformers.Qwen2MoeConfig(
        **COMMON, intermediate_size=48, moe_intermediate_size=24, shared_expert_intermediate_size=40,
        num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, norm_topk_prob=norm_topk_prob,
        decoder_sparse_step=1))


def qwen3_moe():
    return transformers.Qwen3MoeForCausalLM(transformers.Qwen3MoeConfig(
        **COMMON, intermediate_size=48, moe_intermediate_size=24, num_key_value_heads=2, head_dim=8, num_experts=8,
        num_experts_per_tok=3, norm_topk_prob=True, decoder_sparse_step=1))


def olmoe():
    return transformers.OlmoeForCausalLM(transformers.OlmoeConfig(
        **COMMON, intermediate_size=24, num_key_value_heads=4, num_experts=4, num_experts_per_tok=2))


def deepseek_v3():
    model = transformers.DeepseekV3ForCausalLM(transformers.DeepseekV3Config(
        **COMMON, intermediate_size=48, moe_intermediate_size=16, num_key_value_heads=4, n_routed_experts=8,
        num_experts_per_tok=3, n_group=4, topk_group=2, n_shared_experts=1, first_k_dense_replace=1,
        q_lora_rank=None, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8,
        routed_scaling_factor=2.5, norm_topk_prob=True))
    with torch.no_grad():  # a non-zero correction bias, as a trained model has
        for layer in model.model.layers:
            if hasattr(layer.mlp, "gate"):
                layer.mlp.gate.e_score_correction_bias.copy_(torch.randn(8) * 0.1)
    return model


FAMILIES = {"Mixtral": mixtral, "Qwen2-MoE": qwen2_moe, "Qwen2-MoE (norm_topk_prob)": lambda: qwen2_moe(True),
            "Qwen3-MoE": qwen3_moe, "OLMoE": olmoe, "DeepSeek-V3": deepseek_v3}

# moeflux parameter name -> (transformers name, transform)
RENAMES = [("mlp.router.weight", "mlp.gate.weight", None),
           ("mlp.experts.w_in", "mlp.experts.gate_up_proj", lambda t: t.transpose(1, 2)),
           ("mlp.experts.w_out", "mlp.experts.down_proj", lambda t: t.transpose(1, 2)),
           ("mlp.shared_expert.gate.weight", "mlp.shared_expert_gate.weight", None)]


def hf_name(name, hf_names):
    for ours, theirs, transform in RENAMES:
        if name.endswith(ours):
            return name[: -len(ours)] + theirs, transform
    if ".mlp.shared_expert." in name and name.replace(".mlp.shared_expert.", ".mlp.shared_experts.") in hf_names:
        return name.replace(".mlp.shared_expert.", ".mlp.shared_experts."), None
    return name, None


def run(model, ids, targets):
    model.zero_grad()
    logits = model(ids).logits
    torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), targets.flatten()).backward()
    return logits.detach().float()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("family", FAMILIES)
def test_converted_model_gives_the_same_logits_and_gradients(family, dtype):
    torch.manual_seed(0)
    reference = FAMILIES[family]().to(dtype)
    converted = copy.deepcopy(reference)
    report = hf.convert_model(converted)
    assert report and all(f == family.split(" ")[0] for _, f in report)
    assert all(isinstance(converted.get_submodule(name), moeflux.MoE) for name, _ in report)

    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 64, (3, 12), generator=gen)
    targets = torch.randint(0, 64, (3, 12), generator=gen)
    expected, got = run(reference, ids, targets), run(converted, ids, targets)
    tol = dict(atol=2e-5, rtol=2e-5) if dtype == torch.float32 else dict(atol=3e-2, rtol=3e-2)
    torch.testing.assert_close(got, expected, **tol)

    theirs = dict(reference.named_parameters())
    grad_tol = dict(atol=2e-5, rtol=1e-3) if dtype == torch.float32 else dict(atol=2e-2, rtol=5e-2)
    for name, p in converted.named_parameters():
        other, transform = hf_name(name, theirs)
        ref_grad = theirs[other].grad
        ref_grad = torch.zeros_like(theirs[other]) if ref_grad is None else ref_grad
        ref_grad = transform(ref_grad) if transform else ref_grad
        grad = torch.zeros_like(p) if p.grad is None else p.grad
        torch.testing.assert_close(grad.float(), ref_grad.float(), **grad_tol, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("family", FAMILIES)
def test_revert_writes_the_weights_back(family):
    torch.manual_seed(0)
    model = FAMILIES[family]()
    original = copy.deepcopy(model)
    hf.convert_model(model)
    with torch.no_grad():  # "training"
        for p in model.parameters():
            p.add_(0.01)
    trained = copy.deepcopy(model)
    report = hf.revert_model(model)
    assert report and not any(isinstance(m, moeflux.MoE) for m in model.modules())
    assert set(dict(model.named_parameters())) == set(dict(original.named_parameters()))
    ids = torch.randint(0, 64, (2, 9))
    torch.testing.assert_close(model(ids).logits, trained(ids).logits, atol=2e-5, rtol=2e-5)


def test_unsupported_blocks_and_options_raise():
    config = transformers.MixtralConfig(**COMMON, intermediate_size=24, num_key_value_heads=2, num_local_experts=4,
                                        num_experts_per_tok=2, router_jitter_noise=0.1)
    with pytest.raises(hf.UnsupportedBlockError, match="MixtralSparseMoeBlock: router_jitter_noise=0.1"):
        hf.convert_model(transformers.MixtralForCausalLM(config))
    config = transformers.MixtralConfig(**COMMON, intermediate_size=24, num_key_value_heads=2, num_local_experts=4,
                                        num_experts_per_tok=2, hidden_act="gelu")
    with pytest.raises(hf.UnsupportedBlockError, match="hidden_act='gelu' is not supported"):
        hf.convert_model(transformers.MixtralForCausalLM(config))

    class SomeOtherSparseMoeBlock(torch.nn.Module):
        pass

    model = torch.nn.Sequential(SomeOtherSparseMoeBlock())
    with pytest.raises(hf.UnsupportedBlockError, match=r"0 \(SomeOtherSparseMoeBlock\): not a supported MoE block"):
        hf.convert_model(model)
    with pytest.raises(hf.UnsupportedBlockError, match="not converted from a transformers block"):
        hf.to_hf_block(moeflux.MoE(8, 8, 2))


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_example_trains_expert_parallel_and_saves_in_transformers_format(family):
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "examples" / "hf_expert_parallel.py"
    result = subprocess.run([sys.executable, str(script), "--family", family, "--steps", "3"], capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "(match)" in result.stdout and "per rank on 2 ranks" in result.stdout


def test_converting_twice_leaves_converted_blocks_alone():
    model = mixtral()
    first = hf.convert_model(model)
    assert len(first) == 2 and hf.convert_model(model) == []
    assert sum(isinstance(m, moeflux.MoE) for m in model.modules()) == 2
