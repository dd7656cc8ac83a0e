"""The recipe schema: strict pydantic v2 models, one per YAML section.

Every model forbids unknown keys. Cross-field rules raise `PydanticCustomError("recipe", ...)`
whose context carries the exact sub-field and a fix, so the loader can turn the first problem
into ONE `RecipeError` line (see `vpexport/recipe/loader.py`). Nothing here imports torch.
"""

from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic_core import PydanticCustomError

from vpexport.families import BUILTIN_ARCHS
from vpexport.arch.layout import IMAGE_PLACEHOLDER
from vpexport.methods import METHODS, auto_candidates


def recipe_error(msg: str, sub: str = "", fix: str = "") -> PydanticCustomError:
    """A cross-field problem. `sub` is the field path relative to the model raising it."""
    return PydanticCustomError("recipe", "{msg}", {"msg": msg, "sub": sub, "fix": fix})


class Strict(BaseModel):
    # strict: YAML already gives native types, so "288" (a string) is not silently an int
    model_config = ConfigDict(extra="forbid", populate_by_name=True, strict=True)


# --------------------------------------------------------------------------- model
class SynthSection(Strict):
    """A random-weight stand-in of a built-in architecture, created at model.path when missing
    (`vpexport testbed synth`). For export and speed work only: no quality figure comes from it."""

    arch: str
    layers: int | None = Field(None, ge=1)  # decoder layers (default: the architecture's)
    hidden: int | None = Field(None, ge=16)  # decoder width (default: the architecture's)
    vision_layers: int | None = Field(None, ge=1)
    seed: int = 0

    @model_validator(mode="after")
    def _known_arch(self):
        if self.arch not in BUILTIN_ARCHS:
            raise recipe_error(f"unknown built-in architecture {self.arch!r}", sub="arch",
                               fix="use one of " + ", ".join(BUILTIN_ARCHS))
        return self


class ModelSection(Strict):
    path: str | None = None  # local save_pretrained directory (relative to the recipe's folder unless absolute)
    arch: str | None = None  # built-in architecture (weight-free planning only)
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    # Where the PyTorch side runs (calibrate, eval, analyze, validate's reference, run RECIPE):
    # auto (a CUDA GPU when present, else the CPU), cpu, cuda, cuda:N. Export always traces on the CPU.
    device: str = "auto"
    # [H, W] pixels the graphs are built for: required by dynamic-resolution families (Qwen2-VL),
    # fixed by the vision tower for LLaVA (checked against it when given).
    image_size: list[int] | None = None
    synth: SynthSection | None = None  # create a random-weight stand-in at `path` when it is missing

    @model_validator(mode="after")
    def _one_source(self):
        if (self.path is None) == (self.arch is None):
            raise recipe_error(
                "give exactly one of path / arch" + (" (both are set)" if self.path is not None else ""),
                fix="path: a save_pretrained directory, or arch: one of " + ", ".join(BUILTIN_ARCHS),
            )
        if self.image_size is not None and (len(self.image_size) != 2 or min(self.image_size) < 1):
            raise recipe_error(f"{self.image_size} is not [H, W]", sub="image_size",
                               fix="give two positive pixel counts, e.g. [448, 448]")
        if self.path is not None and not self.path.strip():
            raise recipe_error("is empty", sub="path", fix="give a save_pretrained directory")
        from vpexport.model.device import DEVICE_PATTERN

        if not DEVICE_PATTERN.match(self.device.strip().lower()):
            raise recipe_error(f"{self.device!r} is not a device", sub="device",
                               fix="use auto, cpu, cuda or cuda:N (e.g. cuda:1)")
        self.device = self.device.strip().lower()
        if self.synth is not None and self.path is None:
            raise recipe_error("synth needs a path to create the stand-in at", sub="synth",
                               fix="set model.path to where the stand-in should live")
        if self.arch is not None and self.arch not in BUILTIN_ARCHS:
            import difflib

            close = difflib.get_close_matches(self.arch, list(BUILTIN_ARCHS), n=1)
            raise recipe_error(
                f"unknown built-in architecture {self.arch!r}",
                sub="arch",
                fix=f"did you mean {close[0]!r}?" if close else "use one of " + ", ".join(BUILTIN_ARCHS),
            )
        return self


# --------------------------------------------------------------------------- task
class DataSection(Strict):
    calib: str | None = None  # JSONL, relative to the recipe's folder unless absolute
    eval: str | None = None


class TaskSection(Strict):
    type: Literal["vqa", "caption"]
    data: DataSection = Field(default_factory=DataSection)
    prompt: str
    max_new_tokens: int = Field(8, ge=1)
    text_tokens: int = Field(40, ge=1)  # planning estimate of tokens after the image when there is no tokenizer

    @model_validator(mode="after")
    def _prompt(self):
        n = self.prompt.count(IMAGE_PLACEHOLDER)
        if n != 1:
            raise recipe_error(
                f"the prompt must contain the image placeholder {IMAGE_PLACEHOLDER} exactly once (found {n})",
                sub="prompt",
                fix=f"write e.g. 'USER: {IMAGE_PLACEHOLDER}\\n{{question}} ASSISTANT:'",
            )
        if "{question}" not in self.prompt:
            raise recipe_error("the prompt has no {question} slot", sub="prompt", fix="put {question} where the question goes")
        return self


# --------------------------------------------------------------------------- pruning
class PointSection(Strict):
    layer: int
    keep: int | None = None  # visual tokens kept from this layer on
    keep_fraction: float | None = Field(None, gt=0, le=1)  # of the visual tokens present at this point


DEFAULT_TOLERANCE = 0.01


class CalibrateSection(Strict):
    """Two objectives. `tolerance` alone: the lowest exact prefill FLOPs whose calibration accuracy
    drop stays within it. `flops_budget`: the highest calibration accuracy at an exact prefill FLOPs
    ratio <= the budget (a latency target); with a tolerance too, that schedule must also stay within it."""

    tolerance: float | None = Field(None, ge=0, le=1)  # max absolute accuracy drop vs dense (fraction)
    flops_budget: float | None = Field(None, gt=0, lt=1)  # max exact prefill FLOPs ratio
    max_samples: int = Field(200, ge=1)
    seed: int = 0
    # the report's equal-FLOPs rows: a budget search per FastV/HiMAP default the schedule does not
    # dominate (hundreds of candidates: minutes on the mini model, far longer on a 7B one)
    compare: bool = True

    @model_validator(mode="after")
    def _objective(self):
        if self.tolerance is None and self.flops_budget is None:
            self.tolerance = DEFAULT_TOLERANCE
        return self

    @property
    def objective(self) -> str:
        return "min_flops" if self.flops_budget is None else "max_accuracy"


class MethodOptions(Strict):
    """`pruning:` for a named method. Each registered method gets its own model: this one with
    `method` fixed to its name and the method's own fields (`Method.options`), so the section is a
    union discriminated on `method` (`pruning_section`). The checks below read the method's table
    entry (its rules, whether it is a baseline); a method's own option fields check themselves."""

    method: str
    points: list[PointSection] | None = None
    seed: int = 0
    calibrate: CalibrateSection | None = None

    @model_validator(mode="before")
    @classmethod
    def _sink_key(cls, data):
        # `sink_layers: 0` is what every recipe said before the key became VisiPruner's own (and
        # what resolved recipes written then still say): accepted and dropped where it means nothing.
        if isinstance(data, dict) and "sink_layers" in data and "sink_layers" not in cls.model_fields:
            if data["sink_layers"] == 0:
                return {k: v for k, v in data.items() if k != "sink_layers"}
            method = data.get("method")
            if method == "auto":
                raise recipe_error("sink_layers cannot be set with method auto (calibration chooses it)",
                                   sub="sink_layers", fix="remove it")
            sinkers = [m for m, spec in METHODS.items() if spec.uses_sink]
            raise recipe_error(f"method {method} has no sink stage", sub="sink_layers",
                               fix="remove sink_layers (or use " + ", ".join(sinkers) + ")")
        return data

    @model_validator(mode="after")
    def _consistent(self):
        if self.points is not None and self.calibrate is not None:
            raise recipe_error(
                "points and calibrate are mutually exclusive",
                sub="calibrate",
                fix="remove points to let calibration choose them, or remove calibrate to use your points",
            )
        if self.method == "auto":
            if self.calibrate is None:
                raise recipe_error(
                    "method auto needs calibrate",
                    sub="method",
                    fix="add calibrate: {tolerance: 0.01} or name a method (" + ", ".join(auto_candidates()) + ")",
                )
            return self
        spec = METHODS[self.method]
        if self.calibrate is not None:
            if spec.baseline:
                raise recipe_error(
                    f"method {self.method} has nothing to calibrate"
                    + ("" if self.method == "none" else " (a baseline: its points are yours to give)"),
                    sub="calibrate",
                    fix="remove calibrate" + ("" if self.method == "none" else " and give points, or use method auto"),
                )
            return self
        points = self.points if self.points is not None else []
        rules = spec.rule_names
        if self.points is None and rules:
            d = spec.default(32, 576, "vqa")
            example = ", ".join(f"{{layer: {p.layer}, keep: {p.keep}}}" for p in d.points)
            raise recipe_error(
                f"method {self.method} needs points or calibrate",
                sub="points",
                fix=f"add points: [{example}] (the published default) or calibrate: {{tolerance: 0.01}}",
            )
        if len(points) != len(rules):
            raise recipe_error(
                f"method {self.method} takes {len(rules)} prune point(s) ({', '.join(rules) or 'none'}), got {len(points)}",
                sub="points",
                fix=f"give exactly {len(rules)} point(s), one per rule in that order",
            )
        for i, p in enumerate(points):
            if (p.keep is None) == (p.keep_fraction is None):
                raise recipe_error(
                    "give exactly one of keep / keep_fraction",
                    sub=f"points[{i}]",
                    fix="e.g. keep: 288 or keep_fraction: 0.5",
                )
            if spec.rules[i].kind == "drop" and p.keep != 0:
                raise recipe_error(
                    f"point {i} of {self.method} drops every visual token (rule {rules[i]})",
                    sub=f"points[{i}].keep",
                    fix="set keep: 0",
                )
        return self


def _options_model(name: str, fields: dict):
    from pydantic import create_model

    cls = "".join(w.capitalize() for w in name.replace("-", "_").split("_")) + "Options"
    return create_model(cls, __base__=MethodOptions, method=(Literal[name], ...), **fields)


# One model per registered method (and `auto`), discriminated on `method`.
METHOD_OPTIONS: dict[str, type[MethodOptions]] = {
    name: _options_model(name, dict(m.options)) for name, m in METHODS.items()
} | {"auto": _options_model("auto", {})}
PruningSection = Annotated[Union[tuple(METHOD_OPTIONS.values())], Field(discriminator="method")]


# --------------------------------------------------------------------------- export / engine / validate / deploy
class TextLengthSection(Strict):
    """Tokens after the image (instruction + answer prefix). `padded`: a static axis of `max`;
    `dynamic`: a dynamic axis, run at each batch's longest text, or, with `buckets`, padded up to
    the smallest bucket that holds it (a few static shapes for runtimes that compile per shape)."""

    mode: Literal["padded", "dynamic"] = "padded"
    max: int = Field(64, ge=1)
    buckets: list[int] | None = None

    @model_validator(mode="after")
    def _check_buckets(self):
        if self.buckets is None:
            return self
        if self.mode != "dynamic":
            raise recipe_error("text_length.buckets needs a dynamic text axis", sub="buckets",
                               fix="set export.text_length.mode: dynamic, or remove buckets")
        bad = [b for b in self.buckets if not 1 <= b <= self.max]
        if bad or not self.buckets:
            raise recipe_error(f"text_length.buckets {self.buckets} must be lengths between 1 and max ({self.max})",
                               sub="buckets", fix=f"e.g. buckets: [16, 32] with max: {self.max}")
        if self.buckets != sorted(set(self.buckets)):
            raise recipe_error(f"text_length.buckets {self.buckets} must be increasing, without repeats",
                               sub="buckets", fix=f"e.g. buckets: {sorted(set(self.buckets))}")
        return self

    def widths(self) -> list[int] | None:
        """The text lengths the graphs run at with buckets (`max` always last); None without."""
        if self.buckets is None:
            return None
        return self.buckets + ([self.max] if self.buckets[-1] != self.max else [])


class BatchSection(Strict):
    max: int = Field(8, ge=1)


class ExportSection(Strict):
    opset: int = Field(18, ge=14, le=23)
    precision: Literal["fp32", "fp16"] = "fp32"
    text_length: TextLengthSection = Field(default_factory=TextLengthSection)
    batch: BatchSection = Field(default_factory=BatchSection)


class EngineSection(Strict):
    precision: Literal["fp32", "fp16", "bf16"] = "fp16"
    workspace_gb: float = Field(4, gt=0)
    timing_cache: str | None = None  # path, relative to the recipe's folder unless absolute
    version_compatible: bool = False


class ReducedPrecisionChecks(Strict):
    """Thresholds for a runtime that computes below the export's precision (OpenVINO bf16 on fp32
    graphs), against the full-precision PyTorch model."""

    min_generation_match: float = Field(0.95, ge=0, le=1)
    max_accuracy_delta: float = Field(0.01, ge=0, le=1)  # |accuracy(artifacts) - accuracy(torch)|
    min_kept_agreement: float = Field(0.9, ge=0, le=1)  # mean share of PyTorch's kept indices also kept


class ValidateSection(Strict):
    samples: int = Field(50, ge=1)
    atol: float | None = Field(None, ge=0)  # null -> per-precision default
    rtol: float | None = Field(None, ge=0)
    min_generation_match: float = Field(1.0, ge=0, le=1)
    reduced_precision: ReducedPrecisionChecks = Field(default_factory=ReducedPrecisionChecks)


class TritonSection(Strict):
    enabled: bool = False
    max_batch_size: int = Field(8, ge=1)
    max_queue_delay_us: int = Field(100, ge=0)
    preferred_batch_sizes: list[int] = Field(default_factory=list)
    instances: int = Field(1, ge=1)
    device: Literal["cpu", "gpu"] = "cpu"
    mode: Literal["inprocess", "bls"] = "inprocess"

    @model_validator(mode="after")
    def _sizes(self):
        for i, b in enumerate(self.preferred_batch_sizes):
            if not 1 <= b <= self.max_batch_size:
                raise recipe_error(
                    f"{b} is outside 1..max_batch_size ({self.max_batch_size})",
                    sub=f"preferred_batch_sizes[{i}]",
                    fix=f"use sizes between 1 and {self.max_batch_size}",
                )
        if self.preferred_batch_sizes != sorted(set(self.preferred_batch_sizes)):
            raise recipe_error(
                "must be strictly increasing", sub="preferred_batch_sizes", fix="list each size once, smallest first"
            )
        return self


class JetsonSection(Strict):
    enabled: bool = False


class DeploySection(Strict):
    triton: TritonSection = Field(default_factory=TritonSection)
    jetson: JetsonSection = Field(default_factory=JetsonSection)


# --------------------------------------------------------------------------- the recipe
class RecipeModel(Strict):
    """The validated document. `vpexport.recipe.Recipe` adds resolution methods on top."""

    name: str | None = None
    model: ModelSection
    task: TaskSection
    pruning: PruningSection
    export: ExportSection = Field(default_factory=ExportSection)
    engine: EngineSection = Field(default_factory=EngineSection)
    # `validate` is a (deprecated) BaseModel method name, so the attribute is `validation`.
    validation: ValidateSection = Field(default_factory=ValidateSection, alias="validate")
    deploy: DeploySection = Field(default_factory=DeploySection)

    @model_validator(mode="after")
    def _cross(self):
        t = self.deploy.triton
        if t.enabled and t.max_batch_size > self.export.batch.max:
            raise recipe_error(
                f"max_batch_size {t.max_batch_size} is larger than export.batch.max ({self.export.batch.max})",
                sub="deploy.triton.max_batch_size",
                fix=f"use at most {self.export.batch.max}, or raise export.batch.max",
            )
        if self.model.arch is not None and t.enabled:
            raise recipe_error(
                "a built-in arch has no weights to deploy",
                sub="deploy.triton.enabled",
                fix="use model.path (a save_pretrained directory) or set enabled: false",
            )
        if self.task.text_tokens > self.export.text_length.max and self.model.arch is not None:
            raise recipe_error(
                f"text_tokens {self.task.text_tokens} is more than export.text_length.max ({self.export.text_length.max})",
                sub="task.text_tokens",
                fix=f"raise export.text_length.max to at least {self.task.text_tokens}",
            )
        return self


def methods_markdown() -> str:
    """The method table of docs/recipes.md, generated from METHODS (a test keeps the doc in sync)."""
    rows = [
        "| method | points (rule of each, in order) | sink_layers | published default (32 layers, 576 tokens, vqa) | reference |",
        "|---|---|---|---|---|",
    ]
    for name, m in METHODS.items():
        d = m.default(32, 576, "vqa")
        pts = ", ".join(f"layer {p.layer} keep {p.keep}" for p in d.points) or "-"
        if d.sink_layers:
            pts += f"; sink_layers {d.sink_layers}"
        rules = ", ".join(f"`{r}`" for r in m.rule_names) or "(none)"
        rows.append(f"| `{name}` | {rules} | {'yes' if m.uses_sink else 'no'} | {pts} | {m.reference} |")
    rows.append(
        f"| `auto` | calibration tries {', '.join(f'`{c}`' for c in auto_candidates())} | no | - (needs `calibrate`) | - |"
    )
    return "\n".join(rows)


def rules_markdown() -> str:
    """The scoring-rule table of docs/recipes.md, generated from RULES (a test keeps the doc in sync)."""
    from vpexport.methods import RULES

    rows = ["| rule | kind | where it reads | chooses the visual tokens by |", "|---|---|---|---|"]
    for name, r in RULES.items():
        where = "the projector's output (point at layer 0)" if r.pre_llm else (
            "layer K-1" if r.kind == "score" else "-")
        rows.append(f"| `{name}` | {r.kind} | {where} | {r.summary} |")
    return "\n".join(rows)
