"""The torch-free runtime: preprocessing/tokenizer vs the HF processor, ORT generation vs
PrunedModel.generate, a subprocess where torch/transformers cannot import, and exit codes."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.artifact_helpers import QUESTIONS, build_checkpoint, cli, export_py, make_eval, torch_pruned, write_recipe

BLOCKER = '''
import sys
class _Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "transformers"):
            raise ImportError(f"{name} is blocked in this test")
        return None
sys.meta_path.insert(0, _Block())
'''


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("rt")
    ckpt = build_checkpoint(d / "mini")
    ev = make_eval(d / "data", n=4)
    rp = write_recipe(d / "himap.yaml", ckpt, "himap", eval_file=ev)
    export_py(rp, d / "art")
    return {"dir": d, "ckpt": ckpt, "recipe": rp, "art": d / "art", "eval": ev, "pipe": torch_pruned(ckpt, rp)}


def _images(n, seed=0):
    from PIL import Image

    rng = np.random.RandomState(seed)
    sizes = [(96, 96), (120, 80), (70, 150), (97, 301), (40, 30)]
    return [Image.fromarray(rng.randint(0, 255, (*sizes[i % len(sizes)], 3), dtype=np.uint8)) for i in range(n)]


def _blocked_env(tmp_path: Path) -> dict:
    site = tmp_path / "blocker"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(BLOCKER)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(site), str(Path(__file__).resolve().parents[1])])
    return env


# --------------------------------------------------------------------------- inputs
@pytest.mark.parametrize("mean_std", [None, "clip"])
def test_preprocess_matches_hf_clip_processor(mean_std):
    from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

    from vpexport.runtime.preprocess import processor_config as preprocess_config
    from vpexport.runtime.preprocess import Preprocessor
    from vpexport.testbed.model import build_image_processor

    kw = {"mean": list(OPENAI_CLIP_MEAN), "std": list(OPENAI_CLIP_STD)} if mean_std else {}
    hf = build_image_processor(96, **kw)
    ours = Preprocessor(json.loads(json.dumps(preprocess_config(hf))))
    imgs = _images(5)
    ref = hf(images=imgs, return_tensors="np")["pixel_values"]
    got = ours(imgs)
    assert got.shape == ref.shape == (5, 3, 96, 96) and got.dtype == np.float32
    np.testing.assert_array_equal(got, ref)  # the same bits: the value table uses the processor's arithmetic


def test_tokenizer_matches_processor(setup):
    from vpexport.runtime import ArtifactRuntime

    rt = ArtifactRuntime.open(setup["art"])
    pipe = setup["pipe"]
    imgs = _images(3)
    ids, mask, px = rt.encode(imgs, QUESTIONS[:3])
    tids, tmask, tpx = pipe.encode(imgs, QUESTIONS[:3])
    w = tids.shape[1]
    assert ids.shape[1] == pipe.prefix + 144 + 16  # padded mode: static text length
    np.testing.assert_array_equal(ids[:, :w], tids.numpy())
    np.testing.assert_array_equal(mask[:, :w], tmask.numpy())
    assert not mask[:, w:].any()
    assert rt.tokenizer.decode(tids[0, pipe.prefix + 144 :].tolist()) == pipe.processor.tokenizer.decode(
        tids[0, pipe.prefix + 144 :], skip_special_tokens=True).strip()


# --------------------------------------------------------------------------- generation
@pytest.mark.parametrize("batch", [1, 3])
def test_runtime_generation_matches_torch(setup, batch):
    from vpexport.runtime import ArtifactRuntime

    rt = ArtifactRuntime.open(setup["art"], threads=1)
    pm = setup["pipe"].pruned
    imgs, qs = _images(batch, seed=batch), QUESTIONS[:batch]
    ids, mask, px = rt.encode(imgs, qs)
    ref, ref_out = pm.generate(torch.from_numpy(ids), torch.from_numpy(mask), torch.from_numpy(px), 5, 2)
    got, out = rt.generate(ids, mask, px, 5)
    assert got == ref
    assert all(len(t) > 0 for t in got)
    for a, b in zip(out.kept, [k for k in ref_out.kept if k.shape[1]]):
        np.testing.assert_array_equal(a, b.numpy())
    # end to end: runtime tokenizer + preprocessing vs the HF processor + PyTorch
    answers = rt.answer(imgs, qs)
    torch_answers = setup["pipe"].answer(imgs, qs)
    assert [a["tokens"] for a in answers] == [a.tokens for a in torch_answers]
    assert [a["text"] for a in answers] == [a.text for a in torch_answers]


def test_per_sample_stopping(setup):
    """A sample that hits eos stops while the others go on (eos forced to a token one sample emits)."""
    from vpexport.runtime import ArtifactRuntime

    rt = ArtifactRuntime.open(setup["art"], threads=1)
    imgs, qs = _images(3, seed=3), QUESTIONS[:3]
    ids, mask, px = rt.encode(imgs, qs)
    free, _ = rt.generate(ids, mask, px, 5)
    pm = setup["pipe"].pruned
    eos = free[0][1]  # the 2nd token of sample 0 becomes "eos"
    rt.eos = eos
    got, _ = rt.generate(ids, mask, px, 5)
    ref, _ = pm.generate(torch.from_numpy(ids), torch.from_numpy(mask), torch.from_numpy(px), 5, eos)
    assert got == ref
    assert got[0] == free[0][: free[0].index(eos)]


# --------------------------------------------------------------------------- no torch
def test_runtime_runs_without_torch(setup, tmp_path):
    env = _blocked_env(tmp_path)
    probe = "import torch"
    import subprocess

    r = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True)
    assert r.returncode != 0 and "blocked" in r.stderr  # the blocker works
    code = (
        "import sys, json; from vpexport.runtime import ArtifactRuntime; import vpexport.commands.run;"
        f"rt = ArtifactRuntime.open({str(setup['art'])!r});"
        f"print(json.dumps(rt.answer([{str(setup['dir'] / 'data' / 'img0.png')!r}], [{QUESTIONS[0]!r}])));"
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules"
    )
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    from PIL import Image

    ref = setup["pipe"].answer([Image.open(setup["dir"] / "data" / "img0.png").convert("RGB")], [QUESTIONS[0]])[0]
    assert json.loads(r.stdout)[0]["tokens"] == ref.tokens
    # the CLI path too
    r = cli("run", setup["art"], "--image", setup["dir"] / "data" / "img0.png", "--prompt", QUESTIONS[0], "--json", env=env)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["answers"][0]["tokens"] == ref.tokens


# --------------------------------------------------------------------------- exit codes
def _copy(setup, tmp_path):
    art = tmp_path / "art"
    shutil.copytree(setup["art"], art)
    return art


def _run(art, tmp_path, image=None):
    img = image or (tmp_path / "ok.png")
    if image is None:
        from PIL import Image

        Image.new("RGB", (96, 96), (10, 20, 30)).save(img)
    return cli("run", art, "--image", img, "--prompt", "read the digits", env=_blocked_env(tmp_path))


def test_exit_2_on_bad_image(setup, tmp_path):
    bad = tmp_path / "notes.png"
    bad.write_text("this is not an image")
    r = _run(setup["art"], tmp_path, bad)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "not a readable image" in r.stderr
    folder = tmp_path / "images"
    folder.mkdir()
    r = _run(setup["art"], tmp_path, folder)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "is a directory" in r.stderr


@pytest.mark.parametrize("on", ["artifact", "recipe"])
def test_exit_2_on_more_images_than_batch_max_or_a_prompt_longer_than_the_export(setup, tmp_path, on):
    from PIL import Image

    target = setup["art"] if on == "artifact" else setup["recipe"]
    img = tmp_path / "ok.png"
    Image.new("RGB", (96, 96), (10, 20, 30)).save(img)
    def error_line(r):
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
        lines = [x for x in r.stderr.splitlines() if x.startswith("error:")]
        assert len(lines) == 1, r.stderr
        return lines[0]

    line = error_line(cli("run", target, *["--image", img] * 9, "--prompt", "read the digits"))
    assert "9 images" in line and "export.batch.max (8)" in line, line
    line = error_line(cli("run", target, "--image", img, "--prompt", " ".join(["digits"] * 40)))
    assert "tokens after the image" in line and "(16)" in line, line


@pytest.mark.parametrize("damage", ["truncate", "flip_byte", "missing", "missing_tokenizer"])
def test_exit_3_on_damaged_artifacts(setup, tmp_path, damage):
    art = _copy(setup, tmp_path)
    f = art / "onnx" / "decode.onnx"
    if damage == "truncate":
        f.write_bytes(f.read_bytes()[:1000])
    elif damage == "flip_byte":
        b = bytearray(f.read_bytes())
        b[len(b) // 2] ^= 0xFF
        f.write_bytes(bytes(b))
    elif damage == "missing":
        f.unlink()
    else:
        (art / "runtime" / "tokenizer.json").unlink()
    r = _run(art, tmp_path)
    assert r.returncode == 3, r.stderr
    line = r.stderr.strip()
    assert "\n" not in line and "Traceback" not in line
    assert {"truncate": "corrupt", "flip_byte": "does not match its manifest hash", "missing": "missing",
            "missing_tokenizer": "tokenizer.json is missing"}[damage] in line


def test_exit_3_on_corrupt_onnx_with_rehashed_manifest(setup, tmp_path):
    from vpexport.manifest import update_manifest

    art = _copy(setup, tmp_path)
    (art / "onnx" / "vision.onnx").write_bytes(b"\x08\x07garbage" * 10)
    update_manifest(art, None, None, files=["onnx/vision.onnx"])
    r = _run(art, tmp_path)
    assert r.returncode == 3 and "cannot load" in r.stderr


@pytest.mark.parametrize("key", ["num_layers", "max_new_tokens", "text_length", "batch_max"])
def test_exit_3_on_generation_json_missing_a_key(setup, tmp_path, key):
    from vpexport.manifest import update_manifest

    art = _copy(setup, tmp_path)
    f = art / "runtime" / "generation.json"
    gen = json.loads(f.read_text())
    del gen[key]
    f.write_text(json.dumps(gen))
    update_manifest(art, None, None, files=["runtime/generation.json"])  # rehashed: only the content is wrong
    r = _run(art, tmp_path)
    assert r.returncode == 3, r.stderr
    assert r.stderr.strip().count("\n") == 0 and "generation.json" in r.stderr and "incomplete" in r.stderr


def test_exit_3_without_manifest(setup, tmp_path):
    from vpexport.errors import ArtifactError
    from vpexport.manifest import read_manifest

    art = _copy(setup, tmp_path)
    (art / "manifest.json").write_text("{not json")
    with pytest.raises(ArtifactError, match="not valid JSON"):
        read_manifest(art)
    r = _run(art, tmp_path)
    assert r.returncode == 3 and "manifest.json" in r.stderr


# --------------------------------------------------------------------------- text buckets
@pytest.fixture(scope="module")
def bucketed(setup, tmp_path_factory):
    """The same model exported with a dynamic text axis and buckets [6, 9] (max 16 is the last)."""
    d = tmp_path_factory.mktemp("buckets")
    rp = write_recipe(d / "buckets.yaml", setup["ckpt"], "himap", eval_file=setup["eval"], mode="dynamic",
                      buckets=[6, 9])
    export_py(rp, d / "art")
    return d / "art"


def test_text_buckets_pad_to_the_smallest_bucket(setup, bucketed):
    from vpexport.runtime import ArtifactRuntime

    rt = ArtifactRuntime.open(bucketed, threads=1)
    head = rt.prefix + rt.visual
    widths = set()
    for q in QUESTIONS:
        ids, mask, _ = rt.encode(_images(1), [q])
        n = int(mask[0, head:].sum())
        widths.add(ids.shape[1] - head)
        assert ids.shape[1] - head == min(b for b in (6, 9, 16) if b >= n), q
    assert len(widths) >= 2  # the questions span more than one bucket
    # a batch runs at the bucket of its longest text; generation equals PyTorch's and the padded export's
    imgs, qs = _images(3, seed=5), QUESTIONS[:3]
    ids, mask, px = rt.encode(imgs, qs)
    ref, _ = setup["pipe"].pruned.generate(torch.from_numpy(ids), torch.from_numpy(mask), torch.from_numpy(px), 5, 2)
    got, _ = rt.generate(ids, mask, px, 5)
    assert got == ref
    padded = ArtifactRuntime.open(setup["art"], threads=1)
    assert [a["tokens"] for a in rt.answer(imgs, qs)] == [a["tokens"] for a in padded.answer(imgs, qs)]


def test_text_buckets_compile_one_shape_per_bucket_on_openvino(setup, bucketed):
    pytest.importorskip("openvino", reason="the openvino extra is not installed")
    from vpexport.runtime import ArtifactRuntime

    rt = ArtifactRuntime.open(bucketed, provider="openvino", threads=1, precision="f32")
    ref = ArtifactRuntime.open(setup["art"], threads=1)
    head = rt.prefix + rt.visual
    for q in QUESTIONS:
        a, b = rt.answer(_images(1, seed=7), [q]), ref.answer(_images(1, seed=7), [q])
        assert [x["tokens"] for x in a] == [x["tokens"] for x in b], q
    seqs = {key[0][1] for key in rt.graphs._compiled["prefill"]}  # input_ids (B, L) of every compiled shape
    assert seqs and {s - head for s in seqs} <= {6, 9, 16}


def test_openvino_bf16_keeps_the_caches_in_bf16_and_takes_f32_caches_too(setup):
    ov = pytest.importorskip("openvino", reason="the openvino extra is not installed")
    from vpexport.runtime import ArtifactRuntime
    from vpexport.runtime.kv_cache import KVCache
    from vpexport.runtime.ov_session import cpu_precisions

    if "bf16" not in cpu_precisions(ov.Core()):
        pytest.skip("this CPU has no native bf16 inference")
    rt = ArtifactRuntime.open(setup["art"], provider="openvino", threads=1, precision="bf16")
    assert rt.precision == "bf16" and rt.kv_dtype.name == "bfloat16"
    ids, mask, px = rt.encode(_images(2), QUESTIONS[:2])
    out = rt.prefill(ids, mask, rt.encode_image(px))
    assert {k.dtype.name for kv in out.kv for k in kv} == {"bfloat16"} and out.logits.dtype == np.float32
    cache = rt.start_cache(out, mask, 2)
    assert {b.dtype.name for kv in cache.buffers for b in kv} == {"bfloat16"}
    # The same caches handed in as f32 (validation feeds PyTorch's) are converted on the way in:
    # the step reads the same numbers, so it returns the same logits and the same new key/value.
    f32 = KVCache([[k.astype(np.float32), v.astype(np.float32)] for k, v in out.kv], mask[:, rt.prefix + rt.visual :], 2,
                  dtype=np.float32)
    nxt = out.logits.argmax(-1).astype(np.int64)[:, None]
    pos = (rt.prefix + rt.visual + out.text_len).astype(np.int64)[:, None]
    a = rt.decode(nxt, pos, cache)
    b = rt.decode(nxt, pos, f32)
    np.testing.assert_array_equal(a, b)
    for (ka, va), (kb, vb) in zip(cache.views(), f32.views()):
        np.testing.assert_array_equal(ka[:, :, -1:].astype(np.float32), kb[:, :, -1:])
        np.testing.assert_array_equal(va[:, :, -1:].astype(np.float32), vb[:, :, -1:])
    # A second step on the f32 caches, written in place since: converted again, not the stale copy.
    a2, b2 = rt.decode(nxt, pos + 1, cache), rt.decode(nxt, pos + 1, f32)
    np.testing.assert_array_equal(a2, b2)


@pytest.mark.parametrize("edit,msg", [
    (lambda m: m.update(format=99), "has format 99; this vpexport reads format 1"),
    (lambda m: m.pop("format"), "has format None"),
    (lambda m: m["files"].update({"onnx/vision.onnx": "abc"}), "files['onnx/vision.onnx'] is not a {size, sha256} entry"),
    (lambda m: m.pop("schedule"), "has no valid schedule"),
    (lambda m: m.update(schedule="L2:72"), "has no valid schedule"),
    (lambda m: m["schedule"]["points"][0].update(keep=1), "not the one the graphs were exported with"),
    (lambda m: m.update(graphs="remote"), "graphs is 'remote'"),
])
def test_exit_3_on_manifest_of_unknown_format_or_bad_file_entry(setup, tmp_path, edit, msg):
    art = _copy(setup, tmp_path)
    f = art / "manifest.json"
    m = json.loads(f.read_text())
    edit(m)
    f.write_text(json.dumps(m))
    r = _run(art, tmp_path)
    assert r.returncode == 3 and r.stderr.strip().count("\n") == 0 and msg in r.stderr, r.stderr
    assert json.loads(f.read_text()) == m  # refused, not rewritten


def test_openvino_merges_parallel_projections_and_matches_onnx_runtime(setup):
    pytest.importorskip("openvino", reason="the openvino extra is not installed")
    from vpexport.runtime import ArtifactRuntime

    rt = ArtifactRuntime.open(setup["art"], provider="openvino", threads=1, precision="f32")
    ref = ArtifactRuntime.open(setup["art"], threads=1)
    imgs, qs = _images(2, seed=11), QUESTIONS[:2]
    ids, mask, px = rt.encode(imgs, qs)
    a, b = rt.prefill(ids, mask, rt.encode_image(px)), ref.prefill(ids, mask, ref.encode_image(px))
    layers = rt.num_layers
    # q/k/v (2 merged away) and the gated MLP's gate/up (1) in every layer, in both decoder graphs
    assert rt.graphs.merged["prefill"] >= 3 * layers
    np.testing.assert_allclose(a.logits, b.logits, atol=1e-4, rtol=1e-3)
    for x, y in zip(a.kept, b.kept):
        np.testing.assert_array_equal(x, y)
    ca, cb = rt.start_cache(a, mask, 3), ref.start_cache(b, mask, 3)
    nxt = a.logits.argmax(-1).astype(np.int64)[:, None]
    pos = (rt.prefix + rt.visual + a.text_len).astype(np.int64)[:, None]
    for step in range(3):
        la, lb = rt.decode(nxt, pos + step, ca), ref.decode(nxt, pos + step, cb)
        np.testing.assert_allclose(la, lb, atol=1e-4, rtol=1e-3)
    assert rt.graphs.merged["decode"] >= 3 * layers
    for (ka, va), (kb, vb) in zip(ca.views(), cb.views()):
        np.testing.assert_allclose(ka, kb, atol=1e-4, rtol=1e-3)
        np.testing.assert_allclose(va, vb, atol=1e-4, rtol=1e-3)
