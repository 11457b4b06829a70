"""DDP under torchrun (gloo, CPU): 2 ranks x batch b trains like 1 process x batch 2b."""
from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).with_name("_train_script.py")
REPO_ROOT = Path(__file__).resolve().parents[2]
STEPS = 10
# failures that say the machine cannot host a local process group, not that the trainer is wrong
ENVIRONMENTAL = re.compile(r"Address already in use|EADDRINUSE|Connection refused|"
                           r"Network is unreachable|gethostbyname|Name or service not known|"
                           r"Socket Timeout|timed out|No route to host", re.IGNORECASE)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def _args(out: Path, batch_size: int) -> list[str]:
    return [str(SCRIPT), "--out", str(out), "--final", str(out / "final.pt"), "--steps",
            str(STEPS), "--batch-size", str(batch_size), "--dropout", "0", "--save-every", "0",
            "--accum", "2"]


def test_ddp_two_ranks_match_single_process(tmp_path):
    single = subprocess.Popen([sys.executable, *_args(tmp_path / "single", 8)], env=_env(),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    ddp = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1",
         "--master_addr=127.0.0.1", f"--master_port={_free_port()}",
         *_args(tmp_path / "ddp", 4)],
        env=_env(), capture_output=True, text=True, timeout=120)
    out, err = single.communicate(timeout=60)
    assert single.returncode == 0, out
    if ddp.returncode != 0 and ENVIRONMENTAL.search(ddp.stderr + ddp.stdout):
        pytest.skip(f"torchrun could not start a local gloo group: {ddp.stderr[-500:]}")
    assert ddp.returncode == 0, ddp.stderr[-4000:]

    want = torch.load(tmp_path / "single" / "final.pt")
    got = torch.load(tmp_path / "ddp" / "final.pt")
    diff = max((want[k] - got[k]).abs().max().item() for k in want)
    print(f"DDP max abs param diff: {diff:.3e}")
    assert diff <= 1e-5
    # only rank 0 wrote the log
    lines = (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == STEPS
