"""Balanced distillation (stage 2's default): every class the targets teach is learned, and --nobalance is the old
order."""

import json
import os

import numpy as np
import pytest
import torch
from conftest import make_student_base, write_toy_cache

import train_student


def imbalanced_keyword_task(shares: list[float], num_examples: int, seed: int = 0, max_filler: int = 9):
    """Texts that each mention one class keyword among filler words, classes drawn with `shares`; a toy teacher
    that knows the keyword (right on every text, confident)."""
    rng = np.random.default_rng(seed)
    names = ["apple", "river", "guitar", "violet"][: len(shares)]
    filler = "the a of and to in is was for on with as by at from this that it be or".split()
    labels = rng.choice(len(names), size=num_examples, p=shares)
    texts = []
    for label in labels:
        words = list(rng.choice(filler, size=int(rng.integers(0, max_filler + 1))))
        words.insert(int(rng.integers(len(words) + 1)), names[label])
        texts.append(" ".join(words))
    entailment = rng.normal(0, 0.3, size=(num_examples, len(names))).astype(np.float32)
    entailment[np.arange(num_examples), labels] += 4.0
    return texts, names, labels, {"entailment": entailment, "contradiction": -entailment}


def student_probabilities(directory: str, texts: list[str]) -> np.ndarray:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(directory).eval()
    tokenizer = AutoTokenizer.from_pretrained(directory)
    with torch.no_grad():
        return torch.softmax(model(**tokenizer(texts, padding=True, return_tensors="pt")).logits, -1).numpy()


def test_class_balanced_weights_give_every_class_an_equal_share():
    rng = np.random.default_rng(0)
    labels = rng.choice(3, size=10_000, p=[0.75, 0.17, 0.08])
    soft = np.full((10_000, 3), 0.05, dtype=np.float32)
    soft[np.arange(10_000), labels] = 0.90
    rows = np.arange(0, 10_000, 2)  # the training rows: priors come from these alone
    weights = train_student.class_balanced_weights(soft, rows)
    assert weights.shape == (len(rows),) and weights.mean() == pytest.approx(1.0)
    share = (
        np.bincount(labels[rows], weights=weights, minlength=3) / weights.sum()
    )  # each class's expected share of the draws
    np.testing.assert_allclose(share, 1 / 3, atol=1e-9)
    # A class of a handful of rows is upweighted as if its share were MIN_BALANCED_PRIOR / K, no more.
    labels[rows[:5]], labels[rows[5:]] = 2, np.where(labels[rows[5:]] == 2, 0, labels[rows[5:]])
    soft = np.full((10_000, 3), 0.05, dtype=np.float32)
    soft[np.arange(10_000), labels] = 0.90
    weights = train_student.class_balanced_weights(soft, rows)
    floor = train_student.MIN_BALANCED_PRIOR * len(rows) / 3  # rows
    assert weights[:5].sum() / weights.sum() == pytest.approx(
        (5 / floor) / (5 / floor + 2)
    )  # classes 0 and 1 keep one share each


def test_balancing_power_shares_draws_by_a_power_of_the_class_size():
    labels = np.array([0] * 900 + [1] * 100)
    soft = np.eye(2, dtype=np.float32)[labels]
    for power, expected in ((1.0, 0.5), (0.5, 100**0.5 / (900**0.5 + 100**0.5)), (0.0, 0.1)):
        weights = train_student.class_balanced_weights(soft, np.arange(1000), power)
        assert weights[labels == 1].sum() / weights.sum() == pytest.approx(expected), power


def test_balanced_sampler_draws_the_small_class_as_often_as_the_others_and_is_seeded():
    labels = np.array([0] * 880 + [1] * 80 + [2] * 40)
    soft = np.eye(3, dtype=np.float32)[labels]
    sampler = train_student.BalancedRandomSampler(train_student.class_balanced_weights(soft, np.arange(1000)), seed=3)
    first = list(sampler)
    assert len(first) == 1000 and all(isinstance(i, int) for i in first)
    counts = np.bincount(labels[first], minlength=3)
    assert counts.min() > 250, counts  # about 333 each; the plain order gives the small class 40
    assert first == list(sampler)  # same seed and epoch, same draws (every torchrun rank agrees)
    sampler.set_epoch(1)
    assert first != list(sampler)


def padded_tokens(order: list[int], lengths: np.ndarray, batch_size: int) -> int:
    batches = [lengths[order[i : i + batch_size]] for i in range(0, len(order), batch_size)]
    return sum(len(b) * b.max() for b in batches)


@pytest.mark.parametrize("balanced", [False, True])
def test_group_by_length_reorders_the_same_draws_so_batches_pad_less(balanced):
    """--train_sampling_strategy group_by_length keeps the rows the sampler draws (balanced distillation's draws
    included) and sorts each megabatch of 50 batches longest first, as transformers' LengthGroupedSampler does."""
    rng = np.random.default_rng(0)
    lengths, batch_size = rng.integers(3, 60, size=2_000), 8
    weights = np.where(np.arange(2_000) < 200, 9.0, 1.0)
    make = (
        (lambda lengths: train_student.BalancedRandomSampler(weights, 4, lengths, batch_size))
        if balanced
        else (lambda lengths: train_student.CompactRandomSampler(2_000, 4, lengths, batch_size))
    )
    plain, grouped = list(make(None)), list(make(lengths))
    assert sorted(plain) == sorted(grouped) and plain != grouped
    megabatch = train_student.LENGTH_GROUP_BATCHES * batch_size
    for start in range(0, 2_000, megabatch):
        assert grouped[start : start + megabatch] == sorted(
            plain[start : start + megabatch], key=lambda row: -lengths[row]
        )
    assert padded_tokens(grouped, lengths, batch_size) < 0.7 * padded_tokens(plain, lengths, batch_size)
    sampler = make(lengths)
    sampler.set_epoch(1)
    assert list(sampler) != grouped


def train_one_step_recording_the_sampler(tmp_path, num_examples: int, **options) -> tuple[dict, list[str], str]:
    """One training step on a toy cache (90% / 10% classes) with the Trainer's samplers recorded: (what was seen,
    the cache's texts, the student's output directory)."""
    texts, names, _, columns = imbalanced_keyword_task([0.9, 0.1], num_examples)
    path = write_toy_cache(str(tmp_path / "cache" / "toy"), texts, names, columns)
    seen = {"base": make_student_base(str(tmp_path / "base"))}

    class Recording(train_student.DistillationTrainer):
        def _get_train_sampler(self, train_dataset=None):
            seen["sampler"] = super()._get_train_sampler(train_dataset)
            seen["rows"] = self.train_dataset.rows
            seen["eval_order"] = list(self._get_eval_sampler(self.train_dataset))
            return seen["sampler"]

    original = train_student.DistillationTrainer
    train_student.DistillationTrainer = Recording
    try:
        output = train_student.main(
            cache=path,
            output_dir=str(tmp_path / "student"),
            student_name_or_path=seen["base"],
            max_steps=1,
            per_device_train_batch_size=4,
            use_cpu=True,
            save_strategy="no",
            disable_tqdm=True,
            **options,
        )
    finally:
        train_student.DistillationTrainer = original
    return seen, texts, output


def test_group_by_length_reaches_the_balanced_sampler_with_the_texts_token_counts(tmp_path):
    """The Trainer's flag keeps balanced distillation (transformers' own LengthGroupedSampler would draw every row
    once), the lengths are the student's tokens of each training row's text, and evaluation keeps the rows' order."""
    seen, texts, _ = train_one_step_recording_the_sampler(
        tmp_path, 60, train_sampling_strategy="group_by_length", gradient_accumulation_steps=2
    )
    sampler = seen["sampler"]
    assert type(sampler) is train_student.BalancedRandomSampler and sampler.batch_size == 8
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(seen["base"])
    tokens = tokenizer([texts[row] for row in seen["rows"]], truncation=True)["input_ids"]
    assert sampler.lengths.tolist() == [len(ids) for ids in tokens]
    # Predictions (calibration, dev metrics) come back in row order: transformers' own eval sampler would group them.
    assert seen["eval_order"] == list(range(len(seen["rows"])))


def test_nobalance_draws_every_row_once_in_the_order_of_before(tmp_path):
    """--nobalance is the old sampler: a permutation seeded by --seed + epoch, exactly as before balancing existed."""
    seen, _, output = train_one_step_recording_the_sampler(tmp_path, 40, balance=False, seed=5)
    sampler = seen["sampler"]
    assert type(sampler) is train_student.CompactRandomSampler
    generator = torch.Generator()
    generator.manual_seed(5)
    assert list(sampler) == torch.randperm(sampler.num_rows, generator=generator).tolist()  # the pre-balancing order
    info = json.load(open(os.path.join(output, "distill_info.json")))
    assert info["balance"] == {"applied": False, "method": None, "power": None, "min_prior": None}


def test_balanced_distillation_keeps_a_small_class_that_the_plain_order_drops(tmp_path):
    """A toy teacher right on every text; class 'guitar' is 2% of them. With the same short training, the plain
    order never predicts it; balanced distillation does, and the other classes stay learned. (Seeds 1 and 2 gave
    the small class a mean probability of 0.16 and 0.14 plain, 0.44 and 0.55 balanced.)"""
    texts, names, labels, columns = imbalanced_keyword_task([0.60, 0.38, 0.02], 800, max_filler=2)
    path = write_toy_cache(str(tmp_path / "cache" / "toy"), texts, names, columns, shard_size=500)
    base = make_student_base(str(tmp_path / "base"))
    small = labels == 2
    assert 10 <= small.sum() <= 30
    results = {}
    for balance in (False, True):
        output = train_student.main(
            cache=path,
            output_dir=str(tmp_path / f"student-{balance}"),
            student_name_or_path=base,
            balance=balance,
            refine=False,
            holdout_fraction=0,
            num_train_epochs=2,
            learning_rate=1e-3,
            per_device_train_batch_size=16,
            use_cpu=True,
            save_strategy="no",
            disable_tqdm=True,
            seed=0,
        )
        probabilities = student_probabilities(output, texts)
        recall = [(probabilities.argmax(1)[labels == k] == k).mean() for k in range(3)]
        results[balance] = (probabilities[small, 2].mean(), recall)
    (plain_p, plain_recall), (balanced_p, balanced_recall) = results[False], results[True]
    assert plain_recall[2] <= 0.1 and plain_p < 0.3, results
    assert balanced_recall[2] >= 0.5 and balanced_p > 2 * plain_p, results
    assert min(balanced_recall[:2]) >= 0.9 and min(plain_recall[:2]) >= 0.9, results


@pytest.mark.parametrize("value", ["2", "-0.5", "lots"])
def test_bad_balance_is_a_one_line_error(tmp_path, value):
    from conftest import run_main

    texts, names, _, columns = imbalanced_keyword_task([0.9, 0.1], 20)
    path = write_toy_cache(str(tmp_path / "cache" / "toy"), texts, names, columns)
    result = run_main("train_student.py", "--cache", path, "--output_dir", tmp_path / "out", "--balance", value)
    assert result.returncode == 2 and "--balance must be True, False or a balancing power in [0, 1]" in result.stderr, (
        result.stderr
    )
    assert not (tmp_path / "out").exists()
