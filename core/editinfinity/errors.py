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


class StageError(EditInfinityError):
    """A stage directory is missing, incomplete, or was produced by another run or version."""
