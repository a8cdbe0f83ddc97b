"""Build the demo's topic task from Debian's wordnet-base (`/usr/share/wordnet/data.noun`).

Text = a noun synset's gloss definition (its quoted example sentences removed); label = its lexicographer
category, named for people. Deterministic, disjoint splits (no text in two splits):

    <output_dir>/classes.txt  the class names, one per line
    <output_dir>/train.txt    unlabeled training pool, one text per line (what the teacher labels)
    <output_dir>/dev.jsonl    small labeled dev split carved from the training side (for choosing settings)
    <output_dir>/test.jsonl   labeled held-out test set {"text", "label"}

    python data/build_wordnet.py --output_dir demo/data
"""

import json
import os
import random
import sys

import fire

# lexicographer file number -> human-readable class name (see WordNet's lexnames(5WN))
CATEGORIES = {
    "05": "animal",  # noun.animal
    "20": "plant",  # noun.plant
    "13": "food",  # noun.food
    "18": "person",  # noun.person
    "15": "location",  # noun.location
    "06": "artifact",  # noun.artifact
    "08": "body",  # noun.body
    "27": "substance",  # noun.substance
}


def gloss_definition(gloss: str) -> str:
    """The gloss without its quoted example sentences: `def; "example"; "example"` -> `def`."""
    parts = [part.strip() for part in gloss.split(";")]
    return "; ".join(part for part in parts if part and not part.startswith('"')).strip()


def parse_data_noun(path: str) -> list[tuple[str, str]]:
    """(text, class name) for every synset in the demo's categories; header lines (leading spaces) skipped."""
    examples = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if line.startswith(" ") or " | " not in line:
                continue
            fields = line.split(" ", 2)
            label = CATEGORIES.get(fields[1])
            if label is None:
                continue
            text = gloss_definition(line.split(" | ", 1)[1].strip())
            if text:
                examples.append((text, label))
    return examples


def main(
    data_noun: str = "/usr/share/wordnet/data.noun",
    output_dir: str = "demo/data",
    test_size: int = 2000,
    dev_size: int = 400,
    train_size: int = 8000,
    seed: int = 0,
) -> None:
    """Write classes.txt, train.txt, dev.jsonl and test.jsonl.

    Args:
        data_noun: WordNet's data.noun (Debian package wordnet-base).
        output_dir: where the split files go.
        test_size: labeled test examples.
        dev_size: labeled dev examples, carved from the training side.
        train_size: unlabeled training-pool examples (at most what remains).
        seed: shuffling seed.
    """
    if not os.path.isfile(data_noun):
        print(
            f"error: {data_noun} not found; install Debian's wordnet-base (apt-get install wordnet-base)",
            file=sys.stderr,
        )
        sys.exit(2)
    examples = parse_data_noun(data_noun)
    # A text with two different categories cannot be labeled; a repeated text must not cross splits.
    labels_of: dict[str, set[str]] = {}
    for text, label in examples:
        labels_of.setdefault(text, set()).add(label)
    unique = sorted((text, next(iter(labels))) for text, labels in labels_of.items() if len(labels) == 1)
    random.Random(seed).shuffle(unique)
    if len(unique) < test_size + dev_size + 1:
        print(f"error: only {len(unique)} usable examples in {data_noun}", file=sys.stderr)
        sys.exit(2)
    test, dev, train = (
        unique[:test_size],
        unique[test_size : test_size + dev_size],
        unique[test_size + dev_size :][:train_size],
    )

    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(output_dir, "classes.txt"), "w") as f:
        f.write("\n".join(CATEGORIES.values()) + "\n")
    with open(os.path.join(output_dir, "train.txt"), "w") as f:
        f.write("".join(text + "\n" for text, _ in train))
    for name, split in (("dev", dev), ("test", test)):
        with open(os.path.join(output_dir, f"{name}.jsonl"), "w") as f:
            f.write("".join(json.dumps({"text": text, "label": label}) + "\n" for text, label in split))
    counts = {name: sum(1 for _, label in test if label == name) for name in CATEGORIES.values()}
    print(
        f"wrote {output_dir}: {len(train)} unlabeled train, {len(dev)} dev, {len(test)} test; test per class {counts}",
        file=sys.stderr,
    )


if __name__ == "__main__":
    fire.Fire(main)
