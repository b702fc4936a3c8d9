"""bench.py and gpu_check.py measure what they name: variants compute the same function,
each variant's memory is its own, a compiled step computes what the eager one does (or
says why it cannot), and gpu_check's report holds together. Behaviour only: no timing
is asserted (this may run on a busy machine)."""
import json

import pytest
import torch

import bench
import gpu_check

CPU = torch.device("cpu")


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


def test_a_variant_is_the_same_whichever_others_are_built():
    alone = bench.layer_variants(48, 40, CPU, torch.float32, ["loop"])["loop"]
    together = bench.layer_variants(48, 40, CPU, torch.float32)["loop"]
    assert all(torch.equal(a, b) for a, b in zip(alone.state_dict().values(), together.state_dict().values()))


def test_peak_bytes_counts_the_peak_not_what_is_left():
    def burst():
        big = torch.ones(1 << 18)  # 1 MiB, freed before the end
        return big.sum() + torch.zeros(4).sum()
    _, peak = bench.peak_bytes(burst, CPU)
    if peak is None:
        pytest.skip("this torch's profiler exposes no allocation events")
    assert 1 << 20 <= peak < 2 << 20


def test_each_variants_memory_is_its_own():
    """Measured alone and measured after the full MoE (E copies of the weight, and their
    gradients): the same bytes. Whole-process peaks would carry the MoE's."""
    n, m, tokens = 48, 40, 64
    alone = bench.isolated_memory(n, m, tokens, CPU, torch.float32, ["lora"])["lora"]
    if alone["step"] is None:
        pytest.skip("this torch's profiler exposes no allocation events")
    after = bench.isolated_memory(n, m, tokens, CPU, torch.float32, ["full_moe", "goat", "lora"])
    assert after["lora"] == alone
    assert after["full_moe"]["weights"] > bench.EXPERTS * n * m * 4 > alone["weights"]
    # the step makes at least the gradients of A (r x n), B (m x r) and the input (tokens x n)
    assert alone["step"] >= 4 * (bench.RANK * n + m * bench.RANK + tokens * n)
    assert alone["peak"] == alone["weights"] + alone["step"]


def test_every_variant_runs_in_cudas_precision_on_the_cpu():
    """CUDA's layer rows (bf16 base, bf16 autocast, float32 adapters) through CPU autocast."""
    row = bench.bench_layers([(48, 40, 64)], CPU, torch.bfloat16, repeats=1, warmup=0)[0]
    assert set(row["ms"]) == set(row["memory"]) == set(bench.VARIANTS) and row["dtype"] == "bfloat16"
    assert all(m["peak_MiB"] is None or m["peak_MiB"] > 0 for m in row["memory"].values())
    compiled = bench.bench_compile_layer(CPU, torch.bfloat16, 64, 128, repeats=1, warmup=0, backend="aot_eager")
    assert compiled["compile"] == "ok" and compiled["same_output"], compiled


def test_compiled_layer_step_computes_what_eager_does():
    """aot_eager traces as inductor does (dynamo and AOTAutograd, forward and backward)
    without generating code: fast enough for a test."""
    row = bench.bench_compile_layer(CPU, torch.float32, 64, 128, repeats=1, warmup=0, backend="aot_eager")
    assert row["compile"] == "ok", row
    assert row["same_output"] and row["max_rel_diff"] <= 1e-5
    assert set(row["ms"]) == {"eager", "compiled"} and row["compile_s"] >= 0


def test_a_failed_compile_is_a_row_not_a_crash():
    def broken(graph, example_inputs):
        raise RuntimeError("no compiler on this machine")
    row = bench.bench_compile_layer(CPU, torch.float32, 64, 32, repeats=1, warmup=0, backend=broken)
    assert row["compile"].startswith("compile failed:") and "no compiler on this machine" in row["compile"]
    assert "ms" not in row


def test_bench_main_runs_chosen_parts(capsys):
    result = bench.main(["--quick", "--devices=cpu", "--parts=autocast_memory,svd_init"])
    assert [r["input"] for r in result["autocast_memory"]] == ["bfloat16", "float32"]
    assert set(result["svd_init_s"]["cpu"]) == {"384"} and result["layers"] == []
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("RESULT ") and json.loads(last[7:])["quick"] is True


def test_gpu_check_reports_parts_out_of_time_as_skipped(tmp_path, capsys):
    report = gpu_check.main(["--device=cpu", "--quick", "--budget=0", f"--out={tmp_path}"])
    assert {p["status"] for p in report["parts"].values()} == {"skipped: out of time"}
    assert report["checks"] == [] and report["all_ok"]
    assert json.loads((tmp_path / "gpu_check.json").read_text())["parts"] == report["parts"]
    assert "| sigterm | skipped: out of time |" in (tmp_path / "gpu_check.md").read_text()
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("RESULT ")


def test_gpu_check_generation_on_the_cpu(tmp_path, capsys):
    """The cheapest part that runs train.py: a tiny LLaMA trains, generates and scores."""
    report = gpu_check.main(["--device=cpu", "--quick", "--parts=generation", f"--out={tmp_path}"])
    check = report["checks"][0]
    assert check["ok"], check
    assert 0.0 <= check["accuracy"] <= 1.0 and report["parts"]["generation"]["status"] == "ok"
    assert "instruct generation on cpu" in (tmp_path / "gpu_check.md").read_text()
