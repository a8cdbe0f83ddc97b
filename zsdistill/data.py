"""Data readers shared by the stages: unlabeled texts (streamed), class names, labeled test sets.

Supported inputs: `.txt` (one example per line, blank lines skipped), `.csv`, `.jsonl`/`.json` (one
object per line), `.parquet`; labeled sets also `.tsv` (`label<TAB>text`). Unlabeled texts also come from a
directory or glob of such files, a `datasets` save_to_disk directory, or `datasets.load_dataset` (streaming). Every
problem is raised as a
UserError naming the file and line/row.
"""

import array  # noqa: F401  (the type of scan_texts' text_hashes)
import bisect
import glob
import hashlib
import json
import os
import string
from typing import Callable, Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from zsdistill.errors import UserError

TEXT_FORMATS = (".txt", ".csv", ".jsonl", ".json", ".parquet")
LABELED_FORMATS = (".jsonl", ".json", ".csv", ".parquet", ".tsv", ".txt")
ENCODING_ERRORS = ("strict", "replace", "ignore")


def _suffix(path: str, allowed: tuple[str, ...], what: str) -> str:
    if not os.path.exists(path):
        raise UserError(f"{what} {path!r} does not exist: check the path")
    if os.path.isdir(path):
        raise UserError(f"{what} {path!r} is a directory: give a file")
    suffix = os.path.splitext(path)[1].lower()
    if suffix not in allowed:
        raise UserError(f"{what} {path!r} has unsupported extension {suffix!r}: use one of {', '.join(allowed)}")
    return suffix


def _decode(raw: bytes, path: str, line_number: int, errors: str) -> str:
    try:
        return raw.decode("utf-8", errors=errors)
    except UnicodeDecodeError as e:
        raise UserError(
            f"{path}, line {line_number}: invalid UTF-8 ({e.reason} at byte {e.start}); fix the file or pass "
            f"--encoding_errors replace to substitute undecodable bytes"
        ) from None


def _table_column(table_path: str, columns: list[str], column: str, flag: str) -> None:
    if column not in columns:
        raise UserError(
            f"{table_path} has no column {column!r} (it has: {', '.join(map(repr, columns))}); pass {flag} with one "
            f"of them"
        )


def _iter_tabular_rows(path: str, suffix: str, columns: list[str], encoding_errors: str) -> Iterator[dict]:
    """Yield dict rows holding `columns`, in file order, streaming (never the whole file in memory)."""
    if suffix == ".parquet":
        try:
            parquet = pq.ParquetFile(path)
        except Exception as e:  # pyarrow says what is wrong with the file
            raise UserError(f"{path}: not a readable parquet file ({e})") from None
        names = parquet.schema_arrow.names
        for column in columns:
            _table_column(path, names, column, "--text_column/--label_column")
        for batch in parquet.iter_batches(columns=columns, batch_size=4096):
            yield from batch.to_pylist()
    elif suffix == ".csv":
        try:
            reader = pacsv.open_csv(
                path,
                read_options=pacsv.ReadOptions(block_size=1 << 22),
                convert_options=pacsv.ConvertOptions(column_types={c: pa.string() for c in columns}),
                parse_options=pacsv.ParseOptions(newlines_in_values=True),
            )
            names = reader.schema.names
        except pa.ArrowInvalid as e:
            if "Empty CSV file" in str(e):
                raise UserError(f"{path} is empty: give a CSV file with a header and rows") from None
            raise UserError(f"{path}: cannot read as CSV ({e}); check it is UTF-8 CSV with a header row") from None
        for column in columns:
            _table_column(path, names, column, "--text_column/--label_column")
        try:
            for batch in reader:
                yield from batch.select(columns).to_pylist()
        except pa.ArrowInvalid as e:
            raise UserError(f"{path}: cannot read as CSV ({e}); check its encoding (UTF-8) and quoting") from None
    else:  # jsonl
        with open(path, "rb") as f:
            for line_number, raw in enumerate(f, 1):
                line = _decode(raw, path, line_number, encoding_errors).strip()
                if not line:
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise UserError(
                        f"{path}, line {line_number}: not valid JSON ({e.msg}); expected one object per line"
                    ) from None
                if not isinstance(row, dict):
                    raise UserError(
                        f"{path}, line {line_number}: expected a JSON object per line, got {type(row).__name__}"
                    )
                for column in columns:
                    if column not in row:
                        raise UserError(
                            f"{path}, line {line_number}: no key {column!r} (it has: {', '.join(map(repr, row))}); "
                            f"pass --text_column/--label_column with the right name"
                        )
                row["_line"] = line_number
                yield row


def is_saved_dataset(path: str) -> bool:
    """A directory written by `datasets.Dataset.save_to_disk`."""
    return os.path.isfile(os.path.join(path, "state.json")) and os.path.isfile(os.path.join(path, "dataset_info.json"))


def data_files(path: str) -> list[str]:
    """What --data_file names, as a list of files in reading order: a file; a directory's supported files (recursively,
    sorted by their path inside it; hidden and `_`-prefixed names skipped, as Spark and Hadoop write them); or the
    files a glob pattern matches (sorted). A `save_to_disk` dataset directory is one entry of its own."""
    if not os.path.exists(path) and glob.has_magic(path):
        matches = sorted(m for m in glob.glob(path, recursive=True) if os.path.isfile(m))
        if not matches:
            raise UserError(
                f"data file pattern {path!r} matches no file: check the pattern (quote it so the shell leaves it to "
                f"zsdistill)"
            )
        for match in matches:
            _suffix(match, TEXT_FORMATS, "data file")
        return matches
    if os.path.isdir(path) and not is_saved_dataset(path):
        found = []
        for root, directories, names in os.walk(path):
            directories[:] = sorted(d for d in directories if not d.startswith((".", "_")))
            found += [
                os.path.join(root, n)
                for n in names
                if not n.startswith((".", "_")) and os.path.splitext(n)[1].lower() in TEXT_FORMATS
            ]
        if not found:
            raise UserError(
                f"data directory {path!r} holds no {'/'.join(TEXT_FORMATS)} file; give a file, a directory of them, "
                f"or a glob"
            )
        return sorted(found, key=lambda f: os.path.relpath(f, path).split(os.sep))
    return [path]


def _saved_dataset_blocks(path: str, text_column: str) -> Iterator[tuple[int, Callable[[], Iterable[str]]]]:
    """The text column of a save_to_disk dataset, a record batch at a time, read from its Arrow files with plain reads
    (memory flat)."""
    import pyarrow.ipc as ipc

    with open(os.path.join(path, "state.json")) as f:
        state = json.load(f)
    if state.get("_indices_data_files"):
        raise UserError(f"{path}: this saved dataset keeps an indices mapping; save it again after .flatten_indices()")
    first_row = 0
    for entry in state.get("_data_files", []):
        with pa.OSFile(os.path.join(path, entry["filename"])) as f:
            reader = ipc.open_stream(f)
            _table_column(path, reader.schema.names, text_column, "--text_column")
            for batch in reader:
                yield (
                    batch.num_rows,
                    lambda batch=batch, first_row=first_row: _checked(
                        batch.column(text_column).to_pylist(), path, text_column, first_row
                    ),
                )
                first_row += batch.num_rows


def _checked(texts: list, path: str, text_column: str, first_row: int) -> list[str]:
    """`texts`, rows first_row + 1... of `path`, once each is a non-empty string."""
    for index, text in enumerate(texts):
        if not isinstance(text, str) or not text.strip():
            raise UserError(
                f"{path}, row {first_row + index + 1}: column {text_column!r} is empty or not a string; every row "
                f"must hold a text"
            )
    return texts


def iter_dataset(
    name: str, config: str | None, split: str | None, text_column: str, rows: list[tuple[int, int]] | None = None
) -> Iterator[str]:
    """The text column of `datasets.load_dataset(name, config, split=split, streaming=True)`: hub ids for users with
    the hub, and whatever else load_dataset reads (local data directories, a builder such as 'parquet' with files).
    With `rows` (as iter_texts), only those rows are yielded (a stream is read through, but the others are skipped)."""
    import datasets

    try:
        loaded = datasets.load_dataset(name, config, split=split, streaming=True)
    except (FileNotFoundError, ValueError, ConnectionError, OSError) as e:
        raise UserError(
            f"--dataset {name!r}: cannot load it ({str(e).splitlines()[0][:300]}); check the name, --dataset_config "
            f"and --dataset_split"
        ) from None
    if isinstance(loaded, (datasets.IterableDatasetDict, datasets.DatasetDict)):
        raise UserError(
            f"--dataset {name!r} has splits {', '.join(map(repr, loaded))}: pass --dataset_split with one of them"
        )
    wanted = row_filter(rows)
    for index, row in enumerate(loaded):
        if not wanted(index, index + 1):
            continue
        if text_column not in row:
            raise UserError(
                f"--dataset {name!r} has no column {text_column!r} (it has: {', '.join(map(repr, row))}); pass "
                f"--text_column with one of them"
            )
        text = row[text_column]
        if not isinstance(text, str) or not text.strip():
            raise UserError(
                f"--dataset {name!r}: a row of column {text_column!r} is empty or not a string; every row must hold a "
                f"text"
            )
        yield text


def row_filter(rows: list[tuple[int, int]] | None) -> Callable[[int, int], bool]:
    """wanted(start, stop): whether rows start..stop meet any of the sorted, disjoint [start, stop) ranges of `rows`
    (None: all rows). A binary search, so a million rows cost well under a second."""
    if rows is None:
        return lambda start, stop: True
    merged: list[list[int]] = []
    for a, b in rows:
        if merged and merged[-1][1] == a:
            merged[-1][1] = b
        elif a < b:
            merged.append([a, b])
    starts, ends = [a for a, _ in merged], [b for _, b in merged]

    def wanted(start: int, stop: int) -> bool:
        i = bisect.bisect_left(starts, stop) - 1
        return i >= 0 and ends[i] > start

    return wanted


def iter_texts(
    path: str,
    text_column: str = "text",
    encoding_errors: str = "strict",
    rows: list[tuple[int, int]] | None = None,
    file_rows: list[int] | None = None,
) -> Iterator[str]:
    """Yield the examples' texts in reading order, one at a time: a file, every file of a directory or glob in
    sorted order (see data_files), or a save_to_disk dataset.

    With `rows` (sorted, disjoint [start, stop) row ranges) only those rows are yielded, and what lies outside them
    is not read where the format allows it: parquet row groups are skipped unread, a saved dataset's record batches
    undecoded, and, given `file_rows` (the rows each file holds, as scan_texts counts them), whole files unopened.
    """
    if encoding_errors not in ENCODING_ERRORS:
        raise UserError(f"--encoding_errors {encoding_errors!r} is not one of {', '.join(ENCODING_ERRORS)}")
    wanted = row_filter(rows)
    position = 0
    for index, file in enumerate(data_files(path)):
        if file_rows is not None and not wanted(position, position + file_rows[index]):
            position += file_rows[index]
            continue
        for count, read in _text_blocks(file, text_column, encoding_errors):
            if wanted(position, position + count):
                texts = read()
                yield from (
                    texts if rows is None else (t for row, t in enumerate(texts, position) if wanted(row, row + 1))
                )
            position += count


def _text_blocks(
    path: str, text_column: str, encoding_errors: str
) -> Iterator[tuple[int, Callable[[], Iterable[str]]]]:
    """One input's texts as blocks: (rows in the block, a function returning them). A parquet row group is read only
    when its function is called (a batch at a time); other formats are read as they go, a block of lines at a time."""
    if os.path.isdir(path):
        yield from _saved_dataset_blocks(path, text_column)
        return
    suffix = _suffix(path, TEXT_FORMATS, "data file")
    if suffix == ".parquet":
        try:
            parquet = pq.ParquetFile(path)
        except Exception as e:  # pyarrow says what is wrong with the file
            raise UserError(f"{path}: not a readable parquet file ({e})") from None
        _table_column(path, parquet.schema_arrow.names, text_column, "--text_column")

        def read_group(
            group: int, first_row: int
        ) -> Iterator[str]:  # a batch at a time: row groups can hold a million rows
            for batch in parquet.iter_batches(row_groups=[group], columns=[text_column], batch_size=4096):
                texts = batch.column(0).to_pylist()
                yield from _checked(texts, path, text_column, first_row)
                first_row += len(texts)

        first_row = 0
        for group in range(parquet.num_row_groups):
            count = parquet.metadata.row_group(group).num_rows
            yield count, lambda group=group, first_row=first_row: read_group(group, first_row)
            first_row += count
        return
    block = []
    for text in _iter_file_texts(path, suffix, text_column, encoding_errors):
        block.append(text)
        if len(block) == 4096:
            yield len(block), lambda block=block: block
            block = []
    if block:
        yield len(block), lambda block=block: block


def _iter_file_texts(path: str, suffix: str, text_column: str, encoding_errors: str) -> Iterator[str]:
    if suffix == ".txt":
        with open(path, "rb") as f:
            for line_number, raw in enumerate(f, 1):
                text = _decode(raw, path, line_number, encoding_errors).rstrip("\r\n")
                if text.strip():  # blank lines are skipped, as in the reference script
                    yield text
        return
    for index, row in enumerate(_iter_tabular_rows(path, suffix, [text_column], encoding_errors)):
        text = row[text_column]
        where = f"line {row['_line']}" if "_line" in row else f"row {index + 1}"
        if not isinstance(text, str) or not text.strip():
            raise UserError(
                f"{path}, {where}: column {text_column!r} is empty or not a string; every row must hold a text"
            )
        yield text


def scan_texts(
    path: str,
    text_column: str = "text",
    encoding_errors: str = "strict",
    texts: Iterator[str] | None = None,
    text_hashes: "array.array | None" = None,
    file_rows: list[int] | None = None,
) -> tuple[int, str]:
    """One streaming pass: validate every row, count them, and fingerprint the texts (of `path`, or of `texts`).

    The fingerprint hashes the texts themselves (length-prefixed), so the same texts in another file
    format, or split over several files, share a fingerprint, and so a teacher cache. With `text_hashes` (an
    array.array('q'): 8 bytes a text), a 64-bit hash of each text is appended to it (how stage 1 finds repeated texts);
    with `file_rows` (a list, `path` only), the rows of each of data_files(path) are appended to it.
    """
    digest = hashlib.sha256()
    count = 0
    sources = (
        [texts] if texts is not None else (iter_texts(file, text_column, encoding_errors) for file in data_files(path))
    )
    for source in sources:
        rows_before = count
        for text in source:
            encoded = text.encode("utf-8")
            digest.update(len(encoded).to_bytes(8, "little"))
            digest.update(encoded)
            if text_hashes is not None:
                text_hashes.append(
                    int.from_bytes(hashlib.blake2b(encoded, digest_size=8).digest(), "little", signed=True)
                )
            count += 1
        if file_rows is not None and texts is None:
            file_rows.append(count - rows_before)
    if count == 0:
        raise UserError(f"data file {path!r} holds no examples (it is empty or has only blank lines)")
    return count, digest.hexdigest()


def first_copies(text_hashes: "array.array") -> np.ndarray:
    """For each row, the first row whose text has the same hash (itself when it is the first): int64 (N,).
    About 40 bytes a text at the peak (a stable sort of the hashes), 8 kept."""
    hashes = np.frombuffer(text_hashes, dtype=np.int64) if len(text_hashes) else np.zeros(0, np.int64)
    order = np.argsort(hashes, kind="stable")  # equal hashes keep row order: each group starts at its first row
    new_group = np.empty(len(order), dtype=bool)
    new_group[:1] = True
    np.not_equal(hashes[order[1:]], hashes[order[:-1]], out=new_group[1:])
    group = np.cumsum(new_group) - 1
    first = np.empty(len(order), dtype=np.int64)
    first[order] = order[np.flatnonzero(new_group)][group]
    return first


def read_class_names(path: str) -> list[str]:
    """Class names, one per line; trailing blank lines are ignored, any other blank or duplicate is an error."""
    if not os.path.isfile(path):
        raise UserError(f"class names file {path!r} does not exist: give a file with one class name per line")
    with open(path, "rb") as f:
        raw_lines = f.read().split(b"\n")
    lines = [_decode(raw, path, i, "strict").strip() for i, raw in enumerate(raw_lines, 1)]
    while lines and not lines[-1]:
        lines.pop()
    if not lines:
        raise UserError(f"class names file {path!r} is empty: write one class name per line")
    seen: dict[str, int] = {}
    for line_number, name in enumerate(lines, 1):
        if not name:
            raise UserError(f"{path}, line {line_number}: blank class name; remove the empty line")
        if name in seen:
            raise UserError(
                f"{path}, line {line_number}: duplicate class name {name!r} (also on line {seen[name]}); remove one"
            )
        seen[name] = line_number
    return lines


def check_template(template: str) -> None:
    """A hypothesis template must hold exactly one positional `{}` placeholder."""
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as e:
        raise UserError(
            f"--hypothesis_template {template!r} is not a valid format string ({e}); use one {{}} for the class name"
        ) from None
    if len(fields) != 1 or fields[0] != "":
        raise UserError(
            f"--hypothesis_template {template!r} must contain exactly one '{{}}' placeholder for the class name "
            f"(found {len(fields)}{': ' + ', '.join(repr('{' + f + '}') for f in fields) if fields else ''}), e.g. "
            f"'This example is {{}}.'"
        )


def read_labeled(path: str, text_column: str = "text", label_column: str = "label") -> tuple[list[str], list]:
    """Texts and labels of a labeled set. A label is a class name, or a list of names (multi-label)."""
    suffix = _suffix(path, LABELED_FORMATS, "test file")
    texts: list[str] = []
    labels: list = []
    if suffix in (".tsv", ".txt"):
        with open(path, "rb") as f:
            for line_number, raw in enumerate(f, 1):
                line = _decode(raw, path, line_number, "strict").rstrip("\r\n")
                if not line.strip():
                    continue
                if "\t" not in line:
                    raise UserError(f"{path}, line {line_number}: expected 'label<TAB>text'")
                label, text = line.split("\t", 1)
                texts.append(text)
                labels.append(label.strip())
    else:
        for index, row in enumerate(_iter_tabular_rows(path, suffix, [text_column, label_column], "strict")):
            where = f"line {row['_line']}" if "_line" in row else f"row {index + 1}"
            text, label = row[text_column], row[label_column]
            if not isinstance(text, str):
                raise UserError(f"{path}, {where}: column {text_column!r} is not a string")
            if isinstance(label, str) and label.startswith("[") and suffix != ".jsonl":
                try:
                    label = json.loads(label)  # a list stored as JSON text in a CSV cell
                except json.JSONDecodeError:
                    raise UserError(
                        f"{path}, {where}: label {label[:60]!r} starts with '[' but is not a JSON list; write several "
                        f"labels "
                        f'as ["a", "b"], or quote a single label that starts with a bracket differently'
                    ) from None
            if isinstance(label, list) and not all(isinstance(name, str) for name in label):
                raise UserError(f"{path}, {where}: a list label must hold class names (strings), got {label!r:.80}")
            if label is None or label == "":
                raise UserError(f"{path}, {where}: column {label_column!r} is empty; every row needs a label")
            texts.append(text)
            labels.append(label)
    if not texts:
        raise UserError(f"test file {path!r} holds no examples")
    return texts, labels


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
