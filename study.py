"""
The comparison study: GOAT against every baseline on all-MiniLM-L6-v2, each method
tuned by the same rule on held-out training data, several seeds, intervals.

    python study.py                     # run what is missing (resumable), then report
    python study.py --report_only       # every table and plot from results/study/ alone
    python study.py --next              # the runs the plan would start now
    python study.py --report_only --readme README.md   # and the README's copy of the report

Parts, in the order they run (later parts need the learning rates chosen earlier):
1. tune: seed 0 of every method over its learning-rate grid (GOAT: lr x eta) on
   every task, trained on the training data minus a fixed validation split.
   One setting per method across tasks, the best mean validation score; the grid
   grows around its best setting until every neighbour of it has run.
2. seeds: seeds 1 and 2 at each method's chosen setting (seed 0 is its tuning run).
3. full-moe: the upcycled full MoE (8 full copies of every Linear) on SST-2, at
   full fine-tuning's chosen lr, seeds 0 and 1; every method's loss curve against it.
4. ablation: GOAT's parts on CoLA (scaling, SVD inits, residual, no mixture), seeds 0-2,
   at GOAT's chosen setting; and GOAT, MoLoRA and LoRA at their best CoLA validation
   setting where it differs from the one they use for all tasks (seeds 1-2; seed 0 ran).
5. rank8: total rank 8 (8 experts of rank 1), LoRA / MoLoRA / GOAT on CoLA, seeds 0-2.

Each run is `python train.py ...` in a subprocess with one thread (results depend
on the thread count); its small result file (metrics, flags, loss curve, expert
load, seconds, code commit) goes to results/study/runs/ and is never rewritten,
so the study continues on a fresh machine where it stopped. The report
(results/study.md and results/study_*.png) is computed from those files alone.
"""
import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent

# task: (training examples, None for all; validation examples held out of the training file)
TASKS = {"docstrings": (None, 400), "sst2": (4000, 1000), "cola": (None, 1000)}
TASK_NAMES = {"docstrings": "docstrings acc", "sst2": "SST-2 acc", "cola": "CoLA mcc"}
COMMON = ["--epochs=3", "--batch_size=32", "--rank=32", "--alpha=64", "--warmup=0.06", "--balance_coef=1e-3",
          "--lora_dropout=0.05", "--max_len=128", "--grad_clip=1.0", "--log_every=5", "--ckpt_every=1000000"]
LR_LADDER = [1e-7, 3e-7, 1e-6, 3e-6, 1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3]  # about x3 apart
ETA_LADDER = [1e-8, 1e-7, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0, 1e3]  # wide: ends are never reached
SEEDS = (0, 1, 2)


@dataclass
class Method:
    flags: list
    lrs: list                                   # the starting grid, extended at an edge
    etas: list = field(default_factory=list)    # GOAT's second axis (paper scaling's eta)


METHODS = {  # headline methods; all adapters at total rank 32 (alpha 64)
    "full": Method(["--method=full"], [3e-5, 1e-4, 3e-4]),
    "lora": Method(["--method=lora"], [3e-4, 1e-3, 3e-3]),
    "pissa": Method(["--method=pissa"], [1e-4, 3e-4, 1e-3]),
    "milora": Method(["--method=milora"], [3e-4, 1e-3, 3e-3]),
    "molora": Method(["--method=molora"], [3e-4, 1e-3, 3e-3]),
    "goat": Method(["--method=goat"], [1e-4, 3e-4, 1e-3], [0.1, 1.0, 10.0]),  # paper scaling s = sqrt(3 eta n / d)
    "goat (alpha)": Method(["--method=goat", "--scaling=alpha"], [1e-4, 3e-4, 1e-3]),  # authors' scripts: s = 16
}
# Ablations of GOAT on one task at GOAT's chosen (lr, eta): each changes one part.
ABLATION_TASK = "cola"
ABLATIONS = {
    "no scaling (s = alpha/r = 2)": ["--method=goat", "--scaling=2"],
    "no SVD init (lora init)": ["--method=goat", "--init=lora"],
    "principal init (top r)": ["--method=goat", "--init=pissa"],
    "minor init (bottom r)": ["--method=goat", "--init=milora"],
    "segment bottoms (goat_mini)": ["--method=goat", "--init=goat_mini"],
    "residual c = 0 (W_res = W0)": ["--method=goat", "--init_cof=0"],
    "residual c = 1 (PiSSA-style)": ["--method=goat", "--init_cof=1"],
    "one LoRA on GOAT's segments": ["--method=goat", "--experts=1", "--top_k=1", "--segments=8", "--init_cof=1"],
}
# GOAT and the baselines of the paired differences, also at their best setting for the ablation
# task alone (chosen on its validation split): is a gap there GOAT's parts, or the shared setting?
PER_TASK = ("goat", "molora", "lora")
# The head (trained in full by every adapter method) alone, at GOAT's chosen lr: a LoRA whose
# scale s = 1e-9 leaves the encoder as it is. GOAT's second knob (eta) lets its head learn at a
# learning rate its adapters could not take; this says how much of its score the head carries.
HEAD_ONLY = ("head only", ["--method=lora", "--scaling=1e-9"])
RANK8_TASK = "cola"
RANK8 = {  # the paper's image-classification regime: rank 8, alpha 16, 8 experts of rank 1
    "lora r8": ("lora", ["--method=lora", "--rank=8", "--alpha=16"]),
    "molora r8": ("molora", ["--method=molora", "--rank=8", "--alpha=16"]),
    "goat r8": ("goat", ["--method=goat", "--rank=8", "--alpha=16"]),
}
FULL_MOE_TASK = "sst2"


@dataclass(frozen=True)
class Run:
    part: str
    task: str
    label: str
    lr: float
    seed: int
    eta: float = None
    flags: tuple = ()

    @property
    def id(self):
        slug = "".join(c if c.isalnum() else "-" for c in self.label).strip("-")
        while "--" in slug:
            slug = slug.replace("--", "-")
        eta = "" if self.eta is None else f"_eta{self.eta:g}"
        return f"{self.task}_{slug}_lr{self.lr:g}{eta}_s{self.seed}"

    def argv(self, data_dir, out_dir):
        train_n, val_n = TASKS[self.task]
        argv = [f"--task={self.task}", f"--data_dir={data_dir}", f"--val_examples={val_n}", f"--seed={self.seed}",
                f"--lr={self.lr:g}", f"--out_dir={out_dir}", *COMMON, *self.flags]
        if train_n:
            argv.append(f"--max_train_examples={train_n}")
        if self.eta is not None:
            argv.append(f"--eta={self.eta:g}")
        return argv


# ---------------------------------------------------------------------------------
# The plan: which runs exist, which are due, and what was chosen


def load_results(results_dir):
    runs = {}
    for path in sorted((Path(results_dir) / "runs").glob("*.json")):
        result = json.loads(path.read_text())
        runs[result["id"]] = result
    return runs


def val_score(result):
    """Validation metric of a run; a diverged run ranks below every finished one."""
    return result["val"] if result.get("status") == "ok" else -math.inf


def neighbour(ladder, value, step):
    i = min(range(len(ladder)), key=lambda j: abs(math.log(ladder[j] / value)))
    j = i + step
    return ladder[j] if 0 <= j < len(ladder) else None


# Candidate invariants of GOAT's (lr, eta) grid: lr x eta^p
INVARIANTS = {1.0: "Thm. 3.5, derived for SGD: eta x lr", 0.25: "AdamW: its steps ignore the gradient's scale, so "
              "s B A moves by about lr x sqrt(s), and s grows as sqrt(eta)", 0.0: "the learning rate alone"}


def explained_by(points, power):
    """R^2 of a quadratic in log10(lr * eta**power) fitted to [(lr, eta, score)]: 1 when
    that one number decides the score, low when the grid does not collapse onto it."""
    import numpy as np
    x = np.log10([lr * eta ** power for lr, eta, _ in points])
    y = np.array([score for *_, score in points])
    residual = y - np.polyval(np.polyfit(x, y, 2), x)
    return float(1 - (residual ** 2).sum() / max(((y - y.mean()) ** 2).sum(), 1e-12))


def tuning(label, results):
    """(runs of the current grid, chosen (lr, eta) or None while the grid is incomplete,
    the grid's mean validation score per (lr, eta)). The grid grows around its best
    setting until every neighbour of it (one ladder step along each axis, diagonals
    too) has run, so the chosen setting is never on the grid's edge; every setting
    that has run for all tasks counts, also one outside the starting grid."""
    method = METHODS[label]
    flags = tuple(method.flags)
    points = {(lr, eta) for lr in method.lrs for eta in (method.etas or [None])}
    finished = {}
    for record in results.values():
        if record.get("part") == "tune" and record.get("label") == label:
            finished.setdefault((record["lr"], record["eta"]), set()).add(record["task"])
    points |= {point for point, tasks in finished.items() if tasks >= set(TASKS)}
    while True:
        grid = [Run("tune", task, label, lr, 0, eta, flags)
                for lr, eta in sorted(points, key=lambda p: (p[0], p[1] or 0)) for task in TASKS]
        if any(r.id not in results for r in grid):
            return grid, None, None
        means = {}
        for lr, eta in points:
            scores = [val_score(results[Run("tune", t, label, lr, 0, eta).id]) for t in TASKS]
            means[(lr, eta)] = statistics.mean(scores) if all(map(math.isfinite, scores)) else -math.inf
        lr, eta = max(means, key=means.get)
        around = {(lr_, eta_) for lr_ in ladder_around(LR_LADDER, lr)
                  for eta_ in (ladder_around(ETA_LADDER, eta) if eta is not None else [None])}
        if around <= points:
            return grid, (lr, eta), means
        points |= around


def finished_means(label, results):
    """Mean validation score of each setting of `label` that has run for every task."""
    means = {}
    for record in results.values():
        if record.get("part") == "tune" and record.get("label") == label:
            point = (record["lr"], record["eta"])
            scores = [results.get(Run("tune", t, label, point[0], 0, point[1]).id) for t in TASKS]
            if all(scores):
                values = [val_score(r) for r in scores]
                means[point] = statistics.mean(values) if all(map(math.isfinite, values)) else -math.inf
    return means


def ladder_around(ladder, value):
    """value and its neighbours on the ladder (fewer at the ladder's ends)."""
    return [x for x in (neighbour(ladder, value, -1), value, neighbour(ladder, value, 1)) if x is not None]


PAPER_ETA = 1.0  # the paper's eta for encoders and ViT


def paper_eta_lr(results):
    """The best lr on GOAT's grid at the paper's eta (None while GOAT is tuning): seeded
    next to the chosen setting, it decides train.py's default (the paper's eta stays
    unless the chosen setting is better over the same tasks and seeds)."""
    if "goat" not in METHODS:
        return None
    _, pick, means = tuning("goat", results)
    at_paper_eta = {lr: v for (lr, eta), v in (means or {}).items() if eta == PAPER_ETA}
    return max(at_paper_eta, key=at_paper_eta.get) if pick and at_paper_eta else None


def task_best(label, task, results):
    """The setting on `label`'s tuning grid with the best validation score on `task` alone
    (seed 0): what the method could do there with a setting of its own for that task."""
    scores = {(r["lr"], r["eta"]): val_score(r) for r in results.values()
              if r.get("part") == "tune" and r.get("label") == label and r.get("task") == task}
    scores = {point: v for point, v in scores.items() if math.isfinite(v)}
    return max(scores, key=scores.get) if scores else None


def plan(results):
    """Every run the study needs given what has finished, in priority order: tuning,
    then the headline seeds (and GOAT at the paper's eta), the full MoE, the ablations
    and the rank-8 regime."""
    runs, chosen = [], {}
    for label in METHODS:
        grid, pick, _ = tuning(label, results)
        runs += grid
        if pick:
            chosen[label] = pick
    seeds = [Run("seeds", t, label, lr, s, eta, tuple(METHODS[label].flags))
             for label, (lr, eta) in chosen.items() for s in SEEDS[1:] for t in TASKS]
    paper_lr = paper_eta_lr(results)
    if paper_lr is not None:  # its neighbours at the paper's eta run too: its best lr is never on an edge
        runs += [Run("tune", t, "goat", lr, 0, PAPER_ETA, tuple(METHODS["goat"].flags))
                 for lr in ladder_around(LR_LADDER, paper_lr) for t in TASKS]
        seeds += [Run("seeds", t, "goat", paper_lr, s, PAPER_ETA, tuple(METHODS["goat"].flags))
                  for s in SEEDS[1:] for t in TASKS]
    if "goat" in chosen:
        seeds += [Run("control", t, HEAD_ONLY[0], chosen["goat"][0], s, None, tuple(HEAD_ONLY[1]))
                  for s in SEEDS for t in TASKS]
    # GOAT, the head-only control (it qualifies GOAT's setting) and the methods of the paired
    # differences first: a study cut short still compares them
    first = ["goat", HEAD_ONLY[0], "molora", "lora", "full"]
    runs += sorted(seeds, key=lambda r: first.index(r.label) if r.label in first else len(first))
    if "full" in chosen:
        runs += [Run("full-moe", FULL_MOE_TASK, "full-moe", chosen["full"][0], s, None, ("--method=full-moe",))
                 for s in SEEDS[:2]]
    if "goat" in chosen:
        lr, eta = chosen["goat"]
        runs += [Run("ablation", ABLATION_TASK, label, lr, s, eta, tuple(flags))
                 for s in SEEDS for label, flags in ABLATIONS.items()]
    for label in PER_TASK:  # one setting for all tasks may cost a method the ablation task: its own setting there
        tuned = label in chosen and all(r.id in results for r in runs
                                        if r.part == "tune" and r.label == label and r.task == ABLATION_TASK)
        best = task_best(label, ABLATION_TASK, results) if tuned else None
        if best is not None and best != chosen[label]:  # seed 0 is the tuning run
            runs += [Run("ablation", ABLATION_TASK, label, best[0], s, best[1], tuple(METHODS[label].flags))
                     for s in SEEDS[1:]]
    for label, (base, flags) in RANK8.items():
        if base in chosen:
            lr, eta = chosen[base]
            runs += [Run("rank8", RANK8_TASK, label, lr, s, eta, tuple(flags)) for s in SEEDS]
    unique = {}
    for run in runs:  # GOAT's chosen setting may be the paper's eta: each run once
        unique.setdefault(run.id, run)
    return list(unique.values()), chosen


# ---------------------------------------------------------------------------------
# Running


def summarise(run, argv, out_dir, seconds, returncode, log_tail, commit):
    """The small, committed record of one run."""
    record = {"id": run.id, "part": run.part, "task": run.task, "label": run.label, "lr": run.lr, "eta": run.eta,
              "seed": run.seed, "argv": argv[:], "seconds": round(seconds, 1), "threads": 1, "commit": commit}
    record["argv"] = [a for a in argv if not a.startswith(("--out_dir", "--data_dir"))]
    result_path = out_dir / "result.json"
    if returncode != 0 or not result_path.exists():
        diverged = any(word in log_tail.lower() for word in ("non-finite", "nan", "inf loss", "diverged"))
        record.update(status="diverged" if diverged else "failed", log_tail=log_tail[-2000:])
        return record
    result = json.loads(result_path.read_text())
    metric = result["main_metric"]
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rows = [r for r in rows if "task_loss" in r]
    curve = [[r["step"], round(r["task_loss"], 5)] for r in rows]
    finite = all(math.isfinite(loss) for _, loss in curve)
    record.update(status="ok" if finite else "diverged", metric=metric,
                  val=result["metrics"]["val"][metric], dev=result["metrics"]["dev"][metric],
                  majority={k: v[metric] for k, v in (result.get("majority_baseline") or {}).items()},
                  steps=result["steps"], train_examples=result["train_examples"],
                  trainable_params=result["trainable_params"], loss_curve=curve,
                  expert_load=rows[-1].get("expert_load") if rows else None)
    return record


def execute(run, args, commit):
    out_dir, log_path = Path(args.runs_dir) / run.id, Path(args.runs_dir) / f"{run.id}.log"
    shutil.rmtree(out_dir, ignore_errors=True)  # scratch: a run interrupted earlier starts again
    log_path.parent.mkdir(parents=True, exist_ok=True)
    argv = run.argv(args.data_dir, out_dir) + ([f"--model={args.model}"] if args.model else [])
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    t0 = time.time()
    with open(log_path, "w") as log:
        code = subprocess.call([sys.executable, str(Path(args.code_dir) / "train.py"), *argv],
                               stdout=log, stderr=subprocess.STDOUT, env=env, cwd=args.code_dir)
    tail = log_path.read_text(errors="replace")[-4000:]
    record = summarise(run, argv, out_dir, time.time() - t0, code, tail, commit)
    for heavy in ("ckpt.pt", "model.safetensors", "adapter.safetensors"):  # the record is what is kept
        (out_dir / heavy).unlink(missing_ok=True)
    if record["status"] == "failed":
        return record  # a bug, not a result: reported, never written, retried on the next start
    path = Path(args.results_dir) / "runs" / f"{run.id}.json"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(record, separators=(",", ":")) + "\n")
    os.replace(tmp, path)
    return record


def run_study(args):
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=args.code_dir,
                            capture_output=True, text=True).stdout.strip() or "unknown"
    (Path(args.results_dir) / "runs").mkdir(parents=True, exist_ok=True)
    failed, running = set(), {}
    with ThreadPoolExecutor(args.workers) as pool:
        while True:
            results = load_results(args.results_dir)
            due = [r for r in plan(results)[0] if r.id not in results and r.id not in failed
                   and r.id not in {x.id for x in running.values()}]
            for run in due[:args.workers - len(running)]:
                print(f"start {run.part:8} {run.id}", flush=True)
                running[pool.submit(execute, run, args, commit)] = run
            if not running:
                break
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in finished:
                run, record = running.pop(future), future.result()
                score = f"val {record['val']:.4f} dev {record['dev']:.4f}" if record["status"] == "ok" else ""
                print(f"done  {run.part:8} {run.id}: {record['status']} {score} in {record['seconds']:.0f}s", flush=True)
                if record["status"] == "failed":
                    failed.add(run.id)
                    print(record["log_tail"][-1500:], flush=True)
    if failed:
        print(f"{len(failed)} run(s) failed (not recorded): {sorted(failed)}")


# ---------------------------------------------------------------------------------
# Report: tables and plots from the result files alone

T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
        2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042]


def t_interval(values):
    """Mean and half-width of the two-sided 95% Student t interval (None for fewer than 2 values)."""
    mean = statistics.mean(values)
    if len(values) < 2:
        return mean, None
    df = len(values) - 1
    t = T975[df - 1] if df <= len(T975) else 1.96
    return mean, t * statistics.stdev(values) / math.sqrt(len(values))


def fmt_mean_std(values):
    if not values:
        return "-"
    spread = f" ± {statistics.stdev(values) * 100:.1f}" if len(values) > 1 else ""
    return f"{statistics.mean(values) * 100:.1f}{spread}"


def fmt_interval(values):
    mean, half = t_interval(values)
    return f"{mean * 100:+.1f}" + (f" [{(mean - half) * 100:+.1f}, {(mean + half) * 100:+.1f}]" if half is not None else "")


def lr_text(lr, eta=None):
    return f"{lr:g}" + ("" if eta is None else f", eta {eta:g}")


class Study:
    """The finished runs, indexed; every table is a method of this."""

    def __init__(self, results):
        self.results = results
        self.runs, self.chosen = plan(results)

    def get(self, task, label, lr, seed, eta=None):
        result = self.results.get(Run("", task, label, lr, seed, eta).id)
        return result if result and result["status"] == "ok" else None

    def setting(self, label):
        """(lr, eta) a label ran at in the later parts: its own choice, or its base method's."""
        if label in self.chosen:
            return self.chosen[label]
        if label == "full-moe":
            return (self.chosen["full"][0], None) if "full" in self.chosen else None
        base = RANK8[label][0] if label in RANK8 else "goat"
        return self.chosen.get(base)

    def finished(self, task, label, seeds=SEEDS):
        """{seed: result} of a label's runs at its setting."""
        setting = self.setting(label)
        if setting is None:
            return {}
        found = {s: self.get(task, label, setting[0], s, setting[1]) for s in seeds}
        return {s: r for s, r in found.items() if r}

    def dev_scores(self, task, label, lr, eta, seeds=SEEDS):
        """{seed: dev metric} of the runs that finished at (lr, eta)."""
        found = {s: self.get(task, label, lr, s, eta) for s in seeds}
        return {s: r["dev"] for s, r in found.items() if r}

    def headline(self):
        lines = ["| method | lr (grid) | " + " | ".join(TASK_NAMES[t] for t in TASKS) + " | avg |",
                 "|---|---|" + "---|" * (len(TASKS) + 1)]
        for label in METHODS:
            grid, pick, means = tuning(label, self.results)
            lrs = sorted({r.lr for r in grid})
            etas = sorted({r.eta for r in grid if r.eta is not None})
            grid_text = ", ".join(f"{x:g}" for x in lrs) + (f"; eta {', '.join(f'{e:g}' for e in etas)}" if etas else "")
            if not pick:
                lines.append(f"| {label} | tuning ({grid_text}) |" + " - |" * (len(TASKS) + 1))
                continue
            cells, means_task = [], []
            for task in TASKS:
                scores = list(self.dev_scores(task, label, *pick).values())
                cells.append(fmt_mean_std(scores))
                if scores:
                    means_task.append(statistics.mean(scores))
            avg = f"{statistics.mean(means_task) * 100:.1f}" if len(means_task) == len(TASKS) else "-"
            lines.append(f"| {label} | **{lr_text(*pick)}** ({grid_text}) | " + " | ".join(cells) + f" | {avg} |")
        majority = []
        for task in TASKS:
            any_run = next((r for r in self.results.values() if r["task"] == task and r.get("majority")), None)
            majority.append(f"{any_run['majority']['dev'] * 100:.1f}" if any_run else "-")
        lines.append("| majority class | | " + " | ".join(majority) + " | |")
        seeds = {label: min(len(self.dev_scores(t, label, *self.chosen[label])) for t in TASKS)
                 for label in self.chosen}
        lines.append("\nDev metric x100, mean ± standard deviation over seeds at the chosen setting "
                     f"(seeds finished per method: {', '.join(f'{k} {v}' for k, v in seeds.items())}).")
        return "\n".join(lines)

    def paired(self, label, others):
        """GOAT minus each baseline, paired by (task, seed), with 95% t intervals."""
        lines = [f"| {label} minus | " + " | ".join(TASKS) + " | all tasks and seeds |",
                 "|---|" + "---|" * (len(TASKS) + 1)]
        if label not in self.chosen:
            return ""
        mine = {t: self.dev_scores(t, label, *self.chosen[label]) for t in TASKS}
        for other in others:
            if other not in self.chosen:
                continue
            theirs = {t: self.dev_scores(t, other, *self.chosen[other]) for t in TASKS}
            diffs = {t: [mine[t][s] - theirs[t][s] for s in SEEDS if s in mine[t] and s in theirs[t]] for t in TASKS}
            pooled = [d for t in TASKS for d in diffs[t]]
            if not pooled:
                continue
            lines.append(f"| {other} | " + " | ".join(fmt_interval(diffs[t]) if diffs[t] else "-" for t in TASKS)
                         + f" | {fmt_interval(pooled)} (n={len(pooled)}) |")
        lines.append("\nDev metric x100: mean paired difference [95% Student t interval]; per task over seeds, "
                     "and pooled over every (task, seed) pair.")
        return "\n".join(lines)

    def tuning_tables(self):
        tables = {}
        for label in METHODS:
            _, pick, means = tuning(label, self.results)
            tables[label] = pick, means or finished_means(label, self.results)  # while tuning: what has run
        columns = sorted({lr for _, means in tables.values() for lr, _ in means})
        lines = ["| method | " + " | ".join(f"lr {x:g}" for x in columns) + " |",
                 "|---|" + "---|" * len(columns)]
        goat_rows = []
        for label, (pick, means) in tables.items():
            if not means:
                continue
            for eta in sorted({e for _, e in means}, key=lambda e: -1 if e is None else e):
                name = label if eta is None else f"{label}, eta {eta:g}"
                cells = []
                for lr in columns:
                    value = means.get((lr, eta))
                    text = "-" if value is None else ("diverged" if not math.isfinite(value) else f"{value * 100:.1f}")
                    cells.append(f"**{text}**" if (lr, eta) == pick else text)
                (goat_rows if eta is not None else lines).append(f"| {name} | " + " | ".join(cells) + " |")
        lines += goat_rows
        lines.append("\nMean validation metric x100 over the tasks (seed 0); bold: the chosen setting (none "
                     "yet for a method still tuning).")
        return "\n".join(lines)

    def eta_lr_agreement(self):
        """Does GOAT's best eta x lr equal full fine-tuning's best lr (Thm. 3.5)?"""
        if "goat" not in METHODS or "full" not in self.chosen:
            return ""
        means = tuning("goat", self.results)[2] or finished_means("goat", self.results)
        if not means:
            return ""
        by_product = {}
        for (lr, eta), value in means.items():
            by_product.setdefault(round(math.log10(lr * eta), 1), []).append((value, lr, eta))
        if "goat" in self.chosen:
            lr, eta = self.chosen["goat"]
            best = f"GOAT's best setting: lr {lr:g}, eta {eta:g}, so eta x lr = {lr * eta:g}"
        else:
            best = "GOAT is still tuning (the settings run so far below)"
        lines = [f"{best}; full fine-tuning's best lr: {self.chosen['full'][0]:g}. Settings with the same eta x lr "
                 "(Thm. 3.5 says they train alike under SGD), mean validation x100:"]
        for key in sorted(by_product):
            points = sorted(by_product[key], key=lambda p: p[1])
            if len(points) > 1:
                lines.append(f"- eta x lr = {10 ** key:.1g}: " + ", ".join(
                    f"(lr {lr_:g}, eta {eta_:g}) {v * 100:.1f}" for v, lr_, eta_ in points))
        points = [(lr_, eta_, v) for (lr_, eta_), v in means.items() if math.isfinite(v)]
        if len(points) >= 6:
            fits = {power: explained_by(points, power) for power in INVARIANTS}
            lines.append("\nWhich single number decides GOAT's score over the whole grid: R^2 of a quadratic in "
                         "log10(lr x eta^p) fitted to every (lr, eta) point (1: that number alone decides):")
            lines += [f"- p = {power:g} ({why}): R^2 {fits[power]:.2f}" for power, why in INVARIANTS.items()]
        return "\n".join(lines)

    def curve(self, result, window=10):
        losses = [loss for _, loss in result["loss_curve"]]
        return [statistics.mean(losses[max(0, i - window + 1):i + 1]) for i in range(len(losses))]

    def full_moe(self):
        if "full" not in self.chosen:
            return ""
        lr = self.chosen["full"][0]
        moe = self.finished(FULL_MOE_TASK, "full-moe", SEEDS[:2])
        if not moe:
            return ""
        lines = [f"full-moe on {FULL_MOE_TASK} (lr {lr:g}): dev {fmt_mean_std([r['dev'] for r in moe.values()])} "
                 f"over seeds {sorted(moe)}.\n",
                 "| method | dev x100 (same seeds) | mean gap to full-moe's loss curve | first-half mean loss |",
                 "|---|---|---|---|"]
        for label in ["full-moe", *self.chosen]:
            gaps, early, devs = [], [], []
            for seed, ref in moe.items():
                mine = self.finished(FULL_MOE_TASK, label, [seed]).get(seed)
                if not mine:
                    continue
                a, b = self.curve(mine), self.curve(ref)
                devs.append(mine["dev"])
                early.append(statistics.mean(a[:len(a) // 2]))
                if label != "full-moe":
                    gaps += [abs(x - y) for x, y in zip(a, b)]
            if devs:
                gap = f"{statistics.mean(gaps):.4f}" if gaps else "-"
                lines.append(f"| {label} | {fmt_mean_std(devs)} | {gap} | {statistics.mean(early):.4f} |")
        lines.append("\nLoss curves: training loss every 5 steps, smoothed over 10 points, averaged over the "
                     "steps; the gap is the mean absolute difference to full-moe's curve at the same steps and seed.")
        return "\n".join(lines)

    def variant_table(self, task, rows, reference):
        """rows: [(label shown, run label, lr, eta[, seeds])]; differences to `reference` paired by seed."""
        ref = self.dev_scores(task, *reference)
        lines = [f"| variant | dev x100 | seeds | minus {reference[0]} [95% CI] |", "|---|---|---|---|"]
        for shown, label, lr, eta, *seeds in rows:
            scores = self.dev_scores(task, label, lr, eta, *seeds)
            if not scores:
                lines.append(f"| {shown} | - | - | - |")
                continue
            diffs = [scores[s] - ref[s] for s in scores if s in ref]
            diff = fmt_interval(diffs) if diffs and (label, lr, eta) != tuple(reference) else ""
            lines.append(f"| {shown} | {fmt_mean_std(list(scores.values()))} | {','.join(map(str, scores))} | {diff} |")
        return "\n".join(lines)

    def init_at_one_setting(self):
        """GOAT with the authors' scaling against MoLoRA, where both chose the same lr: the
        same layer, experts, routing, scale s = alpha / d and schedule; only the init differs."""
        if "goat (alpha)" not in self.chosen or self.chosen.get("molora") != self.chosen["goat (alpha)"]:
            return ""
        return (f"Both chose lr {self.chosen['molora'][0]:g}; at it the two differ only in the init (GOAT's SVD "
                f"segments with the residual W_res against LoRA's random A, zero B). Read after the plan was "
                f"made (both rows were in it, this question was not).\n\n" + self.paired("goat (alpha)", ["molora"]))

    def default_diffs(self):
        """Dev scores of GOAT's chosen setting minus the paper's eta, paired by task and seed."""
        lr, eta = self.chosen["goat"]
        paper_lr, diffs = paper_eta_lr(self.results), []
        for task in TASKS:
            mine, paper = self.dev_scores(task, "goat", lr, eta), self.dev_scores(task, "goat", paper_lr, PAPER_ETA)
            diffs += [mine[s] - paper[s] for s in mine if s in paper]
        return diffs

    def goat_default(self):
        """(lr, eta) train.py's GOAT default should be, or None while undecided: the paper's
        eta unless the chosen setting is better over every task and seed (the paired 95%
        interval above 0)."""
        paper_lr = paper_eta_lr(self.results)
        if paper_lr is None or len(self.default_diffs()) < len(TASKS) * len(SEEDS):
            return None
        mean, half = t_interval(self.default_diffs())
        return self.chosen["goat"] if mean - half > 0 else (paper_lr, PAPER_ETA)

    def default_choice(self):
        """train.py's default for GOAT: the paper's eta unless the chosen setting beats it
        over the same tasks and seeds (the 95% interval of the paired difference above 0)."""
        paper_lr = paper_eta_lr(self.results)
        if paper_lr is None:
            return ""
        lr, eta = self.chosen["goat"]
        rows, diffs = [], self.default_diffs()
        for task in TASKS:
            mine, paper = self.dev_scores(task, "goat", lr, eta), self.dev_scores(task, "goat", paper_lr, PAPER_ETA)
            rows.append(f"| {TASK_NAMES[task]} | {fmt_mean_std(list(mine.values()))} | "
                        f"{fmt_mean_std(list(paper.values()))} |")
        lines = [f"| task | chosen: {lr_text(lr, eta)} | paper's eta: {lr_text(paper_lr, PAPER_ETA)} |",
                 "|---|---|---|", *rows, ""]
        if (lr, eta) == (paper_lr, PAPER_ETA):
            lines.append("The chosen setting is the paper's eta: train.py's default.")
        elif self.goat_default() is not None:
            verdict = (f"the chosen setting is better, so train.py's default should become lr {lr:g}, eta {eta:g}"
                       if self.goat_default() == (lr, eta) else f"not shown better, so train.py's default should "
                       f"stay the paper's eta {PAPER_ETA:g}, with lr {paper_lr:g}")
            lines.append(f"Chosen minus paper's eta, paired by task and seed: {fmt_interval(diffs)}: {verdict}.")
        else:
            lines.append(f"Paired differences so far: {len(diffs)} of {len(TASKS) * len(SEEDS)}; the default "
                         "is decided when all have run.")
        return "\n".join(lines)

    def head_only(self):
        """GOAT at its chosen setting against the head alone at the same lr, paired by task and seed."""
        if "goat" not in self.chosen:
            return ""
        lr, eta = self.chosen["goat"]
        lines = [f"| task | GOAT ({lr_text(lr, eta)}) | head only (lr {lr:g}) | GOAT minus head only [95% CI] |",
                 "|---|---|---|---|"]
        pooled = []
        for task in TASKS:
            mine, head = self.dev_scores(task, "goat", lr, eta), self.dev_scores(task, HEAD_ONLY[0], lr, None)
            diffs = [mine[s] - head[s] for s in mine if s in head]
            pooled += diffs
            lines.append(f"| {TASK_NAMES[task]} | {fmt_mean_std(list(mine.values()))} | "
                         f"{fmt_mean_std(list(head.values()))} | {fmt_interval(diffs) if diffs else '-'} |")
        lines.append(f"\nDev metric x100; the head alone: a LoRA with s = 1e-9 (the encoder stays as it is, the "
                     f"classification head trains in full). Pooled over (task, seed) pairs: "
                     f"{fmt_interval(pooled) if pooled else '-'} (n={len(pooled)}).")
        return "\n".join(lines)

    def ablations(self):
        if "goat" not in self.chosen:
            return ""
        lr, eta = self.chosen["goat"]
        rows = [("GOAT (chosen setting)", "goat", lr, eta)]
        rows += [(label, label, lr, eta) for label in ABLATIONS]
        for other in ("molora", "lora", "full"):
            if other in self.chosen:
                rows.append((f"{other} (its own chosen lr)", other, *self.chosen[other]))
        own = [(f"{label} at its best {ABLATION_TASK} setting ({lr_text(*best)})", label, *best, SEEDS[1:])
               for label, best in self.task_bests().items()]
        note = (f" Rows \"at its best {ABLATION_TASK} setting\": the setting with the best {ABLATION_TASK} "
                f"validation score of seed 0 on the method's tuning grid, instead of its one setting for all "
                f"tasks; reported on seeds {list(SEEDS[1:])} only, since seed 0 picked it.") if own else ""
        return (f"Task {ABLATION_TASK}, seeds {list(SEEDS)}, lr {lr:g}, eta {eta:g}.{note}\n\n"
                + self.variant_table(ABLATION_TASK, rows + own, ("goat", lr, eta)))

    def task_bests(self):
        """{label: its best setting on the ablation task} where that differs from its chosen one."""
        bests = {label: task_best(label, ABLATION_TASK, self.results) for label in PER_TASK if label in self.chosen}
        return {label: best for label, best in bests.items() if best is not None and best != self.chosen[label]}

    def rank8(self):
        rows = [(label, label, *self.chosen[base]) for label, (base, _) in RANK8.items() if base in self.chosen]
        rows += [(f"{base} (rank 32, the headline)", base, *self.chosen[base]) for base, _ in RANK8.values()
                 if base in self.chosen]
        if "full" in self.chosen:
            rows.insert(0, ("full (no rank)", "full", *self.chosen["full"]))
        if "goat" not in self.chosen:
            return ""
        return (f"Task {RANK8_TASK}, seeds {list(SEEDS)}, each method at its rank-32 chosen setting; rank 8, alpha 16 "
                f"(the rank-32 rows: the same methods in the headline, for what the lower rank costs each).\n\n"
                + self.variant_table(RANK8_TASK, rows, ("goat r8", *self.chosen["goat"])))

    def expert_load(self):
        """How GOAT's routers spread the tokens at the end of its seed-0 run on the ablation task
        (the last logged training batch; uniform is 1 / experts)."""
        run = self.finished(ABLATION_TASK, "goat", [0]).get(0)
        if not run or not run.get("expert_load"):
            return ""
        loads = run["expert_load"]
        shares = [x for layer in loads.values() for x in layer]
        even = sum(1 for layer in loads.values() if max(layer) - min(layer) < 0.1)
        idle = sorted(name for name, layer in loads.items() if min(layer) < 0.01)
        return (f"GOAT on {ABLATION_TASK}, seed 0, last logged training batch: {len(loads)} layers x "
                f"{len(next(iter(loads.values())))} experts; an expert's share of a layer's routing ranges "
                f"{min(shares):.2f}-{max(shares):.2f} (standard deviation {statistics.pstdev(shares):.3f}); "
                f"{even} of {len(loads)} layers keep every expert within 0.1 of the others; layers with an expert "
                f"under 0.01: {', '.join(idle) or 'none'}. Plot: study_expert_load_goat.png.")

    def compute(self):
        lines = ["| part | runs | run-minutes (one thread each) |", "|---|---|---|"]
        parts = {}
        for r in self.results.values():
            parts.setdefault(r["part"], []).append(r["seconds"])
        for part, secs in parts.items():
            lines.append(f"| {part} | {len(secs)} | {sum(secs) / 60:.0f} |")
        total = [s for secs in parts.values() for s in secs]
        lines.append(f"| all | {len(total)} | {sum(total) / 60:.0f} |")
        return "\n".join(lines)

    def status(self):
        due = [r for r in self.runs if r.id not in self.results]
        parts = {}
        for run in due:
            parts[run.part] = parts.get(run.part, 0) + 1
        later = " (later parts join the plan as the settings they need are chosen)" if \
            len(self.chosen) < len(METHODS) else ""
        if not due and len(self.chosen) == len(METHODS):
            return f"{len(self.results)} runs finished: the study is complete."
        return (f"{len(self.results)} runs finished; the plan asks for {len(due)} more now"
                + (f" ({', '.join(f'{k} {v}' for k, v in parts.items())})" if parts else "") + later + ".")

    def report(self):
        sections = [("Status", self.status()),
                    ("Headline: every method at its chosen setting", self.headline()),
                    ("Paired differences", self.paired("goat", ["molora", "lora", "full", "pissa", "milora",
                                                                "goat (alpha)"])),
                    ("GOAT's init against MoLoRA's, at one setting", self.init_at_one_setting()),
                    ("Tuning (validation split, seed 0)", self.tuning_tables()),
                    ("GOAT's eta x lr against full fine-tuning's lr", self.eta_lr_agreement()),
                    ("train.py's default for GOAT: the paper's eta, unless shown worse", self.default_choice()),
                    ("What the head alone does at GOAT's learning rate", self.head_only()),
                    ("The upcycled full MoE and loss curves", self.full_moe()),
                    ("Ablations of GOAT", self.ablations()),
                    ("Total rank 8 (8 experts of rank 1)", self.rank8()),
                    ("Expert load", self.expert_load()),
                    ("Compute", self.compute())]
        return "\n\n".join(f"### {title}\n\n{body}" for title, body in sections if body) + "\n"

    def plots(self, results_dir):
        import plots
        for task in TASKS:
            curves = {}
            labels = list(self.chosen) + (["full-moe"] if task == FULL_MOE_TASK else [])
            for label in labels:
                runs = list(self.finished(task, label).values())
                if runs:
                    smoothed = [self.curve(r) for r in runs]
                    length = min(map(len, smoothed))
                    steps = [step for step, _ in runs[0]["loss_curve"][:length]]
                    curves[label] = list(zip(steps, [statistics.mean(c[i] for c in smoothed) for i in range(length)]))
            if curves:
                plots.plot_loss_curves(curves, results_dir / f"study_loss_{task}.png",
                                       f"MiniLM on {task}: each method at its chosen setting, mean of its seeds")
        sweeps = {}
        for label in METHODS:
            _, _, means = tuning(label, self.results)
            if means:
                for (lr, eta), value in means.items():
                    name = label if eta is None else f"{label}, eta {eta:g}"
                    sweeps.setdefault(name, []).append((lr, value if math.isfinite(value) else float("nan")))
        if sweeps:
            plots.plot_lr_sweeps(sweeps, results_dir / "study_lr_sweep.png")
        run = self.finished(ABLATION_TASK, "goat", [0]).get(0)
        if run and run.get("expert_load"):
            plots.plot_expert_load([{"expert_load": run["expert_load"]}], results_dir / "study_expert_load_goat.png",
                                   f"GOAT on {ABLATION_TASK}, end of training:")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data_dir", default=str(HERE.parent / "shared" / "data" / "glue"))
    p.add_argument("--results_dir", default=str(HERE / "results" / "study"))
    p.add_argument("--runs_dir", default=str(HERE / "runs" / "study"), help="full run outputs (not committed)")
    p.add_argument("--code_dir", default=str(HERE), help="where train.py is (a fixed checkout while the repo changes)")
    p.add_argument("--workers", type=int, default=2, help="runs at once, one thread each")
    p.add_argument("--model", default=None, help="the model every run fine-tunes (default: train.py's, all-MiniLM-L6-v2)")
    p.add_argument("--report_only", action="store_true")
    p.add_argument("--next", action="store_true", help="list the runs due now and stop")
    p.add_argument("--readme", default=None, help="also put the report into this file, between its study-report markers")
    args = p.parse_args(argv)
    if args.next:
        results = load_results(args.results_dir)
        due = [r for r in plan(results)[0] if r.id not in results]
        print("\n".join(f"{r.part:8} {r.id}" for r in due) or "nothing due: the study is complete")
        return
    if not args.report_only:
        run_study(args)
    study = Study(load_results(args.results_dir))
    text = study.report()
    out = Path(args.results_dir).parent
    (out / "study.md").write_text(text)
    study.plots(out)
    if args.readme:
        put_in_readme(Path(args.readme), text)
    print(text)


README_START, README_END = "<!-- study report: python study.py --report_only -->", "<!-- end of study report -->"


def put_in_readme(path, text):
    """Replace what stands between the README's study-report markers by `text`."""
    readme = path.read_text()
    if README_START not in readme or README_END not in readme:
        raise SystemExit(f"{path} has no study-report markers ({README_START} ... {README_END})")
    head, rest = readme.split(README_START, 1)
    tail = rest.split(README_END, 1)[1]
    body = text.replace("### ", "#### ")  # the README's study section is a level above
    path.write_text(f"{head}{README_START}\n{body}\n{README_END}{tail}")


if __name__ == "__main__":
    main()
