"""
train.py's output folder: nothing lost, nothing mislabelled.

A run owns its --out_dir. It records every file it writes in run.json (the manifest:
the kind of run, training or evaluation, its state and its files), so that
--overwrite removes only what train.py wrote and a folder holding anything else is
refused, with the foreign files named. An evaluation never writes into a training
run's folder. While a run is alive it holds train.lock (an OS lock, released by the
OS when the process dies). Every file is written atomically; metrics.jsonl is
appended line by line. Also here: the checkpoint (written by rank 0, read by rank 0
and sent to the others tensor by tensor) with its resume checks, and the adapter file
(safetensors, with the adapter's config and train.py's flags in its metadata).

Rank by rank: `claim` and every writer run on rank 0 (through processes.from_rank0,
so a failure there stops every process); the checkpoint's gathering involves all.
"""
import fcntl
import hashlib
import json
import math
import os
from pathlib import Path

import torch

import flags
import goat
import processes

MANIFEST, LOCK = "run.json", "train.lock"
CONFIG, METRICS, RESULT, CHECKPOINT = "config.json", "metrics.jsonl", "result.json", "ckpt.pt"
ADAPTER, FULL_MODEL = "adapter.safetensors", "model.safetensors"
PLOTS = ("loss.png", "expert_load.png")
CHECKPOINT_KEYS = ("model", "optimizer", "step", "rng", "config")


def atomic_write(path, write):
    """Write via a temporary file and rename: a crash mid-write never leaves a corrupt
    file, and a failed write (a full disk) leaves no temporary file behind."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def json_text(obj):
    """JSON that other tools can read: a NaN or infinity is an error here, not invalid JSON there."""
    return json.dumps(obj, indent=2, allow_nan=False)


def finite_or_null(value):
    """value with every NaN or infinite float, however deep, as None: strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite_or_null(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_null(v) for v in value]
    return value


class Lock:
    """An OS lock (flock) on out_dir/train.lock: a second run cannot take it while the first
    lives, and the OS releases it when the holder dies, however it dies (no stale locks).
    NFSv4 and most cluster file systems honour it across nodes; where the file system has
    no locks, the run goes on with a warning."""

    def __init__(self, out_dir):
        self.path = Path(out_dir) / LOCK
        for _ in range(10):
            self.fd = os.open(self.path, os.O_CREAT | os.O_RDWR)
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(self.fd)
                raise SystemExit(f"{out_dir} is in use by another run (it holds {self.path}); wait for it, or "
                                 f"choose another --out_dir") from None
            except OSError as e:  # ENOLCK, EOPNOTSUPP: a file system without locks
                print(f"warning: cannot lock {self.path} ({e}); make sure no other run writes to {out_dir}")
                return
            try:  # the file we locked is still the lock: its holder may have removed it as we opened it
                if os.fstat(self.fd).st_ino == os.stat(self.path).st_ino:
                    return
            except FileNotFoundError:
                pass
            os.close(self.fd)
        raise SystemExit(f"could not take the lock {self.path} (other runs keep taking it); try again")

    def release(self):
        try:
            self.path.unlink(missing_ok=True)
        finally:
            os.close(self.fd)  # closing releases the lock


class RunFolder:
    """The folder of one run, on every process (only rank 0 writes)."""

    def __init__(self, path, kind):
        self.path, self.kind = Path(path), kind
        self.lock, self.created, self.checkpoint, self.resuming = None, False, None, False
        self.manifest = {"kind": kind, "state": "running", "files": []}

    def __truediv__(self, name):
        return self.path / name

    def written(self, *names):
        """Record files in the manifest before they are written: --overwrite will know them."""
        new = [n for n in names if n not in self.manifest["files"]]
        if new:
            self.manifest["files"] += new
            self.save_manifest()

    def save_manifest(self):
        atomic_write(self / MANIFEST, lambda f: f.write(json_text(self.manifest).encode()))

    def write_json(self, name, obj):
        self.written(name)
        atomic_write(self / name, lambda f: f.write(json_text(obj).encode()))

    def log(self, row, max_steps, minutes_left):
        """One row of metrics.jsonl (a non-finite value, such as an fp16 overflow step's gradient
        norm, written as null) and one progress line."""
        self.append_metrics(finite_or_null(row))
        balance = f" | balance {row['balance_loss']:.3f} (1 = even)" if row["balance_loss"] is not None else ""
        print(f"step {row['step']}/{max_steps} | task loss {row['task_loss']:.4f}{balance} | lr {row['lr']:.2e} "
              f"| {row['tokens_per_s']:,.0f} tok/s | {minutes_left:.1f} min left", flush=True)

    def append_metrics(self, row):
        """One row of metrics.jsonl. A failed write (a full disk) is reported, not raised: rank 0
        must not stop alone while the others wait for it; the checkpoint write then stops all."""
        try:
            with open(self / METRICS, "a") as f:
                f.write(json.dumps(row, allow_nan=False) + "\n")
        except OSError as e:
            print(f"warning: could not append to {self / METRICS}: {e}", flush=True)

    def release(self, failed):
        """Unlock; a folder this run created and left without a record goes again."""
        if self.lock:
            self.lock.release()
        if failed and self.created and self.path.is_dir() and not any(self.path.iterdir()):
            self.path.rmdir()


def claim(args, env):
    """Rank 0 checks that --out_dir may be written for this run, creates it and takes its
    lock; with --resume, reads its checkpoint (rank 0 alone holds it). Every process gets
    the RunFolder (without the checkpoint) and whether a checkpoint was found."""
    kind = "eval" if args.evaluate_only else "train"
    folder = RunFolder(args.out_dir, kind)

    def decide():
        check_folder(folder, args)
        if not folder.path.exists():
            try:
                folder.path.mkdir(parents=True)
            except OSError as e:
                raise SystemExit(f"cannot create --out_dir={folder.path}: {e.strerror or e}; choose a folder "
                                 f"you can write to") from None
            folder.created = True
        try:
            folder.lock = Lock(folder.path)
        except PermissionError as e:
            raise SystemExit(f"cannot write to --out_dir={folder.path}: {e.strerror}; choose a folder you can "
                             f"write to") from None
        if args.resume and (folder / CHECKPOINT).exists():
            try:
                folder.checkpoint = read_checkpoint(folder / CHECKPOINT)
                check_same_run(folder.checkpoint["config"], args)  # before any data is read
            except SystemExit:
                folder.release(failed=True)
                raise
        elif args.resume:
            print(f"--resume: no {folder / CHECKPOINT} on this machine, so the run starts at step 0 (on a cluster "
                  f"without a shared file system the checkpoint stays on the node where rank 0 ran)", flush=True)
        return folder.checkpoint is not None
    folder.resuming = processes.from_rank0(env, decide)  # rank 0 alone holds the checkpoint, and sends its parts
    return folder


def check_folder(folder, args):
    """What may be written where: never into the adapter's or the model's folder; a folder
    with files train.py did not write is refused with their names; a training run's
    folder takes no evaluation; a finished run needs --overwrite, an unfinished one
    --resume or --overwrite."""
    out = folder.path
    if args.adapter and out.resolve() == flags.adapter_folder(args.adapter).resolve():
        raise SystemExit(f"--out_dir={out} is where --adapter={args.adapter} lives: this run would overwrite the "
                         f"adapter it reads; choose another --out_dir")
    if args.model and Path(args.model).is_dir() and out.resolve() == Path(args.model).resolve():
        raise SystemExit(f"--out_dir={out} is the model's own folder; choose another --out_dir")
    if out.exists() and not out.is_dir():
        raise SystemExit(f"--out_dir={out} is a file, not a folder; choose another --out_dir")
    inside = next((p for p in out.resolve().parents if manifest_or_none(p)), None)  # not another tool's run.json
    if inside is not None:
        raise SystemExit(f"--out_dir={out} is inside the folder of another run ({inside}); choose a folder of "
                         f"its own")
    if not out.is_dir():
        return
    present = {p.name for p in out.iterdir()} - {LOCK}
    manifest = read_manifest(out) if MANIFEST in present else None
    ours = set(manifest["files"]) | {MANIFEST} if manifest else set()
    foreign = sorted(name for name in present - ours if not (name.endswith(".tmp") and name[:-4] in ours))
    if foreign:
        raise SystemExit(f"--out_dir={out} holds files train.py did not write ({', '.join(foreign[:8])}"
                         f"{' ...' if len(foreign) > 8 else ''}); a run needs a new or empty folder, or one of "
                         f"its own (--overwrite removes only what train.py wrote): choose another --out_dir")
    if manifest is None:
        return
    state = f"{'a finished' if manifest['state'] == 'finished' else 'an unfinished'} " \
            f"{'training run' if manifest['kind'] == 'train' else 'evaluation'}"
    if folder.kind == "eval" and manifest["kind"] == "train":
        raise SystemExit(f"{out} holds {state}: an evaluation never writes into a training run's folder; choose "
                         f"another --out_dir (by default an evaluation of --adapter=X writes to X-eval-<task>)")
    if args.resume and (manifest["state"] == "finished" or manifest["kind"] != "train"):
        raise SystemExit(f"--resume: {out} holds {state}, nothing to resume; choose another --out_dir, or pass "
                         f"--overwrite instead of --resume to replace it")
    if not (args.resume or args.overwrite):
        fix = "pass --resume to continue it, --overwrite to start again" if state == "an unfinished training run" \
            else "pass --overwrite to replace it"
        raise SystemExit(f"{out} holds {state}; {fix}, or choose another --out_dir")


RUN_FILES = {CONFIG, METRICS, RESULT, CHECKPOINT, ADAPTER, FULL_MODEL, *PLOTS}  # what a run may write


def manifest_or_none(out):
    """run.json if it is train.py's: it may list only the files a run writes, in the folder itself."""
    try:
        manifest = json.loads((Path(out) / MANIFEST).read_text())
    except (OSError, ValueError, RecursionError):
        return None
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if isinstance(files, list) and all(isinstance(f, str) and f in RUN_FILES for f in files) \
            and manifest.get("kind") in ("train", "eval") and manifest.get("state") in ("running", "finished"):
        return manifest
    return None


def read_manifest(out):
    manifest = manifest_or_none(out)
    if manifest is None:
        raise SystemExit(f"{Path(out) / MANIFEST} is not train.py's record of the folder; choose another --out_dir")
    return manifest


def data_fingerprint(task, items):
    """The training items (as encoded, with the label names) and each evaluation set, each
    as a short hash independent of where the files lie: an image counts by its file name."""
    portable = lambda item: {k: Path(v).name if k == "image" else v for k, v in item.items()} \
        if isinstance(item, dict) else item

    def digest(part, prefix=b""):
        h = hashlib.sha256(prefix + f"|{len(part)}|".encode())
        for item in part:
            h.update(json.dumps(portable(item), sort_keys=True, default=str).encode())
        return h.hexdigest()[:12]
    return {"train": digest(items, json.dumps(task.labels, default=str).encode()),
            "evals": {name: digest(examples) for name, examples in task.evals.items()}}


def run_record(args, env, fingerprint, max_steps):
    """config.json: the flags as resolved, the processes, the data read, and where the
    weights come from and how many steps have trained them."""
    earlier = flags.read_adapter_flags(args.adapter).get("steps", 0) if args.adapter else 0
    return dict(vars(args), world_size=env.world, global_batch=args.batch_size * args.grad_accum * env.world,
                max_steps=max_steps, data=fingerprint,
                weights=f"--adapter={args.adapter}" if args.adapter else "the pretrained model",
                trained_steps=earlier + max_steps)


def model_label(args):
    return Path(args.model).name if args.model else "all-MiniLM-L6-v2"


def start_records(folder, args, env, resumed_at, record):
    """Rank 0, once every input is known to be valid: --overwrite clears the old run only
    now (a mistyped flag destroys nothing), and only the files its manifest lists; then
    config.json (`record`) and, for training, metrics.jsonl. Returns whether metrics.jsonl
    holds an evaluation at the resumed step (False: none, or a stop signal skipped it)."""
    if args.overwrite and (folder / MANIFEST).exists():
        for name in read_manifest(folder.path)["files"]:
            (folder / name).unlink(missing_ok=True)
    if resumed_at is not None:
        folder.manifest = dict(read_manifest(folder.path), state="running")
    kept = ""
    if folder.kind == "train":
        folder.written(METRICS)
        kept = "" if resumed_at is None else read_metrics(folder / METRICS, resumed_at)
        atomic_write(folder / METRICS, lambda f: f.write(kept.encode()))
    if resumed_at is None or record.get("resumed_at_step_with_changes"):
        folder.write_json(CONFIG, record)
    return any("eval" in row and row["step"] == resumed_at for row in map(json.loads, kept.splitlines()))


def stopped(env, signum, step, max_steps, folder):
    """The exit after a stop signal, once the checkpoint is written."""
    import signal
    name = signal.Signals(signum).name if signum else "a signal on another process"
    processes.print0(env, f"stopped by {name} after step {step}/{max_steps}: checkpoint written to "
                          f"{folder / CHECKPOINT}; continue with the same command and --resume")
    return SystemExit(128 + (signum or signal.SIGTERM))


def read_metrics(path, up_to):
    """metrics.jsonl rows at or before step `up_to`; a torn last line (a crash mid-write) is dropped."""
    rows = []
    if path.exists():
        for line in path.read_text().split("\n"):
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if row.get("step", 0) <= up_to:
                rows.append(line)
    return "".join(r + "\n" for r in rows)


def finish(folder, result, plot=True):
    """result.json, the plots, and the manifest's state: finished."""
    try:
        folder.write_json(RESULT, result)
    except (OSError, ValueError) as e:
        raise SystemExit(f"could not write {folder / RESULT}: {e}; the RESULT line above is the run's result") from None
    if plot and folder.kind == "train":
        try:
            import plots
            folder.written(*PLOTS)
            plots.plot_run(folder.path)
        except ImportError:  # matplotlib is optional
            pass
        except Exception as e:  # a picture must not fail a finished run
            print(f"warning: could not plot {folder.path}: {type(e).__name__}: {e}", flush=True)
    folder.manifest["state"] = "finished"
    folder.save_manifest()


# ---------------------------------------------------------------------------------
# The checkpoint

def read_checkpoint(path):
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, not a checkpoint, or pickled objects we refuse to run
        raise SystemExit(f"{path} cannot be read ({type(e).__name__}: {str(e)[:200]}); it is damaged or not a "
                         f"train.py checkpoint: restore it, or start again with --overwrite") from None
    missing = [k for k in CHECKPOINT_KEYS if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise SystemExit(f"{path} is not a train.py checkpoint (no {', '.join(missing)}): restore it, or start "
                         f"again with --overwrite")
    return ckpt


def resume_point(folder, args, env, fingerprint, max_steps, record):
    """None, or on every process what a resume needs besides the weights: the step, the
    random states, the loss scale and the changes it was allowed (rank 0 checks them;
    `record`, config.json, then says what they were)."""
    if not folder.resuming:
        return None

    def check():
        ckpt = folder.checkpoint
        changes = resume_changes(ckpt["config"], args, env.world, fingerprint, max_steps, ckpt["step"])
        return {"step": ckpt["step"], "rng": ckpt["rng"], "scaler": ckpt.get("scaler"), "changes": changes}
    resume = processes.from_rank0(env, check)
    if resume["changes"]:
        processes.print0(env, "resuming despite " + "; ".join(resume["changes"]))
        record["resumed_at_step_with_changes"] = {"step": resume["step"], "changes": resume["changes"]}
    return resume


def adapter_or_checkpoint(folder, args, env, resume):
    """The state to rebuild an adapter from: a checkpoint's (sent from rank 0; it is the
    size of the adapter) or --adapter's (each process reads its own copy); None otherwise
    (a full method's checkpoint is restored into the model after it is wrapped)."""
    if resume and args.method in flags.ADAPTER_METHODS:
        return processes.broadcast_tree(env, folder.checkpoint["model"] if env.master else None)
    if args.adapter:
        return processes.together(env, lambda: read_adapter(args.adapter)[0])
    return None


def restore(folder, resume, model, optimizer, scaler, env, full_method):
    """A checkpoint's optimizer state (and a full method's weights) into the built model,
    sent from rank 0 tensor by tensor (FSDP: straight into the shards); then the loss
    scale and every process's random state. Returns the step to continue from."""
    ckpt = folder.checkpoint if env.master else {}
    peaks = [group["peak_lr"] for group in optimizer.param_groups]  # --allow_resume_changes may change them
    if env.fsdp:
        processes.load_gathered_state(model, optimizer, ckpt.get("model", {}) if full_method else None,
                                      ckpt.get("optimizer"), env)
    else:
        if full_method:
            model.load_state_dict(processes.broadcast_tree(env, ckpt.get("model")))
        optimizer.load_state_dict(processes.broadcast_tree(env, ckpt.get("optimizer")))
    folder.checkpoint = None  # rank 0 holds no second copy of the state for the rest of the run
    for group, peak in zip(optimizer.param_groups, peaks):
        group["peak_lr"] = peak
    if resume["scaler"]:
        scaler.load_state_dict(resume["scaler"])
    restore_random_state(resume["rng"], env, resume["step"])
    processes.print0(env, f"resumed from {folder / CHECKPOINT} at step {resume['step']}")
    return resume["step"]


def check_same_run(saved, args):
    """The checkpoint must be of this run: the same method, adapter, model and task."""
    now = vars(args)
    hard = [k for k in flags.RESUME_FLAGS if flags.model_name(k, saved.get(k)) != flags.model_name(k, now.get(k))]
    if hard:
        fix = " ".join(f"drop --{k}" if saved.get(k) is None or saved[k] is False else f"--{k}" if saved[k] is True
                       else f"--{k}={saved[k]}" for k in hard)  # --fsdp and --per_expert_scale take no value
        raise SystemExit("--resume: the checkpoint is of another run (checkpoint vs now: "
                         + "; ".join(flags.differences(saved, now, hard)) + f"). Resume with the original flags "
                         f"({fix}), or start a new run in another --out_dir")


def resume_changes(saved, args, world, fingerprint, max_steps, step):
    """The same training data always; the same schedule unless --allow_resume_changes.
    Returns the changes to record."""
    now = dict(vars(args), world_size=world, global_batch=args.batch_size * args.grad_accum * world,
               max_steps=max_steps)  # resolved from --epochs as the checkpoint's was
    changes = flags.differences(saved, now, flags.SCHEDULE_FLAGS)
    if saved["data"]["train"] != fingerprint["train"]:
        changes.append(f"training data: checkpoint {saved['data']['train']}, now {fingerprint['train']} (other files, "
                       f"or another tokenizer, transformers or Python version reading them)")
    if changes and not args.allow_resume_changes:
        raise SystemExit("--resume: the checkpoint was trained with another schedule or data (checkpoint vs now: "
                         + "; ".join(changes) + "). Resume with the original settings and data, or pass "
                         "--allow_resume_changes to continue anyway")
    if saved["data"]["evals"] != fingerprint["evals"]:  # only what is reported changes: allowed, recorded
        changes.append(f"evaluation data: checkpoint {saved['data']['evals']}, now {fingerprint['evals']}")
    if step > max_steps:
        raise SystemExit(f"--resume: the checkpoint is at step {step}, beyond this run's {max_steps} steps; resume "
                         f"with the original --max_steps/--epochs")
    return changes


def save_checkpoint(folder, model, optimizer, scaler, step, record, env, learned):
    """Every process takes part (its random state; FSDP's shards); only rank 0 holds the
    whole state and writes it. `learned()`: learned_state, called on every process."""
    rng = {"cpu": torch.get_rng_state()}
    if env.device_type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state()
    rngs = processes.gather(env, rng)
    model_state = learned()
    optimizer_state = processes.gathered_optimizer_state(model, optimizer, env)

    def write():  # rank 0; every process learns whether it worked, and stops with it if not
        state = {"model": model_state, "optimizer": optimizer_state, "step": step, "rng": rngs,
                 "scaler": scaler.state_dict(),  # float16's loss scale ({} otherwise): a resume skips no other steps
                 "config": record}
        path = folder / CHECKPOINT
        had_one = path.exists()
        folder.written(CHECKPOINT)
        try:
            atomic_write(path, lambda f: torch.save(state, f))
        except OSError as e:
            kept = "the previous checkpoint is intact" if had_one else "no checkpoint was written"
            raise SystemExit(f"could not write the checkpoint {path} at step {step}: {e}; {kept}") from None
    processes.from_rank0(env, write)


def restore_random_state(rngs, env, step):
    if env.rank < len(rngs):
        torch.set_rng_state(rngs[env.rank]["cpu"])
        if env.device_type == "cuda" and "cuda" in rngs[env.rank]:
            torch.cuda.set_rng_state(rngs[env.rank]["cuda"])
    else:  # more processes than the checkpoint had (--allow_resume_changes)
        processes.seed_per_rank(step, env.rank)


# ---------------------------------------------------------------------------------
# The adapter file

def learned_state(model, method, heads, env):
    """What a run learns, whole on rank 0 (None elsewhere): the GOAT adapter plus the heads
    ({name: parameter}), or every weight of a full method. Every process calls it: under
    FSDP the shards are gathered (an adapter's, small, on every process; a full model's on
    rank 0 alone)."""
    if method not in flags.ADAPTER_METHODS:
        return processes.gathered_model_state(model, env)
    if not (env.fsdp or env.master):
        return None
    plain = lambda t: (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().cpu()
    state = goat.goat_state_dict(model)
    state.update({f"head.{k}": plain(v) for k, v in heads.items()})
    return state if env.master else None


def load_trainable_state(model, state, heads):
    if goat.CONFIG_KEY not in state:  # a full method's weights
        try:
            model.load_state_dict(state)
        except RuntimeError as e:
            raise SystemExit(f"the saved weights do not fit this model (another model, method or number of "
                             f"labels?): {str(e)[:500]}") from None
        return
    try:
        goat.load_goat_state_dict(model, state)
    except ValueError as e:
        raise SystemExit(f"the adapter does not fit this model: {e}") from None
    params = heads
    saved = {k[5:]: v for k, v in state.items() if k.startswith("head.")}
    if set(saved) != set(params):
        raise SystemExit(f"the adapter's heads {sorted(saved)} are not this model's {sorted(params)}")
    with torch.no_grad():
        for key, value in saved.items():
            if value.shape != params[key].shape:
                raise SystemExit(f"the adapter's head {key} has shape {tuple(value.shape)}, this task's "
                                 f"{tuple(params[key].shape)} (another number of labels?)")
            params[key].copy_(value)



def save_adapter(folder, state, args, steps):
    """adapter.safetensors (model.safetensors for full methods): the tensors, and in the
    metadata the adapter's config and train.py's flags, so that the file alone says what it
    is. Returns None, or why it could not be written (the run still reports its metric)."""
    from safetensors.torch import save
    state = dict(state)
    meta = {"train_flags": json.dumps(dict(vars(args), steps=steps))}
    if goat.CONFIG_KEY in state:
        meta[goat.CONFIG_KEY] = state.pop(goat.CONFIG_KEY)
    name = ADAPTER if args.method in flags.ADAPTER_METHODS else FULL_MODEL
    tensors, seen = {}, set()
    for key, tensor in state.items():  # tied weights (an LM head and its embedding) share storage:
        tensor = tensor.contiguous()   # safetensors stores each storage once, so each gets its own
        storage = tensor.untyped_storage().data_ptr()
        tensors[key] = tensor.clone() if storage in seen else tensor
        seen.add(storage)
    folder.written(name)
    try:
        atomic_write(folder / name, lambda f: f.write(save(tensors, metadata=meta)))
    except OSError as e:
        return f"could not write the adapter to {folder / name}: {e}; ckpt.pt holds the trained weights"


def read_adapter(path):
    """(tensors with the goat config entry, train flags) of an adapter file."""
    from safetensors import safe_open
    path = flags.adapter_file(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            state = {k: f.get_tensor(k) for k in f.keys()}
            meta = f.metadata() or {}
    except Exception as e:  # truncated or not safetensors
        raise SystemExit(f"--adapter: {path} cannot be read ({type(e).__name__}: {str(e)[:200]}); it is damaged or "
                         f"not a safetensors file") from None
    if goat.CONFIG_KEY in meta:
        state[goat.CONFIG_KEY] = meta[goat.CONFIG_KEY]
    try:
        return state, flags.train_flags_in(meta, path)
    except ValueError as e:
        raise SystemExit(str(e)) from None
