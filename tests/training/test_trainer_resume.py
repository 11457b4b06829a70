"""A run killed with SIGKILL and resumed ends with the same parameters as an uninterrupted one."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

SCRIPT = Path(__file__).with_name("_train_script.py")
REPO_ROOT = Path(__file__).resolve().parents[2]
STEPS = 30


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    return env


def _cmd(out: Path, *extra: str) -> list[str]:
    return [sys.executable, str(SCRIPT), "--out", str(out), "--final", str(out / "final.pt"),
            "--steps", str(STEPS), "--save-every", "1", *extra]


def _checkpoint_step(path: Path) -> int:
    try:
        return torch.load(path, map_location="cpu", weights_only=False)["step"]
    except (FileNotFoundError, EOFError, RuntimeError):
        return -1


def test_sigkill_then_resume_matches_uninterrupted(tmp_path):
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "run"
    # the reference runs while the other run is being killed and resumed
    ref = subprocess.Popen(_cmd(ref_dir), env=_env(), stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT)
    victim = subprocess.Popen(_cmd(run_dir, "--sleep", "0.05"), env=_env(),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    ckpt, deadline, killed_at = run_dir / "checkpoint.pt", time.monotonic() + 60, -1
    try:
        while time.monotonic() < deadline:
            assert victim.poll() is None, victim.stdout.read().decode()
            killed_at = _checkpoint_step(ckpt)
            if killed_at >= 8:
                os.kill(victim.pid, signal.SIGKILL)
                break
            time.sleep(0.02)
        assert victim.wait(timeout=30) == -signal.SIGKILL
    finally:
        if victim.poll() is None:
            victim.kill()
    assert 8 <= killed_at < STEPS and not (run_dir / "final.pt").exists()

    resumed = subprocess.run(_cmd(run_dir, "--resume"), env=_env(), capture_output=True,
                             text=True, timeout=60)
    assert resumed.returncode == 0, resumed.stderr
    assert ref.wait(timeout=60) == 0, ref.stdout.read().decode()

    want = torch.load(ref_dir / "final.pt")
    got = torch.load(run_dir / "final.pt")
    diff = max((want[k] - got[k]).abs().max().item() for k in want)
    print(f"resume max abs param diff: {diff:.3e} (killed after step {killed_at})")
    assert diff <= 1e-6

    # the metrics log reads as one run: steps 1..STEPS once each, identical to the reference
    def losses(d):
        with open(d / "metrics.jsonl") as f:
            return [(r["step"], r["loss"]) for r in map(json.loads, f) if r["type"] == "train"]

    assert [s for s, _ in losses(run_dir)] == list(range(1, STEPS + 1))
    assert losses(run_dir) == losses(ref_dir)
