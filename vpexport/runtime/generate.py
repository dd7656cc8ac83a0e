"""Vision -> prefill -> greedy decode with fixed-capacity per-layer KV caches (no torch).

The graphs run in ONNX Runtime, OpenVINO or TensorRT (vpexport/runtime/providers.py).

Batched requests are right-padded; each sample stops at eos (or max_new_tokens) on its own,
and the batch keeps decoding until every sample is done, exactly like PrunedModel.generate.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from vpexport.errors import ArtifactError, UserInputError
from vpexport.runtime.kv_cache import KVCache
from vpexport.runtime.text_length import TextLength


@dataclass
class PrefillResult:
    logits: np.ndarray  # (B, V)
    kv: list  # per layer [key, value]
    kept: list  # per kept prune point (B, keep)
    text_len: np.ndarray  # (B,)
    outputs: dict = field(default_factory=dict)  # every prefill output by name


class ArtifactRuntime:
    def __init__(self, artifact_dir: str | Path, provider: str = "cpu", threads: int | None = None, verify: bool = True,
                 graphs=None, precision: str = "auto"):
        """`graphs`: anything with `Graphs`' run(name, feeds) interface (e.g. Triton BLS requests);
        default: the provider's graphs (`vpexport.runtime.providers`). `precision`: the inference
        precision for providers that choose one (openvino: auto | f32 | bf16)."""
        from vpexport.manifest import read_manifest
        from vpexport.runtime.preprocess import Preprocessor
        from vpexport.runtime.providers import open_graphs
        from vpexport.runtime.tokenizer import PromptTokenizer

        self.dir = Path(artifact_dir)
        self.manifest = read_manifest(self.dir, verify=verify)
        if "export" not in self.manifest:
            raise ArtifactError(f"{self.dir} has no export section in its manifest", field="artifacts",
                                fix="run `vpexport export RECIPE` first")
        rt = self.dir / "runtime"
        try:
            self.gen = json.loads((rt / "generation.json").read_text())
            self.preprocess = Preprocessor.from_file(rt / "preprocess.json")
            self.tokenizer = PromptTokenizer(rt, self.gen)
        except (OSError, ValueError, KeyError, Exception) as e:  # noqa: BLE001
            if isinstance(e, (UserInputError, ArtifactError)):
                raise
            raise ArtifactError(f"cannot read the runtime assets in {rt}: {type(e).__name__}: {str(e)[:200]}",
                                field="artifacts", fix="re-run `vpexport export`") from None
        self.provider = provider
        self.graphs = graphs if graphs is not None else open_graphs(provider, self.dir, self.manifest, threads, precision)
        # The precision the graphs actually run at (OpenVINO reads it back from the compiled model).
        self.precision = getattr(self.graphs, "precision", None) or self.gen.get("precision", "fp32")
        # The element type of the decode graph's cache inputs where the provider sets one (OpenVINO
        # at bf16); None: whatever the prefill returns.
        self.kv_dtype = getattr(self.graphs, "kv_dtype", None)
        if "new.0.key" not in self.graphs.outputs.get("decode", ["new.0.key"]):
            raise ArtifactError(f"{self.dir}/onnx/decode.onnx returns whole caches (an older export); this runtime "
                                "needs the fixed-capacity decode graph", field="artifacts", fix="re-run `vpexport export`")
        g = self.gen
        try:
            self.prefix, self.visual = int(g["prefix"]), int(g["visual_tokens"])
            self.num_layers = int(g["num_layers"])
            self.max_new_tokens = int(g["max_new_tokens"])
            self.batch_max = int(g["batch_max"])
        except (KeyError, TypeError, ValueError) as e:
            raise ArtifactError(f"{rt / 'generation.json'} is incomplete ({type(e).__name__}: {e})", field="artifacts",
                                fix="re-run `vpexport export`") from None
        self.eos = g.get("eos_token_id")
        # The first text token's position: prefix + visual with 1-D RoPE; with M-RoPE (Qwen2-VL)
        # the text continues after the image's largest position, prefix + max(grid rows, cols).
        self.text_pos0 = int(g.get("text_position_start", self.prefix + self.visual))
        self.text_length = TextLength.from_generation(g, str(rt / "generation.json"))
        self.padded = self.text_length.mode == "padded"
        self.text_max = self.text_length.max

    @classmethod
    def open(cls, artifact_dir, provider: str = "cpu", threads: int | None = None, verify: bool = True,
             precision: str = "auto") -> "ArtifactRuntime":
        return cls(artifact_dir, provider, threads, verify, precision=precision)

    # ------------------------------------------------------------------ graph steps
    def encode_image(self, pixel_values: np.ndarray) -> np.ndarray:
        return self.graphs.run("vision", {"pixel_values": pixel_values.astype(np.float32)})["image_features"]

    def prefill(self, input_ids, attention_mask, image_features) -> PrefillResult:
        out = self.graphs.run("prefill", {"input_ids": input_ids, "attention_mask": attention_mask,
                                          "image_features": image_features})
        kv = [[out[f"present.{i}.key"], out[f"present.{i}.value"]] for i in range(self.num_layers)]
        kept = [out[k] for k in sorted((k for k in out if k.startswith("kept.")), key=lambda s: int(s.split(".")[1]))]
        text_len = attention_mask[:, self.prefix + self.visual :].sum(-1)
        return PrefillResult(out["logits"], kv, kept, text_len, out)

    def start_cache(self, out: PrefillResult, attention_mask, steps: int) -> KVCache:
        """Caches with room for `steps` decode steps, filled with the prefill's keys/values."""
        return KVCache(out.kv, np.asarray(attention_mask)[:, self.prefix + self.visual :].astype(np.int64), steps,
                       dtype=self.kv_dtype)

    def decode(self, input_ids, position_ids, cache: KVCache):
        """One greedy step: logits (B, V); the step's key/value are written into `cache`."""
        if cache.free < 1:
            raise UserInputError(f"the KV cache has no free slot left ({cache.capacity} text slots)",
                                 field="--max-new-tokens", fix="start the cache with more steps")
        out = self.graphs.run("decode", {"input_ids": input_ids, "position_ids": position_ids, **cache.feeds()})
        cache.append(out)
        return out["logits"]

    # ------------------------------------------------------------------ generation
    def generate(self, input_ids, attention_mask, pixel_values, max_new_tokens: int | None = None):
        """Greedy tokens per sample (excluding eos) and the prefill result."""
        max_new = self.max_new_tokens if max_new_tokens is None else int(max_new_tokens)
        if max_new < 1:
            raise UserInputError(f"max_new_tokens {max_new} must be at least 1", field="--max-new-tokens",
                                 fix="give a positive count")
        input_ids = np.asarray(input_ids, dtype=np.int64)
        attention_mask = np.asarray(attention_mask, dtype=np.int64)
        b = input_ids.shape[0]
        if b > self.batch_max:
            # The graphs' batch axis is dynamic, so ONNX Runtime / OpenVINO would run it; the engines,
            # the Triton config and the validation were all made for at most batch_max.
            raise UserInputError(f"{b} images in one call, more than this artifact's export.batch.max ({self.batch_max})",
                                 field="--image", fix=f"give at most {self.batch_max} images per call, or re-export "
                                 f"with export.batch.max >= {b}")
        out = self.prefill(input_ids, attention_mask, self.encode_image(pixel_values))
        cache = self.start_cache(out, attention_mask, max_new - 1)
        next_pos = (self.text_pos0 + out.text_len).astype(np.int64)[:, None]
        logits = out.logits
        tokens: list[list[int]] = [[] for _ in range(b)]
        done = [False] * b
        for step in range(max_new):
            nxt = logits.argmax(-1).astype(np.int64)
            for j in range(b):
                if not done[j]:
                    t = int(nxt[j])
                    if self.eos is not None and t == self.eos:
                        done[j] = True
                    else:
                        tokens[j].append(t)
            if all(done) or step == max_new - 1:
                break
            logits = self.decode(nxt[:, None], next_pos, cache)
            next_pos = next_pos + 1
        return tokens, out

    def encode(self, images, questions):
        """(input_ids, attention_mask, pixel_values) as numpy, in the exported layout."""
        if len(images) != len(questions):
            raise UserInputError(f"{len(questions)} questions for {len(images)} images", field="--prompt",
                                 fix="give one question per image")
        ids, mask = self.tokenizer.encode(list(questions), pad_to_text=self.text_length.width, max_text=self.text_max)
        return ids, mask, self.preprocess(images)

    def answer(self, images, questions, max_new_tokens: int | None = None) -> list[dict]:
        ids, mask, px = self.encode(images, questions)
        toks, out = self.generate(ids, mask, px, max_new_tokens)
        return [
            {"text": self.tokenizer.decode(t), "tokens": t, "kept": [k[j].tolist() for k in out.kept]}
            for j, t in enumerate(toks)
        ]
