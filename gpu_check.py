"""
The CUDA paths, checked in one go on one GPU (under 10 minutes), with one report.

    python gpu_check.py                  # on a machine with a GPU; writes gpu_check.json too
    python gpu_check.py --device=cpu --quick   # the same script on the CPU (a smoke test)

1. bench.py's bf16 rows on the GPU: one layer (base, LoRA, GOAT, the authors' loop)
   in time and memory, the saved-for-backward budget under autocast, and a whole
   MiniLM-sized training step (GOAT / LoRA).
2. train.py in CUDA bf16 against the CPU in float32, on a small BERT built from a
   config (no download) and a learnable synthetic task: the losses must agree within
   bf16 tolerance.
3. --grad_checkpointing and --fsdp (one process under torchrun) on the GPU: they must
   train as the plain run does.
The report's last line is `RESULT {json}`.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import bench

HERE = Path(__file__).resolve().parent


def make_assets(folder):
    """A small BERT (4 layers, hidden 256) and a learnable sentence task in GLUE's SST-2 layout."""
    from transformers import BertConfig, BertModel, BertTokenizerFast
    words = [f"w{i}" for i in range(200)]
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + words
    (folder / "model").mkdir(parents=True)
    (folder / "model" / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizerFast(vocab_file=str(folder / "model" / "vocab.txt")).save_pretrained(folder / "model")
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(vocab), hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                         intermediate_size=1024, max_position_embeddings=128)).save_pretrained(folder / "model")
    rng = np.random.default_rng(0)
    (folder / "glue" / "SST-2").mkdir(parents=True)
    for name, n in (("train.tsv", 2048), ("dev.tsv", 256)):
        rows = ["sentence\tlabel"]
        for _ in range(n):
            label = int(rng.integers(2))
            ids = rng.integers(0, 100, 12) + 100 * label * (rng.random(12) < 0.3)  # a signal in 30% of the words
            rows.append(" ".join(words[i] for i in ids) + f"\t{label}")
        (folder / "glue" / "SST-2" / name).write_text("\n".join(rows) + "\n")
    return folder / "model", folder / "glue"


def train_run(model, glue, out, device, *extra, torchrun=False):
    argv = ["train.py", f"--model={model}", "--task=sst2", f"--data_dir={glue}", f"--out_dir={out}", "--method=goat",
            "--batch_size=32", "--max_steps=40", "--lr=1e-3", "--log_every=1", "--lora_dropout=0",
            f"--device={device}", *extra]
    if torchrun:
        argv = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", *argv]
    t0 = time.time()
    proc = subprocess.run([sys.executable, *argv], cwd=HERE, capture_output=True, text=True)
    if proc.returncode:
        return {"error": proc.stderr[-2000:]}
    losses = [r["task_loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
              if "task_loss" in r]
    result = json.loads((out / "result.json").read_text())
    return {"losses": losses, "dev": result["metrics"]["dev"]["accuracy"], "seconds": round(time.time() - t0, 1)}


def compare(name, run, reference, rtol):
    if "error" in run:
        return {"check": name, "ok": False, "error": run["error"]}
    a, b = np.array(run["losses"]), np.array(reference["losses"])
    gap = float(np.max(np.abs(a - b) / np.maximum(np.abs(b), 1e-3)))
    return {"check": name, "ok": bool(gap <= rtol), "max_relative_loss_gap": round(gap, 4), "rtol": rtol,
            "dev": run["dev"], "reference_dev": reference["dev"], "seconds": run["seconds"]}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--quick", action="store_true", help="small shapes and few repeats")
    p.add_argument("--out", default=os.environ.get("OUT", "."), help="where gpu_check.json goes")
    args = p.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --device=cpu for a smoke test of this script")
    report = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "torch": torch.__version__}
    repeats, warmup = (3, 1) if args.quick else (9, 2)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    shapes = [(1024, 1024, 4096)] if args.quick else [(1024, 1024, 16384), (4096, 4096, 16384)]
    report["layers"] = bench.bench_layers(shapes, device, dtype, repeats, warmup)
    report["autocast_memory"] = bench.bench_autocast_memory(device, n=1024 if args.quick else 4096,
                                                            tokens=2048 if args.quick else 8192)
    report["model_step"] = bench.bench_model(device, repeats, warmup)
    report["checks"] = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model, glue = make_assets(tmp)
        cpu = train_run(model, glue, tmp / "cpu", "cpu", "--dtype=float32")
        report["cpu_float32_run"] = cpu
        if "error" in cpu:
            report["checks"].append({"check": "cpu float32 reference run", "ok": False, "error": cpu["error"]})
        else:
            low = "--dtype=bfloat16" if device.type == "cuda" else "--dtype=float32"
            plain = train_run(model, glue, tmp / "dev", args.device, low)
            report["checks"].append(compare(f"train.py {args.device} {low[8:]} vs cpu float32", plain, cpu,
                                            0.05 if device.type == "cuda" else 1e-4))
            if "error" not in plain:
                report["checks"].append(compare("--grad_checkpointing", train_run(
                    model, glue, tmp / "ckpt", args.device, low, "--grad_checkpointing"), plain, 0.02))
                report["checks"].append(compare("--fsdp (one process)", train_run(
                    model, glue, tmp / "fsdp", args.device, low, "--fsdp", torchrun=True), plain, 0.02))
    for check in report["checks"]:
        print(f"{'ok  ' if check['ok'] else 'FAIL'} {check['check']}: " + ", ".join(
            f"{k} {v}" for k, v in check.items() if k not in ("check", "ok")), flush=True)
    (Path(args.out) / "gpu_check.json").write_text(json.dumps(report, indent=1))
    print("RESULT " + json.dumps(report))


if __name__ == "__main__":
    main()
