"""Ranks that disagree, or one rank with bad arguments, at moeflux.ops.dispatch: every rank raises the same
clear error within seconds (no hang until the group's timeout, no abort inside gloo), and the group stays usable.
World 2 and 4, gloo, spawned processes, a 20 s group timeout."""

import re
import time

import pytest
import torch
import torch.distributed as dist

from moeflux import ops
from moeflux.distributed import exchange_checked
from multiprocess import MAX_ERROR_BYTES, carried, run_ranks

HIDDEN, EXPERTS = 6, 8


class Own(str):
    """The pattern of rank 0's own failed check: its message; every other rank raises it too, carried."""


def check_outcome(name, pattern, messages, op):
    """Every rank's first line of a case (``pattern``: each rank's, or Own: rank 0's, carried to the others)."""
    for rank, message in enumerate(messages):
        if isinstance(pattern, Own) and rank > 0:
            assert message == carried(messages[0], 0), (name, rank, message, messages[0])
        else:
            assert re.search(pattern, message), (name, rank, message)
        assert pattern == "no error" or op in message, (name, rank, message)


def args(rank, tokens=5, hidden=HIDDEN, experts=EXPERTS, dtype=torch.float32, k=2, ids_dtype=torch.int32):
    gen = torch.Generator().manual_seed(rank)
    x = torch.randn(tokens, hidden, generator=gen).to(dtype)
    ids = torch.randint(0, experts, (tokens, k), generator=gen).to(ids_dtype)
    return x, ids


# name: (what rank 0 passes, what the other ranks pass, the message every rank must get): dicts of args()
# overrides and dispatch arguments.
CASES = {
    "num_experts differ": (dict(num_experts=4, experts=4), dict(), "disagree"),
    "hidden size differs": (dict(hidden=8), dict(), "disagree"),
    "dtype differs": (dict(dtype=torch.float64), dict(), "disagree"),
    "capacity differs": (dict(capacity=3), dict(capacity=4), "disagree"),
    "dropless vs capacity": (dict(capacity=3), dict(), "disagree"),
    "ids int64 on one rank": (dict(ids_dtype=torch.int64), dict(), Own("expert_ids must be Int")),
    "id out of range on one rank": (dict(bad_id=EXPERTS), dict(), Own("must be in \\[0")),
    "num_experts not a multiple of the group": (dict(num_experts=EXPERTS + 1), dict(),
                                                Own("positive multiple")),
    "3-D tokens on one rank": (dict(three_d=True), dict(), Own("must be 2-D")),
    "float16 tokens on one rank": (dict(dtype=torch.float16), dict(), "disagree"),
    "k differs": (dict(k=3), dict(), "no error"),  # k is per rank: slots, not rows, differ
    "ids rows differ from tokens": (dict(short_ids=True), dict(), Own("expert_ids.size\\(0\\)")),
    "negative capacity on one rank": (dict(capacity=-1), dict(capacity=2), Own("capacity must be")),
}

# Cases that are not errors: capacity mode with a different number of tokens per rank, or none (the capacity is
# per rank: every rank sends capacity rows per expert), and dropless with a rank without tokens.
GOOD = {
    "capacity, tokens 8 vs 12": (dict(tokens=8, capacity=3), dict(tokens=12, capacity=3)),
    "capacity, a rank without tokens": (dict(tokens=0, capacity=3), dict(tokens=9, capacity=3)),
    "dropless, a rank without tokens": (dict(tokens=0), dict(tokens=7)),
}


def call(rank, spec):
    spec = dict(spec)
    num_experts = spec.pop("num_experts", EXPERTS)
    capacity = spec.pop("capacity", None)
    bad_id, three_d = spec.pop("bad_id", None), spec.pop("three_d", False)
    short_ids = spec.pop("short_ids", False)
    x, ids = args(rank, **spec)
    if bad_id is not None:
        ids[0, 0] = bad_id
    if three_d:
        x = x.unsqueeze(0)
    if short_ids:
        ids = ids[:-1]
    x.requires_grad_()
    rows, plan = ops.dispatch(x, ids, num_experts, capacity)
    out = ops.combine(rows * 2, plan)
    out.sum().backward()
    return out


def fault_worker(rank, world):
    outcomes = {}
    for name, (first, others, _) in CASES.items():
        start = time.monotonic()
        try:
            call(rank, first if rank == 0 else others)
            outcomes[name] = ("no error", time.monotonic() - start)
        except RuntimeError as error:
            outcomes[name] = (str(error).splitlines()[0], time.monotonic() - start)
    for name, (first, others) in GOOD.items():
        spec = first if rank == 0 else others
        x, ids = args(rank, **{k: v for k, v in spec.items() if k in ("tokens",)})
        out = call(rank, spec)
        # Each token's output is twice the sum of its kept slots' rows: its own row, k times if none dropped.
        _, _, row_map = ops.permute(x, ids, EXPERTS, spec.get("capacity"))  # the slots dispatch keeps
        expected = 2 * x * (row_map >= 0).sum(1, keepdim=True)
        torch.testing.assert_close(out, expected)
    dist.barrier()  # the group is still usable
    return outcomes


@pytest.mark.parametrize("world", [2, 4])
def test_every_rank_raises_the_same_clear_error(world):
    results = run_ranks(world, fault_worker, timeout=240)
    for name, (_, _, pattern) in CASES.items():
        check_outcome(name, pattern, [outcomes[name][0] for outcomes in results], "moeflux.dispatch")
        assert all(outcomes[name][1] < 15 for outcomes in results), name


# ---- moeflux.ops.all_to_all: splits are the caller's, so ranks can pass splits that do not match each other.

def _even_splits(world, rows=2):
    return [rows] * world


# name: (rank 0's (input rows, width, dtype, output splits, input splits) changes, the message on every rank)
ALL_TO_ALL_CASES = {
    "rank 0 sends one row more than rank 1 expects": (dict(send_to_1=3), "rank 0 sends 3 rows to rank 1, which expects 2"),
    "rank 0 expects one row more from rank 1": (dict(expect_from_1=3), "rank 1 sends 2 rows to rank 0, which expects 3"),
    "row width differs": (dict(width=5), "disagree on the rows: rank 0 sends 2-D rows of 5 elements"),
    "dtype differs": (dict(dtype=torch.float64), "disagree on the rows: rank 0 sends 2-D rows of 4 elements of dtype Double"),
    "one split too many on one rank": (dict(extra_split=True), Own("must have one entry per rank")),
    "a negative split on one rank": (dict(negative=True), Own("must be >= 0")),
    "splits do not sum to the rows on one rank": (dict(rows_off=1), Own("must sum to input.size")),
    "a 0-D input on one rank": (dict(scalar=True), Own("must sum to input.size")),
}


def all_to_all_call(rank, world, spec):
    width, dtype = spec.get("width", 4), spec.get("dtype", torch.float32)
    out_splits, in_splits = _even_splits(world), _even_splits(world)
    if "send_to_1" in spec:
        in_splits[1] = spec["send_to_1"]
    if "expect_from_1" in spec:
        out_splits[1] = spec["expect_from_1"]
    if spec.get("extra_split"):
        in_splits.append(0)
    if spec.get("negative"):
        in_splits[0], in_splits[1] = -1, in_splits[1] + 3
    rows = sum(s for s in in_splits) + spec.get("rows_off", 0)
    x = torch.tensor(1.0) if spec.get("scalar") else torch.full((max(rows, 0), width), float(rank), dtype=dtype)
    return ops.all_to_all(x.requires_grad_(), out_splits, in_splits)


def all_to_all_worker(rank, world):
    outcomes = {}
    for name, (first, _) in ALL_TO_ALL_CASES.items():
        start = time.monotonic()
        try:
            all_to_all_call(rank, world, first if rank == 0 else {})
            outcomes[name] = ("no error", time.monotonic() - start)
        except RuntimeError as error:
            outcomes[name] = (str(error).splitlines()[0], time.monotonic() - start)
    out = all_to_all_call(rank, world, {})  # the group still works, and the result is right
    out.sum().backward()
    expected = torch.cat([torch.full((2, 4), float(src)) for src in range(world)])
    torch.testing.assert_close(out, expected)
    return outcomes, failed_check_outcomes(rank, world)


# ---- the agreement exchange itself (moeflux.distributed.exchange_checked, the ops' exchange_checked): what a
# failing rank's error becomes on the others. Run in the all-to-all's ranks.

LONG_ERROR = "é" * 300  # 600 bytes of 2-byte characters: the cut (509 bytes, then "...") falls inside one


def failed_check_outcomes(rank, world):
    def attempt(error, fields=(), op=exchange_checked):
        try:
            return op(dist.group.WORLD, "moeflux.check", error, fields).tolist()
        except (ValueError, RuntimeError) as e:
            return str(e).splitlines()[0]

    # a C++ op's error over the bound: move_expert_rows prints the whole bad table
    identity = list(range(150 * world))
    duplicate = identity[:-1] + [0] if rank == 1 else identity
    return {
        "fields": attempt(None, [rank, 10 * rank]),
        "long": attempt(LONG_ERROR if rank == 1 else None),
        "ranks 1 and 3 fail": attempt(f"bad on rank {rank}" if rank % 2 else None),
        "long op error": attempt(None, op=lambda *_: ops.move_expert_rows(torch.zeros(150, 1), identity,
                                                                           duplicate)),
    }


@pytest.fixture(scope="module", params=[2, 4])
def all_to_all_results(request):
    return run_ranks(request.param, all_to_all_worker, timeout=120)


def test_all_to_all_with_splits_that_do_not_match_raises_on_every_rank(all_to_all_results):
    for name, (_, pattern) in ALL_TO_ALL_CASES.items():
        check_outcome(name, pattern, [outcomes[name][0] for outcomes, _ in all_to_all_results], "moeflux.all_to_all")
        assert all(outcomes[name][1] < 15 for outcomes, _ in all_to_all_results), name


def test_every_rank_raises_with_the_failing_ranks_own_error_bounded(all_to_all_results):
    results = [outcomes for _, outcomes in all_to_all_results]
    world = len(results)
    assert all(r["fields"] == [[rank, 10 * rank] for rank in range(world)] for r in results)
    for rank, r in enumerate(results):
        # the error at most 512 bytes, cut between two characters, marked: truncated, not dropped
        assert r["long"] == ("moeflux.check: " + LONG_ERROR if rank == 1 else
                             "moeflux.check: rank 1 of the process group failed its check: " + "é" * 254 + "...")
        assert rank == 1 or len(r["long"].split("check: ")[-1].encode()) == 508 + 3 <= MAX_ERROR_BYTES
        assert r["ranks 1 and 3 fail"] == (f"moeflux.check: bad on rank {rank}" if rank % 2 else
                                           "moeflux.check: rank 1 of the process group failed its check"
                                           + (" (so did rank 3)" if world == 4 else "") + ": bad on rank 1")
        own = results[1]["long op error"]
        assert own.startswith("moeflux.move_expert_rows: expert tables must be permutations of range")
        assert len(own.encode()) > 2 * MAX_ERROR_BYTES
        assert r["long op error"] == (own if rank == 1 else carried(own, 1))
        assert rank == 1 or len(r["long op error"].split("check: ")[1].encode()) == MAX_ERROR_BYTES  # ASCII: 509 + 3
