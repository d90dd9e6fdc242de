"""benchmarks/gpu_suite.sh --dry-run: every step of the GPU suite that can run on a CPU, so that the minutes on a
lent GPU go to measuring (the real run needs one: see benchmarks/gpu_suite.sh)."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_suite_dry_run(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path / "out"), SUITE_FILES=str(tmp_path / "files"), PYTHON=sys.executable)
    run = subprocess.run(["bash", "benchmarks/gpu_suite.sh", "--dry-run"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    steps = [line.split("\t") for line in (tmp_path / "out" / "steps.tsv").read_text().splitlines()]
    assert [s[0] for s in steps] == ["env", "build", "tests", "sanitize", "bench", "summary"]
    assert all(s[1] == "ok" for s in steps), steps
    results = json.loads((tmp_path / "out" / "gpu.json").read_text())
    for section in ("ceilings", "route", "grouped_gemm", "layer", "nccl"):
        assert "error" not in results[section], (section, results[section])
    assert results["nccl"]["max_abs_out"] == 0 and results["nccl"]["max_abs_grad"] == 0
    # The GPUs' fixed-split capacity path (the dry run takes it by the test-only switch): no count exchange.
    nccl = results["nccl"]
    assert nccl["capacity_max_abs_out"] == 0 and nccl["capacity_max_abs_grad"] == 0, nccl
    assert nccl["count_exchanges"] == 1 and nccl["capacity_count_exchanges"] == 0, nccl
    assert (tmp_path / "out" / "suite.tar.gz").stat().st_size > 0
    assert "layer qwen3-30b-a3b" in run.stdout  # the summary table comes last
