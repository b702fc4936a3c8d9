"""bench.py compares like with like, and compare.py's table says what was run."""
import torch

import bench
import compare


def test_bench_variants_compute_the_same_function_at_init():
    """LoRA (B = 0) and the upcycled MoE (E copies of W0) equal the base Linear; the
    authors' loop equals GOAT's dense layer. So timings differ by method cost alone."""
    layers = bench.layer_variants(48, 40, torch.device("cpu"), torch.float32)
    x = torch.randn(64, 48)
    base = layers["base"](x)
    torch.testing.assert_close(layers["lora"](x), base)
    torch.testing.assert_close(layers["full_moe"](x), base, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layers["loop"](x), layers["goat"](x), rtol=1e-5, atol=1e-6)
    _, saved = bench.saved_bytes(lambda: layers["goat"](x.requires_grad_()))
    assert saved > 0


def test_time_side_by_side_runs_every_variant():
    calls = {"a": 0, "b": 0}

    def bump(name):
        def run():
            calls[name] += 1
        return run
    times = bench.time_side_by_side({"a": bump("a"), "b": bump("b")}, repeats=3, warmup=2, device=torch.device("cpu"))
    assert calls == {"a": 5, "b": 5} and set(times) == {"a", "b"}


def test_compare_table_means_spreads_and_averages():
    scores = {("sst2", "lora"): [0.80, 0.82], ("cola", "lora"): [0.20, 0.30], ("sst2", "goat"): [0.85]}
    text = compare.table(scores, ["sst2", "cola"], ["lora", "goat"], [0, 1], {"sst2": 100, "cola": 50})
    lines = text.splitlines()
    assert lines[2] == "| lora | 81.0 ± 1.4 | 25.0 ± 7.1 | 53.0 |"
    assert lines[3] == "| goat | 85.0 | - | - |"
    assert "sst2 2, cola 2" in text and "sst2 100, cola 50" in text


# torch features the code uses, with the release that introduced them. The minimum in
# requirements.txt must be at least the newest of those the code actually uses.
TORCH_FEATURES = {
    "init_sync=": (2, 6),  # DDP(init_sync=...), pytorch/pytorch#142824
    "from torch.distributed.fsdp import fully_shard": (2, 6),  # FSDP2's public home
    "get_optimizer_state_dict": (2, 2),  # torch.distributed.checkpoint.state_dict
    "torch.amp.GradScaler(": (2, 3),
}


def test_requirements_admit_only_torch_versions_the_code_runs_on():
    import re
    from pathlib import Path
    here = Path(__file__).resolve().parent
    source = "".join((here / name).read_text() for name in ("goat.py", "train.py", "data.py"))
    used = {feature: version for feature, version in TORCH_FEATURES.items() if feature in source}
    assert "init_sync=" in used and "from torch.distributed.fsdp import fully_shard" in used  # the table is live
    line = next(l for l in (here / "requirements.txt").read_text().splitlines() if re.match(r"torch\b", l))
    minimum = tuple(int(x) for x in re.search(r">=\s*(\d+)\.(\d+)", line).groups())
    assert minimum >= max(used.values()), (line, used)
    installed = tuple(int(x) for x in re.match(r"(\d+)\.(\d+)", torch.__version__).groups())
    assert installed >= minimum
