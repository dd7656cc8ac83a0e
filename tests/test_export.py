"""ONNX export of the rewritten model: ORT outputs vs PyTorch (logits, KV, kept), decode, I/O, manifest."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tests.artifact_helpers import POINTS, batch_inputs, build_checkpoint, cli, export_py, ort, torch_pruned, write_recipe


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return build_checkpoint(tmp_path_factory.mktemp("ckpt") / "mini")


@pytest.fixture(scope="module")
def exported(ckpt, tmp_path_factory):
    cache = {}

    def get(method):
        if method not in cache:
            d = tmp_path_factory.mktemp(f"exp-{method}")
            rp = write_recipe(d / f"{method}.yaml", ckpt, method)
            export_py(rp, d / "art")
            cache[method] = (rp, d / "art", torch_pruned(ckpt, rp))
        return cache[method]

    return get


# --------------------------------------------------------------------------- tests
@pytest.mark.parametrize("method", list(POINTS))
def test_prefill_matches_torch(exported, method):
    rp, art, pipe = exported(method)
    pm = pipe.pruned
    ids, mask, px = batch_inputs(pipe)
    with torch.no_grad():
        feats = pm.encode_image(px)
        ref = pm.prefill(ids, mask, feats)
    vis = ort(art / "onnx" / "vision.onnx").run(None, {"pixel_values": px.numpy()})[0]
    assert np.abs(vis - feats.numpy()).max() < 1e-4
    sess = ort(art / "onnx" / "prefill.onnx")
    names = [o.name for o in sess.get_outputs()]
    out = dict(zip(names, sess.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy(),
                                          "image_features": feats.numpy()})))
    assert np.abs(out["logits"] - ref.logits.numpy()).max() < 1e-4
    for i, (k, v) in enumerate(ref.kv):
        assert out[f"present.{i}.key"].shape == tuple(k.shape)
        assert np.abs(out[f"present.{i}.key"] - k.numpy()).max() < 1e-4
        assert np.abs(out[f"present.{i}.value"] - v.numpy()).max() < 1e-4
    kept = [n for n in names if n.startswith("kept.")]
    ref_kept = [k for k, pt in zip(ref.kept, pm.schedule.points) if pt.rule != "drop_all"]
    assert len(names) == 1 + 2 * pm.num_layers + len(kept)
    assert len(kept) == len(ref_kept) == {"fastv": 1, "himap": 2, "visipruner": 1, "dart": 1, "divprune": 1, "cdpruner": 1, "dart_projector": 1}[method]
    for j, k in enumerate(ref_kept):
        assert out[f"kept.{j}"].dtype == np.int64
        np.testing.assert_array_equal(out[f"kept.{j}"], k.numpy())
    # the three rows of the batch chose different tokens (the graph does not broadcast one choice)
    assert not np.array_equal(out["kept.0"][0], out["kept.0"][1])


@pytest.mark.parametrize("method", list(POINTS))
def test_decode_step_matches_torch(exported, method):
    rp, art, pipe = exported(method)
    pm = pipe.pruned
    ids, mask, px = batch_inputs(pipe, seed=1)
    p, n = pm.prefix, pm.visual_tokens
    with torch.no_grad():
        ref = pm.prefill(ids, mask, pm.encode_image(px))
        nxt = ref.logits.argmax(-1)[:, None]
        pos = (p + n + ref.text_len)[:, None]
        tm = torch.cat([mask[:, p + n :], torch.ones(3, 1, dtype=torch.long)], 1)
        logits, kv = pm.decode(nxt, pos, tm, ref.kv)
        nxt2 = logits.argmax(-1)[:, None]
        tm2 = torch.cat([tm, torch.ones(3, 1, dtype=torch.long)], 1)
        logits2, kv2 = pm.decode(nxt2, pos + 1, tm2, kv)
    sess = ort(art / "onnx" / "decode.onnx")
    names = [o.name for o in sess.get_outputs()]
    assert names == ["logits", *[f"new.{i}.{w}" for i in range(pm.num_layers) for w in ("key", "value")]]
    from vpexport.runtime.kv_cache import KVCache

    # fixed-capacity caches with room for two steps; the graph reads them, returns only the new slot
    cache = KVCache([[k.numpy(), v.numpy()] for k, v in ref.kv], mask[:, p + n :].numpy(), steps=2)
    before = [[k.copy(), v.copy()] for k, v in cache.buffers]

    def step(tok, position):
        o = dict(zip(names, sess.run(None, {"input_ids": tok.numpy(), "position_ids": position.numpy(), **cache.feeds()})))
        for i in range(pm.num_layers):
            assert o[f"new.{i}.key"].shape == (3, pm.num_kv_heads, 1, pm.head_dim)
        cache.append(o)
        return o["logits"]

    ol = step(nxt, pos)
    assert np.abs(ol - logits.numpy()).max() < 1e-4
    for (a, b), (c, d), (k0, v0) in zip(cache.views(), kv, before):
        assert a.shape == tuple(c.shape) and np.abs(a - c.numpy()).max() < 1e-4 and np.abs(b - d.numpy()).max() < 1e-4
        # the prefill part of the buffers is untouched by the step
        np.testing.assert_array_equal(a[:, :, :-1], k0[:, :, : a.shape[2] - 1])
    # a second step on the runtime's own caches (one more slot filled)
    ol2 = step(nxt2, pos + 1)
    assert np.abs(ol2 - logits2.numpy()).max() < 1e-4
    for (a, _), (c, _) in zip(cache.views(), kv2):
        assert np.abs(a - c.numpy()).max() < 1e-4
    assert cache.free == 0


def test_graph_io_and_static_shapes(exported):
    import onnx

    rp, art, pipe = exported("himap")
    pm = pipe.pruned
    p, n, T = pm.prefix, pm.visual_tokens, 16
    man = json.loads((art / "manifest.json").read_text())
    g = man["export"]["graphs"]
    assert [i["name"] for i in g["vision"]["inputs"]] == ["pixel_values"]
    assert g["vision"]["outputs"][0]["shape"] == ["batch", n, 128]
    assert [i["name"] for i in g["prefill"]["inputs"]] == ["input_ids", "attention_mask", "image_features"]
    assert g["prefill"]["inputs"][0]["shape"] == ["batch", p + n + T]
    outs = {o["name"]: o["shape"] for o in g["prefill"]["outputs"]}
    assert outs["logits"][0] == "batch"
    for i, vis in enumerate(pm.visual_per_layer):
        assert outs[f"present.{i}.key"] == ["batch", 4, p + vis + T, 32]
    assert pm.visual_per_layer == [144, 144, 72, 72, 72, 18, 18, 18]
    assert outs["kept.0"] == ["batch", 72] and outs["kept.1"] == ["batch", 18]
    dec = [i["name"] for i in g["decode"]["inputs"]]
    assert dec[:3] == ["input_ids", "position_ids", "text_mask"] and dec[3:5] == ["past.0.key", "past.0.value"]
    assert len(dec) == 3 + 2 * 8
    # TopK with a constant k lives inside the prefill graph (selection + the sort back into order)
    from onnx import numpy_helper

    m = onnx.load(str(art / "onnx" / "prefill.onnx"))
    consts = {i.name: numpy_helper.to_array(i) for i in m.graph.initializer}
    for node in m.graph.node:
        if node.op_type == "Constant":
            consts[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    ks = sorted(int(consts[nd.input[1]].reshape(-1)[0]) for nd in m.graph.node if nd.op_type == "TopK")
    assert ks == [18, 18, 72, 72]
    assert not any(node.op_type == "NonZero" for node in m.graph.node)


def test_manifest_assets_and_checker(exported):
    import onnx

    from vpexport.manifest import read_manifest, sha256_file

    rp, art, pipe = exported("visipruner")
    man = read_manifest(art)
    for f in ["onnx/vision.onnx", "onnx/prefill.onnx", "onnx/decode.onnx", "runtime/tokenizer.json",
              "runtime/preprocess.json", "runtime/generation.json", "runtime/special_tokens.json", "recipe.resolved.yaml"]:
        assert man["files"][f]["sha256"] == sha256_file(art / f)
    assert man["packages"]["onnx"] == onnx.__version__
    assert man["schedule"]["method"] == "visipruner" and man["recipe"]["pruning"]["method"] == "visipruner"
    assert man["export"]["precision"] == "fp32" and man["export"]["opset"] == 18
    gen = json.loads((art / "runtime" / "generation.json").read_text())
    assert gen["visual_per_layer"] == [144, 144, 144, 10, 10, 10, 0, 0]
    assert gen["kv_static_len"] == [gen["prefix"] + v for v in gen["visual_per_layer"]]
    assert gen["eos_token_id"] == pipe.eos_token_id and gen["image_token_id"] == pipe.pruned.image_token_id
    assert gen["num_kv_heads"] == 4 and gen["head_dim"] == 32 and gen["text_length"] == {"mode": "padded", "max": 16}
    pre = json.loads((art / "runtime" / "preprocess.json").read_text())
    assert pre["resample"] == 3 and pre["crop_size"] == {"height": 96, "width": 96}
    for f in ("vision", "prefill", "decode"):
        onnx.checker.check_model(str(art / "onnx" / f"{f}.onnx"), full_check=True)
    # drop_all point: no kept output for it
    names = [o.name for o in ort(art / "onnx" / "prefill.onnx").get_outputs()]
    assert [n for n in names if n.startswith("kept.")] == ["kept.0"] and len(names) == 1 + 16 + 1
    assert not list(art.glob(".export-*"))


def test_dynamic_text_mode(ckpt, tmp_path):
    rp = write_recipe(tmp_path / "dyn.yaml", ckpt, "fastv", mode="dynamic", text_max=16)
    export_py(rp, tmp_path / "art")
    pipe = torch_pruned(ckpt, rp)
    pm = pipe.pruned
    sess = ort(tmp_path / "art" / "onnx" / "prefill.onnx")
    assert sess.get_inputs()[0].shape == ["batch", "sequence"]
    for lens, T in (((4, 2), 4), ((11, 6, 9), 11)):
        ids, mask, px = batch_inputs(pipe, text_lens=lens, text_max=T)
        with torch.no_grad():
            feats = pm.encode_image(px)
            ref = pm.prefill(ids, mask, feats)
        out = sess.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy(), "image_features": feats.numpy()})
        assert np.abs(out[0] - ref.logits.numpy()).max() < 1e-4
        assert out[1].shape[2] == pm.prefix + pm.visual_tokens + T
        np.testing.assert_array_equal(out[-1], ref.kept[0].numpy())


def test_fp16_export(ckpt, tmp_path):
    import onnx

    rp = write_recipe(tmp_path / "half.yaml", ckpt, "fastv", precision="fp16")
    export_py(rp, tmp_path / "art")
    for graph in ("vision", "prefill", "decode"):
        m = onnx.load(str(tmp_path / "art" / "onnx" / f"{graph}.onnx"))
        big = [i for i in m.graph.initializer if len(i.dims) == 2]
        # every weight matrix in fp16, o_proj included (with the old bool-mask SDPA the exporter's fp32
        # attention core kept each o_proj in fp32), and every MatMul runs on fp16 inputs
        assert big and all(i.data_type == onnx.TensorProto.FLOAT16 for i in big), (graph, [i.name for i in big if i.data_type != onnx.TensorProto.FLOAT16])
        inferred = onnx.shape_inference.infer_shapes(m).graph
        types = {v.name: v.type.tensor_type.elem_type for v in [*inferred.value_info, *inferred.input, *inferred.output]}
        types.update({i.name: i.data_type for i in m.graph.initializer})
        matmuls = [n for n in inferred.node if n.op_type == "MatMul"]
        assert matmuls and all(types.get(x) == onnx.TensorProto.FLOAT16 for n in matmuls for x in n.input), graph
    from vpexport.model.loading import load_model
    from vpexport.model.pruned import PrunedModel
    from vpexport.recipe import load_recipe

    r = load_recipe(rp)
    model, _ = load_model(ckpt, "float16")
    pm = PrunedModel(model, r.schedule(), prefix=torch_pruned(ckpt, rp).prefix)
    ids, mask, px = batch_inputs(torch_pruned(ckpt, rp))
    with torch.no_grad():
        feats = pm.encode_image(px)
        ref = pm.prefill(ids, mask, feats)
    out = ort(tmp_path / "art" / "onnx" / "prefill.onnx").run(
        None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy(), "image_features": feats.numpy()})
    assert out[0].dtype == np.float16
    assert np.abs(out[0].astype(np.float32) - ref.logits.float().numpy()).max() < 5e-2


def test_failed_export_leaves_previous_artifacts(exported, tmp_path, monkeypatch):
    import shutil

    import vpexport.export.onnx_export as ox
    from vpexport.errors import ArtifactError
    from vpexport.manifest import read_manifest

    rp, art0, _ = exported("fastv")
    art = tmp_path / "art"
    shutil.copytree(art0, art)
    before = {f: (art / f).read_bytes() for f in ("onnx/prefill.onnx", "manifest.json")}
    real = ox._finalize_onnx

    def boom(raw, dest, spec=None):
        if dest.name == "decode.onnx":
            raise ArtifactError("simulated checker failure")
        return real(raw, dest, spec)

    monkeypatch.setattr(ox, "_finalize_onnx", boom)
    with pytest.raises(ArtifactError):
        export_py(rp, art)
    assert {f: (art / f).read_bytes() for f in before} == before
    assert not list(art.glob(".export-*"))
    read_manifest(art)  # still consistent


def test_export_cli_summary(ckpt, tmp_path):
    rp = write_recipe(tmp_path / "c.yaml", ckpt, "fastv")
    r = cli("export", rp, "--out", tmp_path / "art")
    assert r.returncode == 0, r.stderr
    assert "[export] prefill.onnx" in r.stderr
    assert f"next: vpexport validate {tmp_path / 'art'}" in r.stdout
    assert "onnx/prefill.onnx" in r.stdout and "MB" in r.stdout
    assert (tmp_path / "art" / "recipe.resolved.yaml").is_file()


def test_external_data_over_the_limit(exported, tmp_path, monkeypatch):
    """Graphs over the 2 GB limit get external data (the limit lowered here to exercise the path):
    the vision graph its own .data file, prefill and decode the shared weights.bin, which replaces
    their .data files."""
    import vpexport.export.onnx_export as ox
    from vpexport.manifest import read_manifest
    from vpexport.runtime import ArtifactRuntime

    rp, art0, pipe = exported("fastv")
    monkeypatch.setattr(ox, "TWO_GB", 1000)
    export_py(rp, tmp_path / "art")
    man = read_manifest(tmp_path / "art")
    assert "onnx/vision.onnx.data" in man["files"] and "onnx/weights.bin" in man["files"]
    assert not [f for f in man["files"] if f in ("onnx/prefill.onnx.data", "onnx/decode.onnx.data")]
    assert not (tmp_path / "art" / "onnx" / "prefill.onnx.data").exists()
    for g in ("vision", "prefill", "decode"):
        assert (tmp_path / "art" / "onnx" / f"{g}.onnx").stat().st_size < 1_000_000
    ids, mask, px = batch_inputs(pipe)
    got, _ = ArtifactRuntime.open(tmp_path / "art", threads=1).generate(ids.numpy(), mask.numpy(), px.numpy(), 4)
    ref, _ = pipe.pruned.generate(ids, mask, px, 4, pipe.eos_token_id)
    assert got == ref


def test_run_json_kept_is_the_same_on_both_paths(exported, tmp_path):
    """`run --json`'s `kept` lists the points that keep tokens on the recipe path as on the artifact
    path (the drop_all point of this schedule has no entry on either)."""
    from PIL import Image

    rp, art, _ = exported("visipruner")
    img = tmp_path / "x.png"
    Image.fromarray(np.random.RandomState(3).randint(0, 255, (90, 110, 3), dtype=np.uint8)).save(img)
    got = {}
    for target in (rp, art):
        r = cli("run", target, "--image", img, "--prompt", "what digits?", "--json")
        assert r.returncode == 0, r.stderr
        got[target] = json.loads(r.stdout)["answers"][0]
    a, b = got[rp], got[art]
    assert len(a["kept"]) == len(b["kept"]) == 1 and len(a["kept"][0]) == 10
    assert a["kept"] == b["kept"] and a["tokens"] == b["tokens"]
