"""Where a recipe's artifacts live, and which schedule a recipe resolves to."""

from __future__ import annotations

import json
from pathlib import Path

from vpexport.errors import ArtifactError, RecipeError
from vpexport.pruning.schedule import Schedule

ARTIFACTS = Path("artifacts")
SCHEDULE_FILE = "schedule.json"


def artifact_dir(recipe, out: str | Path | None = None) -> Path:
    return Path(out) if out else ARTIFACTS / recipe.name


def resolve_schedule(recipe, arch=None, out: str | Path | None = None) -> Schedule:
    """The recipe's explicit schedule, or the calibrated one from `<artifacts>/schedule.json`."""
    sched = recipe.schedule(arch)
    if sched is not None:
        return sched
    f = artifact_dir(recipe, out) / SCHEDULE_FILE
    if not f.is_file():
        raise RecipeError(
            f"the recipe asks for calibration and {f} does not exist yet",
            field="pruning.calibrate",
            fix=f"run `vpexport calibrate {recipe.source or 'RECIPE'}` first (or `vpexport build`)",
        )
    _check_against_manifest(f, recipe)
    try:
        sched = Schedule.from_dict(json.loads(f.read_text())["schedule"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:  # JSONDecodeError is a ValueError
        raise ArtifactError(f"{f} is not a readable calibrated schedule ({type(e).__name__}: {str(e)[:120]})",
                            field=SCHEDULE_FILE,
                            fix=f"re-run `vpexport calibrate {recipe.source or 'RECIPE'}` (or delete it and `vpexport build`)") from None
    if arch is not None:
        sched.check(arch.text.layers, arch.visual_tokens, where=str(f))
    return sched


def _check_against_manifest(f: Path, recipe) -> None:
    """A schedule.json the manifest lists must still be the file that was hashed (calibration wrote
    it, export recorded it): an edited one would be exported and re-stamped as if calibrated."""
    from vpexport.manifest import MANIFEST, sha256_file

    try:
        listed = json.loads((f.parent / MANIFEST).read_text()).get("files", {}).get(SCHEDULE_FILE)
    except (OSError, ValueError, AttributeError):
        return  # no readable manifest yet: calibrated, not exported
    if isinstance(listed, dict) and listed.get("sha256") and sha256_file(f) != listed["sha256"]:
        raise ArtifactError(
            f"{f} was changed after calibration (its sha256 differs from {f.parent / MANIFEST})",
            field=SCHEDULE_FILE,
            fix=f"re-run `vpexport calibrate {recipe.source or 'RECIPE'}`, or put the schedule in the recipe's pruning.points",
        )
