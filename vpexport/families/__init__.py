"""The model-family table: every supported family is registered here once.

    FAMILIES                  name -> ModelFamily instance
    family(name)              the family by name (recipe / manifest)
    family_for_config(cfg)    the family of a config.json (its `model_type`)
    family_for_model(model)   the family of a loaded Hugging Face model
    load_checkpoint(path, dtype, image_size)   (family, model, processor) from a save_pretrained folder
    BUILTIN_ARCHS             every family's built-in architectures by name

Adding a family is a new module (vpexport/families/<name>.py) and one line in `_FAMILIES`.
"""

from __future__ import annotations

import json
from pathlib import Path

from vpexport.errors import RecipeError, UserInputError
from vpexport.families.base import Adapter, BuiltinArch, ModelFamily, Tolerances
from vpexport.families.llava import LlavaFamily
from vpexport.families.qwen2_vl import Qwen2VLFamily, Qwen25VLFamily

_FAMILIES: tuple[type[ModelFamily], ...] = (LlavaFamily, Qwen2VLFamily, Qwen25VLFamily)

FAMILIES: dict[str, ModelFamily] = {f.name: f() for f in _FAMILIES}
BUILTIN_ARCHS: dict[str, BuiltinArch] = {a: b for f in FAMILIES.values() for a, b in f.builtins.items()}

__all__ = ["Adapter", "BUILTIN_ARCHS", "BuiltinArch", "FAMILIES", "ModelFamily", "Tolerances", "family",
           "family_for_config", "family_for_model", "load_checkpoint", "supported"]


def supported() -> list[str]:
    """`model_type/text backbone` pairs, for error messages."""
    return [f"{mt}/{tf}" for f in FAMILIES.values() for mt in f.model_types for tf in f.text_families]


def family(name: str) -> ModelFamily:
    if name not in FAMILIES:
        raise UserInputError(f"unknown model family {name!r}", field="family", fix="use one of " + ", ".join(FAMILIES))
    return FAMILIES[name]


def _text_type(cfg: dict) -> str | None:
    t = cfg.get("text_config")
    return t.get("model_type") if isinstance(t, dict) else None


def family_for_config(cfg: dict, where: str = "config.json") -> ModelFamily:
    mt = cfg.get("model_type")
    for f in FAMILIES.values():
        if mt in f.model_types:
            tf = _text_type(cfg)
            if tf is not None and tf not in f.text_families:
                raise RecipeError(f"{where}: model_type {mt!r} with text backbone {tf!r} is not supported",
                                  field="model.path", fix="supported: " + ", ".join(supported()))
            return f
    raise RecipeError(f"{where}: model_type {mt!r} is not a supported model family", field="model.path",
                      fix="supported: " + ", ".join(supported()))


def family_for_model(model) -> ModelFamily:
    cfg = model.config
    mt = getattr(cfg, "model_type", None)
    tf = getattr(getattr(cfg, "text_config", None), "model_type", None)
    for f in FAMILIES.values():
        if mt in f.model_types and (tf is None or tf in f.text_families):
            return f
    raise UserInputError(f"no model family for model_type={mt!r} with text backbone {tf!r}", field="model.path",
                         fix="supported: " + ", ".join(supported()))


def read_config(path: str | Path) -> dict:
    path = Path(path)
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise RecipeError(f"no config.json in {path}", field="model.path",
                          fix="give a directory written by save_pretrained (it holds config.json)")
    try:
        return json.loads(cfg_file.read_text())
    except (OSError, ValueError) as e:
        raise RecipeError(f"config.json in {path} is not readable ({e})", field="model.path",
                          fix="give a directory written by save_pretrained") from None


def load_checkpoint(path: str | Path, dtype: str = "float32", image_size=None):
    """(family, model, processor) from a local save_pretrained folder."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise UserInputError(f"{path} has no config.json", field="model.path", fix="give a save_pretrained directory")
    fam = family_for_config(read_config(path), str(path / "config.json"))
    model, processor = fam.load(path, dtype, image_size)
    return fam, model, processor


def quiet_bars_in_logs() -> None:
    """transformers' weight-loading bar redraws with carriage returns; in a log file (stderr not a
    terminal) it is one long line, so it is turned off there (vpexport.progress prints plain lines)."""
    import sys

    from vpexport.progress import is_terminal

    if not is_terminal(sys.stderr):
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
