"""The OpenVINO GenAI peer of `vpexport bench`: exporter discovery, the export cache key, and a real
optimum-intel export + VLMPipeline run of a tiny synthetic LLaVA checkpoint."""

import json
import math
import os
import stat
import subprocess
import sys
import textwrap

import pytest

from tests.artifact_helpers import require_real_peer
from vpexport.bench import peers
from vpexport.errors import UserInputError


def _script(path, body):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"#!{sys.executable}\n" + textwrap.dedent(body))
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


@pytest.fixture
def no_exporter(tmp_path, monkeypatch):
    """Discovery inputs with nothing to find: no env override, an empty PATH, an empty cache home,
    and an interpreter that cannot import optimum.intel."""
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.delenv("VPEXPORT_OPTIMUM_CLI", raising=False)
    monkeypatch.setenv("PATH", str(empty))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(peers, "_optimum_intel_importable", lambda: False)
    return tmp_path


def _fake_checkpoint(d, weights=b"\x00" * 1000):
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text('{"model_type": "llava"}')
    (d / "model.safetensors").write_bytes(weights)
    (d / "README.md").write_text("not part of the key")
    return d


def test_no_exporter_message_is_one_line(no_exporter):
    assert peers.find_exporter() is None
    with pytest.raises(peers.PeerUnavailable) as e:
        peers.ensure_peer_export(no_exporter / "art", _fake_checkpoint(no_exporter / "ckpt"), log=lambda s: None)
    line = e.value.one_line()
    assert "\n" not in line and "no optimum-intel exporter found" in line
    assert "python -m vpexport.bench.peers setup" in line
    assert e.value.exit_code == 5  # a RuntimeUnavailable
    assert not (no_exporter / "art").exists()


def test_discovery_order(no_exporter, monkeypatch):
    venv_cli = _script(peers.default_venv() / "bin" / "optimum-cli", "print('venv')\n")
    assert peers.default_venv() == no_exporter / "cache" / "vpexport" / "peer-export-venv"
    ex = peers.find_exporter()
    assert ex.argv == (str(venv_cli),) and ex.python == sys.executable
    path_cli = _script(no_exporter / "empty-bin" / "optimum-cli", "print('path')\n")
    assert peers.find_exporter().argv == (str(path_cli),)
    env_cli = _script(no_exporter / "elsewhere" / "optimum-cli", "print('env')\n")
    monkeypatch.setenv("VPEXPORT_OPTIMUM_CLI", str(env_cli))
    assert peers.find_exporter().argv == (str(env_cli),)
    monkeypatch.setenv("VPEXPORT_OPTIMUM_CLI", str(no_exporter / "missing"))
    with pytest.raises(peers.PeerUnavailable, match="not an executable file"):
        peers.find_exporter()
    monkeypatch.delenv("VPEXPORT_OPTIMUM_CLI")
    path_cli.unlink()
    venv_cli.unlink()
    monkeypatch.setattr(peers, "_optimum_intel_importable", lambda: True)
    assert peers.find_exporter().argv == (sys.executable, "-m", "optimum.commands.optimum_cli")


def test_peer_key_is_content_based(tmp_path):
    ckpt = _fake_checkpoint(tmp_path / "ckpt")
    k1 = peers.peer_key(ckpt, "exporter 1")
    assert set(k1["files"]) == {"config.json", "model.safetensors"}  # README.md is not an export input
    os.utime(ckpt / "model.safetensors", ns=(1, 1))
    k2 = peers.peer_key(ckpt, "exporter 1", k1)
    assert k2["key"] == k1["key"]
    (ckpt / "README.md").write_text("edited")
    assert peers.peer_key(ckpt, "exporter 1")["key"] == k1["key"]
    assert peers.peer_key(ckpt, "exporter 2")["key"] != k1["key"]
    # New bytes of the same size: the mtime no longer matches the record, so the file is re-hashed.
    (ckpt / "model.safetensors").write_bytes(b"\x01" * 1000)
    k3 = peers.peer_key(ckpt, "exporter 1", k2)
    assert k3["key"] != k1["key"]
    assert k3["files"]["config.json"]["sha256"] == k1["files"]["config.json"]["sha256"]


def test_last_meaningful_line():
    log = ("loading\n\rprogress 10%\rprogress 100%\nTraceback (most recent call last):\n  File \"x.py\", line 1\n"
           "    boom()\nValueError: Unsupported model type llava_x\n\n")
    assert peers.last_meaningful_line(log) == "ValueError: Unsupported model type llava_x"
    assert peers.last_meaningful_line("a\n\x1b[31mlast words\x1b[0m\n") == "last words"
    assert peers.last_meaningful_line("") == "(no output)"


def test_failed_export_reports_the_error_and_cleans_up(tmp_path, monkeypatch):
    cli = _script(tmp_path / "bin" / "optimum-cli", """\
        import sys
        print("some progress")
        print("Traceback (most recent call last):", file=sys.stderr)
        print("RuntimeError: cannot convert the vision tower", file=sys.stderr)
        sys.exit(3)
        """)
    monkeypatch.setenv("VPEXPORT_OPTIMUM_CLI", str(cli))
    art, ckpt = tmp_path / "art", _fake_checkpoint(tmp_path / "ckpt")
    with pytest.raises(peers.PeerUnavailable) as e:
        peers.ensure_peer_export(art, ckpt, log=lambda s: None)
    line = e.value.one_line()
    assert "\n" not in line and "exit status 3: RuntimeError: cannot convert the vision tower" in line
    left = sorted(p.name for p in (art / "bench" / "peers").iterdir())
    assert left == ["openvino_genai.failed.log"]  # no temp folder, no half export
    assert "cannot convert the vision tower" in (art / "bench" / "peers" / "openvino_genai.failed.log").read_text()


def test_export_without_tokenizer_is_not_accepted(tmp_path, monkeypatch):
    # optimum-cli exits 0 but skips the tokenizer when openvino-tokenizers is missing in its env.
    cli = _script(tmp_path / "bin" / "optimum-cli", """\
        import pathlib, sys
        out = pathlib.Path(sys.argv[-1])
        for n in ("language", "text_embeddings", "vision_embeddings"):
            (out / f"openvino_{n}_model.xml").write_text("<net/>")
        """)
    monkeypatch.setenv("VPEXPORT_OPTIMUM_CLI", str(cli))
    with pytest.raises(peers.PeerUnavailable) as e:
        peers.ensure_peer_export(tmp_path / "art", _fake_checkpoint(tmp_path / "ckpt"), log=lambda s: None)
    assert "wrote no openvino_tokenizer.xml" in str(e.value) and "openvino-tokenizers" in e.value.one_line()
    assert not (tmp_path / "art" / "bench" / "peers" / "openvino_genai").exists()


def test_module_cli_help():
    r = subprocess.run([sys.executable, "-m", "vpexport.bench.peers", "setup", "--help"], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0 and "--venv" in r.stdout


def test_cdpruner_ratio_is_the_integer_percentage_nearest_the_kept_count():
    assert peers.cdpruner_ratio(1024, 256) == 75
    assert peers.cdpruner_ratio(1024, 64) == 94  # keeps round(61.44) = 61; 93 would keep 72
    assert peers.cdpruner_ratio(576, 144) == 75
    assert peers.cdpruner_ratio(20, 4) == 78  # the smallest: 20 x 0.22 = 4.4 keeps 4
    for bad in (0, 1024, 2000):
        with pytest.raises(UserInputError) as e:
            peers.cdpruner_ratio(1024, bad)
        assert e.value.field == "--cdpruner-keep"


@pytest.mark.slow
def test_export_run_reuse_and_invalidate(tmp_path):
    require_real_peer()
    from PIL import Image
    from safetensors.torch import load_file, save_file

    from vpexport.testbed.synth import SYNTH_TEMPLATE, synth

    ckpt, art = tmp_path / "ckpt", tmp_path / "art"
    synth("llava-1.5-7b", ckpt, layers=1, hidden=64, vision_layers=1, dtype="fp32")
    lines = []
    peer = peers.OpenVinoGenAIPeer(art, ckpt, threads=2, log=lines.append)
    assert sum("exporting the OpenVINO GenAI peer" in s for s in lines) == 1
    assert peer.folder == art / "bench" / "peers" / "openvino_genai"
    assert peer.precision in ("f32", "bf16") and peer.version
    requests = [(Image.new("RGB", (400, 300), (200, 30, 30)), "describe the image"),
                (Image.new("RGB", (336, 336), (20, 90, 200)), "what is it ?")]
    for image, question in requests:
        r = peer.run_once(image, SYNTH_TEMPLATE.format(question=question), decode_steps=3)
        assert r["new_tokens"] == 4 and r["input_tokens"] > 576
        for k in ("ttft_ms", "decode_ms_per_token", "prepare_embeddings_ms", "wall_ms"):
            assert math.isfinite(r[k]) and r[k] > 0, (k, r)
        assert r["wall_ms"] >= r["ttft_ms"] > r["prepare_embeddings_ms"]

    stamp = peer.folder / peers.STAMP
    before = (stamp.stat().st_mtime_ns, (peer.folder / "openvino_language_model.xml").stat().st_ino)
    weights = ckpt / "model.safetensors"
    os.utime(weights, ns=(10**18, 10**18))  # a touch is not a change
    lines.clear()
    assert peers.ensure_peer_export(art, ckpt, log=lines.append) == peer.folder
    assert lines == [] and (peer.folder / "openvino_language_model.xml").stat().st_ino == before[1]
    # Reused, with the new mtime recorded so that the next start need not re-hash the weights.
    assert json.loads(stamp.read_text())["files"]["model.safetensors"]["mtime_ns"] == 10**18
    touched = stamp.stat().st_mtime_ns
    assert peers.ensure_peer_export(art, ckpt, log=lines.append) == peer.folder
    assert lines == [] and stamp.stat().st_mtime_ns == touched

    tensors = load_file(weights)
    name = next(n for n in tensors if "lm_head" in n)
    tensors[name] = tensors[name] + 1.0
    save_file(tensors, weights, metadata={"format": "pt"})
    old_key = json.loads(stamp.read_text())["key"]
    lines.clear()
    peers.ensure_peer_export(art, ckpt, log=lines.append)
    assert sum("exporting the OpenVINO GenAI peer" in s for s in lines) == 1
    assert json.loads(stamp.read_text())["key"] != old_key
    assert (peer.folder / "openvino_language_model.xml").stat().st_ino != before[1]
    assert sorted(p.name for p in peer.folder.parent.iterdir()) == ["openvino_genai"]
