"""data.py on its own: the readers refuse what they cannot read faithfully (wrong JSON
types, non-finite scores, classes or evaluation sets with no image), name the file and
the line or item, and leave well-formed input as it was; the metrics stay finite (valid
JSON) wherever their inputs are, and the majority baseline scores what the metric scored."""
import json
import logging
import math
import re
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

import data
import run_folder
from conftest import SHARED_DATA

# --- instruction JSON ------------------------------------------------------------------


def write_instruct(path, rows):
    path.write_text(json.dumps(rows))
    return path


def item(**fields):
    return {"instruction": "Is the sky blue?", "input": "", "output": "the answer is true", "answer": "true",
            **fields}


def test_instruct_strings_read_as_before(tmp_path):
    rows = [item(), item(input=None, output="  the answer is option2 ", answer=" option2 "), item(output="")]
    del rows[2]["input"]  # absent: no input
    examples = data.read_instruct_json(write_instruct(tmp_path / "t.json", rows))
    assert [ex["label"] for ex in examples] == ["true", "option2", "true"]
    assert examples[1]["response"] == "the answer is option2" and examples[2]["response"] == ""
    assert all("### Input" not in ex["prompt"] for ex in examples)
    with_input = data.read_instruct_json(write_instruct(tmp_path / "i.json", [item(input="Look up.")]))
    assert "### Input:\nLook up.\n\n" in with_input[0]["prompt"]


def test_a_boolean_answer_is_the_word_it_means(tmp_path):
    examples = data.read_instruct_json(write_instruct(tmp_path / "boolq.json", [item(answer=True),
                                                                               item(answer=False)]))
    assert [ex["label"] for ex in examples] == ["true", "false"]  # str(True) would be "True"
    assert data.answer_correct("the answer is true", examples[0]["label"])
    assert data.answer_correct("false", examples[1]["label"])
    assert not data.answer_correct("true", examples[1]["label"])


@pytest.mark.parametrize("answer,label", [(42, "42"), (-7, "-7"), (3.0, "3"), (2.5, "2.5"), (1e20, str(10 ** 20)),
                                          (0, "0")])
def test_a_number_answer_is_compared_as_a_number(tmp_path, answer, label):
    [example] = data.read_instruct_json(write_instruct(tmp_path / "math.json", [item(answer=answer)]))
    assert example["label"] == label
    assert data.answer_correct(f"so the answer is {label}.", example["label"])
    assert not data.answer_correct("the answer is 5", example["label"])


@pytest.mark.parametrize("field,value,kind", [
    ("answer", ["A", "B"], "an array"), ("answer", {"value": 1}, "an object"),
    ("output", ["the", "answer"], "an array"), ("output", 42, "a number"), ("output", True, "a boolean"),
    ("instruction", 7, "a number"), ("instruction", ["Is", "it"], "an array"),
    ("input", ["context"], "an array"), ("input", {"a": 1}, "an object"), ("input", 0, "a number"),
])
def test_a_field_of_the_wrong_json_type_is_refused_with_its_name(tmp_path, field, value, kind):
    path = write_instruct(tmp_path / "bad.json", [item(), item(**{field: value})])
    with pytest.raises(ValueError, match=re.escape(f"{path}: item 1: {field} is {kind}")):
        data.read_instruct_json(path)


@pytest.mark.parametrize("answer", ["True", "yes", "(a)", "Paris", "option one", ".5"])
def test_an_answer_the_scorer_cannot_read_is_refused_where_it_is_scored(tmp_path, answer):
    """Every generated text would score 0 against it, as if the model had learned nothing;
    a training set's answers are never scored, and read as they are."""
    assert not data.answer_correct(f"the answer is {answer}", answer)
    path = write_instruct(tmp_path / "t.json", [item(), item(answer=answer)])
    with pytest.raises(ValueError, match=re.escape(f"{path}: item 1: answer {answer!r} is in none of the forms")):
        data.read_instruct_json(path, scored=True)
    assert data.read_instruct_json(path)[1]["label"] == answer


def test_json_nested_past_the_recursion_limit_is_refused_with_its_file(tmp_path):
    path = tmp_path / "deep.json"
    path.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ValueError, match=re.escape(f"{path}: nested too deeply")):
        data.read_instruct_json(path)


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
def test_a_non_finite_json_number_answer_is_refused(tmp_path, literal):
    path = tmp_path / "nan.json"  # json.loads accepts these literals, though they are not JSON
    path.write_text(json.dumps([item()]).replace('"answer": "true"', f'"answer": {literal}'))
    with pytest.raises(ValueError, match=re.escape(f"{path}: item 0: answer is a number ({literal})")):
        data.read_instruct_json(path)


@pytest.mark.parametrize("fields,named", [
    (dict(output=None), "['output']"), (dict(answer=None), "['answer']"), (dict(answer="  "), "['answer']"),
    (dict(instruction=""), "['instruction']"), (dict(instruction=None), "['instruction']"),
])
def test_null_and_empty_fields_are_refused_as_before(tmp_path, fields, named):
    path = write_instruct(tmp_path / "t.json", [item(**fields)])
    with pytest.raises(ValueError, match=re.escape(f"{path}: item 0 has a null or empty {named}")):
        data.read_instruct_json(path)
    missing = {k: v for k, v in item().items() if k != "answer"}
    with pytest.raises(ValueError, match=r"item 0 lacks \['answer'\]"):
        data.read_instruct_json(write_instruct(tmp_path / "m.json", [missing]))


@pytest.mark.skipif(not (SHARED_DATA / "instruct").is_dir(), reason="../shared/data/instruct not present")
def test_shared_boolq_with_json_booleans_reads_as_its_strings(tmp_path):
    rows = json.loads((SHARED_DATA / "instruct" / "boolq" / "test.json").read_text())[:200]
    as_bools = [dict(r, answer=r["answer"].strip() == "true") for r in rows]
    assert data.read_instruct_json(write_instruct(tmp_path / "b.json", as_bools)) == \
        data.read_instruct_json(write_instruct(tmp_path / "s.json", rows))


# --- GLUE tsv --------------------------------------------------------------------------


def write_stsb(root, bad_score=None, bad_line=50, rows=200):
    """STS-B train.tsv and dev.tsv; with bad_score, train.tsv's line bad_line holds it."""
    folder = root / "STS-B"
    folder.mkdir(parents=True, exist_ok=True)
    lines = ["index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore"]
    lines += [f"{i}\tmain\tf\t2012\t{i}\tnone\tnone\ta man plays {i}\ta man plays {i + 1}\t{i % 6:.3f}"
              for i in range(rows)]
    (folder / "dev.tsv").write_text("\n".join(lines[:21]) + "\n")
    if bad_score is not None:
        lines[bad_line - 1] = lines[bad_line - 1].rsplit("\t", 1)[0] + f"\t{bad_score}"
    (folder / "train.tsv").write_text("\n".join(lines) + "\n")
    return folder / "train.tsv"


def test_regression_scores_read_as_before(tmp_path):
    write_stsb(tmp_path)
    task = data.load_task("stsb", tmp_path)
    assert len(task.train) == 200 and len(task.evals["dev"]) == 20 and task.kind == "regression"
    assert task.train[7] == {"text": "a man plays 7", "text_pair": "a man plays 8", "label": 1.0}


@pytest.mark.parametrize("score", ["nan", "NaN", "inf", "-inf", "+Infinity", "-infinity", "INF", "-nan"])
def test_a_non_finite_score_stops_with_the_file_and_line(tmp_path, score):
    path = write_stsb(tmp_path, score, bad_line=50)  # one row in 200: a malformed one would be skipped
    with pytest.raises(ValueError, match=re.escape(f"{path}:50: score {score!r} is not a finite number")):
        data.load_task("stsb", tmp_path)


def test_a_score_that_is_no_number_is_still_a_skippable_malformed_row(tmp_path, capsys):
    write_stsb(tmp_path, "n/a", bad_line=50, rows=300)
    assert len(data.load_task("stsb", tmp_path).train) == 299
    assert "skipped 1 malformed row(s) of 300 (first at line 50: score 'n/a' is not a number)" in capsys.readouterr().out
    path = write_stsb(tmp_path, "n/a", bad_line=50, rows=60)  # 1 in 60: over 1%, stops
    with pytest.raises(ValueError, match=re.escape(f"{path}:50: score 'n/a' is not a number")):
        data.load_task("stsb", tmp_path)


@pytest.mark.parametrize("separator", ["\u2028", "\x0b", "\x0c", "\x1c", "\x1d", "\x1e", "\x85"])
def test_rows_split_only_on_newlines(tmp_path, separator):
    (tmp_path / "SST-2").mkdir()
    rows = [f"good movie {separator} with a twist\t1", "bad film\t0"] * 50
    for name in ("train.tsv", "dev.tsv"):
        (tmp_path / "SST-2" / name).write_text("sentence\tlabel\r\n" + "\r\n".join(rows) + "\r\n")
    task = data.load_task("sst2", tmp_path)
    assert len(task.train) == 100 and task.train[0]["text"] == f"good movie {separator} with a twist"
    assert [ex["label"] for ex in task.train[:2]] == [1, 0]


@pytest.mark.skipif(not (SHARED_DATA / "glue").is_dir(), reason="../shared/data/glue not present")
def test_shared_glue_has_only_finite_labels():
    for task in ("sst2", "cola", "rte"):
        loaded = data.load_task(task, SHARED_DATA / "glue")
        assert all(ex["label"] in (0, 1) for ex in loaded.train + loaded.evals["dev"])


# --- images ----------------------------------------------------------------------------


def image_tree(root, layout):
    """layout: {"train/cat": ["a.png", ...]}; names starting with "bad", or not ending in .png or
    .jpg, are written as text."""
    for folder, names in layout.items():
        (root / folder).mkdir(parents=True, exist_ok=True)
        for name in names:
            if name.startswith("bad") or not name.endswith((".png", ".jpg")):
                (root / folder / name).write_bytes(b"not an image")
            else:
                Image.new("RGB", (4, 4), (200, 40, 40)).save(root / folder / name)
    return root


def test_unreadable_images_are_counted_per_set(tmp_path):
    image_tree(tmp_path, {"train/cat": ["a.png", "b.png", "bad1.png"], "train/dog": ["a.png"],
                          "test/cat": ["a.png", "bad1.jpg", "bad2.png"], "test/dog": ["a.png"]})
    task = data.load_task("images", tmp_path)
    assert task.labels == ["cat", "dog"] and len(task.train) == 3 and len(task.evals["dev"]) == 2
    assert task.unreadable_by_set == {"train": 1, "dev": 2}


def test_a_clean_image_task_counts_nothing_unreadable(tmp_path):
    image_tree(tmp_path, {"train/cat": ["a.png"], "train/dog": ["a.png"], "val/dog": ["a.png"]})
    task = data.load_task("images", tmp_path)  # an evaluation set may lack a class
    assert task.unreadable_by_set == {"train": 0, "dev": 0}
    assert task.evals["dev"][0]["label"] == 1


@pytest.mark.parametrize("files", [[], ["bad.png"], ["notes.txt"]])
def test_a_training_class_without_a_readable_image_is_refused(tmp_path, files):
    image_tree(tmp_path, {"train/cat": ["a.png"], "train/dog": files, "train/emu": ["a.png"],
                          "test/cat": ["a.png"]})
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path / 'train' / 'dog'}: class folder(s) with no "
                                                   f"readable image under train/")):
        data.load_task("images", tmp_path)


def test_an_evaluation_set_without_a_readable_image_is_refused(tmp_path):
    image_tree(tmp_path, {"train/cat": ["a.png"], "train/dog": ["a.png"], "test/cat": ["bad1.png", "bad2.jpg"]})
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path / 'test'}: no images that can be read "
                                                   f"(all 2 image files are unreadable)")):
        data.load_task("images", tmp_path)


# --- the majority baseline -------------------------------------------------------------


def test_the_majority_baseline_scores_the_examples_the_metric_scored():
    task = data.Task("t", "image", [{"label": 1}] * 3 + [{"label": 0}],
                     {"dev": [{"label": 1}, {"label": 1}, {"label": 0}, {"label": 0}], "test": [{"label": 0}]},
                     "accuracy", ["a", "b"])
    assert task.majority_baseline() == {"dev": {"accuracy": 0.5}, "test": {"accuracy": 0.0}}
    assert task.majority_baseline(scored={"dev": [0, 1, 2]}) == {"dev": {"accuracy": pytest.approx(2 / 3)},
                                                                 "test": {"accuracy": 0.0}}
    assert task.majority_baseline(scored={"dev": [2, 3], "test": [0]})["dev"] == {"accuracy": 0.0}
    with pytest.raises(ValueError, match="no example of 'dev' was scored"):
        task.majority_baseline(scored={"dev": []})
    with pytest.raises(ValueError, match="scored index 4 is out of range"):
        task.majority_baseline(scored={"dev": [0, 4]})
    with pytest.raises(ValueError, match=r"scored names \['train'\], not eval sets"):
        task.majority_baseline(scored={"train": [0]})


def test_the_regression_baseline_over_scored_examples_is_finite():
    task = data.Task("t", "regression", [{"label": 1.0}, {"label": 3.0}],
                     {"dev": [{"label": 0.0}, {"label": 4.0}, {"label": 2.0}]}, "pearson")
    assert task.majority_baseline() == {"dev": {"pearson": 0.0, "spearman": 0.0}}
    assert task.majority_baseline(scored={"dev": [1]}) == {"dev": {"pearson": 0.0, "spearman": 0.0}}


# --- metrics: always finite, so result files are valid JSON ----------------------------


def all_metrics(preds, golds):
    return {name: fn(preds, golds) for name, fn in data.METRICS.items()}


@pytest.mark.parametrize("preds,golds", [
    ([], []), ([1], [0]), ([1, 1, 1], [0, 1, 0]), ([0, 1, 0], [1, 1, 1]), ([0, 0], [0, 0]),
    ([2.0, 2.0, 2.0], [1.0, 2.0, 3.0]), ([0.1] * 7, list(range(7))), ([1, 2, 2, 2], [3, 3, 3, 3]),
])
def test_degenerate_inputs_give_finite_metrics(preds, golds):
    json.dumps(all_metrics(preds, golds), allow_nan=False)  # NaN or Infinity would raise here


def test_correlations_of_empty_and_constant_inputs_are_zero():
    for fn in (data.pearson, data.spearman):
        assert fn([], []) == 0.0 and fn([3.0], [1.0]) == 0.0
        assert fn([0.1] * 7, range(7)) == 0.0  # a float mean of equal values leaves 1e-17 residuals
        assert fn([5, 5, 5, 5], [1, 2, 3, 4]) == 0.0  # all tied


def test_matthews_does_not_overflow_on_a_large_set():
    rng = np.random.default_rng(0)
    preds, golds = rng.integers(0, 2, 400_000), rng.integers(0, 2, 400_000)
    tp, tn = int(np.sum((preds == 1) & (golds == 1))), int(np.sum((preds == 0) & (golds == 0)))
    fp, fn = int(np.sum((preds == 1) & (golds == 0))), int(np.sum((preds == 0) & (golds == 1)))
    exact = (tp * tn - fp * fn) / math.isqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    assert data.matthews_corr(preds, golds) == pytest.approx(exact, abs=1e-6)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_predictions_are_refused_not_scored(bad):
    for fn in (data.pearson, data.spearman):
        with pytest.raises(ValueError, match=r"1 of 3 predictions are not finite numbers \(the first, #1"):
            fn([1.0, bad, 2.0], [1.0, 2.0, 3.0])
        with pytest.raises(ValueError, match="1 of 3 gold scores are not finite"):
            fn([1.0, 2.0, 3.0], [1.0, 2.0, bad])


def test_task_score_refuses_a_non_finite_metric(monkeypatch):
    monkeypatch.setitem(data.METRICS, "broken", lambda p, g: {"broken": float("nan")})
    with pytest.raises(ValueError, match="not finite"):
        data.Task("t", "classification", [], {}, "broken").score([1], [1])


def exact_pearson(xs, ys):
    """The slow, obviously-correct reference: exact rational arithmetic, one square root."""
    xs, ys = [Fraction(x) for x in xs], [Fraction(y) for y in ys]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    cov = sum((x - mx) * (y - my) for x, y in zip(xs, ys))
    vx, vy = sum((x - mx) ** 2 for x in xs), sum((y - my) ** 2 for y in ys)
    if vx == 0 or vy == 0:
        return 0.0
    return math.copysign(math.sqrt(cov * cov / (vx * vy)), cov)


def exact_ranks(values):
    return [sum(v < w for v in values) + (sum(v == w for v in values) + 1) / 2 for w in values]


pairs = st.integers(2, 30).flatmap(lambda n: st.tuples(*[st.lists(st.integers(-8, 8).map(lambda i: i / 4), min_size=n,
                                                                   max_size=n)] * 2))


@given(pairs)
def test_pearson_and_spearman_match_exact_references(xy):
    xs, ys = xy
    assert data.pearson(xs, ys) == pytest.approx(exact_pearson(xs, ys), abs=1e-9)
    assert data.spearman(xs, ys) == pytest.approx(exact_pearson(exact_ranks(xs), exact_ranks(ys)), abs=1e-9)


any_finite = st.floats(allow_nan=False, allow_infinity=False)


@given(st.integers(0, 20).flatmap(lambda n: st.tuples(st.lists(any_finite, min_size=n, max_size=n),
                                                      st.lists(any_finite, min_size=n, max_size=n))))
def test_correlations_of_any_finite_floats_are_finite_and_bounded(xy):
    """Values near 1e308 (squares overflow) or 1e-310 (squares underflow) included."""
    for fn in (data.pearson, data.spearman):
        r = fn(*xy)
        assert math.isfinite(r) and -1.0 <= r <= 1.0


def test_correlations_survive_extreme_magnitudes():
    assert data.pearson([1e308, -1e308, 5e307], [1.0, -1.0, 0.5]) == pytest.approx(1.0)
    assert data.pearson([1e-310, 3e-310, 2e-310], [1.0, 3.0, 2.0]) == pytest.approx(1.0)
    assert data.pearson([1.0, 1.0 + 2e-16 * 4, 1.0], [0.0, 1.0, 0.0]) == pytest.approx(1.0)


# --- the docstrings task ---------------------------------------------------------------


def test_the_docstrings_task_does_not_depend_on_what_is_imported(monkeypatch):
    fingerprint = lambda task: run_folder.data_fingerprint(task, task.train)
    before = fingerprint(data.load_docstrings())
    # transformers adds such methods to logging.Logger when imported
    monkeypatch.setattr(logging.Logger, "info_once", lambda self, *a: None, raising=False)
    monkeypatch.setattr(logging.Logger, "warning_advice", lambda self, *a: None, raising=False)
    assert fingerprint(data.load_docstrings()) == before
