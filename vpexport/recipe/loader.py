"""Load a recipe: read YAML, expand ${VAR}, validate the whole document, resolve paths.

Every problem becomes ONE `RecipeError` line naming the dotted field (exit code 2), before
any weights load. No torch import here: `vpexport plan` runs without it.

    from vpexport.recipe import load_recipe
    r = load_recipe("recipes/baselines/llava7b_himap_qa.yaml")
    arch = r.resolve_arch()          # ArchSpec (config.json or built-in)
    layout = r.layout(arch)          # PromptLayout(prefix, visual, text, batch)
    sched = r.schedule(arch)         # Schedule, checked; None when calibration is requested
    r.require_data("calib")          # Path of an existing task.data.calib, else RecipeError
    r.resolved()                     # dict for recipe.resolved.yaml
"""

from __future__ import annotations

import difflib
import json
import os
import re
import typing
from pathlib import Path

import yaml
from pydantic import BaseModel, PrivateAttr, ValidationError

from vpexport.families import BUILTIN_ARCHS, family
from vpexport.arch.layout import PromptLayout, check_template, layout_from_tokenizer_file
from vpexport.arch.spec import ArchSpec
from vpexport.errors import RecipeError
from vpexport.methods import METHODS
from vpexport.pruning.schedule import Schedule
from vpexport.recipe.schema import RecipeModel

_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


# --------------------------------------------------------------------------- YAML + env
class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys (PyYAML silently keeps the last one)."""


def _construct_mapping(loader, node, deep=False):
    seen = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise RecipeError(
                f"duplicate key {key!r} (line {key_node.start_mark.line + 1}; first on line {seen[key] + 1})",
                field=str(key),
                fix="keep one of them",
            )
        seen[key] = key_node.start_mark.line
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _dotted(loc) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out


def expand_env(value, loc=(), env=None):
    """Expand ${VAR} and ${VAR:-default} in every string value; an unset variable is a RecipeError."""
    env = os.environ if env is None else env
    if isinstance(value, dict):
        return {k: expand_env(v, loc + (k,), env) for k, v in value.items()}
    if isinstance(value, list):
        return [expand_env(v, loc + (i,), env) for i, v in enumerate(value)]
    if not isinstance(value, str) or "$" not in value:
        return value

    def sub(m):
        name, default = m.group(1), m.group(2)
        got = env.get(name)
        if got:
            return got
        if default is not None:
            return default
        raise RecipeError(
            f"environment variable {name} is not set" + (" (it is empty)" if got == "" else ""),
            field=_dotted(loc),
            fix=f"export {name}=... or write ${{{name}:-default}} / a literal value in the recipe",
        )

    out = _VAR.sub(sub, value)
    if "${" in _VAR.sub("", value):
        raise RecipeError(
            f"malformed variable reference in {value!r}", field=_dotted(loc), fix="write ${NAME} or ${NAME:-default}"
        )
    return out


# --------------------------------------------------------------------------- pydantic errors -> one line
def _model_in(annotation, tag=None) -> type[BaseModel] | None:
    """The model an annotation holds; in a union discriminated on `method`, the member for `tag`."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    members = [m for m in (_model_in(a) for a in typing.get_args(annotation)) if m is not None]
    for m in members:
        f = m.model_fields.get("method")
        if tag is not None and f is not None and tag in typing.get_args(f.annotation):
            return m
    return members[0] if members else None


def _strip_tags(loc: tuple) -> tuple:
    """pydantic puts a discriminated union's tag in the error path (pruning.fastv.points):
    the recipe has no such key, so it is dropped (pruning.points)."""
    from vpexport.recipe.schema import METHOD_OPTIONS

    return tuple(part for i, part in enumerate(loc) if not (i and loc[i - 1] == "pruning" and part in METHOD_OPTIONS))


def _keys_at(model: type[BaseModel], loc) -> list[str]:
    """The allowed keys (aliases) of the model reached by following `loc` (with union tags) from `model`."""
    loc = list(loc)
    for j, part in enumerate(loc):
        if isinstance(part, int):
            continue
        by_key = {(f.alias or n): f for n, f in model.model_fields.items()}
        f = by_key.get(part)
        if f is None:
            continue  # a union tag or similar, not a key
        tag = loc[j + 1] if j + 1 < len(loc) else None
        sub = _model_in(f.annotation, tag)
        if sub is None:
            return []
        model = sub
    return [(f.alias or n) for n, f in model.model_fields.items()]


def _one_line(e: ValidationError, root: type[BaseModel]) -> RecipeError:
    errors = e.errors(include_url=False)
    # unknown keys first: a misspelt key also makes the right key look missing
    errors.sort(key=lambda x: 0 if x["type"] == "extra_forbidden" else 1)
    err, more = errors[0], len(errors) - 1
    raw = tuple(err["loc"])
    loc = _strip_tags(raw)
    tail = f" (and {more} more problem{'s' if more > 1 else ''})" if more else ""
    if err["type"] in ("union_tag_invalid", "union_tag_not_found"):  # pruning.method
        from vpexport.recipe.schema import METHOD_OPTIONS

        names = list(METHOD_OPTIONS)
        got = err.get("ctx", {}).get("tag")
        if err["type"] == "union_tag_not_found" or got is None:
            return RecipeError("is required but missing" + tail, field=_dotted(loc + ("method",)),
                               fix="use one of " + ", ".join(names))
        close = difflib.get_close_matches(str(got), names, n=1)
        return RecipeError(f"unknown method {got!r}" + tail, field=_dotted(loc + ("method",)),
                           fix=f"did you mean {close[0]!r}?" if close else "use one of " + ", ".join(names))
    if err["type"] == "extra_forbidden":
        key = str(loc[-1])
        allowed = _keys_at(root, raw[:-1])
        close = difflib.get_close_matches(key, allowed, n=1, cutoff=0.6)
        fix = f"did you mean {close[0]!r}?" if close else "allowed keys here: " + ", ".join(allowed)
        return RecipeError("unknown key" + tail, field=_dotted(loc), fix=fix)
    if err["type"] == "recipe":
        ctx = err.get("ctx", {})
        field = _dotted(loc)
        if ctx.get("sub"):
            field = f"{field}.{ctx['sub']}" if field else ctx["sub"]
            field = field.replace(".[", "[")
        return RecipeError(ctx.get("msg", err["msg"]) + tail, field=field or "recipe", fix=ctx.get("fix") or None)
    if err["type"] == "missing":
        return RecipeError("is required but missing" + tail, field=_dotted(loc), fix="add it (see docs/recipes.md)")
    got = err.get("input")
    msg = err["msg"]
    if not isinstance(got, (dict, list)):
        msg += f" (got {got!r})"
    return RecipeError(msg + tail, field=_dotted(loc) or "recipe", fix="see docs/recipes.md")


# --------------------------------------------------------------------------- the Recipe
class Recipe(RecipeModel):
    """A validated recipe with its paths made absolute. Build with `load_recipe(path)`."""

    _source: Path | None = PrivateAttr(default=None)
    _arch: ArchSpec | None = PrivateAttr(default=None)

    @property
    def source(self) -> Path | None:
        return self._source

    @property
    def model_dir(self) -> Path | None:
        return Path(self.model.path) if self.model.path else None

    @property
    def synth_dtype(self) -> str:
        """model.dtype in `vpexport testbed synth`'s spelling (fp32, fp16, bf16)."""
        return {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}[self.model.dtype]

    def synth_command(self) -> str:
        """The `vpexport testbed synth` command that creates this recipe's stand-in (model.synth)."""
        syn = self.model.synth
        cmd = (f"vpexport testbed synth --arch {syn.arch} --out {self.model.path} --dtype {self.synth_dtype} "
               f"--seed {syn.seed}")
        for flag, value in (("--layers", syn.layers), ("--hidden", syn.hidden), ("--vision-layers", syn.vision_layers)):
            if value is not None:
                cmd += f" {flag} {value}"
        if self.model.image_size is not None:
            cmd += " --image-size {}x{}".format(*self.model.image_size)
        return cmd

    # ------------------------------------------------------------ arch / layout / schedule
    def resolve_arch(self) -> ArchSpec:
        if self._arch is None:
            if self.model.arch is not None:
                self._arch = BUILTIN_ARCHS[self.model.arch].spec(self.model.image_size)
            elif self.model.synth is not None and not (Path(self.model.path) / "config.json").is_file():
                raise RecipeError(
                    f"the random-weight stand-in at {self.model.path} has not been created yet",
                    field="model.synth",
                    fix=f"run `vpexport build {self.source or 'RECIPE'}` (it creates it) or `{self.synth_command()}`",
                )
            else:
                try:
                    self._arch = ArchSpec.from_dir(self.model.path, self.model.image_size)
                except RecipeError:
                    raise
                except (KeyError, TypeError, ValueError) as e:  # incl. json.JSONDecodeError
                    what = f"has no {e.args[0]!r}" if isinstance(e, KeyError) else f"is not readable ({e})"
                    raise RecipeError(
                        f"config.json in {self.model.path} {what}",
                        field="model.path",
                        fix="give a save_pretrained directory of a supported model family",
                    ) from None
        return self._arch

    def first_question(self) -> str:
        """The first calibration question (for measuring the prompt's text span), or ''."""
        p = self.task.data.calib
        if not p or not Path(p).is_file():
            return ""
        try:
            with open(p, encoding="utf-8") as f:
                for line in f:
                    if line.strip():
                        q = json.loads(line).get("question", "")
                        return q if isinstance(q, str) else ""
        except (OSError, ValueError, AttributeError):
            return ""
        return ""

    def layout(self, arch: ArchSpec | None = None, batch: int = 1) -> PromptLayout:
        arch = arch or self.resolve_arch()
        check_template(self.task.prompt)
        if self.model.arch is not None:
            lay = PromptLayout(
                prefix=BUILTIN_ARCHS[self.model.arch].prompt_prefix_tokens,
                visual=arch.visual_tokens,
                text=self.task.text_tokens,
                batch=batch,
            )
        else:
            tok = Path(self.model.path) / "tokenizer.json"
            if not tok.is_file():
                raise RecipeError(
                    f"no tokenizer.json in {self.model.path}",
                    field="model.path",
                    fix="save the processor/tokenizer into the model directory (save_pretrained)",
                )
            lay = layout_from_tokenizer_file(tok, self.task.prompt, self.first_question(), arch.image_token_id,
                                             arch.visual_tokens, family(arch.family).image_text)
            lay = PromptLayout(lay.prefix, lay.visual, lay.text, batch)
        if lay.text > self.export.text_length.max:
            raise RecipeError(
                f"the prompt has {lay.text} tokens after the image, more than export.text_length.max ({self.export.text_length.max})",
                field="export.text_length.max",
                fix=f"set it to at least {lay.text}",
            )
        return lay

    @property
    def calibrating(self) -> bool:
        return self.pruning.calibrate is not None

    def schedule(self, arch: ArchSpec | None = None) -> Schedule | None:
        """The recipe's fixed schedule, checked against `arch`; None when calibration is requested."""
        arch = arch or self.resolve_arch()
        if self.calibrating:
            return None
        spec = METHODS[self.pruning.method]
        pairs, present = [], arch.visual_tokens
        for p in self.pruning.points or []:
            keep = p.keep if p.keep is not None else max(1, round(p.keep_fraction * present))
            pairs.append((p.layer, keep))
            present = keep
        sched = spec.schedule(pairs, sink_layers=getattr(self.pruning, "sink_layers", 0), seed=self.pruning.seed, meta={"source": "recipe"})
        sched.check(arch.text.layers, arch.visual_tokens)
        return sched

    def default_schedule(self, arch: ArchSpec | None = None, method: str | None = None) -> Schedule:
        """The method's published default scaled to `arch` (what plan shows for calibrate recipes)."""
        arch = arch or self.resolve_arch()
        m = method or self.pruning.method
        return METHODS[m].default(arch.text.layers, arch.visual_tokens, self.task.type)

    # ------------------------------------------------------------ data / resolved dict
    def require_data(self, split: str) -> Path:
        if split not in ("calib", "eval"):
            raise ValueError(f"split must be calib or eval, not {split!r}")
        p = getattr(self.task.data, split)
        field = f"task.data.{split}"
        if not p:
            raise RecipeError(
                f"this step needs {split} data but the recipe names none",
                field=field,
                fix=f"add task.data.{split}: a JSONL file of {{image, question, answer}} rows",
            )
        if not Path(p).is_file():
            raise RecipeError(f"file {p} does not exist", field=field, fix="create it or correct the path")
        return Path(p)

    def check(self) -> "Recipe":
        """Everything checkable without weights or data: arch, schedule (and the layout's text span)."""
        arch = self.resolve_arch()
        self.schedule(arch)
        return self

    def resolved(self) -> dict:
        """The fully resolved recipe (env expanded, paths absolute, keep_fraction -> keep, defaults filled)."""
        d = self.model_dump(by_alias=True, mode="json")
        if self.pruning.points is not None and any(p.keep is None for p in self.pruning.points):
            sched = self.schedule()
            d["pruning"]["points"] = [{"layer": p.layer, "keep": p.keep, "keep_fraction": None} for p in sched.points]
        return d


def _absolute(p: str | None, base: Path) -> str | None:
    if p is None:
        return None
    q = Path(os.path.expanduser(p))
    return str((q if q.is_absolute() else base / q).resolve())


def recipe_from_dict(data: dict, source: Path | None = None, base: Path | None = None, check: bool = True) -> Recipe:
    """Validate a (raw YAML) dict; paths are resolved against `base` (the recipe's folder)."""
    if not isinstance(data, dict):
        raise RecipeError(
            f"a recipe is a YAML mapping, not {type(data).__name__}", field="recipe", fix="start from recipes/mini_vqa.yaml"
        )
    base = base or (source.parent if source else Path.cwd())
    data = expand_env(data)
    if data.get("name") is None and source is not None:
        data = {**data, "name": source.stem}
    try:
        r = Recipe.model_validate(data)
    except ValidationError as e:
        raise _one_line(e, Recipe) from None
    r._source = source
    # paths: relative to the recipe's folder unless absolute
    if r.model.path is not None:
        r.model.path = _absolute(r.model.path, base)
        d = Path(r.model.path)
        if r.model.synth is not None and not (d / "config.json").is_file():
            # A stand-in that `vpexport build` (or `testbed synth`) creates on demand.
            check = False
        elif not d.is_dir():
            raise RecipeError(
                f"model directory {d} does not exist",
                field="model.path",
                fix="give a save_pretrained directory (holding config.json and the weights)",
            )
        elif not (d / "config.json").is_file():
            raise RecipeError(
                f"no config.json in {d}", field="model.path", fix="give a directory written by save_pretrained"
            )
    r.task.data.calib = _absolute(r.task.data.calib, base)
    r.task.data.eval = _absolute(r.task.data.eval, base)
    r.engine.timing_cache = _absolute(r.engine.timing_cache, base)
    if r.name is None:
        r.name = "recipe"
    if check:
        r.check()
    return r


def load_recipe(path: str | Path, check: bool = True) -> Recipe:
    """Read, expand, validate and check a recipe file. Raises RecipeError (one line) on any problem."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RecipeError(f"recipe file {p} does not exist", field="recipe", fix="check the path (see recipes/)") from None
    except (OSError, UnicodeDecodeError) as e:
        raise RecipeError(f"cannot read {p}: {e}", field="recipe", fix="give a readable UTF-8 YAML file") from None
    try:
        data = yaml.load(text, Loader=_StrictLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        ctx, cmark = getattr(e, "context", None), getattr(e, "context_mark", None)
        if ctx and cmark is not None and cmark is not mark:
            problem += f" ({ctx} started at line {cmark.line + 1})"
        raise RecipeError(f"invalid YAML{where}: {problem}", field=str(p), fix="fix the YAML syntax there") from None
    if data is None:
        raise RecipeError(f"{p} is empty", field="recipe", fix="start from recipes/mini_vqa.yaml")
    return recipe_from_dict(data, source=p.resolve(), check=check)


def save_resolved(recipe: Recipe, out_dir: str | Path) -> Path:
    """Write `recipe.resolved.yaml` into `out_dir` and return its path."""
    out = Path(out_dir) / "recipe.resolved.yaml"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(yaml.safe_dump(recipe.resolved(), sort_keys=False, allow_unicode=True))
    return out

