"""Scratch folders (editinfinity.scratch): a SIGKILLed process's is removed by the next use, nothing else is."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

_HOLD = """
import sys, time
from editinfinity import interrupts
from editinfinity.scratch import scratch_dir
interrupts.install()
try:
    with scratch_dir(sys.argv[1], dir=sys.argv[2]) as tmp:
        (tmp / "big.bin").write_bytes(b"x" * 1000)
        print(tmp, flush=True)
        time.sleep(600)
except KeyboardInterrupt as exc:
    sys.exit(interrupts.exit_code(exc))
"""


def _holder(prefix: str, where: Path) -> tuple[subprocess.Popen, Path]:
    proc = subprocess.Popen([sys.executable, "-c", _HOLD, prefix, str(where)], stdout=subprocess.PIPE, text=True)
    return proc, Path(proc.stdout.readline().strip())


def test_a_killed_processes_scratch_folder_is_removed_by_the_next_use_and_nothing_else(tmp_path):
    from editinfinity.scratch import scratch_dir
    from editinfinity.storage.base import host_name

    killed, killed_dir = _holder("editinfinity-case", tmp_path)
    running, running_dir = _holder("editinfinity-case", tmp_path)
    other_prefix, other_prefix_dir = _holder("editinfinity-batch", tmp_path)
    try:
        killed.send_signal(signal.SIGKILL)
        killed.wait()
        assert killed_dir.is_dir() and f"-{host_name()}-{killed.pid}-" in killed_dir.name
        foreign = [tmp_path / "editinfinity-case-abc", tmp_path / ".editinfinity-case.notes",
                   tmp_path / f".editinfinity-case.editinfinity-tmp-elsewhere-{killed.pid}-abcdef"]
        for p in foreign:
            p.mkdir()
        with scratch_dir("editinfinity-case", dir=tmp_path) as mine:
            assert mine.is_dir() and f"-{host_name()}-" in mine.name
            left = sorted(tmp_path.iterdir())
        assert sorted([mine, running_dir, other_prefix_dir, *foreign]) == left
        assert not mine.exists()
    finally:
        for proc in (running, other_prefix):
            proc.kill()
            proc.wait()


def test_sigterm_removes_the_scratch_folder(tmp_path):
    proc, folder = _holder("editinfinity-case", tmp_path)
    assert folder.is_dir()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 143
    assert list(tmp_path.iterdir()) == []


def test_a_batch_workers_weights_copy_left_by_a_killed_worker_is_removed_by_the_next_copy(tmp_path):
    from editinfinity.batch.worker import copy_weights
    from editinfinity.storage.base import host_name

    weights = tmp_path / "weights"
    weights.mkdir()
    (weights / "model.safetensors").write_bytes(b"w" * 100)
    local = tmp_path / "local"
    local.mkdir()
    gone = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True, check=True).stdout)
    half = local / f".weights.editinfinity-tmp-{host_name()}-{gone}-0a1b2c"
    half.mkdir()
    (half / "model.safetensors").write_bytes(b"w" * 10)
    assert copy_weights(str(weights), local) == local / "weights"
    assert sorted(p.name for p in local.iterdir()) == ["weights"]
    assert (local / "weights" / "model.safetensors").read_bytes() == b"w" * 100
