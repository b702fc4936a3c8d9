"""
The comparison study, round two: GOAT against every baseline on all-MiniLM-L6-v2,
every method with the same freedom, selection and report on different seeds.

    python study.py                     # run what is missing (resumable), then report
    python study.py --report_only       # every table and plot from results/study/ alone
    python study.py --next              # the runs the plan would start now

The design, fixed before the runs (round one, its 250 records and what a review
found in them: docs/study-round1.md):
- Tasks: docstrings (1,865 training examples after 400 held out for validation), SST-2
  (4,000; 1,000 held out) and CoLA (6,551; 2,000 held out, twice round one's split,
  whose validation and dev sets ranked methods differently). Dev sets are reported.
- Same freedom: a fresh task head learns at rates where adapters diverge, so the head
  gets a learning rate of its own (--head_lr), one value shared by every method, chosen
  first on the head-only control (a LoRA with s = 1e-9: the encoder stays as it is),
  so that no method's adapters choose it. Then every method tunes one number, its
  learning rate, over the same kind of grid (log-spaced about 3x apart, grown at its
  edge until the best setting's neighbours have run). GOAT is three rows: the paper's
  scaling at the paper's eta 1, the Adam scale (goat.adam_scaling_factor) at eta 1,
  and the authors' released alpha scaling.
- Selection rule (seed 0, validation splits): a setting's score on a task is its
  validation metric above the majority class, relative to the best setting of the
  same method on that task; the chosen setting has the best worst-task score (ties:
  the best mean), so a setting that collapses on one task is never chosen. Then the
  one-standard-error rule: the smallest lr, walking down from that setting, within one
  standard error of it on every task (added after the head-only control and before any method's run: the
  control's scores at lr 0.3 and 1 lie within one standard error of each other on
  every task, and the worst-task rule alone picked 1, the largest rate train.py
  accepts, by CoLA's validation MCC of 5.5 against 4.7 on 2,000 examples, whose
  standard error is 2.2; with the amendment the head's rate is 0.3).
- Report (seeds 1-5, never seed 0, all runs from one train.py commit): per task, mean
  and standard deviation, and paired differences with 95% Student t intervals over the
  5 seeds; across tasks, each method's mean rank (the task is the unit: accuracy and
  MCC are never averaged; tied means share their rank). The smallest difference this
  design detects (80% power, two-sided 95%, 5 paired seeds: 1.68 paired standard
  deviations, from the noncentral t; round one's median paired sd was 2.6, 0.6 and 1.5
  points): about 4.4 points on docstrings, 1.0 on SST-2, 2.5 MCC points on CoLA (first
  written as 1.66 and 2.4, an arithmetic slip mended before any seed 1-5 run). A
  smaller difference is "not detected", not "equal". The report also says whether
  each task's validation split orders the methods as its dev set does (added with the
  first method runs, before any seed 1-5 run). Where a pair is ordered differently
  beyond noise, that task's choices cannot be trusted (its split too small or its
  schedule too short to choose on): the README says so next to its results, and a
  later round enlarges the split, lengthens the schedule or replaces the task (this
  round's compute allows no second tuning; stated when at most 2 of each method's 5
  seeds had run, before the comparison could be computed). A run that diverges (headline, ablation
  or sweep) counts as the majority class's metric, so no mean is taken over a method's
  good seeds alone; the tables say how many diverged.
- train.py's defaults, decided on seeds 1-5 by this rule: each method's default is its
  chosen setting unless one of its 15 reported runs collapses (diverges, or its dev
  metric is at most 1 point above the majority class's); then the next gentler rung
  runs on seeds 1-5 and is judged alike, one rung down (if it collapses too, the
  chosen rate stays the default and the README names its collapses: seed 0 already
  shows every LoRA-family row weaker on CoLA one rung down, so the search goes no
  further); GOAT's default scaling is the Adam scale if its paired intervals against
  the paper's scale, each at its chosen rate, lie above 0 on at least one task and
  below 0 on none, else the paper's, at that row's default rate; --head_lr's default
  is the shared head rate (later overruled: head_rate.py found two-layer heads, unlike
  the study's, falling at that rate; train.py takes 3e-2). (What a collapse leads to, and a diverged run's score, were
  added after a review found the rule silent on both, when 3 seed 1 runs had finished,
  GOAT's at the paper scale, none collapsed, and before any other.)
- After the headline: ablations of GOAT's parts (seeds 1-3, every task) under the Adam
  scale, which gives every init and segment the same effective step by construction
  (each expert's equivalent weight moves by eta x lr per step), at the Adam row's
  learning rate; GOAT-s against the paper's scale at the paper row's learning rate;
  the per-segment sweep of the paper's Fig. 1 (one rank-32 LoRA from each of 8 SVD
  segments, PiSSA-style c = 1 and rho = 1, the Adam scale; docstrings and SST-2, seeds
  1-2); Fig. 6 (2, 4 and 8 experts, and top-1, at total rank 32; seeds 1-3).

Each run is `python train.py ...` in a subprocess with one thread (results depend on
the thread count), from a copy of the repository at the commit pinned in
results/study/code.json, so that the repository may change while the study runs.
Its small record (metrics, flags, loss curve, expert load, seconds, commit) goes to
results/study/runs/ and is never rewritten; the plan is computed from those files,
so the study continues on any machine where it stopped. A record of another commit, or
another --model, or whose command line the design no longer gives its run, is set aside (named in the
report's status, in no table) and its run made again. The report
(results/study.md and results/study_*.png) is computed from them alone.
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
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent

# ---------------------------------------------------------------------------------
# What to run

# task: (training examples, None for all; validation examples held out of the training file)
TASKS = {"docstrings": (None, 400), "sst2": (4000, 1000), "cola": (None, 2000)}
TASK_NAMES = {"docstrings": "docstrings acc", "sst2": "SST-2 acc", "cola": "CoLA mcc"}
COMMON = ["--epochs=3", "--batch_size=32", "--rank=32", "--alpha=64", "--warmup=0.06", "--balance_coef=1e-3",
          "--lora_dropout=0.05", "--max_len=128", "--grad_clip=1.0", "--log_every=5", "--ckpt_every=1000000"]
# about x3 apart, up to the largest rate train.py accepts (the head-only control still rose at 0.3)
LADDER = [1e-6, 3e-6, 1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0]
TUNING_SEED, REPORT_SEEDS, LATER_SEEDS, SWEEP_SEEDS = 0, (1, 2, 3, 4, 5), (1, 2, 3), (1, 2)

HEAD_ONLY = ["--method=lora", "--scaling=1e-9"]  # s = 1e-9: the encoder stays as it is; the head learns
HEAD_GRID = [1e-3, 3e-3, 1e-2]
METHODS = {  # label: (flags, starting lr grid); all adapters at total rank 32, alpha 64
    "full": (["--method=full"], [3e-5, 1e-4, 3e-4]),
    "lora": (["--method=lora"], [1e-4, 3e-4, 1e-3]),
    "pissa": (["--method=pissa"], [1e-4, 3e-4, 1e-3]),
    "milora": (["--method=milora"], [1e-4, 3e-4, 1e-3]),
    "molora": (["--method=molora"], [1e-4, 3e-4, 1e-3]),
    "goat": (["--method=goat", "--scaling=paper", "--eta=1"], [1e-4, 3e-4, 1e-3]),
    "goat (Adam s)": (["--method=goat", "--scaling=adam", "--eta=1"], [3e-5, 1e-4, 3e-4]),
    "goat (alpha)": (["--method=goat", "--scaling=alpha"], [1e-4, 3e-4, 1e-3]),
}
GOAT_ROWS = ("goat", "goat (Adam s)", "goat (alpha)")
ADAM = ["--method=goat", "--scaling=adam", "--eta=1"]
ABLATIONS = {  # under the Adam scale: the same effective step for every init and segment
    "no SVD init (lora init)": ADAM + ["--init=lora"],
    "principal (top r)": ADAM + ["--init=pissa"],
    "minor (bottom r)": ADAM + ["--init=milora"],
    "segment bottoms (goat_mini)": ADAM + ["--init=goat_mini"],
    "random components (goat_random)": ADAM + ["--init=goat_random"],
    "c = 0 (W_res = W0)": ADAM + ["--init_cof=0"],
    "c = 1": ADAM + ["--init_cof=1"],
    "one LoRA on GOAT's segments": ADAM + ["--experts=1", "--top_k=1", "--segments=8", "--init_cof=1"],
    "no scaling (s = alpha / r = 2)": ["--method=goat", "--scaling=2"],
}
GOAT_S = ("GOAT-s (paper scale per segment)", ["--method=goat", "--scaling=paper", "--eta=1", "--per_expert_scale"])
SWEEP_TASKS = ("docstrings", "sst2")
SWEEP = {f"segment {j}": ["--method=goat", "--scaling=adam", "--eta=1", "--experts=1", "--top_k=1", "--segments=8",
                          f"--segment={j}", "--init_cof=1", "--rho=1"] for j in range(8)}
EXPERT_COUNTS = {"2 experts, top-2": ADAM + ["--experts=2", "--top_k=2"],
                 "4 experts, top-2": ADAM + ["--experts=4", "--top_k=2"],
                 "8 experts, top-1": ADAM + ["--experts=8", "--top_k=1"]}


@dataclass(frozen=True)
class Run:
    part: str
    task: str
    label: str
    lr: float
    head_lr: float
    seed: int
    flags: tuple = ()

    @property
    def id(self):
        slug = "".join(c if c.isalnum() else "-" for c in self.label).strip("-")
        while "--" in slug:
            slug = slug.replace("--", "-")
        return f"{self.task}_{slug}_lr{self.lr:g}_head{self.head_lr:g}_s{self.seed}"

    def argv(self, data_dir, out_dir):
        train_n, val_n = TASKS[self.task]
        argv = [f"--task={self.task}", f"--data_dir={data_dir}", f"--val_examples={val_n}", f"--seed={self.seed}",
                f"--lr={self.lr:g}", f"--head_lr={self.head_lr:g}", f"--out_dir={out_dir}", *COMMON, *self.flags]
        return argv + ([f"--max_train_examples={train_n}"] if train_n else [])

    def recorded_argv(self, argv=None):
        """What a record keeps of the command line: all but the run's own folders."""
        argv = self.argv("", "") if argv is None else argv
        return [a for a in argv if not a.startswith(("--out_dir", "--data_dir"))]


def design_run(record):
    """The run the current design makes of a record's part and label (None: not in the design)."""
    if record["label"] == "head only":
        flags = HEAD_ONLY
    elif record["part"] in ("tune", "seeds", "fallback"):
        flags = METHODS.get(record["label"], (None,))[0]
    else:
        flags = {"ablation": {**ABLATIONS, GOAT_S[0]: GOAT_S[1]}, "experts": EXPERT_COUNTS,
                 "sweep": SWEEP}.get(record["part"], {}).get(record["label"])
    if flags is None:
        return None
    return Run(record["part"], record["task"], record["label"], record["lr"], record["head_lr"], record["seed"],
               tuple(flags))


def current(results, commit, model=None):
    """(the records made by the pinned commit with the command line the design gives
    their run now, on `model` (None: train.py's default), the others). A record of
    another commit, model or design is set aside: never mixed into a table, run again
    by the plan."""
    kept, aside = {}, {}
    for key, record in results.items():
        run = design_run(record)
        expected = None if run is None else run.recorded_argv() + ([f"--model={model}"] if model else [])
        same = run is not None and run.id == key and record.get("argv") == expected and record.get("commit") == commit
        (kept if same else aside)[key] = record
    return kept, aside


def val_score(record):
    """Validation metric of a run; a diverged run ranks below every finished one."""
    return record["val"] if record.get("status") == "ok" else -math.inf


def rung(value):
    """The index of value on the ladder."""
    return min(range(len(LADDER)), key=lambda j: abs(math.log(LADDER[j] / value)))


def around(value):
    """value and its neighbours on the ladder."""
    i = rung(value)
    return LADDER[max(0, i - 1):i + 2]


def informative(scores, majority):
    """{task: the best metric of any setting there}, for the tasks on which some setting
    beats the majority class; the others tell nothing."""
    best = {task: max(s[task] for s in scores.values()) for task in TASKS}
    return {task: value for task, value in best.items() if value > majority[task]}


def choose(scores, majority):
    """The selection rule. scores: {setting: {task: validation metric}}, every task run.
    A setting's score on a task: (metric - majority) / (best metric of any setting there -
    majority), 1 for the best; its worst task decides (ties: the mean). A task on which no
    setting beats the majority class tells nothing and is left out."""
    relative = {}
    for task, best in informative(scores, majority).items():
        relative[task] = {k: (s[task] - majority[task]) / (best - majority[task]) for k, s in scores.items()}
    if not relative:
        return max(scores, key=lambda k: statistics.mean(scores[k].values()))
    key = lambda k: (min(r[k] for r in relative.values()), statistics.mean(r[k] for r in relative.values()))
    return max(scores, key=key)


def standard_error(task, value):
    """Of a validation metric on the task's held-out examples, roughly: accuracy
    sqrt(p (1 - p) / n); MCC 1 / sqrt(n), its standard error at 0 (simulated with
    CoLA's label shares on 2,000 examples, the true one stays within about 12% of that
    up to MCC 0.6, and falls below it beyond). 0 for a diverged run's -inf."""
    n = TASKS[task][1]
    if not math.isfinite(value):
        return 0.0
    if TASK_NAMES[task].endswith("mcc"):
        return 1 / math.sqrt(n)
    return math.sqrt(max(value * (1 - value), 0.0) / n)


def gentlest_within_noise(scores, best, tasks):
    """The one-standard-error rule (Breiman et al., 1984), after the worst-task rule: from
    the chosen lr down the ladder, rung by rung, while each rung's validation metric is
    within one standard error of the chosen setting's on every informative task (one
    score's error, not that of the paired difference: the lenient, usual convention).
    On a plateau, where the worst-task rule alone would choose by noise, it takes the
    gentlest rate. Returns (that lr, None), or (best so far, the next rung to run)."""
    tasks = tasks or list(TASKS)
    gentlest = best
    for lr in reversed(LADDER[:rung(best)]):
        if lr not in scores:
            return gentlest, lr
        if not all(scores[lr][t] >= scores[best][t] - standard_error(t, scores[best][t]) for t in tasks):
            break
        gentlest = lr
    return gentlest, None


def tune(part, label, flags, start, results, head_lr=None):
    """(the tuning runs of a grid, the chosen lr or None while the grid is incomplete).
    The grid grows around its best setting until both its neighbours have run, and below
    the gentlest setting within noise until a rung falls outside, so the choice is never
    on the grid's edge. head_lr None: the head-only control, whose
    head learns at the lr under tuning."""
    points = set(start) | {r["lr"] for r in results.values() if r["part"] == part and r["label"] == label}
    while True:
        grid = [Run(part, task, label, lr, lr if head_lr is None else head_lr, TUNING_SEED, tuple(flags))
                for lr in sorted(points) for task in TASKS]
        if any(run.id not in results for run in grid):
            return grid, None
        scores = {lr: {r.task: val_score(results[r.id]) for r in grid if r.lr == lr} for lr in points}
        majority = {r.task: results[r.id]["majority"]["val"] for r in grid if results[r.id].get("majority")}
        if len(majority) < len(TASKS):  # every rate diverged on some task: try a gentler one
            if rung(min(points)) == 0:
                return grid, None
            points.add(LADDER[rung(min(points)) - 1])
            continue
        best = choose(scores, majority)
        if not set(around(best)) <= points:
            points |= set(around(best))
            continue
        gentlest, missing = gentlest_within_noise(scores, best, informative(scores, majority))
        if missing is None:
            return grid, gentlest
        points.add(missing)  # the rung below the gentlest is run before the choice is made


FALLBACK_RUNGS = 1  # a default is sought at most this many rungs (about 3x) below the chosen rate


def majorities(results):
    """{task: {split: the majority class's metric}}, from any finished run of the task."""
    found = {}
    for record in results.values():
        if record.get("majority"):
            found.setdefault(record["task"], record["majority"])
    return found


def collapsed(record, majority):
    """A reported run that learned nothing a user could keep: diverged, or its dev metric
    at most 1 point above the majority class's (below it included)."""
    return record["status"] != "ok" or record["dev"] <= majority[record["task"]]["dev"] + 0.01


def reported_runs(label, lr, chosen_lr, head):
    """A headline row's runs on seeds 1-5 at lr ("seeds" at its chosen lr, "fallback" below it)."""
    part = "seeds" if lr == chosen_lr else "fallback"
    return [Run(part, task, label, lr, head, s, tuple(METHODS[label][0])) for s in REPORT_SEEDS for task in TASKS]


def default_setting(label, chosen_lr, head, results):
    """(the fallback runs this row's default needs, its default lr, whether it is decided).
    The chosen setting is the default unless one of its reported runs collapses; then
    the next gentler rung, run on seeds 1-5 and judged alike, down to FALLBACK_RUNGS
    rungs below. Decided with lr None: every rate tried collapses somewhere (then the
    chosen rate stays train.py's default and the README names its collapses)."""
    majority, fallback, lr = majorities(results), [], chosen_lr
    while True:
        rows = reported_runs(label, lr, chosen_lr, head)
        fallback += rows if lr != chosen_lr else []
        if any(r.id not in results for r in rows):
            return fallback, None, False
        if not any(collapsed(results[r.id], majority) for r in rows):
            return fallback, lr, True
        if rung(chosen_lr) - rung(lr) >= FALLBACK_RUNGS or rung(lr) == 0:
            return fallback, None, True
        lr = LADDER[rung(lr) - 1]


def plan(results):
    """Every run the study needs given what has finished, in priority order, and the
    choices made so far: {"head": lr, label: lr}."""
    runs, chosen = [], {}
    grid, head = tune("head", "head only", HEAD_ONLY, HEAD_GRID, results)
    runs += grid
    if head is None:
        return runs, chosen
    chosen["head"] = head
    for label, (flags, start) in METHODS.items():
        grid, lr = tune("tune", label, flags, start, results, head_lr=head)
        runs += grid
        if lr is not None:
            chosen[label] = lr
    seeds = [Run("seeds", task, "head only", head, head, s, tuple(HEAD_ONLY)) for s in REPORT_SEEDS for task in TASKS]
    seeds += [Run("seeds", task, label, chosen[label], head, s, tuple(METHODS[label][0]))
              for label in METHODS if label in chosen for s in REPORT_SEEDS for task in TASKS]
    first = ["goat", "goat (Adam s)", "molora", "lora", "full"]  # the paired comparisons first
    runs += sorted(seeds, key=lambda r: (r.seed, first.index(r.label) if r.label in first else len(first)))
    for label in [x for x in METHODS if x in chosen]:
        runs += default_setting(label, chosen[label], head, results)[0]
    if "goat (Adam s)" in chosen:
        lr = chosen["goat (Adam s)"]
        runs += [Run("ablation", task, label, lr, head, s, tuple(flags))
                 for s in LATER_SEEDS for task in TASKS for label, flags in ABLATIONS.items()]
    if "goat" in chosen:  # the last ablation row, before the figures' runs
        runs += [Run("ablation", task, GOAT_S[0], chosen["goat"], head, s, tuple(GOAT_S[1]))
                 for s in LATER_SEEDS for task in TASKS]
    if "goat (Adam s)" in chosen:
        lr = chosen["goat (Adam s)"]
        runs += [Run("experts", task, label, lr, head, s, tuple(flags))
                 for s in LATER_SEEDS for task in TASKS for label, flags in EXPERT_COUNTS.items()]
        runs += [Run("sweep", task, label, lr, head, s, tuple(flags))
                 for s in SWEEP_SEEDS for task in SWEEP_TASKS for label, flags in SWEEP.items()]
    return runs, chosen


# ---------------------------------------------------------------------------------
# Running: a pinned copy of the code, one thread per run, a small record per run

def pinned_commit(results_dir):
    """The commit pinned in results/study/code.json (None before the first start)."""
    pin = Path(results_dir) / "code.json"
    return json.loads(pin.read_text())["commit"] if pin.exists() else None


def pinned_code(results_dir, runs_dir):
    """The repository at the commit every run of the study uses (pinned at the first
    start, in results/study/code.json), unpacked once under runs_dir."""
    commit = pinned_commit(results_dir)
    if commit is None:
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "train.py", "goat.py", "data.py"], cwd=HERE,
                               capture_output=True, text=True).stdout.strip()
        if dirty:
            raise SystemExit(f"commit train.py, goat.py and data.py first: the study pins a commit\n{dirty}")
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True,
                                text=True, check=True).stdout.strip()
        pin = Path(results_dir) / "code.json"
        pin.parent.mkdir(parents=True, exist_ok=True)
        pin.write_text(json.dumps({"commit": commit}) + "\n")
    code = Path(runs_dir) / f"code-{commit}"
    if not (code / "train.py").exists():
        code.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(["git", "archive", commit], cwd=HERE, capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(code)], input=archive, check=True)
    return code, commit


def load_results(results_dir):
    return {(record := json.loads(path.read_text()))["id"]: record
            for path in sorted((Path(results_dir) / "runs").glob("*.json"))}


# how train.py says that a run's loss diverged (its Health check); any other failure is a bug
DIVERGED_MESSAGES = ("stopped: the loss or gradient norm became NaN or infinite", "stopped: training diverged")


def summarise(run, argv, out_dir, seconds, returncode, log_tail, commit):
    """The small, committed record of one run."""
    record = {"id": run.id, "part": run.part, "task": run.task, "label": run.label, "lr": run.lr,
              "head_lr": run.head_lr, "seed": run.seed, "seconds": round(seconds, 1), "threads": 1,
              "commit": commit, "argv": run.recorded_argv(argv)}
    result_path = out_dir / "result.json"
    if returncode != 0 or not result_path.exists():
        diverged = any(message in log_tail for message in DIVERGED_MESSAGES)
        record.update(status="diverged" if diverged else "failed", log_tail=log_tail[-2000:])
        return record
    result = json.loads(result_path.read_text())
    metric = result["main_metric"]
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().split("\n") if line.strip()]
    rows = [r for r in rows if "task_loss" in r]
    record.update(status="ok", metric=metric, val=result["metrics"]["val"][metric],
                  dev=result["metrics"]["dev"][metric],
                  majority={k: v[metric] for k, v in (result.get("majority_baseline") or {}).items()},
                  steps=result["steps"], train_examples=result["train_examples"],
                  trainable_params=result["trainable_params"],
                  loss_curve=[[r["step"], round(r["task_loss"], 5)] for r in rows],
                  expert_load=rows[-1].get("expert_load") if rows else None)
    return record


def execute(run, args, code, commit):
    out_dir, log_path = Path(args.runs_dir) / run.id, Path(args.runs_dir) / f"{run.id}.log"
    shutil.rmtree(out_dir, ignore_errors=True)  # scratch: a run interrupted earlier starts again
    log_path.parent.mkdir(parents=True, exist_ok=True)
    argv = run.argv(args.data_dir, out_dir) + ([f"--model={args.model}"] if args.model else [])
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    t0 = time.time()
    with open(log_path, "w") as log:
        code_ = subprocess.call([sys.executable, str(code / "train.py"), *argv], stdout=log,
                                stderr=subprocess.STDOUT, env=env, cwd=code)
    record = summarise(run, argv, out_dir, time.time() - t0, code_, log_path.read_text(errors="replace")[-4000:],
                       commit)
    shutil.rmtree(out_dir, ignore_errors=True)  # the record is what is kept
    if record["status"] == "failed":
        return record  # a bug, not a result: reported, never written, retried on the next start
    path = Path(args.results_dir) / "runs" / f"{run.id}.json"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(record, separators=(",", ":")) + "\n")
    os.replace(tmp, path)
    return record


def run_study(args):
    code, commit = pinned_code(args.results_dir, args.runs_dir)
    (Path(args.results_dir) / "runs").mkdir(parents=True, exist_ok=True)
    failed, running = set(), {}
    with ThreadPoolExecutor(args.workers) as pool:
        while True:
            results = current(load_results(args.results_dir), commit, args.model)[0]
            busy = {r.id for r in running.values()}
            due = [r for r in plan(results)[0] if r.id not in results and r.id not in failed and r.id not in busy]
            for run in due[:args.workers - len(running)]:
                print(f"start {run.part:8} {run.id}", flush=True)
                running[pool.submit(execute, run, args, code, commit)] = run
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
# Reporting: tables and plots from the records alone

T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
        2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042]


def t_interval(values):
    """Mean and half-width of the two-sided 95% Student t interval (None for fewer than 2 values)."""
    mean = statistics.mean(values)
    if len(values) < 2:
        return mean, None
    df = len(values) - 1
    return mean, (T975[df - 1] if df <= len(T975) else 1.96) * statistics.stdev(values) / math.sqrt(len(values))


def fmt_mean_std(values):
    if not values:
        return "-"
    return f"{statistics.mean(values) * 100:.1f}" + (f" ± {statistics.stdev(values) * 100:.1f}" if len(values) > 1 else "")


def fmt_interval(values):
    """Mean [95% t interval]; with fewer than 3 values, each value (a t interval on one
    degree of freedom is too wide to read, and two equal values would show a zero-width one)."""
    if len(values) < 3:
        return " / ".join(f"{v * 100:+.1f}" for v in values) + " (per seed)"
    mean, half = t_interval(values)
    return f"{mean * 100:+.1f}" + (f" [{(mean - half) * 100:+.1f}, {(mean + half) * 100:+.1f}]" if half is not None else "")


class Records:
    """The finished runs, looked up by what they are."""

    def __init__(self, results, set_aside=()):
        self.results, self.set_aside = results, set_aside
        self.runs, self.chosen = plan(results)
        self.majorities = majorities(results)

    def record(self, part, task, label, lr, seed):
        """A finished run's record, or None (a run's id names it; its label gives its flags)."""
        return self.results.get(Run(part, task, label, lr, self.chosen.get("head"), seed).id)

    def dev(self, part, task, label, lr, seeds, split="dev"):
        """{seed: dev (or validation) metric} of the finished runs; a diverged run scores
        the majority class's metric (what a model that learned nothing would), so that no
        mean, interval or rank is taken over a method's good seeds alone."""
        found = {s: self.record(part, task, label, lr, s) for s in seeds}
        return {s: r[split] if r["status"] == "ok" else self.majorities[task][split]
                for s, r in found.items() if r}

    def diverged(self, part, tasks, label, lr, seeds):
        """How many of these runs diverged."""
        return sum((self.record(part, t, label, lr, s) or {}).get("status") == "diverged"
                   for t in tasks for s in seeds)

    def headline_scores(self, label, split="dev"):
        """{task: {seed: dev (or validation) metric}} of a headline row at its chosen setting."""
        lr = self.chosen.get("head" if label == "head only" else label)
        if lr is None:
            return {}
        return {task: self.dev("seeds", task, label, lr, REPORT_SEEDS, split=split) for task in TASKS}

    def majority(self, task, split="dev"):
        return self.majorities[task][split] if task in self.majorities else None


def status(records):
    due = [r for r in records.runs if r.id not in records.results]
    parts = {}
    for run in due:
        parts[run.part] = parts.get(run.part, 0) + 1
    text = f"{len(records.results)} runs finished; the plan asks for {len(due)} more now"
    text += f" ({', '.join(f'{k} {v}' for k, v in parts.items())})" if parts else ""
    text = text + ". Later parts join the plan as the settings they need are chosen." if due else \
        f"{len(records.results)} runs finished: every part of the plan has run."
    if "head" in records.chosen:
        stuck = [x for x in METHODS if x not in records.chosen and not any(r.label == x for r in due)]
        text += "".join(f" {x}: every rate down to {LADDER[0]:g} diverged on some task, nothing chosen." for x in stuck)
    if records.set_aside:
        text += (f" Set aside: {len(records.set_aside)} record(s) of another commit or of a changed design "
                 f"(in no table; run again): {', '.join(sorted(records.set_aside)[:5])}"
                 + (" ..." if len(records.set_aside) > 5 else "") + ".")
    return text


def tuning_table(records):
    rows = [("head only", "head")] + [(label, "tune") for label in METHODS]
    columns = sorted({r["lr"] for r in records.results.values() if r["part"] in ("head", "tune")})
    if not columns:
        return ""
    lines = [f"Shared head lr: **{records.chosen['head']:g}** (chosen on the head-only control)."
             if "head" in records.chosen else "The shared head lr is being tuned.",
             "", "| method | " + " | ".join(f"lr {x:g}" for x in columns) + " |", "|---|" + "---|" * len(columns)]
    for label, part in rows:
        cells = []
        for lr in columns:
            found = [r for r in records.results.values() if r["part"] == part and r["label"] == label and r["lr"] == lr]
            if len(found) < len(TASKS):
                cells.append("-" if not found else "...")
                continue
            worst = "diverged" if any(r["status"] != "ok" for r in found) else \
                " / ".join(f"{r['val'] * 100:.1f}" for r in sorted(found, key=lambda r: list(TASKS).index(r["task"])))
            chosen = records.chosen.get("head" if part == "head" else label)
            cells.append(f"**{worst}**" if chosen == lr else worst)
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines.append("\nValidation metric x100 on " + " / ".join(TASKS) + " (seed 0); bold: the chosen setting, by the "
                 "rule above (the best worst task relative to the method's best there, then the smallest lr within one "
                 "standard error of it on every task). Adapter methods: the head at the "
                 "shared head lr.")
    return "\n".join(lines)


def headline_table(records):
    labels = ["head only"] + [label for label in METHODS if label in records.chosen]
    if len(labels) == 1:
        return ""
    lines = ["| method | lr | " + " | ".join(TASK_NAMES[t] for t in TASKS) + " | seeds |",
             "|---|---|" + "---|" * (len(TASKS) + 1)]
    for label in labels:
        scores = records.headline_scores(label)
        lr = records.chosen["head"] if label == "head only" else records.chosen[label]
        seeds = min((len(v) for v in scores.values()), default=0)
        diverged = records.diverged("seeds", TASKS, label, lr, REPORT_SEEDS)
        lines.append(f"| {label} | {lr:g} | " + " | ".join(fmt_mean_std(list(scores.get(t, {}).values()))
                                                            for t in TASKS)
                     + f" | {seeds}{f' ({diverged} diverged)' if diverged else ''} |")
    majority = [records.majority(t) for t in TASKS]
    lines.append("| majority class | | " + " | ".join("-" if m is None else f"{m * 100:.1f}" for m in majority)
                 + " | |")
    lines.append("\nDev metric x100, mean ± standard deviation over seeds 1-5 (seed 0 chose the settings and is "
                 "not reported); a diverged run counts as the majority class.")
    return "\n".join(lines)


def paired_table(records, label, others):
    mine = records.headline_scores(label)
    if not mine:
        return ""
    lines = [f"| {label} minus | " + " | ".join(TASK_NAMES[t] for t in TASKS) + " |", "|---|" + "---|" * len(TASKS)]
    for other in others:
        theirs = records.headline_scores(other)
        if not theirs or other == label:
            continue
        cells = []
        for task in TASKS:
            diffs = [mine[task][s] - theirs[task][s] for s in REPORT_SEEDS if s in mine[task] and s in theirs[task]]
            cells.append(fmt_interval(diffs) if diffs else "-")
        lines.append(f"| {other} | " + " | ".join(cells) + " |")
    lines.append("\nDev metric x100: mean paired difference over seeds [95% Student t interval].")
    return "\n".join(lines)


PLANNED_DETECTABLE = {"docstrings": 4.4, "sst2": 1.0, "cola": 2.5}  # x100, from round one's spread (docstring)


def detectable(records):
    """The smallest difference the headline detects (80% power, two-sided 95%, 5 paired
    seeds: 1.68 paired standard deviations), as planned and as achieved: from the median
    paired standard deviation over every pair of methods on seeds 1-5."""
    scores = [records.headline_scores(x) for x in METHODS if x in records.chosen]
    lines = ["| task | planned | achieved | median paired sd | pairs |", "|---|---|---|---|---|"]
    for task in TASKS:
        sds = []
        for i, mine in enumerate(scores):
            for theirs in scores[i + 1:]:
                diffs = [mine[task][s] - theirs[task][s] for s in REPORT_SEEDS if s in mine[task] and s in theirs[task]]
                if len(diffs) == len(REPORT_SEEDS):
                    sds.append(statistics.stdev(diffs))
        if sds:
            sd = statistics.median(sds)
            lines.append(f"| {TASK_NAMES[task]} | {PLANNED_DETECTABLE[task]:.1f} | {1.68 * sd * 100:.1f} | "
                         f"{sd * 100:.1f} | {len(sds)} |")
    return "\n".join(lines) + "\n\nDev metric x100." if len(lines) > 2 else ""


def mean_ranks(records):
    """Each method's rank on each task (1 = best mean dev over seeds 1-5), and its mean
    rank: the task is the unit, so accuracy and MCC are never averaged."""
    labels = [label for label in METHODS if label in records.chosen]
    scores = {label: records.headline_scores(label) for label in labels}
    tasks = [t for t in TASKS if labels and all(len(scores[x].get(t, {})) == len(REPORT_SEEDS) for x in labels)]
    if not tasks:
        return ""
    means = {x: {t: statistics.mean(scores[x][t].values()) for t in tasks} for x in labels}
    ranks = {x: {t: sum(means[y][t] > means[x][t] for y in labels)  # ties share their mean rank
                 + (1 + sum(means[y][t] == means[x][t] for y in labels)) / 2 for t in tasks} for x in labels}
    lines = ["| method | " + " | ".join(TASK_NAMES[t] for t in tasks) + " | mean rank |",
             "|---|" + "---|" * (len(tasks) + 1)]
    for label in sorted(labels, key=lambda x: statistics.mean(ranks[x].values())):
        lines.append(f"| {label} | " + " | ".join(f"{ranks[label][t]:g}" for t in tasks)
                     + f" | {statistics.mean(ranks[label].values()):.2f} |")
    missing = [TASK_NAMES[t] for t in TASKS if t not in tasks]
    return "\n".join(lines) + (f"\n\n{', '.join(missing)}: seeds still running." if missing else "")


def split_agreement(records):
    """Whether each task's validation split ranks the methods as its dev set does (seeds
    1-5, each method at its chosen setting). The rule chooses on validation, so a task
    where the two disagree beyond noise needs a longer schedule, a larger validation
    split or replacing (round one's CoLA disagreed). Named: each pair of methods the two
    order differently, with both mean gaps, "beyond noise" where the paired dev
    difference's 95% interval excludes 0."""
    labels = ["head only"] + [label for label in METHODS if label in records.chosen]
    lines = ["| task | pairs of methods ordered alike | ordered differently (validation gap / dev gap, x100) |",
             "|---|---|---|"]
    for task in TASKS:
        dev = {x: records.headline_scores(x)[task] for x in labels if records.headline_scores(x)}
        val = {x: records.headline_scores(x, "val")[task] for x in dev}
        done = [x for x in dev if len(dev[x]) == len(val[x]) == len(REPORT_SEEDS)]
        if len(done) < 2:
            continue
        alike, differently = 0, []
        for i, a in enumerate(done):
            for b in done[i + 1:]:
                val_gap = statistics.mean(val[a].values()) - statistics.mean(val[b].values())
                dev_gap = statistics.mean(dev[a].values()) - statistics.mean(dev[b].values())
                if val_gap * dev_gap >= 0:  # a tie on either is no reversal
                    alike += 1
                    continue
                mean, half = t_interval([dev[a][s] - dev[b][s] for s in REPORT_SEEDS])
                noise = ", beyond noise" if abs(mean) > half else ""
                differently.append(f"{a} vs {b}: {val_gap * 100:+.1f} / {dev_gap * 100:+.1f}{noise}")
        lines.append(f"| {TASK_NAMES[task]} | {alike} of {alike + len(differently)} | "
                     f"{'; '.join(differently) or '-'} |")
    return "\n".join(lines) if len(lines) > 2 else ""


def defaults(records):
    """The rule fixed before the runs, applied to seeds 1-5."""
    lines, head, found = [], records.chosen.get("head"), {}
    for label in [x for x in METHODS if x in records.chosen]:
        chosen = records.chosen[label]
        fallback, found[label], decided = default_setting(label, chosen, head, records.results)
        tried = [chosen] + sorted({r.lr for r in fallback}, reverse=True)
        notes = []
        for lr in tried:
            bad = [f"{r.task} seed {r.seed}" + (" diverged" if records.results[r.id]["status"] != "ok" else "")
                   for r in reported_runs(label, lr, chosen, head)
                   if r.id in records.results and collapsed(records.results[r.id], records.majorities)]
            notes += [f"lr {lr:g} collapses ({', '.join(bad)})"] if bad else []
        verdict = (f"lr {found[label]:g}, the default" if found[label] else
                   f"every rate down to {tried[-1]:g} collapses somewhere: lr {chosen:g} stays the default, "
                   "its collapses named in the README") if decided else \
            f"seeds at lr {tried[-1]:g} still running"
        lines.append(f"- {label}: " + "; ".join(notes + [verdict]))
    paper, adam = records.headline_scores("goat"), records.headline_scores("goat (Adam s)")
    if paper and adam and all(len(v) == len(REPORT_SEEDS) for v in (*paper.values(), *adam.values())):
        above = below = 0
        for task in TASKS:
            mean, half = t_interval([adam[task][s] - paper[task][s] for s in REPORT_SEEDS])
            above += mean - half > 0
            below += mean + half < 0
        row = "goat (Adam s)" if above and not below else "goat"
        verdict = "the Adam scale" if row == "goat (Adam s)" else "the paper's scale"
        lr = f"at lr {found[row]:g}" if found.get(row) else "with no default lr (above)"
        lines.append(f"- GOAT's default scaling: {verdict} {lr} (Adam minus paper at their chosen rates: intervals "
                     f"above 0 on {above} task(s), below 0 on {below})")
    if "head" in records.chosen:
        lines.append(f"- --head_lr: {records.chosen['head']:g} by this rule; train.py's default is 3e-2 instead "
                     "(two-layer heads fall at the study's rate: results/head_rate.md)")
    return "\n".join(lines)


def variant_table(records, part, variants, ref_label, lr, tasks, seeds):
    """Each variant's dev score per task, and its paired difference to the headline row `ref_label`."""
    lines = ["| variant | " + " | ".join(f"{TASK_NAMES[t]} | minus {ref_label}" for t in tasks) + " |",
             "|---|" + "---|---|" * len(tasks)]
    reference_scores = {t: records.dev("seeds", t, ref_label, lr, seeds) for t in tasks}

    def cell(part, task, label, scores):
        diverged = records.diverged(part, [task], label, lr, seeds)
        return fmt_mean_std(list(scores.values())) + (f" ({diverged} diverged)" if diverged else "")
    lines.append(f"| {ref_label} | " + " | ".join(f"{cell('seeds', t, ref_label, reference_scores[t])} | "
                                                 for t in tasks) + " |")
    for label in variants:
        cells = []
        for task in tasks:
            scores = records.dev(part, task, label, lr, seeds)
            diffs = [scores[s] - reference_scores[task][s] for s in seeds if s in scores and s in reference_scores[task]]
            cells.append(f"{cell(part, task, label, scores)} | {fmt_interval(diffs) if diffs else '-'}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n\nA diverged run counts as the majority class."


def compute(records):
    parts = {}
    for r in records.results.values():
        parts.setdefault(r["part"], []).append(r["seconds"])
    lines = ["| part | runs | run-minutes (one thread each) |", "|---|---|---|"]
    lines += [f"| {part} | {len(secs)} | {sum(secs) / 60:.0f} |" for part, secs in parts.items()]
    total = [s for secs in parts.values() for s in secs]
    commits = sorted({r["commit"] for r in records.results.values()})
    return "\n".join(lines + [f"| all | {len(total)} | {sum(total) / 60:.0f} |",
                              f"\nEvery run made by train.py at commit {', '.join(commits) or '-'}."])


def report(records):
    sections = [("Status", status(records)), ("Tuning (validation splits, seed 0)", tuning_table(records)),
                ("Headline: every method at its chosen setting", headline_table(records)),
                ("Across tasks: mean rank", mean_ranks(records))]
    for label in ("goat", "goat (Adam s)"):
        sections.append((f"Paired differences: {label}",
                         paired_table(records, label, ["goat (Adam s)", "goat", "goat (alpha)", "molora", "lora",
                                                       "pissa", "milora", "full", "head only"])))
    sections.append(("The smallest difference the headline detects", detectable(records)))
    sections.append(("Does validation rank the methods as dev does?", split_agreement(records)))
    sections.append(("train.py's defaults, by the rule fixed beforehand", defaults(records)))
    adam_lr, paper_lr = records.chosen.get("goat (Adam s)"), records.chosen.get("goat")
    if adam_lr is not None:
        sections.append(("Ablations under the Adam scale (seeds 1-3)",
                         variant_table(records, "ablation", ABLATIONS, "goat (Adam s)", adam_lr, list(TASKS),
                                       LATER_SEEDS)))
        sections.append(("Experts and top-k at total rank 32 (seeds 1-3)",
                         variant_table(records, "experts", EXPERT_COUNTS, "goat (Adam s)", adam_lr, list(TASKS),
                                       LATER_SEEDS)))
        sections.append(("One LoRA from each SVD segment (Fig. 1; seeds 1-2)",
                         variant_table(records, "sweep", SWEEP, "goat (Adam s)", adam_lr, list(SWEEP_TASKS),
                                       SWEEP_SEEDS)))
    if paper_lr is not None:
        sections.append(("GOAT-s against GOAT (paper scale, seeds 1-3)",
                         variant_table(records, "ablation", dict([GOAT_S]), "goat", paper_lr, list(TASKS),
                                       LATER_SEEDS)))
    sections.append(("Compute", compute(records)))
    return "\n\n".join(f"### {title}\n\n{body}" for title, body in sections if body) + "\n"


def plots(records, out):
    import plots as plotting
    sweeps = {}
    for r in records.results.values():
        if r["part"] in ("head", "tune"):
            sweeps.setdefault(r["label"], {}).setdefault(r["lr"], []).append(val_score(r))
    curves = {label: sorted((lr, statistics.mean(v) if all(map(math.isfinite, v)) else float("nan"))
                            for lr, v in by_lr.items() if len(v) == len(TASKS))
              for label, by_lr in sweeps.items()}
    if any(curves.values()):
        plotting.plot_lr_sweeps({k: v for k, v in curves.items() if v}, out / "study_lr_sweep.png")
    for task in TASKS:
        loss_curves = {}
        for label in [x for x in METHODS if x in records.chosen]:
            runs = [records.record("seeds", task, label, records.chosen[label], s) for s in REPORT_SEEDS]
            runs = [r for r in runs if r and r["status"] == "ok"]
            if runs:
                length = min(len(r["loss_curve"]) for r in runs)
                loss_curves[label] = [(runs[0]["loss_curve"][i][0], statistics.mean(r["loss_curve"][i][1] for r in runs))
                                      for i in range(length)]
        if loss_curves:
            plotting.plot_loss_curves(loss_curves, out / f"study_loss_{task}.png",
                                      f"MiniLM on {task}: each method at its chosen setting, mean of seeds 1-5")
    if "goat" in records.chosen:  # one seed's: the seeds' maps barely correlate, and a mean would look even
        for task in TASKS:
            runs = [records.record("seeds", task, "goat", records.chosen["goat"], s) for s in REPORT_SEEDS]
            run = next((r for r in runs if r and r["status"] == "ok" and r.get("expert_load")), None)
            if run:
                plotting.plot_expert_load([run], out / f"study_expert_load_{task}.png",
                                          f"GOAT (lr {run['lr']:g}) on {task}, seed {run['seed']}, last training batch:")
    headline = {TASK_NAMES[t]: ({x: with_interval(records.headline_scores(x).get(t, {}).values())
                                 for x in ["head only"] + [x for x in METHODS if x in records.chosen]},
                                None) for t in TASKS}  # the majority class would squeeze the methods' range
    if any(values for rows, _ in headline.values() for values, _ in rows.values()):
        plotting.plot_intervals(headline, out / "study_headline.png", "Each method at its chosen setting: each seed "
                                "(dots; diverged: the majority class), mean and 95% interval\n(methods share seeds: "
                                "compare them by the paired differences in results/study.md)", "dev metric x100")
    adam_lr = records.chosen.get("goat (Adam s)")
    if adam_lr is not None:
        variants = {**ABLATIONS, **EXPERT_COUNTS}
        differences = {}
        for task in TASKS:
            reference = records.dev("seeds", task, "goat (Adam s)", adam_lr, LATER_SEEDS)
            rows = {}
            for label in variants:
                part = "experts" if label in EXPERT_COUNTS else "ablation"
                scores = records.dev(part, task, label, adam_lr, LATER_SEEDS)
                rows[label] = with_interval([scores[s] - reference[s] for s in scores if s in reference])
            differences[TASK_NAMES[task]] = (rows, 0.0)
        if any(values for rows, _ in differences.values() for values, _ in rows.values()):
            plotting.plot_intervals(differences, out / "study_ablations.png", "Each variant minus GOAT with the Adam "
                                    "scale, paired by seed (1-3): dots, mean and 95% interval", "difference x100")
        seeds = SWEEP_SEEDS  # the paper's Fig. 1: each segment's score, GOAT and the head alone beside them
        references = {"goat (Adam s), 8 experts": ("seeds", "goat (Adam s)", adam_lr),
                      "head only": ("seeds", "head only", records.chosen["head"])}
        rows = {**references, **{label: ("sweep", label, adam_lr) for label in SWEEP}}
        segments = {TASK_NAMES[t]: ({label: (list(records.dev(part, t, run_label, lr, seeds).values()), None)
                                     for label, (part, run_label, lr) in rows.items()}, None) for t in SWEEP_TASKS}
        if any(panel_rows[label][0] for panel_rows, _ in segments.values() for label in SWEEP):
            plotting.plot_intervals(segments, out / "study_segments.png", "One rank-32 LoRA from each SVD segment "
                                    f"(0: the largest singular values),\nAdam scale, lr {adam_lr:g}: each seed (dots) "
                                    "and their mean (2 seeds: no interval)", "dev metric x100", seeds=seeds)


def with_interval(values):
    """(values, half-width of their 95% t interval, or None) for plots.plot_intervals."""
    values = list(values)
    return values, t_interval(values)[1] if values else None


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data_dir", default=str(HERE.parent / "shared" / "data" / "glue"))
    p.add_argument("--results_dir", default=str(HERE / "results" / "study"))
    p.add_argument("--runs_dir", default=str(HERE / "runs" / "study"), help="full run outputs and the pinned code")
    p.add_argument("--workers", type=int, default=2, help="runs at once, one thread each")
    p.add_argument("--model", default=None, help="the model every run fine-tunes (default: train.py's, all-MiniLM-L6-v2)")
    p.add_argument("--report_only", action="store_true")
    p.add_argument("--next", action="store_true", help="list the runs due now and stop")
    args = p.parse_args(argv)
    if not args.report_only and not args.next:
        run_study(args)
    results, set_aside = current(load_results(args.results_dir), pinned_commit(args.results_dir), args.model)
    if args.next:
        due = [r for r in plan(results)[0] if r.id not in results]
        print("\n".join(f"{r.part:8} {r.id}" for r in due) or "nothing due: the study is complete")
        return
    records = Records(results, set_aside)
    text = report(records)
    out = Path(args.results_dir).parent
    (out / "study.md").write_text(text)
    plots(records, out)
    print(text)


if __name__ == "__main__":
    main()
