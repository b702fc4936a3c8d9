"""bench.py compares like with like; study.py tunes by its stated rule (grids that
grow at an edge, the best mean validation score), computes its intervals right,
and builds its report from result files alone; requirements admit only the torch
versions the code runs on."""
import math

import pytest
import torch

import bench
import study


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


def fake_result(run, val, dev=None, status="ok", curve_shift=0.0):
    """The record study.py writes for a run, with chosen numbers."""
    return {"id": run.id, "part": run.part, "task": run.task, "label": run.label, "lr": run.lr, "eta": run.eta,
            "seed": run.seed, "status": status, "val": val, "dev": val if dev is None else dev, "seconds": 60.0,
            "metric": "accuracy", "majority": {"val": 0.3, "dev": 0.3},
            "loss_curve": [[5 * i, 1.0 - 0.01 * i + curve_shift] for i in range(1, 21)]}


def score(label, lr, eta, task):
    """A made-up validation score peaking at lr 1e-4 for full, 1e-3 for lora, (3e-4, eta 1) for goat."""
    best = {"full": 1e-4, "lora": 1e-3}.get(label, 3e-4)
    value = 0.8 - 0.05 * abs(math.log10(lr / best)) - (0.02 * abs(math.log10(eta)) if eta else 0.0)
    return value - (0.1 if task == "cola" else 0.0)


def finish(results, runs, shift=0.0):
    for run in runs:
        if run.id not in results:
            results[run.id] = fake_result(run, score(run.label, run.lr, run.eta, run.task) + shift)


def test_a_grid_grows_at_its_edge_and_stops_inside(monkeypatch):
    monkeypatch.setattr(study, "METHODS", {"full": study.Method(["--method=full"], [3e-6, 1e-5, 3e-5]),
                                           "lora": study.Method(["--method=lora"], [3e-4, 1e-3, 3e-3])})
    results = {}
    for _ in range(6):  # each round finishes what the plan asks for
        finish(results, [r for r in study.plan(results)[0] if r.part == "tune"])
    chosen = study.plan(results)[1]
    assert chosen == {"full": (1e-4, None), "lora": (1e-3, None)}
    full_grid = sorted({r.lr for r in study.tuning("full", results)[0]})
    assert full_grid == [3e-6, 1e-5, 3e-5, 1e-4, 3e-4]  # grown twice upwards, then the best is inside
    runs = study.plan(results)[0]
    assert {(r.task, r.seed) for r in runs if r.part == "seeds" and r.label == "lora"} == \
        {(t, s) for t in study.TASKS for s in (1, 2)}
    seeded = [r.label for r in runs if r.part == "seeds"]  # the paired differences' methods first
    assert seeded == sorted(seeded, key=["lora", "full"].index) and seeded[0] == "lora"


def test_a_diverged_setting_ranks_below_every_finished_one(monkeypatch):
    monkeypatch.setattr(study, "METHODS", {"lora": study.Method(["--method=lora"], [3e-4, 1e-3, 3e-3])})
    results = {}
    for run in study.tuning("lora", results)[0]:
        diverged = run.lr == 3e-3 and run.task == "sst2"  # one task diverged: the setting is out
        results[run.id] = fake_result(run, {3e-4: 0.90, 1e-3: 0.95, 3e-3: 0.99}[run.lr],
                                      status="diverged" if diverged else "ok")
    _, pick, means = study.tuning("lora", results)
    assert means[(3e-3, None)] == -math.inf and pick == (1e-3, None)


def test_goat_is_tuned_over_lr_and_eta(monkeypatch):
    monkeypatch.setattr(study, "METHODS", {"goat": study.Method(["--method=goat"], [1e-4, 3e-4, 1e-3], [0.1, 1.0, 10.0])})
    results = {}
    for _ in range(4):
        finish(results, [r for r in study.plan(results)[0] if r.part == "tune"])
    assert study.plan(results)[1]["goat"] == (3e-4, 1.0)
    assert len(study.tuning("goat", results)[0]) == 9 * len(study.TASKS)


def test_a_method_also_runs_at_its_own_best_setting_for_the_ablation_task(monkeypatch):
    """GOAT's setting is shared by all tasks; where it lags on the ablation task, its best
    setting there (by validation score) runs too, seeds 1-2 next to the tuning run's seed 0."""
    monkeypatch.setattr(study, "METHODS", {"goat": study.Method(["--method=goat"], [1e-4, 3e-4, 1e-3], [0.1, 1.0, 10.0])})
    monkeypatch.setattr(study, "PER_TASK", ("goat",))
    results = {}
    for _ in range(4):
        finish(results, [r for r in study.plan(results)[0] if r.part == "tune"])
    assert not [r for r in study.plan(results)[0] if r.label == "goat" and r.part == "ablation"]  # its best: the chosen
    own = study.Run("tune", study.ABLATION_TASK, "goat", 1e-4, 0, 0.1)
    results[own.id]["val"] = 0.75  # better than the chosen (3e-4, 1) on this task alone, not on the mean
    runs, chosen = study.plan(results)
    assert chosen["goat"] == (3e-4, 1.0)
    extra = [r for r in runs if r.label == "goat" and r.part == "ablation"]
    assert [(r.task, r.lr, r.eta, r.seed) for r in extra] == [(study.ABLATION_TASK, 1e-4, 0.1, s) for s in (1, 2)]
    for run in runs:
        if run.id not in results:
            results[run.id] = fake_result(run, 0.5, dev=0.25 if run in extra else 0.2)
    results[own.id]["dev"] = 0.25
    results[study.Run("tune", study.ABLATION_TASK, "goat", 3e-4, 0, 1.0).id]["dev"] = 0.2
    text = study.Study(results).ablations()
    row = next(line for line in text.splitlines() if line.startswith("| goat at its best"))
    assert "(0.0001, eta 0.1)" in row and "| 1,2 | +5.0 [+5.0, +5.0]" in row  # seeds 1-2 (0 chose it), paired


def test_goat_alpha_and_molora_are_compared_only_at_one_setting(monkeypatch):
    monkeypatch.setattr(study, "METHODS", {"molora": study.Method(["--method=molora"], [3e-4, 1e-3, 3e-3]),
                                           "goat (alpha)": study.Method(["--method=goat", "--scaling=alpha"],
                                                                        [1e-4, 3e-4, 1e-3])})
    results = {}
    for _ in range(6):
        for run in study.plan(results)[0]:
            if run.id not in results and run.part in ("tune", "seeds"):
                val = score(run.label, run.lr, run.eta, run.task)
                results[run.id] = fake_result(run, val, dev=0.5 - (0.03 if run.label == "goat (alpha)" else 0.0))
    both = study.Study(results)
    assert both.chosen["molora"] == both.chosen["goat (alpha)"] == (3e-4, None)
    assert "| molora | -3.0 [-3.0, -3.0] | -3.0 [-3.0, -3.0] | -3.0 [-3.0, -3.0] | -3.0 [-3.0, -3.0] (n=9) |" \
        in both.init_at_one_setting()
    for record in results.values():  # MoLoRA's best moves to 1e-3: the two no longer share a setting
        if record["label"] == "molora" and record["lr"] == 1e-3:
            record["val"] = 0.99
    assert study.Study(results).init_at_one_setting() == ""


def test_t_interval_against_scipy():
    stats = pytest.importorskip("scipy.stats")
    values = [0.012, -0.004, 0.021, 0.007, 0.015]
    mean, half = study.t_interval(values)
    low, high = stats.t.interval(0.95, len(values) - 1, loc=mean, scale=stats.sem(values))
    assert half == pytest.approx(high - mean, rel=1e-3) and half == pytest.approx(mean - low, rel=1e-3)
    for df in range(1, 31):
        assert study.T975[df - 1] == pytest.approx(stats.t.ppf(0.975, df), abs=1e-3)


def test_report_from_result_files_alone(tmp_path, monkeypatch):
    """A whole synthetic study: every part reported, paired differences exact, plots written."""
    monkeypatch.setattr(study, "METHODS", {"full": study.Method(["--method=full"], [3e-5, 1e-4, 3e-4]),
                                           "lora": study.Method(["--method=lora"], [3e-4, 1e-3, 3e-3]),
                                           "molora": study.Method(["--method=molora"], [3e-4, 1e-3, 3e-3]),
                                           "goat": study.Method(["--method=goat"], [1e-4, 3e-4, 1e-3], [0.1, 1.0, 10.0])})
    results = {}
    for _ in range(8):
        runs = study.plan(results)[0]
        for run in runs:
            if run.id not in results:  # GOAT 2 points above LoRA on dev at every (task, seed)
                base = score(run.label, run.lr, run.eta, run.task) + 0.001 * run.seed
                dev = base + (0.02 if run.label == "goat" else 0.0)
                results[run.id] = fake_result(run, base, dev, curve_shift=0.1 if run.label == "full-moe" else 0.0)
    goat_cola = results[study.Run("", study.ABLATION_TASK, "goat", *study.Study(results).chosen["goat"][:1], 0,
                                  study.Study(results).chosen["goat"][1]).id]
    goat_cola["expert_load"] = {"a": [0.5, 0.5, 0.0, 0.0], "b": [0.25, 0.25, 0.25, 0.25]}
    (tmp_path / "study" / "runs").mkdir(parents=True)
    for record in results.values():
        (tmp_path / "study" / "runs" / f"{record['id']}.json").write_text(study.json.dumps(record))
    study.main(["--report_only", f"--results_dir={tmp_path / 'study'}"])
    text = (tmp_path / "study.md").read_text()
    for title in ("Headline", "Paired differences", "Tuning", "eta x lr", "full MoE", "Ablations", "Total rank 8",
                  "Compute"):
        assert title in text, title
    lora_row = next(line for line in text.splitlines() if line.startswith("| lora |") and "[" in line)
    assert "+2.0 [+2.0, +2.0]" in lora_row  # the exact 2-point difference, with a zero-width interval
    assert "ranges 0.00-0.50" in text and "1 of 2 layers keep every expert within 0.1" in text
    assert "under 0.01: a." in text
    assert (tmp_path / "study_lr_sweep.png").exists() and (tmp_path / "study_loss_sst2.png").exists()


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


def test_a_study_run_records_its_result_even_over_an_interrupted_one(tiny_bert_dir, glue_dir, tmp_path, monkeypatch):
    """The runner itself, end to end on a tiny model: a folder left by an interrupted run
    is started again, and the record holds the metrics, flags and loss curve."""
    monkeypatch.setattr(study, "COMMON", study.COMMON + ["--max_steps=4", "--batch_size=16", "--eta=1"])
    monkeypatch.setattr(study, "TASKS", {"sst2": (64, 16)})
    args = study.argparse.Namespace(runs_dir=str(tmp_path / "runs"), results_dir=str(tmp_path / "results"),
                                    data_dir=str(glue_dir), code_dir=str(study.HERE), model=str(tiny_bert_dir))
    run = study.Run("tune", "sst2", "goat", 1e-3, 0, 1.0, ("--method=goat", "--rank=8", "--experts=4"))
    leftover = tmp_path / "runs" / run.id
    leftover.mkdir(parents=True)
    (leftover / "config.json").write_text("{}")
    (leftover / "ckpt.pt").write_bytes(b"torn")
    (tmp_path / "results" / "runs").mkdir(parents=True)
    record = study.execute(run, args, "test")
    assert record["status"] == "ok", record.get("log_tail")
    assert record["steps"] == 4 and len(record["loss_curve"]) == 2 and 0 <= record["val"] <= 1
    saved = study.load_results(tmp_path / "results")
    assert saved[run.id]["dev"] == record["dev"] and not (leftover / "ckpt.pt").exists()


def test_explained_by_finds_the_number_that_decides_a_grid():
    lrs, etas = [1e-4, 3e-4, 1e-3, 3e-3], [1e-3, 1e-2, 1e-1, 1.0, 10.0]
    peak = lambda x: -(math.log10(x) + 3.5) ** 2  # best at lr x eta^p = 10^-3.5
    for true_power in (1.0, 0.25):
        points = [(lr, eta, peak(lr * eta ** true_power)) for lr in lrs for eta in etas]
        fits = {p: study.explained_by(points, p) for p in study.INVARIANTS}
        assert fits[true_power] == pytest.approx(1.0)
        assert all(fits[p] < 0.9 for p in fits if p != true_power), fits


@pytest.mark.parametrize("chosen_gain,verdict", [(0.02, "the chosen setting is better, so train.py's default should become "
                                                       "lr 0.001, eta 0.1"),
                                                 (0.0, "not shown better, so train.py's default should stay the paper's eta 1, "
                                                       "with lr 0.0003")])
def test_the_paper_eta_is_seeded_next_to_goats_choice_and_decides_the_default(monkeypatch, chosen_gain, verdict):
    monkeypatch.setattr(study, "METHODS", {"goat": study.Method(["--method=goat"], [1e-4, 3e-4, 1e-3], [0.01, 0.1, 1.0])})

    def val(run):  # best at (1e-3, eta 0.1); at eta 1 the best lr is 3e-4
        if run.eta is None:  # the head-only control
            return 0.5
        if run.eta == 1.0:
            return 0.7 - 0.05 * abs(math.log10(run.lr / 3e-4))
        return 0.8 - 0.05 * abs(math.log10(run.lr / 1e-3)) - 0.05 * abs(math.log10(run.eta / 0.1))
    results = {}
    for _ in range(4):
        for run in study.plan(results)[0]:
            if run.id not in results:  # dev: the paper's eta equal to the chosen one, or chosen_gain below it
                wobble = [0.01, -0.02, 0.015][run.seed]
                paper = run.eta == 1.0 and run.lr == 3e-4
                results[run.id] = fake_result(run, val(run), 0.6 + wobble - (chosen_gain if paper else 0.0))
    assert study.plan(results)[1]["goat"] == (1e-3, 0.1) and study.paper_eta_lr(results) == 3e-4
    seeded = {(r.lr, r.eta, r.seed) for r in study.plan(results)[0] if r.part == "seeds"}
    assert {(3e-4, 1.0, 1), (3e-4, 1.0, 2), (1e-3, 0.1, 1), (1e-3, 0.1, 2)} <= seeded
    text = study.Study(results).default_choice()
    assert verdict in text, text


def test_goats_grid_grows_around_its_best_setting_not_by_whole_rows(monkeypatch):
    monkeypatch.setattr(study, "METHODS", {"goat": study.Method(["--method=goat"], [1e-4, 3e-4, 1e-3], [0.1, 1.0, 10.0])})

    def val(run):  # best at (3e-3, eta 0.01), outside the starting grid
        return 0.8 - 0.05 * abs(math.log10(run.lr / 3e-3)) - 0.05 * abs(math.log10(run.eta / 0.01))
    results = {}
    for _ in range(6):
        for run in study.plan(results)[0]:
            if run.part == "tune" and run.id not in results:
                results[run.id] = fake_result(run, val(run))
    grid, pick, means = study.tuning("goat", results)
    assert pick == (3e-3, 0.01)
    around = {(lr, eta) for lr in (1e-3, 3e-3, 1e-2) for eta in (1e-3, 1e-2, 0.1)}
    assert around <= set(means)  # every neighbour of the choice has run
    # 9 to start, 5 + 5 around the best twice, (3e-3, eta 1) beside the paper's eta's best lr; not 5 x 5 or more
    assert len(means) == 9 + 5 + 5 + 1 and (1e-4, 1e-3) not in means


def test_the_head_alone_runs_at_goats_lr_and_is_paired_with_goat(monkeypatch):
    monkeypatch.setattr(study, "METHODS", {"goat": study.Method(["--method=goat"], [1e-4, 3e-4, 1e-3], [0.1, 1.0, 10.0])})
    results = {}
    for _ in range(4):
        finish(results, [r for r in study.plan(results)[0] if r.part == "tune"])
    lr, eta = study.plan(results)[1]["goat"]
    control = [r for r in study.plan(results)[0] if r.part == "control"]
    assert {(r.task, r.seed, r.lr, r.eta) for r in control} == {(t, s, lr, None) for t in study.TASKS for s in study.SEEDS}
    import train
    args = train.parse_args(list(control[0].flags))
    assert args.method == "lora" and float(args.scaling) == 1e-9
    for run in study.plan(results)[0]:  # GOAT 0.05 above the head alone on every task and seed
        if run.id not in results and run.part in ("seeds", "control"):
            results[run.id] = fake_result(run, 0.5, 0.55 if run.label == "goat" else 0.50 + 0.01 * run.seed)
    for s in study.SEEDS:  # seed 0 of GOAT is its tuning run
        for t in study.TASKS:
            results[study.Run("tune", t, "goat", lr, 0, eta).id]["dev"] = 0.55
    text = study.Study(results).head_only()
    assert "| GOAT minus head only" in text and "(n=9)" in text and "Pooled over (task, seed) pairs: +4.0" in text, text


def test_train_defaults_are_the_committed_studys_choices():
    """train.py's default learning rates (and GOAT's eta) are what study.py chose from the
    committed run records; this keeps the two in step as the study goes on."""
    import train
    found = study.Study(study.load_results(study.HERE / "results" / "study"))
    for method in ("lora", "pissa", "milora", "molora", "full"):
        if method in found.chosen:
            assert train.parse_args([f"--method={method}"]).lr == found.chosen[method][0], method
    if found.goat_default() is not None:
        args = train.parse_args([])
        assert (args.method, args.lr, args.eta) == ("goat", *found.goat_default())
    assert train.parse_args(["--lr=1e-4"]).eta == 1.0  # a learning rate of one's own: the paper's eta
    assert train.parse_args(["--scaling=alpha"]).lr == 3e-4
