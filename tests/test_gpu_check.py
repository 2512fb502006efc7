"""bench/gpu_check.sh --smoke: the GPU session's one script runs every step on the CPU at tiny shapes, so it cannot
rot between GPU sessions (issue 15). It checks the plumbing, not speed: no timing is asserted."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STEPS = ["env", "tests", "scoring", "verify", "kv", "gated_delta", "e2e", "parallel", "synthetic", "demo"]


def test_gpu_check_smoke_runs_every_step(tmp_path):
    env = dict(os.environ, PYTHON=sys.executable)
    proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), "--smoke", str(tmp_path)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=900)
    summary = (tmp_path / "summary.txt").read_text() if (tmp_path / "summary.txt").exists() else ""
    logs = {p.name: p.read_text()[-2000:] for p in tmp_path.glob("*.log")}
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}\n{logs}"
    ran = [line.split()[0] for line in summary.splitlines()]
    assert ran == STEPS, summary
    assert all("rc=0" in line for line in summary.splitlines()), summary
    env_txt = (tmp_path / "env.txt").read_text()
    for key in ("device:", "torch:", "triton:", "transformers:", "vspec git:"):
        assert key in env_txt, env_txt
    for csv in ("e2e.csv", "parallel.csv", "e2e_synthetic.csv"):
        assert len((tmp_path / csv).read_text().splitlines()) > 1, csv
    assert "== summary" in proc.stdout
