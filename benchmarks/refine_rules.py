"""Refined targets only (no student trained): refinement rules and dev-label anchors on benchmarks/quality.py's tasks.

    python benchmarks/quality.py --tasks ... --seeds 0        # first: builds the tasks and their teacher caches
    python benchmarks/refine_rules.py                         # label-free rules, dev anchors, the supervised probe
    python benchmarks/refine_rules.py --density_scales 5,6.5,8  # the density weights' scale on pool subsamples
    python benchmarks/refine_rules.py --prior_floors 0.25,0.4,0.5  # the prior floor's value, the same way
    python benchmarks/refine_rules.py --center_strengths 0.8,0.9  # centring on a fraction of the mean, the same way
    python benchmarks/refine_rules.py --starved_floor  # subsamples without and with the starved floor (a rule tried)
    python benchmarks/refine_rules.py --pool_sizes 500,1000  # the default on small pools (random subsamples)
    python benchmarks/refine_rules.py --dev_draws 20  # the default's targets over 20 dev draws of 8 a class, at random

Per task: the refinement fitted on the unlabeled pool, applied to the test set (what the student is taught);
accuracy / macro-F1 / ECE on the test labels, and the classes lost against the raw teacher (10+ test texts,
teacher recall 0.3+, refined recall under 70% of it: issue 26's rule). Rows:
  - the default (zsdistill/refine.py), with the opt-in prior floor, the release before (no drift guard), the one
    before it (no density weights either), and
    label-free rules tried against issue 26's lost classes, each applied to the default's scores: the teacher's log
    posteriors added (a product of experts), the teacher's posteriors mixed in, a per-class bias that keeps every
    class at least half its teacher share on the pool, each class's prior held at least at the teacher's mean
    posterior on the pool (the same kappa), the starved floor (starved_floored), and a starved class held at a share of
    the teacher's count (--refine_starved_share, propagated);
  - with k dev labels a class, and as many drawn at random (the data's class shares), benchmarks/quality.py's draws
    (outside the test set, and outside the pool where the task has enough labeled texts), embedded by the cache's
    embedding model as train_student.py does, through refine(labeled=...): centroids moved toward them, kappa fitted
    on them cross-fitted; beside the default, each dev text counted as one in its class's anchor weight (the release
    before refine.AGREED_WEIGHT);
  - a supervised reference: logistic regression on the same embeddings of the task's labeled texts outside the test
    set (the pool's own labels where the task has no others), to say which tasks are furthest from what labels
    reach in this space.
Seconds, not minutes: everything is numpy on cached embeddings except embedding the dev texts.
"""

import contextlib
import dataclasses
import json
import os
import sys

import fire
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import quality  # noqa: E402
import train_student  # noqa: E402
from zsdistill import cache, refine, targets  # noqa: E402
from zsdistill.metrics import label_metrics  # noqa: E402


def load_task(name: str, work_dir: str) -> dict:
    data_dir = os.path.join(work_dir, "data", name)
    classes = os.path.join(data_dir, "classes.txt")
    template = quality.DEMO_TEMPLATE if name == "demo" else quality.DEFAULT_TEMPLATE
    task = {"name": name, "data_dir": data_dir}
    for part, data_file in (("pool", "train.txt"), ("test", "test.jsonl")):
        path = quality.teacher_cache(
            os.path.join(data_dir, data_file), classes, os.path.join(work_dir, "cache"), template
        )
        manifest = cache.read_manifest(path)
        task[part] = {
            "path": path,
            "manifest": manifest,
            "teacher": targets.cache_probabilities(path, manifest, False),
            "embeddings": np.concatenate([c for _, c in refine.embedding_chunks(path, manifest)()]),
        }
    task["class_names"] = task["pool"]["manifest"]["class_names"]
    with open(os.path.join(data_dir, "test.jsonl")) as f:
        task["labels"] = np.array([task["class_names"].index(json.loads(line)["label"]) for line in f])
    return task


def fitted(task: dict, labeled: refine.LabeledTexts | None = None, **settings) -> refine.Refinement:
    pool = task["pool"]
    return refine.refine(
        lambda: iter([(0, pool["teacher"])]),
        lambda: iter([(0, pool["embeddings"])]),
        len(pool["teacher"]),
        len(task["class_names"]),
        labeled=labeled,
        **{"propagate": 0.0, **settings},  # only the refinement is used: its centroids score the test texts
    )[1]


def on_test_set(task: dict, refinement: refine.Refinement) -> np.ndarray:
    return refine.softmax_rows(refinement.log_scores(task["test"]["embeddings"]).astype(np.float64))


def lost_classes(task: dict, predicted: np.ndarray) -> list[str]:
    labels, taught = task["labels"], task["test"]["teacher"].argmax(1)
    lost = []
    for k, name in enumerate(task["class_names"]):
        mine = labels == k
        teacher_recall = (taught[mine] == k).mean() if mine.any() else 0.0
        if mine.sum() >= quality.MIN_SUPPORT and teacher_recall >= quality.MIN_TARGET_RECALL:
            if (predicted[mine] == k).mean() < quality.KEPT_FRACTION * teacher_recall:
                lost.append(name)
    return lost


def cell(task: dict, probabilities: np.ndarray) -> str:
    m = label_metrics(task["labels"], probabilities, task["class_names"], False)
    lost = lost_classes(task, probabilities.argmax(1))
    return f"{m['accuracy']:.3f} / {m['macro_f1']:.3f} / {m['ece']:.3f}" + (
        f" (lost: {', '.join(lost)})" if lost else ""
    )


def share_floor(log_scores: np.ndarray, teacher: np.ndarray, floor: float) -> np.ndarray:
    """Per-class additive biases so that every class's share of the argmax is at least `floor` x its teacher share."""
    n, k = log_scores.shape
    teacher_share = np.bincount(teacher.argmax(1), minlength=k) / n
    bias = np.zeros(k)
    for _ in range(100):
        share = np.bincount((log_scores + bias).argmax(1), minlength=k) / n
        under = np.flatnonzero(share < floor * teacher_share - 1e-9)
        if not len(under):
            break
        c = under[np.argmin(share[under] / teacher_share[under])]
        margins = np.sort((log_scores + bias).max(1) - (log_scores[:, c] + bias[c]))
        bias[c] += margins[min(int(np.ceil(floor * teacher_share[c] * n)), n) - 1] + 1e-6
    return bias


def teacher_prior_floor(log_priors: np.ndarray, teacher: np.ndarray) -> np.ndarray:
    """Refinement's log priors with each class's prior raised to at least the teacher's mean posterior, renormalised."""
    priors = np.maximum(np.exp(log_priors.astype(np.float64)), teacher.mean(0))
    return np.log(priors / priors.sum()).astype(np.float32)


def starved_floored(task: dict, refinement: refine.Refinement) -> refine.Refinement:
    """The starved floor, a rule tried and left (results/cpu_starved_floor.md, where it was briefly the library's
    default): the prior of each class the refinement's labels starve on the pool (refine.starved_classes) raised to the
    smaller of the teacher's mean posterior and refine.PRIOR_FLOOR / K, renormalised, and kappa fitted again
    (label-free)."""
    pool, num_classes = task["pool"], len(task["class_names"])
    similarity = refinement.space(pool["embeddings"]) @ refinement.centroids.T
    taught = pool["teacher"].argmax(1)
    refined = (refinement.kappa * similarity + refinement.log_priors).argmax(1)
    priors = np.exp(refinement.log_priors.astype(np.float64))
    floor = np.minimum(refinement.teacher_prior, refine.PRIOR_FLOOR / num_classes)
    starved = np.isin(np.arange(num_classes), refine.starved_classes(taught, refined, num_classes)) & (priors < floor)
    if not starved.any():
        return refinement
    priors = np.where(starved, floor, priors)
    log_priors = np.log(priors / priors.sum()).astype(np.float32)
    kappa = refine.fit_kappa(similarity, log_priors, taught, refine.MIN_KAPPA_CENTERED)
    return dataclasses.replace(refinement, log_priors=log_priors, kappa=kappa)


def propagated(task: dict, refinement: refine.Refinement, alpha: float = 0.5) -> np.ndarray:
    """The default's targets on the pool and the test texts together, propagated over their neighbour graph
    (refine.propagated, as --refine_propagate does on the pool): the test rows. Propagation is transductive, so the
    test texts join the graph as unlabeled texts; a student sees the pool's propagated targets only."""
    embeddings = np.concatenate([task["pool"]["embeddings"], task["test"]["embeddings"]])
    targets = refine.softmax_rows(refinement.log_scores(embeddings).astype(np.float32))
    return refine.propagated(targets, refinement, lambda: iter([(0, embeddings)]), alpha)[
        len(task["pool"]["embeddings"]) :
    ]


def dev_draw(
    task: dict, per_class: int, seed: int, at_random: bool = False, encoder: str | None = None
) -> refine.LabeledTexts:
    """benchmarks/quality.py's dev draw, embedded by the cache's embedding model (or by an adapted `encoder`)."""
    rows = quality.draw_dev_rows(task["name"], task["data_dir"], per_class, seed, at_random)
    embeddings = train_student.embed_dev_texts(task["pool"]["manifest"], [r["text"] for r in rows], encoder)
    return refine.LabeledTexts(embeddings, np.array([task["class_names"].index(r["label"]) for r in rows]))


def counted_as_one(task: dict, draw: refine.LabeledTexts) -> tuple[str, np.ndarray]:
    """The row of the release before refine.AGREED_WEIGHT under a draw: each dev text counted as one, propagated."""
    refinement = fitted(task, draw, dev_agreement=False)
    return "... every dev text counted as one (the release before), propagated", propagated(task, refinement)


def supervised_probe(task: dict) -> str:
    """Logistic regression on the embeddings of labeled texts outside the test set (at most 6,000)."""
    from sklearn.linear_model import LogisticRegression

    source = "labeled.jsonl" if task["name"] != "demo" else "dev.jsonl"
    with open(os.path.join(task["data_dir"], source)) as f:
        rows = [json.loads(line) for line in f][:6000]
    embeddings = train_student.embed_dev_texts(task["pool"]["manifest"], [r["text"] for r in rows])
    y = np.array([task["class_names"].index(r["label"]) for r in rows])
    probe = LogisticRegression(C=10.0, max_iter=2000, class_weight="balanced").fit(embeddings, y)
    return cell(task, probe.predict_proba(task["test"]["embeddings"])) + f" ({len(rows)} labeled texts)"


@contextlib.contextmanager
def refinement_setting(setting: str, value: float | None):
    """refine() with `setting` at `value` while inside, and the settings for fitted(): "density_weights"
    (refine.DENSITY_SCALE; None: without density weights), "prior_floor" (refine.PRIOR_FLOOR; None: without the floor)
    or "center_strength" (centring on value x the corpus mean instead of the mean itself, a rule tried and left; None:
    the default, the whole mean), "drift_guard" (None: without the drift guard; any value: with it) or "starved_floor"
    (no setting of refine(): subsample_sweep applies starved_floored to the fitted refinement)."""
    if setting in ("drift_guard", "starved_floor"):
        yield {"drift_guard": value is not None} if setting == "drift_guard" else {}
        return
    if setting == "center_strength":
        mean_embedding = refine.mean_embedding
        refine.mean_embedding = lambda chunks, rows: (value or 1.0) * mean_embedding(chunks, rows)
        try:
            yield {}
        finally:
            refine.mean_embedding = mean_embedding
        return
    constant = {"density_weights": "DENSITY_SCALE", "prior_floor": "PRIOR_FLOOR"}[setting]
    default_value = getattr(refine, constant)
    setattr(refine, constant, value or default_value)
    try:
        yield {setting: value is not None}
    finally:
        setattr(refine, constant, default_value)


def subsample(task: dict, size: int, seed: int) -> dict:
    """The task with `size` of its pool texts, drawn at random with `seed` (in pool order)."""
    pool = task["pool"]
    rows = np.sort(np.random.default_rng(seed).choice(len(pool["teacher"]), size, replace=False))
    return {**task, "pool": {**pool, "teacher": pool["teacher"][rows], "embeddings": pool["embeddings"][rows]}}


def subsample_sweep(names: list[str], setting: str, values: list[float], subsamples: int, work_dir: str) -> None:
    """Macro-F1 of the refined targets (mean and spread over `subsamples` random 70% subsamples of each pool; classes
    lost against the teacher, summed over them) without a refinement setting and with each of its values
    (refinement_setting)."""
    tasks = {name: load_task(name, work_dir) for name in names}
    print(f"| {setting} | " + " | ".join(names) + " | mean |\n|" + " --- |" * (len(names) + 2))
    for value in [None, *values]:
        cells, means = [], []
        for name, task in tasks.items():
            pool, scores, lost = task["pool"], [], 0
            for seed in range(subsamples):
                sub = subsample(task, int(0.7 * len(pool["teacher"])), seed)
                with refinement_setting(setting, value) as settings:
                    refinement = fitted(sub, **settings)
                if setting == "starved_floor" and value is not None:
                    refinement = starved_floored(sub, refinement)
                probabilities = on_test_set(task, refinement)
                scores.append(label_metrics(task["labels"], probabilities, task["class_names"], False)["macro_f1"])
                lost += len(lost_classes(task, probabilities.argmax(1)))
            cells.append(f"{np.mean(scores):.3f} ± {np.std(scores):.3f} ({lost})")
            means.append(np.mean(scores))
        label = "none" if value is None else "on" if setting in ("drift_guard", "starved_floor") else value
        print(f"| {label} | " + " | ".join(cells) + f" | {np.mean(means):.4f} |", flush=True)


def lost_summed(lost: list[str]) -> str:
    """Classes lost over several runs: their count, then each class with how many runs lost it."""
    named = ", ".join(f"{c} x{lost.count(c)}" for c in sorted(set(lost)))
    return f"{len(lost)}{': ' + named if named else ''}"


def small_pools(names: list[str], sizes: list[int], subsamples: int, work_dir: str) -> None:
    """The default refinement on small pools: per task and pool size, `subsamples` random subsamples of the pool
    (issue 26's set D has 475 texts; these tasks' pools have 2,500-8,000), the targets propagated as the student is
    taught them, on the test set: macro-F1 (mean and spread), the raw teacher's beside it, and the classes lost against
    the teacher (10+ test texts, teacher recall 0.3+, recall under 70% of it), summed over the subsamples and named."""
    print("| task | pool texts | raw teacher | refined targets | classes lost (summed) |")
    print("| --- | --- | --- | --- | --- |")
    for name in names:
        task = load_task(name, work_dir)
        teacher = label_metrics(task["labels"], task["test"]["teacher"], task["class_names"], False)["macro_f1"]
        for size in sizes:
            scores, lost = [], []
            for seed in range(subsamples):
                sub = subsample(task, size, seed)
                probabilities = propagated(sub, fitted(sub))
                scores.append(label_metrics(task["labels"], probabilities, task["class_names"], False)["macro_f1"])
                lost += lost_classes(task, probabilities.argmax(1))
            print(
                f"| {name} | {size} | {teacher:.3f} | {np.mean(scores):.3f} ± {np.std(scores):.3f} | "
                f"{lost_summed(lost)} |",
                flush=True,
            )


def dev_draw_spread(names: list[str], per_class: int, draws: int, work_dir: str) -> None:
    """The default refinement with a dev set, over `draws` draws of `per_class` labels a class and as many texts drawn
    at random (benchmarks/quality.py's draws, seeds 0 to draws - 1), the targets propagated as the student is taught
    them, on the test set: median and range of ECE and macro-F1, how many draws put the ECE over 0.08 (issue 27's
    mark), and the classes lost against the teacher, summed over the draws. How much of a check on one draw is the
    draw."""
    print(
        "| task | dev draw | ECE: median (range) | draws over 0.08 | macro-F1: median (range) | classes lost (summed) |"
    )
    print("| --- | --- | --- | --- | --- | --- |")
    for name in names:
        task = load_task(name, work_dir)
        for at_random in (False, True):
            eces, macro_f1s, lost = [], [], []
            for seed in range(draws):
                probabilities = propagated(task, fitted(task, dev_draw(task, per_class, seed, at_random=at_random)))
                m = label_metrics(task["labels"], probabilities, task["class_names"], False)
                eces.append(m["ece"])
                macro_f1s.append(m["macro_f1"])
                lost += lost_classes(task, probabilities.argmax(1))
            design = f"{per_class} x {len(task['class_names'])} at random" if at_random else f"{per_class} a class"
            print(
                f"| {name} | {design} | {np.median(eces):.3f} ({min(eces):.3f}-{max(eces):.3f}) | "
                f"{sum(e > 0.08 for e in eces)} of {draws} | {np.median(macro_f1s):.3f} "
                f"({min(macro_f1s):.3f}-{max(macro_f1s):.3f}) | {lost_summed(lost)} |",
                flush=True,
            )


def label_shift_rows(
    task: dict, draw: refine.LabeledTexts, refinement: refine.Refinement
) -> list[tuple[str, np.ndarray]]:
    """The default's `refinement` fitted with `draw`, its confidence re-fitted with each dev text weighted by
    (estimated share of its class in the corpus) / (its share in the dev set): a dev set of k a class over-represents
    small classes, and the targets' confidence fitted on it is that of a balanced test set. The shares are estimated
    without labels of the pool by black-box shift estimation (Lipton et al. 2018): the dev texts' confusion matrix
    (each scored by a refinement made without it, as refine() fits kappa) and the pool's predicted shares, C pi = mu,
    pi >= 0. Rows: kappa re-fitted weighted (moves the argmax a little), and one temperature over the whole log scores
    (keeps it). The distances of pi and of the refined priors from the test set's true shares are in the labels."""
    from scipy.optimize import minimize_scalar, nnls

    pool, num_classes = task["pool"], len(task["class_names"])
    held_out = refine.cross_fitted_similarity(
        draw,
        num_classes,
        lambda rest: refine.rounds(
            lambda: iter([(0, pool["teacher"])]),
            lambda: iter([(0, pool["embeddings"])]),
            len(pool["teacher"]),
            num_classes,
            labeled=rest,
        )[0],
    ).astype(np.float64)
    labels, log_priors = draw.labels, refinement.log_priors.astype(np.float64)
    confusion = np.zeros((num_classes, num_classes))
    np.add.at(confusion, ((refinement.kappa * held_out + log_priors).argmax(1), labels), 1.0)
    confusion /= np.maximum(confusion.sum(0, keepdims=True), 1.0)
    mu = np.bincount(refinement.log_scores(pool["embeddings"]).argmax(1), minlength=num_classes) / len(pool["teacher"])
    shares = nnls(confusion, mu)[0]
    shares /= shares.sum()
    weights = (shares / (np.bincount(labels, minlength=num_classes) / len(labels)))[labels]
    weights /= weights.mean()

    def weighted_nll(scores: np.ndarray) -> float:
        return float(((np.logaddexp.reduce(scores, axis=1) - scores[np.arange(len(scores)), labels]) * weights).mean())

    lowest = np.log(refine.MIN_KAPPA_CENTERED)
    log_kappa = minimize_scalar(
        lambda lk: weighted_nll(np.exp(lk) * held_out + log_priors),
        bounds=(lowest, np.log(refine.KAPPA)),
        method="bounded",
    ).x
    dev_scores = refinement.kappa * held_out + log_priors
    log_t = minimize_scalar(
        lambda lt: weighted_nll(dev_scores / np.exp(lt)), bounds=(np.log(0.05), np.log(20.0)), method="bounded"
    ).x
    true = np.bincount(task["labels"], minlength=num_classes) / len(task["labels"])
    priors = np.exp(log_priors - np.logaddexp.reduce(log_priors))
    distance = (
        f"shares' distance from the test set's: BBSE {0.5 * np.abs(shares - true).sum():.2f}, "
        f"refined priors {0.5 * np.abs(priors - true).sum():.2f}"
    )
    reweighted = dataclasses.replace(refinement, kappa=float(np.exp(log_kappa)))
    test_scores = refinement.log_scores(task["test"]["embeddings"]).astype(np.float64)
    return [
        (
            f"... kappa fitted on them weighted to the estimated shares ({np.exp(log_kappa):.1f}; {distance})",
            on_test_set(task, reweighted),
        ),
        (
            f"... one temperature over the log scores, so weighted (T = {np.exp(log_t):.2f})",
            refine.softmax_rows(test_scores / np.exp(log_t)),
        ),
    ]


def main(
    tasks: str | tuple = tuple(quality.TASKS),
    dev_per_class: str | int | tuple = (4, 8, 16),
    seeds: str | int | tuple = (0, 1),
    work_dir: str = "bench/quality",
    supervised: bool = True,
    dev_at_random: bool = True,
    density_scales: str | float | tuple = (),
    prior_floors: str | float | tuple = (),
    center_strengths: str | float | tuple = (),
    subsamples: int = 3,
    label_shift: bool = False,
    drift_guard: bool = False,
    starved_floor: bool = False,
    pool_sizes: str | int | tuple = (),
    dev_draws: int = 0,
) -> None:
    """Print one markdown table per task; dev_at_random adds, for each k and seed, a dev set of as many texts drawn at
    random (the data's class shares, a small class perhaps without any) beside the one with k a class. With
    density_scales (e.g. 5,6.5,8), prior_floors (e.g. 0.25,0.4,0.5) or center_strengths (e.g. 0.8,0.9): only that
    setting's sweep on subsamples of the pools (subsample_sweep). label_shift adds, under each draw of k a class, its
    confidence re-fitted to the estimated class shares (label_shift_rows). drift_guard (starved_floor): only the
    subsamples without and with the drift guard (the starved floor). pool_sizes (e.g. 500,1000): only the default
    refinement on `subsamples` random pools of each size (small_pools). dev_draws (e.g. 20): only the default with
    that many dev draws of dev_per_class (8 unless given) a class and at random (dev_draw_spread)."""
    if dev_draws:
        per_class = quality.as_list(dev_per_class, int)
        per_class = per_class[0] if len(per_class) == 1 else 8
        return dev_draw_spread(quality.as_list(tasks, str), per_class, dev_draws, work_dir)
    if pool_sizes:
        return small_pools(quality.as_list(tasks, str), quality.as_list(pool_sizes, int), subsamples, work_dir)
    sweeps = (("density_weights", density_scales), ("prior_floor", prior_floors), ("center_strength", center_strengths))
    sweeps += (("drift_guard", (1.0,) if drift_guard else ()), ("starved_floor", (1.0,) if starved_floor else ()))
    for setting, values in sweeps:
        if values:
            names, values = quality.as_list(tasks, str), quality.as_list(values, float)
            return subsample_sweep(names, setting, values, subsamples, work_dir)
    before = dict(density_weights=False, drift_guard=False)
    for name in quality.as_list(tasks, str):
        task = load_task(name, work_dir)
        test, teacher = task["test"], task["test"]["teacher"]
        default = fitted(task)
        scores = default.log_scores(test["embeddings"]).astype(np.float64)
        rows = [
            ("raw teacher", teacher),
            ("refined, the default", refine.softmax_rows(scores.copy())),
            ("with the prior floor (--refine_prior_floor)", on_test_set(task, fitted(task, prior_floor=True))),
            (
                "refined without the drift guard (the release before)",
                on_test_set(task, fitted(task, drift_guard=False)),
            ),
            ("... and without density weights (two releases before)", on_test_set(task, fitted(task, **before))),
            (
                "+ 0.5 x the teacher's log posteriors",
                refine.softmax_rows(scores + 0.5 * np.log(np.clip(teacher, 1e-12, 1))),
            ),
            ("mixed with 35% of the teacher's posteriors", 0.65 * refine.softmax_rows(scores.copy()) + 0.35 * teacher),
        ]
        pool_scores = default.log_scores(task["pool"]["embeddings"]).astype(np.float64)
        bias = share_floor(pool_scores, task["pool"]["teacher"], 0.5)
        rows.append(("every class at least half its teacher share (pool)", refine.softmax_rows(scores + bias)))
        floored = dataclasses.replace(
            default, log_priors=teacher_prior_floor(default.log_priors, task["pool"]["teacher"])
        )
        rows.append(("every class's prior at least the teacher's (pool)", on_test_set(task, floored)))
        rows.append(("the starved floor (a rule tried)", on_test_set(task, starved_floored(task, default))))
        rows.append(
            ("propagated, alpha 0.5 (--refine_propagate; the test texts join the graph)", propagated(task, default))
        )
        for share in (0.5, 0.75, 1.0):
            label = f"... a starved class held at {share:g} of the teacher's count (--refine_starved_share {share:g})"
            rows.append((label, propagated(task, fitted(task, starved_share=share))))
        for k in quality.as_list(dev_per_class, int):
            for seed in quality.as_list(seeds, int):
                draw = dev_draw(task, k, seed)
                anchored = fitted(task, draw)
                std = anchored.dev_bias_std
                label = f"{k} dev labels a class, seed {seed} (prior bias: " + (f"std {std:g})" if std else "none)")
                rows.append((label, on_test_set(task, anchored)))
                rows.append(("... propagated (the default; the test texts join the graph)", propagated(task, anchored)))
                rows.append(counted_as_one(task, draw))
                rows.append(("... without density weights", on_test_set(task, fitted(task, draw, **before))))
                rows.append(
                    (
                        "... without the prior bias (the release before)",
                        on_test_set(task, fitted(task, draw, dev_bias=False)),
                    )
                )
                if label_shift:
                    rows.extend(label_shift_rows(task, draw, anchored))
                if dev_at_random:
                    draw = dev_draw(task, k, seed, at_random=True)
                    label = f"{k} x {len(task['class_names'])} dev labels at random, seed {seed}"
                    at_random = fitted(task, draw)
                    rows.append((label, on_test_set(task, at_random)))
                    rows.append(("... propagated", propagated(task, at_random)))
                    rows.append(counted_as_one(task, draw))
        print(f"**{name}** ({len(task['class_names'])} classes, {len(task['labels'])} test texts)\n")
        print("| refined targets | accuracy / macro-F1 / ECE (classes lost against the teacher) |\n| --- | --- |")
        for label, probabilities in rows:
            print(f"| {label} | {cell(task, probabilities)} |", flush=True)
        if supervised:
            print(f"| supervised probe (logistic regression on the embeddings) | {supervised_probe(task)} |")
        print(flush=True)


if __name__ == "__main__":
    fire.Fire(main)
