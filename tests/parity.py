"""Read parity fixtures and their tolerances from the fixture set itself (README tables + manifest.json).

Nothing here hard-codes a number: tolerances come from the "suggested tolerance" column of the fixture README's
per-file tables (``atol X``, ``exact``, ``exact; 1e-6 if your ops differ``, ``exact up to +-N``), so the same tests run
against fixture sets made with other seeds, prompts and configurations.
"""

from __future__ import annotations

import functools
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]


def parity_path() -> Path:
    """``$EDITINFINITY_PARITY_DIR``, else ``../shared/parity`` beside the repository.

    Defined here, not in conftest.py: with tests/kubeflow/conftest.py beside it, ``import conftest`` from a test
    module may get that one when the whole suite is collected."""
    return Path(os.environ.get("EDITINFINITY_PARITY_DIR", ROOT.parent / "shared" / "parity")).resolve()

_SECTION = re.compile(r"^### `([^`]+)`")
_ROW = re.compile(r"^\| `([^`]+)` \|")


@dataclass(frozen=True)
class Tolerance:
    atol: float
    text: str

    @property
    def exact(self) -> bool:
        return self.atol == 0.0


def _parse_tolerance(text: str) -> Tolerance:
    t = text.strip()
    if m := re.fullmatch(r"atol ([0-9.eE+-]+)", t):
        return Tolerance(float(m.group(1)), t)
    if m := re.fullmatch(r"exact; ([0-9.eE+-]+) if your ops differ", t):
        return Tolerance(float(m.group(1)), t)
    if m := re.fullmatch(r"exact up to \+-([0-9.eE+-]+)", t):
        return Tolerance(float(m.group(1)), t)
    if t == "exact":
        return Tolerance(0.0, t)
    raise ValueError(f"unrecognised tolerance {t!r} in the parity README")


@functools.cache
def tolerances(parity_dir: str) -> dict[str, dict[str, Tolerance]]:
    """{file: {tensor: Tolerance}} parsed from the README tables."""
    out: dict[str, dict[str, Tolerance]] = {}
    current = None
    for line in (Path(parity_dir) / "README.md").read_text().splitlines():
        if m := _SECTION.match(line):
            current = out.setdefault(m.group(1), {})
        elif current is not None and (m := _ROW.match(line)):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            current[m.group(1)] = _parse_tolerance(cells[-1])
    return out


@functools.cache
def manifest(parity_dir: str) -> dict:
    return json.loads((Path(parity_dir) / "manifest.json").read_text())


class Fixture:
    """One fixture file: its tensors, its manifest entry and its tolerances."""

    def __init__(self, name: str, parity_dir: Path | None = None):
        self.dir = Path(parity_dir or parity_path())
        self.name = name
        self.tensors = load_file(str(self.dir / name))
        entries = [f for f in manifest(str(self.dir))["files"] if f["file"] == name]
        self.entry = entries[0] if entries else {}
        self.tols = tolerances(str(self.dir)).get(name, {})

    def __getitem__(self, key: str) -> torch.Tensor:
        return self.tensors[key]

    def __contains__(self, key: str) -> bool:
        return key in self.tensors

    def keys(self, prefix: str = "") -> list[str]:
        return [k for k in self.tensors if k.startswith(prefix)]

    def tol(self, key: str, default: str | None = None) -> Tolerance:
        """The README tolerance of ``key``; ``default`` names another tensor of the same file to borrow from."""
        if key in self.tols:
            return self.tols[key]
        if default is not None and default in self.tols:
            return self.tols[default]
        raise KeyError(f"{self.name}: no tolerance listed for {key!r} in the parity README")

    def check(self, key: str, actual: torch.Tensor, *, tol_from: str | None = None) -> None:
        """Compare ``actual`` with the stored tensor at the README tolerance (exact for integer tensors listed exact)."""
        expected = self.tensors[key]
        tol = self.tol(key, tol_from)
        actual = actual.detach().cpu()
        assert tuple(actual.shape) == tuple(expected.shape), f"{self.name}:{key} shape {tuple(actual.shape)} != {tuple(expected.shape)}"
        if tol.exact:
            assert torch.equal(actual.to(expected.dtype), expected), f"{self.name}:{key} differs ({tol.text})"
            return
        diff = (actual.double() - expected.double()).abs().max().item()
        assert diff <= tol.atol, f"{self.name}:{key} max |diff| {diff:.3g} > {tol.atol:g} ({tol.text})"
