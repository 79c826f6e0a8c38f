"""Never lose a user's files, never half-answer: the real console command in subprocesses (tiny preset).

Output ownership (``editinfinity.outputs``), concurrent runs into one ``--out``, signals, leftovers of killed runs.
Each test groups several checks per subprocess where it can; every run that must fail fails before any model loads,
so most of these take about one interpreter start each. docs/reliability.md counts what is covered.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from editinfinity.demo import example_dir

FAST = ["--preset", "tiny", "--prompt-iters", "1", "--lora-iters", "1", "-q"]
#: A run that keeps going until it is stopped (LoRA training with a huge budget).
ENDLESS = ["--preset", "tiny", "--prompt-iters", "1", "--lora-iters", "1000000", "-q"]


def cli(*args, cwd=None, timeout=300, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "editinfinity.cli", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, cwd=cwd, env=env)


def start(*args, cwd=None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "editinfinity.cli", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=cwd)


def one_line_error(proc, code: int, *needles: str) -> str:
    """The run failed with ``code``, printed one line (no traceback) naming every needle."""
    err = proc.stderr.strip()
    assert proc.returncode == code, (proc.returncode, proc.stderr)
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    for n in needles:
        assert n in err, (n, err)
    return err


def hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


@pytest.fixture(scope="module")
def case() -> dict:
    ex = example_dir()
    spec = json.loads((ex / "case.json").read_text())
    return {"image": str(ex / spec["image"]), "prompt": spec["prompt"], "edit_prompt": spec["edit_prompt"]}


def edit_args(case, out, *extra, image=None) -> list:
    return ["edit", "--image", image or case["image"], "--prompt", case["prompt"], "--edit-prompt",
            case["edit_prompt"], "--whole-image", "--out", out, *extra]


def wait_for(predicate, timeout: float = 180, what: str = "") -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    pytest.fail(f"timed out waiting for {what}")


def private_folders(parent: Path, name: str = "out") -> list[Path]:
    return sorted(parent.glob(f".{name}.editinfinity-tmp-*"))


def handlers_installed(pid: int) -> bool:
    """The CLI has installed its SIGTERM handler (bit 15 of the caught-signal mask in /proc)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    caught = int(next(ln.split()[1] for ln in status.splitlines() if ln.startswith("SigCgt:")), 16)
    return bool(caught & (1 << (signal.SIGTERM - 1)))


# ---------------------------------------------------------------------------------------------------------------
# places a run never writes


def test_overwrite_never_takes_the_current_folder_an_inputs_folder_or_a_foreign_folder(tmp_path, case):
    """Issue: `edit --out . --overwrite` emptied the current folder (with the input image) and then crashed."""
    work = tmp_path / "work"
    work.mkdir()
    image = work / "image.png"
    image.write_bytes(Path(case["image"]).read_bytes())
    (work / "notes.txt").write_text("mine")
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "holiday.jpg").write_text("not a picture, but mine")
    before = {p: p.read_bytes() for p in (image, work / "notes.txt", foreign / "holiday.jpg")}
    edit = ["edit", "--image", str(image), "--prompt", "'a red circle'", "--edit-prompt", "'a green circle'",
            "--whole-image", *FAST, "--out"]
    runs = [
        (work, [*edit, ".", "--overwrite"]),
        ("/", [*edit, work, "--overwrite"]),  # the input's own folder
        ("/", [*edit, tmp_path, "--overwrite"]),  # holds the input
        ("/", [*edit, foreign, "--overwrite"]),  # not a result of ours
        ("/", ["demo", "--out", foreign, "--preset", "tiny", "-q"]),  # demo: no silent overwrite any more
        ("/", [*edit, work / "notes.txt", "--overwrite"]),  # a file, even with --overwrite
        ("/", [*edit, work / "notes.txt" / "sub"]),  # under a file: a storage error
        ("/", [*edit, "/", "--overwrite"]),
    ]
    script = " ; ".join(f"cd {cwd} ; {sys.executable} -m editinfinity.cli {' '.join(map(str, a))} ; echo rc=$?"
                        for cwd, a in runs)
    proc = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=900)
    codes = [int(ln[3:]) for ln in proc.stdout.splitlines() if ln.startswith("rc=")]
    errors = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert "Traceback" not in proc.stderr, proc.stderr
    assert codes == [2, 2, 2, 2, 2, 2, 3, 2], (codes, proc.stderr)
    assert len(errors) == len(codes), proc.stderr  # one line each
    assert "is the current folder" in errors[0]
    assert "is the folder of the input" in errors[1]
    assert "holds the input" in errors[2]
    assert "not an earlier editinfinity result" in errors[3] and "--overwrite" in errors[3]
    assert "already exists" in errors[4] and "--overwrite" in errors[4]
    assert "existing file" in errors[5]
    assert "is a file" in errors[6]
    assert "root of the file system" in errors[7]
    assert {p: p.read_bytes() for p in before} == before
    assert sorted(p.name for p in work.iterdir()) == ["image.png", "notes.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["photos", "work"]
    assert [p.name for p in foreign.iterdir()] == ["holiday.jpg"]


def test_overwrite_replaces_an_earlier_result_but_not_one_with_added_files(tmp_path, case):
    out = tmp_path / "out"
    assert cli(*edit_args(case, out, *FAST)).returncode == 0
    record = json.loads((out / ".editinfinity-output.json").read_text())
    assert "edited.png" in record["files"] and "summary.json" in record["files"]
    first = (out / "summary.json").stat().st_mtime_ns
    proc = cli(*edit_args(case, out, "--overwrite", *FAST))
    assert proc.returncode == 0, proc.stderr
    assert (out / "summary.json").stat().st_mtime_ns != first
    (out / "my-notes.txt").write_text("keep me")
    one_line_error(cli(*edit_args(case, out, "--overwrite", *FAST)), 2, "my-notes.txt")
    assert (out / "my-notes.txt").read_text() == "keep me"
    assert hidden(tmp_path) == []


# ---------------------------------------------------------------------------------------------------------------
# concurrency


def test_two_runs_into_one_out_one_wins_and_nothing_is_lost(tmp_path, case):
    """Issue: both runs exited 0 and printed the same path while only the last result survived."""
    out = tmp_path / "out"
    procs = [start(*edit_args(case, out, *FAST)) for _ in range(2)]
    results = [p.communicate(timeout=600) for p in procs]
    codes = sorted(p.returncode for p in procs)
    assert codes == [0, 2], results
    loser = results[[p.returncode for p in procs].index(2)][1]
    assert "Traceback" not in loser and str(out) in loser
    assert "another editinfinity run" in loser or "appeared while this run was working" in loser
    assert (out / "edited.png").is_file() and (out / "summary.json").is_file()
    kept = [p for p in tmp_path.iterdir() if p.name.startswith("out.editinfinity-")]
    if "appeared" in loser:  # lost the race only at the end: its result is kept under the printed name
        assert len(kept) == 1 and str(kept[0]) in loser and (kept[0] / "edited.png").is_file()
    else:
        assert kept == []
    assert hidden(tmp_path) == []


def test_out_appearing_during_a_run_is_left_alone_and_the_result_kept_aside(tmp_path, case):
    """Issue: a file written into --out during a run was deleted by the run's final publish."""
    out = tmp_path / "out"
    proc = start(*edit_args(case, out, *FAST))
    wait_for(lambda: private_folders(tmp_path), what="the run's private folder")
    out.mkdir()
    (out / "theirs.txt").write_text("written meanwhile")
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 2 and "Traceback" not in err, err
    assert "appeared while this run was working" in err
    assert [p.name for p in out.iterdir()] == ["theirs.txt"]
    kept = [p for p in tmp_path.iterdir() if p.name.startswith("out.editinfinity-")]
    assert len(kept) == 1 and str(kept[0]) in err and (kept[0] / "edited.png").is_file()
    assert hidden(tmp_path) == []


# ---------------------------------------------------------------------------------------------------------------
# signals and leftovers


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_sigint_and_sigterm_remove_the_private_folder_and_exit_128_plus_signal(tmp_path, case, sig):
    out = tmp_path / "out"
    proc = start(*edit_args(case, out, *ENDLESS))
    wait_for(lambda: any((p / "stages" / "prompt").exists() for p in private_folders(tmp_path)),
             what="the LoRA stage")
    os.kill(proc.pid, sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert not out.exists() and hidden(tmp_path) == []


def test_a_signal_during_the_imports_is_answered_in_one_line(tmp_path, case):
    """Issue: Ctrl-C while the command was still importing printed a traceback."""
    out = tmp_path / "out"
    for sig in (signal.SIGINT, signal.SIGTERM):
        proc = start(*edit_args(case, out, *FAST))
        wait_for(lambda p=proc: handlers_installed(p.pid) or p.poll() is not None, timeout=60,
                 what="the signal handlers")
        os.kill(proc.pid, sig)
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 128 + sig, err
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert sorted(tmp_path.iterdir()) == []


def test_sigkill_leftovers_are_removed_by_the_next_run_or_listed_by_clean(tmp_path, case):
    out = tmp_path / "out"
    proc = start(*edit_args(case, out, *ENDLESS))
    wait_for(lambda: any((p / "stages" / "prompt").exists() for p in private_folders(tmp_path)),
             what="the LoRA stage")
    proc.kill()
    proc.communicate(timeout=60)
    (leftover,) = private_folders(tmp_path)
    marker = json.loads((leftover / ".editinfinity-run.json").read_text())
    assert marker["pid"] == proc.pid and marker["target"] == str(out)
    # a folder of a live process (this test's) and one moved aside by a killed --overwrite are told apart
    live = tmp_path / f".other.editinfinity-tmp-{os.uname().nodename}-{os.getpid()}-abcdef"
    live.mkdir()
    aside = tmp_path / f".prev.editinfinity-old-{os.uname().nodename}-{proc.pid}-123456"
    aside.mkdir()
    (aside / "summary.json").write_text("{}")
    listed = cli("clean", "--dry-run", tmp_path)
    assert listed.returncode == 0, listed.stderr
    assert f"would remove {leftover}" in listed.stdout and f"kept {live}" in listed.stdout
    assert leftover.is_dir()
    # the next run into the same --out removes it (here a run that then fails on its preset: still cleaned)
    proc2 = cli(*edit_args(case, out, "--preset", "nope", "-q"))
    assert proc2.returncode == 2 and not leftover.exists(), proc2.stderr
    cleaned = cli("clean", tmp_path)
    assert f"restored {tmp_path / 'prev'}" in cleaned.stdout, cleaned.stdout
    assert (tmp_path / "prev" / "summary.json").is_file() and live.is_dir()
    assert not out.exists()


# ---------------------------------------------------------------------------------------------------------------
# bad options: one line, exit 2, nothing written


def run_many(runs: list[list], cwd=None, timeout=900) -> tuple[list[int], list[str], str]:
    """Several CLI runs in one shell; (exit codes, stderr lines, whole stderr)."""
    script = " ; ".join(f"{sys.executable} -m editinfinity.cli {' '.join(_quote(a) for a in r)} ; echo rc=$? ; "
                        "echo '--' >&2" for r in runs)
    proc = subprocess.run(["bash", "-c", script], capture_output=True, text=True, cwd=cwd, timeout=timeout)
    codes = [int(ln[3:]) for ln in proc.stdout.splitlines() if ln.startswith("rc=")]
    chunks = [c.strip() for c in proc.stderr.split("--\n")][: len(runs)]
    return codes, chunks, proc.stderr


def _quote(arg) -> str:
    import shlex

    return shlex.quote(str(arg))


def test_bad_options_are_answered_in_one_line_before_anything_is_written(tmp_path, case):
    out = tmp_path / "out"
    base = edit_args(case, out, "--preset", "tiny", "-q")
    runs = [
        ([*base, "--device", "tpu"], ["--device", "tpu"]),
        ([*base, "--device", "cuda:7"], ["--device", "cuda:7"]),
        ([*base, "--seed", str(2**64)], ["--seed", "2**64-1"]),
        ([*base, "--seed", "-1"], ["--seed"]),
        ([*base, "--prompt-iters", "-3"], ["--prompt-iters"]),
        ([*base, "--threshold", "1.5"], ["--threshold"]),
        ([*base, "--weights", tmp_path / "nonexistent"], ["--weights", "nonexistent", "editinfinity convert"]),
    ]
    codes, errors, raw = run_many([r for r, _ in runs])
    assert "Traceback" not in raw, raw
    assert codes == [2] * len(runs), raw
    for (_, needles), err in zip(runs, errors, strict=True):
        assert len(err.splitlines()) == 1 and err.startswith("error: "), err
        assert all(n in err for n in needles), (needles, err)
    assert "text encoder" not in errors[-1]
    assert sorted(tmp_path.iterdir()) == []


def test_stage_commands_refuse_bad_inputs_damaged_artifacts_and_other_models(tmp_path, case):
    """Issue: a `tiny` case tuned with `toy` exited 0; a truncated .safetensors and `--iters -3` gave tracebacks;
    `tune-prompt --case-dir c --out c --overwrite` replaced its own input."""
    c, p = tmp_path / "case", tmp_path / "prompt"
    prep = cli("prepare", "--image", case["image"], "--prompt", case["prompt"], "--edit-prompt", case["edit_prompt"],
               "--whole-image", "--out", c, "--preset", "tiny", "-q")
    assert prep.returncode == 0, prep.stderr
    assert json.loads((c / "case.json").read_text())["models"]["preset"] == "tiny"
    tuned = cli("tune-prompt", "--case-dir", c, "--out", p, "--iters", "1", "-q")
    assert tuned.returncode == 0, tuned.stderr
    assert json.loads((p / "stage.json").read_text())["models"]["preset"] == "tiny"
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    for f in p.iterdir():
        (damaged / f.name).write_bytes(f.read_bytes())
    emb = damaged / "prompt_embedding.safetensors"
    emb.write_bytes(emb.read_bytes()[: emb.stat().st_size // 2])
    case_files = {f: f.read_bytes() for f in c.iterdir()}
    runs = [
        (["tune-prompt", "--case-dir", c, "--out", tmp_path / "p2", "--preset", "toy", "-q"], 2,
         ["'tiny'", "'toy'", "--preset tiny"]),
        (["train-lora", "--case-dir", c, "--prompt-dir", damaged, "--out", tmp_path / "l", "--iters", "1", "-q"], 2,
         ["prompt_embedding.safetensors", "truncated or corrupt", "tune-prompt"]),
        (["tune-prompt", "--case-dir", c, "--out", c, "--overwrite", "-q"], 2, ["is an input"]),
        (["tune-prompt", "--case-dir", c, "--out", tmp_path / "p3", "--iters", "-3"], 2, ["--iters"]),
        (["train-lora", "--case-dir", c, "--prompt-dir", p, "--out", tmp_path / "l", "--seed", "x"], 2, ["--seed"]),
    ]
    codes, errors, raw = run_many([r for r, _, _ in runs])
    assert "Traceback" not in raw, raw
    assert codes == [code for _, code, _ in runs], raw
    for (_, _, needles), err in zip(runs, errors, strict=True):
        assert len(err.splitlines()) == 1, err
        assert all(n in err for n in needles), (needles, err)
    assert {f: f.read_bytes() for f in c.iterdir()} == case_files
    assert sorted(x.name for x in tmp_path.iterdir()) == ["case", "damaged", "prompt"]
