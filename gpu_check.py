"""
The CUDA paths, checked in one go on one GPU in under 10 minutes, with one report
(gpu_check.json and gpu_check.md, whose numbers go into docs/speed.md).

    python gpu_check.py                          # on a machine with a GPU
    python gpu_check.py --device=cpu --quick     # the same script on the CPU: a smoke test of it
    python gpu_check.py --parts=train,sigterm    # some parts

Parts, in the order they run. Each has an estimate of its seconds on one H200; a part
that does not fit in what is left of --budget is reported "skipped: out of time", and
one that overruns what is left is stopped and reported "timed out".
- bench: bench.py's rows on the device, one process per part: the layers (time, and
  memory per variant in isolation), the saved-for-backward budget under autocast, SVD
  init, activation checkpointing and the whole MiniLM training step (bf16 base and bf16
  autocast on CUDA, as train.py runs it on GPUs with bf16 tensor cores).
- train: train.py on a small BERT built from a config (no download; every dropout off,
  so that runs differ by precision, not chance) and a learnable synthetic task: the
  device's precision against the CPU in float32 (the first loss must agree closely:
  the same seed gives the same initial adapters on any device), --grad_checkpointing,
  --fsdp in one process, and float16 with its GradScaler against bf16.
- generation: an instruct task on a tiny LLaMA built from a config: it trains,
  generates on the device, and scores a number.
- sigterm: SIGTERM after some steps (exit 143, a checkpoint), then --resume: the
  losses, final metrics and adapter equal an uninterrupted run's exactly. LoRA dropout is on,
  so the device's random state must come back too.
- multi: DDP and FSDP over 2 processes against one process with the same global
  batch (torchrun; needs 2 GPUs, gloo on the CPU).
- compile: bench.py's compiled rows (GOAT's layer and the whole MiniLM step against
  eager), and train.py --compile against eager.
The last line printed is `RESULT {json}`; the exit status is 1 if a check failed.
"""
import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
# Seconds on one H200 (16 CPU cores for the CPU reference), reckoned, not yet measured:
# about 12 s to start each process (torch, transformers, CUDA), then the work.
# bench: 5 processes, the layers ~10 s, grad checkpointing 2 more processes ~30 s, MiniLM ~15 s.
# train: 5 runs of 40 short steps. generation: 1 run. sigterm: 3 runs of up to 300 steps.
# multi: 3 runs (only with 2 GPUs). compile: inductor from a cold cache: GOAT's layer
# ~40 s, MiniLM's step ~80 s, train.py --compile (its training and evaluation graphs) ~90 s.
# Together 490 s with one GPU, 535 s with two: within the 540 s default budget.
ESTIMATE_S = {"bench": 100, "train": 70, "generation": 20, "sigterm": 60, "multi": 45, "compile": 240}
PARTS = tuple(ESTIMATE_S)
BENCH_PARTS = ("layers", "autocast_memory", "svd_init", "grad_checkpointing", "model")


class Clock:
    """What is left of the budget."""

    def __init__(self, budget):
        self.end = time.time() + budget

    def left(self):
        return max(0.0, self.end - time.time())


class OutOfTime(Exception):
    pass


def failure(code, stdout, stderr):
    """A failed run in a few lines: the exception it died of (a torchrun worker's, not
    torchrun's own report of it), then the end of its output."""
    text = stderr or stdout
    causes = [l.strip() for l in text.splitlines() if re.match(r"\s*[\w.]+(Error|Exception|Exit|Interrupt)\b", l)
              and "ChildFailedError" not in l]
    return f"exit {code}: {causes[-1] if causes else 'no exception printed'}\n{text[-1500:]}"


def run_process(argv, timeout, env=None):
    """Run a command in its own process group (torchrun's workers included), killed
    whole if it outlasts `timeout`. Returns (exit status, stdout, stderr)."""
    if timeout <= 1:
        raise OutOfTime()
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    proc = subprocess.Popen(argv, cwd=HERE, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise OutOfTime() from None
    return proc.returncode, out, err


# --- assets: built from configs, nothing downloaded -------------------------------------------

WORDS = ("good great fine nice lovely superb bad awful poor sad terrible boring the a movie film plot was is "
         "and very not it this true false answer option1 option2 correct question yes no").split()


def write_tokenizer(folder, words):
    """A word-level BERT tokenizer (transformers 4 and 5)."""
    import inspect
    from transformers import BertTokenizerFast
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words, *"abcdefghijklmnopqrstuvwxyz0123456789.,:#!?"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    if "vocab_file" in inspect.signature(BertTokenizerFast.__init__).parameters:  # transformers 4
        tokenizer = BertTokenizerFast(vocab_file=str(folder / "vocab.txt"))
    else:
        tokenizer = BertTokenizerFast(vocab={word: i for i, word in enumerate(vocab)})
    tokenizer.save_pretrained(folder)
    return len(vocab)


def make_bert(folder, quick):
    """A small BERT encoder with every dropout off (hidden, attention, the new head's)."""
    from transformers import BertConfig, BertModel
    words = [f"w{i}" for i in range(200)]
    vocab = write_tokenizer(folder, words)
    size = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128) if quick else \
        dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024)
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=vocab, max_position_embeddings=128, hidden_dropout_prob=0.0,
                         attention_probs_dropout_prob=0.0, classifier_dropout=0.0, **size)).save_pretrained(folder)
    return folder, words


def make_sst2(folder, words, quick):
    """A learnable sentence task in GLUE's SST-2 layout: a signal in 30% of the words."""
    rng = np.random.default_rng(0)
    (folder / "SST-2").mkdir(parents=True)
    for name, n in (("train.tsv", 512 if quick else 2048), ("dev.tsv", 64 if quick else 256)):
        rows = ["sentence\tlabel"]
        for _ in range(n):
            label = int(rng.integers(2))
            ids = rng.integers(0, 100, 12) + 100 * label * (rng.random(12) < 0.3)
            rows.append(" ".join(words[i] for i in ids) + f"\t{label}")
        (folder / "SST-2" / name).write_text("\n".join(rows) + "\n")
    return folder


def make_llama(folder, quick):
    """A 2-layer LLaMA with the word-level vocabulary (as conftest.save_tiny_llama)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    vocab = write_tokenizer(folder, WORDS)
    hidden = 32 if quick else 128
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, intermediate_size=2 * hidden, max_position_embeddings=512,
                                 bos_token_id=None, eos_token_id=3, pad_token_id=0,
                                 initializer_range=0.2)).save_pretrained(folder)
    return folder


def make_instruct(folder):
    """Instruction rows {instruction, input, output, answer}: is a word positive?"""
    positive, negative = WORDS[:6], WORDS[6:12]
    rows = [{"instruction": f"is it {w}? answer true or false", "input": "",
             "output": f"the correct answer is {'true' if w in positive else 'false'}",
             "answer": "true" if w in positive else "false"} for w in positive + negative] * 4
    (folder / "toy").mkdir(parents=True)
    for split in ("train.json", "test.json"):
        (folder / "toy" / split).write_text(json.dumps(rows))
    return folder


# --- train.py runs -------------------------------------------------------------------------

class Runner:
    """train.py runs on the small BERT and its task, with the flags every check shares."""

    def __init__(self, tmp, device, quick, clock):
        self.tmp, self.device, self.quick, self.clock = tmp, device, quick, clock
        self.model, words = make_bert(tmp / "bert", quick)
        self.data = make_sst2(tmp / "glue", words, quick)
        self.low = "--dtype=bfloat16" if device.startswith("cuda") else "--dtype=float32"
        self.steps, self.batch = (12, 16) if quick else (40, 32)
        # 2 processes on a CPU: one thread each, as the tests run them
        self.env = {"OMP_NUM_THREADS": "1"} if device == "cpu" else {}

    def argv(self, out, device, *extra, steps=None, batch=None):
        return [f"--model={self.model}", "--task=sst2", f"--data_dir={self.data}", f"--out_dir={out}",
                "--method=goat", "--rank=8", "--experts=4", f"--batch_size={batch or self.batch}",
                f"--max_steps={steps or self.steps}", "--lr=1e-3", "--warmup=2", "--log_every=1",
                "--ckpt_every=100000", "--lora_dropout=0", "--seed=0", f"--device={device}", *extra]

    def run(self, name, device, *extra, nproc=0, steps=None, batch=None, env=None):
        """One train.py run (under torchrun with `nproc` processes if nproc > 0):
        {losses, metrics, seconds} or {error}."""
        out = self.tmp / name
        launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc else []
        t0 = time.time()
        code, stdout, stderr = run_process(
            [sys.executable, *launcher, "train.py", *self.argv(out, device, *extra, steps=steps, batch=batch)],
            self.clock.left(), {**(self.env if nproc else {}), **(env or {})})
        if code:
            return {"error": failure(code, stdout, stderr)}
        return {**read_run(out), "seconds": round(time.time() - t0, 1)}


def read_run(out):
    losses = [r["task_loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
              if "task_loss" in r]
    return {"losses": losses, "metrics": json.loads((out / "result.json").read_text())["metrics"]}


def relative_gaps(a, b):
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    return np.abs(a - b) / np.maximum(np.abs(b), 1e-3)


def compare(name, run, reference, rtol, first_rtol):
    """Loss curves, step by step: the largest relative gap within rtol, the first loss
    (before any update: the same model, batch and initial adapters) within first_rtol."""
    if "error" in run or "error" in reference:
        return {"check": name, "ok": False, "error": run.get("error") or "reference: " + reference["error"]}
    if len(run["losses"]) != len(reference["losses"]):
        return {"check": name, "ok": False, "error": f"{len(run['losses'])} losses, reference "
                                                     f"{len(reference['losses'])}"}
    gaps = relative_gaps(run["losses"], reference["losses"])
    return {"check": name, "ok": bool(gaps.max() <= rtol and gaps[0] <= first_rtol),
            "max_loss_gap": float(gaps.max()), "rtol": rtol, "first_loss_gap": float(gaps[0]),
            "first_rtol": first_rtol, "dev": accuracy(run), "reference_dev": accuracy(reference),
            "seconds": run["seconds"]}


def accuracy(run):
    return next(iter(run["metrics"].values()))["accuracy"]


def tolerances(device):
    """(rtol, first_rtol) for runs on the same device: bf16 on CUDA, float32 on the CPU
    (where the same flags must give the same losses up to summation order)."""
    return (0.02, 0.005) if device.startswith("cuda") else (1e-4, 1e-5)


def part_train(runner, report):
    device = runner.device
    cpu = runner.run("cpu", "cpu", "--dtype=float32")
    report["runs"]["cpu_float32"] = cpu
    if device == "cpu":  # the device run is the CPU reference itself
        plain = cpu
        report["checks"].append({"check": "train.py on the device vs cpu float32", "skipped": "the device is the CPU"})
    else:
        plain = runner.run("plain", device, runner.low)
        report["runs"]["plain"] = plain
        report["checks"].append(compare(f"train.py {device} {runner.low[8:]} vs cpu float32", plain, cpu, 0.05, 0.01))
    rtol, first = tolerances(device)
    report["checks"].append(compare("--grad_checkpointing vs plain", runner.run(
        "ckpt", device, runner.low, "--grad_checkpointing"), plain, rtol, first))
    report["checks"].append(compare("--fsdp (torchrun, one process) vs plain", runner.run(
        "fsdp1", device, runner.low, "--fsdp", nproc=1), plain, rtol, first))
    if device == "cpu":
        report["checks"].append({"check": "--dtype=float16 vs bf16", "skipped": "a CUDA path (the CPU runs float32)"})
    else:  # fp16 keeps 3 more mantissa bits than bf16: its gap is bf16's own
        report["checks"].append(compare("--dtype=float16 (GradScaler) vs bfloat16", runner.run(
            "fp16", device, "--dtype=float16"), plain, 0.05, 0.01))


def part_multi(runner, report):
    device = runner.device
    if device.startswith("cuda") and torch.cuda.device_count() < 2:
        report["checks"].append({"check": "DDP and FSDP over 2 processes",
                                 "skipped": f"needs 2 GPUs ({torch.cuda.device_count()} visible)"})
        return
    # same global batch; balance loss off: it is per process (a product of two means, not
    # linear in the batch), so with it the runs differ by design
    half = runner.batch // 2
    one = runner.run("one", device, runner.low, "--balance_coef=0")
    rtol, first = tolerances(device)
    for name, flags in (("ddp2", ()), ("fsdp2", ("--fsdp",))):
        two = runner.run(name, device, runner.low, "--balance_coef=0", *flags, nproc=2, batch=half)
        report["checks"].append(compare(f"{'FSDP' if flags else 'DDP'} over 2 processes vs one (same global batch)",
                                        two, one, rtol, first))


def part_sigterm(runner, report):
    """SIGTERM mid-run, exit 143 with ckpt.pt, --resume: the same losses and metrics as
    an uninterrupted run, exactly (same device, same kernels, random states restored)."""
    device = runner.device
    steps, stop_after = (40, 8) if runner.quick else (300, 60)
    flags = [runner.low, "--lora_dropout=0.1"]  # dropout on: the device's random state matters
    env = {"CUBLAS_WORKSPACE_CONFIG": ":4096:8"}  # cuBLAS's own reproducibility condition
    t0 = time.time()
    whole = runner.run("whole", device, *flags, steps=steps, batch=8, env=env)
    name = "SIGTERM, then --resume, vs an uninterrupted run"
    if "error" in whole:
        report["checks"].append({"check": name, "ok": False, "error": whole["error"]})
        return
    cut = runner.tmp / "cut"
    argv = [sys.executable, "train.py", *runner.argv(cut, device, *flags, steps=steps, batch=8)]
    with open(runner.tmp / "cut.log", "w") as log:
        proc = subprocess.Popen(argv, cwd=HERE, env={**os.environ, **env, "PYTHONUNBUFFERED": "1"}, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        metrics = cut / "metrics.jsonl"
        while runner.clock.left() > 1 and proc.poll() is None and \
                (not metrics.exists() or len(metrics.read_text().splitlines()) < stop_after):
            time.sleep(0.01)
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=max(1.0, runner.clock.left()))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise OutOfTime() from None
    ckpt = cut / "ckpt.pt"
    stopped_at = torch.load(ckpt, weights_only=True)["step"] if ckpt.exists() else None
    if code != 128 + signal.SIGTERM or stopped_at is None or (cut / "result.json").exists():
        tail = (runner.tmp / "cut.log").read_text()[-1500:]
        report["checks"].append({"check": name, "ok": False, "error": f"exit {code} (expected 143), checkpoint at "
                                 f"step {stopped_at}; raise the steps if it finished first: {tail}"})
        return
    code, out, err = run_process(argv + ["--resume"], runner.clock.left(), env)
    if code:
        report["checks"].append({"check": name, "ok": False, "error": "resume: " + failure(code, out, err)})
        return
    resumed = read_run(cut)
    from safetensors.torch import load_file
    a, b = load_file(cut / "adapter.safetensors"), load_file(runner.tmp / "whole" / "adapter.safetensors")
    adapters = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    same = resumed["losses"] == whole["losses"] and resumed["metrics"] == whole["metrics"] and adapters
    gaps = relative_gaps(resumed["losses"], whole["losses"]) if len(resumed["losses"]) == len(whole["losses"]) \
        else np.array([np.inf])
    report["checks"].append({"check": name, "ok": bool(same), "stopped_at": stopped_at, "steps": steps,
                             "exact": bool(same), "adapters_equal": bool(adapters), "max_loss_gap": float(gaps.max()),
                             "first_loss_gap": float(gaps[0]), "dev": accuracy(resumed),
                             "reference_dev": accuracy(whole), "seconds": round(time.time() - t0, 1)})


def part_generation(runner, report):
    """An instruct task on a tiny LLaMA: trained, then scored by greedy generation in
    batches on the device."""
    model = make_llama(runner.tmp / "llama", runner.quick)
    data = make_instruct(runner.tmp / "instruct")
    out = runner.tmp / "generation"
    t0 = time.time()
    code, stdout, stderr = run_process(
        [sys.executable, "train.py", f"--model={model}", "--task=instruct", f"--data_dir={data}", "--train_sets=toy",
         f"--out_dir={out}", "--method=goat", "--rank=8", "--experts=4", "--batch_size=8", "--eval_batch_size=4",
         f"--max_steps={20 if runner.quick else 60}", "--lr=1e-2", "--warmup=2", "--max_new_tokens=8",
         "--max_eval_examples=12", "--log_every=1", "--ckpt_every=100000", f"--device={runner.device}",
         runner.low], runner.clock.left())
    name = f"instruct generation on {runner.device} (tiny LLaMA)"
    if code:
        report["checks"].append({"check": name, "ok": False, "error": failure(code, stdout, stderr)})
        return
    run = read_run(out)
    score = accuracy(run)
    report["checks"].append({"check": name, "ok": isinstance(score, float) and 0.0 <= score <= 1.0,
                             "accuracy": score, "first_loss": run["losses"][0], "last_loss": run["losses"][-1],
                             "seconds": round(time.time() - t0, 1)})


def bench_rows(parts, device, quick, clock):
    """bench.py's parts on the device, each in its own process (a fresh allocator, and a
    hung part can be stopped): merged results, or the errors."""
    merged, errors = {}, {}
    for part in parts:
        argv = [sys.executable, "bench.py", f"--devices={device.split(':')[0]}", f"--parts={part}"]
        code, out, err = run_process(argv + (["--quick"] if quick else []), clock.left())
        line = next((l for l in reversed(out.splitlines()) if l.startswith("RESULT ")), None)
        if code or line is None:
            errors[part] = failure(code, out, err)
            continue
        for key, value in json.loads(line[len("RESULT "):]).items():
            if isinstance(value, list):
                merged.setdefault(key, []).extend(value)
            elif isinstance(value, dict) and isinstance(merged.get(key), dict):
                merged[key].update(value)
            elif value not in (None, [], {}) or key not in merged:
                merged[key] = value
    return merged, errors


def part_bench(runner, report):
    merged, errors = bench_rows(BENCH_PARTS, runner.device, runner.quick, runner.clock)
    report["bench"].update(merged)
    for part, error in errors.items():
        report["checks"].append({"check": f"bench.py --parts={part}", "ok": False, "error": error})


def part_compile(runner, report):
    merged, errors = bench_rows(["compile"], runner.device, runner.quick, runner.clock)
    report["bench"].setdefault("compile", []).extend(merged.get("compile", []))
    for row in merged.get("compile", []):  # a failed compile is reported, not a crash: the check says which
        name = f"bench compiled: {row['what']}"
        if row["compile"].startswith("skipped"):
            report["checks"].append({"check": name, "skipped": row["compile"][len("skipped: "):]})
            continue
        report["checks"].append({"check": name, "ok": row["compile"] == "ok" and bool(row.get("same_output")),
                                 **{k: row[k] for k in ("compile", "compiled/eager", "compile_s", "graphs",
                                                        "graph_breaks", "max_rel_diff") if k in row}})
    for part, error in errors.items():
        report["checks"].append({"check": f"bench.py --parts={part}", "ok": False, "error": error})
    plain = report["runs"].get("cpu_float32" if runner.device == "cpu" else "plain")
    if plain is None or "error" in plain:  # the train part did not run: an eager run of its own
        plain = runner.run("plain", runner.device, runner.low)
    rtol, first = (0.02, 0.005) if runner.device.startswith("cuda") else (1e-3, 1e-5)  # fusion reorders sums
    report["checks"].append(compare("train.py --compile vs eager", runner.run(
        "compiled", runner.device, runner.low, "--compile"), plain, rtol, first))


RUN = {"bench": part_bench, "train": part_train, "generation": part_generation, "sigterm": part_sigterm,
       "multi": part_multi, "compile": part_compile}


# --- the report -----------------------------------------------------------------------------

def fmt(v, digits=3):
    if isinstance(v, float):
        return f"{v:.{digits}g}"
    return "" if v is None else str(v)


def markdown(report):
    """A short report the README can quote: the checks, then bench.py's rows."""
    lines = [f"# gpu_check: {report['device']}", "",
             f"torch {report['torch']} (CUDA {report['cuda']}), {report['gpus']} GPU(s); "
             f"{report['seconds']:.0f} s of a {report['budget_s']:.0f} s budget"
             + (" (--quick: a smoke test)" if report["quick"] else ""), "",
             "| part | status | seconds (estimate on one H200) |", "|---|---|---|"]
    for name, part in report["parts"].items():
        lines.append(f"| {name} | {part['status']} | {fmt(part.get('seconds'))} ({part['estimate_s']}) |")
    lines += ["", "| check | result | loss gap (max / first) | dev (reference) | seconds |", "|---|---|---|---|---|"]
    for c in report["checks"]:
        result = ("skipped: " + c["skipped"]) if "skipped" in c else ("ok" if c["ok"] else "FAIL")
        if "error" in c:
            result += ": " + c["error"].strip().splitlines()[0][:160].replace("|", "/")
        gap = f"{fmt(c.get('max_loss_gap'))} / {fmt(c.get('first_loss_gap'))}" if "max_loss_gap" in c else ""
        dev = fmt(c.get("dev", c.get("accuracy"))) + (f" ({fmt(c['reference_dev'])})" if "reference_dev" in c else "")
        lines.append(f"| {c['check']} | {result} | {gap} | {dev} | {fmt(c.get('seconds'))} |")
    bench = report["bench"]
    if bench.get("layers"):
        names = ("base", "lora", "goat", "loop", "full_moe")
        lines += ["", "Layer forward + backward (ms); peak MiB of each variant alone (weights, step, input gradient):",
                  "", "| shape, tokens, dtype | " + " | ".join(names) + " | GOAT / LoRA | loop / GOAT | peak MiB "
                  + " / ".join(names) + " |", "|---|" + "---|" * (len(names) + 3)]
        for r in bench["layers"]:
            ms = " | ".join(fmt(r["ms"].get(k), 4) for k in names)
            peaks = " / ".join(fmt(r["memory"].get(k, {}).get("peak_MiB"), 4) for k in names)
            lines.append(f"| {r['shape']}, {r['tokens']}, {r['dtype']} | {ms} | {r['goat/lora']:.2f} | "
                         f"{r['loop/goat']:.2f} | {peaks} |")
    for key in ("model_cuda", "model_cpu"):
        m = bench.get(key)
        if m:
            lines += ["", f"MiniLM training step, {m['batch']} x {m['seq']} tokens, {m['device']} ({m['precision']}): "
                      + ", ".join(f"{k} {v} ms" for k, v in m["ms"].items()) + f"; GOAT / LoRA {m['goat/lora']:.2f}"]
    for row in bench.get("autocast_memory", []):
        lines.append(f"\nSaved for backward under bf16 autocast, {row['shape']}, T={row['tokens']}, {row['input']} "
                     f"input: GOAT {row['saved_MiB']['goat']} MiB, LoRA {row['saved_MiB']['lora']} MiB "
                     f"({row['goat/lora']:.3f}x)")
    for device, g in (bench.get("grad_checkpointing") or {}).items():
        if g:
            lines.append(f"\n--grad_checkpointing ({device}): {g['without']:.0f} MiB without, {g['with']:.0f} MiB "
                         f"with ({100 * g['saved_fraction']:.0f}% less)")
    if bench.get("compile"):
        lines += ["", "| compiled | backend | eager ms | compiled ms | compiled / eager | compile s | graphs, breaks |"
                  " max rel. gap |", "|---|---|---|---|---|---|---|---|"]
        for r in bench["compile"]:
            if r.get("compile") != "ok":
                lines.append(f"| {r['what']} ({r['dtype']}) | {r['backend']} | {r['compile']} | | | | | |")
                continue
            lines.append(f"| {r['what']} ({r['dtype']}) | {r['backend']} | {fmt(r['ms']['eager'], 4)} | "
                         f"{fmt(r['ms']['compiled'], 4)} | {r['compiled/eager']:.2f} | {r['compile_s']} | "
                         f"{r.get('graphs')}, {r.get('graph_breaks')} | {fmt(r['max_rel_diff'], 2)} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", help="cuda, cuda:1 (that GPU alone: the 2-GPU part then skips), "
                                                    "or cpu (a smoke test of this script)")
    p.add_argument("--quick", action="store_true", help="small models and shapes, few steps")
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, of {', '.join(PARTS)}")
    p.add_argument("--budget", type=float, default=None,
                   help="seconds for all parts (default: 540 on CUDA, leaving a margin in 10 minutes; 3600 on the CPU)")
    p.add_argument("--out", default=os.environ.get("OUT", "."), help="where gpu_check.json and gpu_check.md go")
    args = p.parse_args(argv)
    if args.device.startswith("cuda:"):  # that GPU alone, here (before CUDA starts) and in every child process
        index, visible = args.device.split(":", 1)[1], os.environ.get("CUDA_VISIBLE_DEVICES")
        if not index.isdigit():
            p.error(f"--device={args.device}: give cuda:<index>, such as cuda:1")
        if visible is not None:  # the index counts the GPUs shown already
            shown = [x for x in visible.split(",") if x.strip()]
            if int(index) >= len(shown):
                p.error(f"--device={args.device}: CUDA_VISIBLE_DEVICES={visible!r} shows {len(shown)} GPU(s)")
            index = shown[int(index)]
        os.environ["CUDA_VISIBLE_DEVICES"], args.device = index, "cuda"
    parts = [x for x in args.parts.split(",") if x]
    if [x for x in parts if x not in PARTS]:
        p.error(f"--parts: choose from {', '.join(PARTS)}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --device=cpu for a smoke test of this script")
    budget = args.budget if args.budget is not None else (540 if args.device.startswith("cuda") else 3600)
    clock, started = Clock(budget), time.time()
    report = {"device": torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else "cpu",
              "torch": torch.__version__, "cuda": torch.version.cuda,
              "gpus": torch.cuda.device_count() if torch.cuda.is_available() else 0, "quick": args.quick,
              "budget_s": budget, "parts": {}, "checks": [], "bench": {}, "runs": {}}
    with tempfile.TemporaryDirectory() as tmp:
        runner = None
        for name in parts:
            part = report["parts"][name] = {"estimate_s": ESTIMATE_S[name]}
            # the estimate is an H200's; on the CPU the smoke test only needs some time left,
            # and with one GPU the 2-process part only says it needs two
            one_gpu = name == "multi" and report["gpus"] < 2
            needed = ESTIMATE_S[name] if args.device.startswith("cuda") and not one_gpu else 1
            if clock.left() < needed:
                part["status"] = "skipped: out of time"
                print(f"{name}: skipped: out of time ({clock.left():.0f} s left, about {needed} s needed)", flush=True)
                continue
            t0, before = time.time(), len(report["checks"])
            try:
                runner = runner or Runner(Path(tmp), args.device, args.quick, clock)
                RUN[name](runner, report)
                failed = [c for c in report["checks"][before:] if c.get("ok") is False]
                part["status"] = "failed" if failed else "ok"
            except OutOfTime:
                part["status"] = f"timed out after {time.time() - t0:.0f} s (out of budget)"
            except Exception as e:  # a bug here, or a run that left no files: the other parts still run
                import traceback
                part["status"] = "failed"
                report["checks"].append({"check": f"the {name} part", "ok": False,
                                         "error": f"{type(e).__name__}: {e}\n{traceback.format_exc()[-1500:]}"})
            part["seconds"] = round(time.time() - t0, 1)
            for c in report["checks"][before:]:
                print(f"{'skip' if 'skipped' in c else 'ok  ' if c['ok'] else 'FAIL'} {c['check']}: " + ", ".join(
                    f"{k} {v}" for k, v in c.items() if k not in ("check", "ok")), flush=True)
            print(f"{name}: {part['status']} in {part['seconds']:.0f} s (estimate on one H200: {part['estimate_s']} s)",
                  flush=True)
    report["seconds"] = round(time.time() - started, 1)
    report["all_ok"] = all(c.get("ok", True) for c in report["checks"]) and \
        not any(part["status"].startswith("timed out") for part in report["parts"].values())
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps(report, indent=1))
    (out / "gpu_check.md").write_text(markdown(report))
    print("RESULT " + json.dumps(report), flush=True)
    return report


if __name__ == "__main__":
    sys.exit(0 if main()["all_ok"] else 1)
