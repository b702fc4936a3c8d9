"""
Is the study's head rate a safe default for heads unlike the study's?

The study (study.py) chose the task head's learning rate, 0.3, on all-MiniLM-L6-v2,
whose classifier is one linear layer on BERT's pretrained pooler. Other models bring
other fresh heads: RoBERTa's is dense, tanh, dense on the first token, DistilBERT's
dense, ReLU, dense. Here each of the three trains alone on the frozen encoder's
features (as the study's head-only control, without the encoder's forward each step),
with train.py's optimizer and schedule (AdamW without weight decay, 6% warmup then
cosine, clipping at 1, batch 32, 3 epochs, dropout 0.1, weights drawn with the model's
initializer_range), at every rate of the study's ladder from 1e-4 to 1, seeds 1-3,
scored on each task's validation split (the dev sets are never scored).

The rule for train.py's --head_lr default, the study's own selection rule with the
(head, task) pairs in place of the tasks: a rate's score on a pair is (metric -
majority) / (best rate's metric - majority), its worst pair decides (ties: the mean);
pairs where no rate beats the majority class by a point tell nothing and are left out.
It was written after a first run of this probe on SST-2 alone (scored on its dev set)
had shown the two-layer heads falling at 0.3, before any other task ran. The probe
leaves the encoder frozen: in training the encoder's features move under the head,
which the study's runs measure and this does not.

    python head_rate.py                  # about 5 minutes on one CPU thread
    python head_rate.py --report_only    # results/head_rate.md from results/head_rate.json
"""
import argparse
import json
import math
import statistics
import time
from pathlib import Path

import torch

import align
import data
import flags
import run_folder

HERE = Path(__file__).resolve().parent
TASKS = {"docstrings": (None, 400), "sst2": (4000, 1000), "cola": (None, 2000)}  # (train cap, validation): study.py
RATES = [1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0]
SEEDS = [1, 2, 3]
HEADS = {"linear on the pooler (BERT)": "pooler", "dense, tanh, dense (RoBERTa)": "first",
         "dense, ReLU, dense (DistilBERT)": "first"}  # name: the features it reads


def features(task, tokenizer, encoder, max_len=128):
    """{split: (first-token states, pooler outputs, labels)} of the frozen encoder."""
    out = {}
    for split, examples in [("train", task.train), ("val", task.evals["val"])]:  # the dev set is never scored
        first, pooled = [], []
        with torch.no_grad():
            for i in range(0, len(examples), 64):
                chunk = examples[i:i + 64]
                pair = [ex["text_pair"] for ex in chunk] if chunk[0]["text_pair"] is not None else None
                batch = tokenizer([ex["text"] for ex in chunk], pair, padding=True, truncation=True,
                                  max_length=max_len, return_tensors="pt")
                states = encoder(**batch)
                first.append(states.last_hidden_state[:, 0])
                pooled.append(states.pooler_output)
        out[split] = (torch.cat(first), torch.cat(pooled), torch.tensor([ex["label"] for ex in examples]))
    return out


def make_head(name, width, classes, std):
    drop = torch.nn.Dropout(0.1)
    if name.startswith("linear"):
        head = torch.nn.Sequential(drop, torch.nn.Linear(width, classes))
    else:
        act = torch.nn.Tanh() if "tanh" in name else torch.nn.ReLU()
        head = torch.nn.Sequential(drop, torch.nn.Linear(width, width), act, torch.nn.Dropout(0.1),
                                   torch.nn.Linear(width, classes))
    for layer in head:
        if isinstance(layer, torch.nn.Linear):  # as Hugging Face initialises a fresh head
            torch.nn.init.normal_(layer.weight, std=std)
            torch.nn.init.zeros_(layer.bias)
    return head


def train_head(name, feats, classes, lr, seed, std, epochs=3, batch=32):
    """The head's predictions on the validation split after training on the train split."""
    column = 1 if HEADS[name] == "pooler" else 0
    x, y = feats["train"][column], feats["train"][2]
    torch.manual_seed(seed)
    head = make_head(name, x.shape[1], classes, std)
    optimizer = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=0.0)
    per_epoch = len(x) // batch
    steps, warmup = epochs * per_epoch, int(0.06 * epochs * per_epoch)
    for step in range(steps):
        if step % per_epoch == 0:
            order = torch.randperm(len(x))
        rows = order[(step % per_epoch) * batch:][:batch]
        for group in optimizer.param_groups:  # train.py's learning_rate
            group["lr"] = lr * ((step + 1) / warmup if step < warmup else
                                0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup))))
        loss = torch.nn.functional.cross_entropy(head(x[rows]), y[rows])
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(head.parameters(), 1.0)
        optimizer.step()
    head.eval()
    with torch.no_grad():
        return head(feats["val"][column]).argmax(-1).tolist()


def run(args):
    from transformers import AutoModel, AutoTokenizer
    torch.set_num_threads(1)
    # the commit before the run: one made meanwhile did not make the records
    started, made_by = time.time(), align.commit(("head_rate.py", "data.py", "flags.py", "run_folder.py"))
    model = args.model or flags.default_model()
    tokenizer, encoder = AutoTokenizer.from_pretrained(model), AutoModel.from_pretrained(model).eval()
    std = encoder.config.initializer_range
    records = []
    for name, (cap, val_n) in TASKS.items():
        task = data.load_task(name, args.data_dir if name != "docstrings" else None)
        task.train, task.evals["val"] = data.split_validation(task.train, val_n)
        if cap:
            order = torch.randperm(len(task.train), generator=torch.Generator().manual_seed(0))
            task.train = [task.train[i] for i in order[:cap].tolist()]
        feats = features(task, tokenizer, encoder)
        majority = task.majority_baseline()["val"][task.metric]
        golds = feats["val"][2].tolist()
        for head in HEADS:
            for lr in RATES:
                scores = [task.score(train_head(head, feats, task.num_labels, lr, s, std), golds)[task.metric]
                          for s in SEEDS]
                records.append({"task": name, "head": head, "lr": lr, "val": scores, "majority": majority})
                print(f"{name:10s} {head:32s} lr {lr:<7g} val {' '.join(f'{v:.3f}' for v in scores)}", flush=True)
    return {"model": run_folder.model_label(args), "commit": made_by, "seconds": round(time.time() - started),
            "records": records}


def choose(records):
    """(the rate, {(head, task): its relative score at each rate}) by the rule above."""
    pairs = {(r["head"], r["task"]) for r in records}
    mean = {(r["head"], r["task"], r["lr"]): statistics.mean(r["val"]) for r in records}
    majority = {(r["head"], r["task"]): r["majority"] for r in records}
    relative = {}
    for pair in sorted(pairs):
        best = max(mean[(*pair, lr)] for lr in RATES)
        if best > majority[pair] + 0.01:
            relative[pair] = {lr: (mean[(*pair, lr)] - majority[pair]) / (best - majority[pair]) for lr in RATES}
    rate = max(RATES, key=lambda lr: (min(v[lr] for v in relative.values()),
                                      statistics.mean(v[lr] for v in relative.values())))
    return rate, relative


def report(results):
    records = results["records"]
    rate, relative = choose(records)
    lines = [f"Heads trained alone on frozen {results['model']} features, validation metric x100, mean over seeds "
             f"{', '.join(map(str, SEEDS))} (`python head_rate.py --report_only`; made at commit "
             f"{results['commit']} in {results['seconds'] / 60:.0f} minutes on one thread).", "",
             "| task | head | " + " | ".join(f"lr {lr:g}" for lr in RATES) + " |",
             "|---|---|" + "---|" * len(RATES)]
    by = {(r["task"], r["head"], r["lr"]): r for r in records}
    for task in TASKS:
        for head in HEADS:
            if (task, head, RATES[0]) not in by:
                continue
            cells = []
            for lr in RATES:
                r = by[(task, head, lr)]
                cell = f"{100 * statistics.mean(r['val']):.1f}"
                cells.append(f"**{cell}**" if lr == rate else cell)
            majority = by[(task, head, RATES[0])]["majority"]
            lines.append(f"| {task} (majority {100 * majority:.1f}) | {head} | " + " | ".join(cells) + " |")
    worst = {lr: min(v[lr] for v in relative.values()) for lr in RATES}
    left_out = sorted({(r["head"], r["task"]) for r in records} - set(relative))
    lines += ["", "Each rate's worst relative score over the (head, task) pairs, (metric - majority) / (the pair's "
              "best - majority)" + (f"; left out, no rate a point above the majority: "
                                    f"{', '.join(f'{h} on {t}' for h, t in left_out)}" if left_out else "") + ":", "",
              "| " + " | ".join(f"lr {lr:g}" for lr in RATES) + " |", "|" + "---|" * len(RATES),
              "| " + " | ".join(f"{worst[lr]:.2f}" for lr in RATES) + " |", "",
              f"By the rule in head_rate.py's docstring: **--head_lr {rate:g}**."]
    return "\n".join(lines) + "\n"


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data_dir", default=str(HERE.parent / "shared" / "data" / "glue"))
    p.add_argument("--model", default=None, help="default: train.py's, all-MiniLM-L6-v2")
    p.add_argument("--out", default=str(HERE / "results" / "head_rate"))
    p.add_argument("--report_only", action="store_true")
    args = p.parse_args()
    out = Path(args.out)
    if not args.report_only:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".json").write_text(json.dumps(run(args), indent=1) + "\n")
    text = report(json.loads(out.with_suffix(".json").read_text()))
    out.with_suffix(".md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
