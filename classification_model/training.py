"""Building the classifier's training set from a fitted anomaly model, and training it.

Goods: maps the model produces for good images it never saw, so that they look like the maps of
new good parts: the validation images, and (cross-fitting, OUT_OF_FOLD_FOLDS > 0) every training
image scored by the model fitted without its fold (`AnomalyModel.out_of_fold_scores`): hundreds
of honest goods instead of a few dozen. Maps of images the model was fitted on are never used:
they are unrealistically clean.

Defects: the user's labeled defect images (train/defect/) and, when there are fewer than
CLASSIFIER_ENOUGH_REAL_DEFECTS of them, CLASSIFIER_SYNTHETIC_DEFECTS synthetic defects painted
onto the goods (classification_model/synthetic.py), spread evenly over them. A defect's map must
be as honest as its host's: on a training image the fitted model's map is too clean outside the
defect. So it is the host's honest map plus what the defect changes in the fitted model's map,
honest + (map(defect image) - map(host)): outside the defect the two fitted-model maps cancel and
the honest background remains; inside, the rise the defect causes is added. On ksdd this was
within 0.004 (mean absolute) of the map a model fitted without the host gives, against 1-3 for
the fitted model's own map (bench/classifier_ablation.py, README).

Labeled defects also teach a second stage (`classification_model.similarity`, CLASSIFIER_DEFECT_SIMILARITY):
how much an image's worst patch deviates the way theirs do. It is fitted on the validation goods and
the labeled defects, from their first-stage out-of-fold log-odds and their peak directions. Which
verdict the model keeps (the first stage, with the similarity stage, or the image score's ranking)
is decided by each one's held-out gain over the image score on the honest goods and the labeled
defects (`decide_verdict`, `classification_model.evidence`).

Every map becomes one row of features (and its median: the evidence compares defects with goods
whose maps lie as high overall) as
it arrives (`TrainingSet.add`): no map is kept, so memory does not grow with the number of training images.
"""

from __future__ import annotations

import io
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from anomaly_model.base import AnomalyModel
from classification_model.features import FEATURE_NAMES, MONOTONE, map_features
from classification_model.evidence import (
    FIRST_STAGE, IMAGE_SCORE, MIN_ALIKE_GOODS, WITH_SIMILARITY, HeldOutRows, VerdictChoice, choose_verdict, own_background_evidence,
)
from classification_model.similarity import background_similarities, fit_defect_similarity
from classification_model.synthetic import DEFECT_TYPES, make_defect
from classification_model.xgboost import BOOSTER_FILE, Anchor, Anchoring, ClassifierParams, ClassifierRows, DefectClassifier, train_classifier
from dataset_manager import DataError, ImageBatches, Preprocessor, read_rgb
from dataset_manager.loader import warn_skipped

FEATURE_CHUNK = 64  # maps turned into features at once (64 maps of 224 x 224: 13 MB)
CLASSIFIER_ROWS_FILE = "classifier_rows.npz"  # a model's classifier rows (`TrainingSet.to_bytes`): what an update retrains on


@dataclass
class HonestGoods:
    """Maps of good images the model was not fitted on, with what the classifier needs of them."""

    paths: list[Path]  # the images (synthetic defects are painted on them)
    hosts: list[int]  # host numbers: validation images first, then training images
    maps: torch.Tensor  # (N, H, W) their honest maps
    scores: torch.Tensor  # (N,) their image scores
    out_of_fold: bool  # the model was fitted on these images and `maps` are their out-of-fold maps


@dataclass
class DefectPainting:
    """How synthetic defects are painted (CLASSIFIER_DEFECT_SIZE / _STRENGTH) and scored."""

    size_range: tuple[float, float]
    strength_range: tuple[float, float]
    rng: np.random.Generator
    batch_size: int


def params_from_settings(settings) -> ClassifierParams:
    return ClassifierParams(
        max_depth=settings.CLASSIFIER_MAX_DEPTH,
        learning_rate=settings.CLASSIFIER_LEARNING_RATE,
        max_rounds=settings.CLASSIFIER_MAX_ROUNDS,
        early_stopping_rounds=settings.CLASSIFIER_EARLY_STOPPING_ROUNDS,
        subsample=settings.CLASSIFIER_SUBSAMPLE,
        colsample_bytree=settings.CLASSIFIER_COLSAMPLE,
        min_child_weight=settings.CLASSIFIER_MIN_CHILD_WEIGHT,
        folds=settings.CLASSIFIER_FOLDS,
        monotone=settings.CLASSIFIER_MONOTONE,
        seed=settings.SEED,
    )


def synthetic_plan(n_hosts: int, total: int, seed: int) -> list[list[str]]:
    """Defect types to paint on each of `n_hosts` good images: `total` defects spread evenly over a
    seeded order of the hosts, types in turn, so every type lands on every kind of host."""
    plan: list[list[str]] = [[] for _ in range(n_hosts)]
    if n_hosts == 0:
        return plan
    order = np.random.default_rng(seed).permutation(n_hosts)
    for number in range(total):
        plan[int(order[number % n_hosts])].append(DEFECT_TYPES[number % len(DEFECT_TYPES)])
    return plan


def synthetic_defect_maps(
    model: AnomalyModel,
    preprocessor: Preprocessor,
    hosts: list[Path],
    kinds: list[list[str]],
    painting: DefectPainting,
    honest_maps: torch.Tensor | None = None,
    fitted_maps: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, np.ndarray, list[str]]:
    """(maps (M, H, W), image scores (M,), host position per map, defect type per map) of the defects
    `kinds[i]` painted on `hosts[i]`. `honest_maps` (one per host): the hosts were fitted on and these
    are their out-of-fold maps; each defect's map is then honest + (map(defect) - map(host)), the
    fitted model's maps of the hosts being scored here unless given as `fitted_maps`."""
    score_hosts = honest_maps is not None and fitted_maps is None
    images, owners, defect_kinds = [], [], []
    for position, (path, host_kinds) in enumerate(zip(hosts, kinds)):
        if not host_kinds:
            continue
        try:
            rgb = read_rgb(path, full_scale=preprocessor.gray_full_scale)
        except DataError:
            continue
        if score_hosts:
            images.append(preprocessor.image_tensor(rgb))
            owners.append(position)
            defect_kinds.append(None)  # the host itself, scored by the fitted model
        for kind in host_kinds:
            box = preprocessor.crop_box(rgb.shape[0], rgb.shape[1])
            image = make_defect(rgb, kind, painting.rng, painting.size_range, painting.strength_range, box)
            images.append(preprocessor.image_tensor(image))
            owners.append(position)
            defect_kinds.append(kind)
    if not images:
        return torch.zeros(0, *preprocessor.size), torch.zeros(0), np.zeros(0, dtype=int), []
    maps, scores = [], []
    step = preprocessor.batch_size(painting.batch_size)
    # a bar of its own where these are not inside the out-of-fold pass's (a tiled model's hundreds of defects take minutes)
    with tqdm(total=len(images), desc="synthetic defects", unit="img", file=sys.stderr, disable=honest_maps is not None) as progress:
        for start in range(0, len(images), step):
            batch_maps, batch_scores = model.score(torch.stack(images[start : start + step]))
            maps.append(batch_maps)
            scores.append(batch_scores)
            progress.update(len(batch_scores))
    maps, scores = torch.cat(maps), torch.cat(scores)
    is_defect = torch.tensor([kind is not None for kind in defect_kinds])
    owners = np.array(owners, dtype=int)
    if honest_maps is not None:
        if score_hosts:
            host_row = {int(owner): row for row, (owner, kind) in enumerate(zip(owners, defect_kinds)) if kind is None}
            fitted_host = maps[[host_row[int(owner)] for owner in owners]]
        else:
            fitted_host = fitted_maps[torch.from_numpy(owners)].float()
        maps = honest_maps[torch.from_numpy(owners)].float() + maps - fitted_host
        scores = model.image_scores(maps)
    kept = torch.nonzero(is_defect).flatten()
    return maps[kept], scores[kept], owners[kept.numpy()], [kind for kind in defect_kinds if kind is not None]


def image_maps(
    model: AnomalyModel, preprocessor: Preprocessor, paths: list[Path], batch_size: int, label: str, peaks: bool = False,
    background_level: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(maps, image scores, peak directions when `peaks` else None, background peak directions
    (`AnomalyModel.background_peaks` at `background_level`) when that is given else None) of image
    files (unreadable ones are left out, with a warning)."""
    batches = ImageBatches(paths, preprocessor, batch_size, 0)
    score = model.score_with_peaks if peaks else model.score
    scored = []
    for batch in tqdm(batches, desc=label, unit="batch", file=sys.stderr):
        result = score(batch.images)
        scored.append((*result, *(() if peaks else (None,)), None if background_level is None else model.background_peaks(batch.images, background_level)))
    warn_skipped(batches.skipped)
    if not scored:
        return torch.zeros(0, *preprocessor.size), torch.zeros(0), torch.zeros(0, 0) if peaks else None, None
    maps, scores = torch.cat([result[0] for result in scored]), torch.cat([result[1] for result in scored])
    directions = torch.cat([result[2] for result in scored]) if peaks else None
    return maps, scores, directions, None if background_level is None else torch.cat([result[3] for result in scored])


class TrainingSet:
    """The classifier's examples, one row of features per map, added as the maps arrive.

    Groups tie a good image and the synthetic defects painted on it together (the classifier's
    cross-validation never scores a defect whose host it trained on); real defects are groups of
    their own. Hosts are numbered validation images first, then training images. The labeled
    defects' rows come last; the goods with peak directions are listed by row (`good_direction_rows`):
    the similarity stage reads both."""

    def __init__(self, levels: dict[str, float], n_validation: int, n_train: int, synthetic_total: int, seed: int) -> None:
        self.levels = levels
        self.n_validation = n_validation
        self.plan = synthetic_plan(n_validation + n_train, synthetic_total, seed)
        self.rng = np.random.default_rng(seed)
        self.features: list[np.ndarray] = []
        self.image_scores: list[np.ndarray] = []
        self.medians: list[np.ndarray] = []  # each map's median: how high its ordinary pixels lie
        self.labels: list[np.ndarray] = []
        self.groups: list[np.ndarray] = []
        self.weights: list[np.ndarray] = []
        self.counts = {"validation_goods": 0, "out_of_fold_goods": 0, "real_defects": 0, **{kind: 0 for kind in DEFECT_TYPES}}
        self._next_real_group = n_validation + n_train  # goods and their defects use 0 .. hosts - 1
        self.n_rows = 0
        self.validation_rows = slice(0, 0)  # the validation goods' rows
        self.real_rows = slice(0, 0)  # the labeled defects' rows
        # peak directions (AnomalyModel.score_with_peaks) of honest goods (their rows) and of the labeled defects, for the similarity stage
        self.good_direction_rows: list[np.ndarray] = []
        self.good_directions: list[np.ndarray] = []
        self.real_directions: np.ndarray | None = None
        self.real_backgrounds: np.ndarray | None = None  # their images' background peak directions (NaN rows: none), for the check in `decide_verdict`
        self.similarity_note = ""  # why the similarity stage was not used, when labeled defects could have taught it
        self.verdict: VerdictChoice | None = None  # which verdict `train` kept, and the held-out evidence why
        self.held_real: dict[str, np.ndarray] | None = None  # a restored set's labeled-defect rows, put back last (`restored`)

    def add(self, maps: torch.Tensor, scores: torch.Tensor, label: int, groups: np.ndarray, weight: float = 1.0) -> None:
        """Rows for (N, H, W) maps and their image scores (features computed here, maps not kept)."""
        if maps.shape[0] == 0:
            return
        for start in range(0, maps.shape[0], FEATURE_CHUNK):
            self.features.append(map_features(maps[start : start + FEATURE_CHUNK], self.levels))
        self.medians.append(np.median(np.asarray(maps.flatten(1), dtype=np.float32), axis=1).astype(np.float64))
        self.n_rows += maps.shape[0]
        self.image_scores.append(scores.double().numpy())
        self.labels.append(np.full(maps.shape[0], label, dtype=int))
        self.groups.append(np.asarray(groups, dtype=int))
        self.weights.append(np.full(maps.shape[0], float(weight)))

    def add_goods_and_synthetic(self, model: AnomalyModel, preprocessor: Preprocessor, goods: HonestGoods, settings) -> None:
        """Rows for honest good maps, and for the synthetic defects planned for their images."""
        if not goods.out_of_fold:
            self.validation_rows = slice(self.n_rows, self.n_rows + goods.maps.shape[0])
        self.add(goods.maps, goods.scores, 0, np.array(goods.hosts))
        self.counts["out_of_fold_goods" if goods.out_of_fold else "validation_goods"] += goods.maps.shape[0]
        kinds = [self.plan[host] for host in goods.hosts]
        if not any(kinds):
            return
        painting = DefectPainting(settings.CLASSIFIER_DEFECT_SIZE, settings.CLASSIFIER_DEFECT_STRENGTH, self.rng, settings.BATCH_SIZE)
        defect_maps, defect_scores, owners, defect_kinds = synthetic_defect_maps(
            model, preprocessor, goods.paths, kinds, painting, honest_maps=goods.maps if goods.out_of_fold else None,
        )
        self.add(defect_maps, defect_scores, 1, np.array(goods.hosts)[owners])
        for kind in defect_kinds:
            self.counts[kind] += 1

    def add_good_directions(self, rows: np.ndarray, directions: torch.Tensor | np.ndarray) -> None:
        """Peak directions (N, d) of the honest goods at rows `rows` (N,), for the similarity stage."""
        self.good_direction_rows.append(np.asarray(rows, dtype=np.int64))
        self.good_directions.append(torch.as_tensor(directions).double().numpy())

    @property
    def has_good_directions(self) -> bool:
        """Whether some honest goods carry peak directions (a similarity stage can be weighed)."""
        return any(len(rows) for rows in self.good_direction_rows)

    def directions_of_goods(self) -> tuple[np.ndarray, np.ndarray]:
        """(rows (N,), peak directions (N, d)) of the goods that have them, in the order they were added."""
        return np.concatenate(self.good_direction_rows), np.concatenate(self.good_directions)

    def add_real_defects(self, maps: torch.Tensor, scores: torch.Tensor, weight: float, directions: torch.Tensor | None = None,
                         backgrounds: torch.Tensor | None = None) -> None:
        """Labeled defects' maps (last rows, after those of a restored set), and their peak directions
        and background peak directions when the similarity stage may use them."""
        start, had_held = self.n_rows, self.held_real is not None
        held_directions = self.put_back_real_defects()
        held_backgrounds = self.real_backgrounds
        groups = self._next_real_group + np.arange(maps.shape[0])
        self._next_real_group += maps.shape[0]
        self.add(maps, scores, 1, groups, weight)
        self.real_rows = slice(start, self.n_rows)
        self.counts["real_defects"] += maps.shape[0]
        new_directions = None if directions is None else directions.double().numpy()
        new_backgrounds = None if backgrounds is None else backgrounds.double().numpy()
        if not had_held:
            self.real_directions, self.real_backgrounds = new_directions, new_backgrounds
        else:  # the earlier defects' directions and the new ones', or none when either is missing
            both = held_directions is not None and new_directions is not None
            self.real_directions = np.concatenate([held_directions, new_directions]) if both else None
            both = held_backgrounds is not None and new_backgrounds is not None
            self.real_backgrounds = np.concatenate([held_backgrounds, new_backgrounds]) if both else None

    def add_goods(self, maps: torch.Tensor, scores: torch.Tensor) -> None:
        """Honest good maps added to a restored set (a model update): rows of their own groups, no synthetic defects."""
        groups = self._next_real_group + np.arange(maps.shape[0])
        self._next_real_group += maps.shape[0]
        self.add(maps, scores, 0, groups)
        self.counts["added_goods"] = self.counts.get("added_goods", 0) + maps.shape[0]

    def to_bytes(self) -> bytes:
        """Every row (features, image scores, map medians, labels, groups, weights), which rows are the
        validation goods and the labeled defects, and the peak directions of goods and defects: CLASSIFIER_ROWS_FILE, what
        `restored` reads back so an update retrains the classifier in seconds, without painting defects again."""
        self.put_back_real_defects()
        features, scores, labels, groups, weights = self.arrays()
        arrays = {
            "features": features, "image_scores": scores, "labels": labels, "groups": groups, "weights": weights,
            "medians": np.concatenate(self.medians) if self.medians else np.zeros(0),
            "validation_rows": np.array([self.validation_rows.start, self.validation_rows.stop]),
            "real_rows": np.array([self.real_rows.start, self.real_rows.stop]), "next_group": np.array([self._next_real_group]),
        }
        if self.has_good_directions:
            arrays["good_direction_rows"], arrays["good_directions"] = self.directions_of_goods()
        if self.real_directions is not None:
            arrays["real_directions"] = self.real_directions
        if self.real_backgrounds is not None:
            arrays["real_backgrounds"] = self.real_backgrounds
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        return buffer.getvalue()

    @classmethod
    def restored(cls, levels: dict[str, float], data: bytes, counts: dict[str, int], seed: int) -> "TrainingSet":
        """The set `to_bytes` saved (no pickled objects are read). Its labeled-defect rows are held back
        and put back last (`put_back_real_defects`), so that goods added now come before them and the
        labeled defects, old and new, stay the last rows, as the similarity stage reads them."""
        training_set = cls(levels, 0, 0, 0, seed)
        with np.load(io.BytesIO(data), allow_pickle=False) as stored:
            rows = {name: stored[name] for name in stored.files}
        real = slice(*(int(v) for v in rows["real_rows"]))
        keep = np.ones(len(rows["labels"]), dtype=bool)
        keep[real] = False
        columns = ("features", "image_scores", "medians", "labels", "groups", "weights")
        for name in columns:
            getattr(training_set, name).append(rows[name][keep])
        training_set.n_rows = int(keep.sum())
        training_set.validation_rows = slice(*(int(v) for v in rows["validation_rows"]))
        if "good_directions" in rows:
            training_set.add_good_directions(rows["good_direction_rows"], rows["good_directions"])
        elif "validation_directions" in rows:  # saved before the out-of-fold goods had peak directions
            validation = training_set.validation_rows
            training_set.add_good_directions(np.arange(validation.start, validation.stop), rows["validation_directions"])
        training_set._next_real_group = int(rows["next_group"][0])
        if real.stop > real.start:
            training_set.held_real = {name: rows[name][real] for name in columns}
            if "real_directions" in rows:
                training_set.held_real["directions"] = rows["real_directions"]
            if "real_backgrounds" in rows:  # saved since the own-background check (2026-12-07)
                training_set.held_real["backgrounds"] = rows["real_backgrounds"]
        training_set.counts.update(counts)
        return training_set

    def put_back_real_defects(self) -> np.ndarray | None:
        """The held-back labeled-defect rows of a restored set, appended now (once); returns their peak directions."""
        held, self.held_real = self.held_real, None
        if held is None:
            return None
        start = self.n_rows
        for name in ("features", "image_scores", "medians", "labels", "groups", "weights"):
            getattr(self, name).append(held[name])
        self.n_rows += len(held["labels"])
        self.real_rows = slice(start, self.n_rows)
        self.real_directions, self.real_backgrounds = held.get("directions"), held.get("backgrounds")
        return self.real_directions

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(features, image scores, labels, groups, weights)."""
        if not self.labels:
            return np.zeros((0, len(FEATURE_NAMES)), np.float32), *(np.zeros(0) for _ in range(4))
        return tuple(np.concatenate(parts) for parts in (self.features, self.image_scores, self.labels, self.groups, self.weights))

    def train(self, settings) -> DefectClassifier:
        """The classifier and the verdict its held-out evidence keeps (`decide_verdict`: the first
        stage, its similarity stage, or the image score's ranking); `similarity_note` says why the
        similarity stage is not used when labeled defects could have taught it, `verdict` what was kept and why."""
        self.put_back_real_defects()
        features, scores, labels, groups, weights = self.arrays()
        rows = ClassifierRows(features, labels, groups, weights, scores)
        classifier = train_classifier(
            rows, FEATURE_NAMES, params_from_settings(settings), settings.CLASSIFIER_FALSE_REJECT_RATE, MONOTONE, anchoring(settings))
        good_rows, good_directions = self.directions_of_goods() if self.has_good_directions else (np.zeros(0, np.int64), None)
        directions = good_directions is not None and self.real_directions is not None
        evidence = VerdictRows(labels, scores, weights, np.concatenate(self.medians) if self.medians else np.zeros(0), self.real_rows,
                               good_rows, good_directions if directions else None, self.real_directions if directions else None,
                               self.real_backgrounds if directions else None)
        self.verdict, note = decide_verdict(classifier, evidence, settings.CLASSIFIER_FALSE_REJECT_RATE, settings.SEED)
        self.similarity_note = self.similarity_note or note
        return classifier


@dataclass
class VerdictRows:
    """What `decide_verdict` weighs, beside the classifier's out-of-fold log-odds of every row."""

    labels: np.ndarray  # (N,) every row of the classifier's training set: 0 honest good, 1 defect (synthetic or labeled)
    image_scores: np.ndarray  # (N,)
    weights: np.ndarray  # (N,) training weights (the image score's anchor is fitted with them)
    medians: np.ndarray  # (N,) each row's map median
    real_rows: slice  # the labeled defects' rows
    good_rows: np.ndarray | slice  # the rows of the honest goods with peak directions
    good_directions: np.ndarray | None  # their peak directions (AnomalyModel.score_with_peaks); None: no similarity stage
    real_directions: np.ndarray | None
    real_backgrounds: np.ndarray | None = None  # the labeled defects' own background peak directions (NaN rows: none); None: not checked


def decide_verdict(classifier: DefectClassifier, rows: VerdictRows, false_reject_rate: float, seed: int) -> tuple[VerdictChoice, str]:
    """Fit the similarity stage where it may be learned, weigh every candidate verdict's held-out gain
    over the image score on the honest goods and the labeled defects (`classification_model.evidence`),
    and make `classifier` the one kept: the first stage as trained, with the similarity stage added,
    or ranking like the image score. Returns the choice (also in `classifier.report["verdict"]`) and,
    when a similarity stage was possible but is not used, why."""
    labels = np.asarray(rows.labels).astype(int)
    scores, medians = np.asarray(rows.image_scores, np.float64), np.asarray(rows.medians, np.float64)
    out_of_fold = classifier.out_of_fold_margin
    taught = np.zeros(len(labels), dtype=bool)
    taught[rows.real_rows] = True
    honest = ((labels == 0) | taught) & ~np.isnan(out_of_fold)
    candidates = {FIRST_STAGE: HeldOutRows(labels[honest], out_of_fold[honest], scores[honest], medians[honest])}
    similarity, note, backgrounds = None, "", None
    if rows.good_directions is not None and rows.real_directions is not None:
        good_index = np.arange(len(labels))[rows.good_rows]
        real_index = np.arange(rows.real_rows.start, rows.real_rows.stop)
        good_ok, real_ok = ~np.isnan(out_of_fold[good_index]), ~np.isnan(out_of_fold[real_index])
        good_directions = rows.good_directions[good_ok]
        similarity, held_out, note = fit_defect_similarity(
            out_of_fold[good_index][good_ok], good_directions, out_of_fold[real_index][real_ok], rows.real_directions[real_ok])
        if similarity is not None and rows.real_backgrounds is not None:
            backgrounds = own_background_evidence(*background_similarities(rows.real_directions[real_ok], rows.real_backgrounds[real_ok]), seed)
        if similarity is not None and backgrounds is not None and backgrounds.lower_bound <= 0.5:
            note = (f"the labeled defects' peaks do not stand out from their own images' backgrounds by direction (ROCAUC {backgrounds.rocauc:.3f}, "
                    f"lower bound {backgrounds.lower_bound:.3f}, {backgrounds.n_defects} defects): what they share may be how they were taken")
            similarity = None
        elif similarity is not None:
            index = np.r_[good_index[good_ok], real_index[real_ok]]
            candidates[WITH_SIMILARITY] = HeldOutRows(labels[index], held_out, scores[index], medians[index])
    choice = choose_verdict(candidates, seed)
    choice.own_backgrounds = backgrounds
    goods = labels == 0
    if choice.verdict == WITH_SIMILARITY:
        classifier.add_similarity(similarity, out_of_fold[good_index][good_ok], good_directions, false_reject_rate)
    elif choice.verdict == IMAGE_SCORE:
        anchor = classifier.anchor or Anchor.fit(scores, labels, rows.weights)
        classifier.rank_like_image_score(anchor, scores[goods], false_reject_rate)
    if similarity is not None and choice.verdict != WITH_SIMILARITY:
        entry = choice.evidence[WITH_SIMILARITY]
        if entry.effective_goods < MIN_ALIKE_GOODS:  # no bound could show a gain: say what would
            note = (f"too few goods to judge it: {entry.n_goods} validation goods carry peak directions, {entry.effective_goods:.0f} per "
                    f"labeled defect look taken like it (at least {MIN_ALIKE_GOODS:.0f} needed): add good images the model is not fitted on "
                    "(validation/good/ in the MVTec layout, or raise VALIDATION_FRACTION)")
        else:
            note = f"its held-out gain over the image score is not clearly positive (the verdict is the {choice.verdict})"
    classifier.report["verdict"] = choice.to_dict()
    return choice, note


def anchoring(settings) -> Anchoring:
    """How the classifier relates to the image score (CLASSIFIER_ANCHOR)."""
    return Anchoring(settings.CLASSIFIER_ANCHOR, guard=0.0, shrink_goods=settings.CLASSIFIER_SHRINK_GOODS)


def classifier_info(classifier: DefectClassifier, training_set: TrainingSet, settings) -> dict:
    """The `info["classifier"]` entry of model.json."""
    counts = training_set.counts
    return {
        "booster_file": BOOSTER_FILE,
        "features": list(FEATURE_NAMES),
        "levels": training_set.levels,
        "threshold": classifier.threshold,
        "false_reject_rate": settings.CLASSIFIER_FALSE_REJECT_RATE,
        # what serve.py / test.py / eval.py re-pick the threshold from at another CLASSIFIER_FALSE_REJECT_RATE
        "good_probabilities": [] if classifier.threshold_goods is None else [float(p) for p in classifier.threshold_goods],
        "anchor_mode": settings.CLASSIFIER_ANCHOR,
        **({"anchor": classifier.anchor.to_dict()} if classifier.anchor is not None else {}),
        **({"tree_share": classifier.tree_share} if classifier.tree_share is not None else {}),
        **({"similarity": classifier.similarity.to_dict()} if classifier.similarity is not None else {}),
        **({"similarity_note": training_set.similarity_note} if training_set.similarity_note else {}),
        # "verdict" (from the report): what was kept and the held-out evidence behind it (classification_model.evidence)
        "n_validation_goods": counts["validation_goods"],
        "n_out_of_fold_goods": counts["out_of_fold_goods"],
        "n_real_defects": counts["real_defects"],
        "n_synthetic_defects": {kind: counts[kind] for kind in DEFECT_TYPES},
        "synthetic_defect_size": list(settings.CLASSIFIER_DEFECT_SIZE),
        "synthetic_defect_strength": list(settings.CLASSIFIER_DEFECT_STRENGTH),
        **{k: v for k, v in classifier.report.items() if k not in ("out_of_fold_good_probabilities", "anchor", "tree_share")},
    }
