"""
Tasks and metrics for train.py.

- GLUE tasks from a directory in the original GLUE tsv layout (sst2, cola, mrpc,
  rte, stsb, qnli, mnli, qqp, wnli), with the GLUE metrics.
- Instruction tasks: <data_dir>/<set>/{train,test}.json, lists of
  {instruction, input, output, answer} (the commonsense and math sets of
  LLM-Adapters); trained on the response, scored by greedy generation and answer
  extraction.
- Images in the ImageFolder layout (train/<class>/*.jpg, test/ or val/), decoded
  lazily batch by batch with the model's own image processor; accuracy.
- "docstrings", the offline default: the docstrings of Python's standard library,
  labelled by the topic of their module. Real, human-written text that every
  Python installation carries; built at run time (it depends on the Python
  version), split deterministically by name.

A task is plain data: examples are dicts; train.py tokenises them with
`encode_*` and batches them with `collate`.
"""

import importlib
import inspect
import json
import math
import re
import warnings
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

# ----------------------------------------------------------------------------------
# Metrics (GLUE definitions; numpy only)


def accuracy(preds, golds):
    return float(np.mean(np.asarray(preds) == np.asarray(golds))) if len(golds) else 0.0


def matthews_corr(preds, golds):
    """Matthews correlation for binary labels (CoLA); 0 when a row of the confusion matrix is empty."""
    p, g = np.asarray(preds), np.asarray(golds)
    # counts as Python floats: the product of four int64 counts overflows past ~110k examples
    tp, tn = float(np.sum((p == 1) & (g == 1))), float(np.sum((p == 0) & (g == 0)))
    fp, fn = float(np.sum((p == 1) & (g == 0))), float(np.sum((p == 0) & (g == 1)))
    denom = math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    return (tp * tn - fp * fn) / denom if denom else 0.0


def f1_positive(preds, golds):
    p, g = np.asarray(preds), np.asarray(golds)
    tp = np.sum((p == 1) & (g == 1))
    precision, recall = tp / max(np.sum(p == 1), 1), tp / max(np.sum(g == 1), 1)
    return float(2 * precision * recall / (precision + recall)) if tp else 0.0


def _finite(values, what):
    """values as a float array; a NaN or infinity stops here, named, rather than
    becoming a NaN metric (which is not valid JSON)."""
    values = np.asarray(values, dtype=float).reshape(-1)
    bad = np.flatnonzero(~np.isfinite(values))
    if len(bad):
        raise ValueError(f"{len(bad)} of {len(values)} {what} are not finite numbers (the first, "
                         f"#{bad[0]}, is {values[bad[0]]}); a correlation over them is undefined")
    return values


def _unit(x):
    """x centred and scaled to length 1; None when constant. Scaled to its largest value
    before and after centring, so that neither squares near 1e308 overflow nor
    residuals near 1e-170 underflow to a zero norm (then 0/0 = NaN)."""
    if x.min() == x.max():  # exact test: a constant's float mean may leave 1e-17 residuals
        return None
    x = x / np.abs(x).max()
    x = x - x.mean()
    x = x - x.mean()  # again: removes the first mean's rounding, which matters when values differ by an ulp
    top = np.abs(x).max()
    if top == 0:  # distinct values that the scaling rounded together
        return None
    x = x / top
    return x / math.sqrt(float(np.dot(x, x)))


def pearson(preds, golds):
    """Pearson correlation (STS-B); 0 for fewer than two pairs or a constant side, where it is undefined."""
    p, g = _finite(preds, "predictions"), _finite(golds, "gold scores")
    if len(p) != len(g):
        raise ValueError(f"{len(p)} predictions for {len(g)} gold scores")
    if len(p) < 2:
        return 0.0
    p, g = _unit(p), _unit(g)
    if p is None or g is None:
        return 0.0
    return float(np.clip(np.dot(p, g), -1.0, 1.0))


def _ranks(values):
    """Ranks with ties averaged (as scipy.stats.rankdata)."""
    values = np.asarray(values, dtype=float)
    order = np.argsort(values, kind="mergesort")
    ranks = np.empty(len(values))
    sorted_vals = values[order]
    i = 0
    while i < len(values):
        j = i
        while j + 1 < len(values) and sorted_vals[j + 1] == sorted_vals[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(preds, golds):
    return pearson(_ranks(_finite(preds, "predictions")), _ranks(_finite(golds, "gold scores")))


METRICS = {
    "accuracy": lambda p, g: {"accuracy": accuracy(p, g)},
    "matthews": lambda p, g: {"matthews": matthews_corr(p, g), "accuracy": accuracy(p, g)},
    "f1": lambda p, g: {"f1": f1_positive(p, g), "accuracy": accuracy(p, g)},
    "pearson": lambda p, g: {"pearson": pearson(p, g), "spearman": spearman(p, g)},
}


@dataclass
class Task:
    name: str
    kind: str                 # "classification", "regression", "generation" or "image"
    train: list
    evals: dict               # eval set name -> examples
    metric: str               # key of METRICS (generation: accuracy)
    labels: list = field(default_factory=list)  # class names, for classification
    unreadable_by_set: dict = field(default_factory=dict)  # image files left out when read: {"train": n, "dev": m}

    @property
    def num_labels(self):
        return 1 if self.kind == "regression" else len(self.labels)

    def score(self, preds, golds):
        values = METRICS[self.metric](preds, golds)
        bad = {k: v for k, v in values.items() if not math.isfinite(v)}
        if bad:  # json.dumps would write NaN, which no JSON reader accepts
            raise ValueError(f"{self.name}: metric(s) {bad} are not finite numbers")
        return values

    def majority_baseline(self, scored=None):
        """Each eval set's metric when always predicting the commonest training label
        (its mean for regression). `scored` ({eval set name: indices of the examples the
        metric counted}) restricts those sets to the same examples as the metric, which
        leaves out images that fail to decode at evaluation."""
        golds = [ex["label"] for ex in self.train]
        guess = float(np.mean(golds)) if self.kind == "regression" else Counter(golds).most_common(1)[0][0]
        scored = scored or {}
        unknown = sorted(set(scored) - set(self.evals))
        if unknown:
            raise ValueError(f"majority_baseline: scored names {unknown}, not eval sets of {self.name} "
                             f"({sorted(self.evals)})")
        baselines = {}
        for name, exs in self.evals.items():
            if name in scored:
                kept = sorted(set(scored[name]))
                if not kept:  # a baseline over nothing would be reported as a number
                    raise ValueError(f"majority_baseline: no example of {name!r} was scored")
                if kept[0] < 0 or kept[-1] >= len(exs):
                    raise ValueError(f"majority_baseline: {name!r} has {len(exs)} examples; "
                                     f"scored index {kept[0] if kept[0] < 0 else kept[-1]} is out of range")
                exs = [exs[i] for i in kept]
            baselines[name] = self.score([guess] * len(exs), [ex["label"] for ex in exs])
        return baselines


# ----------------------------------------------------------------------------------
# GLUE, in the original distribution's tsv layout

# task: directory, dev file, (columns of text_a, text_b, label) by header name or
# index (CoLA has no header), label names (None: regression), metric
GLUE = {
    "sst2": ("SST-2", "dev.tsv", ("sentence", None, "label"), ["0", "1"], "accuracy"),
    "cola": ("CoLA", "dev.tsv", (3, None, 1), ["0", "1"], "matthews"),
    "mrpc": ("MRPC", "dev.tsv", ("#1 String", "#2 String", "Quality"), ["0", "1"], "f1"),
    "rte": ("RTE", "dev.tsv", ("sentence1", "sentence2", "label"), ["not_entailment", "entailment"], "accuracy"),
    "stsb": ("STS-B", "dev.tsv", ("sentence1", "sentence2", "score"), None, "pearson"),
    "qnli": ("QNLI", "dev.tsv", ("question", "sentence", "label"), ["not_entailment", "entailment"], "accuracy"),
    "mnli": ("MNLI", "dev_matched.tsv", ("sentence1", "sentence2", "gold_label"),
             ["contradiction", "entailment", "neutral"], "accuracy"),
    "qqp": ("QQP", "dev.tsv", ("question1", "question2", "is_duplicate"), ["0", "1"], "f1"),
    "wnli": ("WNLI", "dev.tsv", ("sentence1", "sentence2", "label"), ["0", "1"], "accuracy"),
}


MAX_MALFORMED = 0.01  # share of rows a GLUE file may have malformed (QQP's train.tsv has a few)


def read_text(path, hint):
    """A file's text, UTF-8 with or without a byte-order mark; errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file; {hint}")
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise ValueError(f"{path}:{line}: not UTF-8 (byte {raw[e.start]:#04x} at offset {e.start}); "
                         f"convert the file to UTF-8") from None


def split_lines(text):
    """Rows of a text file: split on \\n (and \\r\\n) only. str.splitlines also splits on
    U+2028, \\x0b, \\x0c, \\x1c-\\x1e and \\x85, which may sit inside a text field."""
    rows = text.split("\n")
    if rows and rows[-1] == "":
        rows.pop()
    return [row[:-1] if row.endswith("\r") else row for row in rows]


def read_glue_tsv(path, columns, labels):
    """Rows of a GLUE tsv as {text, text_pair, label}. Rows with missing or extra
    fields or an unknown label are skipped and counted, as the common loaders do,
    unless more than 1% of the file is malformed: then it stops at the first bad
    line. Errors name the file and line."""
    path = Path(path)
    text = read_text(path, f"--data_dir must hold the GLUE layout (<data_dir>/{path.parent.name}/{path.name})")
    lines = split_lines(text)
    if not any(line.strip() for line in lines):
        raise ValueError(f"{path}: the file is empty")
    start, index, width = 0, {}, None
    if isinstance(columns[0], str):
        index = {name: i for i, name in enumerate(lines[0].split("\t"))}
        missing = [c for c in columns if c is not None and c not in index]
        if missing:
            raise ValueError(f"{path}:1: header lacks column(s) {missing}; found {list(index)}")
        start, width = 1, len(index)
    cols = [index.get(c, c) for c in columns]
    needed = max(c for c in cols if c is not None) + 1
    examples, bad = [], []
    for line_no, line in enumerate(lines[start:], start=start + 1):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) < needed or (width is not None and len(fields) > width):
            bad.append((line_no, f"expected {width or needed} tab-separated fields, found {len(fields)}"))
            continue
        raw = fields[cols[2]].strip()
        if labels is None:
            try:
                label = float(raw)
            except ValueError:
                bad.append((line_no, f"score {raw!r} is not a number"))
                continue
            if not math.isfinite(label):  # not a skippable typo: it would poison the loss or the metric
                raise ValueError(f"{path}:{line_no}: score {raw!r} is not a finite number; "
                                 f"give it a real score or delete the row")
        elif raw in labels:
            label = labels.index(raw)
        else:
            bad.append((line_no, f"unknown label {raw!r}; expected one of {labels}"))
            continue
        examples.append({"text": fields[cols[0]], "text_pair": None if cols[1] is None else fields[cols[1]],
                         "label": label})
    if bad and len(bad) > MAX_MALFORMED * (len(examples) + len(bad)):
        line_no, why = bad[0]
        raise ValueError(f"{path}:{line_no}: {why} ({len(bad)} malformed rows of {len(examples) + len(bad)})")
    if bad:
        print(f"{path}: skipped {len(bad)} malformed row(s) of {len(examples) + len(bad)} "
              f"(first at line {bad[0][0]}: {bad[0][1]})")
    if not examples:
        raise ValueError(f"{path}: no examples")
    return examples


def load_glue(task, data_dir):
    folder, dev_file, columns, labels, metric = GLUE[task]
    root = Path(data_dir) / folder
    return Task(task, "regression" if labels is None else "classification",
                read_glue_tsv(root / "train.tsv", columns, labels),
                {"dev": read_glue_tsv(root / dev_file, columns, labels)}, metric, labels or [])


# ----------------------------------------------------------------------------------
# Instruction tasks

PROMPT = ("Below is an instruction that describes a task{context}. Write a response that "
          "appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n{input}### Response:\n")


def format_prompt(example):
    """The Alpaca template used by the authors' commonsense and math scripts."""
    has_input = bool(example.get("input"))
    return PROMPT.format(context=", paired with an input that provides further context" if has_input else "",
                         instruction=example["instruction"],
                         input=f"### Input:\n{example['input']}\n\n" if has_input else "")


JSON_TYPES = {dict: "an object", list: "an array", bool: "a boolean", int: "a number", float: "a number",
              str: "a string", type(None): "null"}


def _answer_text(value, where):
    """The gold answer as the text extract_answer matches: a JSON boolean is the word
    it means (str(True) is "True", which no generated "true" matches), a number its
    digits (an integral 3.0 is "3"); null stays None for the caller's check."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float) and math.isfinite(value):  # json.loads reads NaN and Infinity too
        return str(int(value)) if value.is_integer() else repr(value)
    raise ValueError(f"{where}: answer is {JSON_TYPES.get(type(value), type(value).__name__)} "
                     f"({json.dumps(value)[:60]}); give it as a string (\"true\", \"option1\", \"B\", \"42\")")


def read_instruct_json(path, scored=False):
    """Examples of an instruction set: a JSON list of {instruction, input, output, answer};
    instruction and output strings, input a string or null (or absent), answer a string,
    boolean or number (in a set that is scored, one the scorer can read). Errors name the
    file, the item and the field."""
    path = Path(path)
    text = read_text(path, "instruction sets live at <data_dir>/<set>/train.json and test.json")
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
    except RecursionError:
        raise ValueError(f"{path}: nested too deeply to be a list of examples") from None
    if not isinstance(rows, list):
        raise ValueError(f"{path}: expected a JSON list of objects")
    if not rows:
        raise ValueError(f"{path}: no examples (an empty list)")
    examples = []
    for i, row in enumerate(rows):
        missing = [k for k in ("instruction", "output", "answer") if not isinstance(row, dict) or k not in row]
        if missing:
            raise ValueError(f"{path}: item {i} lacks {missing}; each item needs instruction, input, output, answer")
        for k in ("instruction", "input", "output"):  # anything else would be trained as its Python repr
            if row.get(k) is not None and not isinstance(row[k], str):
                raise ValueError(f"{path}: item {i}: {k} is {JSON_TYPES.get(type(row[k]), type(row[k]).__name__)} "
                                 f"({json.dumps(row[k])[:60]}); it must be a string")
        # a null input means none
        row = dict(row, input=row.get("input") or "", answer=_answer_text(row["answer"], f"{path}: item {i}"))
        empty = [k for k in ("instruction", "output", "answer") if row[k] is None] + \
            [k for k in ("instruction", "answer") if row[k] is not None and row[k].strip() == ""]
        if empty:  # str(None) would train on the text "None"
            raise ValueError(f"{path}: item {i} has a null or empty {empty}; instruction and answer need text, "
                             f"output a string")
        label = row["answer"].strip()
        if scored and not answer_correct(label, label):  # else no generated text could ever score
            raise ValueError(f"{path}: item {i}: answer {label!r} is in none of the forms the scorer reads: true or "
                             f"false, option1 / solution1 / answer1 / ending1, a letter A-E, or a number with a "
                             f"digit before any decimal point")
        examples.append({"prompt": format_prompt(row), "response": row["output"].strip(), "label": label})
    return examples


def load_instruct(data_dir, train_sets, eval_sets):
    data_dir = Path(data_dir)
    train = [ex for s in train_sets for ex in read_instruct_json(data_dir / s / "train.json")]
    evals = {s: read_instruct_json(data_dir / s / "test.json", scored=True) for s in eval_sets}
    return Task("instruct", "generation", train, evals, "accuracy")


NUMBER = re.compile(r"-?\d[\d,]*\.?\d*")


def extract_answer(text, gold):
    """The answer a generated text gives, in the form of `gold`: true/false; an option
    word (option1, solution2, answer3, ending4); a letter A-E; else the last number."""
    low = text.lower()
    if gold in ("true", "false"):
        found = re.search(r"\b(true|false)\b", low)
        return found.group(1) if found else None
    word = re.fullmatch(r"(option|solution|answer|ending)\d", gold)
    if word:
        found = re.search(rf"\b{word.group(1)}\d\b", low)
        return found.group(0) if found else None
    if re.fullmatch(r"[A-E]", gold):  # the letter after the last "answer is", else the first one
        tail = text[low.rfind("answer is"):] if "answer is" in low else text
        found = re.search(r"\b([A-E])\b", tail)
        return found.group(1) if found else None
    numbers = NUMBER.findall(text)
    return numbers[-1].replace(",", "").rstrip(".") if numbers else None


def answer_correct(text, gold):
    pred = extract_answer(text, gold)
    if pred is None:
        return False
    try:  # a gold "1,000" is the number 1000, as the prediction's separators are dropped too
        return abs(float(pred) - float(gold.replace(",", ""))) < 1e-3
    except ValueError:
        return pred == gold


# ----------------------------------------------------------------------------------
# The offline default: standard-library docstrings labelled by topic

DOCSTRING_TOPICS = {
    "text": ["string", "re", "textwrap", "difflib", "unicodedata", "codecs", "locale", "gettext", "shlex"],
    "math": ["math", "cmath", "decimal", "fractions", "random", "statistics", "numbers"],
    "files": ["os", "pathlib", "shutil", "glob", "fnmatch", "tempfile", "filecmp", "fileinput", "io", "stat"],
    "formats": ["json", "csv", "pickle", "zlib", "gzip", "bz2", "lzma", "zipfile", "tarfile", "base64",
                "binascii", "struct", "configparser", "plistlib"],
    "internet": ["socket", "ssl", "http.client", "http.server", "http.cookiejar", "urllib.request",
                 "urllib.parse", "smtplib", "ftplib", "imaplib", "poplib", "ipaddress", "email.message",
                 "email.utils", "mailbox", "socketserver"],
    "concurrency": ["threading", "multiprocessing", "concurrent.futures", "asyncio", "queue",
                    "subprocess", "sched", "selectors", "signal"],
    "time": ["datetime", "time", "calendar", "zoneinfo"],
    "containers": ["collections", "heapq", "bisect", "array", "itertools", "functools", "operator", "copy",
                   "enum", "dataclasses", "weakref", "types", "contextlib", "abc"],
    "devtools": ["unittest", "doctest", "pdb", "trace", "traceback", "inspect", "dis", "timeit", "cProfile",
                 "profile", "pstats", "logging", "warnings", "ast", "tokenize", "argparse"],
    "markup": ["xml.etree.ElementTree", "xml.dom.minidom", "xml.sax", "xml.sax.saxutils", "html",
               "html.parser", "xml.dom.pulldom"],
    "storage": ["sqlite3", "dbm", "shelve", "hashlib", "hmac", "secrets", "uuid"],
}
C_MODULES = {"os": "posix"}  # where a module's functions say they come from elsewhere


def _owned(obj, module_name):
    """Is obj defined by this module (its package, or its C accelerator _name)?"""
    owner = getattr(obj, "__module__", None) or ""
    return owner in (module_name, "_" + module_name, C_MODULES.get(module_name)) or owner.startswith(module_name + ".")


def _module_docstrings(module_name):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            module = importlib.import_module(module_name)
        except ImportError:  # a stripped-down Python may lack e.g. sqlite3
            return []
    found = [(module_name, module.__doc__)]
    for name, obj in sorted(vars(module).items()):
        if name.startswith("_") or not _owned(obj, module_name):
            continue
        if inspect.isclass(obj) or inspect.isroutine(obj):
            found.append((f"{module_name}.{name}", obj.__doc__))
        if inspect.isclass(obj):
            for attr, member in sorted(vars(obj).items()):
                # a method another library added to the class (transformers adds info_once to
                # logging.Logger) is not the module's: the task must not depend on what is imported
                foreign = getattr(member, "__module__", None) is not None and not _owned(member, module_name)
                if not attr.startswith("_") and inspect.isroutine(member) and not foreign:
                    found.append((f"{module_name}.{name}.{attr}", getattr(member, "__doc__", None)))
    return found


def load_docstrings(dev_fraction=0.2, min_chars=40, max_chars=300):
    """Docstrings labelled by topic. A docstring that appears under two topics is
    dropped, and each text appears once; the split hashes the qualified name."""
    by_text = {}
    for topic, modules in DOCSTRING_TOPICS.items():
        for module_name in modules:
            for qualname, doc in _module_docstrings(module_name):
                if not doc or len(doc.strip()) < min_chars:
                    continue
                text = " ".join(inspect.cleandoc(doc).split())[:max_chars]
                by_text.setdefault(text, set()).add((topic, qualname))
    labels = list(DOCSTRING_TOPICS)
    train, dev = [], []
    for text, owners in sorted(by_text.items()):
        topics = {topic for topic, _ in owners}
        if len(topics) > 1:
            continue
        qualname = min(q for _, q in owners)
        split = dev if zlib.crc32(qualname.encode()) % 1000 < dev_fraction * 1000 else train
        split.append({"text": text, "text_pair": None, "label": labels.index(topics.pop()), "name": qualname})
    return Task("docstrings", "classification", train, {"dev": dev}, "accuracy", labels)


# ----------------------------------------------------------------------------------

VALIDATION_SEED = 20250223  # the split must not move with --seed: every run tunes on the same examples


def split_validation(examples, count):
    """(train, val): `count` examples drawn by a fixed seed are held out for choosing
    hyperparameters, so the reported dev set is never looked at while tuning."""
    if not 0 < count < len(examples):
        raise ValueError(f"--val_examples={count}: must lie between 1 and the {len(examples) - 1} "
                         f"training examples that leave at least one to train on")
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(VALIDATION_SEED)).tolist()
    held = set(order[:count])
    return ([ex for i, ex in enumerate(examples) if i not in held], [examples[i] for i in sorted(held)])


# ----------------------------------------------------------------------------------
# Images in the ImageFolder layout: <data_dir>/train/<class>/<image>, and test/ or val/

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}


def image_examples(folder, classes):
    """([{image: path, label}] of folder/<class>/<file>, classes in the training set's
    order; the count of files whose header is unreadable, left out here and named)."""
    from PIL import Image
    examples, unreadable = [], []
    for sub in sorted(p for p in Path(folder).iterdir() if p.is_dir()):
        if sub.name not in classes:
            raise ValueError(f"{sub}: class {sub.name!r} has no folder under train/; the classes are {classes}")
        for path in sorted(p for p in sub.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()):
            try:
                with Image.open(path):  # reads the header only: cheap, catches empty and non-image files
                    pass
                examples.append({"image": str(path), "label": classes.index(sub.name)})
            except (OSError, ValueError, Image.DecompressionBombError):
                unreadable.append(str(path))
    if unreadable:
        print(f"{folder}: skipped {len(unreadable)} unreadable image(s): {', '.join(unreadable[:5])}"
              + (" ..." if len(unreadable) > 5 else ""))
    if not examples:  # for an evaluation set: no metric over nothing
        found = f"all {len(unreadable)} image files are unreadable" if unreadable else \
            f"looked for {sorted(IMAGE_SUFFIXES)} in its class folders"
        raise ValueError(f"{folder}: no images that can be read ({found}); put readable images in "
                         f"{folder}/<class>/")
    return examples, len(unreadable)


def load_images(data_dir):
    """Image classification from an ImageFolder tree: the classes are train/'s folder
    names in sorted order; the evaluation set is test/ (or val/), reported as "dev".
    Only paths are read here: images are decoded batch by batch (collate_images)."""
    root = Path(data_dir)
    layout = "--data_dir must hold train/<class>/<image> and test/<class>/<image> (or val/)"
    if not (root / "train").is_dir():
        raise FileNotFoundError(f"{root / 'train'}: no such folder; {layout}")
    classes = sorted(p.name for p in (root / "train").iterdir() if p.is_dir())
    if len(classes) < 2:
        raise ValueError(f"{root / 'train'}: found {len(classes)} class folder(s), need at least 2; {layout}")
    evaluation = next((root / name for name in ("test", "val") if (root / name).is_dir()), None)
    if evaluation is None:
        raise FileNotFoundError(f"{root}: no test/ or val/ folder; {layout}")
    (train, bad_train), (dev, bad_dev) = image_examples(root / "train", classes), image_examples(evaluation, classes)
    # a class folder with nothing readable would be a label the model never sees trained
    counts = Counter(ex["label"] for ex in train)
    empty = [str(root / "train" / name) for i, name in enumerate(classes) if not counts[i]]
    if empty:
        raise ValueError(f"{', '.join(empty)}: class folder(s) with no readable image under train/; "
                         f"add images or remove the folder(s)")
    return Task("images", "image", train, {"dev": dev}, "accuracy", classes,
                unreadable_by_set={"train": bad_train, "dev": bad_dev})


def read_images(items):
    """(PIL images, readable or not, paths that could not be decoded). A file whose
    header was fine but whose data is corrupt (truncated) becomes a black image, so
    that every batch keeps its size (every process runs the same forwards); the
    caller masks it out of the loss and the metric. Never a crash mid-epoch."""
    from PIL import Image
    images, ok, skipped = [], [], []
    for item in items:
        try:
            with Image.open(item["image"]) as image:
                images.append(image.convert("RGB"))  # decodes now: a truncated file fails here
            ok.append(True)
        except (OSError, ValueError, Image.DecompressionBombError):
            images.append(Image.new("RGB", (32, 32)))
            ok.append(False)
            skipped.append(item["image"])
    return images, ok, skipped


def collate_images(items, processor):
    """pixel_values (the model's own preprocessing), labels (-100, ignored by the loss,
    for an unreadable image), and the skipped files."""
    images, ok, skipped = read_images(items)
    return {"pixel_values": processor(images, return_tensors="pt")["pixel_values"],
            "labels": torch.tensor([it["label"] if good else -100 for it, good in zip(items, ok)]),
            "skipped": skipped}


# ----------------------------------------------------------------------------------

def load_task(task, data_dir=None, train_sets=(), eval_sets=()):
    if task == "docstrings":
        return load_docstrings()
    if task == "images":
        if data_dir is None:
            raise ValueError("task images needs --data_dir, a folder with train/<class>/<image> and test/<class>/<image>")
        return load_images(data_dir)
    if task in GLUE:
        if data_dir is None:
            raise ValueError(f"task {task} needs --data_dir, a folder in the GLUE layout ({GLUE[task][0]}/train.tsv)")
        return load_glue(task, data_dir)
    if task == "instruct":
        if data_dir is None or not train_sets:
            raise ValueError("task instruct needs --data_dir and --train_sets (e.g. --train_sets=boolq,piqa)")
        return load_instruct(data_dir, train_sets, eval_sets or train_sets)
    raise ValueError(f"unknown task {task!r}; choose one of {TASKS}")


TASKS = ("docstrings", *GLUE, "instruct", "images")


def encode_classification(examples, tokenizer, max_len):
    """Token ids per example (text, optional pair), its segment ids when the
    tokenizer makes them for its model (BERT-style pairs), and its label."""
    segments = "token_type_ids" in getattr(tokenizer, "model_input_names", ())
    out = []
    for ex in examples:
        enc = tokenizer(ex["text"], ex["text_pair"], truncation=True, max_length=max_len)
        item = {"input_ids": enc["input_ids"], "label": ex["label"]}
        if segments and "token_type_ids" in enc:
            item["token_type_ids"] = enc["token_type_ids"]
        out.append(item)
    return out


def encode_generation(examples, tokenizer, max_len, warn=True):
    """Prompt + response + eos; labels mask the prompt (-100) so only the response is
    learned. Examples whose response is cut by max_len are counted; those with no
    response token left are dropped (they would teach nothing, and a batch of them
    has no loss)."""
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
    out, cut, gone = [], 0, 0
    for ex in examples:
        prompt = tokenizer(ex["prompt"], add_special_tokens=False)["input_ids"]
        response = tokenizer(" " + ex["response"], add_special_tokens=False)["input_ids"] + [eos]
        bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
        ids = (bos + prompt + response)[:max_len]
        labels = ([-100] * (len(bos) + len(prompt)) + response)[:max_len]
        if len(bos) + len(prompt) + len(response) > max_len:
            cut += 1
        if all(label == -100 for label in labels):
            gone += 1
            continue
        out.append({"input_ids": ids, "labels": labels})
    if cut and warn:
        n = len(examples)
        print(f"warning: --max_len={max_len} cuts the response of {cut} of {n} training examples ({100 * cut / n:.1f}%); "
              f"{gone} ({100 * gone / n:.1f}%) keep no response token and are left out. Raise --max_len to keep them.")
    if not out:
        raise ValueError(f"--max_len={max_len} leaves no response token in any training example; raise it")
    return out


def collate(items, pad_id, regression=False):
    """Right-padded batch: input_ids, attention_mask, token_type_ids when the items
    have them, and labels."""
    width = max(len(it["input_ids"]) for it in items)
    ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    for row, it in enumerate(items):
        ids[row, :len(it["input_ids"])] = torch.tensor(it["input_ids"])
        mask[row, :len(it["input_ids"])] = 1
    batch = {"input_ids": ids, "attention_mask": mask}
    if "token_type_ids" in items[0]:
        segments = torch.zeros((len(items), width), dtype=torch.long)
        for row, it in enumerate(items):
            segments[row, :len(it["token_type_ids"])] = torch.tensor(it["token_type_ids"])
        batch["token_type_ids"] = segments
    if "labels" in items[0]:  # token labels for causal LM
        labels = torch.full((len(items), width), -100, dtype=torch.long)
        for row, it in enumerate(items):
            labels[row, :len(it["labels"])] = torch.tensor(it["labels"])
        batch["labels"] = labels
    else:
        batch["labels"] = torch.tensor([it["label"] for it in items],
                                       dtype=torch.float if regression else torch.long)
    return batch
