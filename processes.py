"""
train.py's processes: one, or one of torchrun's (RANK, LOCAL_RANK, WORLD_SIZE), with
NCCL on GPUs and gloo on CPUs. Rank 0 decides and the others follow; a failure in
set-up, in rank 0's decisions or in its writes stops all of them (none is left waiting
in a collective until the NCCL timeout; a failure inside a training step is torchrun's
to tear down); every process must hold the same flags, data and weights. Also DDP and
FSDP2 wrapping, the stop signals, and how a torchrun process exits.

Rank by rank: every function here is called by every process at the same point, so
their collectives match; only what `from_rank0` runs is rank 0's alone.
"""
import contextlib
import ctypes
import io
import json
import math
import os
import signal
import sys
import traceback
from dataclasses import dataclass

import torch
import torch.distributed as dist

import flags
import goat

# SIGTERM and SIGUSR1 are a cluster's preemption notices; SIGINT is Ctrl-C. Each finishes
# the current optimizer step and writes the checkpoint before the run exits.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


@dataclass
class Processes:
    rank: int = 0
    local_rank: int = 0
    world: int = 1
    device: str = "cpu"
    fsdp: bool = False
    control: object = None  # a gloo group for small messages (decisions, stops) that never waits on a GPU

    @property
    def distributed(self):
        return self.world > 1

    @property
    def master(self):
        return self.rank == 0

    @property
    def device_type(self):
        return torch.device(self.device).type


def start(args):
    """The processes of this run, on the device args.device names ("cuda" becomes
    "cuda:<index>"); args.dtype resolved; every process checked to run the same flags."""
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        kind = torch.device(device).type
    except RuntimeError:
        raise SystemExit(f"--device={device} is not a device; use auto, cpu, cuda or cuda:<index>") from None
    if kind not in ("cpu", "cuda"):
        raise SystemExit(f"--device={device}: train.py runs on cpu or cuda")
    if kind == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device={device}, but this torch sees no CUDA GPU (torch {torch.__version__}, "
                         f"CUDA build {torch.version.cuda}): install a CUDA build of torch, check "
                         f"CUDA_VISIBLE_DEVICES, or run with --device=cpu")
    env = Processes(fsdp=args.fsdp)
    if "RANK" in os.environ:
        env.rank, env.world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        # torchrun sets LOCAL_RANK; srun starting one process per GPU sets SLURM_LOCALID; a launcher with
        # one process per machine may set neither
        env.local_rank = int(os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", 0)))
    if kind == "cuda":
        index = torch.device(device).index
        if index is not None and int(os.environ.get("LOCAL_WORLD_SIZE", 1)) > 1:
            raise SystemExit(f"--device={device} would put every process of this node on GPU {index}; under "
                             f"torchrun each process takes its own: use --device=cuda (or auto)")
        if index is None:
            # torchrun (LOCAL_WORLD_SIZE) shows every process of a node the same GPUs; a scheduler may show each
            # process only its own (srun --gpus-per-task=1: one GPU, index 0)
            count, local_world = torch.cuda.device_count(), int(os.environ.get("LOCAL_WORLD_SIZE", 1))
            if local_world > count or (count > 1 and env.local_rank >= count):  # NCCL would refuse at its first call
                raise SystemExit(f"{max(local_world, env.local_rank + 1)} processes on this node but {count} GPU(s) "
                                 f"visible: two would share a GPU; start at most {count} per node "
                                 f"(--nproc_per_node={count}) or show each process its own GPU")
            index = env.local_rank if count > 1 else 0
        device = f"cuda:{index}"
        torch.cuda.set_device(index)  # an index: "cuda" alone is refused by set_device
    env.device = device
    if "RANK" in os.environ:
        store = meet_on_one_kind_of_device(env, kind)
        dist.init_process_group("nccl" if kind == "cuda" else "gloo", store=dist.PrefixStore("default_pg", store),
                                rank=env.rank, world_size=env.world)  # the prefix init_process_group gives its own
        env.control = dist.new_group(backend="gloo") if kind == "cuda" else dist.group.WORLD
    # first, before any check that could stop one process alone: every process runs the same flags and torch
    named = {k: flags.model_name(k, v) for k, v in vars(args).items()}  # each node may keep the files elsewhere
    same_everywhere(env, json.loads(json.dumps(named, default=str)), "run with different flags",
                    "give every node the same command, and the same --adapter file",
                    lambda ours, theirs: "; ".join(flags.differences(ours, theirs, sorted(ours))))
    same_everywhere(env, torch.__version__, "run different torch versions", "install the same torch on every node")
    if torch_older_than(2, 7):  # checked once every process is known to run the same torch: all stop together
        raise SystemExit(f"train.py needs torch >= 2.7 (DDP's init_sync, FSDP2 on CPUs; requirements.txt); this is "
                         f"{torch.__version__}: pip install 'torch>=2.7'. goat.py alone runs on torch 2.2 and later")
    if args.fsdp and "RANK" not in os.environ:
        print("--fsdp needs torchrun (one process is fine: torchrun --nproc_per_node=1); training unsharded")
        env.fsdp = args.fsdp = False  # config.json and the checkpoint say what ran
    if args.dtype == "auto":  # recorded resolved: a GPU run resumed on a CPU is a change the checks see
        args.dtype = auto_dtype(kind, args.fsdp)
        same_everywhere(env, args.dtype, "resolve --dtype=auto differently, on different kinds of GPU",
                        "give every process the same --dtype")
        if kind == "cuda" and args.dtype != "bfloat16":
            print0(env, f"--dtype=auto: {args.dtype}; this GPU has no bf16 tensor cores (--dtype=bfloat16 runs "
                        f"bf16 emulated); the frozen base stays float32, twice bf16's memory")
    if args.fsdp and args.dtype == "float16":
        raise SystemExit("--fsdp with --dtype=float16 is not supported (its loss scaling is per process); use bfloat16")
    # on CPUs too: torch 2.7.1 stops at the first forward ("FSDP expects uniform original parameter dtype")
    if args.fsdp and args.dtype == "bfloat16" and torch_older_than(2, 8):
        raise SystemExit(f"--fsdp with a bf16 base needs torch >= 2.8 (one FSDP group then holds the frozen bf16 "
                         f"base and the float32 adapters; pytorch#154103); this is {torch.__version__}: "
                         f"pip install 'torch>=2.8', or run with --dtype=float32")
    return env


def auto_dtype(kind, fsdp):
    """--dtype=auto: bf16 where the GPU has bf16 tensor cores (Ampere and later: A100,
    H100, RTX 30xx; AMD GPUs as ROCm's torch reports them). V100 and T4 have float16
    tensor cores only, and bf16 runs there at a fraction of their speed: float16 with a
    loss scaler, or float32 under FSDP, whose float16 loss scaling would be per process.
    Older GPUs have no tensor cores: float32."""
    if kind != "cuda":
        return "float32"
    if torch.cuda.is_bf16_supported(including_emulation=False):
        return "bfloat16"
    return "float16" if torch.cuda.get_device_capability()[0] >= 7 and not fsdp else "float32"


def torch_older_than(major, minor):
    """Whether the running torch is older than major.minor (pre-releases count as their release)."""
    return tuple(int(x) for x in torch.__version__.split(".")[:2]) < (major, minor)


def meet_on_one_kind_of_device(env, kind):
    """The rendezvous store, once every process has said it runs on `kind` too. Compared
    before any backend starts: a process whose GPU is hidden (CUDA_VISIBLE_DEVICES, a node
    without its driver) would start gloo where the others start NCCL, each waiting for the other."""
    store, _, _ = next(dist.rendezvous("env://", env.rank, env.world))  # what init_process_group would use
    store.set(f"device kind {env.rank}", kind)
    kinds = [store.get(f"device kind {rank}").decode() for rank in range(env.world)]
    store.set(f"device kinds read {env.rank}", "")
    if len(set(kinds)) > 1:
        if env.rank == 0:  # the store's host under a plain launcher: it stays until every process has read
            store.wait([f"device kinds read {rank}" for rank in range(env.world)])
        raise SystemExit("the processes run on different kinds of device ("
                         + "; ".join(f"process {rank}: {k}" for rank, k in enumerate(kinds))
                         + "): make a GPU visible to every process (CUDA_VISIBLE_DEVICES, drivers), "
                           "or run all of them with --device=cpu")
    return store


def loader_workers(args, task, env):
    """--workers, or by default: image decoding is the slow part of a GPU step, so four
    processes prepare image batches ahead there; text batches are ready in microseconds."""
    if args.workers is not None:
        return args.workers
    return 4 if task.kind == "image" and env.device_type == "cuda" else 0


def stop(env):
    if env.distributed:
        dist.destroy_process_group()


def print0(env, *a, **k):
    if env.master:
        print(*a, **k, flush=True)


def gather(env, value):
    """[value of process 0, value of process 1, ...] on every process (small Python values)."""
    if not env.distributed:
        return [value]
    everyone = [None] * env.world
    dist.all_gather_object(everyone, value, group=env.control)
    return everyone


def same_everywhere(env, value, what, fix, describe=None):
    """Stop every process if `value` differs between them, showing each process's (or
    what describe(process 0's, another's) says of the difference)."""
    everyone = gather(env, value)
    other = next((v for v in everyone if v != everyone[0]), None)
    if other is not None:
        seen = describe(everyone[0], other) if describe else \
            "; ".join(f"process {rank}: {v}" for rank, v in enumerate(everyone))
        raise SystemExit(f"the processes {what} ({seen}): {fix}")


def from_rank0(env, make):
    """make() on rank 0, its value (or the SystemExit it raised) on every rank: rank 0
    decides (resume, out_dir) and the others follow, with no shared file system needed.
    Another exception is raised as it is in one process; under torchrun rank 0 prints its
    traceback and every rank stops with its one line."""
    result = None
    if env.master:
        try:
            result = ("ok", make())
        except SystemExit as e:
            result = ("exit", e.code)  # a message, or a status
        except Exception as e:  # the others must not wait for a value that never comes
            if not env.distributed:
                raise
            traceback.print_exc()  # where rank 0 failed; the others stop with its one line
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
    waiting in a collective for one that is gone (until the NCCL timeout). What the work
    prints (a data warning), rank 0 says once, and another process's text only where it
    differs (a node whose copy of the data is not the same)."""
    error, result, printed = None, None, io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            result = work()
    except (SystemExit, Exception) as e:  # a missing file on one node, an SVD out of memory on one GPU
        error = e
    everyone = gather(env, (printed.getvalue(), error is not None))
    if env.master:
        print(everyone[0][0], end="", flush=True)
        for rank, (text, _) in enumerate(everyone[1:], start=1):
            if text != everyone[0][0]:
                print(f"process {rank}: {text}", end="", flush=True)
    if any(failed for _, failed in everyone):
        raise error or SystemExit(f"process {env.rank} stops: another process failed (see its message)")
    return result


def mean_over_processes(env, tensors):
    """The mean over processes of a few scalar device tensors, as floats: the loss of the
    whole global batch, not one process's share. The one host sync of a step."""
    values = torch.stack([t.to(tensors[0].device) for t in tensors])
    if env.distributed:
        dist.all_reduce(values)
        values /= env.world
    return values.tolist()


def seed_per_rank(seed, rank):
    """After identical initial adapters, each process draws its own dropout masks."""
    torch.manual_seed(seed + 100_003 * (rank + 1))


def broadcast_tree(env, tree, src=0):
    """Process src's nested dicts/lists of tensors and plain values, on every process, one
    tensor at a time (through the device's backend): no process ever holds a second,
    serialised copy of a checkpoint. The others pass None."""
    if not env.distributed:
        return tree
    sender = env.rank == src

    def skeleton(node):
        if isinstance(node, torch.Tensor):
            return ("tensor", tuple(node.shape), str(node.dtype).replace("torch.", ""))
        if isinstance(node, dict):
            return {k: skeleton(v) for k, v in node.items()}
        if isinstance(node, (list, tuple)):
            return type(node)(skeleton(v) for v in node)
        return node
    box = [skeleton(tree) if sender else None]
    dist.broadcast_object_list(box, src=src, group=env.control)

    def fill(shape, node):
        if isinstance(shape, tuple) and len(shape) == 3 and shape[0] == "tensor":
            tensor = node if sender else torch.empty(shape[1], dtype=getattr(torch, shape[2]))
            moved = tensor.to(env.device).contiguous()  # NCCL and gloo send contiguous memory only
            dist.broadcast(moved, src=src)
            return node if sender else moved.to("cpu")
        if isinstance(shape, dict):
            return {k: fill(v, node[k] if sender else None) for k, v in shape.items()}
        if isinstance(shape, (list, tuple)):
            return type(shape)(fill(v, node[i] if sender else None) for i, v in enumerate(shape))
        return shape
    return fill(box[0], tree)


class Health:
    """What stops a run. Watches the loss and gradient norm on the device (no sync); read
    on logging steps and before anything is saved: a non-finite value, or a loss far above the first one,
    stops the run naming the step, before the bad state can be written."""

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
        """values: (task loss, balance, grad norm, bad flag), averaged over processes. Under
        fp16 an infinite gradient norm is the loss scaler's overflow (a skipped step), not a fault."""
        loss_value = values[0]
        watched = values[:2] if fp16 else values[:3]
        if values[3] > 0 or not all(math.isfinite(v) for v in watched):
            bad = int(self.first_bad)
            when = f"at step {bad}" if bad >= 0 else f"by step {step} on another process"
            overflow = "; float16 overflows where bf16 and float32 do not: try --dtype=bfloat16 or float32" if fp16 else ""
            raise SystemExit(f"stopped: the loss or gradient norm became NaN or infinite {when}. "
                             f"Likely cause: a learning rate too high (--lr={args.lr:g}) or an overflow; lower "
                             f"--lr, or check --eta/--scaling/--alpha{overflow}. Nothing from that step on was saved.")
        if self.first_loss is None:
            self.first_loss = loss_value
        elif loss_value > max(10 * self.first_loss, self.first_loss + 10):
            raise SystemExit(f"stopped: training diverged at step {step}: the loss rose from {self.first_loss:.4g} "
                             f"to {loss_value:.4g}. Lower --lr (now {args.lr:g}); nothing from step {step} was saved.")


def shared_factors(model, cfg, targets, exclude, env):
    """The SVD inits, each computed once: process r factorises layers r, r + W, ..., then
    every layer's factors go from its owner to all (no full-model broadcast)."""
    if not env.distributed or cfg.init not in goat.SVD_INITS:
        return None
    names = goat.find_targets(model, targets, exclude)
    # a layer too small for the rank fails on its owner alone: all stop before any broadcast
    mine = together(env, lambda: goat.initial_factors(model, cfg, names[env.rank::env.world],
                                                                svd_device=env.device))
    return {name: broadcast_tree(env, mine.get(name), src=i % env.world) for i, name in enumerate(names)}


# ---------------------------------------------------------------------------------
# DDP and FSDP2

def wrap(model, args, env):
    """DDP or FSDP2 around the model (after checking every process holds the same
    weights); torch.compile if asked."""
    if args.grad_checkpointing:
        enable_grad_checkpointing(model)
    if env.distributed:
        check_identical(model, env)
    if env.fsdp:
        full_bf16 = args.method.startswith("full") and args.dtype == "bfloat16"
        shard(model, torch.bfloat16 if full_bf16 else None)
    if args.compile:
        model = torch.compile(model)
    if env.distributed and not env.fsdp:
        from torch.nn.parallel import DistributedDataParallel as DDP
        # every expert is in the graph each step: no find_unused_parameters; the frozen base and
        # the initial factors are identical by construction (checked above): no broadcasts.
        # Full fine-tuning of CLIP's vision tower: its post_layernorm feeds nothing the classifier
        # reads, so DDP must expect parameters without a gradient.
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


def shard(model, param_dtype=None):
    """FSDP2: each block (a module of a class some submodule lists in its _no_split_modules:
    transformers 4 lists them on the inner model, BertModel, not on its task model; only
    the outermost where such blocks nest), then the rest. A
    block keeps its frozen bf16 base, its float32 adapters and their frozen initial
    factors together, each sharded; the step runs under autocast as without FSDP.
    param_dtype (full fine-tuning in bf16): FSDP gathers each block's float32 shards as
    bf16 and frees them after the block, so no bf16 copy of the whole model lives through
    a step (autocast's own copies would be saved for backward, every layer's at once)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    blocks = {name for module in model.modules() for name in (getattr(module, "_no_split_modules", None) or ())}
    if not blocks:
        raise SystemExit("--fsdp: this model names no transformer block class (_no_split_modules) to shard by")
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32 if param_dtype else None)
    sharded = []
    for name, module in model.named_modules():
        if name and type(module).__name__ in blocks and not any(name.startswith(s + ".") for s in sharded):
            fully_shard(module, mp_policy=policy)
            sharded.append(name)
    fully_shard(model, mp_policy=policy)


def check_identical(model, env):
    """Every process holds the same weights: the trainable ones (same seed, shared
    factors) in full, and the frozen ones by a sample of every tensor (the same model
    files on every node). A mismatch would train each process on another model."""
    def digest(t):
        flat = t.detach().reshape(-1)
        step = 1 if t.requires_grad else max(1, flat.numel() // 4096)
        return flat[::step].double().sum().item()
    named = list(model.named_parameters()) + list(model.named_buffers())
    sums = torch.tensor([digest(t) for _, t in named], dtype=torch.float64)
    low, high = sums.clone(), sums.clone()
    dist.all_reduce(low, op=dist.ReduceOp.MIN, group=env.control)
    dist.all_reduce(high, op=dist.ReduceOp.MAX, group=env.control)
    differ = [name for (name, _), a, b in zip(named, low.tolist(), high.tolist()) if a != b]
    if differ:
        raise SystemExit(f"the processes hold different weights ({len(differ)} tensors, e.g. {differ[0]}): every "
                         "node needs the same model files, data and torch version")


def gathered_optimizer_state(model, optimizer, env):
    """The optimizer state whole on rank 0 (None elsewhere); under FSDP every process takes
    part and only rank 0 ever holds the whole state (cpu_offload)."""
    if not env.fsdp:
        return optimizer.state_dict() if env.master else None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state = get_optimizer_state_dict(model, optimizer, options=options)
    return state if env.master else None


def gathered_model_state(model, env):
    """Every weight of the model whole on rank 0 (None elsewhere), as above."""
    if not env.fsdp:
        return {k: v.detach().cpu() for k, v in model.state_dict().items()} if env.master else None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return state if env.master else None


def load_gathered_state(model, optimizer, model_state, optimizer_state, env):
    """Rank 0's whole states into a sharded model (model_state: a full method's weights, or
    None for an adapter, which is rebuilt before sharding) and its optimizer, sent from
    rank 0 into every process's shards. Every process calls it, with the same model_state
    being None or not."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    if model_state is not None:
        set_model_state_dict(model, model_state if env.master else {}, options=options)
    set_optimizer_state_dict(model, optimizer, optim_state_dict=optimizer_state if env.master else {},
                             options=options)


# ---------------------------------------------------------------------------------
# Signals and exits

class StopSignals:
    """SIGTERM, SIGUSR1 (a cluster's preemption notice) and SIGINT (Ctrl-C) set a flag; the
    loop finishes its optimizer step, writes the checkpoint and exits with 128 + the signal."""

    def __init__(self):
        self.received = None
        self.previous = {}
        for sig in STOP_SIGNALS:
            try:
                self.previous[sig] = signal.signal(sig, self.handle)
            except ValueError:  # not the main thread
                pass

    def handle(self, signum, frame):
        if self.received == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now, without the checkpoint
        self.received = signum

    def restore(self):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def ignore_stop_signals(worker_id):
    """In a data-loader worker: torchrun stops a process by signalling its whole process
    group, and SLURM signals every process of the job step; a worker killed by that SIGTERM
    (or a terminal's Ctrl-C) would make the main process raise mid-step, before its
    checkpoint. In a group of its own and deaf to the stop signals, the worker keeps
    serving; the main process still ends it, and it exits by itself if the main process dies."""
    os.setpgid(0, 0)
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def exit_status(exc):
    """The exit status Python gives an uncaught exception (SystemExit's message printed)."""
    if isinstance(exc, SystemExit):
        if exc.code is None or isinstance(exc.code, int):
            return exc.code or 0
        print(exc.code, file=sys.stderr)
        return 1
    traceback.print_exception(exc)
    # Ctrl-C: 130, the status a shell reports for Python's own death by SIGINT (torchrun sees an exit code)
    return 128 + signal.SIGINT if isinstance(exc, KeyboardInterrupt) else 1


def run_and_exit(main, argv):
    """main(argv) in one of torchrun's processes, which then leaves without Python's
    shutdown. The process groups' C++ threads outlive destroy_process_group(); one that
    drops the last reference to a collective's tensor while the interpreter shuts down
    aborts the process ("terminate called without an active exception", about 1 run in 40
    on a busy CPU), and torchrun reports a finished run as failed. Everything is written,
    flushed and the lock released by then, so os._exit loses nothing."""
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
        ctypes.CDLL(None).fflush(None)
    except (OSError, AttributeError):
        pass
    os._exit(status)
