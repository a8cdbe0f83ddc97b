"""Label-free refinement of a teacher's targets in the cached text-embedding space (stage 2's default).

A zero-shot teacher's mistakes are systematic: it scores every text against a class *name*, so a class whose
name sits oddly in the model's space is under- or over-predicted everywhere. The texts themselves cluster
better than the names do. Refinement keeps the teacher's class semantics and replaces the name anchors with
centroids of the texts the teacher is surest about (confident self-training, in the spirit of X-Class and
Gera et al. 2022):

    P = teacher posteriors
    x = normalise(embedding - mean embedding of the corpus)   (centring: see below; --norefine_center skips it)
    repeat (at most MAX_ROUNDS - 1, until under MIN_CHANGE of the predictions move), then once more without the anchor:
        per class k: keep the rows predicted k that are in the top KEEP_FRACTION of confidence among them
                     and that the teacher also puts in k (this anchor stops the clusters drifting to topics
                     of their own, which unanchored rounds do on hard tasks)
        centroid_k = normalised weighted mean embedding of the kept rows, each weighted 1 / its density among them
                     (--norefine_density_weights: all 1); prior_k = mean of P[:, k]
        P = softmax_k(KAPPA * <x, centroid_k> + log prior_k)
    then, once, with --refine_prior_floor (opt-in, label-free only):
                prior_k = max(prior_k, min(mean of the teacher's P[:, k], PRIOR_FLOOR / K)), renormalised
    then, once: kappa = the value in [MIN_KAPPA(_CENTERED), KAPPA] under which
                softmax_k(kappa * <x, centroid_k> + log prior_k) gives the teacher's own labels the highest
                likelihood; the targets are made with it
    then, label-free, if the targets drift from a class (they keep under DRIFT_KEPT of the texts the teacher is
    surest are in it, drifted_classes): all of the above once more, that class's kept rows in every round chosen
    among its rows the teacher also puts in it by the teacher's probability instead of refinement's
    (--norefine_drift_guard skips it)
    then, label-free, with --refine_starved_share s (opt-in), where the targets give a class under DRIFT_KEPT of the
    texts the teacher gives it (starved_classes): a bias on its log prior makes it the most likely class of s x the
    teacher's count of texts (share_biases)

Centring keeps generic classes from becoming sinks. Sentence embeddings share a large common direction (every
text's cosine to the corpus mean is high). The centroid of a class whose texts are spread over many topics (a
generic class: FOLDOC's `programming` among languages, databases and hardware) sits near that common direction,
so every text scores high against it, and the rounds hand it more and more texts, the re-estimated priors adding
to it (the rich get richer). Before centring, FOLDOC's `programming` went from the teacher's 27% of the test labels
to 51% and `mathematics` from recall 0.45 to 0.05; Debian's `vcs` (1.8% of the texts) from 15% of the labels to
44%. With the mean removed, `programming` keeps 34%, `mathematics` 0.88 recall, `vcs` 12%. Refined targets' macro-F1
on the test sets of seven tasks (benchmarks/README.md, "Refinement that lifts every class"): foldoc-12 +12.5
points, debian-12 +4.5, nouns-11 +1.0, verbs-15 +0.8, nouns-25 -0.1, debian-generic-12 -0.9 (accuracy +4.5), the
demo -1.5 (its large generic `artifact` class is real, and centring takes some of its texts back).

Density weights keep a clump of alike texts from taking a class over. The teacher is often surest of a dense group
of near-alike texts that share a word with a class name: Debian's spelling dictionaries (their descriptions say
"language") for `interpreters`, WordNet's language names for `communication`. In the plain mean they outweigh the
class's own texts, which are spread over many topics (Lua, Erlang and Tcl bindings), so the centroid becomes the
clump's and the class loses what the teacher found (`interpreters` from recall 0.39 to 0.07). Weighted by 1 / density
(the sum of exp(DENSITY_SCALE (cosine - 1)) over the class's kept texts) a clump counts about as one text. Refined
targets' macro-F1 on the seven tasks' test sets: debian-generic-12 +5.2 points with `interpreters` kept, nouns-11
+0.5 with `communication` kept, debian-12 +0.3, the demo and foldoc-12 0.0 and +0.1, nouns-25 -0.3, verbs-15 -0.6
(benchmarks/README.md, "Refinement that lifts every class").

The last round drops the anchor: a class's centroid then also takes in the texts that sit surely in it although
the teacher put them elsewhere, most of all the texts of a broad class the teacher under-predicts (the demo's
`artifact`, teacher recall 0.25), which centring alone scores lower than before. One round cannot drift far. On
the test sets, against centring with the anchor in every round: demo +1.7 macro-F1, nouns-11 +1.2, nouns-25 +0.2,
verbs-15 -0.6, debian-generic-12 -0.4, debian-12 -1.0, foldoc-12 -2.0 (benchmarks/results/cpu_refine_rules.md).
--norefine_free_last_round keeps the anchor in every round.

The drift guard keeps a class on what the teacher means by it. Refinement ranks a class's texts by its own
confidence, and a tight group of near-alike texts the teacher put in a class (FOLDOC's 164 "The country code for
..." definitions, 123 of them `language`) is surest of all there: by the last round `language` had become the
country codes, its real texts gone to `programming` (recall 0.24 -> 0.01), while the teacher's surest `language`
texts are language definitions. Only such a class's anchors are chosen differently (the other classes follow from
the new rounds), and tasks with no drifting class are refined bit for bit as without the guard (the demo, nouns-11,
verbs-15, debian-12). Refined targets' macro-F1 on the test sets: foldoc-12 +3.9 points (`language` recall 0.01 ->
0.28), nouns-25 +0.2, debian-generic-12 +3.1; on 70% subsamples of the seven pools the mean +0.45; students:
foldoc-12 +2.0 to +5.5, nouns-25 and debian-generic-12 -0.2 to -0.6 (benchmarks/README.md, "The drift guard").

The last step keeps the targets honest. The rounds' fixed KAPPA makes targets about equally confident (0.65-0.85)
whatever the task, also where texts do not cluster by class and the refined labels are right a quarter of the
time. How well the centroid scores predict the teacher's labels is measured on every text without a label, and
the targets are made no more confident than that (on the demo kappa comes out at 11 centred, 14 before; on tasks
that do not cluster by class about the same; benchmarks/README.md has the measurements).

Label propagation (`propagate`, alpha 0.5 by default; train_student.py --refine_propagate 0 turns it off) smooths the
final targets over the corpus's nearest-neighbour graph (propagated): one centroid a class under-serves a class whose
texts are spread rather than gathered around a point, and a text's neighbours in the embedding space say more about it
than its distance to that point. Each class keeps its number of texts (plain propagation let the big classes take
the small ones' texts: nouns-25's `phenomenon` was lost against the teacher) and the targets their mean confidence,
so the confidence fitted before (on the teacher's labels, or on dev labels) carries over; a temperature acts after it.
Students on seven tasks at two rates and two seeds, against no propagation: +0.8 to +2.1 points of macro-F1 on the
demo, nouns-11 and debian-12 in all twelve runs, -1.4 to +2.15 on foldoc-12, verbs-15 and debian-generic-12, -0.1 to
-0.8 on nouns-25 (benchmarks/README.md, "Label propagation").

No label is read: only the cache's teacher scores and text embeddings. Every setting is fixed for all data:
KAPPA is the scale the sentence-embedding models are trained with (the same 1/SIMILARITY_SCALE that turns
similarities into targets); KEEP_FRACTION and the anchor come from measurements on several labeled sets of
different sizes, class counts and balance (benchmarks/README.md), none of them tuned per set.

Memory: the embeddings are read in chunks from the memory-mapped cache (O(N*K) arrays plus one chunk); propagation
adds its graph, O(N * PROPAGATE_NEIGHBOURS), PROPAGATE_REFERENCE_ROWS embeddings and one block of
PROPAGATE_BLOCK_CELLS similarities (about 25 MB).
"""

from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np

from zsdistill.targets import SIMILARITY_SCALE

METHOD = "confident-centroids"
KAPPA = 1.0 / SIMILARITY_SCALE
MIN_KAPPA = 1.0  # the fitted kappa's lower bound on raw cosines: they sit in a narrow band, times 1 nearly uniform
# Centred cosines spread over about [-0.5, 1], so 1 is no longer nearly uniform (a toy whose refined labels are right
# 46% of the time was held at confidence 0.62 by it); there the bound only keeps kappa positive and the fit decides.
MIN_KAPPA_CENTERED = 0.1
KEEP_FRACTION = 0.5
MAX_ROUNDS = 5  # self-training drifts on tasks whose texts do not cluster by class: 10 rounds lost 1-3 points there
MIN_CHANGE = 0.001
# With a labeled dev set (train_student.py --dev_file), class k's centroid is the mean of its labeled texts' and of
# refinement's own, weighted n_k : LABELED_PSEUDO_COUNT (n_k labeled texts of k): refinement's centroid counts as this
# many labeled texts. 8 a class is what few-shot methods start from; measured in benchmarks/README.md.
LABELED_PSEUDO_COUNT = 8.0
# A labeled text that refinement's own centroids already score highest in its class counts AGREED_WEIGHT of a text in
# that class's weight n_k (its mean direction is unchanged): it confirms the centroid more than it corrects it, and on a
# task whose texts cluster by class full weight let 8 labels a class move right centroids by their sampling noise
# (nouns-11's first draw lost 0.5-1.2 points of macro-F1 to the label-free student); measured in benchmarks/README.md,
# "Dev texts refinement already places".
AGREED_WEIGHT = 0.5
# With dev labels the targets' confidence is fitted on dev texts each scored by a refinement made without them.
CROSS_FIT_FOLDS = 2
# With dev labels each class's log prior may also move by a bias fitted on them together with kappa, under a Gaussian
# prior of one of these standard deviations (nats), or not at all: whichever predicts held-out dev labels best (each
# text left out in turn, up to DEV_BIAS_MAX_FOLDS folds; 10 folds chose less steadily on 8 labels a class).
# Refinement's priors are its own predicted shares, which labels can correct where they are far off (debian-generic-12's
# are 0.4 from the true shares in total variation) and should leave where they are right (the demo's, 0.1): measured in
# benchmarks/README.md, "A handful of labels".
DEV_BIAS_STDS = (0.35, 0.7, 1.4)
DEV_BIAS_MAX_FOLDS = 100
# A kept text's weight in its class's centroid: 1 / its density among the class's kept texts, density = the sum of
# exp(DENSITY_SCALE * (cosine - 1)) over them (itself counts 1): a clump of near-alike texts counts about as one text.
# Measured at 5, 6.5 and 8 on 70% subsamples of seven tasks' pools, all better than none (benchmarks/README.md).
DENSITY_SCALE = 6.5
# With prior_floor (opt-in), label-free, each class's final prior is at least the smaller of the teacher's prior for
# it (its mean posterior over the corpus) and PRIOR_FLOOR / K (then renormalised). The rounds re-estimate each prior
# from their own predictions, so a class whose kept texts are few and diverse loses share every round until its right
# texts score second (foldoc-12's `artificial intelligence`: teacher 3.2%, refined 0.75%). A class above PRIOR_FLOOR / K
# is never touched, so one the teacher over-predicts may still shrink that far. 0.4 chosen among 0.25-1 on 70%
# subsamples of seven tasks' pools. Not the default: it lifts the refined targets (foldoc-12 +5.4 macro-F1,
# debian-generic-12 +2.3) but not the students trained on them (benchmarks/README.md, "A floor under small classes'
# priors"); nor does it applied only to the classes the refined targets starve ("The starved floor": foldoc-12's
# students -0.8 points).
PRIOR_FLOOR = 0.4
# A class drifts when refinement keeps under DRIFT_KEPT of the texts the teacher is surest are in it (its top
# SUREST_FRACTION by the teacher's probability, at least MIN_SUREST texts) in it, the teacher giving it at least
# DRIFT_MIN_SHARE of a uniform share (a rarer class is the label-free report's "rarely predicted"). Where the teacher
# over-predicts a class, refinement takes its doubtful texts away and keeps its surest ones; where it moves the surest
# ones too, the refined class means something else. Set on FOLDOC's `language` (refinement kept 2 of the teacher's
# 60 surest); on seven tasks' pools it names that class, nouns-25's `communication` and debian-generic-12's `utils`
# and `comm` (benchmarks/README.md, "A class refinement drifts from" and "The drift guard").
SUREST_FRACTION = 0.2
DRIFT_KEPT = 0.25
MIN_SUREST = 10
DRIFT_MIN_SHARE = 0.1
DENSITY_REFERENCE_ROWS = 1000  # a class with more kept texts: its density is estimated on this many of them
DENSITY_REFERENCE_TOTAL = 16_000  # and on fewer with many classes: (at most this many, H) float32 held per round
PROPAGATE_NEIGHBOURS = 10  # label propagation: each text's neighbours in refinement's space,
PROPAGATE_REFERENCE_ROWS = 20_000  # sought among at most this many texts (the whole corpus below it)
PROPAGATE_BLOCK_CELLS = 2**20  # (rows, reference) similarities held at once: about 24 bytes a cell with argpartition
PROPAGATE_SHARE_STEPS = 200  # at most this many updates of the biases that keep each class's count of texts
SHARE_BIAS_PASSES = 10  # share_biases: at most this many passes over the classes it raises
FILE = "refinement.npz"  # in the student directory: lets evaluate.py show the refined teacher on a test cache

# () -> iterator of (start row, float32 array (rows, H) of L2-normalised embeddings, or of (rows, K) posteriors), in
# row order.
Chunks = Callable[[], Iterator[tuple[int, np.ndarray]]]


@dataclass
class Refinement:
    """What refinement learned: enough to apply it to other texts embedded by the same model."""

    centroids: np.ndarray  # (K, H) unit vectors
    log_priors: np.ndarray  # (K,)
    kappa: float = KAPPA  # the rounds use KAPPA; the fitted refinement, the kappa fit_kappa chose
    center: np.ndarray | None = None  # (H,) the corpus mean embedding removed before scoring; None: no centring
    free_last_round: bool = False  # whether the last round dropped the teacher anchor
    density_weights: bool = False  # whether kept texts were weighted by 1 / their density in their class
    keep_fraction: float = KEEP_FRACTION
    rounds: int = 0
    changed: list[float] = field(default_factory=list)  # fraction of predictions that moved, per round
    agreement_with_teacher: float = 0.0
    labeled_per_class: list[int] | None = None  # labeled dev texts that joined each class's centroid; None: none
    dev_bias: list[float] | None = None  # what the dev labels added to each log prior (in log_priors); None: none
    dev_bias_std: float | None = None  # the bias's prior standard deviation chosen on the dev labels; None: no bias
    agreed_weight: float = AGREED_WEIGHT  # what a labeled text its class's own centroid places right counts (1: a text)
    dev_held_out_nll: float | None = None  # mean -log p(dev label), each dev text scored cross-fitted; None: no dev
    prior_floor: bool = False  # whether the final priors were held up to floored_priors' floor
    drift_guard: bool = False  # whether drifted classes were looked for (label-free refinement only)
    guarded: list[int] = field(default_factory=list)  # the classes that drifted, re-refined anchored to the teacher
    starved: list[int] = field(default_factory=list)  # the classes the targets starve (starved_classes)
    teacher_prior: np.ndarray | None = None  # (K,) the teacher's mean posterior over the corpus, from rounds()
    propagate: float = 0.0  # label propagation's alpha over the corpus's nearest-neighbour graph (0: none)
    starved_share: float = 0.0  # the starved classes' count, as a fraction of the teacher's, held up to (0: none)
    starved_bias: list[float] | None = None  # what starved_share added to each log prior (in log_priors); None: none

    def space(self, embeddings: np.ndarray) -> np.ndarray:
        """The embeddings as refinement compares them: centred on the corpus mean and normalised, if it centres."""
        embeddings = embeddings.astype(np.float32, copy=False)
        return embeddings if self.center is None else centered(embeddings, self.center)

    def log_scores(self, embeddings: np.ndarray) -> np.ndarray:
        """Unnormalised log posteriors (rows, K) of texts with these embeddings."""
        return (self.kappa * (self.space(embeddings) @ self.centroids.T) + self.log_priors).astype(np.float32)

    def posterior_chunks(
        self, embedding_chunks: "Chunks", temperature: float = 1.0
    ) -> Iterator[tuple[int, np.ndarray]]:
        """(first row, softmax(log scores / T)) chunk by chunk."""
        for start, chunk in embedding_chunks():
            yield start, softmax_rows(self.log_scores(chunk) / temperature)

    def posteriors(self, embedding_chunks: "Chunks", num_rows: int, temperature: float = 1.0) -> np.ndarray:
        """softmax(log scores / T) for every row, (N, K) float32."""
        out = np.empty((num_rows, len(self.centroids)), dtype=np.float32)
        for start, chunk in self.posterior_chunks(embedding_chunks, temperature):
            out[start : start + len(chunk)] = chunk
        return out

    def settings(self) -> dict:
        return {
            "method": METHOD,
            "center": self.center is not None,
            "free_last_round": self.free_last_round,
            "density_weights": self.density_weights,
            "density_scale": DENSITY_SCALE if self.density_weights else None,
            "prior_floor": PRIOR_FLOOR if self.prior_floor else None,
            "drift_guard": self.drift_guard,
            "guarded_classes": self.guarded,
            "starved_classes": self.starved,
            "starved_share": self.starved_share or None,
            "starved_bias": None if self.starved_bias is None else [round(b, 6) for b in self.starved_bias],
            "kappa": round(float(self.kappa), 6),
            "rounds_kappa": KAPPA,
            "keep_fraction": self.keep_fraction,
            "max_rounds": MAX_ROUNDS,
            "min_change": MIN_CHANGE,
            "rounds": self.rounds,
            "changed_per_round": [round(c, 6) for c in self.changed],
            "agreement_with_teacher": round(self.agreement_with_teacher, 6),
            "propagate": self.propagate or None,
            "propagate_neighbours": PROPAGATE_NEIGHBOURS if self.propagate else None,
            "labeled_texts": None
            if self.labeled_per_class is None
            else {
                "examples": int(sum(self.labeled_per_class)),
                "per_class": self.labeled_per_class,
                "pseudo_count": LABELED_PSEUDO_COUNT,
                "agreed_weight": self.agreed_weight,
                "kappa_fitted_on": f"dev labels, cross-fitted ({CROSS_FIT_FOLDS} folds)",
                "prior_bias": None if self.dev_bias is None else [round(b, 6) for b in self.dev_bias],
                "prior_bias_std": self.dev_bias_std,
                "held_out_nll": None if self.dev_held_out_nll is None else round(self.dev_held_out_nll, 6),
            },
        }


@dataclass
class LabeledTexts:
    """Labeled texts (a dev set) that join refinement's centroids: their embeddings (n, H), L2-normalised by the cache's
    embedding model, and their classes (n,)."""

    embeddings: np.ndarray
    labels: np.ndarray

    def in_space(self, space: Callable, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
        """The labeled texts in refinement's space (n, H) and, per class, their sum there (K, H)."""
        moved = space(self.embeddings.astype(np.float32))
        sums = np.zeros((num_classes, moved.shape[1]), dtype=np.float64)
        np.add.at(sums, self.labels, moved)
        return moved, sums


def _unit_rows(vectors: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(vectors, axis=-1, keepdims=True)
    return np.divide(vectors, norms, out=np.zeros_like(vectors), where=norms > 0)


def anchored(own: np.ndarray, labeled_sums: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """unit((1 - w) own + w unit(labeled_sums)), w = count / (count + LABELED_PSEUDO_COUNT), row by row: refinement's
    unit centroids `own` moved toward the mean of the labeled texts (a class without labeled texts keeps its own; a
    class refinement left empty takes the labeled ones')."""
    weight = (counts / (counts + LABELED_PSEUDO_COUNT))[..., None]
    return _unit_rows((1 - weight) * own + weight * _unit_rows(labeled_sums))


def agreed_counts(moved: np.ndarray, labels: np.ndarray, centroids: np.ndarray, weight: float) -> np.ndarray:
    """Per class, its labeled texts counted for anchored's weight: each one, but `weight` each for those the centroids
    (refinement's own, before anchoring) already score highest in their class (weight 1: the plain counts, exactly).
    `moved`: the texts in refinement's space."""
    counts = np.bincount(labels, minlength=len(centroids)).astype(np.float64)
    right = (moved @ centroids.T).argmax(1) == labels
    return counts - (1.0 - weight) * np.bincount(labels[right], minlength=len(centroids))


def cross_fitted_similarity(labeled: LabeledTexts, num_classes: int, refine_without: Callable) -> np.ndarray:
    """(n, K) cosines of each labeled text to the centroids of a refinement made without it: the labeled texts split
    into CROSS_FIT_FOLDS folds (round robin within each class, in file order), each fold scored by
    refine_without(the other folds' texts). Scored by centroids it pulled (and by the pool texts those drew in), a
    text would make the fit over-confident: leaving it out of its own centroid alone left the targets' ECE at
    0.02-0.25 on seven tasks, cross-fitted 0.03-0.17 (benchmarks/README.md, "A handful of labels")."""
    folds = round_robin_folds(labeled.labels, CROSS_FIT_FOLDS)
    similarity = np.zeros((len(labeled.labels), num_classes), dtype=np.float32)
    for fold in range(CROSS_FIT_FOLDS):
        held = folds == fold
        if held.any():
            without = refine_without(LabeledTexts(labeled.embeddings[~held], labeled.labels[~held]))
            similarity[held] = without.space(labeled.embeddings[held]) @ without.centroids.T
    return similarity


def round_robin_folds(labels: np.ndarray, num_folds: int) -> np.ndarray:
    """Each labeled text's fold: round robin within its class, in file order (deterministic, every fold balanced)."""
    folds = np.zeros(len(labels), dtype=np.int64)
    for k in np.unique(labels):
        rows = np.flatnonzero(labels == k)
        folds[rows] = np.arange(len(rows)) % num_folds
    return folds


def centered(embeddings: np.ndarray, center: np.ndarray) -> np.ndarray:
    """normalise(embeddings - center), row by row, float32 (a zero row stays zero)."""
    return _unit_rows(embeddings.astype(np.float32) - center)


def mean_embedding(embedding_chunks: "Chunks", num_rows: int) -> np.ndarray:
    """The corpus mean of the embeddings (H,), float32, one pass over the chunks (summed in float64)."""
    total = 0.0
    for _, chunk in embedding_chunks():
        total = total + chunk.sum(0, dtype=np.float64)
    return (np.asarray(total) / max(num_rows, 1)).astype(np.float32)


def softmax_rows(scores: np.ndarray) -> np.ndarray:
    scores = scores - scores.max(1, keepdims=True)
    np.exp(scores, out=scores)
    scores /= scores.sum(1, keepdims=True)
    return scores


def _kept_rows(
    prediction: np.ndarray,
    confidence: np.ndarray,
    teacher_prediction: np.ndarray | None,
    num_classes: int,
    guarded: tuple[np.ndarray, np.ndarray, list[int]] | None = None,
) -> np.ndarray:
    """Per predicted class, its most confident KEEP_FRACTION rows that the teacher also puts in that class (with
    teacher_prediction None: whatever the teacher says). guarded: (the teacher's prediction, its confidence, classes):
    for these classes, as many rows taken only among those the teacher puts in it, the ones it is surest of."""
    kept = np.zeros(len(prediction), dtype=bool)
    for k in range(num_classes):
        rows = np.flatnonzero(prediction == k)
        if len(rows) == 0:
            continue
        count = max(1, int(np.ceil(KEEP_FRACTION * len(rows))))
        ranking = confidence
        if guarded is not None and k in guarded[2]:
            rows, ranking = rows[guarded[0][rows] == k], guarded[1]
        # A stable sort on -confidence: ties keep row order, so the result never depends on anything but the data.
        kept[rows[np.argsort(-ranking[rows], kind="stable")[:count]]] = True
    if teacher_prediction is not None:
        kept &= prediction == teacher_prediction
    return kept


def surest_cuts(prediction: np.ndarray, confidence: np.ndarray, num_classes: int) -> np.ndarray:
    """Per class, the teacher's probability from which a text it predicts k is among the SUREST_FRACTION it is surest
    of (ties included; inf for a class it never predicts)."""
    cuts = np.full(num_classes, np.inf, dtype=np.float32)
    for c in range(num_classes):
        mine = np.sort(confidence[prediction == c])[::-1]
        if len(mine):
            cuts[c] = mine[max(1, int(np.ceil(SUREST_FRACTION * len(mine)))) - 1]
    return cuts


def among_surest(prediction: np.ndarray, confidence: np.ndarray, cuts) -> np.ndarray:
    """Whether each text is among those the teacher is surest are its predicted class (cuts: surest_cuts')."""
    return confidence >= np.asarray(cuts, dtype=np.float64)[prediction]


def drifts(teacher_share: float, surest: int, surest_kept: int, num_classes: int) -> bool:
    """Whether refinement drifted from a class: the teacher gives it teacher_share of the texts, and refinement keeps
    surest_kept of the `surest` texts the teacher is surest are in it."""
    return teacher_share >= DRIFT_MIN_SHARE / num_classes and surest >= MIN_SUREST and surest_kept < DRIFT_KEPT * surest


def drifted_classes(
    teacher_prediction: np.ndarray, teacher_confidence: np.ndarray, prediction: np.ndarray, num_classes: int
) -> list[int]:
    """The classes refinement (its predicted classes, `prediction`) drifted from (drifts), in class order."""
    surest = among_surest(
        teacher_prediction, teacher_confidence, surest_cuts(teacher_prediction, teacher_confidence, num_classes)
    )
    counts = np.bincount(teacher_prediction, minlength=num_classes)
    totals = np.bincount(teacher_prediction[surest], minlength=num_classes)
    kept = np.bincount(teacher_prediction[surest & (prediction == teacher_prediction)], minlength=num_classes)
    share = counts / max(len(teacher_prediction), 1)
    return [k for k in range(num_classes) if drifts(share[k], int(totals[k]), int(kept[k]), num_classes)]


def starves(teacher_share: float, refined_share: float, num_classes: int) -> bool:
    """Whether refinement starves a class the teacher gives teacher_share of the texts and the refined targets
    refined_share: under DRIFT_KEPT of the teacher's, the teacher giving it at least DRIFT_MIN_SHARE of a uniform share.
    A small class whose texts are diverse loses them to larger classes as the rounds re-estimate the priors, and the
    student taught the targets rarely predicts it. Reported (stage 2's log, distill_info.json, the model card, the
    label-free report), and held at a share of the teacher's count only with `starved_share` (opt-in): raising its
    prior lifted the targets but not the students (benchmarks/README.md, "The starved floor"), and setting its count
    kept foldoc-12's `artificial intelligence` in the targets but not in the students ("A starved class held at a share
    of the teacher's count")."""
    return teacher_share >= DRIFT_MIN_SHARE / num_classes and refined_share < DRIFT_KEPT * teacher_share


def starved_classes(teacher_prediction: np.ndarray, prediction: np.ndarray, num_classes: int) -> list[int]:
    """The classes the refined targets (their predicted classes, `prediction`) starve (starves), in class order."""
    rows = max(len(teacher_prediction), 1)
    taught = np.bincount(teacher_prediction, minlength=num_classes) / rows
    refined = np.bincount(prediction, minlength=num_classes) / rows
    return [k for k in range(num_classes) if starves(taught[k], refined[k], num_classes)]


def _summaries(
    chunks: Iterator[tuple[int, np.ndarray]], num_rows: int, num_classes: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(predicted class, confidence, mean posterior) of posteriors given chunk by chunk: O(N) memory, not O(N*K)."""
    prediction, confidence = np.empty(num_rows, dtype=np.int32), np.empty(num_rows, dtype=np.float32)
    total = np.zeros(num_classes, dtype=np.float64)
    for start, posteriors in chunks:
        prediction[start : start + len(posteriors)] = posteriors.argmax(1)
        confidence[start : start + len(posteriors)] = posteriors.max(1)
        total += posteriors.sum(0, dtype=np.float64)
    return prediction, confidence, total / max(num_rows, 1)


def refine(
    teacher_chunks: Chunks,
    embedding_chunks: Chunks,
    num_rows: int,
    num_classes: int,
    temperature: float = 1.0,
    log: Callable[[str], None] = lambda _: None,
    center: bool = True,
    free_last_round: bool = True,
    labeled: LabeledTexts | None = None,
    density_weights: bool = True,
    dev_bias: bool = True,
    prior_floor: bool = False,
    drift_guard: bool = True,
    propagate: float = 0.5,
    starved_share: float = 0.0,
    dev_agreement: bool = True,
) -> tuple[np.ndarray, Refinement]:
    """Refined targets (N, K) float32 at `temperature` and the fitted Refinement. Deterministic: no randomness anywhere.

    teacher_chunks() gives the teacher's posteriors (T = 1) chunk by chunk, as embedding_chunks() the embeddings.
    Between rounds only each row's prediction and confidence are kept; the (N, K) targets are made once, at the end.
    center=False, free_last_round=False, density_weights=False is the method of two releases before, bit for bit;
    density_weights=False alone the release before's.
    With `labeled` texts (train_student.py --dev_file), every round's centroids are moved toward their classes'
    labeled texts (see anchored) and kappa is fitted on their labels instead of the teacher's, each labeled text
    scored by a refinement that did not see it (cross_fitted_similarity: CROSS_FIT_FOLDS more refinements), and with
    `dev_bias` each class's log prior may move by a bias fitted with kappa (choose_bias_std, fit_kappa_and_bias);
    dev_bias=False gives the release before's; dev_agreement=False counts every labeled text fully in its class's
    anchor weight (rounds; the release before). With `prior_floor` and no `labeled` texts each class's final prior is
    held up to floored_priors' floor (the dev labels' prior bias does this job where there are labels). With
    `drift_guard` and no `labeled` texts, if the targets drift from a class (drifted_classes) the rounds and the fit
    run again with its anchors chosen by the teacher's confidence (rounds' `guarded`); drift_guard=False gives the
    release before's. With `propagate` (alpha; 0 gives the release before's) the final targets, their confidence
    fitted, are spread over the corpus's nearest-neighbour graph (propagated), and `temperature` then acts on them.
    """
    settings = dict(
        center=center, free_last_round=free_last_round, density_weights=density_weights, dev_agreement=dev_agreement
    )
    refinement, (teacher_prediction, teacher_confidence) = rounds(
        teacher_chunks, embedding_chunks, num_rows, num_classes, log, labeled=labeled, **settings
    )
    lowest = MIN_KAPPA if refinement.center is None else MIN_KAPPA_CENTERED
    # One more pass over the embeddings: the similarities serve the kappa fit, then become the targets in place.
    similarity = np.empty((num_rows, num_classes), dtype=np.float32)
    _fill_similarity(similarity, refinement, embedding_chunks)
    prediction = None  # the targets' classes, once needed (the drift guard's and the starved classes' check)
    if labeled is None:
        _fit_label_free(refinement, similarity, teacher_prediction, prior_floor, lowest)
        if drift_guard:
            prediction = _predictions(similarity, refinement)
            drifted = drifted_classes(teacher_prediction, teacher_confidence, prediction, num_classes)
            if drifted:
                log(
                    f"refinement drifted from classes {drifted} (it keeps under {DRIFT_KEPT:.0%} of the texts the "
                    "teacher is surest are in each): refining again, their anchors chosen by the teacher's confidence"
                )
                similarity = prediction = None  # the rounds need their own per-row memory; both are made again
                refinement, _ = rounds(
                    teacher_chunks, embedding_chunks, num_rows, num_classes, log, guarded=drifted, **settings
                )
                similarity = np.empty((num_rows, num_classes), dtype=np.float32)
                _fill_similarity(similarity, refinement, embedding_chunks)
                _fit_label_free(refinement, similarity, teacher_prediction, prior_floor, lowest)
            refinement.drift_guard = True
        log(
            f"refinement confidence: kappa {refinement.kappa:.2f}, the most likely for the teacher's own labels "
            f"(at most {KAPPA:g}: the targets are never more confident than their scores predict the teacher)"
        )
    else:
        refine_without = lambda rest: rounds(  # noqa: E731
            teacher_chunks, embedding_chunks, num_rows, num_classes, labeled=rest, **settings
        )[0]
        held_out = cross_fitted_similarity(labeled, num_classes, refine_without)
        std = choose_bias_std(held_out, refinement.log_priors, labeled.labels, lowest) if dev_bias else None
        if std is None:
            refinement.kappa = fit_kappa(held_out, refinement.log_priors, labeled.labels, lowest)
        else:
            refinement.kappa, bias = fit_kappa_and_bias(held_out, refinement.log_priors, labeled.labels, lowest, std)
            refinement.log_priors = (refinement.log_priors + bias).astype(np.float32)
            refinement.dev_bias, refinement.dev_bias_std = [float(b) for b in bias], std
        log(
            f"refinement confidence: kappa {refinement.kappa:.2f}"
            + (f" and log-prior biases {np.round(bias, 2).tolist()} (prior std {std:g})" if std else "")
            + f", the most likely for the {len(labeled.labels)} dev labels (each scored by a refinement made without "
            f"it, {CROSS_FIT_FOLDS} folds)"
            + ("; no prior bias: none predicted held-out dev labels better" if dev_bias and std is None else "")
        )
        # How well this refinement predicts dev labels it did not see: what a choice between two spaces compares.
        scores = refinement.kappa * held_out.astype(np.float64) + refinement.log_priors
        refinement.dev_held_out_nll = summed_negative_log_likelihood(scores, labeled.labels) / len(labeled.labels)
    if prediction is None:
        prediction = _predictions(similarity, refinement)
    refinement.starved = starved_classes(teacher_prediction, prediction, num_classes)
    if refinement.starved and starved_share and labeled is None:
        wanted = np.ceil(starved_share * np.bincount(teacher_prediction, minlength=num_classes)).astype(np.int64)
        bias = share_biases(similarity, refinement, {k: int(wanted[k]) for k in refinement.starved})
        refinement.log_priors = (refinement.log_priors + bias).astype(np.float32)
        refinement.starved_share, refinement.starved_bias = float(starved_share), [float(b) for b in bias]
        log(
            f"refinement gives classes {refinement.starved} under {DRIFT_KEPT:.0%} of the texts the teacher gives "
            f"each: their priors raised so that each is the most likely class for {starved_share:.0%} of the teacher's "
            f"count ({[int(wanted[k]) for k in refinement.starved]} texts), the texts nearest their centroids"
        )
    elif refinement.starved:
        log(
            f"refinement gives classes {refinement.starved} under {DRIFT_KEPT:.0%} of the texts the teacher gives "
            "each: the student will rarely predict them"
            + (" (a few labeled texts of each, --dev_file, keep them)" if labeled is None else "")
        )
    # The temperature acts on the final targets' log-odds: after propagation where there is one.
    scale = 1.0 if propagate else temperature
    for start in range(0, num_rows, 65_536):  # what Refinement.posteriors computes, without reading embeddings again
        block = similarity[start : start + 65_536]
        block[:] = softmax_rows((refinement.kappa * block + refinement.log_priors).astype(np.float32) / scale)
    if propagate:
        similarity[:] = propagated(similarity, refinement, embedding_chunks, propagate, temperature)
        refinement.propagate = float(propagate)
        log(
            f"refinement: targets propagated over each text's {PROPAGATE_NEIGHBOURS} nearest texts "
            f"(alpha {propagate:g}), as sure on average as before"
        )
    return similarity, refinement


def propagated(
    targets: np.ndarray, refinement: Refinement, embedding_chunks: Chunks, alpha: float, temperature: float = 1.0
) -> np.ndarray:
    """The targets after label propagation (Zhou et al. 2004) over the corpus's nearest-neighbour graph in
    refinement's space, as sure on average as before. F = (1 - alpha) sum_t (alpha S)^t targets, S the symmetric
    normalised graph joining each text to its PROPAGATE_NEIGHBOURS most similar texts (among at most
    PROPAGATE_REFERENCE_ROWS evenly spaced ones, so memory stays O(N * neighbours)); then one bias a class on log F so
    that each class is the most likely for as many texts as in the targets, and tau on the whole, rows renormalised, so
    that the mean top probability is the targets': propagation decides which texts, refinement how many and how
    sure. `temperature` divides the final log-odds."""
    graph = _neighbour_graph(refinement, embedding_chunks, len(targets))
    out = targets
    for _ in range(int(np.ceil(np.log(1e-6) / np.log(alpha)))):  # until alpha ** steps < 1e-6: converged
        out = alpha * (graph @ out) + (1 - alpha) * targets
    log_out = np.log(np.maximum(out, 1e-30), dtype=np.float32)
    # Propagation favours classes dense around a text: a small, scattered class would lose texts to its
    # big neighbours (nouns-25's `phenomenon` fell under 70% of the teacher's recall). A bias a class keeps the
    # number of texts each class is the most likely for at the targets' own.
    wanted = np.bincount(targets.argmax(1), minlength=targets.shape[1]) + 0.5
    bias = np.zeros(targets.shape[1], dtype=np.float32)
    for _ in range(PROPAGATE_SHARE_STEPS):
        have = np.bincount((log_out + bias).argmax(1), minlength=targets.shape[1]) + 0.5
        if np.array_equal(have, wanted):
            break
        bias += 0.5 * np.log(wanted / have).astype(np.float32)
    log_out += bias
    sure = float(targets.max(1).mean(dtype=np.float64))
    low, high = 0.1, 10.0  # bisection for tau: the mean top probability grows with it
    for _ in range(30):
        tau = (low + high) / 2
        low, high = (tau, high) if softmax_rows(tau * log_out).max(1).mean(dtype=np.float64) < sure else (low, tau)
    return softmax_rows((low + high) / 2 * log_out / temperature).astype(np.float32)


def _neighbour_graph(refinement: Refinement, embedding_chunks: Chunks, n: int):
    """The symmetric normalised graph (n, n), scipy CSR float32, that joins each text to its PROPAGATE_NEIGHBOURS most
    similar texts in refinement's space, sought among at most PROPAGATE_REFERENCE_ROWS evenly spaced ones (so memory
    stays O(n * neighbours)), weighted by their cosine (at least 0): D^-1/2 W D^-1/2, W the larger of the two ways."""
    import scipy.sparse

    reference = np.linspace(0, n - 1, min(n, PROPAGATE_REFERENCE_ROWS)).round().astype(np.int64)
    reference_space = _gathered_rows(embedding_chunks, refinement.space, reference)
    k = min(PROPAGATE_NEIGHBOURS, len(reference) - 1)
    neighbours, weights = np.empty((n, k), dtype=np.int32 if n < 2**31 else np.int64), np.empty((n, k), np.float32)
    block = max(16, PROPAGATE_BLOCK_CELLS // len(reference))  # rows whose similarities are held at once
    for start, chunk in embedding_chunks():
        for offset in range(0, len(chunk), block):
            rows = np.arange(start + offset, start + min(offset + block, len(chunk)))
            similarity = refinement.space(chunk[rows - start]) @ reference_space.T
            position = np.minimum(np.searchsorted(reference, rows), len(reference) - 1)
            own = reference[position] == rows
            similarity[np.flatnonzero(own), position[own]] = -np.inf  # a text is not its own neighbour
            top = np.argpartition(-similarity, k, axis=1)[:, :k]
            neighbours[rows], weights[rows] = reference[top], np.maximum(np.take_along_axis(similarity, top, 1), 0)
    graph = scipy.sparse.csr_matrix((weights.ravel(), (np.repeat(np.arange(n), k), neighbours.ravel())), shape=(n, n))
    del neighbours, weights
    graph = graph.maximum(graph.T)
    degree = np.asarray(graph.sum(1)).ravel()
    scale = scipy.sparse.diags((1 / np.sqrt(np.where(degree > 0, degree, 1))).astype(np.float32))
    return (scale @ graph @ scale).astype(np.float32).tocsr()


def _fill_similarity(similarity: np.ndarray, refinement: Refinement, embedding_chunks: Chunks) -> None:
    """Every row's cosines to the refinement's centroids, in place: (N, K)."""
    for start, chunk in embedding_chunks():
        similarity[start : start + len(chunk)] = refinement.space(chunk) @ refinement.centroids.T


def _fit_label_free(
    refinement: Refinement, similarity: np.ndarray, teacher_prediction: np.ndarray, prior_floor: bool, lowest: float
) -> None:
    """Label-free, the refinement's final priors (floored with prior_floor) and kappa (fit_kappa on the teacher's
    labels), in place."""
    if prior_floor:
        refinement.log_priors = floored_priors(refinement.log_priors, refinement.teacher_prior)
        refinement.prior_floor = True
    refinement.kappa = fit_kappa(similarity, refinement.log_priors, teacher_prediction, lowest)


def share_biases(similarity: np.ndarray, refinement: Refinement, wanted: dict[int, int]) -> np.ndarray:
    """(K,) additions to the log priors that make each class k in `wanted` the most likely class of at least wanted[k]
    texts (those its score is nearest the top for), the others' priors unchanged. A class raised can take texts of one
    raised before it, so the classes are raised in turn until each has its count (at most SHARE_BIAS_PASSES passes;
    two classes contesting one text may leave one of them a text short).
    Block by block: O(N) memory beside the similarities."""
    bias = np.zeros(len(refinement.log_priors), dtype=np.float64)
    gap = np.empty(len(similarity), dtype=np.float64)  # how far a class's log score is under each row's top one
    for _ in range(SHARE_BIAS_PASSES):
        raised = False
        for k, count in sorted(wanted.items()):
            for start in range(0, len(similarity), 65_536):
                scores = refinement.kappa * similarity[start : start + 65_536] + refinement.log_priors + bias
                gap[start : start + len(scores)] = scores.max(1) - scores[:, k]
            count = min(max(count, 1), len(gap))
            if (gap <= 0).sum() < count:
                bias[k] += float(np.partition(gap, count - 1)[count - 1]) + 1e-4
                raised = True
        if not raised:
            break
    return bias


def _predictions(similarity: np.ndarray, refinement: Refinement) -> np.ndarray:
    """The refined targets' classes from the similarities, block by block (no second (N, K) array)."""
    prediction = np.empty(len(similarity), dtype=np.int32)
    for start in range(0, len(similarity), 65_536):
        block = similarity[start : start + 65_536]
        prediction[start : start + len(block)] = (refinement.kappa * block + refinement.log_priors).argmax(1)
    return prediction


def floored_priors(log_priors: np.ndarray, teacher_prior: np.ndarray) -> np.ndarray:
    """Log priors with each class's prior raised to at least min(its teacher prior, PRIOR_FLOOR / K), renormalised;
    unchanged where no class is under its floor."""
    priors, floor = np.exp(log_priors.astype(np.float64)), np.minimum(teacher_prior, PRIOR_FLOOR / len(log_priors))
    if not (priors < floor).any():
        return log_priors
    priors = np.maximum(priors, floor)
    return np.log(priors / priors.sum()).astype(np.float32)


def rounds(
    teacher_chunks: Chunks,
    embedding_chunks: Chunks,
    num_rows: int,
    num_classes: int,
    log: Callable[[str], None] = lambda _: None,
    center: bool = True,
    free_last_round: bool = True,
    labeled: LabeledTexts | None = None,
    density_weights: bool = True,
    guarded: list[int] | None = None,
    dev_agreement: bool = True,
) -> tuple[Refinement, tuple[np.ndarray, np.ndarray]]:
    """refine's rounds: the Refinement with its centroids and priors (kappa still the rounds' KAPPA), and the
    teacher's (predicted labels, their probabilities). The `guarded` classes' anchors are chosen by the teacher's
    confidence (_kept_rows). With `labeled` texts and dev_agreement, those the round's own centroids already place
    right count AGREED_WEIGHT each in their class's anchor weight (agreed_counts); dev_agreement=False counts each as
    one (the release before)."""
    prediction, confidence, prior = _summaries(teacher_chunks(), num_rows, num_classes)
    teacher_prior, teacher_confidence = prior, confidence.copy()
    mean = mean_embedding(embedding_chunks, num_rows) if center else None
    space = (lambda chunk: chunk) if mean is None else (lambda chunk: centered(chunk, mean))  # noqa: E731
    teacher_prediction = prediction.copy()
    agreed_weight = AGREED_WEIGHT if dev_agreement else 1.0
    if labeled is not None:
        labeled_moved, labeled_sums = labeled.in_space(space, num_classes)
    refinement, settled = None, False
    anchored_rounds = MAX_ROUNDS - 1 if free_last_round else MAX_ROUNDS
    for round_number in range(1, MAX_ROUNDS + 1):
        free = free_last_round and (settled or round_number > anchored_rounds)
        kept = _kept_rows(
            prediction,
            confidence,
            None if free else teacher_prediction,
            num_classes,
            (teacher_prediction, teacher_confidence, guarded) if guarded else None,
        )
        reference = (
            _density_reference(embedding_chunks, space, kept, prediction, num_classes) if density_weights else None
        )
        sums = 0.0  # (K, H) once the first chunk is in
        for start, chunk in embedding_chunks():
            rows = slice(start, start + len(chunk))
            moved, here = space(chunk), np.flatnonzero(kept[rows])
            weights = np.zeros((len(chunk), num_classes), dtype=np.float32)
            weights[here, prediction[rows][here]] = (
                1.0
                if reference is None
                else _inverse_density(moved[here], start + here, prediction[rows][here], reference)
            )
            sums = sums + weights.T @ moved
        centroids = _unit_rows(sums)  # a class with no kept rows keeps a zero centroid: its score is its prior alone
        if labeled is not None:
            counts = agreed_counts(labeled_moved, labeled.labels, centroids, agreed_weight)
            centroids = anchored(centroids, labeled_sums, counts)
        log_priors = np.log(np.clip(prior, 1e-12, None)).astype(np.float32)
        refinement = Refinement(
            centroids.astype(np.float32, copy=False),
            log_priors,
            center=mean,
            rounds=round_number,
            changed=refinement.changed if refinement else [],
            free_last_round=free,
            density_weights=density_weights,
            agreed_weight=agreed_weight,
        )
        new_prediction, confidence, prior = _summaries(
            refinement.posterior_chunks(embedding_chunks), num_rows, num_classes
        )
        changed = float((new_prediction != prediction).mean())
        prediction = new_prediction
        refinement.changed.append(changed)
        log(
            f"refinement round {round_number}: {kept.sum()} anchor rows{' (without the anchor)' if free else ''}, "
            f"{changed:.2%} of predictions moved"
        )
        if free or (changed < MIN_CHANGE and not free_last_round):
            break
        settled = changed < MIN_CHANGE
    refinement.agreement_with_teacher = float((prediction == teacher_prediction).mean())
    refinement.teacher_prior = teacher_prior
    if labeled is not None:
        refinement.labeled_per_class = np.bincount(labeled.labels, minlength=num_classes).tolist()
    refinement.guarded = list(guarded or [])
    return refinement, (teacher_prediction, teacher_confidence)


def _density_reference(
    embedding_chunks: Chunks, space: Callable, kept: np.ndarray, prediction: np.ndarray, num_classes: int
) -> list[tuple[int, np.ndarray, np.ndarray]]:
    """Per class, (its count of kept texts, the rows of at most DENSITY_REFERENCE_ROWS of them spread evenly over the
    row order, their embeddings in refinement's space (rows, H)): one pass over the embeddings."""
    most = max(1, min(DENSITY_REFERENCE_ROWS, DENSITY_REFERENCE_TOTAL // num_classes))
    counts, chosen = [], []
    for k in range(num_classes):
        rows = np.flatnonzero(kept & (prediction == k))
        counts.append(len(rows))
        chosen.append(rows[np.linspace(0, len(rows) - 1, most).astype(np.int64)] if len(rows) > most else rows)
    wanted = np.sort(np.concatenate(chosen))
    gathered = _gathered_rows(embedding_chunks, space, wanted)
    return [(count, rows, gathered[np.searchsorted(wanted, rows)]) for count, rows in zip(counts, chosen)]


def _gathered_rows(embedding_chunks: Chunks, space: Callable, rows: np.ndarray) -> np.ndarray:
    """The embeddings of these (sorted) rows in refinement's space, (rows, H) float32: one pass over the chunks."""
    gathered = None
    for start, chunk in embedding_chunks():
        gathered = np.empty((len(rows), chunk.shape[1]), np.float32) if gathered is None else gathered
        lo, hi = np.searchsorted(rows, [start, start + len(chunk)])
        if hi > lo:
            gathered[lo:hi] = space(chunk[rows[lo:hi] - start])
    return gathered


def _inverse_density(
    moved: np.ndarray, rows: np.ndarray, classes: np.ndarray, reference: list[tuple[int, np.ndarray, np.ndarray]]
) -> np.ndarray:
    """1 / the density of each kept text among its class's kept texts (moved: the texts in refinement's space, rows:
    their rows, classes: their classes): 1 for itself + the sum of exp(DENSITY_SCALE (cosine - 1)) over the others,
    estimated on the class's reference texts where it has more than those. In blocks of rows: O(block x reference)."""
    weights = np.empty(len(moved), dtype=np.float32)
    for k in np.unique(classes):
        count, reference_rows, reference_embeddings = reference[k]
        mine = np.flatnonzero(classes == k)
        for block in np.array_split(mine, max(1, len(mine) // 128)):
            kernel = moved[block] @ reference_embeddings.T  # then exp(DENSITY_SCALE (cosine - 1)), in place
            kernel -= 1.0
            kernel *= DENSITY_SCALE
            np.exp(kernel, out=kernel)
            itself = rows[block][:, None] == reference_rows[None, :]
            kernel[itself] = 0.0
            others = np.maximum((~itself).sum(1), 1)
            weights[block] = 1.0 / (1.0 + kernel.sum(1) * ((count - 1) / others))
    return weights


def summed_negative_log_likelihood(scores: np.ndarray, labels: np.ndarray) -> float:
    """-sum log softmax(scores)[label], row by row: the loss every confidence fit here minimises."""
    return float((np.logaddexp.reduce(scores, axis=1) - scores[np.arange(len(scores)), labels]).sum())


def fit_kappa(similarity: np.ndarray, log_priors: np.ndarray, labels: np.ndarray, lowest: float = MIN_KAPPA) -> float:
    """The kappa in [lowest, KAPPA] that maximises the likelihood of `labels` (the teacher's predicted labels, or a
    dev set's) under softmax(kappa * similarity + log prior), similarity being each text's (n, K) cosines to the
    centroids: how sharp the centroid scores may be and still predict those labels as well as they can."""
    from scipy.optimize import minimize_scalar

    def negative_log_likelihood(log_kappa: float) -> float:
        total = 0.0
        for start in range(0, len(similarity), 65_536):  # chunked: a float64 copy of (N, K) would double the memory
            scores = np.exp(log_kappa) * similarity[start : start + 65_536].astype(np.float64) + log_priors
            total += summed_negative_log_likelihood(scores, labels[start : start + len(scores)])
        return total / max(len(similarity), 1)

    best = minimize_scalar(
        negative_log_likelihood, bounds=(np.log(lowest), np.log(KAPPA)), method="bounded", options={"xatol": 1e-4}
    )
    return float(np.exp(best.x))


def fit_kappa_and_bias(
    similarity: np.ndarray, log_priors: np.ndarray, labels: np.ndarray, lowest: float, std: float
) -> tuple[float, np.ndarray]:
    """fit_kappa on dev labels with a bias per class added to the log priors: the kappa in [lowest, KAPPA] and the
    (K,) bias that maximise the likelihood of `labels` under softmax(kappa * similarity + log prior + bias) times a
    Gaussian prior N(0, std^2) on each bias (on the summed likelihood: more labels weigh more). Few labeled texts: (n,
    K) in memory."""
    from scipy.optimize import minimize

    similarity, log_priors = similarity.astype(np.float64), log_priors.astype(np.float64)
    chosen = np.zeros_like(similarity)
    chosen[np.arange(len(labels)), labels] = 1.0

    def negative_log_posterior(params: np.ndarray) -> tuple[float, np.ndarray]:
        kappa, bias = np.exp(params[0]), params[1:]
        scores = kappa * similarity + log_priors + bias
        log_norm = np.logaddexp.reduce(scores, axis=1)
        residual = np.exp(scores - log_norm[:, None]) - chosen  # d(-log likelihood) / d scores
        value = float((log_norm - (scores * chosen).sum(1)).sum() + (bias**2).sum() / (2 * std**2))
        gradient = np.concatenate([[kappa * (residual * similarity).sum()], residual.sum(0) + bias / std**2])
        return value, gradient

    start = np.concatenate([[np.log(np.clip(10.0, lowest, KAPPA))], np.zeros(similarity.shape[1])])
    bounds = [(np.log(lowest), np.log(KAPPA))] + [(None, None)] * similarity.shape[1]
    best = minimize(negative_log_posterior, start, jac=True, method="L-BFGS-B", bounds=bounds)
    return float(np.exp(best.x[0])), best.x[1:]


def choose_bias_std(similarity: np.ndarray, log_priors: np.ndarray, labels: np.ndarray, lowest: float) -> float | None:
    """The DEV_BIAS_STDS value, or None (no bias: fit_kappa alone), under which fits on the other folds give each fold
    of the dev labels the highest likelihood; None wins a tie. Leave-one-out up to DEV_BIAS_MAX_FOLDS texts, beyond
    that as many folds, each text's the next in turn over the classes (every class's first texts, then its second...).
    `similarity`: the dev texts' cross-fitted cosines to the centroids."""
    similarity, log_priors = similarity.astype(np.float64), log_priors.astype(np.float64)
    num_folds = min(len(labels), DEV_BIAS_MAX_FOLDS)
    within_class = round_robin_folds(labels, len(labels))  # each text's position among its class's texts
    folds = np.empty(len(labels), dtype=np.int64)
    folds[np.lexsort((labels, within_class))] = np.arange(len(labels)) % num_folds

    def held_out_nll(std: float | None) -> float:
        total = 0.0
        for fold in range(num_folds):
            held = folds == fold
            if not held.any() or held.all():
                continue
            rest = (similarity[~held], log_priors, labels[~held], lowest)
            kappa, bias = (fit_kappa(*rest), 0.0) if std is None else fit_kappa_and_bias(*rest, std)
            total += summed_negative_log_likelihood(kappa * similarity[held] + log_priors + bias, labels[held])
        return total

    nll = {std: held_out_nll(std) for std in (None, *DEV_BIAS_STDS)}
    return min(nll, key=nll.get)


def embedding_fingerprint(manifest: dict) -> str | None:
    """Which model made a cache's text embeddings: refinement fitted on one cache applies only to caches that match."""
    if not manifest.get("text_embedding_column"):
        return None
    if manifest.get("embedding_model"):
        return manifest["embedding_model"]["fingerprint"]
    return manifest["teacher"]["fingerprint"]


def embedding_chunks(cache_path: str, manifest: dict) -> Chunks:
    """The cache's text embeddings, one shard at a time (see zsdistill.cache.iter_shards)."""
    from zsdistill import cache

    return lambda: cache.column_chunks(cache_path, manifest, manifest["text_embedding_column"])


def save(refinement: Refinement, path: str) -> None:
    centring = {} if refinement.center is None else {"center": refinement.center}
    np.savez(
        path,
        centroids=refinement.centroids,
        log_priors=refinement.log_priors,
        kappa=np.float32(refinement.kappa),
        **centring,
    )


def load(path: str) -> Refinement:
    """A saved refinement; files written before centring have no `center` and score as they did."""
    with np.load(path) as f:
        return Refinement(
            f["centroids"], f["log_priors"], kappa=float(f["kappa"]), center=f["center"] if "center" in f else None
        )
