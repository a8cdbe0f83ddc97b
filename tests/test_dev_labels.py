"""A handful of labels (--dev_file): calibration on them, dev metrics at every evaluation step and at the end, and
label names checked against the cache's classes."""

import json
import os

import numpy as np
import pytest
from conftest import keyword_task, make_student_base, run_main, write_toy_cache

import train_student
from zsdistill import card

QUICK = {"max_steps": 4, "per_device_train_batch_size": 8, "use_cpu": True, "disable_tqdm": True, "seed": 0}
CLASSES = ["apple", "river", "guitar"]


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    root = tmp_path_factory.mktemp("dev")
    texts, labels, columns = keyword_task(200, CLASSES)
    cache_path = write_toy_cache(
        str(root / "cache" / "toy"), texts[:160], CLASSES, {k: v[:160] for k, v in columns.items()}
    )
    dev = root / "dev.jsonl"  # texts the cache does not hold, with their true labels
    dev.write_text(
        "".join(json.dumps({"text": t, "label": CLASSES[y]}) + "\n" for t, y in zip(texts[160:], labels[160:]))
    )
    base = make_student_base(str(root / "base"), initializer_range=0.2)
    return root, cache_path, str(dev), base


def test_the_temperature_is_fitted_on_the_dev_labels_and_the_dev_metrics_are_kept(task, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    _, cache_path, dev, base = task
    student = train_student.main(
        cache=cache_path,
        output_dir=str(tmp_path / "s"),
        student_name_or_path=base,
        calibrate=True,
        dev_file=dev,
        save_strategy="no",
        **QUICK,
    )
    info = json.load(open(os.path.join(student, card.INFO_FILE)))
    assert info["calibration"]["fitted_on"] == "dev labels" and info["calibration"]["dev_examples"] == 40
    dev_metrics = info["metrics"]["dev"]
    assert dev_metrics["examples"] == 40 and {"accuracy", "macro_f1", "ece"} <= set(dev_metrics)
    # The folded scale is the one that makes the dev labels most likely (not the targets on the held-out rows).
    rows = [json.loads(line) for line in open(dev)]
    model = AutoModelForSequenceClassification.from_pretrained(student).eval()
    encoded = AutoTokenizer.from_pretrained(student)([r["text"] for r in rows], padding=True, return_tensors="pt")
    logits = model(**encoded).logits.detach().numpy() / info["calibration"]["logit_scale"]  # before calibration
    one_hot = np.eye(len(CLASSES))[[CLASSES.index(r["label"]) for r in rows]]
    dev_scale = 1 / train_student.fit_logit_temperature(logits, one_hot, multi_label=False)
    assert info["calibration"]["logit_scale"] == pytest.approx(dev_scale, rel=1e-3)
    assert info["metrics"]["dev_before_calibration"]["ece"] != dev_metrics["ece"]
    text = open(os.path.join(student, card.CARD_FILE)).read()
    assert "| confidence | calibrated on 40 dev labels" in text and "| dev set | 40 labeled texts: accuracy" in text
    # How far 40 labels could move the figures: their bootstrap interval, in the record and on the card.
    low, high = dev_metrics["interval_95"]["accuracy"]
    assert low <= dev_metrics["accuracy"] <= high and low < high and dev_metrics["interval_95"]["resamples"] == 1000
    assert f"accuracy {dev_metrics['accuracy']:.4f} (95% interval {low:.2f}-{high:.2f})" in text


def test_dev_metrics_at_every_evaluation_step_choose_the_best_model(task, tmp_path):
    _, cache_path, dev, base = task
    output = str(tmp_path / "best")
    train_student.main(
        cache=cache_path,
        output_dir=output,
        student_name_or_path=base,
        dev_file=dev,
        eval_strategy="steps",
        eval_steps=2,
        save_strategy="steps",
        save_steps=2,
        load_best_model_at_end=True,
        metric_for_best_model="macro_f1",
        **QUICK,
    )
    state = json.load(open(os.path.join(output, "checkpoint-4", "trainer_state.json")))
    evaluations = [entry for entry in state["log_history"] if "eval_macro_f1" in entry]
    assert [entry["step"] for entry in evaluations] == [2, 4]
    assert all({"eval_accuracy", "eval_ece"} <= set(entry) for entry in evaluations)
    assert state["best_metric"] == max(entry["eval_macro_f1"] for entry in evaluations)


def test_without_a_dev_file_calibration_stays_label_free(task, tmp_path):
    _, cache_path, _, base = task
    student = train_student.main(
        cache=cache_path,
        output_dir=str(tmp_path / "s"),
        student_name_or_path=base,
        calibrate=True,
        save_strategy="no",
        **QUICK,
    )
    info = json.load(open(os.path.join(student, card.INFO_FILE)))
    assert info["calibration"]["fitted_on"] == "held-out targets" and "dev" not in info["metrics"]
    assert "calibrated label-free" in open(os.path.join(student, card.CARD_FILE)).read()


def test_unknown_dev_labels_are_one_line_naming_them(task, tmp_path):
    _, cache_path, _, base = task
    dev = tmp_path / "dev.jsonl"
    dev.write_text(
        json.dumps({"text": "a river", "label": "river"}) + "\n" + json.dumps({"text": "x", "label": "lake"}) + "\n"
    )
    result = run_main(
        "train_student.py",
        "--cache",
        cache_path,
        "--output_dir",
        tmp_path / "s",
        "--student_name_or_path",
        base,
        "--dev_file",
        dev,
    )
    assert result.returncode == 2 and "'lake'" in result.stderr and "known classes" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "s").exists()


def test_dev_texts_that_are_in_the_cache_are_not_trained_on(task, tmp_path):
    root, cache_path, _, base = task
    from zsdistill import cache

    _, table = cache.load_cache(cache_path)
    texts = table.column("text").to_pylist()
    dev = tmp_path / "dev.jsonl"  # three texts of the training cache itself, as a user's own draw would be
    rows = [{"text": texts[i], "label": "apple"} for i in (3, 50, 90)]
    dev.write_text("".join(json.dumps(r) + "\n" for r in rows))
    student = train_student.main(
        cache=cache_path,
        output_dir=str(tmp_path / "s"),
        student_name_or_path=base,
        dev_file=str(dev),
        holdout_fraction=0,
        save_strategy="no",
        **QUICK,
    )
    assert json.load(open(os.path.join(student, card.INFO_FILE)))["metrics"]["dev"]["examples"] == 3
    used = train_student.load_inputs(
        train_student.StudentOptions(cache=cache_path, output_dir="x", dev_file=str(dev), holdout_fraction=0)
    )[2]
    assert len(used) == len(texts) - 3 and not {3, 50, 90} & set(used.tolist())


def test_a_multi_label_student_gets_a_temperature_per_class_fitted_on_the_dev_labels(task, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    _, cache_path, single_dev, base = task
    rows = [json.loads(line) for line in open(single_dev)]
    dev = tmp_path / "dev.jsonl"  # some texts carry two classes, one (the last) none
    labels = [[r["label"]] + (["guitar"] if i % 4 == 0 and r["label"] != "guitar" else []) for i, r in enumerate(rows)]
    labels[-1] = []
    dev.write_text("".join(json.dumps({"text": r["text"], "label": y}) + "\n" for r, y in zip(rows, labels)))
    student = train_student.main(
        cache=cache_path,
        output_dir=str(tmp_path / "s"),
        student_name_or_path=base,
        multi_label=True,
        calibrate=True,
        dev_file=str(dev),
        save_strategy="no",
        **QUICK,
    )
    info = json.load(open(os.path.join(student, card.INFO_FILE)))
    calibration = info["calibration"]
    assert calibration["fitted_on"] == "dev labels" and calibration["per_class"] is True
    assert len(calibration["logit_scale"]) == len(CLASSES) and info["metrics"]["dev"]["examples"] == 40
    # The head holds one scale a class: each the one that makes that class's dev labels most likely.
    model = AutoModelForSequenceClassification.from_pretrained(student).eval()
    encoded = AutoTokenizer.from_pretrained(student)([r["text"] for r in rows], padding=True, return_tensors="pt")
    raw = model(**encoded).logits.detach().numpy() / np.array(calibration["logit_scale"])
    multi_hot = np.array([[name in y for name in CLASSES] for y in labels], dtype=float)
    expected = 1 / train_student.per_class_temperatures(raw, multi_hot)
    np.testing.assert_allclose(calibration["logit_scale"], expected, rtol=1e-3)
    shared = 1 / train_student.fit_logit_temperature(raw, multi_hot, True)
    assert not np.allclose(calibration["logit_scale"], shared, rtol=1e-2)  # not the shared scale written K times
    assert (
        "calibrated on 40 dev labels (one temperature a class folded into the head)"
        in open(os.path.join(student, card.CARD_FILE)).read()
    )


def test_per_class_temperatures_undo_each_class_s_own_over_or_under_confidence():
    rng = np.random.default_rng(0)
    true_logits = rng.normal(0, 2.0, size=(400, 3))
    labels = (rng.random((400, 3)) < 1 / (1 + np.exp(-true_logits))).astype(float)
    labels[:, 2] = 0
    labels[:2, 2] = 1  # class 2: present twice only, too few to fit a temperature of its own
    student = true_logits * np.array([3.0, 0.5, 1.0])  # class 0 over-confident, class 1 under-confident
    temperatures = train_student.per_class_temperatures(student, labels)
    assert temperatures[0] == pytest.approx(3.0, rel=0.25) and temperatures[1] == pytest.approx(0.5, rel=0.25)
    assert temperatures[2] == train_student.fit_logit_temperature(student, labels, True)  # the shared one
    shared = train_student.fit_logit_temperature(student[:, :2], labels[:, :2], True)
    from zsdistill.metrics import multi_label_metrics

    def ece(scaled):
        return multi_label_metrics(labels[:, :2], 1 / (1 + np.exp(-scaled)), ["a", "b"])["ece"]

    assert ece(student[:, :2] / temperatures[:2]) < ece(student[:, :2] / shared) - 0.02


# ---------------------------------------------------------------- dev labels in refinement (--refine_with_dev)


def clustered_texts(rng, directions: np.ndarray, counts: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Unit embeddings scattered around each class's direction (counts[k] of class k), and their labels."""
    labels = np.repeat(np.arange(len(counts)), counts)
    embeddings = directions[labels] + rng.normal(0, 1.0, size=(len(labels), directions.shape[1]))
    return (embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)).astype(np.float32), labels


def sure_teacher(taught: np.ndarray, num_classes: int) -> np.ndarray:
    """Posteriors of a teacher 0.9 sure of the `taught` class of every text."""
    posteriors = np.full((len(taught), num_classes), 0.05, dtype=np.float32)
    posteriors[np.arange(len(taught)), taught] = 0.9
    return posteriors


def confidently_wrong_task(seed: int = 0):
    """Three classes as clusters of unit embeddings, class 2's beside class 0's; the teacher puts class 2's texts in
    class 0, sure of it, so the embedding space alone keeps them there."""
    directions = np.zeros((3, 8))
    directions[0, 0], directions[1, 1], directions[2, 0], directions[2, 3] = 3.0, 3.0, 2.4, 1.8
    embeddings, labels = clustered_texts(np.random.default_rng(seed), directions, [60, 60, 60])
    return embeddings, labels, sure_teacher(np.where(labels == 2, 0, labels), 3)


def test_dev_labels_give_back_a_class_the_teacher_is_confidently_wrong_about():
    from zsdistill import refine

    embeddings, labels, posteriors = confidently_wrong_task()
    dev = np.concatenate([np.flatnonzero(labels == k)[:8] for k in range(3)])
    chunks = (lambda: iter([(0, posteriors)]), lambda: iter([(0, embeddings)]), len(labels), 3)
    label_free, _ = refine.refine(*chunks)
    with_dev, fitted = refine.refine(*chunks, labeled=refine.LabeledTexts(embeddings[dev], labels[dev]))
    rest = np.setdiff1d(np.arange(len(labels)), dev)  # texts that were not labeled
    assert (label_free.argmax(1)[rest][labels[rest] == 2] == 2).mean() == 0  # the teacher never says 2
    assert (with_dev.argmax(1)[rest][labels[rest] == 2] == 2).mean() > 0.7  # 0.79 when written
    assert (with_dev.argmax(1)[rest] == labels[rest]).mean() > 0.75  # 0.82
    assert fitted.settings()["labeled_texts"]["per_class"] == [8, 8, 8]

    # kappa: fitted on the dev labels, each text scored by a refinement made without it (two folds: within each class
    # every other text), which is less sure than scoring them by the centroids they pulled.
    halves = [dev[np.concatenate([np.arange(k * 8, k * 8 + 8)[fold::2] for k in range(3)])] for fold in (0, 1)]
    similarity = np.zeros((len(labels), 3), dtype=np.float32)
    for held, rest in ((halves[0], halves[1]), (halves[1], halves[0])):
        without, _ = refine.rounds(*chunks, labeled=refine.LabeledTexts(embeddings[rest], labels[rest]))
        similarity[held] = refine.centered(embeddings[held], without.center) @ without.centroids.T
    expected = refine.fit_kappa(similarity[dev], fitted.log_priors, labels[dev], refine.MIN_KAPPA_CENTERED)
    assert fitted.kappa == pytest.approx(expected, rel=1e-4)
    moved = refine.centered(embeddings[dev], fitted.center)
    in_sample = refine.fit_kappa(moved @ fitted.centroids.T, fitted.log_priors, labels[dev], refine.MIN_KAPPA_CENTERED)
    assert fitted.kappa < in_sample


def generic_class_task(seed: int = 0):
    """Three classes, the third 40% of the texts and spread thin (a generic class); the teacher puts 70% of its texts
    in the other two, so refinement's own priors give it under 30%."""
    rng = np.random.default_rng(seed)
    directions = np.zeros((3, 8))
    directions[0, 0], directions[1, 1], directions[2, 2] = 3.0, 3.0, 1.2
    embeddings, labels = clustered_texts(rng, directions, [90, 90, 120])
    taught = labels.copy()
    moved = (labels == 2) & (rng.random(len(labels)) < 0.7)
    taught[moved] = rng.integers(0, 2, moved.sum())
    return embeddings, labels, sure_teacher(taught, 3)


def test_dev_labels_correct_the_share_of_a_class_refinement_under_estimates():
    from zsdistill import refine

    embeddings, labels, posteriors = generic_class_task()
    dev = np.concatenate([np.flatnonzero(labels == k)[:8] for k in range(3)])
    chunks = (lambda: iter([(0, posteriors)]), lambda: iter([(0, embeddings)]), len(labels), 3)
    labeled = refine.LabeledTexts(embeddings[dev], labels[dev])
    before, kept = refine.refine(*chunks, labeled=labeled, dev_bias=False)
    after, biased = refine.refine(*chunks, labeled=labeled)
    rest = np.setdiff1d(np.arange(len(labels)), dev)
    recall = lambda p: (p.argmax(1)[rest][labels[rest] == 2] == 2).mean()  # noqa: E731
    shares = np.exp(kept.log_priors) / np.exp(kept.log_priors).sum()
    assert shares[2] < 0.3  # refinement's own share of the generic class (true: 0.4)
    assert biased.dev_bias_std in refine.DEV_BIAS_STDS and biased.dev_bias[2] > 0.5  # 0.85 when written
    assert recall(after) > recall(before) + 0.1  # 0.83 against 0.66
    assert (after.argmax(1)[rest] == labels[rest]).mean() > (before.argmax(1)[rest] == labels[rest]).mean()
    settings = biased.settings()["labeled_texts"]
    assert settings["prior_bias"] == [round(b, 6) for b in biased.dev_bias] and settings["prior_bias_std"] > 0
    # the bias lives in the saved log priors, so evaluate.py's refined teacher on a test cache applies it too
    np.testing.assert_allclose(biased.log_priors, kept.log_priors + np.float32(biased.dev_bias), rtol=1e-6, atol=1e-6)
    # --norefine_dev_bias is the release before: kappa alone, fitted as fit_kappa fits it
    assert kept.dev_bias is None and kept.settings()["labeled_texts"]["prior_bias"] is None


def test_the_prior_bias_fit_is_the_penalised_likelihood_optimum():
    from scipy.optimize import minimize

    from zsdistill import refine

    rng = np.random.default_rng(3)
    labels = np.repeat(np.arange(4), 8)
    similarity = 0.3 * np.eye(4)[labels] + rng.normal(0, 0.2, size=(32, 4))
    log_priors = np.log(np.array([0.55, 0.3, 0.1, 0.05]))  # far from the dev set's equal shares

    def objective(params):  # written out plainly, without the gradient
        scores = np.exp(params[0]) * similarity + log_priors + params[1:]
        nll = (np.logaddexp.reduce(scores, axis=1) - scores[np.arange(32), labels]).sum()
        return nll + (params[1:] ** 2).sum() / (2 * 0.7**2)

    kappa, bias = refine.fit_kappa_and_bias(similarity, log_priors, labels, refine.MIN_KAPPA_CENTERED, 0.7)
    plain = minimize(objective, np.r_[np.log(10.0), np.zeros(4)], method="Nelder-Mead", options={"maxiter": 20000})
    assert objective(np.r_[np.log(kappa), bias]) <= plain.fun + 1e-6
    assert bias[3] > 0 > bias[0]  # the rare prior raised, the common one lowered
    # the chosen strength: with priors far off a bias wins; with the dev set's own (equal) shares, none is needed
    assert refine.choose_bias_std(similarity, log_priors, labels, refine.MIN_KAPPA_CENTERED) is not None
    assert refine.choose_bias_std(similarity, np.log(np.full(4, 0.25)), labels, refine.MIN_KAPPA_CENTERED) is None


def embedding_cache(root, fingerprint: str | None = None) -> tuple[str, str]:
    """A cache whose text embeddings come from a tiny local encoder named in its manifest (so stage 2 can embed dev
    texts the same way), a toy teacher that knows the keyword; and a dev file of texts it does not hold."""
    from conftest import make_embedding_model

    from zsdistill import cache, inference, targets
    from zsdistill.teacher import _directory_fingerprint

    encoder = make_embedding_model(str(root / "encoder"), seed=5, initializer_range=0.2)
    texts, labels, columns = keyword_task(200, CLASSES, seed=4)
    from transformers import AutoModel, AutoTokenizer

    embeddings = inference.embed(
        AutoModel.from_pretrained(encoder), AutoTokenizer.from_pretrained(encoder), texts, 64, 64, 4096
    )
    path = write_toy_cache(
        str(root / "cache" / f"emb-{fingerprint or 'real'}"),
        texts[:160],
        CLASSES,
        {"similarity": targets.SIMILARITY_SCALE * columns["entailment"][:160] / 3},
        kind="embedding",
        text_embeddings=embeddings[:160],
    )
    manifest_path = os.path.join(path, cache.MANIFEST)
    manifest = json.load(open(manifest_path))
    manifest["teacher"] = {
        "name_or_path": encoder,
        "fingerprint": fingerprint or _directory_fingerprint(encoder),
        "kind": "embedding",
        "pooling": "mean",
    }
    cache.write_json_atomic(manifest_path, manifest)
    dev = root / "dev-emb.jsonl"
    dev.write_text(
        "".join(json.dumps({"text": t, "label": CLASSES[y]}) + "\n" for t, y in zip(texts[160:], labels[160:]))
    )
    return path, str(dev)


def test_dev_texts_join_refinement_and_the_student_is_calibrated_through_its_targets(task, tmp_path):
    root, _, _, base = task
    path, dev = embedding_cache(tmp_path)

    def dev_student_info(folder: str, **options) -> dict:
        student = train_student.main(
            cache=path,
            output_dir=str(tmp_path / folder),
            student_name_or_path=base,
            dev_file=dev,
            save_strategy="no",
            **QUICK,
            **options,
        )
        return json.load(open(os.path.join(student, card.INFO_FILE)))

    info = with_dev = dev_student_info("s")
    assert info["refinement"]["labeled_texts"]["examples"] == 40 and info["refine_with_dev"]
    assert info["refinement"]["labeled_texts"]["kappa_fitted_on"] == "dev labels, cross-fitted (2 folds)"
    assert info["calibration"]["fitted_on"] == "held-out targets" and info["calibration"]["dev_in_targets"]
    text = open(tmp_path / "s" / card.CARD_FILE).read()
    assert "calibrated on 40 dev labels through its targets" in text and "these are optimistic" in text
    assert "centroids moved toward 40 labeled dev texts" in text
    labeled = info["refinement"]["labeled_texts"]
    assert info["refine_dev_agreement"] and labeled["agreed_weight"] == 0.5
    assert "(each one refinement already placed right counting as 0.5 of a text)" in text
    counted_fully = {**info, "refinement": {**info["refinement"], "labeled_texts": {**labeled, "agreed_weight": 1.0}}}
    assert "already placed right" not in card.render(counted_fully)  # --norefine_dev_agreement
    assert info["refine_dev_bias"] and ("class priors corrected" in text) == bool(labeled["prior_bias"])
    biased = {**info, "refinement": {**info["refinement"], "labeled_texts": {**labeled, "prior_bias": [0.5, -0.25]}}}
    assert "class priors corrected by them (biases +0.50, -0.25)" in card.render(biased)
    # With dev labels their prior bias sets the priors: no floor, and the card does not claim one.
    assert info["refinement"]["prior_floor"] is None and "prior under the smaller" not in text
    floored = {**info, "refinement": {**info["refinement"], "labeled_texts": None, "prior_floor": 0.4}}
    assert "no class's prior under the smaller of the teacher's and 0.4 / K" in card.render(floored)
    # With dev labels the drift guard is not applied, and the card names a guarded class only where there is one.
    assert info["refinement"]["drift_guard"] is False and "refined again anchored" not in text
    guarded = {**info, "refinement": {**info["refinement"], "labeled_texts": None, "guarded_classes": [1]}}
    name = info["cache_summary"]["class_names"][1]
    assert f"refined again anchored to the texts the teacher is surest of for `{name}`" in card.render(guarded)
    # The card names the classes the targets starve, only where there are some.
    assert ("so the student rarely predicts" in text) == bool(info["refinement"]["starved_classes"])
    starved = {**info, "refinement": {**info["refinement"], "starved_classes": [1]}}
    assert f"the targets give `{name}` under a quarter of the texts the teacher gives each" in card.render(starved)
    held = {**info, "refinement": {**starved["refinement"], "starved_share": 0.75}}  # --refine_starved_share 0.75
    assert "so each was made the most likely class of 75% of the teacher's count of texts" in card.render(held)
    assert "so the student rarely predicts" not in card.render(held)
    assert "refinement's confidence and class priors fitted on them" in card.calibration_text(biased)

    # A dev set of k a class cannot show the class shares its prior bias was fitted to: the card says so, only then.
    def labeled_as(info: dict, **changes) -> dict:
        refinement = info["refinement"]
        return {**info, "refinement": {**refinement, "labeled_texts": {**refinement["labeled_texts"], **changes}}}

    equal = labeled_as(info, prior_bias=[0.5, -0.25, 0.0], per_class=[8, 8, 8])
    said = card.calibration_text(equal)
    assert "the dev set has 8 of every class, so the class priors lean toward equal shares" in said
    uneven, unbiased = labeled_as(equal, per_class=[8, 3, 8]), labeled_as(equal, prior_bias=None)
    assert "of every class" not in card.calibration_text(uneven) + card.calibration_text(unbiased)

    info = dev_student_info("t", refine_with_dev=False)
    assert info["refinement"]["labeled_texts"] is None and info["calibration"]["fitted_on"] == "dev labels"
    assert info["refinement"]["kappa"] != with_dev["refinement"]["kappa"]

    info = dev_student_info("u", refine_dev_agreement=False)
    assert not info["refine_dev_agreement"] and info["refinement"]["labeled_texts"]["agreed_weight"] == 1.0


def test_dev_texts_are_not_embedded_by_another_model_than_the_caches(task, tmp_path):
    path, dev = embedding_cache(tmp_path, fingerprint="another-model")
    _, _, _, base = task
    result = run_main(
        "train_student.py",
        "--cache",
        path,
        "--output_dir",
        tmp_path / "s",
        "--student_name_or_path",
        base,
        "--dev_file",
        dev,
    )
    said = [line for line in result.stderr.strip().splitlines() if not line.startswith("[student]")]  # not the log
    assert result.returncode == 2 and len(said) == 1 and "--norefine_with_dev" in said[0] and "another-model" in said[0]
    assert "Traceback" not in result.stderr and not (tmp_path / "s").exists()


def test_with_adaptation_the_dev_texts_are_embedded_by_the_adapted_encoder(task, tmp_path, monkeypatch):
    _, _, _, base = task
    path, dev = embedding_cache(tmp_path)
    embedded_by = []
    real = train_student.embed_dev_texts
    monkeypatch.setattr(
        train_student, "embed_dev_texts", lambda m, t, encoder=None: embedded_by.append(encoder) or real(m, t, encoder)
    )
    student = train_student.main(
        cache=path,
        output_dir=str(tmp_path / "s"),
        student_name_or_path=base,
        dev_file=dev,
        adapt_rounds=1,
        save_strategy="no",
        **QUICK,
    )
    info = json.load(open(os.path.join(student, card.INFO_FILE)))
    adaptation = info["refinement"]["adaptation"]
    # In the adapted space, then in the frozen one: the dev labels choose between the two (--adapt_dev_check).
    assert embedded_by == [os.path.join(adaptation["directory"], "encoder"), None]
    assert info["refinement"]["labeled_texts"]["examples"] == 40 and info["adapt_dev_check"] is True
    kept = adaptation["dev_check"]["kept"]
    assert info["refinement"]["embedding_fingerprint"].startswith("adapted:") == kept
    said = card.adaptation_text(adaptation)
    assert said and said in open(os.path.join(student, "README.md")).read()
