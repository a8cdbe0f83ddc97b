"""Label-free refinement of the teacher's targets (stage 2's default) and the student's calibration."""

import json
import os
import sys

import numpy as np
import pytest
import torch
from sklearn.metrics import f1_score
from conftest import CLASS_NAMES, CORPUS, make_student_base, run_main, run_script, write_toy_cache

import evaluate
import teacher_infer
import train_student
from zsdistill import cache, refine, targets

QUICK = dict(max_steps=2, per_device_train_batch_size=4, use_cpu=True, save_strategy="no", disable_tqdm=True, seed=0)


def clustered_task(bias: bool, per_class: int = 150, width: int = 16, seed: int = 0):
    """Texts in three clean clusters of the embedding space, and a toy teacher's scores for them.

    With `bias`, the teacher systematically calls 60% of class 1 "class 2" (less surely than it is right
    elsewhere, as a real teacher's confusions go); without, it is right everywhere.
    """
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(3), per_class)
    embeddings = np.eye(width)[labels] + 0.15 * rng.normal(size=(len(labels), width))
    embeddings /= np.linalg.norm(embeddings, axis=1, keepdims=True)
    scores = rng.normal(0, 0.1, size=(len(labels), 3))
    scores[np.arange(len(labels)), labels] += 2.0
    confused = np.flatnonzero(labels == 1)[: int(0.6 * per_class)] if bias else np.array([], dtype=int)
    scores[confused, 1] -= 1.5  # 0.5 left for the true class ...
    scores[confused, 2] += 1.0  # ... and 1.0 for the wrong one
    texts = [f"text {i}" for i in range(len(labels))]
    return texts, labels, scores.astype(np.float32), embeddings.astype(np.float32)


def toy_cache(tmp_path, kind: str, bias: bool, name: str = "toy"):
    texts, labels, scores, embeddings = clustered_task(bias)
    columns = (
        {"similarity": scores * targets.SIMILARITY_SCALE}
        if kind == "embedding"
        else {"entailment": scores, "contradiction": -scores}
    )
    path = write_toy_cache(
        str(tmp_path / "cache" / name),
        texts,
        ["zero", "one", "two"],
        columns,
        kind=kind,
        shard_size=64,
        text_embeddings=embeddings,
    )
    return path, labels


@pytest.mark.parametrize("kind", ["nli", "embedding"])
def test_refinement_fixes_a_known_toy_bias(tmp_path, kind):
    path, labels = toy_cache(tmp_path, kind, bias=True)
    manifest, table = cache.load_cache(path)
    teacher_accuracy = (targets.cache_probabilities(path, manifest, False).argmax(1) == labels).mean()
    refined, refinement, info = train_student.build_targets(path, manifest, False, 1.0, refine=True)
    assert teacher_accuracy < 0.85  # the bias is there: 90 of 450 texts wrong
    assert (refined.argmax(1) == labels).mean() >= 0.98, info
    assert refined.dtype == np.float32 and np.allclose(refined.sum(1), 1, atol=1e-5)
    assert info["method"] == refine.METHOD and info["rounds"] >= 1


@pytest.mark.parametrize("kind", ["nli", "embedding"])
def test_refinement_leaves_a_right_teacher_alone(tmp_path, kind):
    path, labels = toy_cache(tmp_path, kind, bias=False)
    manifest, table = cache.load_cache(path)
    teacher = targets.cache_probabilities(path, manifest, False)
    assert (teacher.argmax(1) == labels).all()
    refined, _, info = train_student.build_targets(path, manifest, False, 1.0, refine=True)
    assert (refined.argmax(1) == labels).all() and info["agreement_with_teacher"] == 1.0


def test_refinement_is_deterministic(tmp_path):
    path, _ = toy_cache(tmp_path, "nli", bias=True)
    manifest, table = cache.load_cache(path)
    first, _, _ = train_student.build_targets(path, manifest, False, 1.0, refine=True)
    again, _, _ = train_student.build_targets(path, manifest, False, 1.0, refine=True)
    assert np.array_equal(first, again)


@pytest.mark.parametrize("kind,multi_label", [("nli", False), ("nli", True), ("embedding", False)])
def test_norefine_gives_the_plain_targets_bit_identical(tmp_path, kind, multi_label):
    path, _ = toy_cache(tmp_path, kind, bias=True)
    manifest, table = cache.load_cache(path)
    plain = targets.teacher_probabilities(
        cache.score_arrays(manifest, table), multi_label, 2.0
    )  # the pre-refinement code path
    off, refinement, info = train_student.build_targets(path, manifest, multi_label, 2.0, refine=False)
    assert refinement is None and info["method"] is None
    assert off.dtype == plain.dtype and np.array_equal(off, plain)


def test_temperature_applies_to_the_refined_targets(tmp_path):
    path, _ = toy_cache(tmp_path, "nli", bias=True)
    manifest, table = cache.load_cache(path)
    sharp, _, _ = train_student.build_targets(path, manifest, False, 1.0, refine=True)
    soft, _, _ = train_student.build_targets(path, manifest, False, 3.0, refine=True)
    assert np.array_equal(sharp.argmax(1), soft.argmax(1)) and soft.max(1).mean() < sharp.max(1).mean()
    np.testing.assert_allclose(
        soft, targets._softmax(np.log(sharp.astype(np.float64)) / 3.0), atol=1e-4
    )  # log-odds / T


def test_multi_label_targets_are_used_as_the_teacher_gives_them(tmp_path, capsys):
    path, _ = toy_cache(tmp_path, "nli", bias=True)
    manifest, table = cache.load_cache(path)
    got, refinement, info = train_student.build_targets(path, manifest, True, 1.0, refine=True)
    assert refinement is None and "as the teacher gives them" in info["reason"]
    assert "as the teacher gives them" in capsys.readouterr().err
    assert np.array_equal(got, targets.cache_probabilities(path, manifest, True))


def test_stage_2_never_opens_a_labeled_file(tmp_path):
    """The labeled data (here the very file the cache was made from, and a test set) is never opened by stage 2."""
    labeled = tmp_path / "labeled.jsonl"
    labeled.write_text("".join(json.dumps({"text": t, "label": "x"}) + "\n" for t in CORPUS))
    path, _ = toy_cache(tmp_path, "embedding", bias=True)
    manifest = json.load(open(os.path.join(path, cache.MANIFEST)))
    manifest["data"]["path"] = str(labeled)
    cache.write_json_atomic(os.path.join(path, cache.MANIFEST), manifest)
    opened, recording = [], [True]
    sys.addaudithook(
        lambda event, args: opened.append(str(args[0])) if recording[0] and event == "open" and args else None
    )
    try:
        output = train_student.main(
            cache=path,
            output_dir=str(tmp_path / "student"),
            student_name_or_path=make_student_base(str(tmp_path / "base")),
            **QUICK,
        )
    finally:
        recording[0] = False
    assert any(p.endswith(".arrow") for p in opened)  # the hook saw stage 2's reads
    assert not [p for p in opened if "labeled" in p], opened
    info = json.load(open(os.path.join(output, "distill_info.json")))
    assert info["refinement"]["method"] == refine.METHOD and os.path.exists(os.path.join(output, refine.FILE))


def test_nli_cache_with_embedding_model_is_refined_and_evaluated(teachers, embedding_teacher, tmp_path):
    """Stage 1 keeps text embeddings from --embedding_model; stage 2 refines with them; stage 3 shows the refined
    teacher."""
    from zsdistill import inference
    from zsdistill import teacher as zs_teacher

    data = tmp_path / "texts.txt"
    data.write_text("\n".join(CORPUS * 3) + "\n")
    classes = tmp_path / "classes.txt"
    classes.write_text("\n".join(CLASS_NAMES) + "\n")
    test = tmp_path / "test.jsonl"
    test.write_text(
        "".join(
            json.dumps({"text": t, "label": CLASS_NAMES[i % len(CLASS_NAMES)]}) + "\n" for i, t in enumerate(CORPUS)
        )
    )
    common = dict(
        class_names_file=str(classes), teacher_name_or_path=teachers["upper"], cache_dir=str(tmp_path / "cache")
    )
    plain = teacher_infer.main(data_file=str(data), **common)
    with_embeddings = teacher_infer.main(data_file=str(data), embedding_model=embedding_teacher, **common)
    assert plain != with_embeddings  # the embedding model is part of the key; without it the key is as before
    manifest, table = cache.load_cache(with_embeddings)
    assert manifest["text_embedding_column"] == "text_embedding" and manifest["embedding_model"]["kind"] == "embedding"
    assert cache.read_manifest(plain)["text_embedding_column"] is None
    model, tokenizer = zs_teacher.load_model(
        zs_teacher.resolve_teacher(embedding_teacher, kind="embedding"), torch.device("cpu")
    )
    direct = inference.embed(model, tokenizer, CORPUS * 3, 64, 8, 4096)
    stored = cache.list_column_to_numpy(table.column("text_embedding"), direct.shape[1])
    np.testing.assert_allclose(stored, direct, atol=1e-5)
    # The NLI scores are the same as without the flag: the embedding model only adds a column.
    np.testing.assert_allclose(
        cache.score_arrays(manifest, table)["entailment"],
        cache.score_arrays(*cache.load_cache(plain))["entailment"],
        atol=1e-6,
    )

    student = train_student.main(
        cache=with_embeddings,
        output_dir=str(tmp_path / "student"),
        student_name_or_path=make_student_base(str(tmp_path / "base")),
        **QUICK,
    )
    info = json.load(open(os.path.join(student, "distill_info.json")))
    assert info["refinement"]["method"] == refine.METHOD
    test_cache = teacher_infer.main(data_file=str(test), embedding_model=embedding_teacher, **common)
    report = evaluate.main(
        model=student, test_file=str(test), teacher_cache=test_cache, output_dir=str(tmp_path / "report")
    )
    assert set(report["refined_teacher"]["metrics"]) >= {"accuracy", "macro_f1", "ece"}
    assert "refined teacher" in open(tmp_path / "report" / "report.md").read()
    # A test cache without embeddings from that model: the report says why the refined teacher is missing.
    report = evaluate.main(
        model=student,
        test_file=str(test),
        teacher_cache=teacher_infer.main(data_file=str(test), **common),
        output_dir=str(tmp_path / "report2"),
    )
    assert "no text embeddings" in report["refined_teacher"]["note"]


def test_embedding_model_with_an_embedding_teacher_is_a_user_error(embedding_teacher, corpus_files, tmp_path):
    data, classes = corpus_files
    result = run_main(
        "teacher_infer.py",
        "--data_file",
        data,
        "--class_names_file",
        classes,
        "--teacher_name_or_path",
        embedding_teacher,
        "--embedding_model",
        embedding_teacher,
        "--cache_dir",
        tmp_path / "cache",
    )
    assert (
        result.returncode == 2
        and "--embedding_model is for NLI teachers" in result.stderr
        and "Traceback" not in result.stderr
    )
    assert not os.path.exists(tmp_path / "cache")


@pytest.mark.parametrize("multi_label", [False, True])
def test_calibration_finds_the_temperature_that_matches_the_targets(multi_label):
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 3, size=(500, 4))
    taught = (1 / (1 + np.exp(-logits / 2.5))) if multi_label else targets._softmax(logits / 2.5)
    assert train_student.fit_logit_temperature(logits, taught, multi_label) == pytest.approx(2.5, rel=0.01)


def test_scale_classifier_multiplies_the_logits(tmp_path):
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(
        make_student_base(str(tmp_path / "base")), num_labels=3
    ).eval()
    inputs = {"input_ids": torch.tensor([[101, 2023, 2003, 102]])}
    with torch.no_grad():
        before = model(**inputs).logits
        train_student.scale_classifier(model, 3, 0.4)
        after = model(**inputs).logits
    torch.testing.assert_close(after, before * 0.4)


def test_target_building_memory_is_the_targets_plus_a_shard(tmp_path):
    """Stage 2's targets are one (N, K) float32 array, built shard by shard: never Python lists, never an (N, H)
    copy."""
    import tracemalloc

    rng = np.random.default_rng(0)
    n, k, width = 20_000, 4, 32
    embeddings = rng.normal(size=(n, width)).astype(np.float32)
    embeddings /= np.linalg.norm(embeddings, axis=1, keepdims=True)
    scores = rng.normal(size=(n, k)).astype(np.float32)
    path = write_toy_cache(
        str(tmp_path / "cache" / "big"),
        [f"t{i}" for i in range(n)],
        ["a", "b", "c", "d"],
        {"entailment": scores, "contradiction": -scores},
        shard_size=1000,
        text_embeddings=embeddings,
    )
    manifest, _ = cache.load_cache(path)
    targets_bytes, shard_bytes = n * k * 4, 1000 * (width + 2 * k) * 4
    for refine_flag in (False, True):
        tracemalloc.start()
        got, _, _ = train_student.build_targets(path, manifest, False, 1.0, refine=refine_flag)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert got.shape == (n, k) and got.dtype == np.float32
        # The targets, per-row bookkeeping (a few bytes a row), a few shards' worth and the density weights' reference
        # texts (at most DENSITY_REFERENCE_ROWS a class, whatever N); a list of Python floats would be about 10x the
        # targets, a copy of all embeddings 8x.
        reference_bytes = k * refine.DENSITY_REFERENCE_ROWS * width * 4
        # Propagation (the default): the neighbour graph, O(N * neighbours), one block of similarities to its
        # reference texts, those texts' embeddings and a few (N, K) arrays; never an (N, N) or (N, H) array.
        propagation_bytes = (
            48 * n * refine.PROPAGATE_NEIGHBOURS
            + 24 * refine.PROPAGATE_BLOCK_CELLS
            + 4 * min(n, refine.PROPAGATE_REFERENCE_ROWS) * width
            + 4 * targets_bytes
        )
        bound = 2 * targets_bytes + 16 * n + 8 * shard_bytes + reference_bytes + refine_flag * propagation_bytes
        assert peak < bound, (refine_flag, peak, targets_bytes)


def half_aligned_task(per_class: int = 200, width: int = 16, seed: int = 0):
    """Texts in three tight clusters that are only half aligned with the classes (cluster j holds about half of
    class j's texts, the rest spread over the others), and a teacher right about 70% of the time whatever the
    cluster: a task whose texts do not cluster by class, where refinement's labels are right about half the time."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(3), per_class)
    clusters = np.where(rng.random(len(labels)) < 0.5, labels, (labels + rng.integers(1, 3, size=len(labels))) % 3)
    embeddings = np.eye(width)[clusters] + 0.15 * rng.normal(size=(len(labels), width))
    embeddings /= np.linalg.norm(embeddings, axis=1, keepdims=True)
    scores = rng.normal(0, 0.5, size=(len(labels), 3))
    scores[np.arange(len(labels)), labels] += 1.0
    return labels, scores.astype(np.float32), embeddings.astype(np.float32)


def test_refinement_is_no_more_confident_than_it_is_right_where_texts_do_not_cluster(tmp_path, monkeypatch):
    labels, scores, embeddings = half_aligned_task()
    path = write_toy_cache(
        str(tmp_path / "cache" / "half"),
        [f"text {i}" for i in range(len(labels))],
        ["zero", "one", "two"],
        {"entailment": scores, "contradiction": -scores},
        shard_size=64,
        text_embeddings=embeddings,
    )
    manifest, _ = cache.load_cache(path)

    def overconfidence(refined):
        return refined.max(1).mean() - (refined.argmax(1) == labels).mean()

    refined, refinement, info = train_student.build_targets(path, manifest, False, 1.0, refine=True)
    assert info["kappa"] < refine.KAPPA / 4 and info["rounds_kappa"] == refine.KAPPA
    assert abs(overconfidence(refined)) <= 0.1, (refined.max(1).mean(), (refined.argmax(1) == labels).mean())
    # Without the fitted kappa (the rounds' fixed one, as before), the same targets claim far more than they get right.
    monkeypatch.setattr(refine, "fit_kappa", lambda *args: refine.KAPPA)
    unfitted, _, _ = train_student.build_targets(path, manifest, False, 1.0, refine=True)
    assert overconfidence(unfitted) >= 0.3 and np.array_equal(unfitted.argmax(1), refined.argmax(1))


def test_fitted_kappa_keeps_a_clean_task_confident(tmp_path):
    """Where texts cluster by class and the teacher is right, the fitted kappa stays high: confident, right targets."""
    path, labels = toy_cache(tmp_path, "nli", bias=False)
    manifest, _ = cache.load_cache(path)
    refined, _, info = train_student.build_targets(path, manifest, False, 1.0, refine=True)
    assert (refined.argmax(1) == labels).all() and refined.max(1).mean() >= 0.9, info


def test_nli_cache_made_with_default_flags_keeps_text_embeddings_and_is_refined(
    teachers, embedding_teacher, corpus_files, tmp_path, monkeypatch, capsys
):
    """NLI teachers' caches carry text embeddings by default (the default model named through the environment here,
    since tests are offline); --embedding_model none opts out; a cache made without them lends its NLI scores."""
    from conftest import count_forward_passes

    data, classes = corpus_files
    common = dict(
        data_file=data,
        class_names_file=classes,
        teacher_name_or_path=teachers["upper"],
        cache_dir=str(tmp_path / "cache"),
    )
    monkeypatch.setenv("ZSDISTILL_EMBEDDING_MODEL", embedding_teacher)
    without = teacher_infer.main(embedding_model="none", **common)
    assert cache.read_manifest(without)["text_embedding_column"] is None
    capsys.readouterr()
    counter = count_forward_passes(monkeypatch)
    path = teacher_infer.main(**common)  # default flags
    err = capsys.readouterr().err
    manifest, table = cache.load_cache(path)
    assert (
        path != without
        and manifest["text_embedding_column"] == "text_embedding"
        and manifest["embedding_model"]["name_or_path"] == embedding_teacher
    )
    assert (
        f"text embeddings for refinement: {embedding_teacher}, one pass per text ({len(CORPUS)} texts)" in err
        and "of this process's scoring time" in err
    )
    # The NLI scores came from the cache made without embeddings: only the embedding model ran, once per text.
    assert counter == {"pairs": len(CORPUS), "loads": 1}
    np.testing.assert_array_equal(
        cache.score_arrays(manifest, table)["entailment"], cache.score_arrays(*cache.load_cache(without))["entailment"]
    )

    student = train_student.main(
        cache=path,
        output_dir=str(tmp_path / "student"),
        student_name_or_path=make_student_base(str(tmp_path / "base")),
        **QUICK,
    )
    info = json.load(open(os.path.join(student, "distill_info.json")))
    assert (
        info["refinement"]["method"] == refine.METHOD and info["cache_summary"]["embedding_model"] == embedding_teacher
    )
    assert f"refinement: in the text-embedding space of {embedding_teacher}" in capsys.readouterr().err


def test_default_embedding_model_that_cannot_be_loaded_says_how_to_opt_out(teachers, corpus_files, tmp_path):
    data, classes = corpus_files
    result = run_script(
        "teacher_infer.py",
        "--data_file",
        data,
        "--class_names_file",
        classes,
        "--teacher_name_or_path",
        teachers["upper"],
        "--cache_dir",
        tmp_path / "cache",
        env={"ZSDISTILL_EMBEDDING_MODEL": str(tmp_path / "no-such-model")},
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert (
        "--embedding_model" in result.stderr
        and "--embedding_model none" in result.stderr
        and len(result.stderr.strip().splitlines()) == 1
    )
    assert not os.path.exists(tmp_path / "cache")


def sink_task(seed: int = 0, width: int = 32):
    """Three specific classes, a small one (index 3, 40 texts) and a generic one (index 4) whose texts mix every topic.

    Every text shares one common direction, as sentence embeddings do (every text's cosine to the corpus mean is
    high); each specific class adds a direction of its own; a generic text is a little of each topic, so its centroid
    sits next to the common direction, close to every text. The teacher is right on about 85% of each class.
    """
    rng = np.random.default_rng(seed)
    common = np.eye(width)[-1]
    rows, labels = [], []
    for k, size in enumerate([200, 200, 200, 40]):
        rows.append(2.0 * common + np.eye(width)[k] + 0.35 * rng.normal(size=(size, width)))
        labels += [k] * size
    mix = rng.dirichlet(8 * np.ones(4), size=300)
    rows.append(2.0 * common + mix @ np.eye(width)[:4] + 0.1 * rng.normal(size=(300, width)))
    labels += [4] * 300
    embeddings = np.concatenate(rows)
    embeddings /= np.linalg.norm(embeddings, axis=1, keepdims=True)
    labels = np.array(labels)
    scores = rng.normal(0, 0.5, size=(len(labels), 5))
    scores[np.arange(len(labels)), labels] += 1.2
    teacher = np.exp(2 * scores)
    teacher /= teacher.sum(1, keepdims=True)
    return embeddings.astype(np.float32), teacher.astype(np.float32), labels


def refine_arrays(teacher: np.ndarray, embeddings: np.ndarray, **kwargs):
    """refine.refine over in-memory arrays, in two chunks (as a cache of two shards)."""
    half = len(teacher) // 2
    teacher_chunks = lambda: iter([(0, teacher[:half]), (half, teacher[half:])])  # noqa: E731
    embedding_chunks = lambda: iter([(0, embeddings[:half]), (half, embeddings[half:])])  # noqa: E731
    return refine.refine(teacher_chunks, embedding_chunks, len(teacher), teacher.shape[1], **kwargs)


def assert_as_stored(targets_: np.ndarray, refinement: refine.Refinement, name: str) -> None:
    """The targets, and the refinement's kappa, centroids and log priors (those stored), as tests/data/`name` holds
    them: what the release that wrote them gave. Matmul kernels differ by CPU in the last bits."""
    with np.load(os.path.join(os.path.dirname(__file__), "data", name)) as before:
        assert np.array_equal(targets_.argmax(1), before["targets"].argmax(1))
        np.testing.assert_allclose(targets_, before["targets"], atol=1e-6)
        for field in ("centroids", "log_priors"):
            if field in before.files:
                np.testing.assert_allclose(getattr(refinement, field), before[field], atol=1e-6)
        assert abs(refinement.kappa - float(before["kappa"])) < 1e-4


def recall(prediction: np.ndarray, labels: np.ndarray, k: int) -> float:
    return float((prediction[labels == k] == k).mean())


def test_a_generic_class_does_not_sink_a_small_one():
    """Before centring, the generic class's centroid drew every text; centred, each class keeps what the teacher
    found."""
    embeddings, teacher, labels = sink_task()
    taught = teacher.argmax(1)
    before, _ = refine_arrays(teacher, embeddings, center=False, free_last_round=False, density_weights=False)
    after, refinement = refine_arrays(teacher, embeddings)
    before, after = before.argmax(1), after.argmax(1)
    assert recall(taught, labels, 3) >= 0.8 and (taught == labels).mean() >= 0.8
    # Before: the generic class takes (nearly) every text, the small class's included.
    assert (before == 4).mean() > 0.9 and recall(before, labels, 3) < 0.1
    # Centred: every specific class at least as well found as by the teacher, the small one keeps most of it, and the
    # generic class about its true share (a third) instead of everything.
    assert all(recall(after, labels, k) >= recall(taught, labels, k) for k in range(3))
    assert recall(after, labels, 3) >= 0.6 * recall(taught, labels, 3)
    assert 0.25 < (after == 4).mean() < 0.4 and (after == labels).mean() > 0.9
    assert refinement.settings()["center"] is True and refinement.center.shape == (embeddings.shape[1],)


def test_refinement_before_centring_is_reachable_and_unchanged(tmp_path):
    """--norefine_center --norefine_free_last_round --norefine_density_weights --norefine_drift_guard give the
    refinement of four releases before: its targets on the sink task, as it wrote them."""
    embeddings, teacher, _ = sink_task()
    targets_, refinement = refine_arrays(
        teacher,
        embeddings,
        center=False,
        free_last_round=False,
        density_weights=False,
        drift_guard=False,
        propagate=0.0,
    )
    assert_as_stored(targets_, refinement, "refine_before_centering.npz")
    assert (
        refinement.center is None
        and refinement.settings()["center"] is False
        and refinement.settings()["free_last_round"] is False
    )
    # Saved without a centre, it loads and scores as before; a centred one keeps its centre.
    refine.save(refinement, str(tmp_path / "old.npz"))
    assert "center" not in np.load(tmp_path / "old.npz").files
    np.testing.assert_allclose(
        refine.load(str(tmp_path / "old.npz")).log_scores(embeddings), refinement.log_scores(embeddings), rtol=1e-6
    )
    _, centred = refine_arrays(teacher, embeddings)
    refine.save(centred, str(tmp_path / "new.npz"))
    np.testing.assert_allclose(
        refine.load(str(tmp_path / "new.npz")).log_scores(embeddings), centred.log_scores(embeddings), rtol=1e-6
    )


def test_norefine_center_flag_reaches_the_refinement(tmp_path):
    path, _ = toy_cache(tmp_path, "embedding", bias=True)
    manifest, _ = cache.load_cache(path)
    centred, _, info = train_student.build_targets(path, manifest, False, 1.0, refine=True)
    plain, _, plain_info = train_student.build_targets(
        path,
        manifest,
        False,
        1.0,
        refine=True,
        refine_center=False,
        refine_free_last_round=False,
        refine_density_weights=False,
    )
    _, _, floored_info = train_student.build_targets(path, manifest, False, 1.0, refine=True, refine_prior_floor=True)
    _, _, unguarded_info = train_student.build_targets(
        path, manifest, False, 1.0, refine=True, refine_drift_guard=False
    )
    assert info["drift_guard"] is True and unguarded_info["drift_guard"] is False
    assert info["center"] is True and plain_info["center"] is False and not np.array_equal(centred, plain)
    assert info["free_last_round"] is True and plain_info["free_last_round"] is False
    assert info["density_weights"] is True and plain_info["density_weights"] is False
    assert info["density_scale"] == refine.DENSITY_SCALE and plain_info["density_scale"] is None
    assert info["prior_floor"] is None and floored_info["prior_floor"] == refine.PRIOR_FLOOR


def test_the_last_round_drops_the_anchor_and_only_the_last():
    """Anchored rounds keep only the rows the teacher puts in the same class; the last round keeps every sure row of
    each predicted class, so its centroids take in texts the teacher put elsewhere (the demo's `artifact`)."""
    embeddings, teacher, _ = sink_task()
    for free in (True, False):
        lines = []
        _, refinement = refine_arrays(teacher, embeddings, free_last_round=free, log=lines.append)
        rounds = [line for line in lines if line.startswith("refinement round")]
        anchors = [int(line.split(": ")[1].split(" anchor rows")[0]) for line in rounds]
        assert len(rounds) == refinement.rounds <= refine.MAX_ROUNDS and refinement.free_last_round is free
        assert [("without the anchor" in line) for line in rounds] == [False] * (len(rounds) - 1) + [free]
        if free:  # the sure half of every predicted class, whatever the teacher said: more rows than the round before
            assert anchors[-1] > anchors[-2] and anchors[-1] >= len(teacher) // 2


def test_without_density_weights_the_refinement_is_the_release_befores():
    """--norefine_density_weights (and no --dev_file) give the release before's refinement, as it wrote its targets on
    the sink task (dev labels only ever enter through `labeled`)."""
    embeddings, teacher, _ = sink_task()
    targets_, refinement = refine_arrays(teacher, embeddings, density_weights=False, propagate=0.0)
    assert_as_stored(targets_, refinement, "refine_default_before_dev_labels.npz")
    assert refinement.settings()["labeled_texts"] is None


def around(rng: np.random.Generator, direction: np.ndarray, n: int, spread: float) -> np.ndarray:
    """n unit vectors scattered around `direction` (spread: the noise's norm relative to it)."""
    x = direction + spread * rng.normal(size=(n, len(direction))) / np.sqrt(len(direction))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def clump_task(seed: int = 0, width: int = 32):
    """Class 0's texts spread around one direction; 150 near-alike texts of class 1 (a clump) that the teacher is
    sure are class 0, as Debian's dictionaries for `interpreters` (their descriptions say "language"); classes 1-3
    around their own directions. Returns embeddings, teacher posteriors, labels."""
    rng = np.random.default_rng(seed)
    directions = np.linalg.qr(rng.normal(size=(width, width)))[0][:5]

    parts = [(around(rng, directions[0], 80, 1.2), 0), (around(rng, directions[4], 150, 0.15), 1)]
    parts += [(around(rng, directions[k], 200, 1.0), k) for k in (1, 2, 3)]
    embeddings = np.concatenate([part for part, _ in parts]).astype(np.float32)
    labels = np.concatenate([np.full(len(part), k) for part, k in parts])
    scores = rng.normal(0, 0.5, size=(len(labels), 4))
    scores[np.arange(len(labels)), labels] += 1.0
    scores[80:230, 0] += 2.0
    teacher = np.exp(2 * scores)
    return embeddings, (teacher / teacher.sum(1, keepdims=True)).astype(np.float32), labels


def test_a_clump_of_alike_texts_does_not_take_a_class_over():
    """Without density weights the clump, most of the teacher's surest class-0 texts, becomes class 0's centroid and
    the class's own spread texts are lost; weighted, the clump counts as about one text and they are kept."""
    embeddings, teacher, labels = clump_task()
    taught = teacher.argmax(1)
    before, _ = refine_arrays(teacher, embeddings, density_weights=False)
    after, refinement = refine_arrays(teacher, embeddings)
    assert recall(taught, labels, 0) >= 0.7
    assert recall(before.argmax(1), labels, 0) < 0.3 * recall(taught, labels, 0)
    assert recall(after.argmax(1), labels, 0) >= 0.9 and (after.argmax(1) == labels).mean() > 0.8
    assert refinement.settings()["density_weights"] is True


def test_density_weights_do_not_depend_on_chunks_and_sample_large_classes(monkeypatch):
    """The same refinement in one chunk as in two; a class with more kept texts than DENSITY_REFERENCE_ROWS has its
    densities estimated on a sample of them, close to the exact ones."""
    embeddings, teacher, labels = clump_task()
    one_chunk = lambda array: lambda: iter([(0, array)])  # noqa: E731
    whole, whole_refinement = refine.refine(one_chunk(teacher), one_chunk(embeddings), len(teacher), 4)
    split, split_refinement = refine_arrays(teacher, embeddings)
    np.testing.assert_allclose(split_refinement.centroids, whole_refinement.centroids, atol=1e-5)
    np.testing.assert_allclose(split, whole, atol=1e-5)
    monkeypatch.setattr(refine, "DENSITY_REFERENCE_ROWS", 40)  # classes keep 40-150 texts a round here
    sampled, sampled_refinement = refine_arrays(teacher, embeddings)
    assert 0.0 < np.abs(sampled_refinement.centroids - whole_refinement.centroids).max() < 0.1
    assert recall(sampled.argmax(1), labels, 0) >= 0.9


def small_class_task(seed: int = 0, width: int = 32):
    """Three classes of 300 texts around their own directions and a small one (index 3, 24 texts, 2.6%) spread thin,
    as foldoc-12's `artificial intelligence` (neural networks, expert systems, the Turing test). The teacher finds
    most of each class, the small one included, and over-predicts it. Returns embeddings, teacher posteriors, labels."""
    rng = np.random.default_rng(seed)
    directions = np.linalg.qr(rng.normal(size=(width, width)))[0][:4]

    parts = [(around(rng, directions[k], 300, 1.0), k) for k in range(3)] + [(around(rng, directions[3], 24, 1.4), 3)]
    embeddings = np.concatenate([part for part, _ in parts]).astype(np.float32)
    labels = np.concatenate([np.full(len(part), k) for part, k in parts])
    scores = rng.normal(0, 0.5, size=(len(labels), 4))
    scores[np.arange(len(labels)), labels] += 1.0
    teacher = np.exp(2 * scores)
    return embeddings, (teacher / teacher.sum(1, keepdims=True)).astype(np.float32), labels


def test_the_prior_floor_keeps_a_small_class_the_teacher_finds():
    """Re-estimated from the rounds' own predictions, the small class's prior falls to about its kept texts' share and
    its texts go to the large classes; held at least at min(the teacher's prior, PRIOR_FLOOR / K) they are kept, and
    a class above its floor is left as it was."""
    embeddings, teacher, labels = small_class_task()
    taught = teacher.argmax(1)
    # Without the drift guard: it looks at the small class too (refinement moves the teacher's surest texts of it),
    # so with it the two refinements would differ by more than the floor.
    before, unfloored = refine_arrays(teacher, embeddings, drift_guard=False)
    after, refinement = refine_arrays(teacher, embeddings, prior_floor=True, drift_guard=False)
    assert recall(taught, labels, 3) >= 0.8
    assert recall(before.argmax(1), labels, 3) < 0.1 and np.exp(unfloored.log_priors[3]) < 0.03
    assert recall(after.argmax(1), labels, 3) >= 0.7 * recall(taught, labels, 3)
    assert (after.argmax(1) == labels).mean() > (before.argmax(1) == labels).mean()
    floor = min(teacher[:, 3].mean(), refine.PRIOR_FLOOR / 4)
    assert np.exp(refinement.log_priors[3]) == pytest.approx(floor / (1 - np.exp(unfloored.log_priors[3]) + floor))
    assert refinement.settings()["prior_floor"] == refine.PRIOR_FLOOR and unfloored.settings()["prior_floor"] is None
    # No class under its floor: the priors are refinement's own, bit for bit.
    log_priors = np.log(np.array([0.4, 0.3, 0.17, 0.13], dtype=np.float32))  # all above PRIOR_FLOOR / 4
    assert refine.floored_priors(log_priors, np.full(4, 0.25)) is log_priors


def test_without_the_prior_floor_the_refinement_is_the_release_befores():
    """Without --refine_prior_floor (the default) and --norefine_drift_guard the refinement is the one of two releases
    before, as it wrote its targets on the small-class task; with dev labels the floor is never applied (their prior
    bias decides)."""
    embeddings, teacher, labels = small_class_task()
    targets_, refinement = refine_arrays(teacher, embeddings, drift_guard=False, propagate=0.0)
    assert_as_stored(targets_, refinement, "refine_default_before_prior_floor.npz")
    dev = np.concatenate([np.flatnonzero(labels == k)[:4] for k in range(4)])
    labeled = refine.LabeledTexts(embeddings[dev], labels[dev])
    with_dev, fitted = refine_arrays(teacher, embeddings, labeled=labeled, dev_bias=False, prior_floor=True)
    plain, _ = refine_arrays(teacher, embeddings, labeled=labeled, dev_bias=False)
    assert fitted.prior_floor is False and np.array_equal(with_dev, plain)


def test_the_classes_the_targets_starve_are_reported_and_left():
    """On the small-class task the targets give the small class under a quarter of the texts the teacher gives it:
    refinement names it (settings, log) and changes nothing for it (raising its prior lifted the targets, not the
    students); on the clump task no class is starved."""
    embeddings, teacher, labels = small_class_task()
    logged = []
    targets_, refinement = refine_arrays(teacher, embeddings, log=logged.append)
    assert refinement.starved == [3] and refinement.settings()["starved_classes"] == [3]
    assert refine.starved_classes(teacher.argmax(1), targets_.argmax(1), 4) == [3]
    assert any("refinement gives classes [3] under 25% of the texts the teacher gives each" in m for m in logged)
    embeddings, teacher, _ = clump_task()
    assert refine_arrays(teacher, embeddings)[1].starved == []


def test_a_starved_class_keeps_its_share_of_the_teachers_texts():
    """With starved_share, the class the targets starve is made the most likely class of that fraction of the
    teacher's count of texts, the ones nearest its centroid: the small class's recall comes back to at least 70% of
    the teacher's and macro-F1 rises; no other class's prior moves. At 0 (the default) the targets are the ones
    without it, bit for bit; with dev labels it is never applied (their prior bias decides)."""
    embeddings, teacher, labels = small_class_task()
    taught = teacher.argmax(1)
    before, plain = refine_arrays(teacher, embeddings, propagate=0.0)
    logged = []
    after, refinement = refine_arrays(teacher, embeddings, propagate=0.0, starved_share=0.75, log=logged.append)
    assert plain.starved == refinement.starved == [3] and plain.starved_bias is None
    wanted = int(np.ceil(0.75 * (taught == 3).sum()))
    assert (before.argmax(1) == 3).sum() < wanted <= (after.argmax(1) == 3).sum() <= wanted + 1
    assert recall(before.argmax(1), labels, 3) < 0.7 * recall(taught, labels, 3) <= recall(after.argmax(1), labels, 3)
    # The teacher over-predicts the small class (73 texts for 24), so accuracy falls a little; macro-F1 rises.
    macro_f1 = lambda p: f1_score(labels, p.argmax(1), average="macro")  # noqa: E731
    assert macro_f1(after) > macro_f1(before) + 0.1
    bias = np.array(refinement.starved_bias)
    assert bias[3] > 0 and not bias[:3].any()
    np.testing.assert_allclose(refinement.log_priors, plain.log_priors + bias, atol=1e-6)
    assert refinement.settings()["starved_share"] == 0.75 and plain.settings()["starved_share"] is None
    assert any(f"most likely class for 75% of the teacher's count ([{wanted}] texts)" in m for m in logged)
    # Propagation keeps each class's count: the starved class keeps about what the bias gave it.
    propagated, _ = refine_arrays(teacher, embeddings, starved_share=0.75)
    assert (propagated.argmax(1) == 3).sum() >= wanted - 1
    assert np.array_equal(
        refine_arrays(teacher, embeddings, starved_share=0.0)[0], refine_arrays(teacher, embeddings)[0]
    )
    dev = np.concatenate([np.flatnonzero(labels == k)[:4] for k in range(4)])
    labeled = refine.LabeledTexts(embeddings[dev], labels[dev])
    with_dev, fitted = refine_arrays(teacher, embeddings, labeled=labeled, starved_share=0.75)
    assert fitted.starved_bias is None and np.array_equal(
        with_dev, refine_arrays(teacher, embeddings, labeled=labeled)[0]
    )


def test_the_starved_share_reaches_the_targets_and_their_record(tmp_path):
    """--refine_starved_share goes from the options through build_targets to refinement: the small class of a cache
    made from the small-class task is starved, and held at 0.75 of the teacher's count in the targets; the record
    says so. Without it the targets are the default's."""
    embeddings, teacher, _ = small_class_task()
    texts = [f"text {i}" for i in range(len(teacher))]
    similarity = np.log(teacher) * targets.SIMILARITY_SCALE  # the cache's teacher posteriors are `teacher` again
    path = write_toy_cache(
        str(tmp_path / "cache"),
        texts,
        ["a", "b", "c", "small"],
        {"similarity": similarity},
        "embedding",
        256,
        embeddings,
    )
    manifest = cache.read_manifest(path)
    options = train_student.StudentOptions(cache=path, output_dir=str(tmp_path / "out"), refine_starved_share=0.75)
    held, _, info = train_student.build_targets(
        path, manifest, False, 1.0, True, refine_starved_share=options.refine_starved_share
    )
    plain, _, plain_info = train_student.build_targets(path, manifest, False, 1.0, True)
    taught = targets.cache_probabilities(path, manifest, False).argmax(1)
    assert info["starved_classes"] == plain_info["starved_classes"] == [3]
    assert info["starved_share"] == 0.75 and info["starved_bias"][3] > 0 and plain_info["starved_share"] is None
    assert (held.argmax(1) == 3).sum() >= np.ceil(0.75 * (taught == 3).sum()) - 1 > (plain.argmax(1) == 3).sum()


def test_share_biases_give_each_class_its_count_in_turn():
    """share_biases raises only the named classes, each to its wanted count (to a text two of them contest), also where
    the second takes texts from the first (they are raised in turn); a class already at its count is left."""
    rng = np.random.default_rng(0)
    similarity = rng.normal(size=(500, 5)).astype(np.float32)
    refinement = refine.Refinement(np.eye(5, dtype=np.float32), np.log(np.full(5, 0.2, dtype=np.float32)), kappa=3.0)
    refinement.log_priors[3:] -= 6.0  # classes 3 and 4 rarely the most likely
    counts = lambda b: np.bincount((3.0 * similarity + refinement.log_priors + b).argmax(1), minlength=5)  # noqa: E731
    assert counts(0)[3] < 40 and counts(0)[4] < 60
    bias = refine.share_biases(similarity, refinement, {3: 40, 4: 60})
    assert bias[:3].tolist() == [0, 0, 0] and (bias[3:] > 0).all()
    # One pass would leave class 3 at 31 (class 4 takes 9 of its texts); the passes after bring it back to 39, the
    # last text contested by the two (each pass one of them takes it).
    assert counts(bias)[3] >= 40 - 1 and counts(bias)[4] >= 60 and counts(bias)[3:].sum() <= 40 + 60 + 10
    once = refine.share_biases(similarity, refinement, {4: 60})
    assert counts(once)[4] == 60  # alone, exactly its count (no ties in random scores)
    top = int(counts(0).argmax())
    assert not refine.share_biases(similarity, refinement, {top: 10}).any()


def test_starved_classes_counts_against_the_teachers_texts():
    """A class is starved when the targets give it under a quarter of the teacher's texts of it; a class the teacher
    itself gives under a tenth of a uniform share is not looked at (the report's "rarely predicted")."""
    teacher = np.array([0] * 40 + [1] * 42 + [2] * 16 + [3] * 2)
    refined = np.array([0] * 60 + [1] * 36 + [2] * 4)  # class 2: 4 of 16 (a quarter: not starved); class 3: 0 of 2
    assert refine.starved_classes(teacher, refined, 4) == []
    refined[-1] = 0  # class 2: 3 of 16
    assert refine.starved_classes(teacher, refined, 4) == [2]
    assert refine.starved_classes(teacher, refined, 8) == [2, 3]  # 2 of 100 is under a tenth of 1/4, over one of 1/8


def drift_task(seed: int = 0, width: int = 32):
    """Class 0's texts spread wide around a direction near the generic class 2's, which the teacher gives most of
    them; a tight clump of 150 class-1 texts far from every class that the teacher puts in class 0, less surely than
    the class-0 texts it finds, as FOLDOC's country codes in `language` (its real texts near `programming`).
    Returns embeddings, teacher posteriors, labels."""
    rng = np.random.default_rng(seed)
    directions = np.linalg.qr(rng.normal(size=(width, width)))[0][:5]
    near_generic = directions[0] + 3.0 * directions[2]
    parts = [(around(rng, near_generic / np.linalg.norm(near_generic), 150, 1.4), 0)]
    parts += [(around(rng, directions[4], 150, 0.15), 1), (around(rng, directions[1], 200, 1.0), 1)]
    parts += [(around(rng, directions[2], 250, 1.4), 2), (around(rng, directions[3], 200, 1.0), 3)]
    embeddings = np.concatenate([part for part, _ in parts]).astype(np.float32)
    labels = np.concatenate([np.full(len(part), k) for part, k in parts])
    scores = rng.normal(0, 0.5, size=(len(labels), 4))
    scores[np.arange(len(labels)), labels] += 1.0
    scores[:150, 2] += 0.9  # the generic class takes most class-0 texts
    scores[150:300, 0] += 1.3  # the clump: class 0 to the teacher
    teacher = np.exp(2 * scores)
    return embeddings, (teacher / teacher.sum(1, keepdims=True)).astype(np.float32), labels


def test_the_drift_guard_keeps_a_class_on_the_texts_the_teacher_is_surest_of():
    """Without the guard the clump, surest to refinement, becomes class 0 and its own texts go to the generic class
    (refinement keeps under a quarter of the texts the teacher is surest are class 0); with it the class is refined
    again anchored to those texts and keeps what the teacher found. Without a drifting class nothing changes."""
    embeddings, teacher, labels = drift_task()
    taught, sure = teacher.argmax(1), teacher.max(1)
    unguarded, plain = refine_arrays(teacher, embeddings, drift_guard=False, propagate=0.0)
    guarded, refinement = refine_arrays(teacher, embeddings, propagate=0.0)
    assert recall(taught, labels, 0) >= 0.5
    assert recall(unguarded.argmax(1), labels, 0) < 0.7 * recall(taught, labels, 0)
    assert refine.drifted_classes(taught, sure, unguarded.argmax(1), 4) == [0]
    assert recall(guarded.argmax(1), labels, 0) >= 0.7 * recall(taught, labels, 0) + 0.1
    assert (guarded.argmax(1) == labels).mean() > (unguarded.argmax(1) == labels).mean()
    assert refinement.guarded == [0] and refinement.settings()["guarded_classes"] == [0]
    assert plain.guarded == [] and plain.settings()["drift_guard"] is False
    assert refinement.settings()["drift_guard"] is True
    # --norefine_drift_guard is the release before's refinement, as it wrote its targets on this task.
    assert_as_stored(unguarded, plain, "refine_default_before_drift_guard.npz")
    # No class drifts on the clump task: the guard looks and leaves the refinement as it was, bit for bit.
    embeddings, teacher, _ = clump_task()
    looked, looked_refinement = refine_arrays(teacher, embeddings, propagate=0.0)
    unlooked, _ = refine_arrays(teacher, embeddings, drift_guard=False, propagate=0.0)
    assert looked_refinement.guarded == [] and np.array_equal(looked, unlooked)


def test_dev_labels_replace_the_drift_guard():
    """With dev labels the guard is not applied: the labeled texts anchor each class themselves."""
    embeddings, teacher, labels = drift_task()
    dev = np.concatenate([np.flatnonzero(labels == k)[:4] for k in range(4)])
    labeled = refine.LabeledTexts(embeddings[dev], labels[dev])
    with_guard, fitted = refine_arrays(teacher, embeddings, labeled=labeled, dev_bias=False)
    without, _ = refine_arrays(teacher, embeddings, labeled=labeled, dev_bias=False, drift_guard=False)
    assert fitted.guarded == [] and fitted.drift_guard is False and np.array_equal(with_guard, without)


def scattered_mistakes_task(seed: int = 0, width: int = 32):
    """Three classes of 150 texts around their own directions, and targets that put 15% of the texts, scattered at
    random, in another class, less surely (0.5) than the right ones (0.7), as refinement's mistakes are: each wrong
    text's nearest texts are right. Returns embeddings, targets, labels, a Refinement whose space is the embeddings
    as they are."""
    rng = np.random.default_rng(seed)
    directions = np.linalg.qr(rng.normal(size=(width, width)))[0][:3]
    embeddings = np.concatenate([around(rng, directions[k], 150, 0.8) for k in range(3)]).astype(np.float32)
    labels = np.repeat(np.arange(3), 150)
    taught = labels.copy()
    wrong = rng.random(len(labels)) < 0.15
    taught[wrong] = (labels[wrong] + rng.integers(1, 3, size=wrong.sum())) % 3
    targets = np.full((len(labels), 3), 0.15, dtype=np.float32)
    targets[np.arange(len(labels)), taught] = 0.7
    targets[wrong] = 0.25
    targets[wrong, taught[wrong]] = 0.5
    refinement = refine.Refinement(centroids=directions.astype(np.float32), log_priors=np.log(np.full(3, 1 / 3)))
    return embeddings, targets, labels, refinement


def test_propagation_gives_a_text_its_neighbours_class_as_sure_as_before(monkeypatch):
    """Propagated over the neighbour graph, the scattered wrong targets take their neighbours' class, the right ones
    stay, each class keeps its number of texts and the mean top probability is the targets' own; with the neighbours
    sought among half the texts (PROPAGATE_REFERENCE_ROWS) nearly as well."""
    embeddings, targets, labels, refinement = scattered_mistakes_task()
    chunks = lambda: iter([(0, embeddings[:200]), (200, embeddings[200:])])  # noqa: E731
    assert 0.8 < (targets.argmax(1) == labels).mean() < 0.9
    propagated = refine.propagated(targets, refinement, chunks, 0.5)
    assert (propagated.argmax(1) == labels).mean() > 0.97 and np.allclose(propagated.sum(1), 1, atol=1e-5)
    assert abs(propagated.max(1).mean() - targets.max(1).mean()) < 1e-3
    # Each class is the most likely for as many texts as before: propagation moves texts, not class sizes.
    np.testing.assert_allclose(np.bincount(propagated.argmax(1)), np.bincount(targets.argmax(1)), atol=2)
    assert (propagated.argmax(1) == targets.argmax(1))[targets.argmax(1) == labels].all()
    monkeypatch.setattr(refine, "PROPAGATE_REFERENCE_ROWS", 225)  # neighbours among every other text
    sampled = refine.propagated(targets, refinement, chunks, 0.5)
    assert (sampled.argmax(1) == labels).mean() > 0.95 and not np.allclose(sampled, propagated)


def test_propagation_keeps_a_small_scattered_class_its_texts(monkeypatch):
    """A big dense class beside a small scattered one: over the neighbour graph the small class's texts have more
    neighbours of the big class, so plain propagation shrinks it; with the bias each class keeps its count of texts
    and the small class its recall."""
    rng = np.random.default_rng(0)
    directions = np.linalg.qr(rng.normal(size=(32, 32)))[0][:2]
    small = 0.6 * directions[0] + 0.8 * directions[1]
    embeddings = np.concatenate([around(rng, directions[0], 300, 0.8), around(rng, small, 40, 1.6)]).astype(np.float32)
    labels = np.repeat([0, 1], [300, 40])
    centroids = np.stack([embeddings[labels == k].mean(0) for k in (0, 1)])
    centroids /= np.linalg.norm(centroids, axis=1, keepdims=True)
    refinement = refine.Refinement(centroids=centroids.astype(np.float32), log_priors=np.log([300 / 340, 40 / 340]))
    targets = refine.softmax_rows(refinement.log_scores(embeddings))
    chunks = lambda: iter([(0, embeddings)])  # noqa: E731
    kept = refine.propagated(targets, refinement, chunks, 0.5)
    assert np.array_equal(np.bincount(kept.argmax(1)), np.bincount(targets.argmax(1)))
    assert recall(kept.argmax(1), labels, 1) >= recall(targets.argmax(1), labels, 1) >= 0.8
    monkeypatch.setattr(refine, "PROPAGATE_SHARE_STEPS", 0)  # without the bias
    plain = refine.propagated(targets, refinement, chunks, 0.5)
    assert (plain.argmax(1) == 1).sum() < (targets.argmax(1) == 1).sum()


def test_propagation_is_the_default_and_0_gives_the_release_befores_targets():
    """Propagation (alpha 0.5) is on by default and recorded; --refine_propagate 0 gives the release before's
    refinement, as it wrote its targets on the sink task."""
    embeddings, teacher, labels = sink_task()
    default, refinement = refine_arrays(teacher, embeddings)
    off, off_refinement = refine_arrays(teacher, embeddings, propagate=0.0)
    assert refinement.settings()["propagate"] == 0.5 and off_refinement.settings()["propagate"] is None
    assert (default.argmax(1) == labels).mean() >= (off.argmax(1) == labels).mean() - 0.01
    assert not np.allclose(default, off)
    assert_as_stored(off, off_refinement, "refine_default_before_propagation.npz")


def test_propagation_with_dev_labels_and_a_temperature():
    """With dev labels the targets are propagated too (their kappa fitted on the labels, as sure on average after);
    the temperature acts on the propagated targets' log-odds."""
    embeddings, teacher, labels = sink_task()
    dev = np.concatenate([np.flatnonzero(labels == k)[:4] for k in range(teacher.shape[1])])
    labeled = refine.LabeledTexts(embeddings[dev], labels[dev])
    anchored, refinement = refine_arrays(teacher, embeddings, labeled=labeled)
    plain, _ = refine_arrays(teacher, embeddings, labeled=labeled, propagate=0.0)
    assert refinement.settings()["propagate"] == 0.5 and not np.allclose(anchored, plain)
    assert abs(anchored.max(1).mean() - plain.max(1).mean()) < 1e-3
    soft, _ = refine_arrays(teacher, embeddings, labeled=labeled, temperature=3.0)
    np.testing.assert_allclose(soft, refine.softmax_rows(np.log(anchored.astype(np.float64)) / 3.0), atol=1e-4)


@pytest.mark.parametrize(
    "args",
    [
        ["--refine_propagate", "1.5"],
        ["--refine_propagate", "None"],
        ["--refine_propagate", "-0.1"],
        ["--refine_starved_share", "1.5"],
        ["--refine_starved_share", "yes"],
    ],
)
def test_bad_propagation_settings_are_one_line_errors(tmp_path, args):
    path, _ = toy_cache(tmp_path, "nli", bias=True)
    result = run_main("train_student.py", "--cache", path, "--output_dir", tmp_path / "out", *args)
    assert result.returncode == 2 and args[0] in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


def test_propagated_targets_reach_the_student_its_record_and_card(tmp_path):
    """By default the student is taught propagated targets, and says so."""
    path, _ = toy_cache(tmp_path, "nli", bias=True)
    student = train_student.main(
        cache=path,
        output_dir=str(tmp_path / "student"),
        student_name_or_path=make_student_base(str(tmp_path / "base")),
        **QUICK,
    )
    info = json.load(open(os.path.join(student, "distill_info.json")))
    assert info["refine_propagate"] == 0.5 and info["refinement"]["propagate"] == 0.5
    assert info["refinement"]["propagate_neighbours"] == refine.PROPAGATE_NEIGHBOURS
    card = open(os.path.join(student, "README.md")).read()
    assert f"then propagated over each text's {refine.PROPAGATE_NEIGHBOURS} nearest texts (alpha 0.5)" in card


def test_a_student_below_the_raw_teacher_on_its_targets_is_named(tmp_path, capsys):
    """Two optimizer steps on texts that carry no signal: on the held-out rows the student agrees with its refined
    targets less often than the raw teacher does, and the log, distill_info.json and the card say so. Targets that are
    the teacher's (--norefine) are not compared."""
    path, _ = toy_cache(tmp_path, "nli", bias=True)
    base = make_student_base(str(tmp_path / "base"))
    run = dict(cache=path, student_name_or_path=base, holdout_fraction=0.2, **QUICK)
    student = train_student.main(output_dir=str(tmp_path / "student"), **run)
    holdout = json.load(open(os.path.join(student, "distill_info.json")))["metrics"]["holdout"]
    assert holdout["examples"] == 90 and holdout["teacher_agreement"] >= 0.7, holdout  # the bias: 20% of the rows
    assert holdout["agreement"] < holdout["teacher_agreement"] and holdout["below_teacher"] is True
    assert "it has learned less of them than the teacher already knows (2 optimizer steps)" in capsys.readouterr().err
    assert (
        f"(the raw teacher's: {holdout['teacher_agreement']:.4f}; **below it"
        in open(os.path.join(student, "README.md")).read()
    )
    plain = train_student.main(output_dir=str(tmp_path / "plain"), refine=False, **run)
    holdout = json.load(open(os.path.join(plain, "distill_info.json")))["metrics"]["holdout"]
    assert "teacher_agreement" not in holdout and "below_teacher" not in holdout
    assert "learned less" not in capsys.readouterr().err


def test_the_teacher_comparison_flags_only_a_student_below_the_teacher():
    targets_there = np.eye(3, dtype=np.float32)[[0, 1, 2, 2]]
    teacher = np.array([0, 1, 2, 0])  # 3 of 4 of the targets' classes
    holdout = {"agreement": 0.75}  # as many as the teacher: not below
    train_student.compare_with_the_teacher(holdout, targets_there, teacher, steps=10)
    assert holdout == {"agreement": 0.75, "teacher_agreement": 0.75, "below_teacher": False}
    holdout = {"agreement": 0.5}
    train_student.compare_with_the_teacher(holdout, targets_there, teacher, steps=10)
    assert holdout["below_teacher"] is True


def test_teacher_classes_gathers_rows_from_every_shard(tmp_path):
    path, _ = toy_cache(tmp_path, "embedding", bias=True)  # 450 rows in shards of 64
    manifest, _ = cache.load_cache(path)
    rows = np.array([449, 0, 64, 63, 200])
    expected = targets.cache_probabilities(path, manifest, False).argmax(1)[rows]
    assert np.array_equal(train_student.teacher_classes(path, manifest, rows), expected)


def test_a_dev_text_refinement_already_places_right_counts_half_in_its_anchor():
    """agreed_counts: per class its labeled texts, those the centroids already score highest in their class counting
    AGREED_WEIGHT each; anchored then moves a right centroid less toward a few labeled texts' sampling noise."""
    centroids = np.eye(3, 4, dtype=np.float32)
    moved = np.array([[1, 0, 0, 0], [1, 0.2, 0, 0], [0, 1, 0, 0], [0.1, 0, 1, 0], [0, 0, 1, 0]], dtype=np.float32)
    labels = np.array([0, 0, 1, 1, 2])  # the fourth text sits in class 2's direction: refinement places it wrong
    np.testing.assert_allclose(refine.agreed_counts(moved, labels, centroids, 0.5), [1.0, 1.5, 0.5])
    np.testing.assert_allclose(refine.agreed_counts(moved, labels, centroids, 1.0), [2.0, 2.0, 1.0])

    # Two clusters the teacher gets right; class 0's eight dev texts are those furthest along a direction of noise
    # (a skewed draw), all of them placed right by refinement's own centroid: with the rule the anchored centroid
    # leans less toward that direction, and the record says how the dev texts were counted.
    rng = np.random.default_rng(0)
    width, common = 16, np.eye(16)[-1]
    embeddings = np.concatenate([2 * common + np.eye(width)[k] + 0.3 * rng.normal(size=(150, width)) for k in (0, 1)])
    embeddings = (embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)).astype(np.float32)
    labels = np.repeat([0, 1], 150)
    teacher = np.where(np.eye(2)[labels] > 0, 0.8, 0.2).astype(np.float32)
    skewed = np.argsort(-embeddings[:150, 5])[:8]
    dev = np.concatenate([skewed, 150 + np.arange(8)])
    labeled = refine.LabeledTexts(embeddings[dev], labels[dev])
    settings = dict(labeled=labeled, free_last_round=False, propagate=0.0)
    agreed, with_rule = refine_arrays(teacher, embeddings, **settings)
    full, without = refine_arrays(teacher, embeddings, dev_agreement=False, **settings)
    assert with_rule.centroids[0, 5] < without.centroids[0, 5] - 0.02  # 0.20 against 0.30 when written
    assert (agreed.argmax(1) == labels).mean() >= (full.argmax(1) == labels).mean()
    assert with_rule.settings()["labeled_texts"]["agreed_weight"] == refine.AGREED_WEIGHT == 0.5
    assert without.settings()["labeled_texts"]["agreed_weight"] == 1.0


def test_without_the_agreed_weight_dev_labels_refine_as_the_release_before():
    """dev_agreement=False (--norefine_dev_agreement) gives the release before's targets with dev labels, as it wrote
    them on the sink task; the default differs."""
    embeddings, teacher, labels = sink_task()
    dev = np.concatenate([np.flatnonzero(labels == k)[:4] for k in range(teacher.shape[1])])
    labeled = refine.LabeledTexts(embeddings[dev], labels[dev])
    off, off_refinement = refine_arrays(teacher, embeddings, labeled=labeled, dev_agreement=False)
    default, _ = refine_arrays(teacher, embeddings, labeled=labeled)
    assert not np.allclose(default, off)
    assert_as_stored(off, off_refinement, "refine_dev_before_agreement.npz")
