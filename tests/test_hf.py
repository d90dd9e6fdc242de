"""moeflux.hf: small random transformers models of every supported family give
the same logits and gradients with their MoE blocks converted to moeflux, and
come back bit for bit (values, dtypes, requires_grad) when reverted."""

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

import moeflux  # noqa: E402
from moeflux import hf  # noqa: E402

COMMON = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64)
ROPE = {"rope_type": "default", "rope_theta": 10000.0}
MLA = dict(q_lora_rank=None, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8)


def mixtral(**options):
    options = dict(num_local_experts=4, num_experts_per_tok=2) | options
    return transformers.MixtralForCausalLM(transformers.MixtralConfig(
        **COMMON, intermediate_size=24, num_key_value_heads=2, **options))


def qwen2_moe(norm_topk_prob=False, shared=40):
    return transformers.Qwen2MoeForCausalLM(transformers.Qwen2MoeConfig(
        **COMMON, intermediate_size=48, moe_intermediate_size=24, shared_expert_intermediate_size=shared,
        num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, norm_topk_prob=norm_topk_prob,
        decoder_sparse_step=1))


def qwen3_moe():
    return transformers.Qwen3MoeForCausalLM(transformers.Qwen3MoeConfig(
        **COMMON, intermediate_size=48, moe_intermediate_size=24, num_key_value_heads=2, head_dim=8, num_experts=8,
        num_experts_per_tok=3, norm_topk_prob=True, decoder_sparse_step=1))


def qwen3_next(shared=24):
    return transformers.Qwen3NextForCausalLM(transformers.Qwen3NextConfig(
        **COMMON, intermediate_size=48, moe_intermediate_size=16, shared_expert_intermediate_size=shared,
        num_key_value_heads=2, head_dim=8, num_experts=8, num_experts_per_tok=3, norm_topk_prob=True,
        layer_types=["linear_attention", "full_attention"], linear_num_value_heads=4, linear_num_key_heads=2,
        linear_key_head_dim=8, linear_value_head_dim=8))


def olmoe():
    return transformers.OlmoeForCausalLM(transformers.OlmoeConfig(
        **COMMON, intermediate_size=24, num_key_value_heads=4, num_experts=4, num_experts_per_tok=2))


def bias_owners(model):
    """The modules holding an e_score_correction_bias (routers, or MiniMax-M2's blocks), in model order."""
    return [m for m in model.modules() if isinstance(getattr(m, "e_score_correction_bias", None), torch.Tensor)]


def set_correction_bias(owner, value):
    old = owner.e_score_correction_bias  # a buffer, or a frozen parameter (Ernie's [1, E])
    value = value.reshape(old.shape)
    owner.e_score_correction_bias = torch.nn.Parameter(value, False) if isinstance(old, torch.nn.Parameter) else value


def with_correction_bias(model):
    for owner in bias_owners(model):  # a non-zero correction bias, as a trained model has
        set_correction_bias(owner, torch.randn(8) * 0.1)
    return model


def deepseek_v3(shared=1):
    return with_correction_bias(transformers.DeepseekV3ForCausalLM(transformers.DeepseekV3Config(
        **COMMON, **MLA, intermediate_size=48, moe_intermediate_size=16, num_key_value_heads=4, n_routed_experts=8,
        num_experts_per_tok=3, n_group=4, topk_group=2, n_shared_experts=shared, first_k_dense_replace=1,
        routed_scaling_factor=2.5, norm_topk_prob=True)))


def deepseek_v2(topk_method="greedy", shared=2, **options):
    groups = dict(n_group=4, topk_group=2) if topk_method == "group_limited_greedy" else {}
    return transformers.DeepseekV2ForCausalLM(transformers.DeepseekV2Config(
        **COMMON, **MLA, intermediate_size=48, moe_intermediate_size=16, num_key_value_heads=4, n_routed_experts=8,
        num_experts_per_tok=3, topk_method=topk_method, n_shared_experts=shared, first_k_dense_replace=1,
        routed_scaling_factor=1.5, **groups, **options))


def glm4_moe(shared=1):
    return with_correction_bias(transformers.Glm4MoeForCausalLM(transformers.Glm4MoeConfig(
        **COMMON, intermediate_size=48, moe_intermediate_size=16, num_key_value_heads=2, head_dim=8,
        n_routed_experts=8, num_experts_per_tok=3, n_group=2, topk_group=1, n_shared_experts=shared,
        first_k_dense_replace=1, routed_scaling_factor=1.5, norm_topk_prob=True)))


def gpt_oss(limit=7.0):
    model = transformers.GptOssForCausalLM(transformers.GptOssConfig(
        **COMMON, num_key_value_heads=2, head_dim=8, num_local_experts=4, num_experts_per_tok=2, intermediate_size=16,
        swiglu_limit=limit))
    with torch.no_grad():  # biases as a trained model has them, large enough to reach the clamps
        for name, p in model.named_parameters():
            if name.endswith("bias") or ".experts." in name:
                p.normal_(0, 0.5)
    return model


def ernie4_5_moe(shared=1):  # layer 0 dense, layer 1 MoE
    return with_correction_bias(transformers.Ernie4_5_MoeForCausalLM(transformers.Ernie4_5_MoeConfig(
        **COMMON, intermediate_size=48, moe_intermediate_size=16, num_key_value_heads=2, moe_num_experts=8, moe_k=3,
        moe_num_shared_experts=shared)))


def dots1():
    return with_correction_bias(transformers.Dots1ForCausalLM(transformers.Dots1Config(
        **COMMON, intermediate_size=48, moe_intermediate_size=16, num_key_value_heads=2, head_dim=8,
        n_routed_experts=8, num_experts_per_tok=3, n_group=4, topk_group=2, n_shared_experts=1,
        first_k_dense_replace=1, routed_scaling_factor=1.5, norm_topk_prob=True)))


def minimax_m2(**options):
    return with_correction_bias(transformers.MiniMaxM2ForCausalLM(transformers.MiniMaxM2Config(
        **COMMON, intermediate_size=16, num_key_value_heads=2, head_dim=8, num_local_experts=8, num_experts_per_tok=3,
        bos_token_id=1, eos_token_id=2, **options)))


def hunyuan_moe():
    return transformers.HunYuanMoEV1ForCausalLM(transformers.HunYuanMoEV1Config(
        **COMMON, intermediate_size=16, num_key_value_heads=2, num_experts=4, moe_topk=2, head_dim=8))


def granite_moe():
    return transformers.GraniteMoeForCausalLM(transformers.GraniteMoeConfig(
        **COMMON, intermediate_size=16, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2))


def granite_moe_shared():  # its shared MLP sits beside the block, in the decoder layer
    return transformers.GraniteMoeSharedForCausalLM(transformers.GraniteMoeSharedConfig(
        **COMMON, intermediate_size=16, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
        shared_intermediate_size=24))


def llama4(top_k=1):
    return transformers.Llama4ForCausalLM(transformers.Llama4TextConfig(
        **COMMON, num_key_value_heads=2, head_dim=8, num_local_experts=4, num_experts_per_tok=top_k,
        intermediate_size=16, intermediate_size_mlp=32, interleave_moe_layer_step=1))


def jamba():  # Mamba layers between attention layers; every layer MoE
    return transformers.JambaForCausalLM(transformers.JambaConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=16, num_experts=4, num_experts_per_tok=2, expert_layer_period=1, expert_layer_offset=0,
        attn_layer_period=2, attn_layer_offset=1, mamba_d_state=4, mamba_expand=1, mamba_dt_rank=4))


def qwen3_vl_moe():  # vision blocks ("Qwen3VLMoeVisionBlock") next to the text MoE blocks
    text = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                head_dim=8, intermediate_size=48, moe_intermediate_size=16, num_experts=4, num_experts_per_tok=2,
                max_position_embeddings=64, rope_parameters={**ROPE, "mrope_section": [2, 1, 1]})
    vision = dict(depth=2, hidden_size=16, num_heads=2, intermediate_size=16, out_hidden_size=32, patch_size=4,
                  temporal_patch_size=1, spatial_merge_size=1, deepstack_visual_indexes=[0])
    return transformers.Qwen3VLMoeForConditionalGeneration(
        transformers.Qwen3VLMoeConfig(text_config=text, vision_config=vision))


# name (the family moeflux reports, then the variant) -> a small random model
FAMILIES = {
    "Mixtral": mixtral,
    "Qwen2-MoE": qwen2_moe,
    "Qwen2-MoE (norm_topk_prob)": lambda: qwen2_moe(True),
    "Qwen2-MoE (no shared expert)": lambda: qwen2_moe(shared=0),
    "Qwen3-MoE": qwen3_moe,
    "Qwen3-Next": qwen3_next,
    "Qwen3-Next (no shared expert)": lambda: qwen3_next(shared=0),
    "OLMoE": olmoe,
    "DeepSeek-V2": deepseek_v2,
    "DeepSeek-V2 (group_limited_greedy)": lambda: deepseek_v2("group_limited_greedy"),
    "DeepSeek-V2 (no shared experts)": lambda: deepseek_v2(shared=0),
    "DeepSeek-V3": deepseek_v3,
    "DeepSeek-V3 (no shared experts)": lambda: deepseek_v3(shared=0),
    "GLM-4-MoE": glm4_moe,
    "GLM-4-MoE (no shared experts)": lambda: glm4_moe(shared=0),
    "GPT-OSS": gpt_oss,
    "GPT-OSS (tight clamp)": lambda: gpt_oss(limit=0.5),
    "Ernie-4.5-MoE": ernie4_5_moe,
    "Ernie-4.5-MoE (no shared experts)": lambda: ernie4_5_moe(shared=0),
    "dots.llm1": dots1,
    "MiniMax-M2": minimax_m2,
    "HunYuan-MoE": hunyuan_moe,
    "Granite-MoE": granite_moe,
    "Granite-MoE-Shared": granite_moe_shared,
    "Llama-4": llama4,
    "Jamba": jamba,
}
IMAGE_TEXT = {"Qwen3-VL-MoE": qwen3_vl_moe}  # not causal LMs (AutoModelForCausalLM does not load them)
MODELS = {**FAMILIES, **IMAGE_TEXT}  # every supported family's tiny model
BIASED = ["DeepSeek-V3", "GLM-4-MoE", "dots.llm1"]  # families whose gate holds an e_score_correction_bias
# families whose checkpoints keep the router and its correction bias in float32 (_keep_in_fp32_modules_strict)
STRICT_FP32 = [*BIASED, "Ernie-4.5-MoE"]


def transposed(t):
    return t.transpose(1, 2)


def same(t):  # a transform all the same: it marks an expert's tensor
    return t


def deinterleave(t):  # GPT-OSS's gate/up columns alternate; moeflux keeps [gate | up]
    return torch.cat((t[..., ::2], t[..., 1::2]), dim=-1)


# moeflux name in a block -> the names a transformers block gives it (the first the model holds)
RENAMES = {"router.weight": ["gate.weight", "gate.wg.weight", "router.weight"],
           "shared_expert.gate.weight": ["shared_expert_gate.weight"]}
SHARED = ["shared_expert.", "shared_experts.", "shared_mlp."]
# moeflux expert tensor -> (transformers name, which transform: of gate_up or of down)
EXPERT_NAMES = {"experts.w_in": ("experts.gate_up_proj", 0), "experts.b_in": ("experts.gate_up_proj_bias", 0),
                "experts.w_out": ("experts.down_proj", 1), "experts.b_out": ("experts.down_proj_bias", 1)}
EXPERT_LAYOUTS = {"GPT-OSS": (deinterleave, same), "Llama-4": (same, same)}  # others: transposed, transposed


def family_of(name):
    return name.split(" ")[0]


def hf_name(name, hf_names, family):
    """The transformers name of moeflux's parameter ``name`` and, for an expert tensor, the transform of the
    transformers tensor into moeflux's layout (else None)."""
    layouts = EXPERT_LAYOUTS.get(family_of(family), (transposed, transposed))
    for ours, (theirs, side) in EXPERT_NAMES.items():
        if name.endswith("." + ours):
            return name[: -len(ours)] + theirs, layouts[side]
    candidates = [name[: -len(ours)] + theirs for ours, names in RENAMES.items() if name.endswith("." + ours)
                  for theirs in names]
    if not candidates and ".shared_expert." in name:
        prefix, _, rest = name.partition(".shared_expert.")
        candidates = [f"{prefix}.{shared}{rest}" for shared in SHARED]
    return next((n for n in candidates if n in hf_names), name), None


def run(model, ids, targets):
    model.zero_grad()
    logits = model(ids).logits
    torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), targets.flatten()).backward()
    return logits.detach().float()


def tensors(model):
    return {**dict(model.named_parameters()), **dict(model.named_buffers())}


def assert_same_tensors(got, expected):
    """The same parameters and buffers: names, dtypes, values bit for bit, requires_grad."""
    got, expected = tensors(got), tensors(expected)
    assert set(got) == set(expected)
    for name, t in expected.items():
        assert got[name].dtype == t.dtype, f"{name}: {got[name].dtype} != {t.dtype}"
        assert torch.equal(got[name], t), name
        assert got[name].requires_grad == t.requires_grad, name
        assert isinstance(got[name], torch.nn.Parameter) == isinstance(t, torch.nn.Parameter), name


TOLERANCES = {  # logits, gradients (HF routers compute their weights in float32, even for float64 models)
    torch.float64: (dict(atol=1e-6, rtol=1e-6), dict(atol=1e-6, rtol=1e-5)),
    torch.float32: (dict(atol=1e-6, rtol=1e-5), dict(atol=1e-6, rtol=1e-5)),
    torch.bfloat16: (dict(atol=3e-2, rtol=3e-2), dict(atol=2e-2, rtol=5e-2)),
}


@pytest.mark.parametrize("dtype", list(TOLERANCES), ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("family", MODELS)
def test_converted_model_gives_the_same_logits_and_gradients(family, dtype):
    torch.manual_seed(0)
    reference = MODELS[family]().to(dtype)
    reference.set_experts_implementation("eager")  # transformers' loop over experts (its grouped_mm has no float64)
    converted = copy.deepcopy(reference)
    report = hf.convert_model(converted)
    assert report and all(f == family_of(family) for _, f in report)
    assert all(isinstance(converted.get_submodule(name), moeflux.MoE) for name, _ in report)
    assert not any(type(m).__name__ in hf.FAMILIES for m in converted.modules())

    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 64, (3, 12), generator=gen)
    targets = torch.randint(0, 64, (3, 12), generator=gen)
    expected, got = run(reference, ids, targets), run(converted, ids, targets)
    tol, grad_tol = TOLERANCES[dtype]
    torch.testing.assert_close(got, expected, **tol)

    theirs = dict(reference.named_parameters())
    for name, p in converted.named_parameters():
        other, transform = hf_name(name, theirs, family)
        ref_grad = theirs[other].grad
        ref_grad = torch.zeros_like(theirs[other]) if ref_grad is None else ref_grad
        ref_grad = transform(ref_grad) if transform else ref_grad
        grad = torch.zeros_like(p) if p.grad is None else p.grad
        assert p.dtype == theirs[other].dtype, name
        torch.testing.assert_close(grad.float(), ref_grad.float(), **grad_tol, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("family", MODELS)
def test_revert_writes_the_weights_back(family):
    torch.manual_seed(0)
    model = MODELS[family]()
    original = copy.deepcopy(model)
    hf.convert_model(model)
    with torch.no_grad():  # "training"
        for p in model.parameters():
            p.add_(0.01)
    trained = copy.deepcopy(model)
    report = hf.revert_model(model)
    assert report and all(f == family_of(family) for _, f in report)
    assert not any(isinstance(m, moeflux.MoE) for m in model.modules())
    assert set(tensors(model)) == set(tensors(original))
    ids = torch.randint(0, 64, (2, 9))
    torch.testing.assert_close(model(ids).logits, trained(ids).logits, atol=2e-5, rtol=2e-5)
    assert hf.convert_model(model) == report  # and converts again


def freeze_some(model):
    """Freezes the router, the down projections and the shared experts' (and dense MLPs') gate projections."""
    for name, p in model.named_parameters():
        if name.endswith((".gate.weight", ".gate.wg.weight", ".router.weight", "experts.down_proj",
                          "gate_proj.weight")):
            p.requires_grad_(False)


@pytest.mark.parametrize("family", MODELS)
def test_round_trip_keeps_every_tensor_dtype_and_requires_grad(family):
    torch.manual_seed(0)
    model = MODELS[family]().to(torch.bfloat16)
    if family_of(family) in STRICT_FP32:  # as from_pretrained keeps it (_keep_in_fp32_modules_strict)
        for owner in bias_owners(model):
            set_correction_bias(owner, torch.randn(8, dtype=torch.float32) * 0.1)
    freeze_some(model)
    original = copy.deepcopy(model)
    hf.convert_model(model)
    for moe in (m for m in model.modules() if isinstance(m, moeflux.MoE)):
        assert not moe.router.weight.requires_grad and not moe.experts.w_out.requires_grad
        assert moe.experts.w_in.requires_grad and moe.experts.w_in.dtype == torch.bfloat16
        if moe.shared_expert is not None:
            shared = moe.shared_expert
            assert not shared.gate_proj.weight.requires_grad and shared.up_proj.weight.requires_grad
    ids = torch.randint(0, 64, (2, 9))
    model(ids).logits.sum().backward()  # frozen tensors get no gradient
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
    model.zero_grad(set_to_none=True)
    hf.revert_model(model)
    assert_same_tensors(model, original)


@pytest.mark.parametrize("family", STRICT_FP32)
def test_float32_correction_bias_in_a_bfloat16_model_is_kept_exactly(family):
    torch.manual_seed(0)
    reference = FAMILIES[family]().to(torch.bfloat16)
    biases = [torch.randn(8, dtype=torch.float32) * 0.1 + 1e-4 for _ in bias_owners(reference)]
    for owner, bias in zip(bias_owners(reference), biases):  # values bfloat16 cannot hold
        assert not torch.equal(bias, bias.bfloat16().float())
        set_correction_bias(owner, bias)
    model = copy.deepcopy(reference)
    hf.convert_model(model)
    ours = [m.router.expert_bias for m in model.modules() if isinstance(m, moeflux.MoE)]
    assert len(ours) == len(biases)
    assert all(o.dtype == torch.float32 and torch.equal(o, b) for o, b in zip(ours, biases))
    ids = torch.randint(0, 64, (3, 12))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits.float(), reference(ids).logits.float(), atol=3e-2, rtol=3e-2)
    hf.revert_model(model)
    theirs = [owner.e_score_correction_bias for owner in bias_owners(model)]
    assert all(t.dtype == torch.float32 and torch.equal(t.flatten(), b) for t, b in zip(theirs, biases))


@pytest.mark.parametrize("family", STRICT_FP32)
def test_bfloat16_checkpoint_comes_back_as_it_was_loaded(family, tmp_path):
    torch.manual_seed(0)
    FAMILIES[family]().save_pretrained(tmp_path / "original")
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "original", dtype=torch.bfloat16)
    gate = loaded.model.layers[1].mlp.gate  # kept in float32 by transformers, next to bfloat16 experts
    assert bias_owners(loaded) and all(o.e_score_correction_bias.dtype == torch.float32 for o in bias_owners(loaded))
    assert gate.weight.dtype == torch.float32 and loaded.model.layers[1].mlp.experts.down_proj.dtype == torch.bfloat16
    model = copy.deepcopy(loaded)
    hf.convert_model(model)
    ids = torch.randint(0, 64, (2, 9))
    with torch.no_grad():  # the router in float32 on bfloat16 tokens, as transformers computes it
        torch.testing.assert_close(model(ids).logits.float(), loaded(ids).logits.float(), atol=3e-2, rtol=3e-2)
    hf.revert_model(model)
    model.save_pretrained(tmp_path / "reverted")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "reverted", dtype=torch.bfloat16)
    assert_same_tensors(model, loaded)
    assert_same_tensors(reloaded, loaded)


def test_requires_grad_set_after_conversion_is_written_back():
    torch.manual_seed(0)
    model = qwen2_moe()
    hf.convert_model(model)
    moe = model.model.layers[0].mlp
    moe.experts.w_in.requires_grad_(False)
    moe.shared_expert.gate.weight.requires_grad_(False)
    hf.revert_model(model)
    block = model.model.layers[0].mlp
    assert not block.experts.gate_up_proj.requires_grad and not block.shared_expert_gate.weight.requires_grad
    assert block.experts.down_proj.requires_grad and model.model.layers[1].mlp.experts.gate_up_proj.requires_grad


def test_zero_width_shared_expert_is_kept_for_the_way_back():
    torch.manual_seed(0)
    model = qwen2_moe(shared=0)
    original = copy.deepcopy(model)
    hf.convert_model(model)
    assert all(m.shared_expert is None for m in model.modules() if isinstance(m, moeflux.MoE))
    assert "hf_shared_expert_gate_weight" not in model.state_dict()  # not part of moeflux's checkpoints
    model.bfloat16()  # the kept tensors follow the model
    hf.revert_model(model)
    original.bfloat16()
    assert_same_tensors(model, original)
    ids = torch.randint(0, 64, (2, 9))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, original(ids).logits)


def test_router_logits_output_is_refused_with_what_to_do_instead():
    for model in (mixtral(output_router_logits=True), qwen2_moe()):
        model.config.output_router_logits = True
        with pytest.raises(hf.UnsupportedBlockError, match=r"model\.layers\.0\.mlp, model\.layers\.1\.mlp "
                                                           r"\(\w+\): config\.output_router_logits=True") as e:
            hf.convert_model(model)
        assert "moeflux.aux_loss(model)" in str(e.value) and "aux_loss_weight" in str(e.value)
        assert not any(isinstance(m, moeflux.MoE) for m in model.modules())
    model = mixtral()
    hf.convert_model(model, aux_loss_weight=0.02)  # what the message says to do
    layers = [m for m in model.modules() if isinstance(m, moeflux.MoE)]
    routings = []
    for layer in layers:
        layer.router.register_forward_hook(lambda module, args, routing: routings.append(routing))
    model(torch.randint(0, 64, (2, 9)))
    expected = sum(0.02 * moeflux.ops.router_aux_loss(r.logits, r.expert_ids)[0] for r in routings)
    assert len(routings) == 2 and expected > 0
    torch.testing.assert_close(moeflux.aux_loss(model), expected)


def test_unsupported_options_raise():
    with pytest.raises(hf.UnsupportedBlockError, match=r"model\.layers\.0\.mlp, model\.layers\.1\.mlp "
                                                       r"\(MixtralSparseMoeBlock\): router_jitter_noise=0.1"):
        hf.convert_model(mixtral(router_jitter_noise=0.1))
    with pytest.raises(hf.UnsupportedBlockError, match="hidden_act='gelu' is not supported"):
        hf.convert_model(mixtral(hidden_act="gelu"))
    with pytest.raises(hf.UnsupportedBlockError, match=r"model\.layers\.1\.mlp \(DeepseekV2Moe\): mlp_bias=True"):
        hf.convert_model(deepseek_v2(mlp_bias=True))
    model = deepseek_v2()
    for layer in model.model.layers[1:]:
        layer.mlp.gate.topk_method = "noaux_tc"
    with pytest.raises(hf.UnsupportedBlockError, match=r"\(DeepseekV2Moe\): topk_method='noaux_tc'"):
        hf.convert_model(model)
    model = deepseek_v3()
    model.model.layers[1].mlp.gate.topk_group = 1  # 3 experts per token, 2 allowed
    with pytest.raises(hf.UnsupportedBlockError, match=r"\(DeepseekV3MoE\): num_experts_per_tok=3 exceeds the 2"):
        hf.convert_model(model)
    model = qwen2_moe()
    model.model.layers[1].mlp.shared_expert_gate = torch.nn.Linear(32, 1)  # a bias moeflux has no place for
    with pytest.raises(hf.UnsupportedBlockError, match=r"layers\.1\.mlp \(Qwen2MoeSparseMoeBlock\): "
                                                       r"shared_expert_gate\.bias: no moeflux\.MoE counterpart"):
        hf.convert_model(model)
    assert not any(isinstance(m, moeflux.MoE) for m in model.modules())  # layer 0 was fine: left alone too

    def refused(build, change, message):
        model = build()
        change(model.model.layers[1].mlp)
        with pytest.raises(hf.UnsupportedBlockError, match=message):
            hf.convert_model(model)

    refused(qwen3_moe, lambda block: setattr(block.experts, "down_proj", torch.nn.Parameter(torch.zeros(8, 32, 5))),
            r"unexpected expert shapes gate_up_proj \(8, 48, 32\), down_proj \(8, 32, 5\)")
    refused(gpt_oss, lambda block: setattr(block.experts, "down_proj", torch.nn.Parameter(torch.zeros(4, 5, 32))),
            r"\(GptOssMLP\): unexpected expert shapes")
    refused(qwen3_moe, lambda block: setattr(block.experts, "_is_expert_parallel", True),
            r"sharded by transformers' tensor/expert parallelism")
    refused(gpt_oss, lambda block: setattr(block.experts, "_is_expert_parallel", True), r"\(GptOssMLP\): its weights "
            r"are sharded")
    refused(qwen3_moe, lambda block: setattr(block.experts, "is_transposed", True), "its experts' layout is not")
    refused(qwen3_moe, lambda block: delattr(block.experts, "gate_up_proj"), "no stacked 'gate_up_proj' weight")
    refused(gpt_oss, lambda block: block.register_buffer("scale", torch.ones(1)), r"scale: no moeflux\.MoE counterpart")
    refused(deepseek_v3, lambda block: setattr(block.gate, "routed_scaling_factor", 0.0),
            r"\(DeepseekV3MoE\): routed_scaling_factor=0.0 \(moeflux needs a factor > 0\)")
    refused(deepseek_v3, lambda block: setattr(block.gate, "num_group", 3),
            r"n_group=3, topk_group=2: n_group must divide the 8 experts and topk_group be in \[1, n_group\]")
    refused(deepseek_v3, lambda block: setattr(block.gate, "topk_group", 5), r"n_group=4, topk_group=5: ")
    block = qwen3_moe().model.layers[0].mlp
    for owner in (block, block.experts, block.gate):  # a block that keeps no config
        if hasattr(owner, "config"):
            del owner.config
    with pytest.raises(hf.UnsupportedBlockError, match="pass the model's config to convert it"):
        hf.from_hf_block(block)

    class SomeOtherSparseMoeBlock(torch.nn.Module):
        pass

    with pytest.raises(hf.UnsupportedBlockError, match=r"0 \(SomeOtherSparseMoeBlock\): not a supported MoE block"):
        hf.convert_model(torch.nn.Sequential(SomeOtherSparseMoeBlock()))
    with pytest.raises(hf.UnsupportedBlockError, match="not converted from a transformers block"):
        hf.to_hf_block(moeflux.MoE(8, 8, 2))


def test_single_blocks_convert_and_the_model_itself_is_not_replaced_in_place():
    torch.manual_seed(0)
    block = mixtral().model.layers[0].mlp
    moe = hf.from_hf_block(block)  # the config is found on the block's experts
    x = torch.randn(2, 5, 32)
    torch.testing.assert_close(moe(x), block(x), atol=2e-5, rtol=2e-5)
    with pytest.raises(hf.UnsupportedBlockError, match="is itself a MixtralSparseMoeBlock block"):
        hf.convert_model(block)
    assert hf.convert_model(moe) == []


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


def test_weight_expert_input_scales_the_top_1_experts_input():
    torch.manual_seed(0)
    moe = moeflux.MoE(8, 6, 4, top_k=1, scoring="sigmoid", weight_expert_input=True, dtype=torch.float64)
    x = torch.randn(10, 8, dtype=torch.float64, requires_grad=True)
    logits = x @ moe.router.weight.T
    weight, expert = torch.sigmoid(logits).max(dim=-1)
    w_in, w_out = moe.experts.w_in[expert], moe.experts.w_out[expert]  # [T, 8, 12], [T, 6, 8]
    gate, up = torch.bmm((weight[:, None] * x)[:, None], w_in).squeeze(1).chunk(2, dim=-1)
    expected = torch.bmm((torch.nn.functional.silu(gate) * up)[:, None], w_out).squeeze(1)
    torch.testing.assert_close(moe(x), expected)
    inputs = (x, moe.router.weight, moe.experts.w_in, moe.experts.w_out)
    torch.testing.assert_close(torch.autograd.grad(moe(x).square().sum(), inputs),
                               torch.autograd.grad(expected.square().sum(), inputs))
    with pytest.raises(ValueError, match="weight_expert_input=True needs top_k=1, got top_k=2"):
        moeflux.MoE(8, 6, 4, top_k=2, weight_expert_input=True)
