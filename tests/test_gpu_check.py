"""scripts/gpu_check.sh on a machine without a GPU: parses its options, skips with one clear line."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu_check.sh"


def run(*args):
    env = dict(os.environ, PYTHON=sys.executable)
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=60)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: the script would run for real")
def test_skips_without_gpu_after_parsing_options(tmp_path):
    out = tmp_path / "results.txt"
    r = run("--out", str(out), "--parts", "a,c", "--batch", "4")
    assert r.returncode == 0, r.stderr
    assert "no CUDA GPU visible" in r.stdout and "skipping all parts (a,c)" in r.stdout
    assert not out.exists()  # nothing run, nothing written


@pytest.mark.parametrize("args,message", [(["--parts", "a,z"], "--parts"), (["--batch", "0"], "--batch"),
                                          (["--bogus"], "unknown option")])
def test_bad_options_exit_2_with_one_line(args, message):
    r = run(*args)
    assert r.returncode == 2 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert "Traceback" not in r.stderr


def test_help_lists_the_parts():
    r = run("--help")
    assert r.returncode == 0 and "(e) a 2-step FSDP2 run" in r.stdout
