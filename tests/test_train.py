"""The main job, examples/train_moe_lm.py: a tiny end-to-end run on 2 ranks, resume on
another number of ranks, determinism, one-line errors for bad input, run folders never
written over without --overwrite, and the plots."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from multiprocess import run_ranks

SCRIPT = Path(__file__).resolve().parent.parent / "examples" / "train_moe_lm.py"
TINY = ["--steps", "6", "--batch", "2", "--seq-len", "16", "--d-model", "16", "--heads", "2", "--d-ffn", "16",
        "--experts", "4", "--eval-bytes", "2000", "--checkpoint-every", "3"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A small folder of real Python source (a slice of the standard library)."""
    import json as json_module  # any stdlib package works; json is small

    src = tmp_path_factory.mktemp("data")
    from pathlib import Path

    for path in sorted(Path(json_module.__file__).parent.glob("*.py")):
        (src / path.name).write_bytes(path.read_bytes())
    for i in range(30):  # more files so that some are held out
        (src / f"copy{i}.py").write_bytes((Path(json_module.__file__).parent / "decoder.py").read_bytes())
    return src


def tensors_of(saved) -> list[torch.Tensor]:
    if torch.is_tensor(saved):
        return [saved]
    values = saved.values() if isinstance(saved, dict) else saved if isinstance(saved, (list, tuple)) else ()
    return [t for v in values for t in tensors_of(v)]


def check_checkpoint_holds_its_bytes_only(path: Path) -> int:
    """Every tensor of the checkpoint owns exactly its bytes (no view dragging a whole expert stack along) and
    the file is those bytes plus a little bookkeeping. Returns the tensor bytes."""
    tensors = tensors_of(torch.load(path, weights_only=True))
    own = sum(t.numel() * t.element_size() for t in tensors)
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    assert sum(storages.values()) == own and len(storages) == len(tensors)
    assert own < path.stat().st_size < own + 1024 * len(tensors)
    return own


def run(*args, check=True, cwd=None):
    result = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=600,
                            cwd=cwd)
    if check and result.returncode != 0:
        raise AssertionError(result.stdout + result.stderr)
    return result


def test_trains_writes_run_folder_and_resumes_on_another_number_of_ranks(corpus, tmp_path):
    out = tmp_path / "run"
    result = run("--data", str(corpus), "--out", str(out), "--nproc", "2", *TINY,
                 "--record-routing", str(out / "routing.npz"), "--record-every", "2")
    assert "held-out:" in result.stdout and "unigram baseline" in result.stdout
    # the routing, in the layout of the shared trace: [step, source rank, layer, micro-batch, expert]
    from moeflux.sim import load_trace

    trace = load_trace(out / "routing.npz")
    assert trace.counts.shape == (3, 2, 2, 1, 4) and trace.iterations.tolist() == [2, 4, 6]
    assert (trace.counts.sum(-1) == 2 * 16 * 2).all()  # every slot of a rank's batch x seq-len tokens, top-2
    for name in ("metrics.json", "loss.png", "expert_load.png", "checkpoint.pt"):
        assert (out / name).is_file(), name
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["ep_size"] == 2 and metrics["steps"][-1] == 6
    assert len(metrics["expert_load"][0]) == 2 and len(metrics["expert_load"][0][0]) == 4  # [layers][experts]
    saved = torch.load(out / "checkpoint.pt", weights_only=True)
    assert {f"blocks.0.mlp.experts.{e}.w_in" for e in range(4)} <= set(saved["model"])  # every expert, by index
    # the model's parameters and AdamW's two moments of each, stored once, whatever the number of ranks
    parameters = sum(t.numel() for t in saved["model"].values())
    saved_bytes = check_checkpoint_holds_its_bytes_only(out / "checkpoint.pt")
    assert saved_bytes == 3 * 4 * parameters + 4 * len(saved["optimizer"])  # fp32 weights, moments, step

    # Resumed into another folder: the run's record goes there, whole; the checkpoint's folder is left alone.
    before = folder_state(out)
    resumed = tmp_path / "resumed"
    result = run("--data", str(corpus), "--out", str(resumed), "--nproc", "1", "--resume", str(out / "checkpoint.pt"),
                 *TINY[:1], "9", *TINY[2:])
    assert f"resumed from step 6 of {out / 'checkpoint.pt'}: training to step 9 in {resumed}/" in result.stdout
    again = json.loads((resumed / "metrics.json").read_text())
    assert again["steps"] == metrics["steps"] + [7, 8, 9] and again["resumed_at"] == [6]
    assert again["train_seconds"] > metrics["train_seconds"]
    assert folder_state(out) == before
    assert check_checkpoint_holds_its_bytes_only(resumed / "checkpoint.pt") == saved_bytes  # 1 rank, as 2

    # On another number of ranks each step's batch is another (each rank draws its own), so the state is compared
    # where it can be: loaded on 1 rank and saved again, the checkpoint comes back bit for bit (every expert's rows
    # and AdamW moments, written by 2 ranks, read and gathered by one).
    again_path = tmp_path / "again.pt"
    run_ranks(1, reload_and_save, out / "checkpoint.pt", again_path)
    keys = ("model", "optimizer", "param_groups", "scheduler", "step")  # "placements" says which layout wrote it
    assert_same_state(*({k: saved[k] for k in keys} for saved in (torch.load(again_path, weights_only=True),
                                                                 torch.load(out / "checkpoint.pt", weights_only=True))))


def reload_and_save(rank, world, path, again):
    """The main job's checkpoint loaded into this world's model and optimizer (its own layout), then saved."""
    sys.path.insert(0, str(SCRIPT.parent))
    import moeflux
    from moe_lm import checkpoint
    from moe_lm.model import ByteLM, ModelConfig

    saved = torch.load(path, weights_only=True)
    lm = ByteLM(ModelConfig(**saved["config"]), moeflux.init_expert_parallel(world))
    optimizer = torch.optim.AdamW(lm.parameters())
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    step, metrics = checkpoint.load(path, lm, optimizer, schedule)
    checkpoint.save(again, lm, optimizer, schedule, step, saved["config"], metrics)


def assert_same_state(got: dict, expected: dict, path: str = "") -> None:
    """The same checkpoint contents, tensor for tensor, bit for bit (weights, AdamW's moments and steps, the
    schedule)."""
    assert type(got) is type(expected), path
    if isinstance(expected, dict):
        assert set(got) == set(expected), path
        for key in expected:
            assert_same_state(got[key], expected[key], f"{path}.{key}")
    elif isinstance(expected, (list, tuple)):
        assert len(got) == len(expected), path
        for i, (a, b) in enumerate(zip(got, expected)):
            assert_same_state(a, b, f"{path}[{i}]")
    elif torch.is_tensor(expected):
        assert got.dtype == expected.dtype and torch.equal(got, expected), path
    else:
        assert got == expected, path


def test_a_stopped_run_resumed_is_the_run_that_never_stopped(corpus, tmp_path):
    """Stopped after step 3 of 6 (--stop-after: what a signal does, at a known step) and resumed on as many ranks:
    the same loss at every step and, at the end, the same weights, optimizer state and schedule, bit for bit."""
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    run("--data", str(corpus), "--out", str(whole), "--nproc", "2", *TINY)
    stopped = run("--data", str(corpus), "--out", str(parts), "--nproc", "2", *TINY, "--stop-after", "3")
    assert f"stopped (--stop-after) after step 3 of 6: saved {parts}/" in stopped.stderr
    assert torch.load(parts / "checkpoint.pt", weights_only=True)["step"] == 3
    run("--data", str(corpus), "--nproc", "2", "--resume", str(parts / "checkpoint.pt"), *TINY[2:])  # to step 6
    expected = torch.load(whole / "checkpoint.pt", weights_only=True)
    got = torch.load(parts / "checkpoint.pt", weights_only=True)
    assert_same_state({k: got[k] for k in ("model", "optimizer", "param_groups", "scheduler", "step", "placements")},
                      {k: expected[k] for k in ("model", "optimizer", "param_groups", "scheduler", "step", "placements")})
    ours, theirs = (json.loads((folder / "metrics.json").read_text()) for folder in (parts, whole))
    assert ours["steps"] == theirs["steps"] == list(range(1, 7))
    assert ours["train_bits_per_byte"] == theirs["train_bits_per_byte"]  # the loss of every step, exactly
    assert ours["eval"] == theirs["eval"]


def folder_state(folder: Path) -> dict[str, tuple[int, bytes]]:
    """Each file's modification time and bytes: equal states mean nothing was written there."""
    return {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(folder.iterdir()) if p.is_file()}


def test_same_seed_same_run(corpus, tmp_path):
    """Twice the same run, the second one --overwrite the first's folder (replaced whole: its checkpoint too)."""
    first = run("--data", str(corpus), "--out", str(tmp_path / "a"), "--nproc", "2", *TINY)
    a = json.loads((tmp_path / "a" / "metrics.json").read_text())
    before = folder_state(tmp_path / "a")
    second = run("--data", str(corpus), "--out", str(tmp_path / "a"), "--nproc", "2", *TINY, "--overwrite")
    b = json.loads((tmp_path / "a" / "metrics.json").read_text())
    assert a["train_bits_per_byte"] == b["train_bits_per_byte"] and a["eval"] == b["eval"]
    after = folder_state(tmp_path / "a")
    assert after.keys() == before.keys() and all(after[k][0] > before[k][0] for k in before)
    assert first.stdout.splitlines()[-2].split(";")[0] == second.stdout.splitlines()[-2].split(";")[0]


def test_compiled_run_trains_as_the_eager_one(corpus, tmp_path):
    """--compile (torch.compile, the whole forward as one graph): the same losses and held-out figure as eager,
    up to the order of floating-point sums in the fused kernels."""
    run("--data", str(corpus), "--out", str(tmp_path / "eager"), "--nproc", "2", *TINY)
    run("--data", str(corpus), "--out", str(tmp_path / "compiled"), "--nproc", "2", *TINY, "--compile")
    eager = json.loads((tmp_path / "eager" / "metrics.json").read_text())
    compiled = json.loads((tmp_path / "compiled" / "metrics.json").read_text())
    np.testing.assert_allclose(compiled["train_bits_per_byte"], eager["train_bits_per_byte"], rtol=1e-4)
    np.testing.assert_allclose(compiled["eval"][-1]["bits_per_byte"], eager["eval"][-1]["bits_per_byte"], rtol=1e-4)


def test_bad_input_is_one_line(corpus, tmp_path, monkeypatch):
    empty = tmp_path / "empty"
    empty.mkdir()
    (tmp_path / "run").mkdir()
    other = tmp_path / "other.pt"
    garbage, foreign = tmp_path / "garbage.pt", tmp_path / "foreign.pt"
    garbage.write_bytes(os.urandom(4096))
    torch.save({"state_dict": {"w": torch.zeros(2)}}, foreign)
    run("--data", str(corpus), "--out", str(tmp_path / "run"), "--nproc", "1", *TINY)
    finished = folder_state(tmp_path / "run")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "metrics.json").write_text("{}")  # a folder that holds a run, as far as a run can tell
    cases = {
        ("--data", str(corpus), "--out", str(tmp_path / "run")):
            f"{tmp_path / 'run'}/ already holds a run (metrics.json, checkpoint.pt): pass --overwrite to replace it, "
            f"or --out another folder",
        ("--data", str(tmp_path / "missing")): "no such folder",
        ("--data", str(empty)): "holds no .py files",
        ("--data", str(corpus), "--seq-len", "100000000"): "is longer than the training data",
        ("--data", str(corpus), "--nproc", "2", "--ep-size", "3"): "--ep-size 3 must divide the number of ranks (2)",
        ("--data", str(corpus), "--nproc", "2", "--experts", "3"):
            "the expert-parallel size (2: every rank) must divide --experts 3",
        ("--data", str(corpus), "--experts", "8", "--resume", str(tmp_path / "run" / "checkpoint.pt")):
            "was written for a different model: experts 4 (now 8)",
        ("--data", str(corpus), "--resume", str(other)): "no such file",
        ("--data", str(corpus), "--resume", str(garbage)): "not a PyTorch checkpoint",
        ("--data", str(corpus), "--resume", str(foreign)): "a PyTorch file, but not one of this script's checkpoints",
        ("--data", str(corpus), "--resume", str(tmp_path / "run" / "checkpoint.pt")):
            "is at step 6: --steps 6 leaves nothing to train",
        ("--data", str(corpus), "--out", str(corpus / "decoder.py" / "run")):
            f"--out {corpus / 'decoder.py' / 'run'}: cannot write there (Not a directory)",
        ("--data", str(corpus), "--record-routing", str(corpus / "decoder.py" / "r.npz")):
            "--record-routing",
        ("--data", str(corpus), "--heads", "3"): "--heads 3 must divide --d-model 16",
        ("--data", str(corpus), "--top-k", "5"): "--top-k must be in [1, --experts=4], got 5",
        ("--data", str(corpus), "--capacity-factor", "0"): "--capacity-factor must be a finite number > 0, got 0.0",
        ("--data", str(corpus), "--capacity-factor", "nan"): "--capacity-factor must be a finite number > 0, got nan",
        ("--data", str(corpus), "--lr", "-1"): "--lr must be a finite number > 0, got -1.0",
        ("--data", str(corpus), "--aux-loss-weight", "-1"): "--aux-loss-weight must be a finite number >= 0",
        ("--data", str(corpus), "--eval-bytes", "10"): "--eval-bytes must hold at least one sequence",
        ("--data", str(corpus), "--nproc", "0"): "--nproc must be >= 1, got 0",
        ("--data", str(corpus), "--nproc", "1", "--ep-size", "0"): "--ep-size 0 must divide the number of ranks (1)",
        ("--data", str(corpus), "--nproc", "3", "--experts", "4"):
            "the expert-parallel size (3: every rank) must divide --experts 4",
        ("--data", str(corpus / "__init__.py") if (corpus / "__init__.py").exists() else str(SCRIPT)):
            "not a folder",
        ("--data", str(corpus), "--steps", "0"): "--steps must be >= 1, got 0",
        ("--data", str(corpus), "--stop-after", "0"): "--stop-after must be >= 1, got 0",
        ("--data", str(corpus), "--seq-len", "1"): "--seq-len must be >= 2, got 1",
    }
    sys.path.insert(0, str(SCRIPT.parent))
    from moe_lm.train import main

    monkeypatch.chdir(tmp_path)
    for i, (extra, message) in enumerate(cases.items()):
        if i < 2:  # as a process: exactly one line on stderr and a failing exit code
            result = run(*TINY, *extra, check=False, cwd=tmp_path)
            lines = result.stderr.strip().splitlines()
            assert result.returncode != 0 and len(lines) == 1 and lines[0].startswith("error:"), (extra, result.stderr)
            assert message in lines[0], (extra, lines[0])
            continue
        with pytest.raises(SystemExit) as exit_:  # the rest in process (a process start per case costs ~5 s):
            main([*TINY, *extra])  # the same SystemExit("error: ...") the process prints as its one line
        text = str(exit_.value.code)
        assert text.startswith("error:") and "\n" not in text and message in text, (extra, text)
    assert folder_state(tmp_path / "run") == finished and not (tmp_path / "runs").exists()
    assert (tmp_path / "other" / "metrics.json").read_text() == "{}"

    # In process, as the launcher checks: --resume alone goes on in the checkpoint's folder, to the total steps of
    # its run (here: nothing left); into a folder that holds another run only with --overwrite.
    from moe_lm.train import UsageError, check_run_folder, parse_args, validate

    resume = ["--resume", str(tmp_path / "run" / "checkpoint.pt")]
    args = parse_args([*TINY[2:], *resume])
    assert args.out == tmp_path / "run"
    with pytest.raises(UsageError, match="is at step 6: --steps 6 leaves nothing to train"):
        validate(args, 1, 10_000)
    check_run_folder(parse_args([*TINY, *resume, "--steps", "9"]))  # its own run: goes on
    with pytest.raises(UsageError, match=re.escape(f"{tmp_path / 'other'}/ already holds a run (metrics.json): "
                                                   f"pass --overwrite")):
        check_run_folder(parse_args([*TINY, *resume, "--steps", "9", "--out", str(tmp_path / "other")]))
    check_run_folder(parse_args([*TINY, *resume, "--steps", "9", "--out", str(tmp_path / "other"), "--overwrite"]))


def test_torchrun_ranks_all_refuse_a_folder_that_holds_a_run(corpus, tmp_path):
    """Under torchrun rank 0 alone checks the run folder (it alone writes there) and every rank stops with
    its message, at once, before any training: none waits for the others."""
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "checkpoint.pt").write_bytes(b"a run")
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                             str(SCRIPT), "--data", str(corpus), "--out", str(tmp_path / "run"), *TINY],
                            capture_output=True, text=True, timeout=300, cwd=tmp_path)
    message = f"error: {tmp_path / 'run'}/ already holds a run (checkpoint.pt): pass --overwrite"
    assert result.returncode != 0 and result.stderr.count(message) == 2, result.stderr
    assert "training:" not in result.stderr and (tmp_path / "run" / "checkpoint.pt").read_bytes() == b"a run"


def test_shadowing_and_replacement_record_and_resume_where_experts_were(corpus, tmp_path):
    """--shadowing and --replace-every on 2 ranks: re-placements are printed and recorded, the checkpoint names
    experts by global index and records where they were, and a run resumed on as many ranks starts from there.
    (That training is unchanged by them is tested on the library, in tests/test_replacement.py.)"""
    out = tmp_path / "balanced"
    result = run("--data", str(corpus), "--out", str(out), "--nproc", "2", *TINY, "--shadowing", "auto",
                 "--replace-every", "2", "--record-routing", str(out / "routing.npz"))
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["shadowing"] == "auto" and metrics["replace_every"] == 2
    assert [s["step"] for s in metrics["shadowed_experts"]] == metrics["steps"]
    assert all(len(s["experts"]) == 2 for s in metrics["shadowed_experts"])
    replacements = metrics["replacements"]
    assert replacements, "no re-placement in 6 steps"
    assert all(r["step"] % 2 == 0 and r["moved"] > 0 and r["layer"] in ("blocks.0.mlp", "blocks.1.mlp")
               and r["imbalance_after"] < r["imbalance_before"] and sorted(r["expert_at"]) == [0, 1, 2, 3]
               for r in replacements), replacements
    assert "re-placed experts of blocks." in result.stdout
    # the load plot's data is per global expert, whatever the placement and the shadows: as the router chose
    from moeflux.sim import load_trace

    trace = load_trace(out / "routing.npz")
    assert trace.iterations.tolist() == metrics["load_steps"] == list(range(1, 7))
    chosen = trace.counts.sum(axis=(1, 3)).astype(float)  # [step, layer, expert], summed over ranks
    chosen /= chosen.sum(-1, keepdims=True)
    np.testing.assert_allclose(chosen, np.array(metrics["expert_load"]), atol=1e-6)
    saved = torch.load(out / "checkpoint.pt", weights_only=True)
    placements = {name: entry["expert_at"] for name, entry in saved["placements"].items()}
    last = {r["layer"]: r["expert_at"] for r in replacements}
    assert placements == {name: last.get(name, [0, 1, 2, 3]) for name in ("blocks.0.mlp", "blocks.1.mlp")}
    assert any(p != [0, 1, 2, 3] for p in placements.values())
    assert {k for k in saved["model"] if ".experts." in k} == {
        f"blocks.{i}.mlp.experts.{e}.{w}" for i in range(2) for e in range(4) for w in ("w_in", "w_out")}
    assert {k for k in saved["optimizer"] if ".experts." in k} == {k for k in saved["model"] if ".experts." in k}

    # Resume on 2 ranks, both still on (no re-placement due in the 3 steps left): the experts stay where
    # they were saved.
    resumed = tmp_path / "resumed"
    run("--data", str(corpus), "--out", str(resumed), "--nproc", "2", "--resume", str(out / "checkpoint.pt"),
        *TINY[:1], "9", *TINY[2:], "--shadowing", "1", "--replace-every", "10")
    again = json.loads((resumed / "metrics.json").read_text())
    assert again["steps"][-1] == 9 and again["shadowing"] == 1 and again["replacements"] == replacements
    final = torch.load(resumed / "checkpoint.pt", weights_only=True)
    assert {name: entry["expert_at"] for name, entry in final["placements"].items()} == placements


def test_bad_shadowing_and_replacement_options_are_usage_errors():
    sys.path.insert(0, str(SCRIPT.parent))
    from moe_lm.train import UsageError, parse_args, validate

    cases = {("--shadowing", "sometimes"): "--shadowing must be off, auto or an int >= 0, got 'sometimes'",
             ("--shadowing", "-1"): "--shadowing must be off, auto or an int >= 0, got '-1'",
             ("--replace-every", "-2"): "--replace-every must be >= 0 (0: off), got -2"}
    for extra, message in cases.items():
        with pytest.raises(UsageError, match=re.escape(message)):
            validate(parse_args(list(extra)), 2, 10_000)
    for value, parsed in (("off", "off"), ("auto", "auto"), ("0", 0), ("3", 3)):
        args = parse_args(["--shadowing", value, "--replace-every", "5"])
        validate(args, 2, 10_000)
        assert args.shadowing == parsed and args.replace_every == 5
    for schedule in ("chunked", "pairwise"):  # shadowing works with every schedule
        args = parse_args(["--shadowing", "auto", "--schedule", schedule])
        validate(args, 2, 10_000)
        assert args.shadowing == "auto" and args.schedule == schedule


def _children(pid: int) -> list[int]:
    out = subprocess.run(["ps", "--ppid", str(pid), "-o", "pid="], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def _running(pid: int) -> bool:
    try:
        return "zombie" not in Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False


@pytest.mark.parametrize("signum,to", [(signal.SIGINT, "launcher"), (signal.SIGINT, "terminal"),
                                       (signal.SIGTERM, "launcher")])
def test_a_signal_saves_a_checkpoint_stops_every_rank_and_the_run_resumes(corpus, tmp_path, signum, to):
    """SIGINT/SIGTERM to the launcher alone, or Ctrl-C in a terminal (SIGINT to the launcher and the ranks),
    during the first checkpoint interval: every rank stops after the same step and saves, the launcher exits with
    128 + the signal and one line, no process is left, and --resume continues from that step."""
    out, err = tmp_path / "run", tmp_path / "stderr.txt"
    args = [sys.executable, str(SCRIPT), "--data", str(corpus), "--out", str(out), "--nproc", "2", *TINY[2:],
            "--steps", "5000", "--checkpoint-every", "5000"]
    with open(err, "w") as stderr:
        launcher = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=stderr, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not re.search(r"\| +[1-9]\d*/5000", err.read_text()):  # the progress bar has moved
            assert launcher.poll() is None and time.monotonic() < deadline, err.read_text()
            time.sleep(0.2)
        ranks = _children(launcher.pid)
        if to == "launcher":
            os.kill(launcher.pid, signum)
        else:
            os.killpg(launcher.pid, signum)
        code = launcher.wait(timeout=60)
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
    lines = [line for line in err.read_text().replace("\r", "\n").splitlines()
             if line.strip() and not line.startswith("training:")]
    assert code == 128 + signum and len(lines) == 1, lines
    name = signal.Signals(signum).name
    match = re.fullmatch(rf"stopped by {name} after step (\d+) of 5000: saved (.*)/ \(metrics.json, loss.png, "
                         r"expert_load.png, checkpoint.pt\); continue with --resume \2/checkpoint.pt", lines[0])
    assert match and match[2] == str(out), lines[0]
    step = int(match[1])
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == step
    # the run so far, as a finished run leaves it: its record ends at the step it stopped after
    stopped = json.loads((out / "metrics.json").read_text())
    assert stopped["steps"][-1] == step and stopped["eval"] == [] and stopped["train_seconds"] > 0
    assert (out / "loss.png").is_file() and (out / "expert_load.png").is_file()
    deadline = time.monotonic() + 10
    while any(_running(pid) for pid in ranks):
        assert time.monotonic() < deadline, f"processes {ranks} outlived the launcher"
        time.sleep(0.2)
    if to == "launcher" and signum == signal.SIGINT:  # once is enough: the resumed run goes on from that step
        # as the message says, with no --out: in the checkpoint's folder, not the default one
        result = run("--data", str(corpus), "--nproc", "2", "--resume", str(out / "checkpoint.pt"), *TINY[2:],
                     "--steps", str(step + 2), cwd=tmp_path)
        assert f"resumed from step {step} of {out / 'checkpoint.pt'}: training to step {step + 2} in {out}/" \
            in result.stdout
        final = result.stdout.splitlines()[-2]  # the whole run's steps and time, then this session's part
        assert re.search(rf"after {step + 2} steps; .*; training \d+ s, \d+ s of it since the resume at step {step}$",
                         final), final
        assert not (tmp_path / "runs").exists()
        whole = json.loads((out / "metrics.json").read_text())
        assert whole["steps"][:len(stopped["steps"])] == stopped["steps"] and whole["steps"][-1] == step + 2
        assert whole["resumed_at"] == [step] and whole["train_seconds"] > stopped["train_seconds"]
        assert [e["step"] for e in whole["eval"]] == [step + 2]
        sys.path.insert(0, str(SCRIPT.parent))
        from moe_lm.plots import loss_figure

        assert list(loss_figure(whole).axes[0].lines[0].get_xdata()) == whole["steps"]  # the loss of every step


def test_expert_load_plot_labels_every_expert_on_one_scale_around_the_uniform_share():
    """Every expert named on its layer's axis, one colour normalisation (and colour bar) for all layers that
    spans every layer's loads, and the uniform share 1 / experts marked on it as the scale's centre."""
    sys.path.insert(0, str(SCRIPT.parent))
    from moe_lm.plots import expert_load_figure

    experts = 5
    balanced, skewed = [0.2] * experts, [0.7, 0.1, 0.1, 0.1, 0.0]
    metrics = {"load_steps": [2, 4, 5], "expert_load": [[balanced, skewed], [balanced, balanced], [skewed, balanced]]}
    fig = expert_load_figure(metrics)
    meshes = [ax.collections[0] for ax in fig.axes if ax.get_ylabel().startswith("layer")]
    assert len(meshes) == 2
    for layer, mesh in enumerate(meshes):
        assert [t.get_text() for t in mesh.axes.get_yticklabels()] == [str(e) for e in range(experts)]
        assert list(mesh.axes.get_yticks()) == list(range(experts))
        np.testing.assert_allclose(mesh.get_array().reshape(experts, 3).T,
                                   [record[layer] for record in metrics["expert_load"]])
    norm = meshes[0].norm
    assert all(mesh.norm is norm for mesh in meshes) and norm.vmin <= 0 and norm.vmax >= 0.7
    assert norm.vcenter == pytest.approx(1 / experts)  # white: the uniform share
    bars = {id(mesh.colorbar) for mesh in meshes if mesh.colorbar is not None}
    assert len(bars) == 1 and len(fig.axes) == 3  # two layers, one colour bar
    bar = next(mesh.colorbar for mesh in meshes if mesh.colorbar is not None)
    ticks = dict(zip(bar.get_ticks(), (t.get_text() for t in bar.ax.get_yticklabels())))
    assert any(abs(value - 1 / experts) < 1e-9 and "uniform" in label for value, label in ticks.items()), ticks
    assert any(list(line.get_ydata()) == [1 / experts] * 2 for line in bar.ax.lines)
