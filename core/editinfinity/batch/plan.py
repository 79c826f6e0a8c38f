"""Batch planning on a CPU: validate every case, group the valid ones by image and source prompt, split into shards.

A case is *invalid* when it can be known bad without a GPU: the image unreadable or too small for the pixel budget,
the target word absent from the prompt, the mask unreadable, the mode inconsistent with the fields given. Invalid
cases are listed in the plan with their error and never reach a worker.

Valid cases that share an image (same pixels) and a source prompt form a *group*: the worker learns the image once
(prompt tuning + LoRA, ``editinfinity.edit.learned``) and runs each of the group's edits from that learned state.
Groups are dealt to shards greedily by estimated cost (one learn per group, one edit per case), largest first, so
shards finish at about the same time. The plan is a JSON file that every worker reads.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import EditInfinityError, InvalidCaseError
from ..models import schedules

log = logging.getLogger(__name__)

FORMAT = "editinfinity-batch-plan/1"
#: Relative cost of one learn (prompt tuning + LoRA) and of one edit from learned state, for balancing shards:
#: at 1M on an H200 a learn is ~46 s and an edit ~2.3 s (bench/README.md).
LEARN_COST, EDIT_COST = 1.0, 0.05


@dataclass
class BatchPlan:
    """What the workers do: the batch-wide settings, the groups of valid cases, the invalid cases, the shards."""

    output_uri: str
    preset: str = ""
    weights: str = ""
    resolution: str = ""
    mask_polarity: str = "white-edit"
    settings: dict = field(default_factory=dict)  # EditSettings.to_dict()
    # {"key", "image", "prompt", "cases": [case, ...]} and "settings" (learning settings of its cases that differ from
    # ``settings``)
    groups: list[dict] = field(default_factory=list)
    invalid: list[dict] = field(default_factory=list)  # case + {"error"}
    shards: list[list[int]] = field(default_factory=list)  # group indices per shard

    def shard_groups(self, shard: int) -> list[dict]:
        if not 0 <= shard < len(self.shards):
            raise InvalidCaseError(f"shard {shard} does not exist: the plan has {len(self.shards)} shards")
        return [self.groups[g] for g in self.shards[shard]]

    @property
    def cases(self) -> list[dict]:
        return [c for g in self.groups for c in g["cases"]]

    def to_dict(self) -> dict:
        return {"format": FORMAT, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, data: dict) -> BatchPlan:
        if data.get("format") != FORMAT:
            raise EditInfinityError(f"not a batch plan of this version (format {data.get('format')!r}, expected "
                                    f"{FORMAT!r}); make it again with `editinfinity batch plan`")
        return cls(**{f.name: data[f.name] for f in dataclasses.fields(cls) if f.name in data})


def write_plan(plan: BatchPlan, path) -> Path:
    from ..edit.artifacts import write_json

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, plan.to_dict())
    return path


def read_plan(path_or_uri) -> BatchPlan:
    from .. import storage

    try:
        return BatchPlan.from_dict(json.loads(storage.read_bytes(str(path_or_uri)).decode()))
    except json.JSONDecodeError as exc:
        raise EditInfinityError(f"batch plan {path_or_uri} is not JSON ({exc.msg}); make it again") from None


def default_resolution(preset: str) -> str:
    from ..models.presets import PRESETS, default_preset_name

    spec = PRESETS.get(preset or default_preset_name())
    return spec.resolution if spec else "1M"


def check_case(case: dict, *, resolution: str, mask_polarity: str) -> str:
    """Validate one case on the CPU (files read through the storage cache); returns the image's pixel digest.

    Raises :class:`InvalidCaseError` (or a storage error) naming the problem.
    """
    from .. import storage
    from ..edit.case import CaseSpec
    from ..edit.images import choose_schedule, image_digest, load_image
    from ..edit.user_mask import read_mask

    spec = CaseSpec(image=case["image"], prompt=case["prompt"], edit_prompt=case["edit_prompt"], mode=case["mode"],
                    target_word=case.get("target_word") or None, mask=case.get("mask") or None,
                    mask_polarity=mask_polarity, resolution=resolution)
    spec.validate(check_files=False)
    image = load_image(storage.cached_path(case["image"]))
    choose_schedule(image, resolution, source=case["image"])  # refuses images too small for the budget
    if spec.mode == "mask":
        read_mask(storage.cached_path(case["mask"]), mask_polarity)
    return image_digest(image)


#: Run settings a case may give (``edit.case.RUN_SETTINGS``) that change what is learned: cases differing in one of
#: them are learned separately. The others (threshold) apply to the case's edit only; ``preset`` must be the batch's.
LEARN_SETTINGS = ("seed", "prompt_iters", "lora_iters")


def case_settings(base, case: dict):
    """The ``EditSettings`` of one case: ``base`` (the batch's) with the case's own run settings."""
    import dataclasses

    return dataclasses.replace(base, **{k: v for k, v in (case.get("settings") or {}).items() if k != "preset"})


def split(groups: list[dict], shards: int) -> list[list[int]]:
    """Deal group indices to ``shards`` bins, largest estimated cost first, each to the cheapest bin so far
    (deterministic: ties go to the lower index). Empty bins are dropped."""
    if shards < 1:
        raise InvalidCaseError(f"the number of shards must be >= 1, got {shards}")
    cost = [LEARN_COST + EDIT_COST * len(g["cases"]) for g in groups]
    bins: list[list[int]] = [[] for _ in range(shards)]
    load = [0.0] * shards
    for i in sorted(range(len(groups)), key=lambda i: (-cost[i], i)):
        b = min(range(shards), key=lambda b: (load[b], b))
        bins[b].append(i)
        load[b] += cost[i]
    return [sorted(b) for b in bins if b]


def make_plan(cases: list[dict], *, output_uri: str, shards: int = 1, preset: str = "", weights: str = "",
              resolution: str = "", mask_polarity: str = "white-edit", settings=None) -> BatchPlan:
    """Validate ``cases`` (dicts with ``id``, ``image``, ``prompt``, ``edit_prompt``, ``mode``, ``target_word``,
    ``mask``, ``output_uri``), group the valid ones and split them into at most ``shards`` shards."""
    from ..edit.settings import EditSettings

    if not output_uri:
        raise InvalidCaseError("a batch needs an output_uri: the workers publish each case there and skip the cases "
                               "already done when the batch is run again")
    from ..models.presets import default_preset_name

    settings = settings or EditSettings()
    model = preset or default_preset_name()
    res = resolution or default_resolution(preset)
    if res not in schedules.BUDGETS:
        raise InvalidCaseError(f"`resolution` must be one of {', '.join(schedules.BUDGETS)}, got {res!r}")
    groups: dict[tuple[str, str], dict] = {}
    invalid = []
    for case in cases:
        given = case.get("settings") or {}
        try:
            if given.get("preset", model) != model:
                raise InvalidCaseError(f"`preset` {given['preset']!r} differs from the batch's preset {model!r} (a "
                                       f"batch runs one model): run this case in a batch with --preset "
                                       f"{given['preset']}")
            digest = check_case(case, resolution=res, mask_polarity=mask_polarity)
        except EditInfinityError as exc:
            log.warning("case %s is invalid: %s", case["id"], exc)
            invalid.append({**case, "error": str(exc)})
            continue
        # cases learn together only with the same learning settings (the case's own, else the batch's)
        learning = {k: given.get(k, getattr(settings, k)) for k in LEARN_SETTINGS}
        group = groups.setdefault((digest, case["prompt"], tuple(learning.values())), {
            "key": f"{digest[:16]}-{len(groups):04d}", "image": case["image"], "prompt": case["prompt"], "cases": [],
            **({"settings": own} if (own := {k: v for k, v in learning.items() if v != getattr(settings, k)}) else {})})
        group["cases"].append(case)
    ordered = list(groups.values())
    plan = BatchPlan(output_uri=output_uri, preset=preset, weights=weights, resolution=res,
                     mask_polarity=mask_polarity, settings=settings.to_dict(), groups=ordered, invalid=invalid,
                     shards=split(ordered, shards) if ordered else [])
    log.info("batch plan: %d valid cases in %d groups over %d shards, %d invalid", len(plan.cases), len(ordered),
             len(plan.shards), len(invalid))
    return plan
