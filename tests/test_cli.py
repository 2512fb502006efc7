"""The CLI: --help everywhere, argument errors, and a short demo run whose outputs are all identical."""

import subprocess
import sys

import pytest

from vspec.cli import main


def _run(*args):
    return subprocess.run([sys.executable, "-m", "vspec", *args], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("args", [[], ["demo"], ["bench"], ["generate"]], ids=["top", "demo", "bench", "generate"])
def test_help(args):
    res = _run(*args, "--help")
    assert res.returncode == 0 and "usage" in res.stdout


def test_bad_arguments_fail_clearly():
    res = _run("demo", "--keep-ratio", "0")
    assert res.returncode == 2 and "--keep-ratio must be in (0, 1]" in res.stderr
    res = _run("bench", "quality")
    assert res.returncode == 2 and "not available yet" in res.stderr


def test_demo_runs_and_is_lossless(capsys):
    rc = main(["demo", "--clips", "1", "--max-new-tokens", "8", "--repeats", "1"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "vspec strict, prune=semantic" in out and "HF assisted generation" in out
    assert out.count("1/1") >= 7  # identical column: every method reproduced the target's output
