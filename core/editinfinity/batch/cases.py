"""The batch cases file (JSONL, one case per line): read by URI, validate, one dict per case.

A line may give the run settings a case file may give (``edit.case.RUN_SETTINGS``: seed, update counts, threshold,
preset), read by the same function as the CLI's ``--case`` and ``CaseSpec.from_file``; they apply to that case
(``make_plan`` groups and checks them), the batch's own settings to the others."""

from __future__ import annotations

import json
import os
import posixpath
import re

from ..edit.modes import MODES, infer_mode
from ..errors import InvalidCaseError
from ..storage.uri import has_scheme, join_uri

_CASE_KEYS = {"id", "image", "prompt", "edit_prompt", "mode", "target_word", "mask"}
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def _join_uri(base_dir: str, ref: str) -> str:
    """Resolve a path of a case against the cases file's folder (URIs and absolute paths stay as they are)."""
    if not ref or has_scheme(ref) or os.path.isabs(ref):
        return ref
    return join_uri(base_dir, ref)


def parse_cases(text: str, *, cases_uri: str = "cases", output_uri: str = "") -> list[dict]:
    """Validate JSONL cases; each becomes a dict of strings, plus ``settings`` (a dict) when the line gives run
    settings. Errors name the line."""
    # imported here: edit.case imports torch (models.schedules)
    from ..edit.case import RUN_SETTINGS, split_run_settings

    base = posixpath.dirname(cases_uri) if has_scheme(cases_uri) else os.path.dirname(cases_uri)
    cases: list[dict[str, str]] = []
    seen: set[str] = set()
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        where = f"{cases_uri} line {lineno}"
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InvalidCaseError(f"{where}: not JSON ({exc.msg})") from None
        if not isinstance(entry, dict):
            raise InvalidCaseError(f"{where}: each line must be a JSON object")
        entry, settings = split_run_settings(entry, where)
        unknown = set(entry) - _CASE_KEYS
        if unknown:
            raise InvalidCaseError(f"{where}: unknown keys {sorted(unknown)}; allowed: "
                                   f"{sorted(_CASE_KEYS) + sorted(RUN_SETTINGS)}")
        missing = [k for k in ("image", "prompt", "edit_prompt") if not entry.get(k)]
        if missing:
            raise InvalidCaseError(f"{where}: missing {', '.join(missing)}")
        case = {k: str(entry.get(k) or "") for k in sorted(_CASE_KEYS)}
        case["id"] = case["id"] or f"case-{len(cases):04d}"
        case["mode"] = case["mode"] or infer_mode(mask=case["mask"], target_word=case["target_word"])
        if not _ID.match(case["id"]):
            raise InvalidCaseError(f"{where}: id {case['id']!r} must be letters, digits, '.', '_' or '-'")
        if case["id"] in seen:
            raise InvalidCaseError(f"{where}: duplicate id {case['id']!r}")
        if case["mode"] not in MODES:
            raise InvalidCaseError(f"{where}: mode must be auto, mask or whole, got {case['mode']!r}")
        seen.add(case["id"])
        case["image"], case["mask"] = _join_uri(base, case["image"]), _join_uri(base, case["mask"])
        case["output_uri"] = f"{output_uri.rstrip('/')}/{case['id']}" if output_uri else ""
        if settings:
            case["settings"] = settings
        cases.append(case)
    if not cases:
        raise InvalidCaseError(f"{cases_uri}: no cases (one JSON object per line)")
    return cases


def read_cases(cases_uri: str, output_uri: str = "") -> list[dict]:
    """Read a JSONL cases file by path or URI and validate it (see ``parse_cases``)."""
    from .. import storage

    return parse_cases(storage.read_bytes(cases_uri).decode("utf-8"), cases_uri=cases_uri,
                          output_uri=output_uri)
