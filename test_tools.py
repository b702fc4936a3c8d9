"""study.py tunes by its stated rule (grids that grow at an edge, the best worst-task
score), never reports the seeds that chose, computes its intervals right, runs its
pinned code and builds its report from result files alone; align.py records every
variant step by step; requirements admit only the torch versions the code runs on."""
import json
import math
import statistics

import pytest
import torch

import study


def fake_result(run, val, dev=None, status="ok", majority=0.3):
    """The record study.py writes for a run, with chosen numbers."""
    record = {"id": run.id, "part": run.part, "task": run.task, "label": run.label, "lr": run.lr,
              "head_lr": run.head_lr, "seed": run.seed, "status": status, "seconds": 60.0, "commit": "abc",
              "argv": run.recorded_argv()}
    if status == "ok":
        record.update(val=val, dev=val if dev is None else dev, metric="accuracy",
                      majority={"val": majority, "dev": majority},
                      loss_curve=[[5 * i, 1.0 - 0.01 * i] for i in range(1, 21)])
    return record


def score(run, best=None):
    """A made-up validation score peaking at one lr per method (head-only: at 3e-3)."""
    best = best or {"full": 1e-4, "head only": 3e-3}.get(run.label, 3e-4)
    return 0.8 - 0.05 * abs(math.log10(run.lr / best)) - (0.1 if run.task == "cola" else 0.0)


def finish_study(results, make=score, rounds=12):
    """Run every due run of the plan with made-up scores until nothing new is due."""
    for _ in range(rounds):
        for run in study.plan(results)[0]:
            if run.id not in results:
                results[run.id] = fake_result(run, make(run))
    return results


def test_the_selection_rule_never_picks_a_setting_that_collapses_on_one_task():
    majority = {"docstrings": 0.2, "sst2": 0.5, "cola": 0.0}
    scores = {1e-3: {"docstrings": 0.90, "sst2": 0.86, "cola": 0.0},    # best mean, at the majority on CoLA
              3e-4: {"docstrings": 0.70, "sst2": 0.84, "cola": 0.20}}
    assert statistics.mean(scores[1e-3].values()) > statistics.mean(scores[3e-4].values())
    assert study.choose(scores, majority) == 3e-4
    scores[1e-4] = {"docstrings": 0.0, "sst2": 0.0, "cola": -math.inf}    # diverged
    assert study.choose(scores, majority) == 3e-4
    assert study.choose({1: {t: 0.0 for t in majority}, 2: {t: 0.0 for t in majority}}, majority) in (1, 2)


def test_a_grid_grows_at_its_edge_and_stops_inside(monkeypatch):
    monkeypatch.setattr(study, "METHODS", {"full": (["--method=full"], [3e-6, 1e-5, 3e-5])})
    results = finish_study({})
    runs, chosen = study.plan(results)
    assert chosen["full"] == 1e-4 and chosen["head"] == 3e-3
    tuned = {r.lr for r in runs if r.part == "tune"}
    assert {3e-5, 1e-4, 3e-4} <= tuned and 1e-3 not in tuned  # grown to the peak and one beyond, no further


def test_the_head_lr_is_chosen_first_and_shared_by_every_method(monkeypatch):
    monkeypatch.setattr(study, "METHODS", {k: study.METHODS[k] for k in ("lora", "goat")})
    runs, chosen = study.plan({})
    assert {r.part for r in runs} == {"head"} and chosen == {}
    results = finish_study({})
    runs, chosen = study.plan(results)
    assert chosen["head"] == 3e-3
    assert all(r.head_lr == 3e-3 for r in runs if r.part != "head")
    assert {r.seed for r in runs if r.part in ("head", "tune")} == {0}
    assert {r.seed for r in runs if r.part == "seeds"} == {1, 2, 3, 4, 5}


def test_selection_seeds_are_never_reported(tmp_path, monkeypatch):
    """Seed 0 chose the settings; its dev scores must not move any reported number."""
    monkeypatch.setattr(study, "METHODS", {k: study.METHODS[k] for k in ("lora", "goat", "goat (Adam s)")})
    results = finish_study({})
    texts = []
    for seed0_dev in (0.0, 1.0):
        for record in results.values():
            if record["seed"] == 0:
                record["dev"] = seed0_dev
        texts.append(study.report(study.Records(results)))
    assert texts[0] == texts[1]


def test_report_from_result_files_alone(tmp_path, monkeypatch):
    """A whole synthetic study: every part reported, paired differences exact, ranks by
    task, plots written."""
    monkeypatch.setattr(study, "METHODS", {k: study.METHODS[k] for k in ("full", "lora", "goat", "goat (Adam s)")})

    def make(run):  # GOAT (paper) 2 points above LoRA on dev at every (task, seed)
        return score(run) + 0.001 * run.seed
    results = finish_study({}, make)
    for record in results.values():
        if record["label"] == "goat":
            record["dev"] += 0.02
        record["expert_load"] = {"encoder.0.query": [0.75, 0.25]}
    (tmp_path / "study" / "runs").mkdir(parents=True)
    (tmp_path / "study" / "code.json").write_text('{"commit": "abc"}')
    for record in results.values():
        (tmp_path / "study" / "runs" / f"{record['id']}.json").write_text(json.dumps(record))
    study.main(["--report_only", f"--results_dir={tmp_path / 'study'}"])
    text = (tmp_path / "study.md").read_text()
    for title in ("Tuning", "Headline", "mean rank", "Paired differences: goat", "defaults", "Ablations",
                  "Experts and top-k", "One LoRA from each SVD segment", "GOAT-s", "Compute"):
        assert title in text, title
    section = text.split("### Paired differences: goat\n")[1].split("###")[0]
    lora_row = next(line for line in section.splitlines() if line.startswith("| lora |"))
    assert lora_row.count("+2.0 [+2.0, +2.0]") == 3, lora_row  # exact, a zero-width interval, every task
    assert "| goat | 1 | 1 | 1 | 1.00 |" in text  # first on every task
    assert "| SST-2 acc | 1.0 | 0.0 | 0.0 | 6 |" in text  # every paired difference constant: sd 0, 6 pairs of 4 rows
    assert "every part of the plan has run" in text
    for plot in ("lr_sweep", "loss_sst2", "headline", "ablations", "segments", "expert_load_cola"):
        assert (tmp_path / f"study_{plot}.png").exists(), plot


def test_the_achieved_sensitivity_is_1_68_median_paired_sds(monkeypatch):
    """Two methods whose SST-2 scores differ by 0, 1, 0, 1, 0 points over seeds 1-5: paired
    sd 0.548, so 1.68 x 0.548 = 0.92 points detected with 80% power."""
    monkeypatch.setattr(study, "METHODS", {k: study.METHODS[k] for k in ("lora", "goat")})

    class Records:
        chosen = {"lora": 3e-4, "goat": 3e-4}

        def headline_scores(self, label):
            bump = {"goat": 0.0, "lora": 0.01}[label]
            return {t: {s: 0.8 + bump * (s % 2 == 0) for s in study.REPORT_SEEDS} for t in study.TASKS}
    assert "| SST-2 acc | 1.0 | 0.9 | 0.5 | 1 |" in study.detectable(Records())


def test_two_paired_values_are_shown_per_seed_and_three_get_an_interval():
    assert study.fmt_interval([0.01, 0.01]) == "+1.0 / +1.0 (per seed)"  # not a zero-width "interval"
    assert study.fmt_interval([0.01, 0.02, 0.03]) == "+2.0 [-0.5, +4.5]"  # 2 +- 4.303 x 1 / sqrt(3)


def test_the_plots_of_a_study_half_run(tmp_path, monkeypatch):
    """Mid-study: one seed for some rows, a diverged run, the Adam row chosen before any
    ablation has run. The headline and expert load are drawn; the ablations and the
    per-segment sweep wait."""
    monkeypatch.setattr(study, "METHODS", {k: study.METHODS[k] for k in ("lora", "goat", "goat (Adam s)")})
    results = {}
    for _ in range(6):  # tuning only: the seeds are due, none has run
        for run in study.plan(results)[0]:
            if run.part in ("head", "tune") and run.id not in results:
                results[run.id] = fake_result(run, score(run))
    due, chosen = study.plan(results)
    due = [r for r in due if r.part == "seeds"]
    assert due and "goat (Adam s)" in chosen  # the ablations' reference row is chosen: only their runs are missing
    for run in due:
        if run.seed == 1 or (run.seed == 2 and run.label == "goat"):
            results[run.id] = fake_result(run, score(run), status="diverged" if run.label == "lora" else "ok")
            results[run.id]["expert_load"] = {"encoder.0.query": [0.75, 0.25]}
    study.plots(study.Records(results), tmp_path)
    assert (tmp_path / "study_headline.png").exists() and (tmp_path / "study_expert_load_cola.png").exists()
    assert not (tmp_path / "study_ablations.png").exists() and not (tmp_path / "study_segments.png").exists()


def test_a_task_whose_validation_and_dev_order_methods_differently_is_named(monkeypatch):
    """On CoLA GOAT trails LoRA on validation by 1 point and leads it on dev by 2 at
    every seed: the pair is named, beyond noise; where they tie, nothing is."""
    monkeypatch.setattr(study, "METHODS", {k: study.METHODS[k] for k in ("lora", "goat")})
    results = finish_study({})
    for record in results.values():
        if record["label"] == "goat" and record["task"] == "cola" and record["part"] == "seeds":
            record["val"] -= 0.01
            record["dev"] += 0.02
    text = study.split_agreement(study.Records(results))
    rows = {line.split(" | ")[0][2:]: line for line in text.splitlines()[2:]}
    assert rows["CoLA mcc"].startswith("| CoLA mcc | 1 of 3 | ") and \
        "lora vs goat: +1.0 / -2.0, beyond noise" in rows["CoLA mcc"], rows["CoLA mcc"]
    assert rows["SST-2 acc"] == "| SST-2 acc | 3 of 3 | - |"


def test_a_diverged_reported_run_counts_and_sends_the_default_to_a_gentler_rate(monkeypatch):
    """LoRA's chosen rate diverges on one CoLA seed: the run scores the majority class in
    the headline (not a mean of the good seeds), the plan runs the next gentler rung on
    seeds 1-5, and that rate becomes LoRA's default; GOAT, which never collapses, keeps its
    chosen rate."""
    monkeypatch.setattr(study, "METHODS", {k: study.METHODS[k] for k in ("lora", "goat")})
    results = finish_study({})
    runs, chosen = study.plan(results)
    assert not [r for r in runs if r.part == "fallback"]
    bad = study.Run("seeds", "cola", "lora", chosen["lora"], chosen["head"], 3, tuple(study.METHODS["lora"][0]))
    results[bad.id] = fake_result(bad, None, status="diverged")
    records = study.Records(results)
    assert records.headline_scores("lora")["cola"][3] == 0.3  # the majority class, not left out
    assert "| 5 (1 diverged) |" in study.headline_table(records)
    fallback = [r for r in study.plan(results)[0] if r.part == "fallback"]
    gentler = study.LADDER[study.rung(chosen["lora"]) - 1]
    assert {r.lr for r in fallback} == {gentler} and len(fallback) == 15 and all(r.label == "lora" for r in fallback)
    assert "- lora: lr 0.0003 collapses (cola seed 3 diverged); seeds at lr 0.0001 still running" in \
        study.defaults(records)
    finished = finish_study(dict(results))
    text = study.defaults(study.Records(finished))
    assert f"- lora: lr 0.0003 collapses (cola seed 3 diverged); lr {gentler:g}, the default" in text, text
    assert "- goat: lr 0.0003, the default" in text
    for run in fallback:  # the gentler rate collapses too: the search stops there
        results[run.id] = fake_result(run, 0.3 if run.task == "sst2" and run.seed == 2 else score(run))
    assert not [r for r in study.plan(results)[0] if r.part == "fallback" and r.id not in results]
    assert "lr 0.0001 collapses (sst2 seed 2); every rate down to 0.0001 collapses somewhere: lr 0.0003 " \
        "stays the default" in \
        study.defaults(study.Records(results))


def test_tied_means_share_their_rank_and_every_task_waits_for_its_seeds(monkeypatch):
    monkeypatch.setattr(study, "METHODS", {k: study.METHODS[k] for k in ("lora", "pissa", "goat")})
    results = finish_study({}, lambda run: 0.5 if run.label in ("lora", "pissa") else score(run))
    text = study.mean_ranks(study.Records(results))
    assert "| goat | 1 | 1 | 1 | 1.00 |" in text and "| lora | 2.5 | 2.5 | 2.5 | 2.50 |" in text, text
    del results[next(k for k, r in results.items() if r["part"] == "seeds" and r["task"] == "sst2" and r["label"] == "lora")]
    text = study.mean_ranks(study.Records(results))
    assert "SST-2" not in text.splitlines()[0] and "SST-2 acc: seeds still running" in text, text


def test_a_task_on_which_every_rate_diverges_grows_the_grid_gentler(monkeypatch):
    monkeypatch.setattr(study, "METHODS", {"lora": study.METHODS["lora"]})
    results = {}
    for _ in range(12):
        for run in study.plan(results)[0]:
            if run.id not in results:
                diverges = run.label == "lora" and run.task == "cola" and run.lr >= 1e-4
                results[run.id] = fake_result(run, None if diverges else score(run),
                                              status="diverged" if diverges else "ok")
    runs, chosen = study.plan(results)
    assert chosen["lora"] < 1e-4  # grown below its starting grid to a rate that finishes everywhere
    assert "every part of the plan has run" in study.status(study.Records(results))


def test_records_of_another_commit_or_design_are_set_aside_and_run_again(monkeypatch):
    monkeypatch.setattr(study, "METHODS", {"lora": study.METHODS["lora"]})
    results = finish_study({})
    run = next(study.design_run(r) for r in results.values() if r["part"] == "seeds" and r["label"] == "lora")
    assert study.current(results, "abc") == (results, {})
    assert study.current(results, "def")[0] == {}
    changed = dict(results[run.id], argv=results[run.id]["argv"] + ["--rank=8"])
    kept, aside = study.current({**results, run.id: changed}, "abc")
    assert list(aside) == [run.id] and run.id not in kept and run in study.plan(kept)[0]
    assert "Set aside: 1 record(s)" in study.status(study.Records(kept, aside))
    other_model = dict(results[run.id], argv=results[run.id]["argv"] + ["--model=prajjwal1/bert-tiny"])
    assert list(study.current({**results, run.id: other_model}, "abc")[1]) == [run.id]
    assert run.id in study.current({run.id: other_model}, "abc", model="prajjwal1/bert-tiny")[0]


def test_only_train_py_s_divergence_messages_make_a_run_diverged(tmp_path):
    run = study.Run("tune", "sst2", "lora", 1e-3, 0.3, 0)
    for tail, status in [("Traceback ...\nValueError: financial data not found", "failed"),
                         ("SystemExit: stopped: training diverged at step 40: the loss rose", "diverged"),
                         ("stopped: the loss or gradient norm became NaN or infinite at step 3.", "diverged")]:
        assert study.summarise(run, [], tmp_path, 1.0, 1, tail, "abc")["status"] == status, tail


# torch features the code uses, with the release that introduced them. The minimum in
# requirements.txt must be at least the newest of those the code actually uses.
TORCH_FEATURES = {
    "init_sync=": (2, 7),  # DDP(init_sync=...): not in 2.6.0 (its DDP tests fail there: an unexpected keyword)
    "fully_shard": (2, 6),  # FSDP2's public home, torch.distributed.fsdp
    "MixedPrecisionPolicy": (2, 6),
    "get_optimizer_state_dict": (2, 2),  # torch.distributed.checkpoint.state_dict
    "broadcast_from_rank0": (2, 4),  # StateDictOptions(broadcast_from_rank0=...): a resume sent from rank 0
    "torch.amp.GradScaler(": (2, 3),
}


def test_requirements_admit_only_torch_versions_the_code_runs_on():
    import re
    from pathlib import Path
    here = Path(__file__).resolve().parent
    source = "".join((here / name).read_text() for name in ("goat.py", "train.py", "data.py", "flags.py",
                                                             "processes.py", "run_folder.py"))
    used = {feature: version for feature, version in TORCH_FEATURES.items() if feature in source}
    assert "init_sync=" in used and "fully_shard" in used  # the table is live
    line = next(l for l in (here / "requirements.txt").read_text().splitlines() if re.match(r"torch\b", l))
    minimum = tuple(int(x) for x in re.search(r">=\s*(\d+)\.(\d+)", line).groups())
    assert minimum >= max(used.values()), (line, used)
    installed = tuple(int(x) for x in re.match(r"(\d+)\.(\d+)", torch.__version__).groups())
    assert installed >= minimum


def test_a_study_run_records_its_result_even_over_an_interrupted_one(tiny_bert_dir, glue_dir, tmp_path, monkeypatch):
    """The runner itself, end to end on a tiny model: a folder left by an interrupted run
    is started again, and the record holds the metrics, flags and loss curve."""
    monkeypatch.setattr(study, "COMMON", study.COMMON + ["--max_steps=4", "--batch_size=16"])
    monkeypatch.setattr(study, "TASKS", {"sst2": (64, 16)})
    args = study.argparse.Namespace(runs_dir=str(tmp_path / "runs"), results_dir=str(tmp_path / "results"),
                                    data_dir=str(glue_dir), model=str(tiny_bert_dir))
    run = study.Run("tune", "sst2", "goat", 1e-3, 3e-3, 0, ("--method=goat", "--eta=1", "--rank=8", "--experts=4"))
    leftover = tmp_path / "runs" / run.id
    leftover.mkdir(parents=True)
    (leftover / "config.json").write_text("{}")
    (leftover / "ckpt.pt").write_bytes(b"torn")
    (tmp_path / "results" / "runs").mkdir(parents=True)
    record = study.execute(run, args, study.HERE, "test")
    assert record["status"] == "ok", record.get("log_tail")
    assert record["steps"] == 4 and len(record["loss_curve"]) == 2 and 0 <= record["val"] <= 1
    assert "--head_lr=0.003" in record["argv"] and record["commit"] == "test"
    saved = study.load_results(tmp_path / "results")
    assert saved[run.id]["dev"] == record["dev"] and not leftover.exists()


def test_the_study_runs_the_code_of_its_pinned_commit(tmp_path):
    import subprocess
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=study.HERE, capture_output=True,
                          text=True).stdout.strip()
    if not head:
        pytest.skip("not a git checkout")
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "code.json").write_text(json.dumps({"commit": head}))
    code, commit = study.pinned_code(tmp_path / "results", tmp_path / "runs")
    assert commit == head and (code / "train.py").read_bytes() == subprocess.run(
        ["git", "show", f"{head}:train.py"], cwd=study.HERE, capture_output=True).stdout


def test_align_records_every_variant_step_by_step_in_strict_json(tiny_bert_dir, tmp_path, capsys):
    """align.py end to end on a tiny BERT: one record per (optimizer, seed), a row per step,
    strict JSON (a diverged loss would be null), the table and the plot. MoLoRA starts with
    B = 0, so its layers compute W0 x exactly at the first step: its routers see the full
    MoE's inputs and choose the same experts (agreement 1)."""
    import align
    out, threads = tmp_path / "align", torch.get_num_threads()
    try:
        align.main(["--optimizer=sgd", "--seed=0", "--steps=3", f"--model={tiny_bert_dir}", f"--out={out}"])
    finally:
        torch.set_num_threads(threads)  # align.py runs on one thread; the other tests on what they had
    text = (out / "sgd_s0.json").read_text()
    record = json.loads(text, parse_constant=lambda name: pytest.fail(f"{name} in a record"))
    assert [row["step"] for row in record["rows"]] == [1, 2, 3] and record["commit"]
    first, last = record["rows"][0], record["rows"][-1]
    assert set(first["agreement"]) == set(align.VARIANTS)
    assert first["agreement"]["MoLoRA, paper s"] == pytest.approx(1.0)
    assert all(0.0 <= a <= 1.0 for row in record["rows"] for a in row["agreement"].values())
    assert set(last["weight_gap"]) == set(align.VARIANTS)  # measured on the last step
    assert all(g > 0 and math.isfinite(g) for g in last["weight_gap"].values())
    ceiling = last["cosine_ceiling"]  # Eckart-Young: no rank-4 change is closer in angle than the best one
    assert 0 < ceiling["rank 4"] <= ceiling["rank 8"] <= 1 + 1e-9
    assert all(c <= ceiling["rank 8"] + 1e-6 for c in last["update_cosine"].values())
    assert all(c <= ceiling["rank 4"] + 1e-6 for k, c in last["update_cosine"].items() if k.startswith("MoLoRA"))
    assert record["full_moe_diverged_at"] is None
    printed = capsys.readouterr().out
    assert "| sgd (lr 0.03) | GOAT, paper s |" in printed and "the best any change of rank 4" in printed
    assert (tmp_path / "align.png").stat().st_size > 0
    assert align.finite_or_null({"loss": [1.0, float("nan")], "gap": float("inf")}) == {"loss": [1.0, None], "gap": None}


def test_on_a_plateau_the_gentlest_rate_within_one_standard_error_is_chosen():
    """The worst-task rule picks 1e-3 by a difference far below the noise; the one-standard-
    error rule walks down the ladder while every informative task stays within one
    standard error of it, and asks for the next rung before it decides."""
    majority = {"docstrings": 0.2, "sst2": 0.5, "cola": 0.0}
    scores = {1e-4: {"docstrings": 0.70, "sst2": 0.80, "cola": 0.40},   # docstrings: 5 points (2.3 se) below
              3e-4: {"docstrings": 0.745, "sst2": 0.795, "cola": 0.395},
              1e-3: {"docstrings": 0.75, "sst2": 0.80, "cola": 0.40}}
    best = study.choose(scores, majority)
    tasks = study.informative(scores, majority)
    assert best == 1e-3 and study.gentlest_within_noise(scores, best, tasks) == (3e-4, None)
    assert study.standard_error("docstrings", 0.75) == pytest.approx((0.75 * 0.25 / 400) ** 0.5)
    assert study.standard_error("cola", 0.4) == pytest.approx(1 / 2000 ** 0.5)
    scores[3e-4]["cola"] = 0.40 - 0.03  # 0.03 below on CoLA, where one standard error is 0.022
    assert study.gentlest_within_noise(scores, best, tasks) == (1e-3, None)
    del scores[1e-4]  # 3e-4 within noise, the rung below it not run yet: run it first
    scores[3e-4]["cola"] = 0.40
    assert study.gentlest_within_noise(scores, best, tasks) == (3e-4, 1e-4)
    for lr in scores:  # a task where nothing beats the majority class tells nothing, here too
        scores[lr]["cola"] = -0.1 if lr == 3e-4 else 0.0
    assert list(study.informative(scores, majority)) == ["docstrings", "sst2"]
    assert study.gentlest_within_noise(scores, best, study.informative(scores, majority))[0] == 3e-4


def test_a_flat_grid_grows_downwards_until_a_rung_falls_outside_the_noise(monkeypatch):
    """A method whose validation scores peak at 1e-3, 0.1 points lower at 1e-4 and 3e-4, and
    10 points lower outside: the grid grows around the peak (3e-3) and down from the
    start (1e-4, 3e-4, 1e-3) to 3e-5, and chooses 1e-4."""
    monkeypatch.setattr(study, "METHODS", {"lora": study.METHODS["lora"]})
    flat = lambda run: ({1e-4: 0.799, 3e-4: 0.799, 1e-3: 0.8}.get(run.lr, 0.7)
                        if run.label == "lora" else score(run))
    runs, chosen = study.plan(finish_study({}, make=flat))
    assert chosen["lora"] == 1e-4
    assert {r.lr for r in runs if r.part == "tune"} == {3e-5, 1e-4, 3e-4, 1e-3, 3e-3}


def test_align_keeps_its_record_when_the_full_moe_itself_diverges(tiny_bert_dir, tmp_path, monkeypatch):
    import align
    monkeypatch.setattr(align, "SETTINGS", {"sgd": (math.inf, 4)})  # weights inf or NaN after one step
    threads = torch.get_num_threads()
    try:
        align.main(["--optimizer=sgd", "--seed=0", f"--model={tiny_bert_dir}", f"--out={tmp_path / 'align'}"])
    finally:
        torch.set_num_threads(threads)
    record = json.loads((tmp_path / "align" / "sgd_s0.json").read_text())
    assert record["full_moe_diverged_at"] is not None and len(record["rows"]) == record["full_moe_diverged_at"] - 1


def test_the_head_rate_is_the_one_no_head_type_loses_much_at():
    """head_rate.py's rule: the worst (head, task) pair decides, so a rate that one head
    type collapses at loses even where another scores its best; a pair no rate lifts a
    point above the majority class is left out."""
    import head_rate

    def records(curves):  # {(head, task): {lr: metric}}; majority 0.5, the same score on every seed
        return [{"head": h, "task": t, "lr": lr, "val": [v] * 3, "majority": 0.5}
                for (h, t), curve in curves.items() for lr, v in curve.items()]
    rates = head_rate.RATES
    linear = {lr: 0.5 + 0.3 * i / (len(rates) - 1) for i, lr in enumerate(rates)}  # best at the largest rate
    two_layer = {lr: 0.8 if lr <= 3e-2 else 0.5 for lr in rates}  # falls to the majority above 3e-2
    rate, relative = head_rate.choose(records({("linear", "a"): linear, ("mlp", "a"): two_layer}))
    assert rate == 3e-2 and relative[("mlp", "a")][0.1] == 0.0
    rate, _ = head_rate.choose(records({("linear", "a"): linear}))
    assert rate == rates[-1]  # alone, the linear head's best
    flat = {lr: 0.505 for lr in rates}  # never a point above the majority: tells nothing
    rate, relative = head_rate.choose(records({("linear", "a"): linear, ("mlp", "b"): flat}))
    assert rate == rates[-1] and ("mlp", "b") not in relative
    import flags
    recorded = json.loads((study.HERE / "results" / "head_rate.json").read_text())["records"]
    assert head_rate.choose(recorded)[0] == flags.HEAD_LR  # train.py's default is the committed probe's choice
