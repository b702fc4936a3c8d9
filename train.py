"""
Fine-tune a Hugging Face model with GOAT (or a baseline) and report the task metric.

    python train.py                      # all-MiniLM-L6-v2 + GOAT on the offline docstrings task (CPU)
    python train.py --task=sst2 --data_dir=../shared/data/glue --method=lora
    python train.py --task=images --data_dir=DIR --model=<a ViT or CLIP directory>
    torchrun --standalone --nproc_per_node=8 train.py --model=roberta-large --task=rte ...

Methods: goat, molora, lora, pissa, milora (presets of goat.py at equal total rank),
full (full fine-tuning) and full-moe (the upcycled mixture of full experts).

`run` below reads as the machine learning, top to bottom: the data, the model with the
method applied, the optimizer and schedule, the loop, the result; the pieces it calls
follow it (the data, the model, the training step, evaluation). The objective, in
train_step: the task loss plus --balance_coef times GOAT's balance loss, summed over
the routed layers. What keeps a run safe sits behind calls into flags.py (every flag
and its checks), processes.py (torchrun, DDP, FSDP, signals) and run_folder.py (the
output folder, checkpoints, adapters and records).
"""
import json
import math
import os
import sys
import time
from contextlib import nullcontext
from functools import partial

import torch

import data
import flags
import goat
import processes
import run_folder
from processes import print0

# ---------------------------------------------------------------------------------
# The run: data, model, optimizer, loop, result (the pieces follow below)


def main(argv=None):
    args = flags.parse_args(argv)
    env = processes.start(args)
    folder, failed = None, True
    try:
        folder = run_folder.claim(args, env)
        metrics = run(args, env, folder)
        failed = False
        return metrics
    finally:
        if folder is not None and env.master:
            folder.release(failed)
        processes.stop(env)


def run(args, env, folder):
    t0 = time.time()
    dtype = args.dtype  # resolved by processes.start (auto: bf16 on a GPU with bf16 tensor cores)
    autocast = (nullcontext() if dtype == "float32"
                else torch.autocast(device_type=env.device_type, dtype=getattr(torch, dtype)))
    scaler = torch.amp.GradScaler(env.device_type, enabled=dtype == "float16")  # only fp16 needs loss scaling

    # the data: the same on every process, and on a resume the data the checkpoint trained on
    torch.manual_seed(args.seed)  # same on every process: identical initial adapters and routers
    task, tokenizer, items, collate = processes.together(env, lambda: load_data(args))
    fingerprint = run_folder.data_fingerprint(task, items)
    processes.same_everywhere(env, {"training examples": len(items), "data": fingerprint}, "read different data",
                              "put the same files (and tokenizer, transformers version) on every node")
    per_epoch = len(items) // (args.batch_size * args.grad_accum * env.world)
    if per_epoch == 0 and not args.evaluate_only:
        raise SystemExit(f"{len(items)} training examples are fewer than one global batch; lower --batch_size "
                         f"or --grad_accum")
    max_steps = args.max_steps if args.max_steps is not None else math.ceil(args.epochs * per_epoch)
    record = run_folder.run_record(args, env, fingerprint, max_steps)
    resume = run_folder.resume_point(folder, args, env, fingerprint, max_steps, record)  # None, or the step to go on

    # the model with the method applied, on its device (an adapter or checkpoint rebuilt without SVD)
    full = args.method.startswith("full")
    base_dtype = torch.bfloat16 if (dtype == "bfloat16" and not full) else torch.float32  # frozen base in bf16
    model, heads, fresh_heads = processes.together(env, lambda: load_model(args, task, tokenizer, base_dtype))
    if not env.fsdp:  # under FSDP the whole model may not fit one device: fully_shard moves the shards
        model.to(env.device)
    state = run_folder.adapter_or_checkpoint(folder, args, env, resume)
    apply_method(model, args, heads, env, state)
    if not env.fsdp:
        model.to(env.device)
    n_total = sum(p.numel() for p in model.parameters())  # counted whole, before FSDP shards them
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print0(env, f"{args.method} on {run_folder.model_label(args)}: {n_trainable:,} trainable of {n_total:,} parameters"
                + (f"; heads trained in full: {', '.join(heads)}" if heads else ""))
    if env.distributed:
        processes.seed_per_rank(args.seed, env.rank)  # each process its own dropout masks
    raw_model, model = model, processes.wrap(model, args, env)  # DDP, FSDP, torch.compile

    def learned():  # what the run learns, whole on rank 0; every process calls it (FSDP gathers shards)
        return run_folder.learned_state(raw_model, args.method, head_parameters(raw_model, heads), env)

    # the optimizer: AdamW without weight decay, a fresh head at a rate of its own (one the checkpoint or
    # --adapter holds, already trained, learns at --lr)
    params = [p for p in raw_model.parameters() if p.requires_grad]  # after wrapping: FSDP replaces them by shards
    fresh = {id(p) for p in head_parameters(raw_model, [] if args.adapter else fresh_heads).values()}
    groups = [{"params": [p for p in params if id(p) not in fresh], "peak_lr": args.lr},
              {"params": [p for p in params if id(p) in fresh], "peak_lr": args.head_lr}]
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=args.lr, weight_decay=0.0)
    start_step = run_folder.restore(folder, resume, raw_model, optimizer, scaler, env, full) if resume else 0
    resumed_step_evaluated = processes.from_rank0(env, lambda: run_folder.start_records(
        folder, args, env, start_step if resume else None, record))

    def evaluate_and_log(done):  # an --eval_every evaluation
        evals = evaluate(raw_model, task, tokenizer, args, env, autocast)[0]
        print0(env, f"step {done}: eval {json.dumps(evals)}")
        if env.master:
            folder.append_metrics({"step": done, "eval": evals})
    evaluation_due = lambda done: args.eval_every and done % args.eval_every == 0 and 0 < done < max_steps
    if evaluation_due(start_step) and not resumed_step_evaluated:  # a stop signal at that step left it for now
        evaluate_and_log(start_step)

    # the loop
    model.train()
    health, stop = processes.Health(env.device), processes.StopSignals()
    workers = processes.loader_workers(args, task, env)
    stream = micro_batches(Batches(items, collate, args, env.rank, env.world, start_step, max_steps), workers)
    routed_layers = sum(isinstance(m, goat.Routed) and m.experts > 1 for m in raw_model.modules())
    t_log, t_loop = time.time(), time.time()
    tokens, skipped = 0, []

    def checked(done, task_loss, balance, grad_norm):  # the one host sync, on logging and checkpoint steps only
        my_tokens = torch.tensor(tokens, dtype=torch.float64, device=env.device)  # since the last log; mean x world
        values = processes.mean_over_processes(env, [task_loss, balance, grad_norm.float(), health.flag(), my_tokens])
        health.check(done, values, args, scaler.is_enabled())  # never save a bad state over a good one
        return values  # the means over processes

    def save(done):
        run_folder.save_checkpoint(folder, raw_model, optimizer, scaler, done, record, env, learned)

    def after_step(done, task_loss, balance, grad_norm, n_tokens, unread):
        """The bookkeeping of a step, on every process alike: the health check, the log, the
        checkpoint, the --eval_every evaluation. True: a stop signal came and the checkpoint is written."""
        nonlocal tokens, skipped, t_log
        tokens, skipped = tokens + n_tokens, skipped + unread
        for path in unread:
            print(f"skipped an unreadable image: {path}", flush=True)
        # under fp16 an infinite gradient norm is a step the loss scaler skipped, not a fault
        health.update(done, task_loss, grad_norm if not scaler.is_enabled() else task_loss)
        stopping = processes.any_rank(env, stop.received is not None)
        logging = done % args.log_every == 0 or done == max_steps or done == start_step + 1
        saving = done % args.ckpt_every == 0 or done == max_steps or stopping
        if logging or saving:
            values = checked(done, task_loss, balance, grad_norm)
        now = time.time()
        if logging and env.master:
            task_loss_, balance_, grad_norm_, _, tokens_mean = values
            tokens_all = tokens_mean * env.world
            balance_ /= max(routed_layers, 1)  # shown as its mean over layers: 1 is perfectly even routing
            folder.log({"step": done, "loss": task_loss_ + args.balance_coef * balance_ * routed_layers,
                        "task_loss": task_loss_, "balance_loss": balance_ if routed_layers else None,
                        "grad_norm": grad_norm_, "lr": optimizer.param_groups[0]["lr"],
                        "tokens": round(tokens_all), "tokens_per_s": tokens_all / max(now - t_log, 1e-9),
                        "expert_load": {k: [round(x, 4) for x in v.tolist()]  # rank 0's latest micro-batch
                                        for k, v in goat.expert_load(raw_model).items()}},
                       max_steps, minutes_left=(now - t_loop) / (done - start_step) * (max_steps - done) / 60)
        busy = time.time()
        if saving:  # before any evaluation: one that runs out of memory or outlasts a grace period loses no step
            save(done)
            # a signal during a long write (a full model) or evaluation (generation on a large model) stops the
            # run at this step, not a step later: the scheduler's grace period may not last another step
            stopping = stopping or processes.any_rank(env, stop.received is not None)
        if evaluation_due(done) and not stopping:  # if stopping, the resumed run evaluates first
            evaluate_and_log(done)
            stopping = processes.any_rank(env, stop.received is not None)
            if stopping and not saving:
                checked(done, task_loss, balance, grad_norm)
                save(done)
        t_log += time.time() - busy  # the speed counts training steps alone
        if logging:  # every process counts afresh
            tokens, t_log = 0, time.time()
        return stopping and done < max_steps

    try:
        for step in range(start_step, max_steps):
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(step, group["peak_lr"], args, max_steps)
            micro = [next(stream) for _ in range(args.grad_accum)]
            task_loss, balance, grad_norm, n_tokens, unread = train_step(model, raw_model, micro, optimizer, scaler,
                                                                         params, args, env, autocast)
            if after_step(step + 1, task_loss, balance, grad_norm, n_tokens, unread):
                raise run_folder.stopped(env, stop.received, step + 1, max_steps, folder)
    finally:
        stop.restore()
        stream.close()

    # the result: the adapter first (an evaluation that runs out of memory loses nothing), then the metric
    unsaved = None  # why the adapter could not be written (a full disk): said after the metric
    if not args.evaluate_only:
        weights = learned()
        unsaved = processes.from_rank0(env, lambda: run_folder.save_adapter(folder, weights, args,
                                                                              record["trained_steps"]))
    metrics, scored = evaluate(raw_model, task, tokenizer, args, env, autocast)
    unreadable = task.unreadable_by_set  # image files left out when the task was read
    skipped = {"train": sum(processes.gather(env, len(skipped))) + unreadable.get("train", 0),
               **{name: len(examples) - len(scored[name]) + unreadable.get(name, 0)
                  for name, examples in task.evals.items()}}
    result = {"task": task.name, "method": args.method, "model": run_folder.model_label(args), "metrics": metrics,
              "main_metric": task.metric,
              "majority_baseline": task.majority_baseline(scored) if task.kind != "generation" else None,
              "trainable_params": n_trainable, "heads": heads,
              "total_params": n_total, "train_examples": len(items),
              "steps": max_steps, "weights": record["weights"], "trained_steps": record["trained_steps"],
              "skipped_images": skipped if task.kind == "image" else None, "seconds": round(time.time() - t0, 1)}
    if env.master:
        for name, values in metrics.items():
            base = (result["majority_baseline"] or {}).get(name, {}).get(task.metric)
            print(f"{name}: {task.metric} {values[task.metric]:.4f}"
                  + (f" (majority-class baseline {base:.4f})" if base is not None else ""))
        print("RESULT " + json.dumps(result), flush=True)  # before anything is written: a full disk loses no result
    if unsaved:
        raise SystemExit(unsaved)
    processes.from_rank0(env, lambda: run_folder.finish(folder, result))
    return metrics


# ---------------------------------------------------------------------------------
# Data


def load_data(args):
    """The task (with its validation split and caps), its tokenizer (or image processor),
    the training items and the function that batches them."""
    from transformers import AutoTokenizer
    split = lambda s: [x for x in s.split(",") if x]
    try:
        task = data.load_task(args.task, args.data_dir, split(args.train_sets), split(args.eval_sets))
        if args.val_examples:
            task.train, task.evals["val"] = data.split_validation(task.train, args.val_examples)
    except (OSError, ValueError) as e:
        raise SystemExit(f"data: {e}") from None
    if args.max_train_examples:
        order = torch.randperm(len(task.train), generator=torch.Generator().manual_seed(args.seed))
        task.train = [task.train[i] for i in order[:args.max_train_examples].tolist()]
    if args.max_eval_examples:
        task.evals = {k: v[:args.max_eval_examples] for k, v in task.evals.items()}
    model = args.model or flags.default_model()
    if task.kind == "image":  # images stay paths: decoded batch by batch, by the model's own processor
        from transformers import AutoImageProcessor
        try:
            processor = AutoImageProcessor.from_pretrained(model)
        except (OSError, ValueError) as e:  # ValueError: a path that is no folder, to older huggingface_hub
            raise SystemExit(f"--model={model}: cannot load its image processor ({str(e)[:300]})") from None
        return task, processor, task.train, partial(data.collate_images, processor=processor)
    try:
        tokenizer = AutoTokenizer.from_pretrained(model)
    except (OSError, ValueError) as e:  # no such folder or hub id (older huggingface_hub: a ValueError), no network
        raise SystemExit(f"--model={model}: cannot load its tokenizer ({str(e)[:300]})") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.sep_token
    encode = data.encode_generation if task.kind == "generation" else data.encode_classification
    try:
        items = encode(task.train, tokenizer, args.max_len)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    return task, tokenizer, items, partial(data.collate, pad_id=tokenizer.pad_token_id,
                                           regression=task.kind == "regression")


class Batches(torch.utils.data.Dataset):
    """Micro-batch k of the run from `start_step` on. Each epoch's example order is a
    seeded permutation, sorted by length inside windows of 50 global batches whose
    batches are shuffled again: little padding, still random. A function of (seed,
    epoch) alone, so a resume at any step needs nothing else; each process reads its own
    share of every global batch. It holds plain values, so loader workers can be spawned."""

    def __init__(self, items, collate, args, rank, world, start_step, max_steps):
        self.items, self.collate, self.seed = items, collate, args.seed
        self.batch_size, self.accum, self.rank, self.world = args.batch_size, args.grad_accum, rank, world
        self.global_batch = args.batch_size * args.grad_accum * world
        self.per_epoch = len(items) // self.global_batch
        self.start_step, self.count = start_step, max(0, max_steps - start_step) * self.accum
        self.cache = {}

    def epoch(self, epoch):
        if epoch not in self.cache:
            gen = torch.Generator().manual_seed(self.seed * 1000 + epoch)
            perm = torch.randperm(len(self.items), generator=gen).tolist()
            window = 50 * self.global_batch
            perm = [i for w in range(0, len(perm), window)
                    for i in sorted(perm[w:w + window], key=lambda i: len(self.items[i].get("input_ids", ())))]
            batches = [perm[b * self.global_batch:(b + 1) * self.global_batch] for b in range(self.per_epoch)]
            self.cache = {epoch: [batches[b] for b in torch.randperm(len(batches), generator=gen).tolist()]}
        return self.cache[epoch]

    def __len__(self):
        return self.count

    def __getitem__(self, k):
        step, micro = divmod(k, self.accum)
        epoch, position = divmod(self.start_step + step, self.per_epoch)
        start = (micro * self.world + self.rank) * self.batch_size
        return self.collate([self.items[i] for i in self.epoch(epoch)[position][start:start + self.batch_size]])


def micro_batches(batches, workers):
    """The micro-batches in order, from loader workers when asked (they decode images
    ahead). Its own generator: the loader draws nothing from the global stream."""
    loader = iter(torch.utils.data.DataLoader(batches, batch_size=None, num_workers=workers,
                                              generator=torch.Generator(), prefetch_factor=4 if workers else None,
                                              pin_memory=workers > 0,
                                              worker_init_fn=processes.ignore_stop_signals if workers else None))
    try:
        yield from loader
    finally:
        del loader  # the last reference: the iterator shuts its workers down now


# ---------------------------------------------------------------------------------
# The model, with the method applied


def load_model(args, task, tokenizer, base_dtype):
    """The pretrained model with the task's head; the names of its heads (trained in full,
    never wrapped: modules the checkpoint did not contain, and any named like a head); and
    of those, the fresh ones (the checkpoint lacked some of their weights)."""
    from transformers import AutoModelForCausalLM, AutoModelForImageClassification, AutoModelForSequenceClassification
    path = args.model or flags.default_model()
    if task.kind == "generation":
        model, info = AutoModelForCausalLM.from_pretrained(path, dtype=base_dtype, output_loading_info=True)
    elif task.kind == "image":  # ViT, or CLIP's vision tower with a new classification head
        model, info = AutoModelForImageClassification.from_pretrained(
            path, num_labels=task.num_labels, dtype=base_dtype, ignore_mismatched_sizes=True, output_loading_info=True)
    else:
        model, info = AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=task.num_labels, dtype=base_dtype, ignore_mismatched_sizes=True, output_loading_info=True,
            problem_type="regression" if task.kind == "regression" else "single_label_classification")
    new = {key.rsplit(".", 1)[0] for key in info.get("missing_keys", ()) if "." in key}
    new |= {key.rsplit(".", 1)[0] for key, *_ in info.get("mismatched_keys", ()) if "." in key}
    heads = {name for name, _ in model.named_modules()
             if name and (name in new or name.split(".")[-1] in goat.DEFAULT_EXCLUDE) and name.split(".")[-1] != "lm_head"}
    heads = {h for h in heads if not any(h.startswith(other + ".") for other in heads)}
    for name in heads:  # trained heads keep float32 weights for AdamW, also on a bf16 base
        model.get_submodule(name).float()
    if task.kind != "image":
        flags.check_max_len(args, model.config, tokenizer)
        if model.config.pad_token_id is None:  # e.g. LLaMA: batches of several sequences need it
            model.config.pad_token_id = tokenizer.pad_token_id
    fresh = {h for h in heads if any(n == h or n.startswith(h + ".") for n in new)}
    return model, sorted(heads), sorted(fresh)


def head_parameters(model, heads):
    """Task heads are trained in full, as in the paper."""
    return {f"{h}.{n}": p for h in heads for n, p in model.get_submodule(h).named_parameters()}


def apply_method(model, args, heads, env, state=None):
    """Wrap the model for args.method: GOAT and its baselines through goat.add_goat, the
    upcycled full MoE, or nothing (full fine-tuning). With `state` (an adapter's or a
    checkpoint's) the adapter is rebuilt from it, without an SVD."""
    targets = args.targets if args.targets == "all-linear" else [t for t in args.targets.split(",") if t]
    exclude = tuple(dict.fromkeys(goat.DEFAULT_EXCLUDE + tuple(heads)))  # the heads are trained in full
    try:
        if args.method == "full-moe":  # E trainable copies of every target weight; everything trains
            goat.add_upcycled_moe(model, args.experts or 8, args.top_k or 2, targets, exclude)
        if state is not None:
            run_folder.load_trainable_state(model, state, head_parameters(model, heads))
        elif args.method in flags.ADAPTER_METHODS:
            cfg = flags.method_config(args)
            factors = processes.shared_factors(model, cfg, targets, exclude, env)  # the SVDs, split over the processes
            goat.add_goat(model, cfg, targets, exclude, factors=factors, svd_device=env.device if env.fsdp else None)
    except ValueError as e:  # a target that matches nothing, a rank above a layer's size, ...
        raise SystemExit(f"--method={args.method} --targets={args.targets}: {e}") from None
    if args.method in flags.ADAPTER_METHODS:
        for p in head_parameters(model, heads).values():
            p.requires_grad_(True)
    else:
        model.requires_grad_(True)


# ---------------------------------------------------------------------------------
# Training


def learning_rate(step, peak, args, max_steps):
    """Linear warmup to `peak`, then cosine decay to zero."""
    warmup = int(args.warmup * max_steps) if args.warmup < 1 else int(args.warmup)
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, max_steps - warmup)
    return peak * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def train_step(model, raw_model, batches, optimizer, scaler, params, args, env, autocast):
    """One optimizer step over the grad_accum micro-batches (CPU tensors). Returns device
    tensors (task loss, balance loss summed over routed layers, gradient norm), the tokens
    this process saw and the image files skipped: no host sync."""
    task_loss_sum = balance_sum = 0.0
    tokens, skipped = 0, []
    for micro, cpu_batch in enumerate(batches):
        skipped += cpu_batch.pop("skipped", [])
        count = cpu_batch["attention_mask"].sum() if "attention_mask" in cpu_batch else len(cpu_batch["labels"])
        tokens += int(count)  # this process's, counted on the CPU: no device sync
        batch = {k: v.to(env.device, non_blocking=True) for k, v in cpu_batch.items()}
        last = micro == len(batches) - 1
        if env.fsdp:  # a micro-step that skips the reduce-scatter keeps its gradients unsharded: small for
            # adapters, for full fine-tuning the whole model's on every GPU, so full methods reduce every time
            model.set_requires_gradient_sync(last or args.method.startswith("full"))
        # DDP all-reduces on the last micro-step only
        with (model.no_sync() if hasattr(model, "no_sync") and not last else nullcontext()):
            with autocast:  # backward runs outside: autocast's cached low-precision weights go with their layers
                out = model(**batch)
                task_loss = out.loss
                if "labels" in cpu_batch and not bool((cpu_batch["labels"] != -100).any()) and hasattr(out, "logits"):
                    # every image of this micro-batch unreadable: the mean over no labels is NaN;
                    # a zero loss on the graph keeps DDP's gradient exchange (checked on the CPU)
                    task_loss = out.logits.sum() * 0.0
                balance = goat.balance_loss(raw_model).to(task_loss.device)  # GOAT's one addition to training
                loss = (task_loss + args.balance_coef * balance) / args.grad_accum
            scaler.scale(loss).backward()
        task_loss_sum = task_loss_sum + task_loss.detach().float() / args.grad_accum
        balance_sum = balance_sum + balance.detach().float() / args.grad_accum
    scaler.unscale_(optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(params, args.grad_clip if args.grad_clip > 0 else float("inf"))
    grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return task_loss_sum, balance_sum, grad_norm, tokens, skipped


# ---------------------------------------------------------------------------------
# Evaluation


@torch.no_grad()
def evaluate(model, task, tokenizer, args, env, autocast):
    """({eval set: metrics}, {eval set: examples scored}); each process scores a shard
    and rank 0 gathers. An image that fails to decode is left out of the metric and of
    the majority-class baseline alike; a set with nothing scored stops the run."""
    was_training = model.training
    model.eval()
    results, scored = {}, {}
    for name, examples in task.evals.items():
        mine = list(range(env.rank, len(examples), env.world))
        todo = mine
        if env.fsdp:  # every process runs the same forwards (each gathers weights with the others)
            todo = mine + [mine[-1] if mine else 0] * (math.ceil(len(examples) / env.world) - len(mine))
        preds = predict(model, [examples[i] for i in todo], task, tokenizer, args, env, autocast)
        pairs = [(i, p) for i, p in zip(mine, preds[:len(mine)]) if p is not None]  # None: an unreadable image
        pairs = sorted(pair for part in processes.gather(env, pairs) for pair in part)
        if not pairs:
            raise SystemExit(f"{name}: no example could be scored (every image unreadable?); check the data")
        scored[name] = [i for i, _ in pairs]
        ordered = [p for _, p in pairs]
        if task.kind == "generation":
            results[name] = {"accuracy": sum(ordered) / len(ordered)}
        else:
            results[name] = task.score(ordered, [examples[i]["label"] for i in scored[name]])
        if len(pairs) < len(examples):
            print0(env, f"{name}: {len(examples) - len(pairs)} unreadable image(s) left out of the metric")
    model.train(was_training)
    return results, scored


def predict(model, examples, task, tokenizer, args, env, autocast):
    preds, size = [], args.eval_batch_size
    for i in range(0, len(examples), size):
        chunk = examples[i:i + size]
        if task.kind == "generation":
            tokenizer.padding_side = "left"
            enc = tokenizer([ex["prompt"] for ex in chunk], return_tensors="pt", padding=True,
                            add_special_tokens=tokenizer.bos_token_id is not None).to(env.device)
            with autocast:
                out = model.generate(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                                     max_new_tokens=args.max_new_tokens, do_sample=False,
                                     pad_token_id=tokenizer.pad_token_id, synced_gpus=env.fsdp)
            texts = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
            preds += [int(data.answer_correct(t, ex["label"])) for t, ex in zip(texts, chunk)]
        elif task.kind == "image":  # a forward for every chunk, readable or not (FSDP: all processes gather)
            images, ok, _ = data.read_images(chunk)
            pixels = tokenizer(images, return_tensors="pt")["pixel_values"].to(env.device)
            with autocast:
                classes = model(pixel_values=pixels).logits.float().argmax(-1).tolist()
            preds += [c if good else None for c, good in zip(classes, ok)]
        else:
            batch = data.collate(data.encode_classification(chunk, tokenizer, args.max_len),
                                 tokenizer.pad_token_id, task.kind == "regression")
            batch.pop("labels")
            with autocast:
                logits = model(**{k: v.to(env.device) for k, v in batch.items()}).logits.float()
            preds += logits.squeeze(-1).tolist() if task.kind == "regression" else logits.argmax(-1).tolist()
    return preds


if __name__ == "__main__":
    if "RANK" in os.environ:
        processes.run_and_exit(main, sys.argv[1:])
    else:
        main()
