"""Stage 1: run a zero-shot teacher over an unlabeled corpus once and cache its raw scores.

    python teacher_infer.py --data_file texts.txt --class_names_file classes.txt
    torchrun --nproc_per_node 4 teacher_infer.py --data_file ... --class_names_file ...

The cache is `<cache_dir>/<key>/`: manifest.json plus Arrow shards (docs/cache_format.md). The last line
printed on stdout is that directory. Rerunning the same command is a cache hit (nothing is loaded or
recomputed); after a crash it computes only the missing shards; with more class names it computes only
the new hypotheses and reuses the rest from earlier caches of the same data and teacher.
"""

import array
import contextlib
import ctypes
import datetime
import glob
import importlib.metadata
import os
import platform
import shlex
import sys
import time
from dataclasses import MISSING, dataclass, fields

import numpy as np
import pyarrow as pa
import torch
from tqdm import tqdm

from zsdistill import __version__, cache, data
from zsdistill import inference
from zsdistill import models
from zsdistill import teacher as zs_teacher
from zsdistill.errors import UserError, run_cli, writing_to
from zsdistill.options import cli, option, whole_number

# NLI caches keep each text's embedding from this small model (stage 2 refines the targets in that space).
DEFAULT_EMBEDDING_MODEL = "sentence-transformers/all-MiniLM-L6-v2"


# A full disk (or an unwritable cache_dir) while writing is a one-line error; what is written stays valid.
DISK_ADVICE = (
    "free space there or pass --cache_dir on another disk, then rerun the same command: the finished shards are kept "
    "and only the missing ones are computed"
)


@dataclass(kw_only=True)
class TeacherOptions:
    """teacher_infer.py's flags, checked once (cheap checks only: nothing is read or loaded here)."""

    data_file: str | None = option(
        None,
        "unlabeled texts: .txt (one per line; blank lines skipped), .csv, .jsonl or .parquet; a directory of such "
        "files (recursively, in sorted order) or a quoted glob ('shards/*.parquet'); or a datasets save_to_disk "
        "directory.",
    )
    class_names_file: str = option(help="one class name per line, in the order the cache's columns will use.")
    teacher_name_or_path: str = option(
        "roberta-large-mnli", "NLI model (hub id or directory), or a sentence-embedding model."
    )
    hypothesis_template: str = option(
        "This example is {}.", "hypothesis per class; exactly one {} stands for the class name."
    )
    teacher_batch_size: int | None = option(
        None, "at most this many (text, class) pairs per forward pass (unset: 32 on CPU, 256 on GPU)."
    )
    max_batch_tokens: int | None = option(
        None, "at most this many padded tokens per forward pass (unset: 8192 on CPU, 65536 on GPU)."
    )
    cache_dir: str = option("cache", "where cache directories are made; each is named by a digest of its inputs.")
    max_length: int | None = option(
        None, "truncate pairs to this many tokens (premise only); unset: the teacher's maximum."
    )
    text_column: str = option("text", "column holding the text in .csv/.jsonl/.parquet inputs.")
    shard_size: int = option(10_000, "examples per Arrow shard (the unit of resume and of work split across ranks).")
    fp16: bool = option(False, "fp16 autocast (GPU only).")
    bf16: bool = option(False, "bf16 autocast (GPU, or CPUs with bf16 support; never the CPU default).")
    no_cuda: bool = option(False, "run on the CPU even when a GPU is present.")
    teacher_kind: str | None = option(None, "force 'nli' or 'embedding' (unset: detected from the model's config).")
    embedding_model: str | None = option(
        None,
        "NLI teachers also keep each text's embedding from this sentence-embedding model (one small pass per text "
        "against the teacher's K), which stage 2's label-free refinement needs. Unset: the environment's "
        "ZSDISTILL_EMBEDDING_MODEL, else sentence-transformers/all-MiniLM-L6-v2; 'none': no embeddings (stage 2 then "
        "trains on the teacher's targets as they are). Embedding teachers keep their own.",
    )
    teacher_revision: str | None = option(None, "hub revision (branch, tag or commit) of the teacher.")
    trust_remote_code: bool = option(False, "allow models whose code lives in their hub repository.")
    encoding_errors: str = option("strict", "'strict' (invalid UTF-8 is an error), 'replace' or 'ignore'.")
    deduplicate: bool = option(
        True,
        "score each distinct text once (exact string equality, no normalisation) and copy its scores to every row "
        "that repeats it; --nodeduplicate scores every row.",
    )
    chunk_long_texts: bool = option(
        False,
        "score a text longer than the teacher's max_length as overlapping windows (a quarter of each repeated in the "
        "next) instead of cutting it: NLI, per class the logits of the window that entails it most; embeddings, the "
        "mean of the windows' normalised embeddings. A cache of its own (the key says so).",
    )
    dataset: str | None = option(
        None,
        "instead of --data_file, anything datasets.load_dataset reads, streamed: a hub id, a local dataset directory "
        "(with --dataset_split), or a builder such as 'parquet'.",
    )
    dataset_config: str | None = option(None, "the --dataset's configuration name, if it has several.")
    dataset_split: str | None = option(None, "the --dataset's split, e.g. train.")

    def __post_init__(self):
        for name in (
            "data_file",
            "class_names_file",
            "teacher_name_or_path",
            "hypothesis_template",
            "cache_dir",
            "text_column",
            "dataset",
        ):
            value = getattr(self, name)
            setattr(self, name, None if value is None else str(value))
        data.check_template(self.hypothesis_template)
        for name in ("teacher_batch_size", "max_batch_tokens", "shard_size", "max_length"):
            whole_number(getattr(self, name), name, "a positive integer", minimum=1, allow_none=name != "shard_size")
        if (self.data_file is None) == (self.dataset is None):
            raise UserError(
                "give the texts with --data_file (a file, a directory or a glob of files) or with --dataset (a "
                "datasets name or path)" + (", not both" if self.data_file is not None else "")
            )
        self.deduplicate, self.chunk_long_texts = bool(self.deduplicate), bool(self.chunk_long_texts)


def log(message: str) -> None:
    rank = int(os.environ.get("RANK", 0))
    prefix = f"[teacher rank {rank}]" if int(os.environ.get("WORLD_SIZE", 1)) > 1 else "[teacher]"
    print(f"{prefix} {message}", file=sys.stderr, flush=True)


def _command(options: TeacherOptions) -> str:
    """The command line that (re)makes this cache: how readers tell a user to complete it (flags left at their
    defaults omitted)."""
    args = ["python", "teacher_infer.py"]
    for field in fields(options):
        value = getattr(options, field.name)
        if field.default is MISSING or value != field.default:
            args += [f"--{field.name}"] if value is True else [f"--{field.name}", str(value)]
    return shlex.join(map(str, args))


def _versions() -> dict:
    versions = {"python": platform.python_version(), "zsdistill": __version__}
    for package in ("torch", "transformers", "pyarrow", "datasets", "tokenizers"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            pass
    return versions


@contextlib.contextmanager
def gpu_memory_advice(pairs: int, tokens: int):
    """A GPU out-of-memory error is a setting to change, not a crash: say which one."""
    try:
        yield
    except torch.OutOfMemoryError:
        raise UserError(
            f"out of GPU memory with batches of up to {pairs} pairs and {tokens} padded tokens; "
            f"lower --max_batch_tokens (e.g. to {max(tokens // 4, 512)}) and --teacher_batch_size; the shards already "
            f"written are kept"
        ) from None


def find_reusable(
    cache_dir: str,
    key: str,
    key_fields: dict,
    hypotheses: list[str],
    score_columns: list[str],
    text_embedding_column: str | None,
) -> dict:
    """Hypotheses already scored by another complete cache of the same data and teacher: {hypothesis: (path,
    position)}."""
    # Scores do not depend on the class list, the template, or whether (and with which model) an NLI cache keeps
    # text embeddings: a cache made before they were kept by default lends its scores; only the embeddings are computed.
    not_scores = ("class_names", "hypothesis_template", "embedding_model")
    identity = {k: v for k, v in key_fields.items() if k not in not_scores}
    reusable: dict[str, tuple[str, int]] = {}
    for manifest_path in sorted(glob.glob(os.path.join(cache_dir, "*", cache.MANIFEST))):
        path = os.path.dirname(manifest_path)
        try:
            manifest = cache.read_manifest(path)
        except ValueError:
            continue
        if os.path.basename(path) == key or not isinstance(manifest, dict) or not manifest.get("complete"):
            continue
        try:
            cache.validate_manifest(path, manifest)  # a donor is untrusted input like any cache
        except UserError as e:
            log(f"not reusing scores from {path}: {e}")
            continue
        donor_identity = {k: v for k, v in manifest.get("key_fields", {}).items() if k not in not_scores}
        if (
            donor_identity != identity
            or manifest.get("score_columns") != score_columns
            or (
                key_fields["teacher_kind"] == "embedding"
                and manifest.get("text_embedding_column") != text_embedding_column
            )
        ):
            continue
        for position, hypothesis in enumerate(manifest["hypotheses"]):
            if hypothesis in hypotheses and hypothesis not in reusable:
                reusable[hypothesis] = (path, position)
    return reusable


def plan_reuse(reusable: dict, hypotheses: list[str]) -> tuple[dict[str, tuple[list[int], list[int]]], list[int]]:
    """({donor cache: (our positions, its positions)}, positions of the hypotheses to compute here)."""
    if reusable:
        log(
            f"reusing {len(reusable)} of {len(hypotheses)} hypotheses from earlier caches; computing "
            f"{len(hypotheses) - len(reusable)}"
        )
    by_donor: dict[str, tuple[list[int], list[int]]] = {}
    for position, hypothesis in enumerate(hypotheses):
        if hypothesis in reusable:
            donor_path, donor_position = reusable[hypothesis]
            ours, theirs = by_donor.setdefault(donor_path, ([], []))
            ours.append(position)
            theirs.append(donor_position)
    return by_donor, [i for i, h in enumerate(hypotheses) if h not in reusable]


@dataclass
class Plan:
    """What every shard of this run needs, decided once in main()."""

    cache_path: str
    teacher: zs_teacher.Teacher
    embedder: zs_teacher.Teacher | None  # NLI teachers with --embedding_model
    device: torch.device
    precision: str
    hypotheses: list[str]
    score_columns: list[str]
    text_embedding_column: str | None
    batch_pairs: int
    batch_tokens: int
    max_length: int | None
    reuse_by_donor: dict[str, tuple[list[int], list[int]]]  # donor cache -> (our positions, its positions)
    missing_positions: list[int]  # hypotheses no donor holds: computed here
    trust_remote_code: bool
    deduplicate: bool
    chunk_long_texts: bool
    first_copies: np.ndarray  # (N,) int64: for each row, the first row with the same text (hash), itself if none
    shard_size: int

    @property
    def passes_per_text(self) -> int:
        """Forward passes one text costs here: the teacher's for the hypotheses computed, and the embedding model's."""
        teacher = len(self.missing_positions) if self.teacher.kind == "nli" else int(bool(self.missing_positions))
        return teacher + int(self.embedder is not None)


class Scorer:
    """The models, loaded on the first shard that needs them (a cache hit or a fully reused run loads none)."""

    def __init__(self, plan: Plan):
        self.plan, self.stats = plan, inference.Stats()
        self.model = self.tokenizer = self.max_length = None
        self.hypothesis_ids = self.hypothesis_embeddings = None
        self.embedder = None  # (model, tokenizer, max length)
        self.embedder_texts, self.embedder_seconds = 0, 0.0  # its cost, for the log
        self.counting_tokenizer = None  # (tokenizer, max length, shortest premise budget or None): truncation counts

    def _load_teacher(self) -> None:
        plan = self.plan
        if self.model is None:
            log(f"loading teacher {plan.teacher.name_or_path} ({plan.teacher.kind}) on {plan.device}, {plan.precision}")
            self.model, self.tokenizer = zs_teacher.load_model(plan.teacher, plan.device, plan.trust_remote_code)
            self.max_length = models.resolve_max_length(self.tokenizer, self.model, plan.max_length)
            missing = [plan.hypotheses[i] for i in plan.missing_positions]
            if plan.teacher.kind == "nli":
                self.encoder = inference.PairEncoder(self.tokenizer, self.max_length)
                self.window = self.encoder.shortest_budget(
                    plan.hypotheses
                )  # --chunk_long_texts: premise tokens a window holds
                self.hypothesis_ids = self.encoder.tokenize(missing)
            else:
                self.hypothesis_embeddings = self._embed(
                    self.model, self.tokenizer, missing, self.max_length, plan.teacher.pooling
                )

    def truncated_texts(self, texts: list[str]) -> int:
        """How many of `texts` the teacher cuts at its max_length. NLI: the premise is cut for at least one
        hypothesis (the longest one leaves it the fewest tokens); embedding teachers: the text with its special
        tokens is longer than max_length. Needs only the tokenizer, so shards reused from other caches count too."""
        plan = self.plan
        if self.counting_tokenizer is None:
            if self.model is not None:
                tokenizer, max_length = self.tokenizer, self.max_length
            else:
                tokenizer, config = zs_teacher.load_tokenizer(plan.teacher, plan.trust_remote_code)
                max_length = models.resolve_max_length(tokenizer, config, plan.max_length)
            budget = None
            if plan.teacher.kind == "nli":
                budget = inference.PairEncoder(tokenizer, max_length).shortest_budget(plan.hypotheses)
            self.counting_tokenizer = (tokenizer, max_length, budget)
        tokenizer, max_length, budget = self.counting_tokenizer
        if (
            budget is not None
        ):  # premise tokens without special tokens; the budget is below max_length, so one more suffices
            lengths = tokenizer(
                texts, add_special_tokens=False, truncation=True, max_length=budget + 1, return_attention_mask=False
            )["input_ids"]
            return sum(len(ids) > budget for ids in lengths)
        lengths = tokenizer(texts, truncation=True, max_length=max_length + 1, return_attention_mask=False)["input_ids"]
        return sum(len(ids) > max_length for ids in lengths)

    def _embed(self, model, tokenizer, texts: list[str], max_length: int, pooling: str, on_batch=None):
        plan = self.plan
        if not plan.chunk_long_texts:
            return inference.embed(
                model,
                tokenizer,
                texts,
                max_length,
                plan.batch_pairs,
                plan.batch_tokens,
                pooling,
                plan.precision,
                self.stats,
                on_batch,
            )
        # Each long text as overlapping windows that fit with the special tokens; its embedding is their mean.
        prefix, suffix = inference.special_tokens(tokenizer)
        ids = tokenizer(texts, add_special_tokens=False, return_attention_mask=False, verbose=False)["input_ids"]
        parts, owners = inference.windows_of(ids, max_length - len(prefix) - len(suffix))
        parts = [prefix + part + suffix for part in parts]
        embeddings = inference.embed_ids(
            model,
            parts,
            tokenizer.pad_token_id or 0,
            plan.batch_pairs,
            plan.batch_tokens,
            pooling,
            plan.precision,
            self.stats,
        )
        if on_batch is not None:
            on_batch(len(texts))
        return inference.aggregate_embeddings(embeddings, owners, len(texts))

    def nli_scores(self, texts: list[str], on_batch) -> np.ndarray:
        """Logits (texts, missing hypotheses, labels)."""
        self._load_teacher()
        plan = self.plan
        if not plan.chunk_long_texts:
            return inference.nli_logits(
                self.model,
                self.encoder,
                self.encoder.tokenize(texts),
                self.hypothesis_ids,
                plan.batch_pairs,
                plan.batch_tokens,
                plan.precision,
                self.stats,
                on_batch,
            )
        # Each long text as overlapping windows that fit beside the longest hypothesis; per class, its best window.
        ids = self.tokenizer(texts, add_special_tokens=False, return_attention_mask=False, verbose=False)["input_ids"]
        parts, owners = inference.windows_of(ids, self.window)
        logits = inference.nli_logits(
            self.model,
            self.encoder,
            parts,
            self.hypothesis_ids,
            plan.batch_pairs,
            plan.batch_tokens,
            plan.precision,
            self.stats,
        )
        on_batch(len(texts) * len(plan.missing_positions))
        return inference.aggregate_nli(
            logits, owners, len(texts), plan.teacher.entailment_index, plan.teacher.contradiction_index
        )

    def teacher_embeddings(self, texts: list[str], on_batch) -> np.ndarray:
        self._load_teacher()
        return self._embed(self.model, self.tokenizer, texts, self.max_length, self.plan.teacher.pooling, on_batch)

    def similarities(self, text_embeddings: np.ndarray) -> np.ndarray:
        """Cosine similarity of each text to each missing hypothesis."""
        self._load_teacher()
        return text_embeddings @ self.hypothesis_embeddings.T

    def embedder_embeddings(self, texts: list[str]) -> np.ndarray:
        plan = self.plan
        if self.embedder is None:
            log(f"loading embedding model {plan.embedder.name_or_path} on {plan.device}, {plan.precision}")
            model, tokenizer = zs_teacher.load_model(plan.embedder, plan.device, plan.trust_remote_code)
            self.embedder = (model, tokenizer, models.resolve_max_length(tokenizer, model, None))
        model, tokenizer, max_length = self.embedder
        started = time.time()
        embeddings = self._embed(model, tokenizer, texts, max_length, plan.embedder.pooling)
        self.embedder_texts, self.embedder_seconds = (
            self.embedder_texts + len(texts),
            self.embedder_seconds + time.time() - started,
        )
        return embeddings


def reused_scores(plan: Plan, donors: dict, start: int, stop: int, scores: dict[str, np.ndarray]) -> np.ndarray | None:
    """Copy into `scores` what other caches already hold for rows start..stop; return their text embeddings, if any."""
    text_embeddings = None
    for donor_path, (positions, donor_positions) in plan.reuse_by_donor.items():
        if donor_path not in donors:
            donors[donor_path] = cache.load_cache(donor_path)  # verified once, memory-mapped
        donor_manifest, donor_table = donors[donor_path]
        rows = donor_table.slice(start, stop - start)
        for name in plan.score_columns:
            scores[name][:, positions] = cache.list_column_to_numpy(
                rows.column(name), len(donor_manifest["class_names"])
            )[:, donor_positions]
        same_embeddings = donor_manifest["key_fields"].get("embedding_model") == (
            plan.embedder.fingerprint if plan.embedder else None
        )
        if (
            plan.text_embedding_column
            and donor_manifest.get("text_embedding_column")
            and same_embeddings
            and text_embeddings is None
        ):
            text_embeddings = cache.list_column_to_numpy(
                rows.column(plan.text_embedding_column), cache.list_width(rows, plan.text_embedding_column)
            )
    return text_embeddings


def earlier_copies(
    plan: Plan, bounds: list[tuple[int, int]], start: int, texts: list[str]
) -> dict[int, dict[str, np.ndarray]]:
    """The rows of this shard whose text an earlier shard already scored: {row in shard: {column: that row's values}},
    read from the earlier shard (waiting for it, when another rank writes it). Hashes find the candidates; the texts
    themselves are compared, so a hash collision only costs a pass."""
    first = plan.first_copies[start : start + len(texts)]
    columns = ["text", *plan.score_columns] + ([plan.text_embedding_column] if plan.text_embedding_column else [])
    found = {}
    for index in np.unique(first[first < start] // plan.shard_size).tolist():
        shard_start, shard_stop = bounds[index]
        waited = False
        while cache.read_done_record(plan.cache_path, index, shard_start, shard_stop, verify=False) is None:
            if not waited:
                log(
                    f"waiting for shard {index}, written by another rank: it holds the first copy of texts that shard "
                    f"{start // plan.shard_size} repeats"
                )
            waited = True
            time.sleep(2)
        rows = np.flatnonzero((first < start) & (first // plan.shard_size == index))
        with pa.OSFile(os.path.join(plan.cache_path, cache.shard_file(index))) as f:
            table = pa.ipc.open_stream(f).read_all().select(columns).take(first[rows] - shard_start)
        values = {
            name: cache.list_column_to_numpy(table.column(name), cache.list_width(table, name)) for name in columns[1:]
        }
        for position, (row, text) in enumerate(zip(rows.tolist(), table.column("text").to_pylist())):
            if text == texts[row]:
                found[row] = {name: v[position] for name, v in values.items()}
    return found


def score_shard(
    plan: Plan,
    scorer: Scorer,
    donors: dict,
    texts: list[str],
    start: int,
    progress: tqdm,
    earlier: dict[int, dict[str, np.ndarray]],
) -> tuple[pa.Table, int]:
    """Every score column (and the text embeddings) for one shard's texts: reused where another cache has them,
    computed otherwise, each distinct text once: a text repeated within the shard is scored at its first row and
    copied, and rows in `earlier` (see earlier_copies) take their earlier copy's values. Returns the table and how
    many rows were copies."""
    n = len(texts)
    source = np.arange(n)  # the row whose values each row takes
    if plan.deduplicate:
        first_row: dict[str, int] = {}
        for i, text in enumerate(texts):
            if i not in earlier:
                source[i] = first_row.setdefault(text, i)
    is_copy = source != np.arange(n)
    is_copy[list(earlier)] = True
    compute = np.flatnonzero(~is_copy)
    unique_texts = [texts[i] for i in compute.tolist()]
    scores = {name: np.empty((n, len(plan.hypotheses)), dtype=np.float32) for name in plan.score_columns}
    text_embeddings = reused_scores(plan, donors, start, start + n, scores)
    if (
        text_embeddings is not None and not text_embeddings.flags.writeable
    ):  # a view of a donor's memory map: copies are written into it
        text_embeddings = text_embeddings.copy()
    computed = plan.missing_positions if len(compute) else []

    def all_rows(computed_rows: np.ndarray) -> np.ndarray:
        out = np.empty((n, computed_rows.shape[1]), dtype=np.float32)
        out[compute] = computed_rows
        return out

    if computed and plan.teacher.kind == "nli":
        shown, pairs, started = [0], [0], time.time()  # texts shown on the progress bar, pairs scored

        def on_batch(batch_pairs: int) -> None:
            pairs[0] += batch_pairs
            done = pairs[0] // len(computed)
            progress.set_postfix_str(f"{pairs[0] / max(time.time() - started, 1e-9):.1f} pairs/s", refresh=False)
            progress.update(done - shown[0])
            shown[0] = done

        logits = scorer.nli_scores(unique_texts, on_batch)
        for name, label_index in plan.teacher.label_columns.items():
            scores[name][np.ix_(compute, computed)] = logits[:, :, label_index]
        progress.update(n - shown[0])
    elif computed:  # embedding teacher
        if text_embeddings is None:
            text_embeddings = all_rows(scorer.teacher_embeddings(unique_texts, on_batch=progress.update))
            progress.update(n - len(compute))
        else:
            progress.update(n)
        scores["similarity"][np.ix_(compute, computed)] = scorer.similarities(text_embeddings[compute])
    else:
        progress.update(n)
    if plan.embedder and text_embeddings is None and len(compute):
        text_embeddings = all_rows(scorer.embedder_embeddings(unique_texts))
    # Copies: every copy of a text gets exactly its first copy's values.
    copies = np.flatnonzero(source != np.arange(n))
    for values in (*scores.values(), *([text_embeddings] if text_embeddings is not None else [])):
        values[copies] = values[source[copies]]
    for row, values in earlier.items():
        for name in scores:
            scores[name][row] = values[name]
        if plan.text_embedding_column:
            if text_embeddings is None:
                text_embeddings = np.empty((n, len(values[plan.text_embedding_column])), dtype=np.float32)
            text_embeddings[row] = values[plan.text_embedding_column]
    return pa.table(
        {
            "index": pa.array(np.arange(start, start + n, dtype=np.int64)),
            "text": pa.array(texts, pa.string()),
            **{name: cache.list_array(values) for name, values in scores.items()},
            **({plan.text_embedding_column: cache.list_array(text_embeddings)} if plan.text_embedding_column else {}),
        }
    ), int(is_copy.sum())


def return_freed_memory() -> None:
    """Hand the memory a finished shard freed back to the OS. glibc keeps freed blocks of many sizes for reuse; over
    a million texts the process grew by 100+ MB that way (benchmarks/README.md), with it stage 1 stays flat."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


def scan_input(scan, deduplicate: bool, rank: int, world_size: int) -> tuple[int, str, np.ndarray, list[int] | None]:
    """One pass over the input: count and validate its rows, fingerprint them, and find the repeated texts.
    `scan(text_hashes, file_rows)` is data.scan_texts over the input. Under torchrun only rank 0 reads the input here
    and sends the others what it found, so every rank later reads only its own shards' rows.
    Returns (rows, fingerprint, each row's first copy, rows per input file or None)."""
    found = error = None
    if rank == 0:
        try:
            text_hashes, file_rows = (array.array("q") if deduplicate else None), []
            num_examples, fingerprint = scan(text_hashes, file_rows)
            first_copies = data.first_copies(text_hashes) if deduplicate else None
            found = (num_examples, fingerprint, file_rows or None)
            del text_hashes
        except UserError as e:
            if world_size == 1:
                raise
            error = str(e)
    if world_size > 1:
        box = [error, found]
        torch.distributed.broadcast_object_list(box, src=0)
        if box[0] is not None:
            raise UserError(box[0])  # every rank stops with rank 0's one-line error
        found = box[1]
        if deduplicate:
            shared = torch.from_numpy(first_copies) if rank == 0 else torch.empty(found[0], dtype=torch.int64)
            torch.distributed.broadcast(shared, src=0)
            first_copies = shared.numpy()
    num_examples, fingerprint, file_rows = found
    return (
        num_examples,
        fingerprint,
        (first_copies if deduplicate else np.arange(num_examples, dtype=np.int64)),
        file_rows,
    )


def _run_for_rank(plan: Plan, bounds: list[tuple[int, int]], read_rows, rank: int, world_size: int) -> None:
    """Score and write every shard of this rank that is not complete yet (shard i belongs to rank i % world_size),
    reading only those shards' rows (`read_rows(ranges)` yields the texts of the given [start, stop) row ranges)."""
    scorer, donors = Scorer(plan), {}
    mine = [i for i in range(len(bounds)) if i % world_size == rank]
    todo = [i for i in mine if cache.read_done_record(plan.cache_path, i, *bounds[i]) is None]
    progress = tqdm(
        total=sum(bounds[i][1] - bounds[i][0] for i in mine),
        unit="ex",
        desc=f"teacher rank {rank}" if world_size > 1 else "teacher",
        mininterval=1.0,
        smoothing=0.1,
        dynamic_ncols=True,
    )
    progress.update(sum(bounds[i][1] - bounds[i][0] for i in mine if i not in todo))
    skipped, computed = len(mine) - len(todo), 0
    seconds = 0.0
    reused_per_row = len(plan.hypotheses) - len(plan.missing_positions)
    texts_iter = read_rows([bounds[i] for i in todo])
    try:
        for index in todo:
            start, stop = bounds[index]
            texts = [next(texts_iter) for _ in range(stop - start)]
            with (
                cache.file_lock(os.path.join(plan.cache_path, f"shard-{index:05d}.lock")),
                gpu_memory_advice(plan.batch_pairs, plan.batch_tokens),
            ):
                if cache.read_done_record(plan.cache_path, index, start, stop) is not None:
                    skipped += 1
                    progress.update(stop - start)
                    continue
                passes_before, started = scorer.stats.forward_passes, time.time()
                earlier = earlier_copies(plan, bounds, start, texts) if plan.deduplicate else {}
                table, copies = score_shard(plan, scorer, donors, texts, start, progress, earlier)
                long_texts = scorer.truncated_texts(texts)  # cut, or with --chunk_long_texts scored as windows
                record = {
                    "start": start,
                    "stop": stop,
                    "forward_passes": scorer.stats.forward_passes - passes_before,
                    "reused_pairs": (stop - start) * reused_per_row,
                    "duplicate_rows": copies,
                    "passes_saved_by_deduplication": copies * plan.passes_per_text,
                    "max_length": scorer.counting_tokenizer[1],
                    "truncated_texts": 0 if plan.chunk_long_texts else long_texts,
                    "chunked_texts": long_texts if plan.chunk_long_texts else 0,
                }
                cache.write_shard(plan.cache_path, index, table, record)
                del table
                return_freed_memory()
                computed += 1
                seconds += time.time() - started
    finally:
        progress.close()  # also on an error: its message then starts on a line of its own
    stats, read = scorer.stats, sum(bounds[i][1] - bounds[i][0] for i in todo)
    log(
        f"this process: read {read} of {bounds[-1][1]} texts (its shards not complete yet); "
        f"{computed} shards computed ({stats.forward_passes} forward passes in {seconds:.1f}s, "
        f"{stats.forward_passes / max(seconds, 1e-9):.1f}/s), {skipped} shards already complete and reused"
        + (f"; padding {1 - stats.tokens / stats.padded_tokens:.1%} of tokens" if stats.padded_tokens else "")
    )
    if scorer.embedder_texts:
        log(
            f"text embeddings for refinement: {plan.embedder.name_or_path}, one pass per text "
            f"({scorer.embedder_texts} texts) in "
            f"{scorer.embedder_seconds:.1f}s, {scorer.embedder_seconds / max(seconds, 1e-9):.1%} of this process's "
            f"scoring time "
            f"(the teacher: {len(plan.missing_positions)} passes per text); --embedding_model none skips them"
        )


def input_readers(options: TeacherOptions):
    """Where the texts come from (for the manifest), one scan of all of them, and a reader of given rows."""
    data_file, dataset, column, errors = (
        options.data_file,
        options.dataset,
        options.text_column,
        options.encoding_errors,
    )
    if data_file is not None:
        source = {"path": os.path.abspath(data_file), "text_column": column}

        def scan(text_hashes, file_rows):
            return data.scan_texts(data_file, column, errors, text_hashes=text_hashes, file_rows=file_rows)

        def read_rows(rows, file_rows):
            return data.iter_texts(data_file, column, errors, rows=rows, file_rows=file_rows)

        return source, scan, read_rows
    config, split = options.dataset_config, options.dataset_split
    source = {"dataset": dataset, "config": config, "split": split, "text_column": column}

    def scan(text_hashes, file_rows):
        texts = data.iter_dataset(dataset, config, split, column)
        return data.scan_texts(f"--dataset {dataset}", texts=texts, text_hashes=text_hashes)

    def read_rows(rows, file_rows):
        return data.iter_dataset(dataset, config, split, column, rows=rows)

    return source, scan, read_rows


def resolve_models(options: TeacherOptions):
    """The teacher (and, for NLI teachers, the embedding model whose text embeddings stage 2 refines with), the
    device and the precision. Nothing is loaded yet: a cache hit loads nothing."""
    teacher = zs_teacher.resolve_teacher(
        options.teacher_name_or_path, options.teacher_revision, options.teacher_kind, options.trust_remote_code
    )
    device = models.select_device(options.no_cuda)
    precision = zs_teacher.check_precision(options.fp16, options.bf16, device)
    embedding_model, embedder = options.embedding_model, None
    if teacher.kind == "embedding" and embedding_model is not None and str(embedding_model).lower() != "none":
        raise UserError(
            "--embedding_model is for NLI teachers: an embedding teacher's cache already keeps its own text "
            "embeddings; drop the flag"
        )
    if teacher.kind == "nli":
        if embedding_model is None:
            embedding_model = os.environ.get("ZSDISTILL_EMBEDDING_MODEL", DEFAULT_EMBEDDING_MODEL)
        if str(embedding_model).lower() != "none":
            try:
                embedder = zs_teacher.resolve_teacher(
                    str(embedding_model), kind="embedding", trust_remote_code=options.trust_remote_code
                )
            except UserError as e:
                raise UserError(
                    f"--embedding_model (the text embeddings stage 2 refines with): {str(e).removeprefix('teacher ')}; "
                    f"or pass --embedding_model none to cache none"
                ) from None
    return teacher, embedder, device, precision


def key_fields_for(
    options: TeacherOptions,
    teacher,
    embedder,
    precision: str,
    data_fingerprint: str,
    num_examples: int,
    class_names: list[str],
) -> dict:
    """Everything the scores depend on: the cache key hashes exactly this."""
    key_fields = {
        "format_version": cache.FORMAT_VERSION,
        "data_fingerprint": data_fingerprint,
        "num_examples": num_examples,
        "teacher": teacher.fingerprint,
        "teacher_kind": teacher.kind,
        "hypothesis_template": options.hypothesis_template,
        "class_names": class_names,
        "max_length": options.max_length,
        "precision": precision,
    }
    if embedder:  # absent with --embedding_model none, so caches made without embeddings keep their keys
        key_fields["embedding_model"] = embedder.fingerprint
    if options.chunk_long_texts:  # absent otherwise, so caches that cut long texts keep their keys
        key_fields["chunking"] = {
            "window_overlap": inference.WINDOW_OVERLAP,
            "nli": "best window per class",
            "embedding": "mean of windows",
        }
    return key_fields


def output_columns(options: TeacherOptions, teacher, embedder, class_names: list[str]) -> dict:
    """The hypotheses, the score columns, and the text-embedding column (or None) of this cache."""
    return {
        "hypotheses": [options.hypothesis_template.format(name) for name in class_names],
        "score_columns": list(teacher.label_columns) if teacher.kind == "nli" else ["similarity"],
        # Embedding caches keep each text's embedding (more classes later embed only the new hypotheses, and stage 2
        # refines its targets in that space); NLI caches keep them unless --embedding_model is none.
        "text_embedding_column": "text_embedding" if teacher.kind == "embedding" or embedder else None,
    }


def manifest_for(
    options: TeacherOptions, key_fields: dict, bounds: list, teacher, embedder, columns: dict, source: dict
) -> dict:
    """The manifest of a cache about to be written (docs/cache_format.md)."""
    return cache.new_manifest(
        cache.cache_key(key_fields),
        key_fields,
        bounds,
        teacher=teacher.describe(),
        hypothesis_template=options.hypothesis_template,
        class_names=key_fields["class_names"],
        **columns,
        embedding_model=embedder.describe() if embedder else None,
        precision=key_fields["precision"],
        data={**source, "fingerprint": key_fields["data_fingerprint"]},
        num_examples=key_fields["num_examples"],
        shard_size=options.shard_size,
        command=_command(options),
        versions=_versions(),
    )


def plan_for(
    options: TeacherOptions, manifest: dict, cache_path: str, teacher, embedder, device, first_copies: np.ndarray
) -> Plan:
    """What every shard needs: models, batch limits, and which hypotheses other caches of these texts already hold."""
    hypotheses, score_columns = manifest["hypotheses"], manifest["score_columns"]
    reusable = find_reusable(
        options.cache_dir,
        manifest["key"],
        manifest["key_fields"],
        hypotheses,
        score_columns,
        manifest["text_embedding_column"],
    )
    reuse_by_donor, missing_positions = plan_reuse(reusable, hypotheses)
    default_pairs, default_tokens = inference.default_batches(device)
    return Plan(
        cache_path=cache_path,
        teacher=teacher,
        embedder=embedder,
        device=device,
        precision=manifest["precision"],
        hypotheses=hypotheses,
        score_columns=score_columns,
        text_embedding_column=manifest["text_embedding_column"],
        batch_pairs=options.teacher_batch_size or default_pairs,
        batch_tokens=options.max_batch_tokens or default_tokens,
        max_length=options.max_length,
        reuse_by_donor=reuse_by_donor,
        missing_positions=missing_positions,
        trust_remote_code=options.trust_remote_code,
        deduplicate=options.deduplicate,
        chunk_long_texts=options.chunk_long_texts,
        first_copies=first_copies,
        shard_size=options.shard_size,
    )


def log_duplicates(plan: Plan, num_examples: int) -> None:
    repeated = int((plan.first_copies != np.arange(num_examples)).sum())
    if repeated:
        log(
            f"duplicates: {repeated} of {num_examples} texts ({repeated / num_examples:.1%}) repeat an earlier one"
            + (
                f"; each distinct text is scored once (saves {repeated * plan.passes_per_text} forward passes)"
                if plan.deduplicate
                else "; --nodeduplicate: scored anyway"
            )
        )


def log_sealed(sealed: dict, cache_path: str, teacher, num_classes: int, num_shards: int, seconds: float) -> None:
    num_examples = sealed["num_examples"]
    passes = sealed["forward_passes"]
    log(
        f"wrote {cache_path}: {num_examples} examples x {num_classes} classes in {num_shards} shards, "
        f"{passes['computed']} forward passes computed, {passes['reused_pairs']} pairs reused, "
        + (
            f"{passes['saved_by_deduplication']} saved by scoring {sealed['duplicate_rows']} repeated texts once, "
            if sealed["duplicate_rows"]
            else ""
        )
        + f"{seconds:.1f}s"
    )
    share = lambda count: f"{count} of {num_examples} ({count / max(num_examples, 1):.1%}) are longer than"
    if sealed["chunked_texts"]:
        log(
            f"long texts: {share(sealed['chunked_texts'])} the teacher's {sealed['max_length']} tokens and were "
            f"scored as overlapping windows (--chunk_long_texts)"
        )
    elif sealed["truncated_texts"] is not None:
        log(
            f"long texts: {share(sealed['truncated_texts'])} the teacher's {sealed['max_length']} tokens and were cut"
            + (" (the premise, for at least one hypothesis)" if teacher.kind == "nli" else "")
            + ("; it reads only their beginning" if sealed["truncated_texts"] else "")
        )


def build_cache(options: TeacherOptions) -> str:
    """Score every (text, class) pair with a zero-shot teacher and cache the raw scores."""
    started = time.time()
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))

    # 1. Validate everything cheap (the options are checked) before any expensive work; scan the input once.
    class_names = data.read_class_names(options.class_names_file)
    if world_size > 1:
        # Only broadcasts and a barrier cross ranks, so gloo serves CPUs and GPUs alike; ranks may finish hours apart.
        torch.distributed.init_process_group("gloo", timeout=datetime.timedelta(hours=48))
    source, scan, read_rows = input_readers(options)
    num_examples, data_fingerprint, first_copies, file_rows = scan_input(scan, options.deduplicate, rank, world_size)
    teacher, embedder, device, precision = resolve_models(options)
    columns = output_columns(options, teacher, embedder, class_names)

    # 2. The key: everything the scores depend on. Same key, same scores: a complete cache is a hit.
    key_fields = key_fields_for(options, teacher, embedder, precision, data_fingerprint, num_examples, class_names)
    key = cache.cache_key(key_fields)
    cache_path = os.path.join(options.cache_dir, key)
    expected = {
        "key": key,
        "class_names": class_names,
        "num_examples": num_examples,
        "hypotheses": columns["hypotheses"],
        "score_columns": columns["score_columns"],
    }
    if cache.is_complete(cache_path, expected, verify=True):
        log(
            f"cache hit: {cache_path} already holds {num_examples} examples x {len(class_names)} classes; nothing to do"
        )
        return _finish(cache_path, rank, world_size)

    # 3. The plan: fixed shard boundaries, the manifest, and what other caches already hold.
    size = options.shard_size
    bounds = [(start, min(start + size, num_examples)) for start in range(0, num_examples, size)]
    manifest = manifest_for(options, key_fields, bounds, teacher, embedder, columns, source)
    with writing_to(cache_path, "the cache", DISK_ADVICE):
        if rank == 0:
            cache.begin(cache_path, manifest)
    plan = plan_for(options, manifest, cache_path, teacher, embedder, device, first_copies)
    log_duplicates(plan, num_examples)

    # 4. Each rank scores its shards that are not complete yet.
    with writing_to(cache_path, "the cache", DISK_ADVICE):
        _run_for_rank(plan, bounds, lambda rows: read_rows(rows, file_rows), rank, world_size)

    # 5. Once every rank is done, one process seals the manifest.
    if world_size > 1:
        torch.distributed.barrier()
    if rank == 0:
        with writing_to(cache_path, "the cache", DISK_ADVICE):
            sealed = cache.seal(cache_path, manifest, options.max_length)
        if sealed:
            log_sealed(sealed, cache_path, teacher, len(class_names), len(bounds), time.time() - started)
    return _finish(cache_path, rank, world_size)


def _finish(cache_path: str, rank: int, world_size: int) -> str:
    """The last stdout line is the cache directory (rank 0 alone prints it)."""
    if rank == 0:
        print(cache_path)
    if world_size > 1:
        torch.distributed.destroy_process_group()
    return cache_path


main = cli(
    TeacherOptions, build_cache, "Score every (text, class) pair with a zero-shot teacher and cache the raw scores."
)


if __name__ == "__main__":
    run_cli(main)
