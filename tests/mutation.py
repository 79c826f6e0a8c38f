"""Plant known training and blending bugs one at a time and check that the tests catch each (``make mutation``).

Every mutant replaces one exact piece of source (found by its text anywhere under ``core/``, so it survives files
being moved) in a temporary copy of the repository, then runs only the tests that should notice it. A mutant is
*caught* when those tests fail, *missed* when they pass; a pattern that no longer matches exactly once is an
*error* (the list needs updating). The unmutated copy runs the same tests first, so a failure means the mutant.

    python tests/mutation.py                 # every mutant
    python tests/mutation.py -k zero_grad    # those whose name contains a word
    python tests/mutation.py --list

Exit status 0 only when every mutant is caught. Not part of ``make test``: it runs the selected tests once per
mutant (a few minutes on two cores).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COPY = ["core", "tests", "docs", "components", "pipelines", "pyproject.toml"]
# Package data too large to copy for every run: linked into the copy instead.
LINKED = ["core/editinfinity/presets/toy"]


@dataclass(frozen=True)
class Mutant:
    name: str
    why: str
    old: str
    new: str
    tests: tuple[str, ...]  # test files (found by name anywhere under tests/ if moved), optionally ``::test_name``


MUTANTS = [
    Mutant("bsc_labels_from_clean_chain", "self-correction labels from the clean chain, inputs from the noisy one",
           "    _, _, x_wo_prefix, gt_bits = _residual_quantize(z, schedule, flip=flip)\n    return gt_bits, x_wo_prefix",
           "    _, _, x_wo_prefix, _ = _residual_quantize(z, schedule, flip=flip)\n"
           "    return multiscale_quantize(z, schedule).gt_bits, x_wo_prefix",
           ("test_self_correction.py",)),
    Mutant("noise_layers_one_too_many", "flips also at scale noise_layers",
           "        if k >= noise_layers:\n            return None", "        if k > noise_layers:\n            return None",
           ("test_self_correction.py",)),
    Mutant("noise_layers_one_too_few", "no flips at scale noise_layers - 1",
           "        if k >= noise_layers:\n            return None",
           "        if k >= noise_layers - 1:\n            return None",
           ("test_self_correction.py",)),
    Mutant("noise_strength_constant", "flip probability always the strength instead of U{0..strength}",
           "generator=generator, device=gen_device).to(torch.float32) / 100",
           "generator=generator, device=gen_device).mul(0).add(levels).to(torch.float32) / 100",
           ("test_self_correction.py",)),
    Mutant("training_without_noise", "training stages get the clean inputs (self-correction strength ignored)",
           "return bitwise_self_correction(z, case.schedule, layers, settings.noise_strength, generator)",
           "return bitwise_self_correction(z, case.schedule, layers, 0.0, generator)",
           ("test_stage_inputs.py",)),
    Mutant("zero_grad_removed", "gradients accumulate across updates",
           "        opt.zero_grad(set_to_none=True)\n        loss = loss_fn(step)\n", "        loss = loss_fn(step)\n",
           ("test_training_trajectory.py::test_prompt_tuning_updates_match_hand_run_adamw",)),
    Mutant("clip_removed", "no gradient clipping", "            torch.nn.utils.clip_grad_norm_(params, settings.grad_clip)\n",
           "", ("test_training_trajectory.py::test_prompt_tuning_updates_match_hand_run_adamw",)),
    Mutant("weight_decay_ignored", "AdamW without the configured weight decay",
           "weight_decay=settings.weight_decay, fused=", "weight_decay=0.0, fused=",
           ("test_training_trajectory.py::test_prompt_tuning_updates_match_hand_run_adamw",)),
    Mutant("betas_ignored", "AdamW with PyTorch's betas instead of the configured ones",
           "opt = torch.optim.AdamW(params, lr=lr, betas=settings.betas,",
           "opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999),", ("test_training_trajectory.py::test_prompt_tuning_updates_match_hand_run_adamw",)),
    Mutant("loss_not_reweighted", "prompt tuning's bit loss without the per-scale reweighting",
           "return models.transformer.bit_loss(logits.float(), gt_bits, case.schedule)",
           "return models.transformer.bit_loss(logits.float(), gt_bits, case.schedule, reweight=False)",
           ("test_training_trajectory.py::test_prompt_tuning_updates_match_hand_run_adamw",)),
    Mutant("kl_term_dropped", "LoRA objective without the extra bit-CE term",
           "    if settings.kl_weight:\n        loss = loss + settings.kl_weight",
           "    if False:\n        loss = loss + settings.kl_weight", ("test_training_trajectory.py::test_lora_updates_match_hand_run_adamw",)),
    Mutant("prompt_tuning_on_edit_prompt", "prompt tuning learns the rows on the edit prompt",
           'text = styled_text(case, "source_styled", rows, models.device)\n    with models.autocast():',
           'text = styled_text(case, "edit_styled", rows, models.device)\n    with models.autocast():',
           ("test_stage_inputs.py", "test_training_trajectory.py")),
    Mutant("lora_on_plain_prompt", "LoRA trains on the plain source prompt",
           'return styled_text(case, "source_styled", rows, models.device).repeat(settings.lora_batch)',
           'return styled_text(case, "source_plain", rows, models.device).repeat(settings.lora_batch)',
           ("test_stage_inputs.py",)),
    Mutant("attention_on_styled_prompt", "attention reads the styled prompt",
           'text = case.text["source_plain"].to(models.device)', 'text = case.text["source_styled"].to(models.device)',
           ("test_stage_inputs.py",)),
    Mutant("generation_on_source_prompt", "generation samples from the styled source prompt",
           'text = styled_text(case, "edit_styled", rows, models.device) if rows is not None',
           'text = styled_text(case, "source_styled", rows, models.device) if rows is not None',
           ("test_stage_inputs.py",)),
    Mutant("generation_without_lora", "generation ignores the adapter",
           "    if adapter is not None:\n        with lora_adapter(", "    if False:\n        with lora_adapter(",
           ("test_stage_inputs.py",)),
    Mutant("to_pil_truncates", "to_pil truncates instead of rounding",
           "arr = ((img.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)",
           "arr = ((img.detach().float().clamp(-1, 1) + 1) * 127.5).to(torch.uint8)", ("test_report.py::test_to_pil_rounds_to_the_nearest_byte_and_clamps",)),
    Mutant("swapped_blend", "blending keeps the generated codes where W = 1",
           "return w * source_codes[k] + (1 - w) * generated.float()",
           "return (1 - w) * source_codes[k] + w * generated.float()",
           ("test_edit_e2e.py::test_keep_weight_one_reproduces_the_source_codes",)),
    Mutant("unblended_last_scale", "the last scale is not blended",
           "            if on_scale is not None:\n                codes_up = on_scale(k, codes_up)",
           "            if on_scale is not None and k < K - 1:\n                codes_up = on_scale(k, codes_up)",
           ("test_edit_e2e.py::test_keep_weight_one_reproduces_the_source_codes",)),
    Mutant("lora_targets_fc1_only", "LoRA adapts fc1 only", 'TARGETS = ["fc1", "fc2"]', 'TARGETS = ["fc1"]',
           ("test_settings_doc.py", "test_training_trajectory.py")),
    Mutant("prompt_iters_default_changed", "a default changed without the documented table",
           "    prompt_iters: int = 10\n    style_rows: int = 20\n", "    prompt_iters: int = 12\n    style_rows: int = 20\n", ("test_settings_doc.py",)),
    Mutant("manifest_before_objects", "the manifest is published before the objects it lists",
           '    _parallel(one, manifest["files"], be.settings.max_concurrency)\n'
           '    meta = {SHA256_METADATA_KEY: hashlib.sha256(manifest_bytes).hexdigest()}\n'
           '    be.run("publish", mu, lambda: be.put_bytes(mu, manifest_bytes, meta))\n',
           '    meta = {SHA256_METADATA_KEY: hashlib.sha256(manifest_bytes).hexdigest()}\n'
           '    be.run("publish", mu, lambda: be.put_bytes(mu, manifest_bytes, meta))\n'
           '    _parallel(one, manifest["files"], be.settings.max_concurrency)\n',
           ("test_storage.py::test_interrupted_publish_leaves_no_manifest",)),
    Mutant("non_atomic_local_write", "a local write goes straight to its destination",
           "        result = write(tmp)\n        _fsync_file(tmp)",
           "        tmp.unlink()\n        tmp = dest\n        result = write(tmp)\n        _fsync_file(tmp)",
           ("test_storage.py::test_local_writes_are_atomic",)),
]


def _copy_repo(dest: Path) -> None:
    for name in COPY:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, dest / name, symlinks=True, ignore=shutil.ignore_patterns(
                "__pycache__", "*.pyc", ".pytest_cache", *[Path(p).name for p in LINKED]))
        elif src.is_file():
            shutil.copy2(src, dest / name)
    for rel in LINKED:
        if (ROOT / rel).exists():
            (dest / rel).symlink_to(ROOT / rel)


def _locate(copy: Path, old: str) -> tuple[Path | None, int]:
    hits = [(p, p.read_text().count(old)) for p in sorted((copy / "core").rglob("*.py"))]
    hits = [(p, n) for p, n in hits if n]
    total = sum(n for _, n in hits)
    return (hits[0][0] if len(hits) == 1 else None), total


def _test_args(copy: Path, tests) -> list[str] | None:
    """Node ids in the copy (None if a file is not found); a test of a file selected whole is dropped."""
    out = []
    for arg in tests:
        file, _, node = arg.partition("::")
        found = sorted(copy.joinpath("tests").rglob(file))
        if len(found) != 1:
            return None
        out.append(str(found[0].relative_to(copy)) + (f"::{node}" if node else ""))
    whole = {a for a in out if "::" not in a}
    return sorted(dict.fromkeys(a for a in out if "::" not in a or a.partition("::")[0] not in whole))


def _pytest(copy: Path, args: list[str], timeout: float) -> tuple[int, str, float]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(copy / "core"), str(copy)]), PYTHONDONTWRITEBYTECODE="1")
    env.setdefault("EDITINFINITY_PARITY_DIR", str(ROOT.parent / "shared" / "parity"))
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-o", "addopts=", *args]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=copy, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return -1, "timed out", time.perf_counter() - t0
    failed = [ln for ln in proc.stdout.splitlines() if ln.startswith(("FAILED", "ERROR"))]
    last = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else proc.stderr.strip()[-200:]
    return proc.returncode, (failed[0] if failed else last), time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-k", dest="match", default="", help="only mutants whose name contains this")
    ap.add_argument("--list", action="store_true", help="list the mutants and exit")
    ap.add_argument("--timeout", type=float, default=600, help="seconds per test run (default 600)")
    args = ap.parse_args(argv)
    mutants = [m for m in MUTANTS if args.match in m.name]
    if args.list or not mutants:
        for m in MUTANTS:
            print(f"{m.name:32s} {m.why}")
        return 0 if mutants else 2
    results = []
    with tempfile.TemporaryDirectory(prefix="editinfinity-mutation-") as td:
        copy = Path(td)
        _copy_repo(copy)
        check = subprocess.run([sys.executable, "-c", "import editinfinity; print(editinfinity.__file__)"], cwd=copy,
                               env=dict(os.environ, PYTHONPATH=str(copy / "core")), capture_output=True, text=True)
        if not check.stdout.startswith(str(copy)):
            print(f"error: the copy's package is not the one imported ({check.stdout.strip()}{check.stderr[-200:]})")
            return 2
        # Baseline: every selected test passes on the unmutated copy (one run over all of them).
        baseline = _test_args(copy, [t for m in mutants for t in m.tests if _test_args(copy, [t])])
        rc, detail, secs = _pytest(copy, baseline, args.timeout)
        print(f"baseline, no mutant ({len(baseline)} selections): {'passed' if rc == 0 else 'FAILED'} ({secs:.0f} s)",
              flush=True)
        if rc != 0:
            print(f"error: the tests fail without any mutant: {detail}")
            return 2
        for m in mutants:
            path, count = _locate(copy, m.old)
            test_args = _test_args(copy, m.tests)
            if path is None or test_args is None:
                why = f"pattern found {count} times" if path is None else f"tests {m.tests} not found"
                results.append((m, "error", why, 0.0))
                print(f"{m.name:32s} error   {why}", flush=True)
                continue
            original = path.read_text()
            path.write_text(original.replace(m.old, m.new))
            try:
                rc, detail, secs = _pytest(copy, test_args, args.timeout)
            finally:
                path.write_text(original)
            status = "caught" if rc == 1 else "missed" if rc == 0 else "error"
            results.append((m, status, detail, secs))
            print(f"{m.name:32s} {status:7s} {secs:5.0f} s  {path.relative_to(copy)}  {detail}", flush=True)
    caught = sum(s == "caught" for _, s, _, _ in results)
    print(f"\n{caught}/{len(results)} mutants caught"
          + "".join(f"\n  {s}: {m.name} ({m.why})" for m, s, _, _ in results if s != "caught"))
    return 0 if caught == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
