"""More of the reliability promises (docs/reliability.md), through the real console command where it matters:
one warning per run, output files under the user's umask, ``file://`` weights, outputs of the evaluation, batch
and training commands routed through output ownership, a bad ``--out`` refused before the heavy imports, case-file
run settings honoured by the library and the batch planner alike."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

from test_reliability import FAST, case, cli, edit_args, one_line_error  # noqa: F401  (case: a fixture)


def _modes(root: Path) -> dict[str, int]:
    return {p.relative_to(root).as_posix(): stat.S_IMODE(p.stat().st_mode) for p in [root, *root.rglob("*")]}


def test_the_equal_prompts_warning_is_printed_once(tmp_path, case):  # noqa: F811
    out = tmp_path / "out"
    args = edit_args(case, out, *FAST)
    args[args.index("--edit-prompt") + 1] = case["prompt"]
    proc = cli(*args)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count("equals `prompt`") == 1, proc.stderr


def test_outputs_get_the_users_umask(tmp_path, case):  # noqa: F811
    """Every file and folder of a result is created as the umask says (027: rw-r----- / rwxr-x---), the report
    and the ownership record included; none keeps a private temporary file's 0600."""
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "editinfinity.cli", *map(str, edit_args(case, out, *FAST))],
                          capture_output=True, text=True, timeout=300, preexec_fn=lambda: os.umask(0o027))
    assert proc.returncode == 0, proc.stderr
    modes = _modes(out)
    assert "report.html" in modes and "summary.json" in modes
    wrong = {name: oct(m) for name, m in modes.items()
             if m != (0o750 if (out / name).is_dir() else 0o640)}
    assert not wrong, wrong


def test_atomic_writers_outside_a_result_folder_follow_the_umask(tmp_path):
    """The report writer (also used for evaluation pages) and storage's local writes: 0o666 & ~umask, read when
    writing (not when the module was imported)."""
    from editinfinity import storage
    from editinfinity.report import atomic_write_text

    old = os.umask(0o027)
    try:
        atomic_write_text(tmp_path / "page.html", "<p>hi</p>")
        storage.write_bytes(str(tmp_path / "blob.bin"), b"x")
    finally:
        os.umask(old)
    assert {n: oct(m) for n, m in _modes(tmp_path).items() if n != "."} == {"page.html": "0o640", "blob.bin": "0o640"}


def test_weights_given_as_file_uris_are_used_as_local_paths(tmp_path):
    """``--weights file://DIR`` (the CLI, the library's ``load_models``, the pods' and batch workers'
    ``resolve_weights``) and ``file://`` checkpoint files of ``convert`` are their local paths."""
    import torch
    from safetensors.torch import save_file

    from editinfinity.models.bundle import load_models
    from editinfinity.models.checkpoints.convert import read_checkpoint
    from editinfinity.models.presets import bundled_weights_dir
    from editinfinity.runtime import resolve_weights

    toy = bundled_weights_dir("toy")
    uri = toy.resolve().as_uri()
    assert uri.startswith("file:///")
    assert resolve_weights(uri) == str(toy.resolve())
    models = load_models("toy", weights=uri, device="cpu", text_encoder=False)
    assert models.source == str(toy.resolve())
    save_file({"w": torch.arange(3.0)}, str(tmp_path / "a b.safetensors"))
    assert read_checkpoint((tmp_path / "a b.safetensors").as_uri())["w"].tolist() == [0.0, 1.0, 2.0]


def test_file_uri_weights_on_the_command_line(tmp_path, case):  # noqa: F811
    missing = tmp_path / "no-such-weights"
    proc = cli(*edit_args(case, tmp_path / "out", *FAST, "--weights", missing.as_uri()))
    one_line_error(proc, 2, f"'{missing}' is not a directory")
    proc = cli(*edit_args(case, tmp_path / "out", *FAST, "--weights", f"file:{missing}"))
    one_line_error(proc, 2, "--weights", "mistyped file URI")
    assert not (tmp_path / "out").exists()


BLOCK_HEAVY = """
import sys
for name in ("torch", "diffusers", "transformers"):
    sys.modules[name] = None  # importing them now fails: a command that needs them cannot answer
from editinfinity.cli import main
for argv in ARGVS:
    print(main(argv), flush=True)
"""


def test_a_bad_out_is_refused_before_the_heavy_imports(tmp_path, case):  # noqa: F811
    """Parsing the command line and checking a local ``--out`` import neither torch, diffusers nor transformers
    (seconds to import), so a bad ``--out`` is answered at once; docs/reliability.md has the timings."""
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("mine")
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    argvs = [edit_args(case, foreign, "--preset", "tiny"),
             edit_args(case, foreign, "--preset", "tiny", "--overwrite"),
             edit_args(case, a_file / "out", "--preset", "tiny"),
             ["demo", "--out", foreign],
             ["prepare", "--image", case["image"], "--prompt", "p", "--edit-prompt", "q", "--whole-image",
              "--out", Path(case["image"]).parent],
             ["learn", "--image", case["image"], "--prompt", "p", "--out", "s3:/bucket"]]
    code = f"ARGVS = {[[str(a) for a in argv] for argv in argvs]!r}\n" + BLOCK_HEAVY
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.stdout.split() == ["2", "2", "3", "2", "2", "2"], (proc.stdout, proc.stderr)
    errors = proc.stderr.splitlines()
    for needle, line in zip(["not empty", "not an earlier editinfinity result", "is a file, not a folder",
                             "not empty", "is the folder of the input", "mistyped s3 URI"], errors, strict=True):
        assert needle in line, (needle, line)
    assert (foreign / "keep.txt").read_text() == "mine" and sorted(p.name for p in tmp_path.iterdir()) == [
        "file.txt", "foreign"]


def test_toy_piebench_out_is_claimed_like_every_result(tmp_path):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("mine")
    toy = ["eval", "toy-piebench", "--per-type", "1", "--types", "0"]
    one_line_error(cli(*toy, "--out", foreign), 2, "not empty", "--overwrite")
    one_line_error(cli(*toy, "--out", foreign, "--overwrite"), 2, "not an earlier editinfinity result")
    assert sorted(p.name for p in foreign.iterdir()) == ["keep.txt"]
    out = tmp_path / "set"
    proc = cli(*toy, "--out", out)
    assert proc.returncode == 0, proc.stderr
    assert (out / "mapping_file.json").is_file() and (out / ".editinfinity-output.json").is_file()
    one_line_error(cli(*toy, "--out", out), 2, "pass --overwrite")
    assert cli(*toy, "--out", out, "--overwrite").returncode == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["foreign", "set"]  # no temporary folder or lock left


def test_batch_plan_out_replaces_only_a_plan_file(tmp_path, case):  # noqa: F811
    cases = tmp_path / "cases.jsonl"
    cases.write_text(json.dumps({"id": "one", "image": case["image"], "prompt": case["prompt"],
                                 "edit_prompt": case["edit_prompt"]}) + "\n")
    plan = ["batch", "plan", "--cases", cases, "--output-uri", tmp_path / "results", "--preset", "tiny"]
    notes = tmp_path / "notes.json"
    notes.write_text('{"mine": true}')
    one_line_error(cli(*plan, "--out", notes), 2, "already exists", "--overwrite")
    one_line_error(cli(*plan, "--out", notes, "--overwrite"), 2, "not a file this command wrote")
    one_line_error(cli(*plan, "--out", tmp_path), 2, "is a folder")
    assert notes.read_text() == '{"mine": true}'
    out = tmp_path / "plans" / "plan.json"
    proc = cli(*plan, "--out", out)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(out.read_text())["format"].startswith("editinfinity-batch-plan/")
    one_line_error(cli(*plan, "--out", out), 2, "already exists")
    assert cli(*plan, "--out", out, "--overwrite").returncode == 0
    assert sorted(p.name for p in out.parent.iterdir()) == ["plan.json"]


def test_toy_training_folders_of_others_are_refused_and_never_removed(tmp_path, capsys):
    from editinfinity.train.toy import main as train_toy

    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "cat.jpg").write_text("mine")
    assert train_toy(["--out", str(foreign), "--vae-steps", "1"]) == 2
    assert "holds no training run of ours" in capsys.readouterr().err
    assert train_toy(["--out", str(foreign), "--overwrite"]) == 2
    # an earlier toy run's folder with a file of the user's added: --overwrite refuses, naming it
    out = tmp_path / "toy"
    (out / "vae").mkdir(parents=True)
    (out / "training.json").write_text("{}")
    (out / "notes.txt").write_text("mine")
    assert train_toy(["--out", str(out), "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert "notes.txt" in err and len(err.strip().splitlines()) == 2, err
    assert train_toy(["--out", str(tmp_path / "new"), "--work", str(foreign)]) == 2
    assert (foreign / "cat.jpg").read_text() == "mine" and (out / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["photos", "toy"]
