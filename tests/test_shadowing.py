"""FasterMoE-style shadowing: the ops (routing_counts, broadcast_expert_rows, dispatch with routing_counts)
against brute force, their errors on every rank, and MoE(exchange=ExchangeConfig(shadowing=...)) against the
unshadowed layer: outputs and every gradient, dropless and capacity, world 2 and 4, ep < world under
DataParallel, several AdamW steps, fixed and cost-model policies, a permuted placement, checkpoints; option
checks, and shadowing with the staged schedules.

Each spawned world runs many checks (spawning costs seconds on a small machine)."""

from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

import moeflux
from moeflux import ExchangeConfig, ExpertPlacement, FixedShadows, ShadowCostModel, ops
from moeflux.balance import ExpertShape
from moeflux.exchange import FlatTransport, LocalTransport, Shadowing, make_exchange
from multiprocess import distributed_gradcheck, run_ranks

H, F = 8, 6  # d_model, d_ffn of the layers
LOCAL = 2  # experts per rank of the expert-parallel group


def expect_error(exc, message, fn, *args, **kwargs):
    with pytest.raises(exc, match=message):
        fn(*args, **kwargs)


# ==== ops: routing_counts


def random_ids(rank, num_tokens, num_experts, k, seed):
    """Any ids in [-1, E): duplicates and drops included (routing_counts just counts)."""
    gen = torch.Generator().manual_seed(1000 * seed + rank)
    return torch.randint(-1, num_experts, (num_tokens, k), generator=gen, dtype=torch.int32)


def check_routing_counts(rank, world, group, members):
    """``members``: the world ranks of ``group`` in group order."""
    size = len(members)
    for seed, (num_experts, k) in enumerate([(LOCAL * size, 2), (3 * size, 1), (size, 3)]):
        tokens = [0, 5, 3, 7, 2][:len(members)]  # the group's first rank routes nothing
        me = members.index(rank)
        ids = random_ids(rank, tokens[me], num_experts, k, seed)
        counts = ops.routing_counts(torch.randn(tokens[me], H), ids, num_experts, group)
        assert counts.dtype == torch.int64 and counts.device.type == "cpu" and counts.shape == (size, num_experts)
        expected = torch.zeros(size, num_experts, dtype=torch.int64)
        for i, r in enumerate(members):  # every member's ids, brute force
            theirs = random_ids(r, tokens[i], num_experts, k, seed)
            for e in range(num_experts):
                expected[i, e] = int((theirs == e).sum())
        assert torch.equal(counts, expected), (counts, expected)
        assert int(counts[0].sum()) == 0 and (size == 1 or int(counts.sum()) > 0)


def check_routing_counts_errors(rank, world):
    num_experts, last = LOCAL * world, world - 1
    ids = torch.zeros(3, 2, dtype=torch.int32)
    x = torch.randn(3, H)
    bad = {
        # each rank names the first rank that differs from it, and both sides
        f"disagree: .*hidden size {H - 1}": (torch.randn(3, H - 1) if rank == last else x, ids),
        "disagree: .*dtype Double": (x.double() if rank == last else x, ids),
        f"expert_ids of rank {last} hold 1 ids outside \\[-1, num_experts = {num_experts}\\)":
            (x, torch.tensor([[0, 1], [num_experts, 0], [1, 0]], dtype=torch.int32) if rank == last else ids),
        "expert_ids of rank 0 hold 2 ids outside":
            (x, torch.tensor([[0, -2], [-3, 0], [1, 0]], dtype=torch.int32) if rank == 0 else ids),
    }
    for message, (tokens, expert_ids) in bad.items():  # one rank is off: every rank raises
        expect_error(RuntimeError, f"moeflux.routing_counts: .*{message}", ops.routing_counts, tokens, expert_ids,
                     num_experts)
    # the same bad arguments everywhere: a local check
    expect_error(RuntimeError, "num_experts must be a positive multiple of the group size",
                 ops.routing_counts, x, ids, num_experts + 1)
    expect_error(RuntimeError, "expert_ids must be Int", ops.routing_counts, x, ids.long(), num_experts)
    # bad arguments on one rank only: that rank names its check, the others the rank that failed
    others = "" if rank == last else f"rank {last} of the process group failed its check: "
    expect_error(RuntimeError, f"moeflux.routing_counts: {others}expert_ids must be Int",
                 ops.routing_counts, x, ids.long() if rank == last else ids, num_experts)
    # and the group still works
    assert ops.routing_counts(x, ids, num_experts).sum() == 6 * world


# ==== ops: broadcast_expert_rows


def expert_table(world, dtype, row_shape=(3, 2)):
    """[P * LOCAL, *row_shape]: row p distinct from every other."""
    rows = torch.arange(world * LOCAL, dtype=dtype).view(-1, *[1] * len(row_shape)) * 100
    return rows + torch.arange(torch.Size(row_shape).numel(), dtype=dtype).view(row_shape) / 8


def check_broadcast(rank, world):
    every = list(range(world * LOCAL))
    cases = [[], [0], [1, 2], [every[-1]], [0, 1], every, every[1::3]]
    for dtype in (torch.float32, torch.float64):
        table = expert_table(world, dtype)
        local = table[rank * LOCAL:(rank + 1) * LOCAL].clone()
        for positions in cases:
            out = ops.broadcast_expert_rows(local, positions)
            assert out.shape == (len(positions), 3, 2) and out.dtype == dtype
            assert torch.equal(out, table[positions]), positions

    # 1-D rows and a non-contiguous local
    table = expert_table(world, torch.float64, (4, 5))
    local = table[rank * LOCAL:(rank + 1) * LOCAL].transpose(1, 2)
    assert torch.equal(ops.broadcast_expert_rows(local, [0, every[-1]]), table[[0, every[-1]]].transpose(1, 2))
    assert torch.equal(ops.broadcast_expert_rows(local[:, 0, 0].contiguous(), every), table[:, 0, 0])

    # backward: every rank's gradient summed onto the owner's row, zero for rows not broadcast
    table = expert_table(world, torch.float64)
    for positions in ([], [1, 2], every, [0, every[-1]]):
        local = table[rank * LOCAL:(rank + 1) * LOCAL].clone().requires_grad_()
        out = ops.broadcast_expert_rows(local, positions)
        grads = [torch.randn(out.shape, generator=torch.Generator().manual_seed(50 + r), dtype=torch.float64)
                 for r in range(world)]
        out.backward(grads[rank])
        expected = torch.zeros_like(local)
        for i, p in enumerate(positions):
            if p // LOCAL == rank:
                expected[p % LOCAL] = sum(g[i] for g in grads)
        torch.testing.assert_close(local.grad, expected, rtol=1e-12, atol=1e-12, msg=lambda m: f"{positions}: {m}")

    if world > 2:  # the explicit sums above cover more owners; central differences cost a collective each
        return
    # distributed gradcheck, through a non-linear function of the copies
    local = torch.randn(LOCAL, 2, generator=torch.Generator().manual_seed(rank), dtype=torch.float64)
    positions = [0, 3] if world == 2 else [1, 2, 5, 6]
    distributed_gradcheck(lambda w: ops.broadcast_expert_rows(w, positions).sin() * 2, (local,))


def check_broadcast_errors(rank, world):
    local = torch.randn(LOCAL, 3)
    n = world * LOCAL
    same_everywhere = {  # every rank passes the same bad list: the checks after the agreement
        "positions must be strictly ascending": [1, 0],
        "positions must be strictly ascending, got \\[0, 1, 1\\]": [0, 1, 1],
        f"positions must be in \\[0, {n}\\), got {n}": [0, n],
        f"positions must be in \\[0, {n}\\), got -1": [-1],
    }
    for message, positions in same_everywhere.items():
        expect_error(RuntimeError, f"moeflux.broadcast_expert_rows: {message}", ops.broadcast_expert_rows, local,
                     positions)
    expect_error(RuntimeError, "local must be \\[E_local, ...\\] with E_local >= 1", ops.broadcast_expert_rows,
                 torch.randn(0, 3), [])
    # ranks that differ: every rank raises at the agreement instead of waiting in a broadcast
    differing = [
        (local, [rank]),  # same length, other experts
        (local, [0] if rank == 0 else [0, 1]),  # other lengths
        (torch.randn(LOCAL + (rank == 0), 3), [0]),  # E_local
        (torch.randn(LOCAL, 3 + (rank == 0)), [0]),  # row size
        (local.double() if rank == 0 else local, [0]),  # dtype
    ]
    for tensor, positions in differing:
        expect_error(RuntimeError, "moeflux.broadcast_expert_rows: ranks of the process group disagree: rank .* "
                                   "passed E_local .*, row numel .*, dtype .*, number of positions .* and fingerprint",
                     ops.broadcast_expert_rows, tensor, positions)
    # one rank's list unsorted: that rank reports its own check, the others which rank failed
    others = "" if rank == 1 else "rank 1 of the process group failed its check: "
    expect_error(RuntimeError, f"moeflux.broadcast_expert_rows: {others}positions must be strictly ascending",
                 ops.broadcast_expert_rows, local, [0, 1] if rank != 1 else [1, 0])
    assert ops.broadcast_expert_rows(torch.ones(LOCAL, 3) * rank, [n - 1]).eq(world - 1).all()  # still usable


# ==== ops: dispatch with routing_counts


def distinct_ids(rank, num_tokens, num_experts, k, seed, drop=0.25):
    gen = torch.Generator().manual_seed(500 * seed + rank)
    ids = torch.empty(num_tokens, k, dtype=torch.int32)
    for t in range(num_tokens):  # k distinct experts per token
        ids[t] = torch.randperm(num_experts, generator=gen)[:k]
    ids[torch.rand(ids.shape, generator=gen) < drop] = -1
    return ids


def check_dispatch_with_counts(rank, world):
    num_experts = LOCAL * world
    num_tokens = [0, 6, 3, 9][rank]
    ids = distinct_ids(rank, num_tokens, num_experts, 2, seed=1)
    gen = torch.Generator().manual_seed(rank)
    x = torch.randn(num_tokens, H, generator=gen, dtype=torch.float64)
    w = torch.rand(num_tokens, 2, generator=gen, dtype=torch.float64)
    gy = torch.randn(num_tokens, H, generator=gen, dtype=torch.float64)
    results = []
    for with_counts in (False, True):
        counts = ops.routing_counts(x, ids, num_experts) if with_counts else None
        xi, wi = x.clone().requires_grad_(), w.clone().requires_grad_()
        ops.reset_collective_counts()
        rows, plan = ops.dispatch(xi, ids, num_experts, routing_counts=counts)
        assert ops.collective_counts() == {"token_all_to_alls": 1, "count_exchanges": 0 if with_counts else 1,
                                           "host_count_reads": 0 if with_counts else 1}
        out = ops.combine(rows.sin() * torch.arange(1, rows.shape[0] + 1, dtype=rows.dtype)[:, None], plan, wi)
        out.backward(gy)
        results.append((rows.detach(), *plan[:5], out.detach(), xi.grad, wi.grad))
        assert plan.capacity is None and plan.group_name == dist.group.WORLD.group_name
    for name, a, b in zip(("rows", "tokens_per_local_expert", "row_map", "regroup_map", "send_splits",
                           "recv_splits", "output", "grad tokens", "grad weights"), *results):
        assert a.dtype == b.dtype and torch.equal(a, b), name

    # a wrong matrix is refused before any collective (every rank passes one)
    counts = ops.routing_counts(x, ids, num_experts)
    for bad in (counts.int(), counts[:, :-1], counts[:1], counts.double()):
        expect_error(RuntimeError, f"moeflux.dispatch: routing_counts must be a CPU int64 \\[P = {world}, E\\]",
                     ops.dispatch, x, ids, num_experts, routing_counts=bad)

    if world > 2:
        return

    def layer(xs, ws):
        counts = ops.routing_counts(xs, ids[:2], num_experts)
        r, p = ops.dispatch(xs, ids[:2], num_experts, routing_counts=counts)
        return ops.combine(r.sin(), p, ws)

    distributed_gradcheck(layer, (x[:2], w[:2]))


def ops_worker(rank, world):
    check_routing_counts(rank, world, None, list(range(world)))
    groups = moeflux.init_expert_parallel(2 if world == 4 else 1)  # a subgroup: counts over its ranks only
    start = rank - groups.ep_rank
    check_routing_counts(rank, world, groups.ep_group, list(range(start, start + groups.ep_size)))
    check_routing_counts_errors(rank, world)
    check_broadcast(rank, world)
    check_broadcast_errors(rank, world)
    check_dispatch_with_counts(rank, world)
    return True


# ---- ranks that disagree on num_experts


def num_experts_mismatch_worker(rank, world):
    x, ids = torch.randn(3, H), torch.zeros(3, 1, dtype=torch.int32)
    expect_error(RuntimeError, "moeflux\\.routing_counts: .*disagree.*num_experts",
                 ops.routing_counts, x, ids, 2 * world * (1 + rank))
    return int(ops.routing_counts(x, ids, 2 * world).sum())  # the group still works


def test_routing_counts_raises_on_every_rank_when_num_experts_differ():
    assert run_ranks(2, num_experts_mismatch_worker, timeout=40) == [6, 6]


def wrong_width_worker(rank, world):
    # a short group timeout: a rank left waiting fails the test in seconds
    groups = moeflux.init_expert_parallel(world, timeout=timedelta(seconds=10))
    for capacity_factor in (None, 1.0):
        layer = make_layer(groups, FixedShadows((0,)), capacity_factor=capacity_factor)
        x = torch.rand(4, H if rank == 0 else H - 1)
        if rank == 0:  # told what the other rank sent; that rank gets its own input's error
            expect_error(RuntimeError, f"disagree: .*hidden size {H - 1}", layer, x)
        else:
            expect_error(ValueError, rf"expects input \[..., d_model={H}\]", layer, x)
        layer(torch.rand(4, H)).sum().backward()  # and the group still works
    return True


def test_a_rank_with_the_wrong_width_makes_every_rank_raise():
    """As for the plain layer (test_expert_parallel): one rank's input has the wrong width; it raises its input's
    error and the others the hidden-size disagreement, none waits or dies."""
    run_ranks(2, wrong_width_worker, timeout=60)


# ==== MoE(exchange=ExchangeConfig(shadowing=...)) against MoE(exchange=ExchangeConfig(shadowing="off"))

FP32 = dict(rtol=1e-6, scale=1e-6)  # relative to the tensor's largest entry: sums in another order
FP64 = dict(rtol=1e-10, scale=1e-10)
BF16 = dict(rtol=2e-2, scale=2e-2)  # the shadows' outputs are rounded to bf16 before they join the others'
TOLERANCE = {torch.float32: FP32, torch.float64: FP64, torch.bfloat16: BF16}


def assert_close(actual, expected, name, rtol, scale):
    atol = scale * float(expected.abs().max()) if expected.numel() else 0.0
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol + 1e-30, msg=lambda m: f"{name}: {m}")


def make_layer(groups, shadowing, seed=7, placement=None, cold=(), hot=(), schedule="bulk", **config):
    torch.manual_seed(seed)
    layer = moeflux.MoE(H, F, LOCAL * groups.ep_size, ep_group=groups,
                        exchange=ExchangeConfig(schedule=schedule, shadowing=shadowing), **config)
    if placement is not None:  # re-place, then re-initialise each row as the expert it now holds
        layer.set_placement(placement)
        layer.experts.reset_parameters()
    with torch.no_grad():  # inputs are positive: these rows make experts never / always chosen
        for e in cold:
            layer.router.weight[e] = -3.0
        for e in hot:
            layer.router.weight[e] = 1.0
    return layer


def inputs(rank, num_tokens, dtype, step=0):
    gen = torch.Generator().manual_seed(1000 * step + rank)
    x = torch.rand(num_tokens, H, generator=gen, dtype=torch.float64) + 0.1
    return x.to(dtype), torch.randn(num_tokens, H, generator=gen, dtype=torch.float64).to(dtype)


def forward_backward(layer, x, gy, model=None):
    """``model``: what to call (``layer`` or a DataParallel around it)."""
    xi = x.clone().requires_grad_()
    y = (model or layer)(xi)
    ((y * gy).sum() + layer.aux_loss).backward()
    return y.detach(), xi.grad


def compare_step(groups, off, shadowed, off_model, shadowed_model, x, gy, tol, label):
    results, expert_rows = [], []
    for layer, model in ((off, off_model), (shadowed, shadowed_model)):
        seen = []  # the rows per local expert that the experts module processed (what came by all-to-all)

        def record(module, args, kwargs, out):  # the shadows' own call (their broadcast weights) is not counted
            if kwargs.get("weights") is None:
                seen.append(args[1].tolist())

        hook = layer.experts.register_forward_hook(record, with_kwargs=True)
        y, grad_x = forward_backward(layer, x, gy, model)
        hook.remove()
        assert len(seen) == 1, seen
        expert_rows.append(seen[0])
        results.append(dict(output=y, grad_x=grad_x, router=layer.router.weight.grad, w_in=layer.experts.w_in.grad,
                            w_out=layer.experts.w_out.grad, aux=layer.aux_loss.detach()))
    for name in results[0]:
        assert_close(results[1][name], results[0][name], f"{label}: {name}", **tol)
    assert torch.equal(shadowed.routed_tokens_per_expert, off.routed_tokens_per_expert), label

    # The shadowed experts' tokens never crossed the network: their owners' experts got none of them, and
    # (dropless, where the plain layer's batch has no padding) the other experts got what they get unshadowed.
    for slot, expert in enumerate(shadowed.placement.experts_of()):
        if expert in shadowed.exchange.shadowed_experts:
            assert expert_rows[1][slot] == 0, (label, expert, expert_rows)
        elif off.capacity_factor is None:
            assert expert_rows[1][slot] == expert_rows[0][slot], (label, expert, expert_rows)


def check_equivalence(rank, groups, policy, num_tokens, capacity_factor=None, activation="swiglu",
                      dtype=torch.float32, placement=None, cold=(), hot=(), expect=None, top_k=2):
    """One forward/backward of the shadowed layer against the plain one, same weights and inputs."""
    config = dict(capacity_factor=capacity_factor, activation=activation, dtype=dtype, cold=cold, hot=hot,
                  placement=placement, top_k=top_k)
    off, shadowed = make_layer(groups, "off", **config), make_layer(groups, policy, **config)
    assert isinstance(off.exchange.transport, FlatTransport) and off.exchange.shadowing is None
    assert isinstance(shadowed.exchange.transport, FlatTransport) and shadowed.exchange.shadowing is not None
    x, gy = inputs(rank, num_tokens, dtype)
    label = f"{policy}, tokens={num_tokens}, capacity_factor={capacity_factor}, {activation}, {dtype}"
    compare_step(groups, off, shadowed, off, shadowed, x, gy, TOLERANCE[dtype], label)
    assert int(off.routed_tokens_per_expert[list(cold)].sum()) == 0, "cold experts must get no tokens"
    chosen = shadowed.exchange.shadowed_experts
    if expect is not None:
        assert chosen == expect, (label, chosen, expect)
    # every rank of the group shadowed the same experts
    everyone = [None] * groups.ep_size
    dist.all_gather_object(everyone, chosen, group=groups.ep_group)
    assert all(c == chosen for c in everyone), everyone
    return chosen, off


def check_cost_model(rank, groups, capacity_factor, num_tokens):
    """The cost-model policy: compute-bound rates and one hot expert make it shadow; it picks what the
    policy computes from every rank's counts, and the layer still equals the plain one. Top-1 routing, so
    that the hot expert's owner is the busiest rank by far."""
    policy = ShadowCostModel(link_bytes_per_s=1e12, flops_per_s=1e3)
    hot = LOCAL * groups.ep_size - 1  # the last rank's last expert: everyone's choice
    chosen, off = check_equivalence(rank, groups, policy, num_tokens, capacity_factor, hot=(hot,), top_k=1)
    assert hot in chosen, chosen
    counts = [torch.zeros_like(off.routed_tokens_per_expert) for _ in range(groups.ep_size)]
    dist.all_gather(counts, off.routed_tokens_per_expert, group=groups.ep_group)  # contiguous: positions = ids
    shape = ExpertShape.of_ffn(H, F, "swiglu", 4)
    assert chosen == policy.choose(torch.stack(counts).numpy(), shape)
    # max_shadows=0: nothing shadowed, still equal
    check_equivalence(rank, groups, ShadowCostModel(1e12, 1e3, max_shadows=0), num_tokens, capacity_factor,
                      hot=(hot,), expect=(), top_k=1)


def check_training(rank, groups, capacity_factor, num_tokens, policy, steps=3):
    """Several AdamW steps under DataParallel (expert gradients reduced over the expert-data-parallel
    group): the shadowed model follows the plain one; checkpoints hold no shadow copies."""
    config = dict(capacity_factor=capacity_factor, aux_loss_weight=0.1)
    off, shadowed = make_layer(groups, "off", **config), make_layer(groups, policy, **config)
    off_model, shadowed_model = moeflux.DataParallel(off), moeflux.DataParallel(shadowed)
    optimizers = [torch.optim.AdamW(layer.parameters(), lr=3e-2, weight_decay=0.1) for layer in (off, shadowed)]
    for step in range(steps):
        for optimizer in optimizers:
            optimizer.zero_grad()
        tokens = num_tokens if capacity_factor is not None else num_tokens + 2 * step + rank
        x, gy = inputs(rank, tokens, torch.float32, step=step + 1)
        compare_step(groups, off, shadowed, off_model, shadowed_model, x, gy, FP32,
                     f"step {step}, {policy}, capacity_factor={capacity_factor}")
        assert shadowed.exchange.shadowed_experts, "the policy must shadow something for this test to mean much"
        for optimizer in optimizers:
            optimizer.step()
        for name, p in off.named_parameters():
            assert_close(dict(shadowed.named_parameters())[name].detach(), p.detach(), f"step {step}: {name}", **FP32)
    # checkpoints: the same entries (one per global expert this rank holds, the router), the same values
    state, reference = shadowed.state_dict(), off.state_dict()
    assert list(state) == list(reference)
    assert set(state) == {"router.weight"} | {f"experts.{e}.{w}" for e in shadowed.placement.experts_of()
                                              for w in ("w_in", "w_out")}
    for key in reference:
        assert_close(state[key], reference[key], f"state_dict {key}", **FP32)
    assert shadowed.experts.w_in.shape == (LOCAL, H, 2 * F)  # the shadows were never stored in the layer
    assert [n for n, _ in shadowed.named_parameters()] == [n for n, _ in off.named_parameters()]
    # and the checkpoint loads into a plain layer, which then computes the same
    fresh = make_layer(groups, "off", seed=99, **config)
    fresh.load_state_dict(state)
    x, gy = inputs(rank, num_tokens, torch.float32, step=50)
    y_fresh, _ = forward_backward(fresh, x, gy)
    y_shadowed, _ = forward_backward(shadowed, x, gy)
    assert_close(y_shadowed, y_fresh, "reloaded", **FP32)


def moe_worker(rank, world, ep_sizes):
    for ep_size in ep_sizes:
        groups = moeflux.init_expert_parallel(ep_size)
        num_experts, me = LOCAL * ep_size, groups.ep_rank
        every = tuple(range(num_experts))
        uneven = [0, 5, 9, 3][me]  # dropless: the group's first rank routes no tokens
        cold = (1, num_experts - 2)  # never chosen (one on the first rank, one on the last but one position)
        reversed_ranks = [[2 * r + 1, 2 * r] for r in reversed(range(ep_size))]
        permuted = ExpertPlacement.from_ranks(reversed_ranks, ep_rank=me)
        cases = [
            # (policy, tokens, capacity_factor, options, the experts it must shadow)
            (FixedShadows((num_experts - 1,)), uneven, None, {}, (num_experts - 1,)),
            (FixedShadows(every), uneven, None, dict(activation="gelu"), every),
            (FixedShadows(cold), 7, None, dict(cold=cold), cold),  # shadows that receive no tokens
            (FixedShadows((0, *cold, num_experts - 1)), 7, None, dict(cold=cold), (0, *cold, num_experts - 1)),
            (FixedShadows((0,)), 6, 1.0, {}, (0,)),  # capacity: equal tokens per rank
            (FixedShadows(every), 8, 0.5, dict(activation="gelu"), every),  # capacity with drops
            (FixedShadows((2, 0)), uneven, None, dict(placement=permuted), (2, 0)),  # positions 1 and 3 (ep 2)
            (FixedShadows((3,)), 6, 1.0, dict(placement=permuted), (3,)),
            (FixedShadows((0, num_experts - 1)), uneven, None, dict(dtype=torch.float64), (0, num_experts - 1)),
            (FixedShadows((0, num_experts - 1)), 6, 1.0, dict(dtype=torch.bfloat16), (0, num_experts - 1)),
            ("auto", uneven, None, {}, None),  # the CPU default rates: whatever they pick, nothing changes
            (1, 6, 1.0, {}, None),
        ]
        for policy, tokens, capacity_factor, options, expected in cases:
            check_equivalence(rank, groups, policy, tokens, capacity_factor, expect=expected, **options)
        # shadowing on a permuted placement: expert e reported by the global id it has, in position order
        chosen, _ = check_equivalence(rank, groups, FixedShadows((1, 2)), 4, None, placement=permuted)
        assert sorted(chosen) == [1, 2] and list(chosen) == sorted(chosen, key=permuted.expert_at.index)
        check_cost_model(rank, groups, None, [4, 6, 5, 7][me])  # every rank sends rows to the hot expert
        check_cost_model(rank, groups, float(num_experts), 6)  # capacity = tokens: the hot expert keeps all
        # several training steps; under DataParallel when ep < world
        hot_fixed = FixedShadows((0, num_experts - 1))
        check_training(rank, groups, None, 5, hot_fixed)
        check_training(rank, groups, 1.0, 6, FixedShadows(every))
    return True


# ==== options


def options_worker(rank, world):
    groups = moeflux.init_expert_parallel(world)
    make = lambda **kw: moeflux.MoE(H, F, LOCAL * world, ep_group=groups, exchange=ExchangeConfig(**kw))  # noqa: E731
    assert make(shadowing="auto").exchange.policy == ShadowCostModel.default_for("cpu")
    assert make(shadowing=3).exchange.policy == ShadowCostModel.default_for("cpu", max_shadows=3)
    assert make(shadowing=0).exchange.policy.max_shadows == 0
    policy = ShadowCostModel(1e9, 1e9, 2)
    assert make(shadowing=policy).exchange.policy is policy
    for off in ("off", None):
        exchange = make(shadowing=off).exchange
        assert type(exchange.transport) is FlatTransport and exchange.shadowing is None and exchange.policy is None
    for bad in ("on", "fixed", -1, 1.5, True, [0]):  # every rank raises the same error
        expect_error(ValueError, "shadowing must be 'off', 'auto', an int >= 0 or a ShadowCostModel / FixedShadows",
                     make, shadowing=bad)
    # shadowing with the staged schedules: the same outputs and gradients as the plain bulk layer
    off = make_layer(groups, "off")
    x, gy = inputs(rank, 5 + rank, torch.float32)
    expected = forward_backward(off, x, gy), off.experts.w_in.grad, off.experts.w_out.grad, off.router.weight.grad
    for schedule in ("chunked", "pairwise"):
        shadowed = make_layer(groups, FixedShadows((0, LOCAL * world - 1)), schedule=schedule)
        assert shadowed.exchange.schedule.staged and shadowed.exchange.shadowing is not None
        got = (forward_backward(shadowed, x, gy), shadowed.experts.w_in.grad, shadowed.experts.w_out.grad,
               shadowed.router.weight.grad)
        assert shadowed.exchange.shadowed_experts == (0, LOCAL * world - 1)
        for name, a, b in zip(("output", "grad x", "w_in", "w_out", "router"), (*got[0], *got[1:]),
                              (*expected[0], *expected[1:])):
            assert_close(a, b, f"{schedule} + shadowing: {name}", **FP32)
    # expert biases (GPT-OSS) with shadowing: the shadows carry their owners' biases
    off, shadowed = (make_layer(groups, shadowing, expert_bias=True) for shadowing in ("off", FixedShadows((1,))))
    assert bool(off.experts.b_in.ne(0).any()) and bool(off.experts.b_out.ne(0).any())
    (y0, g0), (y1, g1) = forward_backward(off, x, gy), forward_backward(shadowed, x, gy)
    assert shadowed.exchange.shadowed_experts == (1,)
    for name, a, b in (("output", y1, y0), ("grad x", g1, g0),
                       *((w, getattr(shadowed.experts, w).grad, getattr(off.experts, w).grad)
                         for w in ("w_in", "w_out", "b_in", "b_out"))):
        assert_close(a, b, f"expert_bias + shadowing: {name}", **FP32)
    expect_error(ValueError, "disagree on exchange_shadowing", make, shadowing="auto" if rank == 0 else "off")
    expect_error(TypeError, "policy must be a ShadowCostModel or FixedShadows", Shadowing, "auto", groups.ep_group)

    # an expert-parallel group of one rank: shadowing still works (every expert is local)
    single = moeflux.init_expert_parallel(1)
    torch.manual_seed(0)
    off = moeflux.MoE(H, F, 4, ep_group=single)
    torch.manual_seed(0)
    shadowed = moeflux.MoE(H, F, 4, ep_group=single, exchange=ExchangeConfig(shadowing=FixedShadows((1, 3))))
    x, gy = inputs(rank, 5, torch.float32)
    (y0, g0), (y1, g1) = forward_backward(off, x, gy), forward_backward(shadowed, x, gy)
    assert_close(y1, y0, "ep_size 1: output", **FP32)
    assert_close(g1, g0, "ep_size 1: grad", **FP32)
    assert_close(shadowed.experts.w_in.grad, off.experts.w_in.grad, "ep_size 1: w_in", **FP32)
    assert shadowed.exchange.shadowed_experts == (1, 3)
    return True


def world_worker(rank, world):
    ops_worker(rank, world)
    if world == 2:
        options_worker(rank, world)
    moe_worker(rank, world, (2,) if world == 2 else (4, 2))
    return True


@pytest.mark.parametrize("world", [2, 4])
def test_shadowing_on_gloo_ranks(world):
    """One spawned world per size (spawning is what costs):

    - ops: routing_counts vs brute force (-1 ids, a rank without tokens, a subgroup) and its errors on every
      rank; broadcast_expert_rows' rows, gradients (explicit sums; gradcheck on world 2) and errors on every
      rank; dispatch(routing_counts=) equals dispatch: rows, plan, output, gradients, no count exchange;
    - options with a group (world 2): "auto", ints, policies, bad values and disagreeing ranks, shadowing
      with the chunked and pairwise schedules and with expert biases (equal to the plain layer), an
      expert-parallel group of one rank;
    - shadowing=... equals shadowing="off": world 2 (ep 2), world 4 (ep 4, and ep 2 under
      DataParallel), fixed and cost-model policies, dropless and capacity, several AdamW steps, checkpoints.
    """
    assert all(run_ranks(world, world_worker))


@pytest.mark.parametrize("bad", ["on", "", -2, 2.0, False, object()])
def test_bad_shadowing_values_raise(bad):
    with pytest.raises(ValueError, match="shadowing must be 'off', 'auto', an int >= 0"):
        moeflux.MoE(H, F, 4, exchange=ExchangeConfig(shadowing=bad))


@pytest.mark.parametrize("shadowing", ["auto", 2, FixedShadows((0, 3)), ShadowCostModel(1e12, 1.0)])
def test_without_a_group_shadowing_is_a_no_op(shadowing):
    torch.manual_seed(0)
    plain = moeflux.MoE(H, F, 4)
    torch.manual_seed(0)
    layer = moeflux.MoE(H, F, 4, exchange=ExchangeConfig(shadowing=shadowing))
    assert type(layer.exchange.transport) is LocalTransport and layer.exchange.shadowing is None
    for schedule in ("bulk", "chunked", "pairwise"):  # any schedule: nothing to stage without a group
        exchange = make_exchange(ExpertPlacement(4), None, ExchangeConfig(schedule=schedule,
                                                                           shadowing=FixedShadows((0,))))
        assert type(exchange.transport) is LocalTransport and exchange.shadowing is None
    x = torch.rand(6, H)
    y, y_plain = layer(x), plain(x)
    assert torch.equal(y, y_plain)
    y.sum().backward()
    y_plain.sum().backward()
    assert torch.equal(layer.experts.w_in.grad, plain.experts.w_in.grad)
