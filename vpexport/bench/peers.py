"""Peers for `vpexport bench`: what a user would run instead of vpexport's artifacts.

    OpenVinoGenAIPeer(artifact_dir, model_dir, threads, precision=None, image_tag="<image>")
        the same Hugging Face checkpoint exported by optimum-intel (fp32 weights) and run by
        `openvino_genai.VLMPipeline` on the CPU; run_once(image, prompt, decode_steps,
        pruning_ratio=0) -> timings, unpruned or with OpenVINO GenAI's own CDPruner (which prunes
        the visual tokens before the LLM; Qwen2-VL / Qwen2.5-VL only in OpenVINO GenAI 2026.4).
    cdpruner_ratio(visual_tokens, keep) -> the integer `pruning_ratio` whose kept count is nearest keep.
    ensure_peer_export(artifact_dir, model_dir) -> folder
        the optimum-intel export under artifact_dir/bench/peers/openvino_genai, cached by a key of
        the checkpoint's content and the exporter's versions (peer_key.json).
    setup_export_env(venv) -> optimum-cli path
        a virtual environment for the exporter (`python -m vpexport.bench.peers setup`).

The run needs only openvino, openvino-genai and openvino-tokenizers. The export needs
optimum-intel, which needs an older transformers (5.0 for the Qwen VL exports) and pulls a torchvision wheel that breaks
`transformers` imports with the CPU torch, so it usually lives in its own virtual environment;
it is found in this order: $VPEXPORT_OPTIMUM_CLI, `optimum-cli` on PATH, the default setup venv
(~/.cache/vpexport/peer-export-venv), this interpreter if it can import optimum.intel.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from vpexport.errors import RuntimeUnavailable, UserInputError

PEERS_SUBDIR = Path("bench") / "peers"
STAMP = "peer_key.json"
EXPORT_LOG = "peer_export.log"
RUN_FIX = "pip install 'vpexport[peers]'"
SETUP_FIX = "python -m vpexport.bench.peers setup"
OPTIMUM_INTEL_SPEC = "optimum-intel[openvino]==2.2.*"
# optimum-intel 2.2 refuses to export Qwen2-VL / Qwen2.5-VL under a transformers newer than 5.0 (its
# MAX_TRANSFORMERS_VERSION); 5.0.0 also exports LLaVA, so one exporter serves every family.
EXPORT_TRANSFORMERS_SPEC = "transformers==5.0.0"
EXPORT_ARGS = ("--task", "image-text-to-text", "--weight-format", "fp32")
PRECISIONS = ("f32", "bf16")
# Files of the checkpoint the export reads; a README or vpexport's own notes do not change it.
KEY_SUFFIXES = (".json", ".safetensors", ".bin", ".model", ".txt", ".jinja", ".tiktoken")
# What VLMPipeline loads; optimum-cli skips the tokenizer (with only a warning) when its
# environment lacks openvino-tokenizers, so a zero exit status alone does not mean usable.
REQUIRED_FILES = ("openvino_language_model.xml", "openvino_text_embeddings_model.xml",
                  "openvino_vision_embeddings_model.xml", "openvino_tokenizer.xml", "openvino_detokenizer.xml")
# Versions that change the exported IR; pinned to what is installed here in setup_export_env so the
# exporter's openvino matches the runtime that loads its output.
VERSION_PACKAGES = ("optimum-intel", "optimum", "transformers", "torch", "openvino", "openvino-tokenizers", "nncf")
PIN_PACKAGES = ("torch", "openvino", "openvino-tokenizers", "openvino-genai")


class PeerUnavailable(RuntimeUnavailable):
    """A peer cannot run here: a package or the exporter is missing, or the export failed."""


# --------------------------------------------------------------------------- exporter discovery


@dataclass(frozen=True)
class Exporter:
    argv: tuple[str, ...]  # the command prefix that stands for `optimum-cli`
    python: str | None  # the interpreter it runs in (for its package versions), if known
    source: str  # how it was found, for log lines


def default_venv() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "vpexport" / "peer-export-venv"


def _venv_cli(venv: Path) -> Path:
    return venv / ("Scripts" if os.name == "nt" else "bin") / "optimum-cli"


def _script_python(script: Path) -> str | None:
    """The interpreter of a pip console script: its shebang, or the `'''exec' PY` line pip writes
    instead when the interpreter's path is too long for a shebang."""
    try:
        head = script.read_bytes()[:512].decode("utf-8", "replace").splitlines()
    except OSError:
        return None
    if not head or not head[0].startswith("#!"):
        return None
    first = head[0][2:].strip()
    if first == "/bin/sh" and len(head) > 1:
        m = re.match(r"'''exec' (\S+)", head[1])
        return m.group(1).strip("'\"") if m else None
    exe = first.split()[0] if first else ""
    return exe if "python" in os.path.basename(exe) else None


def _optimum_intel_importable() -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec("optimum.intel") is not None
    except (ImportError, ValueError):  # find_spec imports the parent package `optimum`
        return False


def find_exporter() -> Exporter | None:
    """The optimum-intel exporter to use, or None (see the module docstring for the order)."""
    env = os.environ.get("VPEXPORT_OPTIMUM_CLI")
    if env:
        path = Path(env).expanduser()
        if not (path.is_file() and os.access(path, os.X_OK)):
            # An explicit choice that is wrong must not silently fall through to another exporter.
            raise PeerUnavailable(f"VPEXPORT_OPTIMUM_CLI={env} is not an executable file",
                                  fix=f"point it at an optimum-cli, or unset it and run `{SETUP_FIX}`")
        return Exporter((str(path),), _script_python(path), "VPEXPORT_OPTIMUM_CLI")
    on_path = shutil.which("optimum-cli")
    if on_path:
        return Exporter((on_path,), _script_python(Path(on_path)), "PATH")
    venv_cli = _venv_cli(default_venv())
    if venv_cli.is_file() and os.access(venv_cli, os.X_OK):
        return Exporter((str(venv_cli),), _script_python(venv_cli), str(default_venv()))
    if _optimum_intel_importable():
        return Exporter((sys.executable, "-m", "optimum.commands.optimum_cli"), sys.executable, "this Python")
    return None


def require_exporter() -> Exporter:
    exporter = find_exporter()
    if exporter is None:
        raise PeerUnavailable(
            "no optimum-intel exporter found (VPEXPORT_OPTIMUM_CLI unset, no optimum-cli on PATH "
            f"or in {default_venv()}, optimum.intel not importable)",
            fix=f"run `{SETUP_FIX}` (or set VPEXPORT_OPTIMUM_CLI to an optimum-cli)")
    return exporter


_VERSIONS_SCRIPT = (
    "import json, importlib.metadata as m\n"
    "def v(n):\n"
    "    try: return m.version(n)\n"
    "    except m.PackageNotFoundError: return None\n"
    f"print(json.dumps({{n: v(n) for n in {VERSION_PACKAGES!r}}}))\n"
)


def exporter_version(exporter: Exporter) -> str:
    """The exporter's package versions as one string (part of the peer key).

    Read from package metadata in the exporter's interpreter (0.1 s; `optimum-cli` has no
    --version and `optimum-cli env` imports torch). An exporter whose interpreter is unknown is
    identified by its resolved path and content instead."""
    if exporter.python:
        try:
            out = subprocess.run([exporter.python, "-c", _VERSIONS_SCRIPT], capture_output=True, text=True,
                                 timeout=60, check=True).stdout
            versions = json.loads(out.strip().splitlines()[-1])
            return "; ".join(f"{k} {v}" for k, v in versions.items() if v)
        except (OSError, subprocess.SubprocessError, ValueError, IndexError):
            pass
    script = Path(exporter.argv[0]).resolve()
    return f"{script} sha256:{_sha256_file(script)}"


# --------------------------------------------------------------------------- the peer key


def _sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _key_files(model_dir: Path) -> list[Path]:
    files = sorted(p for p in model_dir.iterdir() if p.is_file() and p.suffix in KEY_SUFFIXES)
    if not (model_dir / "config.json").is_file():
        raise UserInputError(f"{model_dir} has no config.json", field="model",
                             fix="point it at a Hugging Face LLaVA checkpoint folder")
    if not any(p.suffix in (".safetensors", ".bin") for p in files):
        raise UserInputError(f"{model_dir} has no weight files (*.safetensors)", field="model",
                             fix="point it at a Hugging Face LLaVA checkpoint folder")
    return files


def peer_key(model_dir: Path, version: str, previous: dict | None = None) -> dict:
    """The export's key: sha256 over the checkpoint files' names, sizes and contents, the export
    arguments and the exporter's versions. Modification times are not part of it.

    Hashing a 7B checkpoint takes tens of seconds, so a file whose size and mtime_ns match the
    previous stamp's record reuses the content hash recorded there; any other file is re-hashed."""
    known = (previous or {}).get("files", {})
    files = {}
    for p in _key_files(model_dir):
        st = p.stat()
        rec = known.get(p.name)
        if rec and rec.get("size") == st.st_size and rec.get("mtime_ns") == st.st_mtime_ns and rec.get("sha256"):
            digest = rec["sha256"]
        else:
            digest = _sha256_file(p)
        files[p.name] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": digest}
    h = hashlib.sha256()
    for name, rec in files.items():
        h.update(f"{name}\0{rec['size']}\0{rec['sha256']}\n".encode())
    h.update(("\0".join(EXPORT_ARGS) + "\n" + version).encode())
    return {"key": h.hexdigest(), "exporter": version, "export_args": list(EXPORT_ARGS),
            "model_dir": str(model_dir), "files": files}


def _read_stamp(folder: Path) -> dict | None:
    try:
        return json.loads((folder / STAMP).read_text())
    except (OSError, ValueError):
        return None


# --------------------------------------------------------------------------- the export


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_ERROR_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Exit)\b.*:|^(error|ERROR|fatal|FATAL)\b")


def last_meaningful_line(text: str) -> str:
    """The line of a tool's log that says what went wrong: the last `SomethingError: ...` (a Python
    traceback's last line) or `error: ...`; else the last non-blank line. Progress-bar redraws
    (carriage returns) and colour codes are dropped."""
    lines = []
    for raw in _ANSI.sub("", text).splitlines():
        line = raw.split("\r")[-1].strip()
        if line:
            lines.append(line)
    for line in reversed(lines):
        if _ERROR_LINE.match(line):
            return line[:400]
    return lines[-1][:400] if lines else "(no output)"


def peer_folder(artifact_dir: Path) -> Path:
    return Path(artifact_dir) / PEERS_SUBDIR / OpenVinoGenAIPeer.name


def ensure_peer_export(artifact_dir: Path, model_dir: Path, log=print) -> Path:
    """The optimum-intel export of model_dir (fp32 weights) in artifact_dir/bench/peers/openvino_genai.

    Reused when its peer_key.json matches the checkpoint and the exporter found now; otherwise
    exported again into a temporary folder next to it and renamed into place, so an interrupted
    export never leaves a folder that looks complete. A failed export raises PeerUnavailable with
    the last meaningful line of its log (kept as openvino_genai.failed.log next to the folder)."""
    artifact_dir, model_dir = Path(artifact_dir), Path(model_dir).resolve()
    if not model_dir.is_dir():
        raise UserInputError(f"{model_dir} is not a folder", field="model",
                             fix="point it at a Hugging Face checkpoint folder")
    folder = peer_folder(artifact_dir)
    previous = _read_stamp(folder)
    exporter = find_exporter()
    if exporter is None and previous and all((folder / f).is_file() for f in REQUIRED_FILES):
        # No exporter here (the run needs none): an export of this very checkpoint is still good.
        if peer_key(model_dir, str(previous.get("exporter", "")), previous)["key"] == previous.get("key"):
            log(f"[bench] reusing the OpenVINO GenAI peer in {folder} (exported by {previous.get('exporter')}; "
                "no exporter found here to check for a newer one)")
            return folder
    exporter = exporter or require_exporter()
    key = peer_key(model_dir, exporter_version(exporter), previous)
    if previous and previous.get("key") == key["key"] and all((folder / f).is_file() for f in REQUIRED_FILES):
        if previous.get("files") != key["files"]:
            # Same content, new mtimes (a copy, a touch): record them so the next start skips hashing.
            (folder / STAMP).write_text(json.dumps(dict(previous, files=key["files"]), indent=2))
        return folder

    tmp = folder.with_name(f"{folder.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    failed_log = folder.with_name(f"{folder.name}.failed.log")
    log_path = tmp / EXPORT_LOG
    argv = [*exporter.argv, "export", "openvino", "--model", str(model_dir), *EXPORT_ARGS, str(tmp)]
    log(f"[bench] exporting the OpenVINO GenAI peer with optimum-intel into {folder} "
        "(about 90 s for a small stand-in, longer for real 7B weights)")
    t0 = time.perf_counter()
    try:
        with open(log_path, "w") as f:
            f.write(" ".join(argv) + "\n")
            f.flush()
            try:
                rc = subprocess.run(argv, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL).returncode
            except OSError as e:  # e.g. a bad interpreter line in the optimum-cli script
                raise PeerUnavailable(f"cannot run {argv[0]}: {e}", fix=f"run `{SETUP_FIX}`") from None
        text = log_path.read_text(errors="replace")
        missing = [n for n in REQUIRED_FILES if not (tmp / n).is_file()]
        if rc != 0 or missing:
            failed_log.write_text(text)
            why = (f"exit status {rc}: {last_meaningful_line(text)}" if rc != 0
                   else f"it wrote no {', '.join(missing)}")
            fix = (f"is openvino-tokenizers installed where {exporter.argv[0]} runs? (full log: {failed_log})"
                   if rc == 0 and any("tokenizer" in n for n in missing) else f"see the full log: {failed_log}")
            raise PeerUnavailable(f"the optimum-intel export of {model_dir} failed ({why})", fix=fix)
        (tmp / STAMP).write_text(json.dumps(key, indent=2))
        if folder.exists():
            shutil.rmtree(folder)
        tmp.rename(folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    failed_log.unlink(missing_ok=True)
    log(f"[bench] exported the OpenVINO GenAI peer in {time.perf_counter() - t0:.0f} s")
    return folder


# --------------------------------------------------------------------------- the peer


def _import_genai():
    try:
        import openvino
        import openvino_genai
    except ImportError as e:
        raise PeerUnavailable(f"openvino-genai is not installed ({e.name or e} missing)", fix=RUN_FIX) from None
    try:
        import openvino_tokenizers  # noqa: F401 - registers the tokenizer ops VLMPipeline's tokenizer IR uses
    except ImportError:
        raise PeerUnavailable("openvino-tokenizers is not installed", fix=RUN_FIX) from None
    return openvino, openvino_genai


def _resolved_precision(ov, config: dict) -> str:
    """The inference precision the CPU plugin uses for these properties.

    VLMPipeline exposes neither its compiled models nor their properties, so a one-op model is
    compiled with the same properties and its INFERENCE_PRECISION_HINT read back: the plugin
    resolves the hint the same way for every model (e.g. f16 becomes bf16 on a CPU without native
    f16, and the CPU's default, bf16 where it has AMX or avx512_bf16, applies when none is set)."""
    import numpy as np

    from vpexport.runtime.ov_session import _precision_name

    core = ov.Core()
    try:
        from openvino import opset13 as ops

        p = ops.parameter([1, 4], ov.Type.f32)
        model = ov.Model([ops.relu(p)], [p], "precision_probe")
        compiled = core.compile_model(model, "CPU", dict(config))
        compiled.create_infer_request().infer({0: np.zeros((1, 4), np.float32)})
        return _precision_name(compiled.get_property("INFERENCE_PRECISION_HINT"))
    except Exception:  # noqa: BLE001 - a probe failure must not stop the benchmark; fall back to the plugin default
        if "INFERENCE_PRECISION_HINT" in config:
            return str(config["INFERENCE_PRECISION_HINT"])
        return _precision_name(core.get_property("CPU", "INFERENCE_PRECISION_HINT"))


class OpenVinoGenAIPeer:
    """The checkpoint exported by optimum-intel, run by openvino_genai.VLMPipeline on the CPU.

    Attributes: folder (the export), precision (the inference precision used: `f32`/`bf16`),
    version (openvino_genai's), threads."""

    name = "openvino_genai"

    def __init__(self, artifact_dir: Path, model_dir: Path, threads: int, precision: str | None = None, log=print,
                 image_tag: str = "<image>"):
        ov, genai = _import_genai()
        if precision is not None and precision not in PRECISIONS:
            raise UserInputError(f"unknown peer precision {precision!r}", field="--precision",
                                 fix=f"use one of {', '.join(PRECISIONS)} (or none for OpenVINO's CPU default)")
        if precision is not None:
            caps = ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
            if {"f32": "FP32", "bf16": "BF16"}[precision] not in caps:
                # The plugin would silently fall back to f32; a bf16 figure must really be bf16.
                raise PeerUnavailable(f"this CPU has no native {precision} inference (OpenVINO offers "
                                      f"{', '.join(c for c in caps if c in ('FP32', 'BF16', 'FP16'))})",
                                      field="--precision", fix="use f32 or OpenVINO's default")
        self.folder = ensure_peer_export(artifact_dir, model_dir, log)
        config = {"INFERENCE_NUM_THREADS": int(threads)}
        if precision is not None:
            config["INFERENCE_PRECISION_HINT"] = precision
        self.threads = int(threads)
        self.version = genai.__version__
        self.precision = _resolved_precision(ov, config)
        t0 = time.perf_counter()
        try:
            self.pipe = genai.VLMPipeline(str(self.folder), "CPU", **config)
        except RuntimeError as e:
            raise PeerUnavailable(f"openvino_genai cannot load {self.folder}: {last_meaningful_line(str(e))}",
                                  fix=f"delete {self.folder} to re-export it") from None
        self.load_s = time.perf_counter() - t0
        self.image_tag = image_tag
        self._ov = ov
        self._prompt_lengths: dict[str, int] = {}

    def run_once(self, image, prompt: str, decode_steps: int, pruning_ratio: int = 0) -> dict:
        """One request: `prompt` is the raw prompt with the model's own image tag (`image_tag`: LLaVA's
        `<image>`, Qwen's `<|vision_start|><|image_pad|><|vision_end|>`; no chat template applied),
        `decode_steps + 1` new tokens (ignore_eos), image a PIL image; pruning_ratio is CDPruner's
        integer percentage of visual tokens to drop (0: none).

        Times are OpenVINO GenAI's own (ms): ttft_ms from the generate call to the first token
        (image preprocessing, vision encoder and prefill included), decode_ms_per_token the mean
        of the later tokens, prepare_embeddings_ms the image + text embedding part of ttft;
        wall_ms is measured here around generate. The pipeline keeps its KV cache between calls
        and reuses the longest prefix shared with the previous request (finish_chat does not clear
        it): the same image with a new question skips the image's prefill, so timed repetitions
        must differ in the image, not only in the question. input_tokens counts the prompt as the
        LLM saw it (after CDPruner's pruning); visual_tokens is the image's part of it: input_tokens
        less the prompt's own tokens, whose one image tag token the pipeline expanded."""
        import numpy as np

        if self.image_tag not in prompt:
            raise UserInputError(f"the peer's prompt has no {self.image_tag} tag", field="task.prompt",
                                 fix="put <image> in the recipe's prompt")
        if not 0 <= int(pruning_ratio) <= 99:
            raise UserInputError(f"pruning_ratio {pruning_ratio} is outside 0-99", field="pruning_ratio",
                                 fix="give an integer percentage from 0 (no pruning) to 99")
        cfg = self.pipe.get_generation_config()
        cfg.apply_chat_template = False
        cfg.ignore_eos = True
        cfg.max_new_tokens = int(decode_steps) + 1
        cfg.pruning_ratio = int(pruning_ratio)
        pixels = np.ascontiguousarray(np.asarray(image.convert("RGB"), dtype=np.uint8)[None])  # NHWC
        t0 = time.perf_counter()
        result = self.pipe.generate(prompt, images=[self._ov.Tensor(pixels)], generation_config=cfg)
        wall_ms = (time.perf_counter() - t0) * 1e3
        m = result.perf_metrics
        prepare = getattr(m, "get_prepare_embeddings_duration", None)
        tpot = float(m.get_tpot().mean)
        return {
            "ttft_ms": float(m.get_ttft().mean),
            # With one new token there is no decode step; OpenVINO then reports 0.
            "decode_ms_per_token": tpot if decode_steps > 0 and math.isfinite(tpot) else float("nan"),
            "prepare_embeddings_ms": float(prepare().mean) if prepare else float("nan"),
            "wall_ms": wall_ms,
            "input_tokens": int(m.get_num_input_tokens()),
            "visual_tokens": int(m.get_num_input_tokens()) - (self._prompt_tokens(prompt) - 1),
            "new_tokens": int(m.get_num_generated_tokens()),
        }

    def _prompt_tokens(self, prompt: str) -> int:
        """The prompt's own token count (its image tag one token), as the pipeline's tokenizer
        splits it; cached, since every repetition asks again."""
        if prompt not in self._prompt_lengths:
            self._prompt_lengths[prompt] = int(self.pipe.get_tokenizer().encode(prompt).input_ids.get_shape()[1])
        return self._prompt_lengths[prompt]


def cdpruner_ratio(visual_tokens: int, keep: int) -> int:
    """The integer pruning_ratio (1-99) whose kept count, round(visual_tokens * (1 - ratio/100)) as
    OpenVINO GenAI's CDPruner computes it, is nearest `keep` (the smaller ratio on a tie)."""
    if not 0 < keep < visual_tokens:
        raise UserInputError(f"CDPruner keep {keep} must be between 1 and {visual_tokens - 1}",
                             field="--cdpruner-keep", fix=f"give a count below the {visual_tokens} visual tokens")
    return min(range(1, 100), key=lambda r: (abs(round(visual_tokens * (1 - r / 100)) - keep), r))


# --------------------------------------------------------------------------- the exporter's venv


def _installed_version(dist: str) -> str | None:
    import importlib.metadata

    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _run_logged(argv: list[str], log_file, what: str, log_path: Path) -> None:
    log_file.write(f"$ {' '.join(argv)}\n")
    log_file.flush()
    rc = subprocess.run(argv, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL).returncode
    if rc != 0:
        log_file.flush()
        line = last_meaningful_line(log_path.read_text(errors="replace"))
        raise PeerUnavailable(f"{what} failed (exit status {rc}: {line})", fix=f"see the full log: {log_path}")


def setup_export_env(venv: Path | None = None, log=print) -> Path:
    """Create (or update) a virtual environment with optimum-intel for the peer export; return its optimum-cli.

    The venv sees this interpreter's site-packages (`--system-site-packages`), so the installed
    torch, openvino, openvino-tokenizers and openvino-genai are reused; a constraints file pins them
    to the installed versions (no second torch download, and the exported IR matches the runtime
    that loads it). optimum-intel 2.2 is installed with transformers 5.0.0 inside the venv (the newest
    its Qwen2-VL / Qwen2.5-VL export accepts).
    Its torchvision wheel is removed: with this CPU torch it breaks `transformers` imports
    ("operator torchvision::nms does not exist") and the LLaVA export does not need it."""
    venv = Path(venv).expanduser() if venv else default_venv()
    venv.parent.mkdir(parents=True, exist_ok=True)
    log_path = venv.with_name(venv.name + ".setup.log")
    python = venv / ("Scripts" if os.name == "nt" else "bin") / ("python.exe" if os.name == "nt" else "python")
    with open(log_path, "w") as f:
        if not python.is_file():
            log(f"[peers] creating the virtual environment {venv}")
            _run_logged([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], f,
                        "creating the virtual environment", log_path)
        pins = {d: v for d in PIN_PACKAGES if (v := _installed_version(d))}
        if "torch" not in pins:
            log("[peers] note: torch is not installed here, so pip will install one into the venv")
        constraints = venv / "constraints.txt"
        constraints.write_text("".join(f"{d}=={v}\n" for d, v in pins.items()))
        log(f"[peers] installing {OPTIMUM_INTEL_SPEC} with {EXPORT_TRANSFORMERS_SPEC} (keeping {', '.join(f'{d} {v}' for d, v in pins.items())}); "
            f"log: {log_path}")
        _run_logged([str(python), "-m", "pip", "install", "--disable-pip-version-check", "-c", str(constraints),
                     OPTIMUM_INTEL_SPEC, EXPORT_TRANSFORMERS_SPEC], f,
                    f"pip install {OPTIMUM_INTEL_SPEC} {EXPORT_TRANSFORMERS_SPEC}", log_path)
        # Not installed is fine (pip warns and exits 0); one in the system site-packages is left alone.
        _run_logged([str(python), "-m", "pip", "uninstall", "-y", "--disable-pip-version-check", "torchvision"], f,
                    "pip uninstall torchvision", log_path)
        cli = _venv_cli(venv)
        _run_logged([str(cli), "export", "openvino", "--help"], f, f"{cli} export openvino --help", log_path)
    log(f"[peers] ready: {cli}")
    return cli


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vpexport.bench.peers",
                                     description="Helpers for vpexport bench's peers.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("setup", help="create the virtual environment with optimum-intel for the OpenVINO GenAI "
                                     "peer's export and print its optimum-cli")
    p.add_argument("--venv", type=Path, default=None, help=f"where (default: {default_venv()})")
    args = parser.parse_args(argv)
    try:
        cli = setup_export_env(args.venv, log=lambda s: print(s, file=sys.stderr))
    except PeerUnavailable as e:
        print(f"error: {e.one_line()}", file=sys.stderr)
        return e.exit_code
    print(cli)
    return 0


if __name__ == "__main__":
    sys.exit(main())
