"""PyTorch answer pipeline: recipe -> loaded checkpoint (any family) -> PrunedModel -> greedy text.

One loaded checkpoint can be re-wrapped with other schedules (`with_schedule`) without
reloading weights: calibration and evaluation compare many schedules on one model.
"""

from __future__ import annotations

from dataclasses import dataclass

from vpexport.pruning.schedule import Schedule


@dataclass
class Answer:
    text: str
    tokens: list[int]
    kept: list[list[int]]  # per prune point, original visual indices


class TorchPipeline:
    def __init__(self, model, processor, template: str, schedule: Schedule, max_new_tokens: int, image_size=None):
        """`image_size` (H, W): the static image size of a dynamic-resolution family (the recipe's
        model.image_size); the vision tower's own otherwise."""
        import torch

        from vpexport.families import family_for_model
        from vpexport.model.loading import encode, prefix_length
        from vpexport.model.pruned import PrunedModel

        from vpexport.model.loading import model_device

        self.model, self.processor, self.template = model, processor, template
        self.device = model_device(model)
        self.max_new_tokens = max_new_tokens
        self.family = family_for_model(model)
        self.image_size = self.family.image_size(model.config.to_dict(), image_size)
        probe_img = _blank_image(self.image_size)
        # A probe for the prefix length only: its placeholder question is no user's, so no warning.
        ids, _, _ = encode(processor, template, ["x"], [probe_img], check_words=False)
        self.prefix = prefix_length(ids, int(model.config.image_token_id))
        self.pruned = PrunedModel(model, schedule, prefix=self.prefix, image_size=self.image_size)
        self.schedule = schedule
        self.device_info = None  # the resolved Device, when built by from_recipe
        self._torch = torch

    @classmethod
    def from_recipe(cls, recipe, schedule: Schedule | None = None, log=None) -> "TorchPipeline":
        """The recipe's checkpoint in model.dtype on model.device (`log` gets the device line)."""
        from vpexport.model.device import resolve
        from vpexport.model.loading import load_model

        if recipe.model.path is None:
            from vpexport.errors import RecipeError

            raise RecipeError(
                f"built-in architecture {recipe.model.arch!r} has no weights to run",
                field="model.path",
                fix="give a local checkpoint directory (or use `vpexport testbed synth` for a random-weight stand-in)",
            )
        device = resolve(recipe.model.device)
        model, processor = load_model(recipe.model_dir, recipe.model.dtype, recipe.model.image_size, device, log)
        if schedule is None:
            schedule = recipe.schedule() or Schedule("none")
        pipe = cls(model, processor, recipe.task.prompt, schedule, recipe.task.max_new_tokens, recipe.model.image_size)
        pipe.device_info = device
        return pipe

    def with_schedule(self, schedule: Schedule) -> "TorchPipeline":
        pipe = TorchPipeline(self.model, self.processor, self.template, schedule, self.max_new_tokens, self.image_size)
        pipe.device_info = self.device_info
        return pipe

    @property
    def device_record(self) -> dict:
        """{device, asked, name} for the records the commands write."""
        return self.device_info.record() if self.device_info is not None else {"device": str(self.device)}

    @property
    def eos_token_id(self) -> int | None:
        return self.processor.tokenizer.eos_token_id

    def encode(self, images, questions):
        """input_ids, attention_mask, pixel_values on the model's device."""
        from vpexport.model.loading import encode

        return tuple(t.to(self.device) for t in encode(self.processor, self.template, questions, images))

    def longest_text(self, images, questions) -> int:
        """Tokens after the image in the longest of these prompts (what export.text_length bounds)."""
        ids, mask, _ = self.encode(images, questions)
        img = int(self.model.config.image_token_id)
        return int((mask.sum(-1) - self.prefix - (ids == img).sum(-1)).max())

    def answer(self, images, questions) -> list[Answer]:
        ids, mask, px = self.encode(images, questions)
        with self._torch.inference_mode():
            toks, out = self.pruned.generate(ids, mask, px, self.max_new_tokens, self.eos_token_id)
        dec = self.processor.tokenizer.decode
        return [
            Answer(dec(t, skip_special_tokens=True).strip(), t, [k[b].tolist() for k in out.kept])
            for b, t in enumerate(toks)
        ]


def _blank_image(size: tuple[int, int]):
    from PIL import Image

    return Image.new("RGB", (size[1], size[0]))
