"""The label-free report of a cache (evaluate.py --teacher_cache alone): warnings that name the class, plots, memory."""

import json
import os

import numpy as np
from conftest import keyword_task, run_main, write_toy_cache

import evaluate
from zsdistill import cache, cache_report

CLASSES = ["apple", "river", "guitar", "soccer", "doctor"]


def clustered_embeddings(labels: np.ndarray, num_classes: int, seed: int = 0, noise: float = 0.3) -> np.ndarray:
    """Texts that cluster by their class: one direction per class plus noise, L2-normalised."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(num_classes, 16))
    x = centers[labels] + noise * rng.normal(size=(len(labels), 16))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def report_of(path: str, output_dir: str) -> dict:
    return evaluate.main(teacher_cache=path, output_dir=output_dir)["cache_report"]


def labeled_run(path: str, texts: list[str], labels, names: list[str], tmp_path) -> dict:
    """evaluate.py --teacher_cache --test_file over the cache's own texts with these labels: its whole result."""
    (tmp_path / "labeled.jsonl").write_text(
        "".join(json.dumps({"text": t, "label": names[y]}) + "\n" for t, y in zip(texts, labels))
    )
    return evaluate.main(
        teacher_cache=path, test_file=str(tmp_path / "labeled.jsonl"), output_dir=str(tmp_path / "labeled")
    )


def embedding_cache(directory, teacher: np.ndarray, embeddings: np.ndarray, names: list[str], shard_size: int) -> str:
    """An embedding-teacher cache of texts "text i" whose probabilities are `teacher` (softmax(s / 0.05) of its
    similarities s), with these text embeddings."""
    from zsdistill import targets

    columns = {"similarity": (targets.SIMILARITY_SCALE * np.log(teacher)).astype(np.float32)}
    texts = [f"text {i}" for i in range(len(teacher))]
    return write_toy_cache(
        str(directory), texts, names, columns, kind="embedding", shard_size=shard_size, text_embeddings=embeddings
    )


def test_clean_balanced_cache_gets_no_warning(tmp_path):
    texts, labels, columns = keyword_task(600, CLASSES)
    path = write_toy_cache(
        str(tmp_path / "cache" / "clean"),
        texts,
        CLASSES,
        columns,
        shard_size=128,
        text_embeddings=clustered_embeddings(labels, len(CLASSES)),
    )
    report = report_of(path, str(tmp_path / "report"))
    assert report["warnings"] == []
    assert report["refined_view"] is not None
    shares = [report["teacher_view"]["classes"][c]["share"] for c in CLASSES]
    assert np.allclose(sum(shares), 1) and min(shares) > 0.15
    markdown = open(tmp_path / "report" / "report.md").read()
    assert "None: every class gets a plausible share" in markdown
    for name in ("shares.png", "confidence.png", "runner_up.png", "report.json"):
        assert os.path.getsize(tmp_path / "report" / name) > 0
    # The examples are real rows of the cache, the surest one first.
    sure = report["teacher_view"]["classes"]["guitar"]["most_confident"]
    assert [e["text"] for e in sure] == [texts[e["row"]] for e in sure]
    assert sure[0]["confidence"] >= sure[-1]["confidence"] and all("guitar" in e["text"] for e in sure)


def test_a_class_never_predicted_is_named_with_the_class_that_takes_its_texts(tmp_path):
    texts, labels, columns = keyword_task(600, CLASSES)
    # The teacher never puts 'doctor' first; its texts go to 'soccer', where 'doctor' comes second.
    doctor, soccer = CLASSES.index("doctor"), CLASSES.index("soccer")
    columns["entailment"][:, doctor] -= 2.0
    columns["entailment"][labels == doctor, soccer] += 4.0
    path = write_toy_cache(str(tmp_path / "cache" / "rare"), texts, CLASSES, columns, shard_size=128)
    report = report_of(path, str(tmp_path / "report"))
    rare = [w for w in report["warnings"] if w["kind"] == "rarely_predicted"]
    assert [w["classes"] for w in rare] == [["doctor"]]
    assert (
        "'doctor' is never the teacher's top class" in rare[0]["message"]
        and "its texts go to 'soccer'" in rare[0]["message"]
    )
    assert "'doctor' is never the teacher's top class" in open(tmp_path / "report" / "report.md").read()
    # Held-out labels confirm it: the teacher's recall of 'doctor' is 0 (evaluate.py --teacher_cache --test_file).
    labeled = labeled_run(path, texts, labels, CLASSES, tmp_path)
    confirmed = [w for w in labeled["cache_report"]["warnings"] if w["kind"] == "rarely_predicted"][0]["labels"]
    assert confirmed["confirmed"] and "recall of 'doctor' 0.00" in confirmed["evidence"]
    assert labeled["teacher"]["metrics"]["per_class"]["doctor"]["recall"] == 0.0
    markdown = open(tmp_path / "labeled" / "report.md").read()
    assert (
        "| doctor | 0.000 | 0.000 |" in markdown
        and "*Labels: teacher recall of 'doctor' 0.00" in markdown
        and "confirmed.*" in markdown
    )


def test_two_identical_class_names_are_flagged(tmp_path):
    classes = CLASSES + ["Soccer"]  # the same class twice, as a user's typo: the teacher scores both alike
    texts, labels, columns = keyword_task(600, CLASSES)
    rng = np.random.default_rng(1)
    columns = {
        name: np.concatenate([v, v[:, [3]] + rng.normal(0, 0.01, (len(texts), 1)).astype(np.float32)], axis=1)
        for name, v in columns.items()
    }
    path = write_toy_cache(str(tmp_path / "cache" / "twins"), texts, classes, columns, shard_size=128)
    report = report_of(path, str(tmp_path / "report"))
    assert [(w["kind"], w["classes"]) for w in report["warnings"]] == [("indistinct", ["soccer", "Soccer"])]


def test_a_class_that_takes_most_texts_is_flagged(tmp_path):
    texts, labels, columns = keyword_task(600, CLASSES)
    columns["entailment"][:, 0] += 3.3  # "apple" wins over most texts of other classes
    path = write_toy_cache(str(tmp_path / "cache" / "broad"), texts, CLASSES, columns, shard_size=128)
    kinds = {(w["kind"], tuple(w["classes"])) for w in report_of(path, str(tmp_path / "report"))["warnings"]}
    assert ("dominant", ("apple",)) in kinds


def test_report_reads_in_chunks_and_matches_a_one_shard_cache(tmp_path):
    texts, labels, columns = keyword_task(500, CLASSES)
    embeddings = clustered_embeddings(labels, len(CLASSES), noise=0.8)
    many = write_toy_cache(
        str(tmp_path / "a" / "many"), texts, CLASSES, columns, shard_size=37, text_embeddings=embeddings
    )
    one = write_toy_cache(
        str(tmp_path / "b" / "one"), texts, CLASSES, columns, shard_size=500, text_embeddings=embeddings
    )
    a, b = (cache_report.build(p, cache.load_cache(p)[0]) for p in (many, one))
    a.pop("cache"), b.pop("cache")

    def rounded(x):  # sums over shards differ from one sum in the last bits only
        return (
            round(x, 6)
            if isinstance(x, float)
            else {k: rounded(v) for k, v in x.items()}
            if isinstance(x, dict)
            else [rounded(v) for v in x]
            if isinstance(x, list)
            else x
        )

    assert json.dumps(rounded(a), sort_keys=True) == json.dumps(rounded(b), sort_keys=True)


def test_refinement_sample_covers_the_corpus_evenly(tmp_path):
    chunks = lambda: iter(
        [(0, np.arange(10)[:, None]), (10, np.arange(10, 17)[:, None]), (17, np.arange(17, 30)[:, None])]
    )  # noqa: E731
    rows = np.concatenate([c.ravel() for _, c in cache_report._sampled(chunks, 4)()])
    assert rows.tolist() == list(range(0, 30, 4))
    assert [start for start, _ in cache_report._sampled(chunks, 4)()] == [0, 3, 5]


def test_model_without_test_file_is_a_one_line_error(tmp_path):
    result = run_main("evaluate.py", "--model", str(tmp_path), "--output_dir", str(tmp_path / "r"))
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [
        "error: --test_file is missing: a student's report needs both --model and --test_file; the teacher alone "
        "needs --teacher_cache "
        "(with --test_file, against its labels)"
    ]
    result = run_main("evaluate.py", "--output_dir", str(tmp_path / "r"))
    assert result.returncode == 2 and "give --teacher_cache CACHE" in result.stderr


def test_a_class_refinement_grows_with_texts_spread_thin_is_called_a_possible_sink(tmp_path, monkeypatch):
    """The generic class of test_refine's sink task: grown by the refinement before centring, it is reported as a
    possible sink (not as a class the teacher under-predicts); the labels confirm it; centred, there is nothing to
    say."""
    import functools

    from test_refine import sink_task

    from zsdistill import refine

    embeddings, teacher, labels = sink_task()
    names = ["alpha", "beta", "gamma", "small", "generic"]
    texts = [f"text {i}" for i in range(len(labels))]
    path = embedding_cache(tmp_path / "cache" / "sink", teacher, embeddings, names, 256)
    kinds = lambda report: [(w["kind"], w["classes"]) for w in report["warnings"]]  # noqa: E731
    assert not [w for w in kinds(report_of(path, str(tmp_path / "centred"))) if "generic" in w[1]]

    monkeypatch.setattr(refine, "refine", functools.partial(refine.refine, center=False))
    report = report_of(path, str(tmp_path / "before"))
    assert ("refinement_grows_a_spread_class", ["generic"]) in kinds(report)
    assert not [
        w for w in report["warnings"] if w["kind"] == "teacher_and_refinement_disagree" and w["classes"] == ["generic"]
    ]
    message = [w["message"] for w in report["warnings"] if w["kind"] == "refinement_grows_a_spread_class"][0]
    assert "may be a generic class drawing other classes' texts" in message and "spread thin" in message
    labeled = labeled_run(path, texts, labels, names, tmp_path)
    checked = [w for w in labeled["cache_report"]["warnings"] if w["kind"] == "refinement_grows_a_spread_class"][0][
        "labels"
    ]
    assert checked["confirmed"] and "true share of 'generic' 31.9%" in checked["evidence"]


def drift_task() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Embeddings (N, 16), teacher posteriors and labels of three clustered classes where the texts the teacher is
    surest are 'alpha' (30 of its 100) sit in 'beta''s cluster: refinement moves them to 'beta' (as FOLDOC's language
    definitions went to the generic `programming`)."""
    labels = np.repeat([0, 1, 2], 100)
    clusters = labels.copy()
    clusters[:30] = 1  # alpha's first 30 texts look like beta's
    embeddings = clustered_embeddings(clusters, 3, noise=0.2)
    teacher = np.full((300, 3), 0.1, dtype=np.float32)
    teacher[np.arange(300), labels] = 0.8
    teacher[:30] = [0.9, 0.05, 0.05]  # the teacher is surest of exactly those
    teacher[30:100] = [0.6, 0.2, 0.2]
    return embeddings, teacher, labels


def test_a_class_refinement_takes_the_teachers_surest_texts_from_is_said_to_drift(tmp_path):
    """The report says refinement drifts from 'alpha' (it moves every text the teacher is surest are 'alpha'),
    instead of telling the user the teacher over-predicts it; the labels check those texts."""
    embeddings, teacher, labels = drift_task()
    names, texts = ["alpha", "beta", "gamma"], [f"text {i}" for i in range(300)]
    path = embedding_cache(tmp_path / "cache" / "drift", teacher, embeddings, names, 64)
    report = report_of(path, str(tmp_path / "report"))
    assert report["teacher_surest_moved"][0] == [0, 30, 0]  # alpha's surest 20% (ties: all 30) went to beta
    drift = [w for w in report["warnings"] if w["kind"] == "refinement_drifts"]
    assert [w["classes"] for w in drift] == [["alpha"]]
    assert "keeps only 0 of the 30 texts the teacher is surest are 'alpha'" in drift[0]["message"]
    assert "'beta' (30)" in drift[0]["message"] and "--dev_file" in drift[0]["message"]
    assert not [
        w for w in report["warnings"] if w["kind"] == "teacher_and_refinement_disagree" and "alpha" in w["classes"]
    ]
    assert "- refined, sure" in open(tmp_path / "report" / "report.md").read()
    for truth, confirmed in ((labels, True), (np.where(np.arange(300) < 30, 1, labels), False)):
        checked = labeled_run(path, texts, truth, names, tmp_path)["cache_report"]["warnings"]
        evidence = [w["labels"] for w in checked if w["kind"] == "refinement_drifts"][0]
        assert evidence["confirmed"] == confirmed
        assert evidence["evidence"].startswith(f"{30 if confirmed else 0} of the 30 texts the teacher is surest")


def test_a_small_class_refinement_starves_is_named(tmp_path):
    """test_refine's small-class task, 150 texts of each large class: refinement gives the small, diverse class under a
    quarter of the texts the teacher gives it while keeping half of those the teacher is surest of (so it is starved,
    not drifted), and the report says so (not that the teacher over-predicts it); the labels confirm it (its true share
    is over twice the refined one). The clean cache of the first test gets no such warning."""
    from test_refine import small_class_task

    embeddings, teacher, labels = small_class_task()
    rows = np.concatenate([np.flatnonzero(labels == k)[:150] for k in range(3)] + [np.flatnonzero(labels == 3)])
    embeddings, teacher, labels = embeddings[rows], teacher[rows], labels[rows]
    names = ["alpha", "beta", "gamma", "small"]
    texts = [f"text {i}" for i in range(len(labels))]
    path = embedding_cache(tmp_path / "cache" / "small", teacher, embeddings, names, 256)
    report = report_of(path, str(tmp_path / "report"))
    starved = [w for w in report["warnings"] if w["kind"] == "refinement_starves"]
    assert [w["classes"] for w in starved] == [["small"]]
    teacher_share = report["teacher_view"]["classes"]["small"]["share"]
    refined_share = report["refined_view"]["classes"]["small"]["share"]
    message = starved[0]["message"]
    assert refined_share < 0.25 * teacher_share and f"against the teacher's {teacher_share:.1%}" in message
    assert "rarely predict 'small'" in message and "--refine_starved_share 0.75" in message
    assert not [w for w in report["warnings"] if w["kind"] == "teacher_and_refinement_disagree"]
    labeled = labeled_run(path, texts, labels, names, tmp_path)
    checked = [w for w in labeled["cache_report"]["warnings"] if w["kind"] == "refinement_starves"][0]["labels"]
    assert checked["confirmed"] and "true share of 'small' 5.1%" in checked["evidence"]
    assert "teacher recall 0.92" in checked["evidence"]
