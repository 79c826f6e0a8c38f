"""One exception type per kind of bad input. Every message names the file or field and the fix."""


class EditInfinityError(Exception):
    """Base class: the CLI maps these to a non-zero exit code and prints the message without a traceback."""

    exit_code = 2


class InvalidCaseError(EditInfinityError):
    """A case input (image, prompt, target word, mask, option) is unusable."""


class CheckpointError(EditInfinityError):
    """A checkpoint does not match the model: lists missing, unexpected and wrongly shaped keys."""


class StorageError(EditInfinityError):
    """An object-store or file operation failed; names bucket, key and the likely fix."""

    exit_code = 3


class OutputError(EditInfinityError):
    """An output location this run may not write: it exists, is not ours to replace, or another run holds it."""


class StageError(EditInfinityError):
    """A stage directory is missing, incomplete, or was produced by another run or version."""


def format_key_problems(what: str, missing: list[str], unexpected: list[str],
                        wrong_shape: list[tuple[str, tuple, tuple]], *, model: str = "the model configuration",
                        hint: str = "Check that the preset matches the checkpoint (e.g. --preset 2b for "
                                    "infinity_2b_reg.pth).") -> str:
    """One ``CheckpointError`` message listing every key problem, shortened to a readable length."""

    def short(items: list, n: int = 12) -> str:
        head = ", ".join(str(i) for i in items[:n])
        return head + (f", ... ({len(items) - n} more)" if len(items) > n else "")

    parts = [f"{what} does not match {model}:"]
    if missing:
        parts.append(f"  missing keys ({len(missing)}): {short(missing)}")
    if unexpected:
        parts.append(f"  unexpected keys ({len(unexpected)}): {short(unexpected)}")
    if wrong_shape:
        parts.append(f"  wrongly shaped keys ({len(wrong_shape)}): "
                     + short([f"{k}: checkpoint {tuple(a)} vs model {tuple(b)}" for k, a, b in wrong_shape], 6))
    parts.append(f"  {hint}")
    return "\n".join(parts)
