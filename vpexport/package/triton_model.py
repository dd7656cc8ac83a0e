"""Triton Python-backend model: image (encoded bytes) + prompt (the question) -> generated text.

Copied by `vpexport package --triton` into `<repo>/<model>/1/model.py` next to a copy of the
torch-free `vpexport` runtime package and the artifact's runtime assets (`artifact/`). The stub
needs only numpy, pillow, tokenizers and onnxruntime (openvino for provider openvino; tensorrt +
cuda-python for plans).

Parameters (config.pbtxt `parameters { key: ... value { string_value: ... } }`):
  mode          inprocess: run vision/prefill/decode with ONNX Runtime inside this stub
                bls:       send each graph step to the `components` models (pb_utils.InferenceRequest)
  artifact_dir  the runtime assets (and, inprocess, onnx/); relative to this folder unless absolute
  components    the vision,prefill,decode model names (bls)
  provider      cpu | openvino | cuda | tensorrt (inprocess; vpexport/runtime/providers.py)
  precision     auto | f32 | bf16 (inprocess, provider openvino)
  threads       runtime threads per instance (inprocess; 0 = the runtime's default)

Requests queued together by the dynamic batcher are answered in one batched generation (up to
the exported batch.max); a request whose image cannot be decoded gets its own error response.
"""

import io
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)  # the runtime copy next to this file wins over any installed vpexport

import numpy as np  # noqa: E402
import triton_python_backend_utils as pb_utils  # noqa: E402


class BlsGraphs:
    """`Graphs`' interface (run(name, feeds) -> {output: array}) over BLS requests to other models."""

    def __init__(self, components: dict, wiring: dict):
        self.components = components  # role -> model name
        self.inputs = {r: w["inputs"] for r, w in wiring.items()}
        self.outputs = {r: w["outputs"] for r, w in wiring.items()}

    def run(self, name, feeds):
        kw = {}
        if hasattr(pb_utils, "PreferredMemory"):  # ask for host outputs (GPU components): numpy needs them
            kw["preferred_memory"] = pb_utils.PreferredMemory(pb_utils.TRITONSERVER_MEMORY_CPU, 0)
        req = pb_utils.InferenceRequest(
            model_name=self.components[name],
            requested_output_names=self.outputs[name],
            inputs=[pb_utils.Tensor(k, np.ascontiguousarray(feeds[k])) for k in self.inputs[name]],
            **kw,
        )
        resp = req.exec()
        if resp.has_error():
            raise pb_utils.TritonModelException(f"{self.components[name]}: {resp.error().message()}")
        out = {}
        for o in self.outputs[name]:
            t = pb_utils.get_output_tensor_by_name(resp, o)
            out[o] = t.as_numpy() if t.is_cpu() else _dlpack_to_numpy(t)
        return out


def _dlpack_to_numpy(t):
    import torch.utils.dlpack  # only reached with GPU outputs, i.e. in a GPU container

    return torch.utils.dlpack.from_dlpack(t.to_dlpack()).cpu().numpy()


def _runtime_with_graphs(art, graphs):
    """ArtifactRuntime reading its assets from `art`, running its graphs through `graphs`."""
    from vpexport.runtime.generate import ArtifactRuntime

    return ArtifactRuntime(art, provider="cpu", verify=True, graphs=graphs)


class TritonPythonModel:
    def initialize(self, args):
        cfg = json.loads(args["model_config"])
        params = {k: v.get("string_value", "") for k, v in cfg.get("parameters", {}).items()}
        self.mode = params.get("mode", "inprocess")
        art = params.get("artifact_dir", "artifact")
        art = art if os.path.isabs(art) else os.path.join(HERE, art)
        if self.mode == "inprocess":
            from vpexport.runtime.generate import ArtifactRuntime

            threads = int(params.get("threads", "1") or 0) or None
            self.rt = ArtifactRuntime(art, provider=params.get("provider", "cpu"), threads=threads, verify=True,
                                      precision=params.get("precision", "auto") or "auto")
        elif self.mode == "bls":
            with open(os.path.join(HERE, "bls.json")) as f:
                wiring = json.load(f)
            names = [c for c in params.get("components", "vision,prefill,decode").split(",") if c]
            self.rt = _runtime_with_graphs(art, BlsGraphs(dict(zip(("vision", "prefill", "decode"), names)), wiring))
        else:
            raise pb_utils.TritonModelException(f"parameter mode {self.mode!r} is not inprocess or bls")
        self.batch_max = int(self.rt.gen.get("batch_max") or 1)

    @staticmethod
    def _strings(request, name):
        t = pb_utils.get_input_tensor_by_name(request, name)
        if t is None:
            raise ValueError(f"input {name!r} is missing")
        return [x if isinstance(x, bytes) else str(x).encode() for x in t.as_numpy().reshape(-1)]

    def execute(self, requests):
        from PIL import Image

        responses = [None] * len(requests)
        jobs = []  # (request index, images, questions)
        for r, req in enumerate(requests):
            try:
                blobs, prompts = self._strings(req, "image"), self._strings(req, "prompt")
                if len(prompts) == 1 and len(blobs) > 1:
                    prompts = prompts * len(blobs)
                if len(prompts) != len(blobs):
                    raise ValueError(f"{len(prompts)} prompts for {len(blobs)} images")
                images = []
                for b in blobs:
                    with Image.open(io.BytesIO(b)) as im:
                        im.load()
                        images.append(im.convert("RGB"))
                jobs.append((r, images, [p.decode("utf-8") for p in prompts]))
            except Exception as e:  # noqa: BLE001 - a bad request fails alone
                responses[r] = pb_utils.InferenceResponse(error=pb_utils.TritonError(f"bad request: {e}"))
        # one batched generation over every good request, in chunks of the exported batch.max
        flat = [(r, im, q) for r, ims, qs in jobs for im, q in zip(ims, qs)]
        texts = {}
        try:
            for s in range(0, len(flat), self.batch_max):
                chunk = flat[s : s + self.batch_max]
                answers = self.rt.answer([c[1] for c in chunk], [c[2] for c in chunk])
                for (r, _, _), a in zip(chunk, answers):
                    texts.setdefault(r, []).append(a["text"])
        except Exception as e:  # noqa: BLE001
            for r, _, _ in jobs:
                responses[r] = pb_utils.InferenceResponse(error=pb_utils.TritonError(f"generation failed: {e}"))
            return responses
        for r, ims, _ in jobs:
            out = np.array([[t.encode("utf-8")] for t in texts[r]], dtype=np.object_)
            responses[r] = pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("text", out)])
        return responses

    def finalize(self):
        self.rt = None
