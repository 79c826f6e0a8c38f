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

# the moto S3 server (with real authentication) of the storage tests
from test_storage import BUCKET, s3  # noqa: F401

FAST = ["--preset", "tiny", "--prompt-iters", "1", "--lora-iters", "1", "-q"]
#: A run that keeps going until it is stopped (LoRA training with a huge budget).
ENDLESS = ["--preset", "tiny", "--prompt-iters", "1", "--lora-iters", "1000000", "-q"]


def cli(*args, cwd=None, timeout=300, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "editinfinity.cli", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, cwd=cwd, env=env)


def _default_sigint() -> None:
    # A shell starts background jobs with SIGINT ignored and the CLI rightly keeps an inherited ignore; the child of a
    # test must get Ctrl-C as a terminal would send it, whatever way the test run itself was started.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start(*args, cwd=None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "editinfinity.cli", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=cwd, preexec_fn=_default_sigint)


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
    """Also: file:// inputs and outputs, case-file settings honoured, flags given with --case recorded as overrides,
    the preset's default resolution, and -q silent (no weights-loading bar of the default preset)."""
    from editinfinity.models.presets import PRESETS

    out = tmp_path / "out"
    case_file = tmp_path / "case.json"
    case_file.write_bytes("\ufeff".encode() + json.dumps({  # a byte-order mark, as some editors write
        "image": case["image"], "prompt": case["prompt"], "edit_prompt": case["edit_prompt"],
        "target_word": "circle", "seed": 3, "prompt_iters": 1, "lora_iters": 1, "preset": "tiny"}).encode())
    first = cli("edit", "--case", f"file://{case_file}", "--image", f"file://{case['image']}", "--seed", "5",
                "--whole-image", "--out", f"file://{out}", "-q")
    assert first.returncode == 0, first.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["settings"]["seed"] == 5 and summary["settings"]["prompt_iters"] == 1  # flag, then case file
    assert summary["settings"]["lora_iters"] == 1 and summary["models"]["preset"] == "tiny"
    assert summary["overrides"]["seed"] == {"case_file": 3, "command_line": 5}
    assert summary["overrides"]["mode"] == {"case_file": "auto", "command_line": "whole"}
    assert "image" not in summary["overrides"]  # the same file, once as a file:// URI
    assert summary["spec"]["resolution"] == PRESETS["tiny"].resolution  # no resolution in the file: the preset's
    record = json.loads((out / ".editinfinity-output.json").read_text())
    assert "edited.png" in record["files"] and "summary.json" in record["files"]
    before = (out / "summary.json").stat().st_mtime_ns
    # the default preset (bundled weights, loaded with a progress bar unless -q)
    second = cli(*edit_args(case, out, "--overwrite", "--prompt-iters", "1", "--lora-iters", "1", "-q"))
    assert second.returncode == 0 and second.stderr == "", second.stderr
    assert (out / "summary.json").stat().st_mtime_ns != before
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


def test_uris_and_case_files_are_used_as_written_or_refused_in_one_line(tmp_path, case):
    """Issue: `--out s3:/x` wrote ./s3:/x; case-file values and fields were called "empty" or silently dropped."""
    from PIL import Image

    work = tmp_path / "work"
    work.mkdir()

    def case_file(name: str, text: str) -> Path:
        (work / name).write_text(text)
        return work / name

    white = work / "white.png"
    Image.new("L", (64, 64), 255).save(white)
    img = case["image"]
    numeric = case_file("numeric.yaml", f"image: {img}\nprompt: 123\nedit_prompt: a green circle\n")
    symbols = case_file("symbols.yaml", f"image: {img}\nprompt: a red circle\nedit_prompt: a green circle\n"
                                        "target_word: \"\U0001F534\"\n")
    bad_seed = case_file("seed.yaml", f"image: {img}\nprompt: a red circle\nedit_prompt: x\nseed: -1\n")
    broken = case_file("broken.yaml", "image: [unclosed\n")
    edit = ["edit", "--prompt", "a red circle", "--edit-prompt", "a green circle", "--preset", "tiny", "-q"]
    runs = [
        ([*edit, "--image", img, "--whole-image", "--out", "s3:/x"], 2, ["--out", "s3://BUCKET/KEY"]),
        ([*edit, "--image", img, "--whole-image", "--out", "gs:x"], 2, ["--out", "gs://BUCKET/KEY"]),
        ([*edit, "--image", img, "--whole-image", "--out", "ftp://host/x"], 2, ["unsupported URI scheme 'ftp'"]),
        ([*edit, "--image", "s3:/bucket/image.png", "--whole-image", "--out", "o"], 2, ["--image", "s3://"]),
        ([*edit, "--image", img, "--mask", "gs:mask.png", "--out", "o"], 2, ["--mask", "gs://"]),
        ([*edit, "--image", work, "--whole-image", "--out", "o"], 2, ["is a directory"]),
        (["edit", "--case", numeric, "--whole-image", "--out", "o", "-q"], 2, ["`prompt`", "text", "123"]),
        (["edit", "--case", symbols, "--out", "o", "--preset", "tiny", "-q"], 2, ["no letter or digit"]),
        (["edit", "--case", bad_seed, "--whole-image", "--out", "o"], 2, ["`seed`", "--seed"]),
        (["edit", "--case", broken, "--whole-image", "--out", "o"], 2, ["not valid YAML"]),
        ([*edit, "--image", img, "--mask", white, "--out", "o"], 2, ["every pixel", "--whole-image"]),
        ([*edit[:2], "long " * 600, *edit[3:], "--image", img, "--whole-image", "--out", "o"], 2,
         ["T5 tokens", "shorten"]),
    ]
    codes, errors, raw = run_many([r for r, _, _ in runs], cwd=work)
    assert "Traceback" not in raw and "Token indices" not in raw, raw
    assert codes == [c for _, c, _ in runs], raw
    for (_, _, needles), err in zip(runs, errors, strict=True):
        assert len(err.splitlines()) == 1 and err.startswith("error: "), err
        assert all(n in err for n in needles), (needles, err)
    assert sorted(p.name for p in work.iterdir()) == sorted(
        ["numeric.yaml", "symbols.yaml", "seed.yaml", "broken.yaml", "white.png"])


def test_a_repeated_target_word_is_reported_and_can_be_picked(tmp_path, case):
    """Issue: a target word that occurs twice silently took the first occurrence."""
    out = tmp_path / "out"
    prompt = "a red circle and a red square on a gray background"
    proc = cli("edit", "--image", case["image"], "--prompt", prompt, "--edit-prompt", prompt.replace("red s", "blue s"),
               "--target-word", "red#2", "--out", out, *FAST)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["target_word"] == {"occurrences": 2, "edited": 2}
    bad = cli("edit", "--image", case["image"], "--prompt", prompt, "--edit-prompt", "a green circle",
              "--target-word", "red#3", "--out", tmp_path / "o2", *FAST)
    one_line_error(bad, 2, "red#1 .. red#2")


@pytest.mark.integration
def test_remote_out_is_checked_before_the_models_load(tmp_path, case, s3):  # noqa: F811
    """Issue: a remote --out with --overwrite failed only at publish, after the whole edit. `--preset nope` makes
    every run below fail at model loading once its --out passed: a storage answer proves the order."""
    base = dict(os.environ)
    s3.client.put_object(Bucket=BUCKET, Key="done/_MANIFEST.json", Body=b"{}")
    s3.client.put_object(Bucket=BUCKET, Key="theirs/data.csv", Body=b"1,2")
    reader = {**base, "AWS_ACCESS_KEY_ID": s3.reader["AccessKeyId"],
              "AWS_SECRET_ACCESS_KEY": s3.reader["SecretAccessKey"]}
    anonymous = {k: v for k, v in base.items() if k not in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    cases = [
        (f"s3://{BUCKET}/new", [], reader, 3, ["s3://"]),  # read-only credentials: the write probe fails
        (f"s3://{BUCKET}-missing/new", [], base, 3, [f"{BUCKET}-missing"]),
        (f"s3://{BUCKET}/new", [], anonymous, 3, ["credential"]),
        (f"s3://{BUCKET}/done", [], base, 2, ["already holds a result", "--overwrite"]),
        (f"s3://{BUCKET}/theirs", ["--overwrite"], base, 2, ["not written by editinfinity"]),
        (f"s3://{BUCKET}/done", ["--overwrite"], base, 2, ["nope"]),  # allowed: then the preset fails
    ]
    for uri, extra, env, code, needles in cases:
        proc = cli(*edit_args(case, uri, *extra, "--preset", "nope", "-q"), env=env, cwd=tmp_path)
        one_line_error(proc, code, *needles)
    keys = sorted(o["Key"] for o in s3.client.list_objects_v2(Bucket=BUCKET).get("Contents", []))
    assert keys == ["done/_MANIFEST.json", "theirs/data.csv"]  # no probe object left, nothing replaced
    assert sorted(tmp_path.iterdir()) == []


def test_a_pipeline_step_stopped_by_sigterm_publishes_nothing(tmp_path):
    """Pods are stopped with SIGTERM: the component's private output folder goes, the step ends in one line."""
    artifact = tmp_path / "outputs" / "prompt_embedding"
    script = (
        "import sys, time\n"
        "from editinfinity.edit.artifacts import stage_output\n"
        f"with stage_output({str(artifact)!r}, 'tune_prompt', run_id='r') as (tmp, record):\n"
        "    (tmp / 'rows.safetensors').write_bytes(b'partial')\n"
        "    print('started', flush=True)\n"
        "    time.sleep(120)\n"
    )
    env = {**os.environ, "EDITINFINITY_HANDLE_SIGNALS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)
    assert proc.stdout.readline().strip() == "started"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert len(err.strip().splitlines()) == 1 and "SIGTERM" in err, err
    assert not artifact.exists() and not artifact.parent.exists()  # the folder the claim made is gone too


def test_kfp_executor_processes_are_recognised(monkeypatch):
    import types

    from editinfinity import interrupts

    monkeypatch.delenv("EDITINFINITY_HANDLE_SIGNALS", raising=False)
    fake = types.ModuleType("__main__")
    fake.__spec__ = types.SimpleNamespace(name="kfp.dsl.executor_main")
    monkeypatch.setitem(sys.modules, "__main__", fake)
    assert interrupts.in_pod()
    fake.__spec__ = types.SimpleNamespace(name="pytest")
    assert not interrupts.in_pod()


def test_help_names_every_option():
    """Issue: --overwrite, --seed, --iters, --mask-polarity and convert --preset had no help text."""
    from editinfinity.cli import build_parser

    def walk(parser, name):
        for action in parser._actions:
            if isinstance(action.choices, dict):  # subcommands
                for sub, parsed in action.choices.items():
                    yield from walk(parsed, f"{name} {sub}")
            elif action.option_strings and action.dest != "help":
                yield name, action

    missing = [f"{name} {action.option_strings[0]}" for name, action in walk(build_parser(), "editinfinity")
               if not action.help]
    assert missing == []


def test_unwritable_places_fail_before_any_work_with_a_storage_error(tmp_path, case):
    """Issue: an --out on a read-only file system or in an immutable folder gave tracebacks. Needs root (mount,
    chattr) or, as another user, a folder without write permission."""
    ro, frozen, locked = tmp_path / "ro", tmp_path / "frozen", tmp_path / "locked"
    for d in (ro, frozen, locked):
        d.mkdir()
    cleanups, runs = [], []
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(ro)], capture_output=True).returncode == 0:
        cleanups.append(["umount", str(ro)])
        runs.append((ro / "out", "read-only"))
    if subprocess.run(["chattr", "+i", str(frozen)], capture_output=True).returncode == 0:
        cleanups.append(["chattr", "-i", str(frozen)])
        runs.append((frozen / "out", "not writable"))
    if os.geteuid() != 0:
        locked.chmod(0o555)
        runs.append((locked / "out", "not writable"))
    try:
        if not runs:
            pytest.skip("cannot make a read-only or immutable folder here")
        codes, errors, raw = run_many([edit_args(case, out, "--preset", "nope", "-q") for out, _ in runs])
        assert "Traceback" not in raw and codes == [3] * len(runs), raw
        for (_, needle), err in zip(runs, errors, strict=True):
            assert len(err.splitlines()) == 1 and needle in err, err
    finally:
        for cmd in cleanups:
            subprocess.run(cmd, check=False)
        locked.chmod(0o755)
    assert all(list(d.iterdir()) == [] for d in (ro, frozen, locked))
