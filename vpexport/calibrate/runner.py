"""Fast schedule evaluation for calibration and analysis: one dense pass, many schedules.

A schedule's first prune point sits at layer K1 (> sink_layers). Everything before K1 is the
dense model (with the same sink stage), so one dense pass per (batch, sink_layers) records, at
every layer i: the hidden state entering layer i, the layer's KV cache, and every rule's score
read from layer i (for a point at i + 1). A candidate then resumes at K1 from that state, runs
only layers K1..L-1 (the same maths as `PrunedModel.prefill`, with the candidate's own
`PrunedModel` pieces) and decodes greedily with `PrunedModel.decode`.

Candidates with two or more points that share their first point (layer, keep, rule, sink stage)
are also the same model up to their second point K2. With `share=True` the runner records that
first segment once per batch (the same per-layer record as the dense pass) and resumes each of
them at K2; only the most recent first point is kept, so callers order candidates by it.
`tests/test_calibrate.py` checks that both resumptions give exactly the logits and KV cache of
`PrunedModel.prefill` on the same schedule.

Images are encoded once per batch (vision tower + projector), and the dense answers once.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from vpexport.evaluation import exact_match, token_f1
from vpexport.model.pruned import DecoderState, PrunedModel
from vpexport.methods import RULES, scoring_rules
from vpexport.methods.base import ScoreInputs
from vpexport.pruning.schedule import Schedule

# Rules whose scores the dense pass records at every layer (the ones that score from layer K-1).
SCORE_RULES = tuple(scoring_rules())


def sample_score(task: str, pred: str, ref: str) -> float:
    """Per-sample main metric (the mean over samples is `evaluation.score`'s accuracy)."""
    return token_f1(pred, ref) if task == "caption" else exact_match(pred, ref)


@dataclass
class EncodedBatch:
    ids: torch.Tensor
    mask: torch.Tensor
    feats: torch.Tensor  # projected image features (B, N, d)
    refs: list[str]
    questions: list[str]


@dataclass
class DenseState:
    """What the dense pass (with a given sink stage) leaves at each layer, for one batch."""

    h_in: dict[int, torch.Tensor]  # layer i -> hidden state entering it
    kv: list[tuple[torch.Tensor, torch.Tensor]]
    scores: dict[tuple[str, int], torch.Tensor]  # (rule, layer i) -> (B, N) scores read from layer i
    logits: torch.Tensor  # (B, V) dense last-position logits


@dataclass
class SegmentState:
    """The first segment of schedules sharing a first point: the state right after that point's
    pruning (positions, kept tokens), and per layer from there on what `DenseState` holds."""

    pruned: DecoderState  # entering the first point's layer, after its pruning (h: that layer's input)
    h_in: dict[int, torch.Tensor]  # layer i >= first point -> hidden state entering it
    kv: list[tuple[torch.Tensor, torch.Tensor]]  # every layer (dense ones before the first point)
    scores: dict[tuple[str, int], torch.Tensor]


@dataclass
class RunResult:
    scores: list[float]  # per-sample main metric of the samples evaluated
    preds: list[str]
    first_logits: list[torch.Tensor] = field(default_factory=list)  # per batch (B, V)
    complete: bool = True  # False when stopped early (the tolerance could no longer be met)


class Runner:
    """Holds the encoded samples of one split and the dense caches; evaluates schedules."""

    def __init__(self, pipe, samples, task: str, batch_size: int = 32, progress=None):

        self.pipe, self.task = pipe, task
        self.base: PrunedModel = pipe.pruned if pipe.schedule.method == "none" and not pipe.schedule.points else PrunedModel(
            pipe.model, Schedule("none"), pipe.prefix, image_size=pipe.image_size
        )
        self.L, self.N, self.p = self.base.num_layers, self.base.visual_tokens, self.base.prefix
        self.samples = samples
        self.batches: list[EncodedBatch] = []
        with torch.inference_mode():
            for i in range(0, len(samples), batch_size):
                chunk = samples[i : i + batch_size]
                images = [s.load_image("task.data") for s in chunk]
                ids, mask, px = pipe.encode(images, [s.question for s in chunk])
                self.base.check_inputs(ids)
                self.batches.append(
                    EncodedBatch(ids, mask, self.base.encode_image(px), [s.answer for s in chunk], [s.question for s in chunk])
                )
                if progress is not None:
                    progress.update(len(chunk))
        self._dense: dict[tuple[int, int], DenseState] = {}
        self._segments: dict[int, SegmentState] = {}  # batch -> first segment of `_segment_key`
        self._segment_key: tuple | None = None
        self._models: dict[Schedule, PrunedModel] = {}
        self.dense_result: RunResult | None = None

    # ------------------------------------------------------------------ models
    def model_for(self, schedule: Schedule) -> PrunedModel:
        key = Schedule(schedule.method, schedule.points, schedule.sink_layers, schedule.seed)
        if key not in self._models:
            self._models[key] = PrunedModel(self.pipe.model, schedule, self.p, image_size=self.pipe.image_size)
        return self._models[key]

    # ------------------------------------------------------------------ dense pass
    def dense_state(self, b: int, sink_layers: int = 0) -> DenseState:
        key = (b, sink_layers)
        if key not in self._dense:
            self._dense[key] = self._dense_pass(self.batches[b], sink_layers)
        return self._dense[key]

    @torch.inference_mode()
    def _dense_pass(self, eb: EncodedBatch, sink: int) -> DenseState:
        """`PrunedModel.prefill` with no prune point (sink stage `sink`), recording every layer."""
        pl = self.model_for(Schedule("none", sink_layers=sink))
        h_in, scores = {}, {}
        observe = self._observer(pl, sink, h_in, scores)
        st, kv, _ = pl.run_layers(pl.start_state(eb.ids, eb.mask, eb.feats), observe=observe)
        return DenseState(h_in, kv, scores, pl.finish(st))

    # ------------------------------------------------------------------ resumed prefill
    def _observer(self, pl: PrunedModel, sink: int, h_in: dict, scores: dict):
        """`run_layers` observer recording what a later prune point resumes from: the hidden state
        entering each layer and every rule's score read from it (the maths of run_layers' own call)."""

        def observe(i, st, q, kr, vr, allowed, last_idx, h_out):
            h_in[i] = st.h
            if i >= sink and i < self.L - 1 and st.n > 0:  # a point at i + 1 must come after the sink stage
                for name in SCORE_RULES:
                    rule = RULES[name]
                    if rule.pre_llm:
                        continue  # scored from the projector's output (`_resume` at layer 0)
                    if rule.keep_dependent:
                        # Scored per candidate (its keep) at resumption, from the tensors it reads:
                        # the layer's keys (as repeated to the query heads) and its output, not its
                        # q / v / mask. With MHA the keys are the KV record's own tensors.
                        scores[(name, i)] = ScoreInputs(None, kr, None, None, st.key_valid, last_idx, self.p,
                                                        st.n, h_out, pl.norm)
                    else:
                        scores[(name, i)] = rule.score(ScoreInputs(q, kr, vr, allowed, st.key_valid, last_idx,
                                                                   self.p, st.n, h_out, pl.norm), 0)

        return observe

    def _resume(self, b: int, pl: PrunedModel, start: int, h: torch.Tensor, scores: dict, base=None):
        """The state entering layer `start` (a prune point of `pl`), with that point's score."""
        eb = self.batches[b]
        point = pl.points[start]
        base = base if base is not None else pl.start_state(eb.ids, eb.mask, eb.feats)
        if start == 0:  # a pre-LLM point: nothing ran before it
            return replace(base, h=h, score=pl.pre_llm_score(point, replace(base, h=h)))
        score = scores.get((point.rule, start - 1)) if point.rule in SCORE_RULES else None
        if isinstance(score, ScoreInputs):  # a keep-dependent rule (see _observer)
            score = RULES[point.rule].score(score, point.keep)
        return replace(base, h=h, score=score)

    @torch.inference_mode()
    def segment_state(self, b: int, schedule: Schedule) -> SegmentState:
        """The first segment (first point up to the last layer) of schedules that share `schedule`'s
        first point, for batch b; recorded once per batch while that first point stays the same."""
        first = schedule.points[0]  # points are in increasing layer order (Schedule.check)
        key = first_segment(schedule)
        if key != self._segment_key:
            self._segments.clear()
            self._segment_key = key
        if b not in self._segments:
            one = Schedule(schedule.method, (first,), schedule.sink_layers, schedule.seed)
            pl = self.model_for(one)
            dense = self.dense_state(b, schedule.sink_layers)
            h_in, scores, pruned = {}, {}, []
            observe = self._observer(pl, schedule.sink_layers, h_in, scores)

            def record(i, st, *a):
                if not pruned:
                    pruned.append(st)
                observe(i, st, *a)

            st = self._resume(b, pl, first.layer, dense.h_in[first.layer], dense.scores)
            _, kv, _ = pl.run_layers(st, first.layer, kv=list(dense.kv[: first.layer]), observe=record)
            self._segments[b] = SegmentState(pruned[0], h_in, kv, scores)
        return self._segments[b]

    def drop_segments(self) -> None:
        self._segments.clear()
        self._segment_key = None

    @torch.inference_mode()
    def prefill(self, b: int, schedule: Schedule, pl: PrunedModel | None = None, share: bool = False):
        """(logits, kv) of `schedule` on batch b, resuming the dense pass at the first prune point, or
        with `share` and two or more points, the shared first segment at the second."""
        pl = pl or self.model_for(schedule)
        dense = self.dense_state(b, schedule.sink_layers)
        if not pl.points:
            return dense.logits, dense.kv
        if share and len(pl.points) >= 2:
            seg = self.segment_state(b, schedule)
            start = sorted(pl.points)[1]
            st = self._resume(b, pl, start, seg.h_in[start], seg.scores, base=seg.pruned)
            st, kv, _ = pl.run_layers(st, start, kv=list(seg.kv[:start]))
            return pl.finish(st), kv
        # Before the first prune point the candidate is the dense model: resume from its state.
        start = min(pl.points)
        st = self._resume(b, pl, start, dense.h_in[start], dense.scores)
        st, kv, _ = pl.run_layers(st, start, kv=list(dense.kv[:start]))
        return pl.finish(st), kv

    @torch.inference_mode()
    def generate(self, b: int, pl: PrunedModel, logits, kv) -> list[list[int]]:
        """Greedy decoding after a prefill (the loop of `PrunedModel.generate`)."""
        eb = self.batches[b]
        text_len = eb.mask[:, self.p + self.N :].sum(-1)
        return pl.greedy(logits, kv, eb.mask, text_len, self.pipe.max_new_tokens, self.pipe.eos_token_id)

    # ------------------------------------------------------------------ evaluation
    def run(self, schedule: Schedule, min_accuracy: float | None = None, keep_logits: bool = False,
            pl: PrunedModel | None = None, stop=None, share: bool = False) -> RunResult:
        """Per-sample scores of `schedule`. With `min_accuracy`, stop as soon as even a perfect
        remainder could not reach it; with `stop(result_so_far) -> bool`, stop when it says so
        after a batch (the result is then marked incomplete). `share`: see `prefill`."""
        pl = pl or self.model_for(schedule)
        dec = self.pipe.processor.tokenizer.decode
        total = len(self.samples)
        res = RunResult([], [])
        for b, eb in enumerate(self.batches):
            logits, kv = self.prefill(b, schedule, pl, share=share)
            if keep_logits:
                res.first_logits.append(logits)
            toks = self.generate(b, pl, logits, kv)
            for t, ref in zip(toks, eb.refs):
                pred = dec(t, skip_special_tokens=True).strip()
                res.preds.append(pred)
                res.scores.append(sample_score(self.task, pred, ref))
            if len(res.scores) < total:
                hopeless = min_accuracy is not None and best_case(res.scores, total) < min_accuracy - 1e-9
                if hopeless or (stop is not None and stop(res)):
                    res.complete = False
                    break
        return res

    def dense(self) -> RunResult:
        if self.dense_result is None:
            self.dense_result = self.run(Schedule("none"), keep_logits=True)
        return self.dense_result

    def drop_caches(self) -> None:
        self._dense.clear()
        self.drop_segments()


def first_segment(schedule: Schedule) -> tuple | None:
    """What schedules with two or more points share up to their second point (None for fewer)."""
    if len(schedule.points) < 2:
        return None
    p = schedule.points[0]
    return (schedule.method, schedule.sink_layers, schedule.seed, p.layer, p.keep, p.rule)


def first_token_kl(p_logits: torch.Tensor, q_logits: torch.Tensor) -> list[float]:
    """Per-sample KL(p || q) of the first answer token's distributions."""
    import torch.nn.functional as F

    lp, lq = F.log_softmax(p_logits.float(), -1), F.log_softmax(q_logits.float(), -1)
    return (lp.exp() * (lp - lq)).sum(-1).tolist()


def best_case(scores: list[float], total: int) -> float:
    """The accuracy over `total` samples if every one not in `scores` yet were right (an upper bound)."""
    return (sum(scores) + total - len(scores)) / total


def accuracy(scores: list[float]) -> float:
    return sum(scores) / len(scores) if scores else 0.0
