"""Where the PyTorch side runs: `model.device` / `--device` (auto, cpu, cuda, cuda:N), the batch
sized to a GPU's memory, the device recorded by eval / calibrate / validate, and `bench RECIPE`.

CPU tests run everywhere; `-m gpu` tests need a CUDA GPU (PyTorch with CUDA; no TensorRT) and
compare the GPU with the CPU on the same tiny checkpoint."""

from __future__ import annotations

import json

import pytest
import torch

from tests.artifact_helpers import checkpoint_and_eval, cli, export_py, write_recipe
from vpexport.errors import RuntimeUnavailable, UserInputError
from vpexport.model import device as dev

HAS_CUDA = torch.cuda.is_available()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return checkpoint_and_eval(tmp_path_factory.mktemp("device"), n=6)


def _recipe(tiny, method="himap", device=None):
    d, ckpt, ev = tiny
    p = write_recipe(d / f"r_{method}_{device or 'none'}.yaml", ckpt, method, ev)
    if device is not None:
        p.write_text(p.read_text().replace("dtype: float32}", f"dtype: float32, device: {device}}}"))
    return p


# --------------------------------------------------------------------------- spelling and resolution
@pytest.mark.parametrize("spec,want", [("auto", "auto"), ("CPU", "cpu"), ("cuda", "cuda"), (" cuda:1 ", "cuda:1")])
def test_spellings_accepted(spec, want):
    assert dev.check_spelling(spec) == want


@pytest.mark.parametrize("spec", ["gpu", "cuda:", "cuda:x", "mps", ""])
def test_other_spellings_refused_with_the_field_and_the_fix(spec):
    with pytest.raises(UserInputError) as e:
        dev.check_spelling(spec, "--device")
    assert e.value.exit_code == 2
    line = e.value.one_line()
    assert line.startswith("--device: ") and "cuda:N" in line and "\n" not in line


def test_recipe_refuses_a_misspelt_device(tiny):
    from vpexport.errors import RecipeError
    from vpexport.recipe import load_recipe

    with pytest.raises(RecipeError) as e:
        load_recipe(_recipe(tiny, device="gpu"))
    assert "model.device" in e.value.one_line() and "cuda:N" in e.value.one_line()
    assert load_recipe(_recipe(tiny, device="CUDA:0")).model.device == "cuda:0"
    assert load_recipe(_recipe(tiny)).model.device == "auto"  # the default


def test_cpu_resolves_to_the_cpu():
    d = dev.resolve("cpu")
    assert d.torch == "cpu" and not d.is_cuda and d.record()["asked"] == "cpu"


@pytest.mark.skipif(HAS_CUDA, reason="a CUDA GPU is visible: auto picks it (the gpu tests cover that)")
def test_auto_falls_back_to_the_cpu_and_cuda_is_refused():
    assert dev.resolve("auto").torch == "cpu"
    for spec in ("cuda", "cuda:0", "cuda:3"):
        with pytest.raises(RuntimeUnavailable) as e:
            dev.resolve(spec, "--device")
        assert e.value.exit_code == 5 and e.value.one_line().startswith("--device: ")


def test_batch_sized_to_free_memory(monkeypatch):
    cpu = dev.Device("cpu", "cpu", "test")
    gpu = dev.Device("cuda:0", "cuda", "test")
    assert dev.batch_size(cpu, None, 10**9) == dev.CPU_BATCH
    assert dev.batch_size(cpu, 5, 10**9) == 5
    monkeypatch.setattr(dev, "free_bytes", lambda d: 40 << 30)
    assert dev.batch_size(gpu, None, 1 << 30) == 20  # half of 40 GiB at 1 GiB a sample
    assert dev.batch_size(gpu, None, 1 << 20) == dev.MAX_BATCH
    assert dev.batch_size(gpu, None, 100 << 30) == 1
    assert dev.batch_size(gpu, 3, 1 << 30) == 3


def test_transient_bytes_grow_with_the_sequence():
    from vpexport.accounting.memory import prefill_transient_bytes
    from vpexport.arch.layout import PromptLayout
    from vpexport.families import BUILTIN_ARCHS

    arch = BUILTIN_ARCHS["llava-1.5-7b"].spec()
    short = prefill_transient_bytes(arch, PromptLayout(35, 576, 16), "float16")
    long = prefill_transient_bytes(arch, PromptLayout(35, 576, 400), "float16")
    # 32 heads x 627^2 f32 scores (x2) dominate; a 7B sample is a few hundred MB in a pass
    assert 2 * 32 * 627 * 627 * 4 < short < long < 2 << 30


def test_stage_keys_do_not_depend_on_the_device(tiny):
    from vpexport.build import _section
    from vpexport.recipe import load_recipe

    a, b = load_recipe(_recipe(tiny, device="cpu")), load_recipe(_recipe(tiny, device="cuda:1"))
    assert _section(a, "model") == _section(b, "model")
    assert "device" not in _section(a, "model") and a.resolved()["model"]["device"] == "cpu"


# --------------------------------------------------------------------------- the commands (CPU)
def test_eval_records_the_device(tiny):
    r = cli("eval", _recipe(tiny), "--device", "cpu", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["torch"]["device"] == "cpu" and out["torch"]["asked"] == "cpu"
    assert out["torch"]["batch_size"] == dev.CPU_BATCH and out["samples"] == 6
    assert "[torch] ckpt in float32 on cpu" in r.stderr


def test_bad_device_option_is_one_line_exit_2(tiny):
    r = cli("eval", _recipe(tiny), "--device", "gpu")
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0
    assert "--device" in r.stderr and "cuda:N" in r.stderr


@pytest.mark.skipif(HAS_CUDA, reason="a CUDA GPU is visible")
def test_cuda_without_a_gpu_is_one_line_exit_5(tiny):
    r = cli("run", _recipe(tiny), "--device", "cuda", "--image", str(tiny[2].parent / "img0.png"), "--prompt", "x")
    assert r.returncode == 5, r.stderr
    assert r.stderr.strip().count("\n") == 0 and "sees no CUDA GPU" in r.stderr


def test_device_on_an_artifact_folder_is_refused(tiny, tmp_path):
    art = tmp_path / "art"
    export_py(_recipe(tiny), art)
    r = cli("run", art, "--device", "cpu", "--image", str(tiny[2].parent / "img0.png"), "--prompt", "x")
    assert r.returncode == 2 and "--provider" in r.stderr
    r = cli("bench", art, "--device", "cpu", "--reps", "1")
    assert r.returncode == 2 and "--device" in r.stderr


def test_bench_recipe_times_pruned_against_unpruned_pytorch(tiny, tmp_path):
    save = tmp_path / "b.json"
    r = cli("bench", _recipe(tiny), "--device", "cpu", "--reps", "2", "--batch", "2", "--json", "--save", save)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out == json.loads(save.read_text())
    assert out["runtime"] == "pytorch" and out["torch"]["device"] == "cpu" and out["batch"] == 2
    assert 0 < out["flops"]["ratio"] < 1  # HiMAP's two points
    for v in ("pruned", "unpruned"):
        assert len(out["raw_ms"][v]["prefill"]) == 2 and out[v]["prefill"] > 0 and out[v]["vision"] > 0
    assert out["prefill"]["latency_ratio"] == pytest.approx(out["pruned"]["prefill"] / out["unpruned"]["prefill"],
                                                            rel=1e-3)
    r = cli("bench", _recipe(tiny), "--provider", "cpu")
    assert r.returncode == 2 and "--provider" in r.stderr


# --------------------------------------------------------------------------- GPU against CPU
gpu = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU (PyTorch with CUDA)")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("method", ["himap", "visipruner", "dart", "cdpruner"])
def test_cuda_fp32_answers_as_the_cpu(tiny, method):
    """Same checkpoint, same schedule: kept indices and greedy tokens identical, logits close (fp32,
    TF32 off)."""
    from vpexport.model.pipeline import TorchPipeline
    from vpexport.recipe import load_recipe
    from tests.artifact_helpers import batch_inputs

    pipes = {}
    for d in ("cpu", "cuda"):
        r = load_recipe(_recipe(tiny, method, device=d))
        pipes[d] = TorchPipeline.from_recipe(r, r.schedule())
    assert pipes["cuda"].device.type == "cuda"
    ids, mask, px = batch_inputs(pipes["cpu"])
    outs = {}
    for d, pipe in pipes.items():
        with torch.inference_mode():
            t = [x.to(pipe.device) for x in (ids, mask, px)]
            toks, out = pipe.pruned.generate(*t, 5, None)
        outs[d] = (toks, out)
    (tc, oc), (tg, og) = outs["cpu"], outs["cuda"]
    assert tc == tg
    for a, b in zip(oc.kept, og.kept):
        assert torch.equal(a, b.cpu())
    assert torch.allclose(oc.logits, og.logits.cpu(), atol=1e-4, rtol=1e-4)


@pytest.mark.gpu
@gpu
def test_validate_with_the_reference_on_cuda(tiny, tmp_path):
    art = tmp_path / "art"
    export_py(_recipe(tiny), art)
    r = cli("validate", art, "--device", "cuda", "--json")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    rep = json.loads(r.stdout)
    assert rep["passed"] and rep["torch"]["device"].startswith("cuda") and rep["kept_indices_equal"]
