"""Look before you train: a label-free report of what a teacher cache says about the corpus, with warnings.

In zero-shot classification the class names and the template decide most of the quality, and a user usually
has no labeled test set to find out which name is in trouble. The cache already holds every text's score for
every class (and, mostly, each text's embedding), so without a single label it shows:

- each class's share of the corpus (the teacher's, and the refined targets' stage 2 would train on);
- how surely each class is predicted (confidence histograms);
- per class its most confident texts and its most borderline ones, with the runner-up class;
- the class pairs most often each other's runner-up (a confusion picture without labels);
- warnings that name the class and what to try: a class (almost) never predicted (and which class takes its
  texts), a class that takes far more than a plausible share, two classes the teacher cannot tell apart, texts
  cut at the teacher's maximum length, scores too flat to prefer any class, and where refinement and the
  teacher part ways: a class refinement grows with texts spread thin (a possible sink), one that drifts away from
  the texts the teacher is surest about, one it starves (gives under a quarter of the teacher's texts).

Memory: one pass over the shards (and one more for the refined view), keeping O(K^2 + K * EXAMPLES) numbers and two
a text (the teacher's class and its probability); refinement is fitted on an even sample of at most REFINE_SAMPLE
texts (all of them in smaller caches, where the refined view is exactly the targets stage 2 makes) and then applied
shard by shard.
evaluate.py writes it (`--teacher_cache` without `--model`/`--test_file`; `make inspect`), and beside a labeled
report, where the labels confirm or refute each warning.
"""

import math
import re
from dataclasses import dataclass, field

import numpy as np

from zsdistill import cache, refine, targets

CONFIDENCE_BINS = 10
EXAMPLES = 5  # most confident and most borderline texts kept per class (report.md shows 3)
SHOWN = 3
REFINE_SAMPLE = 100_000
# Warning thresholds, fixed for all data; each is a fraction of what a uniform guess would give.
RARE_SHARE = 0.1  # predicted for under a tenth of a uniform share (1/K)
COMMON_SHARE = 3.0  # over three uniform shares (at most 80%), and over DOMINANT_FLOOR of the corpus
DOMINANT_FLOOR = 0.25  # with many classes, three uniform shares is a plausible size for a real class
# A class refinement grows is "spread thin" when the length of its texts' mean centred embedding is under this
# fraction of the teacher's median class's: measured, sink classes 0.47-0.49, classes that grew rightly 0.67 and over.
SPREAD_THIN = 0.6
DISAGREEMENT = (
    1.5  # refinement gives a class 1.5x (or 1/1.5) the teacher's share, and at least half a uniform share more (less)
)
# A class "drifts" when refinement keeps under refine.DRIFT_KEPT of the texts the teacher is surest are in it
# (refine.drifts, the rule stage 2's drift guard acts on): the report names a class that drifts despite the guard.
SIMILAR_CORRELATION = 0.95  # two classes' scores, each text's mean removed, move together this closely
MIN_TEXTS = 20  # runner-up patterns need this many texts of each class to mean anything
TRUNCATED_SHARE = 0.01  # warn when this share of the texts were cut
FLAT_CONFIDENCE = 1.5  # the mean top probability is under 1.5x uniform: the teacher barely prefers a class


@dataclass
class View:
    """One view of the targets (the teacher's, or the refined ones), accumulated chunk by chunk."""

    num_classes: int
    count: np.ndarray = None  # (K,) texts whose top class is k
    probability_sum: np.ndarray = None  # (K,) sum of P(k): the soft share
    confidence_sum: np.ndarray = None  # (K,) sum of the top probability over texts predicted k
    histogram: np.ndarray = None  # (K, CONFIDENCE_BINS) top probability of texts predicted k
    runner_up: np.ndarray = None  # (K, K) [top class, second class] counts
    confident: list = field(default_factory=list)  # per class: [(confidence, row)], best first
    borderline: list = field(
        default_factory=list
    )  # per class: [(margin, row, runner-up, confidence, runner-up probability)]
    prediction: np.ndarray | None = None  # (N,) int16 when kept (the teacher's, to compare with the refined view)
    confidence: np.ndarray | None = None  # (N,) float32 top probability when kept (which texts it is surest of)

    def __post_init__(self):
        k = self.num_classes
        self.count, self.probability_sum, self.confidence_sum = np.zeros(k, np.int64), np.zeros(k), np.zeros(k)
        self.histogram, self.runner_up = np.zeros((k, CONFIDENCE_BINS), np.int64), np.zeros((k, k), np.int64)
        self.confident, self.borderline = [[] for _ in range(k)], [[] for _ in range(k)]

    def add(self, start: int, probabilities: np.ndarray) -> None:
        if len(probabilities) == 0:
            return
        k = self.num_classes
        order = np.argsort(-probabilities, axis=1, kind="stable")[:, :2]
        top, second = order[:, 0], order[:, 1] if k > 1 else order[:, 0]
        rows = np.arange(len(probabilities))
        confidence, runner_probability = probabilities[rows, top], probabilities[rows, second]
        self.count += np.bincount(top, minlength=k)
        self.probability_sum += probabilities.sum(0, dtype=np.float64)
        self.confidence_sum += np.bincount(top, weights=confidence, minlength=k)
        bins = np.clip((confidence * CONFIDENCE_BINS).astype(int), 0, CONFIDENCE_BINS - 1)
        np.add.at(self.histogram, (top, bins), 1)
        np.add.at(self.runner_up, (top, second), 1)
        margin = confidence - runner_probability
        for c in np.unique(top):
            mine = np.flatnonzero(top == c)
            best = mine[np.argsort(-confidence[mine], kind="stable")[:EXAMPLES]]
            self.confident[c] = sorted(
                self.confident[c] + [(float(confidence[i]), start + int(i)) for i in best], key=lambda t: (-t[0], t[1])
            )[:EXAMPLES]
            close = mine[np.argsort(margin[mine], kind="stable")[:EXAMPLES]]
            self.borderline[c] = sorted(
                self.borderline[c]
                + [
                    (
                        float(margin[i]),
                        start + int(i),
                        int(second[i]),
                        float(confidence[i]),
                        float(runner_probability[i]),
                    )
                    for i in close
                ],
                key=lambda t: (t[0], t[1]),
            )[:EXAMPLES]
        if self.prediction is not None:
            self.prediction[start : start + len(top)] = top
        if self.confidence is not None:
            self.confidence[start : start + len(top)] = confidence

    def summary(self, class_names: list[str], texts: dict[int, str]) -> dict:
        n = max(int(self.count.sum()), 1)
        out = {"texts": int(self.count.sum()), "classes": {}}
        for c, name in enumerate(class_names):
            predicted = int(self.count[c])
            second_place = self.runner_up[c]
            out["classes"][name] = {
                "predicted": predicted,
                "share": predicted / n,
                "soft_share": float(self.probability_sum[c] / n),
                "mean_confidence": float(self.confidence_sum[c] / predicted) if predicted else None,
                "confidence_histogram": self.histogram[c].tolist(),
                "usual_runner_up": class_names[int(second_place.argmax())]
                if predicted and len(class_names) > 1
                else None,
                "most_confident": [
                    {"row": r, "confidence": round(p, 4), "text": texts[r]} for p, r in self.confident[c]
                ],
                "most_borderline": [
                    {
                        "row": r,
                        "confidence": round(p, 4),
                        "runner_up": class_names[s],
                        "runner_up_probability": round(q, 4),
                        "text": texts[r],
                    }
                    for _, r, s, p, q in self.borderline[c]
                ],
            }
        out["mean_confidence"] = float(self.confidence_sum.sum() / n)
        out["runner_up"] = self.runner_up.tolist()
        return out

    def rows_shown(self) -> set[int]:
        return {r for lists in self.confident for _, r in lists} | {t[1] for lists in self.borderline for t in lists}


def _sampled(chunks: refine.Chunks, step: int) -> refine.Chunks:
    """Every step-th row of a chunked column (rows 0, step, 2*step, ...), renumbered from 0."""

    def chunked():
        taken = 0
        for start, chunk in chunks():
            local = np.arange((-start) % step, len(chunk), step)
            yield taken, chunk[local]
            taken += len(local)

    return chunked


def _texts(cache_path: str, manifest: dict, rows: set[int]) -> dict[int, str]:
    """The texts of a few rows, read shard by shard."""
    wanted, out = np.array(sorted(rows), dtype=np.int64), {}
    for shard in manifest["shards"]:
        mine = wanted[(wanted >= shard["start"]) & (wanted < shard["stop"])]
        if len(mine):
            table = next(cache.iter_shards(cache_path, {"shards": [shard]}, ["text"]))[1]
            out.update(zip(mine.tolist(), table.column("text").take(mine - shard["start"]).to_pylist()))
    return out


def build(cache_path: str, manifest: dict, log=lambda _: None) -> dict:
    """The label-free report of a cache as a dict (report.json's `cache_report`); warnings included."""
    class_names, n, k = manifest["class_names"], manifest["num_examples"], len(manifest["class_names"])
    score_column = "similarity" if "similarity" in manifest["score_columns"] else "entailment"

    # 1. The teacher: its single-label probabilities (T = 1, as stage 2's targets) and its raw scores, one pass.
    teacher = View(k, prediction=np.empty(n, np.int16), confidence=np.empty(n, np.float32))
    centered_sum, centered_products = np.zeros(k), np.zeros((k, k))  # for the correlation of classes' scores
    for start, table in cache.iter_shards(cache_path, manifest, [score_column]):
        scores = cache.list_column_to_numpy(table.column(score_column), k)
        teacher.add(start, targets.teacher_probabilities({score_column: scores}, multi_label=False))
        centered = scores.astype(np.float64) - scores.mean(1, keepdims=True)  # each text's general level removed
        centered_sum += centered.sum(0)
        centered_products += centered.T @ centered

    # 2. The refined view, where the cache holds text embeddings: what stage 2 would train on, before the label
    # propagation that keeps each class its number of texts.
    refined, moved, refinement_info, surest_moved = None, None, None, None
    if manifest.get("text_embedding_column"):
        step = max(1, math.ceil(n / REFINE_SAMPLE))
        teacher_chunks = lambda: targets.cache_probability_chunks(cache_path, manifest, False)  # noqa: E731
        embedding_chunks = refine.embedding_chunks(cache_path, manifest)
        _, refinement = refine.refine(
            _sampled(teacher_chunks, step),
            _sampled(embedding_chunks, step),
            math.ceil(n / step),
            k,
            log=log,
            propagate=0.0,  # the view below scores each text by the centroids; propagation keeps each class's count
        )
        refined, moved, surest_moved = View(k), np.zeros((k, k), np.int64), np.zeros((k, k), np.int64)
        surest_cut = refine.surest_cuts(teacher.prediction, teacher.confidence, k)
        # How spread each class's texts are: the length of their mean embedding, centred on the corpus mean (1: all
        # alike, near 0: texts of every topic), for the refined classes and for the teacher's.
        center = refinement.center if refinement.center is not None else refine.mean_embedding(embedding_chunks, n)
        refined_sums, teacher_sums = np.zeros((k, len(center))), np.zeros((k, len(center)))
        for start, chunk in embedding_chunks():
            probabilities = refine.softmax_rows(refinement.log_scores(chunk))
            top, taught = probabilities.argmax(1), teacher.prediction[start : start + len(chunk)]
            refined.add(start, probabilities)
            np.add.at(moved, (taught, top), 1)
            surest = refine.among_surest(taught, teacher.confidence[start : start + len(chunk)], surest_cut)
            np.add.at(surest_moved, (taught[surest], top[surest]), 1)
            centred = refine.centered(chunk, center).astype(np.float64)
            refined_sums += _one_hot(top, k).T @ centred
            teacher_sums += _one_hot(taught, k).T @ centred
        refinement_info = {
            **refinement.settings(),
            "fitted_on": math.ceil(n / step),
            "cohesion": _cohesion(refined_sums, refined.count),
            "teacher_cohesion": _cohesion(teacher_sums, teacher.count),
            # per class, the teacher's probability from which a text predicted k is among its surest
            "teacher_surest_cut": [float(v) if np.isfinite(v) else None for v in surest_cut],
        }

    texts = _texts(cache_path, manifest, teacher.rows_shown() | (refined.rows_shown() if refined else set()))
    mean = centered_sum / max(n, 1)
    covariance = centered_products / max(n, 1) - np.outer(mean, mean)
    spread = np.sqrt(np.clip(np.diag(covariance), 1e-12, None))
    report = {
        "cache": manifest["key"],
        "teacher": manifest["teacher"]["name_or_path"],
        "teacher_kind": manifest["teacher"]["kind"],
        "hypothesis_template": manifest["hypothesis_template"],
        "class_names": class_names,
        "num_examples": n,
        "max_length": manifest.get("max_length"),
        "truncated_texts": manifest.get("truncated_texts"),
        "teacher_view": teacher.summary(class_names, texts),
        "score_correlation": (covariance / np.outer(spread, spread)).round(4).tolist(),
        "refined_view": refined.summary(class_names, texts) if refined else None,
        "refinement": refinement_info,
        "moved_by_refinement": moved.tolist() if moved is not None else None,  # [teacher's class, refined class]
        # the same, over the texts the teacher is surest about (teacher_surest_cut)
        "teacher_surest_moved": surest_moved.tolist() if surest_moved is not None else None,
    }
    report["warnings"] = warnings(report)
    return report


def _one_hot(classes: np.ndarray, num_classes: int) -> np.ndarray:
    """(rows, K) float64 indicators: one_hot.T @ vectors sums each class's rows (np.add.at on rows of 384 numbers is
    about 30 times slower, most of the report's time on a large cache)."""
    indicators = np.zeros((len(classes), num_classes))
    indicators[np.arange(len(classes)), classes] = 1.0
    return indicators


def _largest_others(counts: np.ndarray, c: int, names: list[str]) -> str:
    """The (at most) three classes other than c with the largest counts, largest first, as "'name' (count), ..."."""
    others = counts.copy()
    others[c] = 0
    return ", ".join(f"'{names[i]}' ({others[i]})" for i in np.argsort(-others, kind="stable")[:3] if others[i])


def _cohesion(sums: np.ndarray, count: np.ndarray) -> list:
    """Per class, the length of its texts' mean centred embedding (None for a class without texts)."""
    return [round(float(np.linalg.norm(total) / c), 4) if c else None for total, c in zip(sums, count)]


def _share(value: float) -> str:
    return f"{value:.1%}"


def warnings(report: dict) -> list[dict]:
    """Plain warnings, each naming its class(es) and what to try: [{kind, classes, message}]."""
    names, view, k = report["class_names"], report["teacher_view"], len(report["class_names"])
    refined = report.get("refined_view")
    runner_up, uniform = np.array(view["runner_up"]), 1 / k
    count = np.array([view["classes"][c]["predicted"] for c in names])
    out = []

    def warn(kind: str, classes: list[str], message: str) -> None:
        out.append({"kind": kind, "classes": classes, "message": message})

    for c, name in enumerate(names):
        share = view["classes"][name]["share"]
        if share < RARE_SHARE * uniform:
            # Which class takes its texts: the one most often first where this class is second.
            takers = runner_up[:, c].copy()
            takers[c] = 0
            taker = (
                f"; its texts go to '{names[int(takers.argmax())]}' (first on {int(takers.max())} of the "
                f"{int(takers.sum())} texts where '{name}' comes second)"
                if takers.sum()
                else ""
            )
            moved = ""
            if refined:
                gained = np.array(report["moved_by_refinement"])[:, c]
                gained[c] = 0
                moved = f"; refinement gives it {_share(refined['classes'][name]['share'])}" + (
                    f", most of it from '{names[int(gained.argmax())]}'" if gained.sum() else ""
                )
            warn(
                "rarely_predicted",
                [name],
                f"'{name}' is {'never' if count[c] == 0 else 'almost never'} the teacher's top class: {count[c]} "
                f"texts ({_share(share)}, "
                f"uniform {_share(uniform)}){taker}{moved}. Try another wording of the class name (a more common "
                f"word, or a short "
                f"description) or another template; if the class really is this rare in the corpus, ignore this.",
            )
        elif share > max(DOMINANT_FLOOR, min(COMMON_SHARE * uniform, 0.8)):
            warn(
                "dominant",
                [name],
                f"'{name}' takes {_share(share)} of the corpus (uniform {_share(uniform)}): a broad or generic name "
                f"attracts texts of other "
                f"classes. Try a more specific name or a description; if the corpus really is mostly '{name}', ignore "
                f"this.",
            )
    if refined:
        moved = np.array(report["moved_by_refinement"])  # [teacher's class, refined class]
        refinement = report.get("refinement") or {}
        cohesion, teacher_cohesion = (
            refinement.get("cohesion"),
            [c for c in refinement.get("teacher_cohesion") or [] if c is not None],
        )
        typical = float(np.median(teacher_cohesion)) if cohesion and teacher_cohesion else None
        surest = np.array(report["teacher_surest_moved"])  # the same, over the teacher's surest texts
        for c, name in enumerate(names):
            before, after = view["classes"][name]["share"], refined["classes"][name]["share"]
            total, kept = int(surest[c].sum()), int(surest[c, c])
            if refine.drifts(before, total, kept, k):
                # Refinement moves even the texts the teacher is surest about: "the teacher over-predicts" would be
                # the wrong advice (the class may be right and refinement drawn to other texts).
                where = _largest_others(surest[c], c, names)
                now = refined["classes"][name]["most_confident"]
                example = f' such as "{_clip(now[0]["text"], 80)}"' if now else ""
                warn(
                    "refinement_drifts",
                    [name],
                    f"refinement keeps only {kept} of the {total} texts the teacher is surest are '{name}' (its top "
                    f"{refine.SUREST_FRACTION:.0%}) in '{name}' (the others go to {where}); what it calls '{name}' "
                    f"instead are texts{example}. Refinement may have drifted from what the teacher means by "
                    f"'{name}', even re-anchored to those texts (its drift guard). Compare the two views' texts of "
                    f"'{name}' below: if the teacher's are right, a few labeled '{name}' texts (train_student.py "
                    f"--dev_file) anchor the class, or --norefine trains on the teacher's own targets.",
                )
                continue
            if refine.starves(before, after, k):
                # Too small a class for the thresholds below, and "the teacher over-predicts" may be wrong advice.
                where = _largest_others(moved[c], c, names)
                warn(
                    "refinement_starves",
                    [name],
                    f"refinement gives '{name}' {_share(after)} of the texts against the teacher's {_share(before)} "
                    f"(under {refine.DRIFT_KEPT:.0%} of it; it moves the teacher's other texts of it to {where}). "
                    f"Where a class's texts are few and diverse, the rounds hand them to larger classes, and a student "
                    f"taught these targets will rarely predict '{name}'. If the teacher's texts of '{name}' below are "
                    f"right, a few labeled '{name}' texts (train_student.py --dev_file) keep the class (without "
                    f"labels, --refine_starved_share 0.75 gives it three quarters of the teacher's count, the texts "
                    f"nearest its centroid); if the teacher over-predicts it, ignore this.",
                )
                continue
            if (
                before < RARE_SHARE * uniform
                or abs(after - before) < 0.5 * uniform
                or not (after >= DISAGREEMENT * before or before >= DISAGREEMENT * after)
            ):
                continue
            if after > before:
                where = _largest_others(moved[:, c], c, names)
                if typical and cohesion[c] is not None and cohesion[c] < SPREAD_THIN * typical:
                    # A class that grows with texts spread thin is how a generic class draws other classes' texts.
                    warn(
                        "refinement_grows_a_spread_class",
                        [name],
                        f"refinement grows '{name}' from the teacher's {_share(before)} of the texts to "
                        f"{_share(after)} (from {where}), "
                        f"but its texts are spread thin (the length of their mean centred embedding is "
                        f"{cohesion[c]:.2f}, the "
                        f"teacher's median class's {typical:.2f}): "
                        f"'{name}' may be a generic class drawing other classes' texts rather than one the teacher "
                        f"under-predicts. Read a sample of its texts in the refined view; a more specific name, or "
                        f"--norefine, keeps the other classes' texts with them.",
                    )
                    continue
                message = (
                    f"the teacher predicts '{name}' for {_share(before)} of the texts, but {_share(after)} sit closer "
                    f"to its surest texts "
                    f"than to any other class's (refinement moves texts to it from {where}): the teacher likely "
                    f"under-predicts "
                    f"'{name}' and those classes take its texts; try another wording of '{name}'."
                )
            else:
                where = _largest_others(moved[c], c, names)
                message = (
                    f"the teacher predicts '{name}' for {_share(before)} of the texts, but only {_share(after)} sit "
                    f"closer to its surest "
                    f"texts than to any other class's (refinement moves texts from it to {where}): the teacher likely "
                    f"over-predicts "
                    f"'{name}'. Try a narrower wording of '{name}'."
                )
            warn("teacher_and_refinement_disagree", [name], message)
    correlation = np.array(report["score_correlation"])
    for a in range(k):
        for b in range(a + 1, k):
            if correlation[a, b] >= SIMILAR_CORRELATION:
                warn(
                    "indistinct",
                    [names[a], names[b]],
                    f"'{names[a]}' and '{names[b]}' score nearly the same on every text (correlation "
                    f"{correlation[a, b]:.3f} of their scores, "
                    f"each text's mean removed): the teacher cannot tell them apart. Merge them, or reword one so the "
                    f"two hypotheses differ.",
                )
    if k > 2:
        # Each other's runner-up more than halfway from chance (1/(K-1)) to always, both ways.
        threshold = 0.5 + 0.5 / (k - 1)
        flagged = {tuple(w["classes"]) for w in out if w["kind"] == "indistinct"}
        for a in range(k):
            for b in range(a + 1, k):
                if min(count[a], count[b]) < MIN_TEXTS or (names[a], names[b]) in flagged:
                    continue
                ab, ba = runner_up[a, b] / count[a], runner_up[b, a] / count[b]
                if ab >= threshold and ba >= threshold:
                    warn(
                        "confused_pair",
                        [names[a], names[b]],
                        f"'{names[a]}' and '{names[b]}' are each other's runner-up ({_share(ab)} of '{names[a]}' "
                        f"texts, {_share(ba)} of "
                        f"'{names[b]}' texts): the teacher hesitates between them. Make the names more distinct, or "
                        f"merge them.",
                    )
    truncated, n = report.get("truncated_texts"), report["num_examples"]
    if truncated and truncated >= TRUNCATED_SHARE * n:
        warn(
            "truncated",
            [],
            f"{truncated} texts ({_share(truncated / n)}) are longer than the teacher's {report['max_length']} tokens "
            f"and were cut: it read "
            f"only their beginning. If what decides their class comes later, split long texts into passages before "
            f"stage 1.",
        )
    if view["mean_confidence"] < FLAT_CONFIDENCE * uniform:
        warn(
            "flat_scores",
            [],
            f"the teacher barely prefers any class: its mean top probability is {view['mean_confidence']:.3f} "
            f"(uniform {uniform:.3f}). "
            f"Try another template or more distinct class names; stage 2's --temperature below 1 sharpens targets, "
            f"but not what the teacher knows.",
        )
    return out


def confirm_with_labels(report: dict, true: np.ndarray, teacher_probabilities: np.ndarray) -> None:
    """Add to each warning what held-out labels say of it (single-label): `labels` = {evidence, confirmed}.
    `true` and the teacher's (N, K) probabilities in the cache's class order."""
    teacher_prediction = teacher_probabilities.argmax(1)
    names = report["class_names"]
    index = {name: i for i, name in enumerate(names)}
    for warning in report["warnings"]:
        classes = [index[c] for c in warning["classes"]]
        if warning["kind"] == "rarely_predicted":
            c = classes[0]
            support = int((true == c).sum())
            recall = float((teacher_prediction[true == c] == c).mean()) if support else None
            warning["labels"] = {
                "evidence": f"teacher recall of '{names[c]}' {recall:.2f} on {support} labeled texts"
                if support
                else f"no labeled text is '{names[c]}'",
                "confirmed": bool(support and recall < 0.5),
            }
        elif warning["kind"] == "dominant":
            c = classes[0]
            predicted = int((teacher_prediction == c).sum())
            precision = float((true[teacher_prediction == c] == c).mean()) if predicted else 0.0
            warning["labels"] = {
                "evidence": f"teacher precision of '{names[c]}' {precision:.2f}; true share {(true == c).mean():.1%}",
                "confirmed": precision < 0.5,
            }
        elif warning["kind"] == "refinement_grows_a_spread_class":
            c = classes[0]
            true_share = float((true == c).mean())
            refined_share = report["refined_view"]["classes"][names[c]]["share"]
            warning["labels"] = {
                "evidence": f"true share of '{names[c]}' {true_share:.1%} against the refined {refined_share:.1%}",
                "confirmed": refined_share > 1.25 * true_share,
            }
        elif warning["kind"] == "teacher_and_refinement_disagree":
            c = classes[0]
            true_share, predicted_share = float((true == c).mean()), float((teacher_prediction == c).mean())
            recall = float((teacher_prediction[true == c] == c).mean()) if (true == c).any() else 0.0
            under = report["refined_view"]["classes"][names[c]]["share"] > predicted_share
            warning["labels"] = {
                "evidence": f"true share of '{names[c]}' {true_share:.1%} against the teacher's "
                f"{predicted_share:.1%}, teacher recall {recall:.2f}",
                "confirmed": true_share > 1.25 * predicted_share if under else true_share * 1.25 < predicted_share,
            }
        elif warning["kind"] == "refinement_starves":
            c = classes[0]
            true_share = float((true == c).mean())
            refined_share = report["refined_view"]["classes"][names[c]]["share"]
            recall = float((teacher_prediction[true == c] == c).mean()) if (true == c).any() else 0.0
            warning["labels"] = {
                "evidence": f"true share of '{names[c]}' {true_share:.1%} against the refined {refined_share:.1%}, "
                f"teacher recall {recall:.2f}",
                "confirmed": refined_share < 0.5 * true_share,
            }
        elif warning["kind"] == "refinement_drifts":
            c = classes[0]
            cuts = [np.inf if v is None else v for v in report["refinement"]["teacher_surest_cut"]]
            surest = (teacher_prediction == c) & refine.among_surest(
                teacher_prediction, teacher_probabilities.max(1), cuts
            )
            right = int((true[surest] == c).sum())
            warning["labels"] = {
                "evidence": f"{right} of the {int(surest.sum())} texts the teacher is surest are '{names[c]}' are "
                f"'{names[c]}'",
                "confirmed": bool(right >= 0.5 * surest.sum()),
            }
        elif warning["kind"] in ("indistinct", "confused_pair"):
            a, b = classes
            pair = (true == a) | (true == b)
            crossed = int(
                ((true == a) & (teacher_prediction == b)).sum() + ((true == b) & (teacher_prediction == a)).sum()
            )
            rate = crossed / max(int(pair.sum()), 1)
            warning["labels"] = {
                "evidence": f"{crossed} of the {int(pair.sum())} labeled '{names[a]}'/'{names[b]}' texts go to the "
                f"other one ({rate:.0%})",
                "confirmed": rate >= 0.25,
            }


# ---------------------------------------------------------------- plots and markdown


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _views(report: dict) -> list[tuple[str, dict]]:
    return [("teacher", report["teacher_view"])] + (
        [("refined", report["refined_view"])] if report.get("refined_view") else []
    )


def shares_png(path: str, report: dict) -> None:
    """Horizontal bars: each class's share of the corpus per view, against a uniform share (readable at 40+ classes)."""
    plt = _pyplot()
    names, views = report["class_names"], _views(report)
    k = len(names)
    fig, ax = plt.subplots(figsize=(7.5, 1.4 + 0.32 * k * (1 + 0.4 * (len(views) - 1))))
    height = 0.8 / len(views)
    for i, (who, view) in enumerate(views):
        ax.barh(
            np.arange(k) + (i - (len(views) - 1) / 2) * height,
            [view["classes"][c]["share"] for c in names],
            height=height,
            label=who,
            color=("tab:blue", "tab:orange")[i],
        )
    ax.axvline(1 / k, color="gray", linestyle="--", linewidth=1, label=f"uniform ({1 / k:.1%})")
    warned = {c for w in report.get("warnings", []) for c in w["classes"]}
    ax.set_yticks(range(k), [f"(!) {c}" if c in warned else c for c in names], fontsize=9 if k <= 30 else 7)
    for label in ax.get_yticklabels():
        if label.get_text().startswith("(!)"):
            label.set_color("tab:red")
    ax.invert_yaxis()
    from matplotlib.ticker import PercentFormatter

    ax.xaxis.set_major_formatter(PercentFormatter(1.0))
    ax.margins(y=0.01)
    ax.set_xlabel("share of the corpus (texts whose top class it is)")
    ax.set_title("What the teacher predicts, without labels" + ("  ((!): see the warnings)" if warned else ""))
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def confidence_png(path: str, report: dict) -> None:
    """Per class (rows) and view (panels): how its texts' top probability spreads over bins, as a share of its texts."""
    plt = _pyplot()
    names, views = report["class_names"], _views(report)
    k = len(names)
    fig, axes = plt.subplots(1, len(views), figsize=(4.6 * len(views) + 1.6, 1.4 + 0.3 * k), squeeze=False)
    for ax, (who, view) in zip(axes[0], views):
        histogram = np.array([view["classes"][c]["confidence_histogram"] for c in names], dtype=float)
        shares = histogram / np.clip(histogram.sum(1, keepdims=True), 1, None)
        image = ax.imshow(shares, aspect="auto", cmap="viridis", vmin=0, vmax=max(shares.max(), 1e-9))
        ax.set_xticks(
            np.arange(CONFIDENCE_BINS + 1) - 0.5,
            [f"{b / CONFIDENCE_BINS:.1f}" for b in range(CONFIDENCE_BINS + 1)],
            fontsize=8,
        )
        ax.set_yticks(
            range(k), [f"{c} ({view['classes'][c]['predicted']})" for c in names], fontsize=9 if k <= 30 else 7
        )
        ax.set_xlabel("top probability")
        ax.set_title(f"{who}: confidence of each class's texts", fontsize=10)
        fig.colorbar(image, ax=ax, fraction=0.04, label="share of the class's texts")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def runner_up_png(path: str, report: dict) -> None:
    """The teacher's (top class x runner-up class) matrix, each row as shares of that class's texts."""
    plt = _pyplot()
    names = report["class_names"]
    k = len(names)
    matrix = np.array(report["teacher_view"]["runner_up"], dtype=float)
    shares = matrix / np.clip(matrix.sum(1, keepdims=True), 1, None)
    size = max(4.5, 0.32 * k + 2.5)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    image = ax.imshow(
        shares, cmap="Oranges", vmin=0, vmax=max(shares.max(), 1e-9)
    )  # many classes: small shares must still show
    ax.set_xticks(range(k), names, rotation=60, ha="right", fontsize=9 if k <= 30 else 7)
    ax.set_yticks(range(k), names, fontsize=9 if k <= 30 else 7)
    ax.set_xlabel("runner-up class")
    ax.set_ylabel("top class")
    ax.set_title("Teacher: which class comes second")
    if k <= 15:
        for (i, j), value in np.ndenumerate(shares):
            if value >= 0.05:
                ax.text(
                    j,
                    i,
                    f"{value:.0%}",
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="white" if value > 0.5 else "black",
                )
    fig.colorbar(image, ax=ax, fraction=0.04, label="share of the top class's texts")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_plots(output_dir: str, report: dict) -> list[str]:
    import os

    files = {"shares.png": shares_png, "confidence.png": confidence_png, "runner_up.png": runner_up_png}
    for name, draw in files.items():
        draw(os.path.join(output_dir, name), report)
    return list(files)


def _clip(text: str, width: int = 140) -> str:
    text = " ".join(text.split()).replace("|", "\\|")
    return text if len(text) <= width else text[: width - 1] + "…"


def markdown(report: dict, heading: str = "#") -> str:
    """The report as markdown (its plots beside it); `heading` '##' nests it inside the labeled report."""
    names, teacher, refined = report["class_names"], report["teacher_view"], report.get("refined_view")
    k, n = len(names), report["num_examples"]
    sub = heading + "#"
    lines = [
        f"{heading} Look before you train: what the teacher sees, without labels",
        "",
        f"Cache `{report['cache']}`: {n} texts, {k} classes, teacher `{report['teacher']}` "
        f"({report['teacher_kind']}), template "
        f"`{report['hypothesis_template']}`. "
        + (
            f"Refined: the targets stage 2's label-free refinement would train on (fitted on "
            f"{report['refinement']['fitted_on']} texts, "
            f"κ {report['refinement']['kappa']:.1f})."
            if refined
            else "No text embeddings in the cache, so no refined view."
        ),
        "",
        f"{sub} Warnings",
        "",
    ]
    for w in report["warnings"]:
        label = ""
        if "labels" in w:
            label = (
                f" *Labels: {w['labels']['evidence']}: {'confirmed' if w['labels']['confirmed'] else 'not confirmed'}.*"
            )
        lines.append(f"- **{w['kind'].replace('_', ' ')}**: {w['message']}{label}")
    if any(w["kind"] == "teacher_and_refinement_disagree" for w in report["warnings"]):
        lines.append(
            "- Where the teacher and refinement disagree, either can be wrong: refinement trusts how texts cluster, "
            "which on tasks "
            "whose texts do not cluster by class misleads it. Read the class's texts below before rewording."
        )
    if not report["warnings"]:
        lines.append(
            "None: every class gets a plausible share, no two classes look alike to the teacher, and no text was cut."
        )
    truncated = report.get("truncated_texts")
    lines += [
        "",
        f"Texts cut at the teacher's maximum length ({report['max_length']} tokens): {truncated} "
        f"({truncated / max(n, 1):.1%})."
        if truncated is not None
        else "Texts cut at the teacher's maximum length: not recorded (a cache from before zsdistill counted them).",
    ]
    lines += [
        "",
        f"{sub} Class shares and confidence",
        "",
        "![class shares](shares.png)",
        "",
        "| class | teacher share | "
        + ("refined share | " if refined else "")
        + "teacher mean confidence | "
        + ("refined mean confidence | " if refined else "")
        + "usual runner-up |",
        "| --- | --- | " + ("--- | " if refined else "") + "--- | " + ("--- | " if refined else "") + "--- |",
    ]
    for c in names:
        t = teacher["classes"][c]
        cells = [f"{t['share']:.1%}"] + ([f"{refined['classes'][c]['share']:.1%}"] if refined else [])
        cells += [f"{t['mean_confidence']:.2f}" if t["mean_confidence"] is not None else "-"]
        if refined:
            r = refined["classes"][c]
            cells += [f"{r['mean_confidence']:.2f}" if r["mean_confidence"] is not None else "-"]
        lines.append(f"| {c} | " + " | ".join(cells) + f" | {t['usual_runner_up'] or '-'} |")
    lines += [
        "",
        f"Uniform share: {1 / k:.1%}. Mean top probability: teacher {teacher['mean_confidence']:.2f}"
        + (f", refined {refined['mean_confidence']:.2f}" if refined else "")
        + ".",
        "",
        "![confidence per class](confidence.png)",
        "",
    ]
    runner_up = np.array(teacher["runner_up"])
    pairs = sorted(
        ((runner_up[a, b] + runner_up[b, a], a, b) for a in range(k) for b in range(a + 1, k)), reverse=True
    )[:10]
    lines += [
        f"{sub} Classes the teacher hesitates between",
        "",
        "Pairs where one is the other's runner-up most often (a confusion picture without labels):",
        "",
        "| pair | texts | as a share of both classes' texts |",
        "| --- | --- | --- |",
    ]
    count = np.array([teacher["classes"][c]["predicted"] for c in names])
    for total, a, b in pairs:
        if total:
            lines.append(f"| {names[a]} / {names[b]} | {total} | {total / max(count[a] + count[b], 1):.0%} |")
    lines += [
        "",
        "![runner-up matrix](runner_up.png)",
        "",
        f"{sub} Per class: most confident and most borderline texts (teacher)",
        "",
    ]
    refinement_warned = {  # where refinement and the teacher part ways, its surest texts too
        c
        for w in report["warnings"]
        if w["kind"] in ("refinement_drifts", "refinement_grows_a_spread_class")
        for c in w["classes"]
    }
    for c in names:
        t = teacher["classes"][c]
        lines.append(f"**{c}** ({t['predicted']} texts)")
        lines.append("")
        for e in t["most_confident"][:SHOWN]:
            lines.append(f"- sure ({e['confidence']:.2f}): {_clip(e['text'])}")
        for e in t["most_borderline"][:SHOWN]:
            lines.append(
                f"- borderline ({e['confidence']:.2f} vs '{e['runner_up']}' {e['runner_up_probability']:.2f}): "
                f"{_clip(e['text'])}"
            )
        if not t["predicted"]:
            lines.append("- no text has it as its top class")
        if c in refinement_warned:
            for e in refined["classes"][c]["most_confident"][:SHOWN]:
                lines.append(f"- refined, sure ({e['confidence']:.2f}): {_clip(e['text'])}")
        lines.append("")
    return "\n".join(lines) + "\n"


def head(markdown_text: str, report_path: str) -> str:
    """What a stage prints of the report: its summary and warnings, and where the rest is."""
    return re.split(r"\n#+ Class shares", markdown_text)[0].rstrip() + f"\n\n(the rest of it: {report_path})\n"
