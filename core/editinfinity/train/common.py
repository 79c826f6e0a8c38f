"""Pieces shared by the training loops: configs, devices, learning-rate and time budgets, checkpoints, logging.

Checkpoints are directories: ``model.safetensors`` (and other named modules' weights) in safetensors, plus
``training_state.pt`` holding the optimizer state, step counters and generator states as plain tensors and
numbers, read back with ``torch.load(weights_only=True)``. They are replaced atomically (write a temporary
directory, then rename), so an interrupted run always leaves a loadable checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import platform
import shutil
import time
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from ..errors import CheckpointError, InvalidCaseError
from .options import CONFIG_DIR

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint"
STATE_FILE = "training_state.pt"
#: Beside it: step, elapsed seconds, config and loss history as JSON (read by resume and by the toy driver).
META_FILE = "state.json"

C = TypeVar("C")


# ---------------------------------------------------------------------------------------------------------------
# configs


def load_config(cls: type[C], path: str | os.PathLike | None = None, overrides: Mapping[str, Any] | None = None) -> C:
    """Build the dataclass ``cls`` from a YAML file (``None``: the class defaults) and ``overrides``.

    Unknown keys are errors naming the file. ``overrides`` maps field names to values (``None`` values are
    ignored); a ``dict`` field is merged key by key, so ``{"model": {"depth": 2}}`` changes only the depth.
    """
    import yaml

    data: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        source = str(path)
        p = Path(path)
        if not p.is_file():
            raise InvalidCaseError(f"training config {p} not found; see {CONFIG_DIR} for examples")
        loaded = yaml.safe_load(p.read_text()) or {}
        if not isinstance(loaded, dict):
            raise InvalidCaseError(f"training config {p} must be a YAML mapping, got {type(loaded).__name__}")
        data.update(loaded)
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        if isinstance(value, Mapping) and isinstance(data.get(key), Mapping):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise InvalidCaseError(f"{source}: unknown training setting(s) {unknown}; known: {sorted(known)}")
    defaults = cls()
    for key, value in list(data.items()):
        base = getattr(defaults, key)
        if isinstance(base, dict) and isinstance(value, Mapping):
            data[key] = {**base, **value}
        elif isinstance(base, tuple) and isinstance(value, list):
            data[key] = tuple(value)
        elif isinstance(base, float) and not isinstance(base, bool) and isinstance(value, int | str):
            # YAML 1.1 reads "1e-3" as a string and "3" as an int
            try:
                data[key] = float(value)
            except ValueError:
                raise InvalidCaseError(f"{source}: `{key}` must be a number, got {value!r}") from None
    out = cls(**data)
    validate = getattr(out, "validate", None)
    if callable(validate):
        try:
            validate()
        except ValueError as exc:
            raise InvalidCaseError(f"{source}: {exc}") from exc
    return out


def parse_overrides(pairs: list[str] | None) -> dict[str, Any]:
    """``["lr=1e-3", "model.depth=4"]`` -> ``{"lr": 0.001, "model": {"depth": 4}}`` (values parsed as YAML)."""
    import yaml

    out: dict[str, Any] = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise InvalidCaseError(f"--set {pair!r}: expected KEY=VALUE (e.g. --set batch_size=16)")
        key, raw = pair.split("=", 1)
        value = yaml.safe_load(raw)
        parts = key.strip().split(".")
        node = out
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return out


def config_dict(config: Any) -> dict[str, Any]:
    """JSON-able dict of a config dataclass."""
    d = dataclasses.asdict(config)
    return json.loads(json.dumps(d, default=list))


def schedule_of(resolution: str | list) -> list[tuple[int, int, int]]:
    """A square schedule from a pixel budget name (``"0.06M"``) or an explicit list of ``[h, w]`` grids (small
    test runs, e.g. ``[[1, 1], [2, 2], [4, 4]]`` for 64 px pictures)."""
    from ..models import schedules

    if isinstance(resolution, str):
        return schedules.get_schedule(1.0, resolution)
    sched = schedules.normalize_schedule(resolution)
    if not sched:
        raise InvalidCaseError("an explicit resolution must list at least one [h, w] grid")
    return sched


# ---------------------------------------------------------------------------------------------------------------
# devices and precision


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None`` -> CUDA when available, else CPU; a CUDA request without CUDA is an error."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InvalidCaseError("--device cuda was requested but CUDA is not available; use --device cpu")
    return dev


def configure_backends(device: torch.device) -> None:
    """Fast kernels for fixed-shape training on GPU (cuDNN autotuning, TF32 for the few float32 matmuls)."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def autocast(device: torch.device, enabled: bool = True) -> AbstractContextManager:
    """bf16 autocast on GPU; nothing on CPU (float32 training)."""
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def hardware() -> dict[str, Any]:
    """What ran the training: device names, counts, library versions."""
    info: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                            "cpu_count": os.cpu_count(), "platform": platform.platform()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu_count"] = torch.cuda.device_count()
        info["cuda"] = torch.version.cuda
    return info


# ---------------------------------------------------------------------------------------------------------------
# learning rate and budgets


def lr_at(step: int, peak: float, warmup: int, total: int | None, min_ratio: float) -> float:
    """Linear warm-up to ``peak`` over ``warmup`` steps, then cosine decay to ``peak * min_ratio`` at ``total``.

    Before ``total`` is known (time-budgeted runs still measuring their speed) the rate stays at the peak.
    """
    if warmup > 0 and step < warmup:
        return peak * (step + 1) / warmup
    if total is None or total <= warmup:
        return peak
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every parameter group's rate to ``lr`` times its ``lr_scale`` (default 1)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


@dataclass
class Budget:
    """When to stop: after ``steps`` optimizer updates (0: no count limit) and/or ``minutes`` of training time
    (0: no time limit); at least one must be set.

    With a time limit the total step count is fixed once, from the speed measured over ``calibration_steps``
    steps after ``skip_steps`` warm-up steps (kernel autotuning), so that the cosine schedule ends where the
    time runs out; it is saved with the checkpoint. Training also stops when the time is up, whatever the count.
    """

    steps: int = 0
    minutes: float = 0.0
    start_step: int = 0  # the budget counts from here (a run extended with more steps/minutes)
    start_elapsed: float = 0.0
    skip_steps: int = 5
    calibration_steps: int = 20
    margin: float = 0.97
    _t0: float | None = None
    _mark: tuple[int, float] | None = None  # (step, elapsed) when the total was fixed

    def __post_init__(self) -> None:
        if self.steps <= 0 and not self.minutes:
            raise InvalidCaseError("a training run needs `steps` > 0 or `minutes` > 0")

    @property
    def timed(self) -> bool:
        """Whether a time limit applies."""
        return bool(self.minutes) and self.minutes > 0

    def initial_total(self) -> int | None:
        """The schedule's end before any measurement: ``steps`` after the start when set, else unknown."""
        return self.start_step + self.steps if self.steps > 0 else None

    def remaining_seconds(self, elapsed: float) -> float:
        """Seconds of the time limit left at training time ``elapsed`` (over every run of this training)."""
        return max(0.0, self.minutes * 60 - (elapsed - self.start_elapsed))

    def observe(self, step: int, done_in_run: int, elapsed: float, device: torch.device) -> int | None:
        """Call after every step of a timed run until it returns the total; ``None`` while measuring."""
        if done_in_run == self.skip_steps:
            synchronize(device)
            self._t0 = time.perf_counter()
        elif done_in_run == self.skip_steps + self.calibration_steps and self._t0 is not None:
            synchronize(device)
            rate = self.calibration_steps / max(time.perf_counter() - self._t0, 1e-9)
            self._mark = (step, elapsed)
            total = step + int(rate * self.remaining_seconds(elapsed) * self.margin)
            if self.steps > 0:
                total = min(total, self.start_step + self.steps)
            return max(total, step + 1)
        return None

    def rate_since_calibration(self, step: int, elapsed: float, min_seconds: float = 30.0) -> float | None:
        """Average steps per second since the calibration of this run (None before, or too soon after)."""
        if self._mark is None or elapsed - self._mark[1] < min_seconds:
            return None
        return (step - self._mark[0]) / (elapsed - self._mark[1])

    def done(self, step: int, total: int | None, elapsed: float) -> bool:
        """Whether training stops before ``step``: step count, schedule end or time limit reached."""
        if self.steps > 0 and step - self.start_step >= self.steps:
            return True
        if total is not None and step >= total:
            return True
        return self.timed and self.remaining_seconds(elapsed) <= 0


def budget_text(config: Any) -> str:
    """``"3 min / 500 steps"`` from a config's ``minutes`` and ``steps``."""
    parts = [f"{config.minutes:g} min"] if config.minutes else []
    return " / ".join(parts + ([f"{config.steps} steps"] if config.steps > 0 else [])) or "no budget"


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work (so wall-clock measurements mean something)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------------------------------------------
# checkpoints


@dataclass
class TrainState:
    """Counters and history saved with every checkpoint."""

    step: int = 0
    total_steps: int | None = None
    elapsed: float = 0.0  # training seconds over every run of this training (resumes add up)
    history: list[dict[str, float]] = field(default_factory=list)
    finished: bool = False
    calibrated: bool = False  # the total of a timed run has been fixed from the measured speed
    segment_step: int = 0  # where the current budget (and learning-rate cycle) started
    segment_elapsed: float = 0.0

    def extend(self) -> None:
        """Start a new budget after a finished one: training continues from here with a fresh warm-up and
        cosine cycle (``--extend``)."""
        self.finished, self.calibrated, self.total_steps = False, False, None
        self.segment_step, self.segment_elapsed = self.step, self.elapsed


def _tensor_dict(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    sd = module.state_dict()
    # safetensors refuses shared storage (tied weights); every tensor is stored on its own.
    return {k: v.detach().to("cpu").clone().contiguous() for k, v in sd.items()}


def save_checkpoint(run_dir: Path, modules: Mapping[str, torch.nn.Module], optimizer: torch.optim.Optimizer,
                    state: TrainState, generators: Mapping[str, torch.Generator], config: dict[str, Any]) -> Path:
    """Write ``run_dir/checkpoint`` atomically: ``{name}.safetensors`` per module, optimizer and counters."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    final = run_dir / CHECKPOINT
    from ..storage.base import private_path

    tmp = private_path(final)
    tmp.mkdir()
    try:
        _write_checkpoint(tmp, modules, optimizer, state, generators, config)
        replace_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _write_checkpoint(tmp: Path, modules: Mapping[str, torch.nn.Module], optimizer: torch.optim.Optimizer,
                      state: TrainState, generators: Mapping[str, torch.Generator], config: dict[str, Any]) -> None:
    for name, module in modules.items():
        save_file(_tensor_dict(module), str(tmp / f"{name}.safetensors"))
    payload = {
        "optimizer": optimizer.state_dict(),
        "step": int(state.step),
        "total_steps": -1 if state.total_steps is None else int(state.total_steps),
        "elapsed": float(state.elapsed),
        "finished": bool(state.finished),
        "calibrated": bool(state.calibrated),
        "segment_step": int(state.segment_step),
        "segment_elapsed": float(state.segment_elapsed),
        "generators": {k: g.get_state() for k, g in generators.items()},
        "torch_rng": torch.get_rng_state(),
    }
    torch.save(payload, tmp / STATE_FILE)
    meta = {"step": state.step, "total_steps": state.total_steps, "elapsed": round(state.elapsed, 3),
            "finished": state.finished, "config": config, "history": state.history}
    (tmp / META_FILE).write_text(json.dumps(meta, indent=1) + "\n")


def replace_dir(tmp: Path, final: Path) -> None:
    """Put the finished folder ``tmp`` at ``final`` (an earlier one moved aside to a private name first, removed
    after), with the modes the umask asks for (safetensors writes its files 0600): what ``find_checkpoint`` and the
    exports rely on. The private names record this host and pid (:func:`editinfinity.storage.base.private_path`), so
    two processes never share them, and what a killed process left is removed (or, when it was killed between
    the two renames, put back) by the next save or :func:`find_checkpoint` (:func:`editinfinity.outputs.remove_stale`)."""
    from ..outputs import remove_stale, usual_modes
    from ..storage.base import private_path

    usual_modes(tmp)
    remove_stale(final.parent, final.name)
    old = private_path(final, "editinfinity-old")
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def save_dir(final: Path, write: Callable[[Path], Any]) -> Path:
    """``write(tmp)`` into a private folder beside ``final``, then :func:`replace_dir` (a model's
    ``save_pretrained``); the private folder is removed when ``write`` fails."""
    from ..storage.base import private_path

    tmp = private_path(final)
    try:
        write(tmp)
        replace_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def find_checkpoint(run_dir: Path) -> Path | None:
    """The run's checkpoint directory (a save killed mid-swap is put back first; ``.checkpoint.old`` is where
    earlier versions kept the previous one)."""
    from ..outputs import remove_stale

    remove_stale(run_dir, CHECKPOINT)
    for name in (CHECKPOINT, f".{CHECKPOINT}.old"):
        p = Path(run_dir) / name
        if (p / STATE_FILE).is_file():
            return p
    return None


def load_checkpoint(ckpt: Path, modules: Mapping[str, torch.nn.Module], optimizer: torch.optim.Optimizer | None,
                    generators: Mapping[str, torch.Generator]) -> TrainState:
    """Load a checkpoint written by :func:`save_checkpoint` into ``modules``/``optimizer``/``generators``."""
    ckpt = Path(ckpt)
    for name, module in modules.items():
        path = ckpt / f"{name}.safetensors"
        if not path.is_file():
            raise CheckpointError(f"checkpoint {ckpt} has no {path.name}; it was written by another training run")
        sd = load_file(str(path))
        try:
            module.load_state_dict(sd, strict=True)
        except RuntimeError as exc:
            raise CheckpointError(f"checkpoint {path} does not match the configured model ({exc}); resume with "
                                  "the config the run started with, or start a new run directory") from exc
    try:
        payload = torch.load(ckpt / STATE_FILE, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated or foreign file: say which one
        raise CheckpointError(f"cannot read {ckpt / STATE_FILE} ({exc}); start a new run directory") from exc
    if optimizer is not None:
        optimizer.load_state_dict(payload["optimizer"])
    for name, gen in generators.items():
        if name in payload["generators"]:
            gen.set_state(payload["generators"][name])
    torch.set_rng_state(payload["torch_rng"])
    meta = json.loads((ckpt / META_FILE).read_text())
    total = int(payload["total_steps"])
    return TrainState(step=int(payload["step"]), total_steps=None if total < 0 else total,
                      elapsed=float(payload["elapsed"]), history=list(meta.get("history", [])),
                      finished=bool(payload.get("finished", False)),
                      calibrated=bool(payload.get("calibrated", False)),
                      segment_step=int(payload.get("segment_step", 0)),
                      segment_elapsed=float(payload.get("segment_elapsed", 0.0)))


def adamw(param_groups: list[dict[str, Any]], lr: float, betas: tuple[float, float], weight_decay: float,
          device: torch.device) -> torch.optim.AdamW:
    """AdamW (fused on GPU); groups may carry ``lr_scale`` and ``weight_decay`` (0 for norms, biases, tables)."""
    for g in param_groups:
        g.setdefault("weight_decay", weight_decay)
        g.setdefault("lr_scale", 1.0)
    return torch.optim.AdamW(param_groups, lr=lr, betas=tuple(betas), eps=1e-8,
                             fused=True if device.type == "cuda" else None)


def decay_groups(named: list[tuple[str, torch.nn.Parameter]], no_decay_names: tuple[str, ...] = (),
                 lr_scale: float = 1.0) -> list[dict[str, Any]]:
    """Split parameters: matrices of linear/conv layers decay; vectors, norms and lookup tables do not."""
    decay, plain = [], []
    for name, p in named:
        if not p.requires_grad:
            continue
        if p.ndim >= 2 and not any(s in name for s in no_decay_names):
            decay.append(p)
        else:
            plain.append(p)
    groups = []
    if decay:
        groups.append({"params": decay, "lr_scale": lr_scale})
    if plain:
        groups.append({"params": plain, "weight_decay": 0.0, "lr_scale": lr_scale})
    return groups


# ---------------------------------------------------------------------------------------------------------------
# progress


class ProgressLog:
    """Running means of the logged values, printed through ``logging`` every ``every_seconds`` and appended
    to ``log.jsonl`` in the run directory (one JSON object per report).

    Values may be GPU tensors: they are summed on the device and read back only when a report is due, so the
    training loop does not wait for the GPU every step.
    """

    def __init__(self, name: str, run_dir: Path, every_seconds: float = 15.0):
        self.name = name
        self.path = Path(run_dir) / "log.jsonl"
        self.every = every_seconds
        self.sums: dict[str, torch.Tensor | float] = {}
        self.count = 0
        self.last_time = time.perf_counter()
        self.samples = 0

    def add(self, values: Mapping[str, torch.Tensor | float], samples: int) -> None:
        """Accumulate one step's values (``samples`` pictures)."""
        for k, v in values.items():
            v = v.detach().float() if isinstance(v, torch.Tensor) else float(v)
            self.sums[k] = self.sums[k] + v if k in self.sums else v
        self.count += 1
        self.samples += samples

    def due(self) -> bool:
        """Whether the next report is due."""
        return time.perf_counter() - self.last_time >= self.every

    def report(self, step: int, total: int | None, elapsed: float, lr: float) -> dict[str, float]:
        """Log and return the means since the last report (empty when nothing was added).

        Raises ``FloatingPointError`` when a mean is not finite (the loss diverged).
        """
        if not self.count:
            return {}
        means = {k: float(v) / self.count for k, v in self.sums.items()}
        now = time.perf_counter()
        dt = max(now - self.last_time, 1e-9)
        rec = {"step": step, "elapsed": round(elapsed, 2), "lr": lr, **{k: round(v, 6) for k, v in means.items()},
               "steps_per_s": round(self.count / dt, 3), "samples_per_s": round(self.samples / dt, 1)}
        total_s = "?" if total is None else str(total)
        parts = " ".join(f"{k} {v:.4g}" for k, v in means.items())
        log.info("%s step %d/%s %s lr %.3g | %.2f steps/s %.0f samples/s | %.0f s", self.name, step, total_s,
                 parts, lr, rec["steps_per_s"], rec["samples_per_s"], elapsed)
        with self.path.open("a") as f:
            f.write(json.dumps(rec) + "\n")
        self.sums, self.count, self.samples, self.last_time = {}, 0, 0, now
        bad = [k for k, v in means.items() if not math.isfinite(v)]
        if bad:
            raise FloatingPointError(f"{self.name}: non-finite {bad} by step {step}; lower the learning rate")
        return rec


def run_steps(name: str, run_dir: Path, state: TrainState, budget: Budget, *,
              step_fn: Callable[[int], Mapping[str, torch.Tensor | float]], lr_fn: Callable[[int, int | None], float],
              optimizer: torch.optim.Optimizer, save: Callable[[], None], device: torch.device,
              samples_per_step: int, log_seconds: float = 15.0, checkpoint_minutes: float = 1.0,
              progress: bool = False, stop_at: int | None = None) -> dict[str, float]:
    """The loop shared by every trainer: learning rate, one ``step_fn(step)`` per update, progress reports,
    periodic checkpoints (``save``), and the stop rules of ``budget``. Sets ``state.finished`` when the budget is
    spent (not when ``stop_at`` interrupts); saves a checkpoint on the way out. Returns the last report.

    ``lr_fn(step, total)`` gets both counted from the start of the current budget (``state.segment_step``).
    """
    plog = ProgressLog(name, run_dir, log_seconds)
    budget.start_step, budget.start_elapsed = state.segment_step, state.segment_elapsed
    seg = state.segment_step

    def rate_at(step: int, total: int | None) -> float:
        return lr_fn(step - seg, None if total is None else total - seg)

    run_start = time.perf_counter()
    elapsed0, first = state.elapsed, state.step
    last_ckpt = time.perf_counter()
    last: dict[str, float] = {}
    if state.total_steps is None:
        state.total_steps = budget.initial_total()
    bar = tqdm(total=state.total_steps, initial=state.step, desc=name, disable=not progress, mininterval=5)
    lr = rate_at(state.step, state.total_steps)
    try:
        while True:
            state.elapsed = elapsed0 + time.perf_counter() - run_start
            if budget.done(state.step, state.total_steps, state.elapsed):
                state.finished = True
                break
            if stop_at is not None and state.step >= stop_at:
                break
            lr = rate_at(state.step, state.total_steps)
            set_lr(optimizer, lr)
            values = step_fn(state.step)
            state.step += 1
            bar.update(1)
            plog.add(values, samples_per_step)
            if budget.timed and not state.calibrated:
                total = budget.observe(state.step, state.step - first, elapsed0 + time.perf_counter() - run_start,
                                       device)
                if total is not None:
                    state.total_steps, state.calibrated = total, True
                    bar.total = total
                    log.info("%s: %d steps fit the %.1f min budget", name, state.total_steps, budget.minutes)
            if plog.due():
                now_elapsed = elapsed0 + time.perf_counter() - run_start
                last = plog.report(state.step, state.total_steps, now_elapsed, lr)
                state.history.append(last)
                rate = budget.rate_since_calibration(state.step, now_elapsed)
                if rate is not None and state.total_steps is not None:
                    # The speed measured at the start can be optimistic (prefetched data, checkpoints later on):
                    # shorten the schedule so that it still ends when the time does.
                    fits = state.step + int(rate * budget.remaining_seconds(now_elapsed) * budget.margin)
                    if fits < state.total_steps:
                        log.info("%s: slower than measured; schedule shortened to %d steps", name, max(fits, state.step))
                        state.total_steps = max(fits, state.step + 1)
                        bar.total = state.total_steps
            if time.perf_counter() - last_ckpt >= checkpoint_minutes * 60:
                state.elapsed = elapsed0 + time.perf_counter() - run_start
                save()
                last_ckpt = time.perf_counter()
    finally:
        bar.close()
    synchronize(device)
    state.elapsed = elapsed0 + time.perf_counter() - run_start
    rec = plog.report(state.step, state.total_steps, state.elapsed, lr)
    if rec:
        last = rec
        state.history.append(rec)
    save()
    log.info("%s: %s at step %d after %.0f s", name, "finished" if state.finished else "stopped", state.step,
             state.elapsed)
    return last
