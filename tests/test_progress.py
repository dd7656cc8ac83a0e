"""Progress output: plain lines without a terminal (log files), tqdm on one, early stops explained."""

import io

import vpexport.progress as P
from vpexport.evaluation import evaluate


class Tty(io.StringIO):
    def isatty(self):
        return True


def test_plain_lines_without_a_terminal(monkeypatch):
    out = io.StringIO()
    clock = iter([0.0, 10.0, 20.0, 31.0, 40.0, 65.0, 70.0])  # start, 5 updates, close
    monkeypatch.setattr(P.time, "monotonic", lambda: next(clock))
    bar = P.progress(total=5, desc="encode", unit="sample", stream=out)
    for _ in range(5):
        bar.update(1)
    bar.close()
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue()
    assert lines[0] == "[encode] 0/5 samples"
    # One line per LINE_EVERY_S (30 s) at most: at 31 s and 65 s, not at 10, 20 or 40 s.
    assert lines[1:3] == ["[encode] 3/5 60% (31 s)", "[encode] 5/5 100% (65 s)"]
    assert lines[3] == "[encode] done, 5 samples in 70.0 s"
    assert len(lines) == 4


def test_early_stop_says_why():
    out = io.StringIO()
    bar = P.progress(list(range(10)), desc="calibrate coarse", unit="candidate", stream=out)
    for i, _ in enumerate(bar):
        if i == 2:
            bar.close("candidate 3 is within the tolerance")
            break
    last = out.getvalue().splitlines()[-1]
    assert last.startswith("[calibrate coarse] stopped at 2/10 after ")
    assert last.endswith(": candidate 3 is within the tolerance")
    bar.close("again")  # a second close prints nothing
    assert out.getvalue().splitlines()[-1] == last


def test_terminal_gets_a_tqdm_bar_and_the_stop_line():
    out = Tty()
    bar = P.progress(total=4, desc="fine", stream=out)
    bar.update(1)
    bar.close("stopped by the caller")
    text = out.getvalue()
    assert "\r" in text  # tqdm's redraws
    assert text.rstrip().splitlines()[-1].startswith("[fine] stopped at 1/4 after ")


def test_disabled_prints_nothing():
    out = io.StringIO()
    with P.progress(total=3, desc="x", enabled=False, stream=out) as bar:
        bar.update(3)
    assert out.getvalue() == ""


def test_evaluate_writes_plain_progress_to_a_log(capsys):
    class S:
        def __init__(self, i):
            self.question, self.answer = f"q{i}", "yes"

        def load_image(self, field):
            return None

    evaluate(lambda imgs, qs: ["yes"] * len(qs), [S(i) for i in range(3)], "vqa", batch_size=2, progress="eval")
    err = capsys.readouterr().err
    assert "\r" not in err
    assert err.splitlines()[0] == "[eval] 0/3 samples"
    assert err.splitlines()[-1].startswith("[eval] done, 3 samples in ")


def test_calibration_search_says_why_it_stops_early(capsys):
    """The coarse/fine pass ends at its first passing candidate: the log says so, with the count."""
    from types import SimpleNamespace as NS

    from vpexport.calibrate.search import Search

    cands = [NS(key=i, flops=i / 10, schedule=NS(method="fastv"), passed=i >= 3, stage="coarse") for i in range(8)]
    fake = NS(progress=True, evaluate=lambda c: c, neighbour=lambda c: None)
    got = Search.first_pass(fake, cands, None, "calibrate coarse")
    assert got.key == 3
    last = capsys.readouterr().err.splitlines()[-1]
    assert last.startswith("[calibrate coarse] stopped at 4/8 after ")
    assert last.endswith(": candidate 4, in increasing FLOPs, is the first within the tolerance; the rest need not run")


def test_no_weight_loading_bar_in_a_log():
    """transformers' own bar is off when stderr is not a terminal (a subprocess pipe here)."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    code = ("from vpexport.model.loading import load_model; "
            f"load_model({str(root / 'vpexport/testbed/checkpoints/mini-llava')!r})")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root, timeout=300)
    assert r.returncode == 0, r.stderr[-1000:]
    assert "Loading weights" not in r.stderr and "\r" not in r.stderr
