"""
The method comparison: MiniLM on GLUE tasks, every method at the same total rank,
budget and learning-rate rule, several seeds. Prints a table (mean and spread per
task, and the average) and saves plots: training-loss curves per method and the
per-layer expert load of GOAT.

    python compare.py --data_dir=../shared/data/glue        # about 80 minutes on 2 CPU cores
    python compare.py --report_only                          # table and plots from finished runs

Each run is train.py in this process, with its own out_dir under --runs_dir; a
finished run (result.json present) is not run again, so an interrupted
comparison continues where it stopped.
"""
import argparse
import contextlib
import json
import statistics
from pathlib import Path

import train

# method label -> train.py flags. All adapters: total rank 32, lr 5e-4; full: 5e-5.
METHODS = {
    "full": ["--method=full"],
    "lora": ["--method=lora"],
    "pissa": ["--method=pissa"],
    "milora": ["--method=milora"],
    "molora": ["--method=molora"],
    "goat": ["--method=goat"],                  # paper scaling s = sqrt(3 eta n / d), eta = 5e-5 / 5e-4
    "goat (eta 1)": ["--method=goat", "--eta=1"],  # paper scaling with eta = 1
    "goat (alpha)": ["--method=goat", "--scaling=alpha"],  # s = alpha / d = 16, the released scripts
}


def run_dir(runs_dir, task, method, seed):
    return Path(runs_dir) / f"{task}_{method.replace(' ', '').replace('(', '-').replace(')', '')}_s{seed}"


def run_all(args, tasks, methods, seeds, sizes):
    total = len(tasks) * len(methods) * len(seeds)
    done = 0
    for seed in seeds:
        for task in tasks:
            for method in methods:
                done += 1
                out = run_dir(args.runs_dir, task, method, seed)
                if (out / "result.json").exists():
                    continue
                out.mkdir(parents=True, exist_ok=True)
                argv = [f"--task={task}", f"--data_dir={args.data_dir}", f"--seed={seed}", f"--out_dir={out}",
                        f"--max_train_examples={sizes[task]}", f"--epochs={args.epochs}", "--log_every=5",
                        "--ckpt_every=100000", *METHODS[method]]
                print(f"[{done}/{total}] {task} {method} seed {seed}", flush=True)
                with open(out / "log.txt", "w") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
                    metrics = train.main(argv)
                result = json.loads((out / "result.json").read_text())
                print(f"    {result['main_metric']} {metrics['dev'][result['main_metric']]:.4f} "
                      f"in {result['seconds']:.0f}s", flush=True)


def collect(args, tasks, methods, seeds):
    scores = {}  # (task, method) -> [main metric per seed]
    for task in tasks:
        for method in methods:
            for seed in seeds:
                path = run_dir(args.runs_dir, task, method, seed) / "result.json"
                if path.exists():
                    result = json.loads(path.read_text())
                    scores.setdefault((task, method), []).append(result["metrics"]["dev"][result["main_metric"]])
    return scores


def table(scores, tasks, methods, seeds, sizes):
    names = {"sst2": "SST-2 acc", "cola": "CoLA mcc", "rte": "RTE acc"}
    lines = ["| method | " + " | ".join(names.get(t, t) for t in tasks) + " | avg |",
             "|---|" + "---|" * (len(tasks) + 1)]
    for method in methods:
        cells, means = [], []
        for task in tasks:
            vals = scores.get((task, method), [])
            if not vals:
                cells.append("-")
                continue
            mean = statistics.mean(vals)
            means.append(mean)
            spread = f" ± {statistics.stdev(vals) * 100:.1f}" if len(vals) > 1 else ""
            cells.append(f"{mean * 100:.1f}{spread}")
        avg = f"{statistics.mean(means) * 100:.1f}" if len(means) == len(tasks) else "-"
        lines.append(f"| {method} | " + " | ".join(cells) + f" | {avg} |")
    counts = ", ".join(f"{t} {sizes[t]}" for t in tasks)
    found = {t: max((len(scores.get((t, m), [])) for m in methods), default=0) for t in tasks}
    lines.append(f"\nDev metric x100, mean ± standard deviation over the seeds run (of {seeds}: "
                 + ", ".join(f"{t} {n}" for t, n in found.items()) + f"); training examples: {counts}.")
    return "\n".join(lines)


def smoothed_curve(out_dir, window=5):
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines() if line]
    rows = [r for r in rows if "task_loss" in r]
    points = []
    for i in range(len(rows)):
        chunk = rows[max(0, i - window + 1):i + 1]
        points.append((rows[i]["step"], statistics.mean(r["task_loss"] for r in chunk)))
    return points


def loss_statistics(args, tasks, methods, seeds):
    """Per task: each method's mean |loss - full fine-tuning's loss| along training
    (smoothed curves, same seeds), and its mean loss over the first half of training."""
    lines = ["\n| task | method | gap to full's loss curve | first-half mean loss |", "|---|---|---|---|"]
    for task in tasks:
        for method in methods:
            gaps, early = [], []
            for seed in seeds:
                mine = run_dir(args.runs_dir, task, method, seed)
                full = run_dir(args.runs_dir, task, "full", seed)
                if not (mine / "result.json").exists():
                    continue
                curve = smoothed_curve(mine, window=10)
                early.append(statistics.mean(loss for _, loss in curve[:len(curve) // 2]))
                if method != "full" and (full / "result.json").exists():
                    gaps += [abs(a[1] - b[1]) for a, b in zip(curve, smoothed_curve(full, window=10))]
            if early:
                gap = f"{statistics.mean(gaps):.3f}" if gaps else "-"
                lines.append(f"| {task} | {method} | {gap} | {statistics.mean(early):.3f} |")
    return "\n".join(lines)


def plots(args, tasks, methods, seeds, results_dir):
    import plots as P
    for task in tasks:
        curves = {}
        for method in methods:
            dirs = [run_dir(args.runs_dir, task, method, s) for s in seeds]
            dirs = [d for d in dirs if (d / "result.json").exists()]
            if dirs:
                per_seed = [smoothed_curve(d) for d in dirs]
                length = min(len(c) for c in per_seed)
                curves[method] = [(per_seed[0][i][0], statistics.mean(c[i][1] for c in per_seed)) for i in range(length)]
        if curves:
            P.plot_loss_curves(curves, results_dir / f"loss_{task}.png", f"MiniLM on {task}: training loss, mean over seeds")
    goat_run = run_dir(args.runs_dir, tasks[0], "goat", seeds[0])
    if (goat_run / "metrics.jsonl").exists():
        P.plot_expert_load(P.read_log(goat_run), results_dir / "expert_load_goat.png", f"GOAT on {tasks[0]}:")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data_dir", default="../shared/data/glue")
    p.add_argument("--tasks", default="sst2,cola,rte")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--train_examples", default="sst2=2000,cola=2000,rte=1000", help="task=count,...")
    p.add_argument("--epochs", type=float, default=3.0)
    p.add_argument("--runs_dir", default="runs/compare")
    p.add_argument("--results_dir", default="results", help="where the table and plots go")
    p.add_argument("--report_only", action="store_true")
    args = p.parse_args()
    tasks, methods = args.tasks.split(","), args.methods.split(",")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        p.error(f"unknown method(s) {unknown}; choose from {list(METHODS)}")
    seeds = [int(s) for s in args.seeds.split(",")]
    sizes = {k: int(v) for k, v in (kv.split("=") for kv in args.train_examples.split(","))}
    if not args.report_only:
        run_all(args, tasks, methods, seeds, sizes)
    scores = collect(args, tasks, methods, seeds)
    text = table(scores, tasks, methods, seeds, sizes) + "\n" + loss_statistics(args, tasks, methods, seeds)
    results_dir = Path(args.results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    (results_dir / "compare.md").write_text(text + "\n")
    (results_dir / "compare.json").write_text(json.dumps({f"{t}/{m}": v for (t, m), v in scores.items()}, indent=1))
    plots(args, tasks, methods, seeds, results_dir)
    print(text)


if __name__ == "__main__":
    main()
