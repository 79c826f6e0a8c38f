"""Outputs that are single files (docs/reliability.md): the toy evaluation's and the benchmarks' JSON reports are
claimed like every output: an existing file needs ``--overwrite``, which replaces only an earlier report of the
same kind (never another file, never an input), each write is atomic, two runs never write one file, and SIGTERM
leaves nothing behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from editinfinity.errors import OutputError

REPO = Path(__file__).resolve().parents[1]
NOTHING = ["--vae-images", "0", "--generations", "0", "--edits", "0", "--mask-edits", "0", "--whole-edits", "0",
           "--device", "cpu"]


def _toy_eval(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "editinfinity.evaluation.toy_eval", *map(str, args)],
                          capture_output=True, text=True, timeout=300)


def _error_line(proc: subprocess.CompletedProcess, code: int, *needles: str) -> None:
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == code, proc.stderr
    assert "Traceback" not in proc.stderr and len(lines) == 1, proc.stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])


def test_toy_eval_refuses_an_existing_file_before_any_work(tmp_path):
    notes = tmp_path / "notes.json"
    notes.write_text('{"mine": true}')
    _error_line(_toy_eval(*NOTHING, "--out", notes), 2, "already exists", "--overwrite")
    _error_line(_toy_eval(*NOTHING, "--out", notes, "--overwrite"), 2, "not a file this command wrote")
    assert notes.read_text() == '{"mine": true}'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.json"]  # no lock or private file left


def test_toy_eval_overwrites_only_its_own_report(tmp_path):
    from editinfinity.evaluation import toy_eval

    out = tmp_path / "eval.json"
    assert toy_eval.main([*NOTHING, "--out", str(out)]) == 0
    first = json.loads(out.read_text())
    assert set(toy_eval.REPORT_KEYS) <= set(first)
    with pytest.raises(OutputError, match="already exists"):
        toy_eval.main([*NOTHING, "--out", str(out)])
    assert toy_eval.main([*NOTHING, "--seeds", "calibration", "--out", str(out), "--overwrite"]) == 0
    assert json.loads(out.read_text())["seeds"]["set"] == "calibration"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eval.json"]


def _shard(path: Path, cases: list[int]) -> Path:
    path.write_text(json.dumps({"command": "python -m editinfinity.evaluation.toy_eval --keep-cases", "weights": "w",
                                "targets": {}, "edits": {"auto": {
                                    "mode": "auto", "requested": len(cases), "truncated": False,
                                    "results": [{"case": c, "present": True, "attribute_only": True, "matches": True,
                                                 "psnr_outside": 40.0, "mask_iou": 0.8, "mask_iou_any_pixel": 0.7,
                                                 "seconds": 1.0} for c in cases]}}}))
    return path


def test_toy_eval_merge_never_replaces_an_input_or_a_foreign_file(tmp_path):
    from editinfinity.evaluation import toy_eval

    a, b = _shard(tmp_path / "a.json", [0, 2]), _shard(tmp_path / "b.json", [1])
    before = a.read_text()
    with pytest.raises(OutputError, match="is an input of this run"):
        toy_eval.main(["--merge", str(a), str(b), "--out", str(a), "--overwrite"])
    assert a.read_text() == before
    foreign = tmp_path / "foreign.json"
    foreign.write_text("[1, 2]")
    with pytest.raises(OutputError, match="not a file this command wrote"):
        toy_eval.main(["--merge", str(a), str(b), "--out", str(foreign), "--overwrite"])
    assert foreign.read_text() == "[1, 2]"
    out = tmp_path / "merged" / "all.json"
    assert toy_eval.main(["--merge", str(a), str(b), "--out", str(out)]) == 0
    assert [r["case"] for r in json.loads(out.read_text())["edits"]["auto"]["results"]] == [0, 1, 2]
    assert toy_eval.main(["--merge", str(a), "--out", str(out), "--overwrite"]) == 0  # its own earlier merge
    # a missing or foreign shard: one line, and no file made
    _error_line(_toy_eval("--merge", tmp_path / "missing.json", "--out", tmp_path / "x.json"), 2, "missing.json",
                "cannot read")
    _error_line(_toy_eval("--merge", foreign, "--out", tmp_path / "x.json"), 2, "not a report of this evaluation")
    assert not (tmp_path / "x.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "b.json", "foreign.json", "merged"]


def test_claim_report_writes_atomically_and_holds_the_file_for_one_run(tmp_path):
    from editinfinity.file_outputs import claim_report

    out = tmp_path / "r.json"
    with claim_report(out, keys=("kind",)) as write:
        assert not out.exists()  # nothing before the first write
        with pytest.raises(OutputError, match="another editinfinity run"):
            with claim_report(out, keys=("kind",), overwrite=True):
                pass
        write({"kind": "x", "n": 1})
        inode = out.stat().st_ino
        write({"kind": "x", "n": 2})  # a rewrite replaces the file (a new inode), never writes into it
        assert out.stat().st_ino != inode and json.loads(out.read_text())["n"] == 2
    with pytest.raises(RuntimeError):
        with claim_report(out, keys=("kind",), overwrite=True) as write:
            raise RuntimeError("the run failed before its first write")
    assert json.loads(out.read_text())["n"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]


def test_toy_eval_sigterm_leaves_nothing(tmp_path):
    out = tmp_path / "eval.json"
    proc = subprocess.Popen([sys.executable, "-m", "editinfinity.evaluation.toy_eval", "--device", "cpu",
                             "--vae-images", "0", "--generations", "200", "--edits", "0", "--mask-edits", "0",
                             "--whole-edits", "0", "--out", str(out)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not any(p.name.endswith("editinfinity-lock") for p in tmp_path.iterdir()):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.2)
    time.sleep(1.0)
    os.kill(proc.pid, signal.SIGTERM)
    _out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert "terminated (SIGTERM)" in err
    assert list(tmp_path.iterdir()) == []


BENCH = {"batch.py": [], "edit.py": [], "generate.py": [], "pod_overhead.py": [], "representation.py": [],
         "toy_band_rerank.py": [], "toy_sampling.py": ["--setting", "a:cfg=3"]}


def test_every_benchmark_with_an_out_is_checked_below():
    takes_out = {p.name for p in (REPO / "bench").glob("*.py") if 'add_argument("--out"' in p.read_text()}
    assert takes_out == set(BENCH)


def _bench(script: str, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "bench" / script), *map(str, args)], capture_output=True,
                          text=True, timeout=300, cwd=REPO)


@pytest.mark.parametrize("script", sorted(BENCH))
def test_benchmarks_refuse_a_file_that_is_not_their_result(tmp_path, script):
    notes = tmp_path / "notes.json"
    notes.write_text('{"mine": true}')
    _error_line(_bench(script, *BENCH[script], "--out", notes), 2, "already exists", "--overwrite")
    _error_line(_bench(script, *BENCH[script], "--out", notes, "--overwrite"), 2, "not a file this command wrote")
    assert notes.read_text() == '{"mine": true}'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.json"]


def test_a_benchmark_replaces_its_own_result_with_overwrite(tmp_path):
    out = tmp_path / "results" / "generate.json"
    run = ["--preset", "tiny", "--device", "cpu", "--resolution", "0.06M", "--warmup", "0", "--runs", "1",
           "--out", out]
    assert _bench("generate.py", *run).returncode == 0
    first = json.loads(out.read_text())
    _error_line(_bench("generate.py", *run), 2, "already exists")
    proc = _bench("generate.py", *run, "--overwrite")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(out.read_text())["seconds_all"] != first["seconds_all"]
    assert sorted(p.name for p in out.parent.iterdir()) == ["generate.json"]


def test_the_profile_claims_its_two_files_in_out_dir_and_replaces_only_its_own(tmp_path):
    out = tmp_path / "results"
    out.mkdir()
    mine = {"profile_training_cpu.json": '{"mine": true}', "profile_training_cpu.txt": "my notes\n",
            "other.txt": "kept\n"}
    run = ["--preset", "tiny", "--device", "cpu", "--resolution", "0.06M", "--only-training", "--warmup", "0",
           "--timed", "1", "--row-limit", "3", "--out-dir", out]
    for name in ("profile_training_cpu.json", "profile_training_cpu.txt"):
        (out / name).write_text(mine[name])
        _error_line(_bench("profile_edit.py", *run), 2, "already exists", "--overwrite")
        _error_line(_bench("profile_edit.py", *run, "--overwrite"), 2, "not a file this command wrote")
        (out / name).unlink()
    (out / "other.txt").write_text(mine["other.txt"])
    proc = _bench("profile_edit.py", *run)
    assert proc.returncode == 0, proc.stderr
    first = json.loads((out / "profile_training_cpu.json").read_text())
    assert set(first["regions"]) == {"prompt_tuning_update", "lora_update"}
    assert (out / "profile_training_cpu.txt").read_text().startswith("profile of one edit's pieces:")
    _error_line(_bench("profile_edit.py", *run), 2, "already exists")
    proc = _bench("profile_edit.py", *run, "--overwrite")
    assert proc.returncode == 0, proc.stderr
    assert json.loads((out / "profile_training_cpu.json").read_text())["regions"] != first["regions"]
    assert sorted(p.name for p in out.iterdir()) == ["other.txt", "profile_training_cpu.json",
                                                     "profile_training_cpu.txt"]
    assert (out / "other.txt").read_text() == mine["other.txt"]



# ------------------------------------------------------------------------------------ training run folders


def _train_cli(capsys, *argv) -> tuple[int, str]:
    from editinfinity.cli import main

    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


def test_training_commands_refuse_a_folder_that_is_not_a_training_run(tmp_path, capsys):
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "cat.jpg").write_text("mine")
    for argv in (["train-vae", "--out", foreign, "--steps", "1", "--device", "cpu"],
                 ["train", "--out", foreign, "--vae", tmp_path / "vae", "--steps", "1", "--device", "cpu"]):
        code, err = _train_cli(capsys, *argv)
        assert code == 2 and "holds no training run of ours" in err, err
        code, err = _train_cli(capsys, *argv, "--overwrite")
        assert code == 2 and "holds no training run of ours" in err, err
    code, err = _train_cli(capsys, "train-vae", "--out", tmp_path / "new", "--resume", "--overwrite")
    assert code == 2 and "--resume" in err, err
    assert [p.name for p in foreign.iterdir()] == ["cat.jpg"] and (foreign / "cat.jpg").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["photos"]


def test_train_vae_overwrite_replaces_only_an_earlier_run(tmp_path, capsys, one_thread):
    from editinfinity.train.options import RUN_NAMES

    run = tmp_path / "run"
    tiny = ["--device", "cpu", "--steps", "2", "--minutes", "0", "--workers", "0"]
    for k, v in {"model.base_ch": 24, "model.ch_mult": [1, 1, 1, 1, 1], "model.num_res_blocks": 1,
                 "resolution": [[1, 1], [2, 2], [4, 4]], "image_size": 64, "batch_size": 2,
                 "log_seconds": 0, "eval_images": 2, "warmup_steps": 2}.items():
        tiny += ["--set", f"{k}={json.dumps(v)}"]
    code, err = _train_cli(capsys, "train-vae", "--out", run, *tiny)
    assert code == 0, err
    assert {p.name for p in run.iterdir()} <= set(RUN_NAMES)  # what --overwrite recognises as ours
    first = (run / "vae" / "config.json").stat().st_mtime_ns
    (run / "notes.txt").write_text("mine")
    code, err = _train_cli(capsys, "train-vae", "--out", run, *tiny, "--overwrite")
    assert code == 2 and "notes.txt" in err, err
    assert (run / "notes.txt").read_text() == "mine" and (run / "vae" / "config.json").stat().st_mtime_ns == first
    (run / "notes.txt").unlink()
    code, err = _train_cli(capsys, "train-vae", "--out", run, *tiny, "--overwrite")
    assert code == 0, err
    assert (run / "vae" / "config.json").stat().st_mtime_ns != first


def test_training_exports_and_checkpoints_get_the_users_umask(tmp_path, one_thread):
    """The toy driver's weights (its safetensors writer makes 0600 files), its --work runs (checkpoints, trained
    models) and the records: every file 0o666 & ~umask, every folder 0o777 & ~umask, as a result folder's."""
    import stat

    from editinfinity.train.toy import main as train_toy
    from test_train import _tiny_driver_args

    out = tmp_path / "toy"
    old = os.umask(0o027)
    try:
        assert train_toy(_tiny_driver_args(out) + ["--transformer-set", "checkpoint_minutes=0"]) == 0
    finally:
        os.umask(old)
    wrong = {}
    for root in (out, tmp_path / "toy.work"):
        for p in [root, *root.rglob("*")]:
            mode = stat.S_IMODE(p.stat().st_mode)
            if mode != (0o750 if p.is_dir() else 0o640):
                wrong[str(p.relative_to(tmp_path))] = oct(mode)
    assert any(p.suffix == ".safetensors" for p in out.rglob("*")) and not wrong, wrong


# ------------------------------------------------------------------------------------ what killed runs leave

_STUCK = """
import pathlib, shutil, sys, time
from editinfinity import storage
what, src, dest = sys.argv[1:4]
real_copy, real_write = shutil.copyfile, pathlib.Path.write_bytes
def copy(a, b, **kw):
    real_copy(a, b, **kw); print("ready", flush=True); time.sleep(600)
def write(self, data):
    real_write(self, data); print("ready", flush=True); time.sleep(600)
shutil.copyfile, pathlib.Path.write_bytes = copy, write
storage.publish_dir(src, dest) if what == "publish" else storage.write_bytes(dest, b"{}")
"""


def _stuck(what: str, src: Path, dest: Path) -> subprocess.Popen:
    """A process stopped in the middle of storage's local publish / atomic write (its private name is on disk)."""
    proc = subprocess.Popen([sys.executable, "-c", _STUCK, what, str(src), str(dest)], stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout.readline().strip() == "ready"
    return proc


def _gone_pid() -> int:
    return int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True, check=True).stdout)


def test_the_next_batch_worker_removes_what_killed_workers_left_and_nothing_else(tmp_path):
    from editinfinity.batch.plan import BatchPlan
    from editinfinity.batch.worker import STATUS_DIR, run_shard
    from editinfinity.storage.base import host_name

    src = tmp_path / "edit"
    src.mkdir()
    (src / "summary.json").write_text("{}")
    root = tmp_path / "results"
    (root / STATUS_DIR).mkdir(parents=True)
    killed = [_stuck("publish", src, root / "case1"), _stuck("write", src, root / STATUS_DIR / "case1.json")]
    running = _stuck("publish", src, root / "case2")
    try:
        for proc in killed:
            proc.kill()
            proc.wait()
        left = sorted(p.name for p in [*root.iterdir(), *(root / STATUS_DIR).iterdir()] if p.name.startswith("."))
        assert len(left) == 3, left  # case1's and case2's private folders, the status file's private file
        mine = [root / ".notes.tmp", root / f".case3.editinfinity-tmp-elsewhere-{_gone_pid()}-abcdef"]
        for p in mine:
            p.write_text("not this host's or not ours")
        plan = BatchPlan(output_uri=str(root), groups=[{"key": "g", "image": "a.png", "prompt": "p",
                                                        "cases": [{"id": "case1"}, {"id": "case2"}]}],
                         shards=[[0]])
        assert run_shard(plan, 0, part=(1, 2)) == []  # an empty part: the worker starts, cleans, and is done
        after = sorted(p.name for p in [*root.iterdir(), *(root / STATUS_DIR).iterdir()] if p.name.startswith("."))
        assert after == sorted([".notes.tmp", mine[1].name, *[n for n in left if n.startswith(".case2.")]])
        assert all(f"-{host_name()}-{running.pid}-" in n for n in after if n.startswith(".case2."))
    finally:
        running.kill()
        running.wait()


def test_a_killed_runs_private_file_is_removed_by_the_next_run_into_the_same_file(tmp_path):
    from editinfinity.file_outputs import claim_report
    from editinfinity.storage.base import host_name

    out = tmp_path / "plan.json"
    left = tmp_path / f".plan.json.editinfinity-tmp-{host_name()}-{_gone_pid()}-0a1b2c"
    other = tmp_path / ".plan.json.editinfinity-tmp-elsewhere-1-0a1b2c"
    for p in (left, other):
        p.write_text("{}")
    with claim_report(out, keys=("kind",)) as write:
        write({"kind": "plan"})
    assert sorted(p.name for p in tmp_path.iterdir()) == [other.name, "plan.json"]
