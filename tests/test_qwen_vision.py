"""QwenVisionGraph (vpexport/families/qwen_vision.py) against Hugging Face's Qwen2-VL and Qwen2.5-VL
vision towers, the processor's patch layout and resize, and the exported ONNX graph in ONNX Runtime.

Tiny random models built from configs (fp32). Their weights are redrawn at unit scale: the default
0.02 init leaves attention near uniform, where a wrong window mask or token order would hide
under the tolerance.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

from vpexport.families.qwen_vision import QwenVisionGraph, grid_for, hf_pixel_values, preprocess_config

PATCH, TEMPORAL, MERGE = 14, 2, 2
TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=300, max_position_embeddings=512, rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]},
            bos_token_id=1, eos_token_id=2)
TOKENS = dict(image_token_id=290, video_token_id=291, vision_start_token_id=288, vision_end_token_id=289)
VISION = {
    "qwen2": dict(depth=2, embed_dim=32, hidden_size=64, num_heads=4, mlp_ratio=2),
    # window_size 112 px = 4 merged tokens a side; block 1 full attention, blocks 0 and 2 windowed
    "qwen2.5": dict(depth=3, hidden_size=32, intermediate_size=48, num_heads=4, out_hidden_size=64,
                    window_size=112, fullatt_block_indexes=[1]),
}
# Qwen2.5: 224x336 = 8x12 merged tokens, 2x3 whole windows; 168x252 = 6x9, edge windows smaller
SIZES = {"qwen2": [(56, 56), (84, 112)], "qwen2.5": [(224, 336), (168, 252)]}


def _build(kind: str):
    from transformers import (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2VLConfig,
                              Qwen2VLForConditionalGeneration)

    config_cls, model_cls = {
        "qwen2": (Qwen2VLConfig, Qwen2VLForConditionalGeneration),
        "qwen2.5": (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration),
    }[kind]
    vision = dict(VISION[kind], patch_size=PATCH, spatial_merge_size=MERGE, temporal_patch_size=TEMPORAL, in_channels=3)
    torch.manual_seed(0)
    model = model_cls(config_cls(text_config=TEXT, vision_config=vision, **TOKENS)).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.model.visual.parameters():
            if p.dim() > 1:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p[0].numel()))
            else:  # biases and norm weights
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
    return model


@pytest.fixture(scope="module", params=["qwen2", "qwen2.5"])
def model(request):
    return request.param, _build(request.param)


def _hf_features(model, images: torch.Tensor) -> list[torch.Tensor]:
    """HF's merged visual tokens, one (N, hidden) tensor per image, from the processor's layout."""
    b, _, h, w = images.shape
    grid = torch.tensor([grid_for((h, w), PATCH, MERGE)] * b)
    with torch.no_grad():
        out = model.model.get_image_features(pixel_values=hf_pixel_values(images, PATCH, TEMPORAL, MERGE),
                                             image_grid_thw=grid)
    feats = out.pooler_output if hasattr(out, "pooler_output") else out
    if isinstance(feats, (list, tuple)):
        return list(feats)
    return list(feats.reshape(b, -1, feats.shape[-1]))


# --------------------------------------------------------------------------- vs the HF tower
@pytest.mark.parametrize("size_index", [0, 1])
def test_matches_hf_image_features(model, size_index):
    kind, m = model
    size = SIZES[kind][size_index]
    graph = QwenVisionGraph(m.model.visual, size).eval()
    assert graph.grid == (1, size[0] // PATCH, size[1] // PATCH)
    assert graph.tokens == (size[0] // 28) * (size[1] // 28)
    if kind == "qwen2.5":  # the sizes must exercise both attention kinds, and whole and padded windows
        assert graph.windows > 1 and set(graph.block_windowed) == {True, False}
        assert (graph.pad_index is not None) == (size_index == 1)
    gen = torch.Generator().manual_seed(size_index)
    for batch in (1, 3):
        x = torch.randn(batch, 3, *size, generator=gen)
        with torch.no_grad():
            ours = graph(x)
        ref = _hf_features(m, x)
        assert ours.shape == (batch, graph.tokens, m.config.text_config.hidden_size)
        assert len(ref) == batch
        for b in range(batch):
            torch.testing.assert_close(ours[b], ref[b], atol=1e-5, rtol=0)
    if kind == "qwen2.5":  # the window mask is far above the tolerance, so the test sees it
        graph.block_windowed = (False,) * len(graph.block_windowed)
        with torch.no_grad():
            assert (graph(x) - torch.stack(ref)).abs().max() > 1e-2


def test_weights_are_shared(model):
    _, m = model
    graph = QwenVisionGraph(m.model.visual, (56, 56))
    assert {id(p) for p in graph.parameters()} == {id(p) for p in m.model.visual.parameters()}
    own = sorted(n for n, b in graph.named_buffers() if not n.startswith("visual.") and b.is_floating_point())
    assert own == ["rope_cos", "rope_sin"]  # grid constants only, no weight copies


# --------------------------------------------------------------------------- grid and processor
def test_grid_for_rejects_sizes_off_the_merge_multiple():
    assert grid_for((224, 336), PATCH, MERGE) == (1, 16, 24)
    for bad in [(224, 330), (210, 224), (0, 28)]:
        with pytest.raises(ValueError, match="multiple of 28"):
            grid_for(bad, PATCH, MERGE)
    with pytest.raises(ValueError, match="multiple of 28"):
        QwenVisionGraph(_build("qwen2").model.visual, (56, 70))


def _random_images(sizes, seed: int):
    from PIL import Image

    rng = np.random.default_rng(seed)
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in sizes]
    images.append(Image.fromarray(rng.integers(0, 256, sizes[0], dtype=np.uint8)))  # grayscale "L"
    return images


@pytest.mark.parametrize("size", [(224, 336), (56, 84)])
def test_preprocessing_matches_hf_processor(size):
    from transformers import Qwen2VLImageProcessorPil

    from vpexport.runtime.preprocess import Preprocessor

    h, w = size
    # min_pixels = max_pixels = H*W: every image of aspect H:W resizes to exactly H x W
    ip = Qwen2VLImageProcessorPil(size={"shortest_edge": h * w, "longest_edge": h * w})
    images = _random_images([(h, w), (2 * h, 2 * w), (h // 2, w // 2), (h + 9, w - 11)], seed=h)
    hf = ip(images=images, return_tensors="np")
    assert hf["image_grid_thw"].tolist() == [list(grid_for(size, PATCH, MERGE))] * len(images)

    chw = Preprocessor(preprocess_config(ip, size))(images)
    assert chw.shape == (len(images), 3, h, w) and chw.dtype == np.float32
    flat = hf_pixel_values(chw, ip.patch_size, ip.temporal_patch_size, ip.merge_size)
    assert flat.dtype == np.float32
    np.testing.assert_array_equal(flat, hf["pixel_values"])  # bit-exact: same PIL resize, same arithmetic
    flat_t = hf_pixel_values(torch.from_numpy(chw), ip.patch_size, ip.temporal_patch_size, ip.merge_size)
    np.testing.assert_array_equal(flat_t.numpy(), flat)


def test_preprocess_config_checks_the_size():
    from transformers import Qwen2VLImageProcessorPil

    cfg = preprocess_config(Qwen2VLImageProcessorPil(), (224, 336))
    assert cfg["size"] == {"height": 224, "width": 336} and cfg["resample"] == 3 and not cfg["do_center_crop"]
    with pytest.raises(ValueError, match="multiple of 28"):
        preprocess_config(Qwen2VLImageProcessorPil(), (224, 300))


# --------------------------------------------------------------------------- ONNX
def test_onnx_export_matches_torch(model, tmp_path):
    """Exported as the project exports vision.onnx (TorchScript exporter, opset 18, dynamic batch),
    traced with batch 2 and run with batch 3."""
    import onnx
    import onnxruntime as ort

    kind, m = model
    size = SIZES[kind][1]
    graph = QwenVisionGraph(m.model.visual, size).eval()
    path = tmp_path / "vision.onnx"
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notices
        torch.onnx.export(graph, (torch.randn(2, 3, *size),), str(path), input_names=["pixel_values"],
                          output_names=["image_features"], opset_version=18, dynamo=False, do_constant_folding=True,
                          dynamic_axes={"pixel_values": {0: "batch"}, "image_features": {0: "batch"}})
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert not ops & {"Loop", "If", "NonZero", "Scan"}, ops

    x = torch.randn(3, 3, *size, generator=torch.Generator().manual_seed(7))
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = sess.run(None, {"pixel_values": x.numpy()})
    with torch.no_grad():
        want = graph(x).numpy()
    assert got.shape == (3, graph.tokens, m.config.text_config.hidden_size)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
