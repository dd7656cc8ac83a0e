"""Typed errors. The CLI maps each class to an exit code and prints one line, never a traceback.

Exit codes:
  2  bad user input (recipe, CLI option, image, prompt, sample data)
  3  artifacts missing, corrupt, or not matching their manifest
  4  validation found mismatches between artifacts and the PyTorch model
  5  a required runtime (GPU, TensorRT, Triton) is not available here
  6  calibration found no schedule meeting the recipe's objective (tolerance / FLOPs budget)
  7  the artifact folder is being written by another vpexport process (its lock is held)
  8  the file system refused a write (disk full, read-only, permission denied, a file in the way)
"""

from __future__ import annotations


class VpexportError(Exception):
    exit_code = 1

    def __init__(self, message: str, *, field: str | None = None, fix: str | None = None):
        self.field = field
        self.fix = fix
        super().__init__(message)

    def one_line(self) -> str:
        parts = []
        if self.field:
            parts.append(f"{self.field}: ")
        parts.append(str(self))
        if self.fix:
            parts.append(f" (fix: {self.fix})")
        return "".join(parts).replace("\n", " ")


class UserInputError(VpexportError):
    exit_code = 2


class RecipeError(UserInputError):
    """A recipe field is missing, misspelt, or inconsistent."""


class ScheduleError(UserInputError):
    """A prune schedule does not fit the model (layer out of range, keep too large, ...)."""


class ArtifactError(VpexportError):
    exit_code = 3


class ValidationFailed(VpexportError):
    exit_code = 4


class RuntimeUnavailable(VpexportError):
    exit_code = 5


class CalibrationFailed(VpexportError):
    exit_code = 6


class ArtifactBusy(VpexportError):
    exit_code = 7


class StorageError(VpexportError):
    exit_code = 8
