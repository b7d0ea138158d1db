"""Evaluation metrics against cases worked out by hand, bad test sets, and one eval.py run end to end."""

from __future__ import annotations

import json
import subprocess
import sys
import types
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.metrics import roc_auc_score

from dataset_manager import Category, DataError, LabeledImage, Preprocessor
from evaluation import metrics as m
from evaluation.sheets import choose
from evaluation.tables import markdown_summary, summary_table, terminal_table
from pipeline.evaluation_run import evaluate_category
from pipeline.inspection import Inspector

ROOT = Path(__file__).resolve().parents[1]

# --- metrics on hand-made arrays -----------------------------------------------------------------


def _two_regions() -> tuple[np.ndarray, np.ndarray]:
    """One 1x6 image: region A = pixels 0,1; good = 2,4,5; region B = pixel 3 (split from A by pixel 2).

    Scores 0.9 0.2 | 0.8 | 0.7 | 0.1 0.0. Going down the sorted scores, (FPR, PRO) visits
    (0,0) (0,.25) (1/3,.25) (1/3,.75) (1/3,1) (2/3,1) (1,1): A's pixels add 1/(2*2), B's 1/(2*1).
    """
    masks = np.array([[[1, 1, 0, 1, 0, 0]]], dtype=bool)
    maps = np.array([[[0.9, 0.2, 0.8, 0.7, 0.1, 0.0]]], dtype=np.float32)
    return masks, maps


def test_pro_curve_two_regions_by_hand():
    curves = m.pixel_curves(*_two_regions())
    assert curves.n_regions == 2 and curves.n_good_pixels == 3 and curves.n_defect_pixels == 3
    np.testing.assert_allclose(curves.fpr, [0, 0, 1 / 3, 1 / 3, 1])
    np.testing.assert_allclose(curves.pro, [0, 0.25, 0.25, 1, 1])  # collinear points dropped


def test_pro_area_by_hand_with_interpolation_at_the_limit():
    curves = m.pixel_curves(*_two_regions())
    # up to 0.5: 1/3 * 0.25 + (0.5 - 1/3) * 1 = 0.25, normalized by 0.5
    assert m.pro_auc(curves, 0.5) == pytest.approx(0.5)
    # up to 0.3: PRO is 0.25 on [0, 1/3], so the interpolated area is 0.3 * 0.25
    assert m.pro_auc(curves, 0.3) == pytest.approx(0.25)
    assert m.pro_auc(curves, 1.0) == pytest.approx(1 / 12 + 2 / 3)


def test_pixel_rocauc_by_hand():
    # defect pixels 0.9, 0.7, 0.2 against good 0.8, 0.1, 0.0: 3 + 2 + 2 of 9 pairs are ordered right
    assert m.pixel_rocauc(*_two_regions()) == pytest.approx(7 / 9)


def test_pixel_rocauc_keeps_the_distinctions_of_float64_maps():
    masks = np.array([[[False, False, True, True]]])
    maps = np.array([[[1.0, 1 + 1e-9, 1 + 2e-9, 1 + 3e-9]]])  # one value in float32
    assert m.pixel_rocauc(masks, maps) == 1.0


def test_regions_do_not_join_across_images_and_diagonals_join():
    masks = np.zeros((2, 4, 4), dtype=bool)
    masks[0, 0, 0] = masks[0, 1, 1] = True  # diagonal neighbours: one region (8-connectivity)
    masks[1, 0, 0] = True  # same place, other image: its own region
    regions, count = m.label_regions(masks)
    assert count == 2
    assert regions[0, 0, 0] == regions[0, 1, 1] != regions[1, 0, 0]


def test_ties_share_one_threshold():
    curves = m.pixel_curves(np.array([[[True, False]]]), np.array([[[1.0, 1.0]]]))
    np.testing.assert_allclose(curves.fpr, [0, 1])
    np.testing.assert_allclose(curves.pro, [0, 1])
    assert m.pro_auc(curves, 1.0) == pytest.approx(0.5)


def _pro_by_brute_force(masks: np.ndarray, maps: np.ndarray, limit: float) -> float:
    """The definition, threshold by threshold: mean region overlap against good-pixel FPR."""
    regions, count = m.label_regions(masks)
    points = [(0.0, 0.0)]
    for threshold in np.unique(maps)[::-1]:
        above = maps >= threshold
        overlap = np.mean([above[regions == k].mean() for k in range(1, count + 1)])
        points.append((above[~masks].mean(), overlap))
    fpr, pro = np.array(points).T
    return m.area_up_to(fpr, pro, limit) / limit


@pytest.mark.parametrize("chunk", [7, 1 << 22])
def test_pixel_curves_match_the_definition_and_sklearn(monkeypatch, chunk):
    monkeypatch.setattr(m, "_CHUNK", chunk)
    rng = np.random.default_rng(0)
    masks = np.zeros((3, 9, 9), dtype=bool)
    masks[0, 1:4, 1:3] = masks[1, 5:9, 6] = masks[1, 0, 0] = masks[2, 4, 4] = True
    maps = np.round(rng.normal(size=masks.shape) + masks, 1).astype(np.float32)  # rounding makes ties
    assert m.pixel_rocauc(masks, maps) == pytest.approx(roc_auc_score(masks.ravel(), maps.ravel()))
    for limit in (0.05, 0.3, 1.0):
        assert m.pro_auc(m.pixel_curves(masks, maps), limit) == pytest.approx(_pro_by_brute_force(masks, maps, limit))


def test_pixel_curves_undefined_without_defect_or_good_pixels():
    assert m.pixel_curves(np.zeros((1, 2, 2), bool), np.ones((1, 2, 2))) is None
    assert m.pixel_curves(np.ones((1, 2, 2), bool), np.ones((1, 2, 2))) is None
    assert m.pro_auc(None, 0.3) is None and m.pixel_auc(None) is None


def test_area_up_to_interpolates():
    assert m.area_up_to([0, 1], [0, 1], 0.5) == pytest.approx(0.125)
    assert m.area_up_to([0, 0.5, 1], [1, 1, 1], 0.5) == pytest.approx(0.5)


def test_image_metrics_by_hand():
    labels = np.array([0, 0, 1, 1], dtype=bool)
    scores = np.array([0.1, 0.4, 0.35, 0.8])
    assert m.image_rocauc(labels, scores) == pytest.approx(3 / 4)
    assert m.image_rocauc(np.ones(3, bool), scores[:3]) is None
    # thresholds 0.8 / 0.4 / 0.35 / 0.1 give F1 2/3, 1/2, 4/5, 2/3
    assert m.f1_max(labels, scores) == {"f1": pytest.approx(0.8), "threshold": pytest.approx(0.35)}
    table = m.per_defect_rocauc(["good", "good", "a", "b"], scores)
    assert table == {"a": {"count": 1, "image_rocauc": 0.5}, "b": {"count": 1, "image_rocauc": 1.0}}


def test_verdict_metrics_by_hand():
    result = m.verdict_metrics(np.array([1, 1, 1, 0, 0], bool), np.array([1, 1, 0, 1, 0], bool))
    assert result["confusion"] == {"true_defect": 2, "false_defect": 1, "true_good": 1, "false_good": 1}
    assert result["precision"] == pytest.approx(2 / 3) and result["recall"] == pytest.approx(2 / 3)
    assert result["f1"] == pytest.approx(2 / 3)
    assert result["false_reject_rate"] == pytest.approx(1 / 2)
    assert result["escape_rate"] == pytest.approx(1 / 3)
    only_good = m.verdict_metrics(np.zeros(2, bool), np.zeros(2, bool))
    assert only_good["escape_rate"] is None and only_good["recall"] is None and only_good["false_reject_rate"] == 0
    nothing_flagged = m.verdict_metrics(np.array([1, 0], bool), np.zeros(2, bool))
    assert nothing_flagged["precision"] is None and nothing_flagged["f1"] == 0.0


def test_bootstrap_rocauc_gain_is_paired_and_centred_on_the_difference():
    rng = np.random.default_rng(1)
    labels = np.r_[np.zeros(30), np.ones(20)].astype(bool)
    baseline = rng.normal(size=50) + labels
    assert np.all(m.bootstrap_rocauc_gain(labels, baseline, np.exp(baseline)) == 0)  # same ranking: no gain on any draw
    worse = rng.normal(size=50) + 0.3 * labels
    gains = m.bootstrap_rocauc_gain(labels, baseline, worse)
    assert gains.shape == (1000,)
    assert gains.mean() == pytest.approx(roc_auc_score(labels, worse) - roc_auc_score(labels, baseline), abs=0.01)
    assert m.bootstrap_rocauc_gain(np.zeros(5, bool), baseline[:5], worse[:5]) is None


def test_sheet_choice():
    chosen = choose(np.array([5.0, 1.0, 9.0, 2.0, 7.0]), np.array([0, 0, 1, 1, 1], bool), 1)
    assert chosen == [(0, "worst-scored good #1"), (2, "best-scored defect #1"), (3, "worst-scored defect #1")]


def test_tables_have_rows_per_category_and_mean():
    rows = [
        {"category": "a", "image_rocauc": 0.9, "pixel_rocauc": 0.8, "pro": None, "per_defect": {}},
        {"category": "b", "image_rocauc": 0.7, "pixel_rocauc": 1.0, "pro": 0.5, "per_defect": {}},
    ]
    table = summary_table(rows)
    assert table["mean"] == {"image_rocauc": pytest.approx(0.8), "pixel_rocauc": pytest.approx(0.9), "pro": 0.5}
    assert table["mean_over"] == {"image_rocauc": 2, "pixel_rocauc": 2, "pro": 1}
    assert "| **mean** | **0.800** | **0.900** | **0.500 (1 of 2)** |" in markdown_summary(rows)  # PRO: b's alone, and it says so
    text = terminal_table(rows)
    assert "image ROCAUC" in text and "pixel ROCAUC" in text and "PRO" in text and text.splitlines()[-1].startswith("mean")


# --- evaluate_category on bad test sets, with a stand-in detector ----------------------------------

SIZE = 16


class FakeDetector:
    """Scores an image by its brightness: bright pixels are the defect. Enough to exercise eval."""

    model = None  # nothing built for scoring (pipeline.inspection.Inspector)
    needs_peaks = False  # no labeled-defect similarity stage (pipeline.detector.Detector.needs_peaks)
    operating_notes: list[str] = []  # the model's own operating point

    def __init__(self, category: str = "parts", probabilities: bool = False, classifier=None) -> None:
        self.preprocessor = Preprocessor(SIZE, SIZE, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
        self.image_threshold, self.pixel_threshold = 0.5, 0.5
        self.runtime = "torch"
        self.classifier = classifier
        self.model_dir = Path("model") / category
        self.description = {
            "dataset": {"category": category},
            "validation": {"pixel_quantiles": {"0.5": 0.1}},
            "thresholds": {"image": self.image_threshold, "pixel": self.pixel_threshold},
        }
        self.probabilities = probabilities

    def is_defect(self, result) -> bool:
        if self.classifier is not None:
            return result.probability >= 0.5
        return result.score >= self.image_threshold

    def inspect(self, paths, batch_size, num_workers=0, preview_size=0, label=""):
        def results():
            for index, path in enumerate(paths):
                gray = torch.from_numpy(np.asarray(Image.open(path).convert("L"), dtype=np.float32) / 255.0)
                score = float(gray.max())
                yield SimpleNamespace(
                    index=index, anomaly_map=gray, score=score, size=(SIZE, SIZE), preview=None,
                    probability=min(score * 0.9, 1.0) if self.probabilities else None,
                )

        return results(), SimpleNamespace(skipped=[])


def _evaluate(detector, category: Category, settings, out_dir: Path):
    """evaluate_category as eval.py calls it: through the Inspector test.py and serve.py use."""
    return evaluate_category(Inspector(detector), category, settings, out_dir)


def _settings(**overrides) -> SimpleNamespace:
    values = {"BATCH_SIZE": 4, "NUM_WORKERS": 0, "EVAL_PRO_FPR_LIMIT": 0.3, "EVAL_SHEET_COUNT": 0}
    values.update(overrides)
    return SimpleNamespace(**values)


def _image(path: Path, spot: bool, level: int = 200) -> np.ndarray:
    array = np.full((SIZE, SIZE), 40, dtype=np.uint8)
    mask = np.zeros((SIZE, SIZE), dtype=bool)
    if spot:
        mask[4:8, 5:9] = True
        array[mask] = level
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return mask


def _category(root: Path, goods: int, defects: int, masked: int | None = None) -> Category:
    """Dark goods, defects with a bright square; the first `masked` defects get a mask file."""
    items = []
    for i in range(goods):
        _image(root / "test" / "good" / f"{i}.png", False)
        items.append(LabeledImage(root / "test" / "good" / f"{i}.png", "good"))
    for i in range(defects):
        path = root / "test" / "spot" / f"{i}.png"
        mask = _image(path, True, level=160 + 30 * i)
        mask_path = None
        if masked is None or i < masked:
            mask_path = root / "ground_truth" / "spot" / f"{i}_mask.png"
            mask_path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(mask.astype(np.uint8) * 255).save(mask_path)
        items.append(LabeledImage(path, "spot", mask_path))
    return Category("parts", root, [], test_images=items)


def test_evaluate_a_clean_category(tmp_path):
    result = _evaluate(FakeDetector(), _category(tmp_path / "data", 3, 3), _settings(EVAL_SHEET_COUNT=1), tmp_path / "out" / "parts")
    metrics = result.metrics
    assert metrics["image_rocauc"] == 1.0 and metrics["pixel_rocauc"] == pytest.approx(1.0) and metrics["pro"] == pytest.approx(1.0)
    assert metrics["operating"]["confusion"] == {"true_defect": 3, "false_defect": 0, "true_good": 3, "false_good": 0}
    assert metrics["per_defect"]["spot"]["count"] == 3 and metrics["per_defect"]["spot"]["pro"] == pytest.approx(1.0)
    assert metrics["notes"] == [] and metrics["classifier_rocauc"] is None
    written = json.loads((tmp_path / "out" / "parts" / "metrics.json").read_text())
    assert {"image_rocauc", "pixel_rocauc", "per_defect", "pro"} <= written.keys()
    for picture in list(written["figures"].values()) + [s["picture"] for s in written["sheets"]]:
        assert (tmp_path / "out" / picture).is_file(), picture
    assert len(written["sheets"]) == 3
    strict = FakeDetector()
    strict.image_threshold = 2.0  # above every score: no defect is flagged, and the notes say so
    notes = _evaluate(strict, _category(tmp_path / "data", 3, 3), _settings(EVAL_SHEET_COUNT=1), tmp_path / "out" / "strict").metrics["notes"]
    assert any("flags none of the 3 defect images" in note for note in notes)


def test_no_defects_leaves_rocauc_undefined_and_reports_the_rest(tmp_path, capsys):
    metrics = _evaluate(FakeDetector(), _category(tmp_path / "data", 3, 0), _settings(), tmp_path / "out").metrics
    assert metrics["image_rocauc"] is None and metrics["pixel_rocauc"] is None and metrics["pro"] is None
    assert any("no defect images" in note for note in metrics["notes"])
    assert metrics["operating"]["false_reject_rate"] == 0.0 and metrics["operating"]["escape_rate"] is None
    assert "no defect images" in capsys.readouterr().err
    assert "pixel ROCAUC and PRO are undefined: the test set holds no defect images" in metrics["notes"]
    from evaluation.tables import markdown_category

    assert "| defect type |" not in markdown_category(metrics)  # no empty table of defect types
    assert metrics["model"]["runtime"] == "torch"
    assert "chosen on honest goods (validation, out-of-fold), not on" in markdown_category(metrics)
    metrics["model"]["updates"] = 2  # the goods updates added set the threshold too (metrics.md said nothing of them)
    assert "chosen on honest goods (validation, out-of-fold and goods added by 2 updates), not on" in markdown_category(metrics)


def test_no_goods_leaves_image_rocauc_undefined_but_pixel_metrics_defined(tmp_path):
    metrics = _evaluate(FakeDetector(), _category(tmp_path / "data", 0, 3), _settings(), tmp_path / "out").metrics
    assert metrics["image_rocauc"] is None and any("no good images" in note for note in metrics["notes"])
    assert metrics["pixel_rocauc"] == pytest.approx(1.0) and metrics["pro"] == pytest.approx(1.0)
    assert metrics["operating"]["recall"] == 1.0


def test_missing_masks_use_the_masked_images_and_say_how_many(tmp_path, capsys):
    metrics = _evaluate(FakeDetector(), _category(tmp_path / "data", 2, 3, masked=1), _settings(), tmp_path / "out").metrics
    assert metrics["n_defects_without_mask"] == 2 and metrics["n_pixel_images"] == 3  # 2 goods + 1 masked defect
    assert metrics["per_defect"]["spot"]["n_masked"] == 1
    assert metrics["pixel_rocauc"] == pytest.approx(1.0)
    assert "2 of 3 defect images have no ground-truth mask: pixel ROCAUC and PRO use the 1 that have one and the 2 good images" in capsys.readouterr().err


def test_an_empty_mask_of_a_defect_image_is_named_and_left_out_of_the_pixel_figures(tmp_path, capsys):
    """A black mask for a defect image would count its defect pixels as good ones: said, and the image
    left out of the pixel figures like one without a mask, not scored as a perfect-looking good."""
    category = _category(tmp_path / "data", 2, 3)
    empty = category.test_images[-1].mask_path
    Image.fromarray(np.zeros(np.asarray(Image.open(empty)).shape, np.uint8)).save(empty)
    metrics = _evaluate(FakeDetector(), category, _settings(), tmp_path / "out").metrics
    assert metrics["n_defects_without_mask"] == 1 and metrics["n_pixel_images"] == 4 and metrics["pixel_rocauc"] == pytest.approx(1.0)
    assert f"1 defect image mask marks no defect pixel at the working size (e.g. {empty})" in capsys.readouterr().err


def test_no_masks_at_all_say_the_pixel_figures_are_not_computed(tmp_path, capsys):
    """The simple layout has no masks: one line says so, not a count of images that have one."""
    metrics = _evaluate(FakeDetector(), _category(tmp_path / "data", 2, 3, masked=0), _settings(), tmp_path / "out").metrics
    assert metrics["pixel_rocauc"] is None and metrics["pro"] is None
    err = capsys.readouterr().err
    assert "none of the 3 defect images has a ground-truth mask" in err and "pixel ROCAUC and PRO are not computed" in err


def test_model_of_another_category_warns(tmp_path, capsys):
    metrics = _evaluate(FakeDetector(category="bottle"), _category(tmp_path / "data", 2, 2), _settings(), tmp_path / "out").metrics
    assert metrics["trained_category"] == "bottle"
    assert "WARNING: parts: the model model/bottle was trained on category 'bottle', evaluated here on 'parts'" in capsys.readouterr().err  # which category it is about


def test_test_goods_that_score_above_the_calibration_goods_are_reported_as_a_shift(tmp_path, capsys):
    """Good test images taken differently (here: all brighter than every calibration good) make every
    image figure measure that shift; eval says so. Goods like the calibration goods raise no note."""
    category = _category(tmp_path / "data", 8, 2)  # the test goods all score 40 / 255
    shifted, alike = FakeDetector(), FakeDetector()
    shifted.description["out_of_fold"] = {"image_scores": list(np.linspace(0.0, 0.1, 100))}
    alike.description["out_of_fold"] = {"image_scores": list(np.linspace(0.05, 0.3, 100))}
    notes = _evaluate(shifted, category, _settings(), tmp_path / "shifted").metrics["notes"]
    assert any("8 good test images score higher than the 100 good images" in note for note in notes)
    assert "taken differently" in capsys.readouterr().err
    assert not any("taken differently" in note for note in _evaluate(alike, category, _settings(), tmp_path / "alike").metrics["notes"])


def test_mask_of_the_wrong_size_is_refused(tmp_path):
    category = _category(tmp_path / "data", 1, 1)
    Image.fromarray(np.zeros((SIZE + 1, SIZE), dtype=np.uint8)).save(category.test_images[-1].mask_path)
    with pytest.raises(DataError, match="fix or remove the mask"):
        _evaluate(FakeDetector(), category, _settings(), tmp_path / "out")


def test_the_image_histogram_names_its_line_by_what_decides_the_verdict(tmp_path, monkeypatch):
    """The image threshold is the operating one only when the image score's ranking decides; when the
    classifier's trees do, the line says so (it was called the operating threshold)."""
    import pipeline.evaluation_run as evaluation_run

    labels = []
    drawing = evaluation_run.plot_histogram
    monkeypatch.setattr(evaluation_run, "plot_histogram", lambda *args, **kwargs: labels.append(args[6:]) or drawing(*args, **kwargs))
    monkeypatch.setitem(sys.modules, "classification_model.xgboost",
                        types.SimpleNamespace(plot_feature_importance=lambda classifier, path, title: Path(path).write_bytes(b"png")))
    _evaluate(FakeDetector(), _category(tmp_path / "data", 2, 2), _settings(), tmp_path / "plain")
    trees = SimpleNamespace(uses_trees=True, similarity=None, ranks_like_image_score=False)
    _evaluate(FakeDetector(probabilities=True, classifier=trees), _category(tmp_path / "data", 2, 2), _settings(), tmp_path / "trees")
    assert labels[0] == ("threshold in force",) and labels[1] == ("image threshold (the classifier decides the verdict)",)


def test_curves_that_coincide_are_drawn_once_and_the_pixel_roc_marks_its_threshold(tmp_path, monkeypatch):
    """A classifier ranking like the image score drew its curve exactly over the image score's (a
    legend entry nobody could see); the pixel ROC had no point for the pixel threshold the sheets use."""
    import pipeline.evaluation_run as evaluation_run

    drawn = {}
    real = evaluation_run.plot_roc
    monkeypatch.setattr(evaluation_run, "plot_roc", lambda curves, title, path, *rest: drawn.setdefault(Path(path).name, (list(curves), rest))
                        and real(curves, title, path, *rest))
    monkeypatch.setitem(sys.modules, "classification_model.xgboost",
                        types.SimpleNamespace(plot_feature_importance=lambda classifier, path, title: Path(path).write_bytes(b"png")))
    alike = SimpleNamespace(uses_trees=False, similarity=None, ranks_like_image_score=True)
    metrics = _evaluate(FakeDetector(probabilities=True, classifier=alike), _category(tmp_path / "data", 3, 3), _settings(), tmp_path / "out").metrics
    assert drawn["roc_image.png"][0] == [evaluation_run.SAME_RANKING]
    assert "classifier feature importance" not in metrics["figures"]  # its features decide nothing
    pixel_point, axes = drawn["roc_pixel.png"][1]
    entry = metrics["pixel_thresholds"]["validation"]
    assert pixel_point == (entry["test_pixel_false_positive_rate"], entry["test_defect_pixel_recall"]) and axes == evaluation_run.PIXEL_AXES
    assert 0 <= entry["test_pixel_false_positive_rate"] <= 1


def test_the_report_explains_its_words_and_names_the_thresholds_in_force(tmp_path):
    from evaluation.tables import GLOSSARY, markdown_category, markdown_summary

    metrics = _evaluate(FakeDetector(), _category(tmp_path / "data", 2, 2), _settings(), tmp_path / "out").metrics
    text = markdown_summary([metrics]) + markdown_category(metrics)
    assert all(f"**{term}**" in text for term, _ in GLOSSARY) and "honest goods" in dict(GLOSSARY)
    assert f"| image score threshold in force | {metrics['operating']['image_threshold']:.3f} |" in text


def test_a_defect_type_in_a_script_the_font_lacks_draws_without_warnings(tmp_path):
    """A process where every UserWarning is an error (matplotlib's missing-glyph one would be) draws it."""
    import subprocess

    code = ("import numpy as np, sys; from pathlib import Path; from evaluation.plots import plot_histogram; "
            f"plot_histogram(np.r_[1.0, 2.0], np.r_[3.0], 2.5, 'Loch \u7a74', 'score', Path({str(tmp_path / 'h.png')!r}))")
    drawn = subprocess.run([sys.executable, "-W", "error::UserWarning", "-c", code], cwd=Path(__file__).resolve().parents[1],
                           capture_output=True, text=True, timeout=120)
    assert drawn.returncode == 0 and (tmp_path / "h.png").is_file(), drawn.stderr[-1500:]


def test_classifier_probabilities_reported_side_by_side(tmp_path, monkeypatch):
    drawn = []
    module = types.ModuleType("classification_model.xgboost")
    module.plot_feature_importance = lambda classifier, path, title: drawn.append(title) or drawn.append(path) or Path(path).write_bytes(b"png")
    monkeypatch.setitem(sys.modules, "classification_model.xgboost", module)
    detector = FakeDetector(probabilities=True, classifier=SimpleNamespace(uses_trees=True, similarity=None, ranks_like_image_score=False))
    result = _evaluate(detector, _category(tmp_path / "data", 3, 3), _settings(), tmp_path / "out" / "parts")
    metrics = result.metrics
    assert metrics["classifier_rocauc"] == 1.0 and set(result.image_curves) == {"max score", "classifier"}
    assert metrics["operating"]["source"] == "classifier verdict" and "operating_score_threshold" in metrics
    assert "classifier probability" in metrics["f1_max"] and drawn[0] == "parts: classifier feature importance"


def test_a_classifier_that_ranks_worse_than_the_image_score_gets_a_note(tmp_path, monkeypatch, capsys):
    """The classifier's gain depends on the part: when the user's own test set shows it ranking worse
    than the image score beyond resampling noise, eval says so; a classifier that ranks alike does not."""
    monkeypatch.setitem(sys.modules, "classification_model.xgboost", types.SimpleNamespace(plot_feature_importance=lambda c, path, title: None))
    category = _category(tmp_path / "data", 10, 4)  # goods dark, defects brighter: the image score ranks them perfectly

    class Inverted(FakeDetector):
        def inspect(self, paths, batch_size, num_workers=0, preview_size=0, label=""):
            results, batches = super().inspect(paths, batch_size, num_workers, preview_size, label)
            return (SimpleNamespace(**{**vars(r), "probability": 1.0 - r.score}) for r in results), batches

    notes = _evaluate(Inverted(probabilities=True, classifier=SimpleNamespace(uses_trees=True, similarity=None, ranks_like_image_score=False)), category, _settings(), tmp_path / "inverted").metrics["notes"]
    assert any("the classifier ranks these images worse than the image score" in note for note in notes)
    assert "CLASSIFIER = False" in capsys.readouterr().err
    alike = _evaluate(FakeDetector(probabilities=True, classifier=SimpleNamespace(uses_trees=True, similarity=None, ranks_like_image_score=False)), category, _settings(), tmp_path / "alike")
    assert not any("ranks these images worse" in note for note in alike.metrics["notes"])


# --- eval.py end to end ------------------------------------------------------------------------------


def _tiny_dataset(root: Path) -> None:
    rng = np.random.default_rng(0)

    def part(path: Path, defect: bool) -> None:
        array = (rng.normal(120, 8, (64, 64, 3))).clip(0, 255).astype(np.uint8)
        path.parent.mkdir(parents=True, exist_ok=True)
        if defect:
            array[20:30, 25:40] = 250
            mask = np.zeros((64, 64), dtype=np.uint8)
            mask[20:30, 25:40] = 255
            mask_path = root / "ground_truth" / path.parent.name / f"{path.stem}_mask.png"
            mask_path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(mask).save(mask_path)
        Image.fromarray(array).save(path)

    for i in range(8):
        part(root / "train" / "good" / f"{i}.png", False)
    for i in range(3):
        part(root / "validation" / "good" / f"{i}.png", False)
        part(root / "test" / "good" / f"{i}.png", False)
        part(root / "test" / "blob" / f"{i}.png", True)


def test_eval_script_end_to_end(tmp_path):
    data, models, results = tmp_path / "parts", tmp_path / "models", tmp_path / "results"
    _tiny_dataset(data)
    common = [f"DATASET_DIR={data}", f"MODEL_DIR={models}", f"RESULTS_DIR={results}", "WEIGHTS=none", "RESIZE=64", "CROP=64", "NUM_WORKERS=0"]
    import train  # trained in this process: one torch import fewer than a second subprocess

    train.main([*common, "CLASSIFIER=False"])
    done = subprocess.run([sys.executable, "eval.py", *common, "EVAL_SHEET_COUNT=1"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "image ROCAUC" in done.stdout and "pixel ROCAUC" in done.stdout and "PRO" in done.stdout
    assert "metrics and ROC curves: " in done.stdout.splitlines()[-1]
    run_dir = Path(done.stdout.splitlines()[-1].split("metrics and ROC curves: ")[1])
    category = json.loads((run_dir / "parts" / "metrics.json").read_text())
    assert {"image_rocauc", "pixel_rocauc", "per_defect", "pro", "operating", "f1_max"} <= category.keys()
    summary = json.loads((run_dir / "metrics.json").read_text())
    assert summary["table"]["rows"][0]["category"] == "parts" and "mean_pro" in summary
    report = (run_dir / "report.html").read_text()
    for picture in category["figures"].values():
        assert f'src="{picture}"' in report and (run_dir / picture).is_file()
    assert "| **mean** |" in (run_dir / "metrics.md").read_text()
    assert not list(results.glob(".*partial*"))


def test_several_categories_get_overall_figures_and_one_report(tmp_path):
    import eval as eval_script
    from evaluation.report import write_report

    run_dir = tmp_path / "run"
    evaluations = [
        _evaluate(FakeDetector(category=name), _category(tmp_path / name, 2, 2), _settings(EVAL_SHEET_COUNT=0), run_dir / name)
        for name in ("parts", "parts")
    ]
    evaluations[1].metrics["category"] = "other"
    overall = eval_script._overall_figures(evaluations, run_dir, 0.3)
    assert set(overall.values()) == {"roc_image_all.png", "roc_pixel_all.png", "pro_all.png"}
    report = write_report(run_dir, [e.metrics for e in evaluations], overall, "two").read_text()
    assert report.count("<h2 id=") == 2 and 'src="pro_all.png"' in report and "<td>mean</td>" in report


def test_report_links_of_a_category_named_with_a_hash_are_encoded(tmp_path):
    """"lot #3/roc_image.png" was an anchor to a browser: every picture of that category was missing."""
    from evaluation.report import write_report

    run_dir = tmp_path / "run"
    import dataclasses

    category = dataclasses.replace(_category(tmp_path / "lot #3", 2, 2), name="lot #3")
    evaluation = _evaluate(FakeDetector(category="lot #3"), category, _settings(EVAL_SHEET_COUNT=1), run_dir / "lot #3")
    report = write_report(run_dir, [evaluation.metrics], {}, "one").read_text()
    assert 'src="lot%20%233/' in report and 'src="lot #3/' not in report


def test_the_leak_note_says_how_the_model_learned_each_kind():
    from pipeline.evaluation_run import _learned_note

    note = _learned_note({"good": [Path("test/good/a.png"), Path("test/good/b.png")], "defect": [Path("test/crack/c.png")]})
    assert note.startswith("3 test images the model learned (same bytes): 2 as goods (training images or ADD_GOOD), e.g. test/good/a.png; "
                           "1 as labeled defects (train/defect/ or ADD_DEFECT), e.g. test/crack/c.png")


def test_a_threshold_at_a_false_reject_rate_flags_at_most_that_share_of_the_goods():
    """Verdicts flag value >= threshold: rate 0 flags no good (not the highest one), ties never push
    the share over the rate, and the threshold is one of the goods' values (or just above the
    highest), so a monotone map of the scores maps the threshold (the classifier's log-odds)."""
    rng = np.random.default_rng(0)
    goods = rng.normal(size=239)
    for rate in (0.0, 0.001, 0.01, 0.05, 0.2, 0.5):
        threshold = m.threshold_at_rate(goods, rate)
        assert (goods >= threshold).sum() == int(np.floor(rate * goods.size))
        assert threshold in goods or threshold == np.nextafter(goods.max(), np.inf)
        squashed = 1 / (1 + np.exp(-3 * goods))
        assert m.threshold_at_rate(squashed, rate) == pytest.approx(1 / (1 + np.exp(-3 * threshold)), rel=1e-12) or rate == 0
    tied = np.array([1.0, 2.0, 3.0, 3.0, 3.0, 4.0])
    assert m.threshold_at_rate(tied, 0.5) == 4.0  # 3.0 would flag 4 of 6
    assert m.threshold_at_rate(tied, 0.7) == 3.0 and m.threshold_at_rate(tied, 0.0) > 4.0
    with pytest.raises(ValueError, match="NaN"):  # a NaN threshold would pass every image
        m.threshold_at_rate(np.r_[goods, np.nan], 0.1)
