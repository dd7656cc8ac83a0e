"""Vision -> prefill -> greedy decode with per-layer KV caches, in ONNX Runtime (no torch).

Batched requests are right-padded; each sample stops at eos (or max_new_tokens) on its own,
and the batch keeps decoding until every sample is done, exactly like PrunedLlava.generate.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from vpexport.errors import ArtifactError, UserInputError


@dataclass
class PrefillResult:
    logits: np.ndarray  # (B, V)
    kv: list  # per layer [key, value]
    kept: list  # per kept prune point (B, keep)
    text_len: np.ndarray  # (B,)
    outputs: dict = field(default_factory=dict)  # every prefill output by name


class ArtifactRuntime:
    def __init__(self, artifact_dir: str | Path, provider: str = "cpu", threads: int | None = None, verify: bool = True,
                 graphs=None):
        """`graphs`: anything with `Graphs`' run(name, feeds) interface (e.g. Triton BLS requests);
        default: ONNX Runtime sessions, or TensorRT engines for provider tensorrt when built."""
        from vpexport.manifest import read_manifest
        from vpexport.runtime.preprocess import Preprocessor
        from vpexport.runtime.session import Graphs
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
        if graphs is not None:
            self.graphs = graphs
        else:
            from vpexport.runtime.trt_session import TrtGraphs, has_engines

            # --provider tensorrt: the TensorRT plans of `vpexport engine` when built, else ORT's TensorRT EP
            if provider == "tensorrt" and has_engines(self.dir):
                self.graphs = TrtGraphs(self.dir, self.manifest)
            else:
                self.graphs = Graphs(self.dir / "onnx", provider, threads)
        g = self.gen
        self.prefix, self.visual = int(g["prefix"]), int(g["visual_tokens"])
        self.num_layers = int(g["num_layers"])
        self.eos = g.get("eos_token_id")
        self.padded = g["text_length"]["mode"] == "padded"
        self.text_max = int(g["text_length"]["max"])
        self.max_new_tokens = int(g["max_new_tokens"])

    @classmethod
    def open(cls, artifact_dir, provider: str = "cpu", threads: int | None = None, verify: bool = True) -> "ArtifactRuntime":
        return cls(artifact_dir, provider, threads, verify)

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

    def decode(self, input_ids, position_ids, text_mask, kv):
        feeds = {"input_ids": input_ids, "position_ids": position_ids, "text_mask": text_mask}
        for i, (k, v) in enumerate(kv):
            feeds[f"past.{i}.key"], feeds[f"past.{i}.value"] = k, v
        out = self.graphs.run("decode", feeds)
        return out["logits"], [[out[f"present.{i}.key"], out[f"present.{i}.value"]] for i in range(self.num_layers)]

    # ------------------------------------------------------------------ generation
    def generate(self, input_ids, attention_mask, pixel_values, max_new_tokens: int | None = None):
        """Greedy tokens per sample (excluding eos) and the prefill result."""
        max_new = self.max_new_tokens if max_new_tokens is None else int(max_new_tokens)
        input_ids = np.asarray(input_ids, dtype=np.int64)
        attention_mask = np.asarray(attention_mask, dtype=np.int64)
        b = input_ids.shape[0]
        out = self.prefill(input_ids, attention_mask, self.encode_image(pixel_values))
        head = self.prefix + self.visual
        text_mask = attention_mask[:, head:].astype(np.int64)
        next_pos = (head + out.text_len).astype(np.int64)[:, None]
        logits, kv = out.logits, out.kv
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
            text_mask = np.concatenate([text_mask, np.ones((b, 1), dtype=np.int64)], axis=1)
            logits, kv = self.decode(nxt[:, None], next_pos, text_mask, kv)
            next_pos = next_pos + 1
        return tokens, out

    def encode(self, images, questions):
        """(input_ids, attention_mask, pixel_values) as numpy, in the exported layout."""
        if len(images) != len(questions):
            raise UserInputError(f"{len(questions)} questions for {len(images)} images", field="--prompt",
                                 fix="give one question per image")
        ids, mask = self.tokenizer.encode(list(questions), pad_to_text=self.text_max if self.padded else None,
                                          max_text=self.text_max)
        return ids, mask, self.preprocess(images)

    def answer(self, images, questions, max_new_tokens: int | None = None) -> list[dict]:
        ids, mask, px = self.encode(images, questions)
        toks, out = self.generate(ids, mask, px, max_new_tokens)
        return [
            {"text": self.tokenizer.decode(t), "tokens": t, "kept": [k[j].tolist() for k in out.kept]}
            for j, t in enumerate(toks)
        ]
