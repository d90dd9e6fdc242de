"""moeflux.hf the way users arrive: every supported family saved with save_pretrained, loaded with
from_pretrained in float32 and bfloat16 (transformers then keeps some modules in float32: DeepSeek's and GLM's
gate and correction bias), converted, run forward and backward against the loaded transformers model, trained
one step, reverted, saved again and reloaded by transformers: the same tensors (dtypes, values, ties) all the way,
single process and on 2 expert-parallel ranks."""

from __future__ import annotations

import copy
import pathlib

import pytest
import torch
import torch.distributed as dist

transformers = pytest.importorskip("transformers")

import moeflux  # noqa: E402
import test_hf  # noqa: E402  (the families' tiny models; imported as a module: its tests are not rerun)
from moeflux import hf  # noqa: E402
from multiprocess import GROUP_TIMEOUT, run_ranks  # noqa: E402

DTYPES = [torch.float32, torch.bfloat16]
GRAD_TOL = {torch.float32: dict(atol=1e-6, rtol=1e-5), torch.bfloat16: dict(atol=2e-2, rtol=5e-2)}
LOGIT_TOL = {torch.float32: dict(atol=1e-6, rtol=1e-5), torch.bfloat16: dict(atol=3e-2, rtol=3e-2)}


def load(path, dtype):
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    model.set_experts_implementation("eager")
    return model


def ties(model):
    """Which tensor names share storage (tied embeddings): a set of frozensets of names."""
    by_storage = {}
    for name, t in model.state_dict(keep_vars=True).items():
        if t.numel() == 0:  # empty tensors (a shared expert of width 0) share no values
            continue
        by_storage.setdefault(t.data_ptr(), set()).add(name)
    return {frozenset(names) for names in by_storage.values() if len(names) > 1}


def kept_in_float32(model):
    return sorted(n for n, t in test_hf.tensors(model).items() if t.dtype == torch.float32)


def train_step(model, names=None):
    """The same update whatever the layout: a constant added to every element of every parameter (of ``names``:
    the converted model's; the inert tensors of a width-0 shared expert are buffers there)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if names is None or name in names:
                p.add_(0.015625)


def batch(seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 64, (2, 10), generator=gen), torch.randint(0, 64, (2, 10), generator=gen)


def check_gradients(model, reference, family, dtype, world=1, moes=None):
    theirs = dict(reference.named_parameters())
    for name, p in model.named_parameters():
        other, transform = test_hf.hf_name(name, theirs, family)
        ref_grad = theirs[other].grad if theirs[other].grad is not None else torch.zeros_like(theirs[other])
        if transform is not None:
            if world > 1:  # every rank's tokens reach an expert; this rank holds some of them
                dist.all_reduce(ref_grad)
            ref_grad = transform(ref_grad)
            if moes is not None:
                ref_grad = ref_grad[list(moes[name.rsplit(".experts.", 1)[0]].experts.global_experts)]
        assert p.dtype == theirs[other].dtype, name
        grad = p.grad if p.grad is not None else torch.zeros_like(p)
        torch.testing.assert_close(grad.float(), ref_grad.float(), **GRAD_TOL[dtype], msg=lambda m: f"{name}: {m}")


def save(model, path, ep_group):
    """save_pretrained on the first rank; the others wait for it (every rank then loads the same files)."""
    if ep_group is None or dist.get_rank() == 0:
        model.save_pretrained(path)
    if ep_group is not None:
        dist.barrier()


def round_trip(family, dtype, tmp_path, tie=False, ep_group=None):
    torch.manual_seed(0)
    original = test_hf.FAMILIES[family]()
    if tie:  # tied input and output embeddings, as small checkpoints often have them
        original.config.tie_word_embeddings = True
        torch.manual_seed(0)
        original = type(original)(original.config)
    rank = dist.get_rank() if ep_group is not None else 0
    save(original, tmp_path / "original", ep_group)
    loaded = load(tmp_path / "original", dtype)
    assert not tie or ties(loaded)
    reference, model = copy.deepcopy(loaded), copy.deepcopy(loaded)
    report = hf.convert_model(model, ep_group=ep_group)
    assert report
    moes = {name: model.get_submodule(name) for name, _ in report}

    ids, targets = batch(1 + rank)
    expected, got = test_hf.run(reference, ids, targets), test_hf.run(model, ids, targets)
    torch.testing.assert_close(got, expected, **LOGIT_TOL[dtype])
    world = dist.get_world_size() if ep_group is not None else 1
    check_gradients(model, reference, family, dtype, world, moes if ep_group is not None else None)
    assert ties(model) == ties(loaded)

    train_step(model)
    theirs = dict(reference.named_parameters())
    train_step(reference, {test_hf.hf_name(name, theirs, family)[0] for name, _ in model.named_parameters()})
    model.zero_grad(set_to_none=True)
    reference.zero_grad(set_to_none=True)
    assert hf.revert_model(model) == report
    test_hf.assert_same_tensors(model, reference)  # every dtype kept, the update written back bit for bit
    assert ties(model) == ties(loaded) and kept_in_float32(model) == kept_in_float32(loaded)
    save(model, tmp_path / "trained", ep_group)
    reloaded = load(tmp_path / "trained", dtype)
    test_hf.assert_same_tensors(reloaded, reference)
    assert ties(reloaded) == ties(loaded)
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, model(ids).logits)
    return kept_in_float32(loaded)


# One model per family (its variants differ in options the from_config tests of test_hf cover, not in loading).
FIRST_OF_EACH_FAMILY = list({test_hf.family_of(name): name for name in reversed(test_hf.FAMILIES)}.values())[::-1]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("family", FIRST_OF_EACH_FAMILY)
def test_from_pretrained_convert_train_revert_save_reload(family, dtype, tmp_path):
    kept = round_trip(family, dtype, tmp_path)
    if dtype == torch.bfloat16 and test_hf.family_of(family) in test_hf.STRICT_FP32:  # transformers' strict fp32
        assert any("e_score_correction_bias" in n for n in kept) and any("gate.weight" in n for n in kept), kept


@pytest.mark.parametrize("family", ["Mixtral", "DeepSeek-V3"])
def test_tied_embeddings_stay_tied(family, tmp_path):
    round_trip(family, torch.bfloat16, tmp_path, tie=True)


EP_FAMILIES = ["DeepSeek-V3", "GLM-4-MoE", "DeepSeek-V2", "Qwen3-MoE"]


def ep_worker(rank, world, tmp):
    groups = moeflux.init_expert_parallel(world, timeout=GROUP_TIMEOUT)
    for family in EP_FAMILIES:
        round_trip(family, torch.bfloat16, pathlib.Path(tmp) / family, ep_group=groups)
    return True


def test_bfloat16_checkpoints_on_two_expert_parallel_ranks(tmp_path):
    assert run_ranks(2, ep_worker, str(tmp_path)) == [True, True]
