"""train.py under hostile use: every flag checked before anything is written; output
folders never silently reused (--overwrite removes only what train.py wrote, an
evaluation never writes into a training run's folder); resume and --adapter checked
against what they hold; non-finite values stop the run before they are saved; every
rough edge gives a message that names the fix. Clusters: test_processes.py."""
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import flags
import goat
import processes
import run_folder
import train
from conftest import HERE, common, read_losses, read_result


def sst2(model_dir, out, glue_dir, *extra):
    return common(model_dir, out, "--task=sst2", f"--data_dir={glue_dir}", "--rank=8", "--experts=4",
                  "--batch_size=16", "--lr=5e-3", "--warmup=2", *extra)


def refused(argv, match, capsys):
    """flags.parse_args stops with status 2 and the message on stderr, as argparse does."""
    with pytest.raises(SystemExit):
        flags.parse_args(argv)
    err = capsys.readouterr().err
    assert __import__("re").search(match, err), err


# --- flags ---------------------------------------------------------------------------------

@pytest.mark.parametrize("argv,match", [
    (["--eta=0"], "eta=0.0 must be a positive finite number"),
    (["--rho=0"], "rho=0.0 must be a positive finite number"),
    (["--scaling=nan"], "scaling=nan must be a positive finite number"),
    (["--scaling=-1"], "scaling=-1.0 must be a positive finite number"),
    (["--method=pissa", "--alpha=0"], "alpha=0.0 must be a positive finite number"),
    (["--alpha=nan"], "alpha=nan"),  # refused even where the paper's scaling ignores it
    (["--lr=0"], "--lr=0.0 must be a finite number in"),
    (["--lr=10"], "--lr=10.0 must be a finite number in .*AdamW"),
    (["--lr=nan"], "--lr=nan"),
    (["--head_lr=0"], "--head_lr=0.0 must be a finite number in"),
    (["--epochs=-1"], "--epochs=-1.0 must be"),
    (["--max_train_examples=-5"], "--max_train_examples=-5 must be at least 1"),
    (["--max_eval_examples=0"], "--max_eval_examples=0 must be at least 1"),
    (["--eval_batch_size=0"], "--eval_batch_size=0 must be at least 1"),
    (["--targets="], "--targets='' names no module"),
    (["--targets=,"], "names no module"),
    (["--method=full-moe", "--experts=0", "--top_k=0"], "--experts=0 --top_k=0: need experts >= 1"),
    (["--method=full-moe", "--top_k=9"], "--top_k=9: need .* top_k <= experts"),
    (["--lora_dropout=1"], "dropout"),
    (["--warmup=-2"], "--warmup=-2.0"),
    (["--seed=1180591620717411303424"], r"--seed=\d+ must lie in \[0, 2\*\*32\)"),
    (["--seed=100000000000000000"], r"must lie in \[0, 2\*\*32\)"),
    (["--resume", "--overwrite"], "pick one"),
    (["--resume", "--max_steps=0"], "--resume continues training.*--adapter=<its folder> --max_steps=0"),
    (["--lr=0", "--rank=0"], "bad flags:\n  --lr=0.0 .*\n  .*rank=0"),  # every problem at once
])
def test_bad_flags_are_refused_with_the_flag_named(argv, match, capsys):
    refused(argv, match, capsys)


def test_help_shows_each_flag_with_its_one_default(capsys):
    with pytest.raises(SystemExit):
        flags.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for action in flags.build_parser()._actions:
        if action.option_strings and action.dest not in ("help", "version") and action.nargs != 0:
            help_text = " ".join(action.help.split())
            assert help_text.count("(default:") == 1, action.dest
    assert "(default: None)" not in text


def test_flags_that_mean_nothing_for_a_method_are_not_recorded(capsys):
    args = flags.parse_args(["--method=full", "--rank=8", "--eta=0.5"])
    assert args.rank is None and args.eta is None and args.experts is None
    assert "--eta, --rank have no effect with --method=full" in capsys.readouterr().out


def test_max_len_beyond_the_models_positions_is_refused(tiny_bert_dir, glue_dir, tmp_path):
    with pytest.raises(SystemExit, match="--max_len=256 exceeds the 128 positions"):
        train.main(sst2(tiny_bert_dir, tmp_path / "run", glue_dir, "--max_len=256", "--max_steps=2"))
    assert not (tmp_path / "run").exists()  # a refused run leaves no folder behind


def test_a_head_named_as_a_target_is_explained(tiny_bert_dir, glue_dir, tmp_path):
    with pytest.raises(SystemExit, match="classifier.*task head"):
        train.main(sst2(tiny_bert_dir, tmp_path / "run", glue_dir, "--targets=classifier", "--max_steps=2"))


# --- the output folder ---------------------------------------------------------------------

def files_of(folder):
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


def test_readme_sequence_leaves_every_run_intact(tiny_bert_dir, glue_dir, tmp_path):
    """Train into x, then evaluate its adapter with the default --out_dir: x-eval-sst2."""
    run = tmp_path / "goat_eta01"
    trained = train.main(sst2(tiny_bert_dir, run, glue_dir, "--max_steps=20", "--max_len=32"))
    before = files_of(run)
    argv = [a for a in sst2(tiny_bert_dir, run, glue_dir) if not a.startswith("--out_dir")]
    evaluated = train.main(argv + ["--max_steps=0", f"--adapter={run}"])
    assert evaluated == trained
    evaluation = read_result(tmp_path / "goat_eta01-eval-sst2")
    assert evaluation["metrics"] == read_result(run)["metrics"]
    assert evaluation["weights"] == f"--adapter={run}" and evaluation["trained_steps"] == 20
    assert evaluation["steps"] == 0 and files_of(run) == before
    alone = train.main(["--max_steps=0", f"--adapter={run}", f"--out_dir={tmp_path / 'alone'}"])
    assert alone == trained  # the README's form: the model, task, data and lengths are the adapter's
    config = json.loads((tmp_path / "alone" / "config.json").read_text())
    assert (config["task"], config["data_dir"], config["max_len"]) == ("sst2", str(glue_dir.resolve()), 32)
    with pytest.raises(SystemExit, match="would overwrite the adapter it reads"):
        train.main(argv + ["--max_steps=0", f"--adapter={run}", f"--out_dir={run}", "--overwrite"])
    with pytest.raises(SystemExit, match="holds a finished evaluation; pass --overwrite"):
        train.main(argv + ["--max_steps=0", f"--adapter={run}"])
    assert files_of(run) == before


def test_an_evaluation_never_writes_into_a_training_runs_folder(tiny_bert_dir, glue_dir, tmp_path):
    run, other = tmp_path / "run", tmp_path / "other"
    train.main(sst2(tiny_bert_dir, run, glue_dir, "--max_steps=4"))
    train.main(sst2(tiny_bert_dir, other, glue_dir, "--max_steps=2", "--seed=1"))
    before = files_of(run)
    for extra in (["--max_steps=0", "--overwrite"], ["--max_steps=0", "--overwrite", f"--adapter={other}"]):
        with pytest.raises(SystemExit, match="an evaluation never writes into a training run's folder"):
            train.main(sst2(tiny_bert_dir, run, glue_dir, *extra))
    assert files_of(run) == before
    unfinished = tmp_path / "unfinished"
    killed_after_checkpoint(sst2(tiny_bert_dir, unfinished, glue_dir, "--max_steps=400", "--ckpt_every=2"), unfinished)
    before = files_of(unfinished)
    with pytest.raises(SystemExit, match="an evaluation never writes into a training run's folder"):
        train.main(sst2(tiny_bert_dir, unfinished, glue_dir, "--max_steps=0", "--allow_resume_changes",
                        f"--adapter={other}"))
    assert files_of(unfinished) == before and run_folder.read_manifest(unfinished)["state"] == "running"


def test_a_failed_run_destroys_nothing(tiny_bert_dir, glue_dir, tmp_path):
    run = tmp_path / "run"
    train.main(sst2(tiny_bert_dir, run, glue_dir, "--max_steps=4"))
    before = files_of(run)
    with pytest.raises(SystemExit, match="holds a finished training run; pass --overwrite"):
        train.main(sst2(tiny_bert_dir, run, glue_dir, "--max_steps=4"))
    bad = [a if not a.startswith("--data_dir") else f"--data_dir={tmp_path / 'typo'}" for a in
           sst2(tiny_bert_dir, run, glue_dir, "--max_steps=4", "--overwrite")]
    with pytest.raises(SystemExit, match="no such file"):
        train.main(bad)
    assert files_of(run) == before


def test_overwrite_removes_only_what_train_py_wrote(tiny_bert_dir, glue_dir, tmp_path):
    """A model folder with a stray metrics.jsonl is no run: following the advice to
    --overwrite must not delete the model. A run folder that gained a file of someone
    else's is refused too, the file named."""
    model = tmp_path / "model"
    shutil.copytree(tiny_bert_dir, model)
    (model / "metrics.jsonl").write_text('{"step": 1}\n')
    (model / "result.json").write_text("{}")
    out = tmp_path / "out"
    shutil.copytree(model, out)
    before = files_of(out)
    for flag in ((), ("--resume",), ("--overwrite",)):
        with pytest.raises(SystemExit, match=r"holds files train.py did not write \(config.json, metrics.jsonl, "
                                             r"model.safetensors, result.json"):
            train.main(sst2(tiny_bert_dir, out, glue_dir, "--max_steps=2", *flag))
    assert files_of(out) == before
    run = tmp_path / "run"
    train.main(sst2(tiny_bert_dir, run, glue_dir, "--max_steps=2"))
    (run / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit, match=r"holds files train.py did not write \(notes.txt\)"):
        train.main(sst2(tiny_bert_dir, run, glue_dir, "--max_steps=2", "--overwrite"))
    (run / "notes.txt").unlink()
    train.main(sst2(tiny_bert_dir, run, glue_dir, "--max_steps=3", "--overwrite"))
    assert read_result(run)["steps"] == 3 and set(run_folder.read_manifest(run)["files"]) == \
        {p.name for p in run.iterdir()} - {run_folder.MANIFEST}


def test_a_damaged_manifest_cannot_delete_other_files(tiny_bert_dir, glue_dir, tmp_path):
    run, precious = tmp_path / "run", tmp_path / "precious.txt"
    train.main(sst2(tiny_bert_dir, run, glue_dir, "--max_steps=2"))
    precious.write_text("mine")
    manifest = json.loads((run / "run.json").read_text())
    damaged = [dict(manifest, files=manifest["files"] + [name]) for name in ("../precious.txt", str(precious),
                                                                            "notes.txt", ["x"], 1)]
    damaged += [{k: v for k, v in manifest.items() if k != "state"}, dict(manifest, state="gone"), [manifest]]
    for bad in damaged:
        (run / "run.json").write_text(json.dumps(bad))
        with pytest.raises(SystemExit, match="is not train.py's record of the folder"):
            train.main(sst2(tiny_bert_dir, run, glue_dir, "--max_steps=2", "--overwrite"))
    assert precious.read_text() == "mine" and (run / "result.json").exists()


def test_a_folder_inside_another_run_is_refused(tiny_bert_dir, glue_dir, tmp_path):
    run = tmp_path / "run"
    train.main(sst2(tiny_bert_dir, run, glue_dir, "--max_steps=2"))
    with pytest.raises(SystemExit, match="inside the folder of another run"):
        train.main(sst2(tiny_bert_dir, run / "sub", glue_dir, "--max_steps=0", f"--adapter={run}"))
    assert not (run / "sub").exists()
    experiment = tmp_path / "experiment"  # another tool's run.json (Sacred writes one) is no run of train.py's
    experiment.mkdir()
    (experiment / "run.json").write_text(json.dumps({"experiment": "mine", "status": "RUNNING"}))
    train.main(sst2(tiny_bert_dir, experiment / "run", glue_dir, "--max_steps=0", f"--adapter={run}"))
    assert (experiment / "run" / "result.json").exists()


def test_a_relative_adapter_path_is_recorded_whole(tiny_bert_dir, glue_dir, tmp_path, monkeypatch):
    run = tmp_path / "run"
    train.main(sst2(tiny_bert_dir, run, glue_dir, "--max_steps=2"))
    monkeypatch.chdir(run)
    args = flags.parse_args(["--adapter=adapter.safetensors", "--max_steps=0", "--task=sst2"])
    assert args.adapter == str(run / "adapter.safetensors") and args.out_dir == f"{run}-eval-sst2"


def test_a_missing_model_is_named(glue_dir, tmp_path):
    with pytest.raises(SystemExit, match="--model=.*nowhere: cannot load its tokenizer"):
        train.main(common(tmp_path / "nowhere", tmp_path / "run", "--task=sst2", f"--data_dir={glue_dir}"))


def test_folders_of_models_are_refused(tiny_bert_dir, glue_dir, tmp_path):
    for flag in ((), ("--resume",), ("--overwrite",)):
        with pytest.raises(SystemExit, match="the model's own folder"):
            train.main(sst2(tiny_bert_dir, tiny_bert_dir, glue_dir, "--max_steps=2", *flag))
    assert (tiny_bert_dir / "model.safetensors").exists() and (tiny_bert_dir / "config.json").exists()


def hold_lock(folder):
    """Another run holding the folder's lock, in a process of its own."""
    code = (f"import fcntl, os, sys, time; fd = os.open({str(folder / 'train.lock')!r}, os.O_CREAT | os.O_RDWR); "
            "fcntl.flock(fd, fcntl.LOCK_EX); print('locked', flush=True); time.sleep(120)")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_two_runs_cannot_share_a_folder_and_a_dead_runs_lock_is_free(tiny_bert_dir, glue_dir, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    holder = hold_lock(run)
    try:
        with pytest.raises(SystemExit, match="in use by another run"):
            train.main(sst2(tiny_bert_dir, run, glue_dir, "--max_steps=2"))
    finally:
        holder.kill()  # however a run dies, the OS releases its lock
        holder.wait()
    train.main(sst2(tiny_bert_dir, run, glue_dir, "--max_steps=2"))
    assert not (run / "train.lock").exists() and (run / "result.json").exists()


def test_a_folder_that_cannot_be_written_is_named(tiny_bert_dir, glue_dir, tmp_path, monkeypatch):
    """A read-only place: the message names the folder and the fix, in one process too."""
    def read_only(self, *a, **k):
        raise PermissionError(13, "Permission denied", str(self))
    with monkeypatch.context() as m:  # root writes anywhere: the file system's refusal, as it would come
        m.setattr(run_folder.Path, "mkdir", read_only)
        with pytest.raises(SystemExit, match="cannot create --out_dir=.*Permission denied; choose a folder you can"):
            train.main(sst2(tiny_bert_dir, tmp_path / "run", glue_dir, "--max_steps=2"))
    real_open = os.open
    (tmp_path / "existing").mkdir()
    monkeypatch.setattr(run_folder.os, "open", lambda path, *a: read_only(path) if str(path).endswith("train.lock")
                        else real_open(path, *a))
    with pytest.raises(SystemExit, match="cannot write to --out_dir=.*existing: Permission denied; choose a folder"):
        train.main(sst2(tiny_bert_dir, tmp_path / "existing", glue_dir, "--max_steps=2"))


def test_a_failed_save_leaves_no_temp_file_and_still_prints_the_metric(tiny_bert_dir, glue_dir, tmp_path,
                                                                     monkeypatch, capsys):
    def full_disk(f):
        f.write(b"partial")
        raise OSError(28, "No space left on device")
    real = run_folder.atomic_write
    monkeypatch.setattr(run_folder, "atomic_write", lambda path, write: real(path, full_disk)
                        if str(path).endswith(".safetensors") else real(path, write))
    with pytest.raises(SystemExit, match="could not write the adapter.*No space left"):
        train.main(sst2(tiny_bert_dir, tmp_path / "run", glue_dir, "--max_steps=3"))
    assert "RESULT {" in capsys.readouterr().out
    assert not list((tmp_path / "run").glob("*.tmp"))


def test_a_blocked_checkpoint_says_whether_an_earlier_one_is_intact(tiny_bert_dir, glue_dir, tmp_path, monkeypatch):
    real, steps = run_folder.atomic_write, []

    def blocked_at_step(step):
        def write(path, fill):
            if str(path).endswith("ckpt.pt") and len(steps) == step - 1:
                raise IsADirectoryError(21, "Is a directory", str(path) + ".tmp")  # something in the way
            if str(path).endswith("ckpt.pt"):
                steps.append(1)
            return real(path, fill)
        return write
    for step, kept in ((1, "no checkpoint was written"), (2, "the previous checkpoint is intact")):
        steps.clear()
        monkeypatch.setattr(run_folder, "atomic_write", blocked_at_step(step))
        with pytest.raises(SystemExit, match=f"could not write the checkpoint .* at step {2 * step}: .*{kept}"):
            train.main(sst2(tiny_bert_dir, tmp_path / str(step), glue_dir, "--max_steps=4", "--ckpt_every=2"))


def test_the_adapter_is_written_before_the_final_evaluation(tiny_bert_dir, glue_dir, tmp_path, monkeypatch):
    """An evaluation that runs out of memory (a KV cache at the end of an LLM run) loses no
    adapter; evaluation has its own batch size."""
    sizes = []
    real_predict = train.predict

    def spy(model, examples, task, tokenizer, args, *rest):
        sizes.append(args.eval_batch_size)
        raise MemoryError("CUDA out of memory (as it were)")
    monkeypatch.setattr(train, "predict", spy)
    run = tmp_path / "run"
    with pytest.raises(MemoryError):
        train.main(sst2(tiny_bert_dir, run, glue_dir, "--max_steps=3", "--eval_batch_size=7"))
    assert (run / "adapter.safetensors").exists() and sizes == [7]
    monkeypatch.setattr(train, "predict", real_predict)
    metrics = train.main(sst2(tiny_bert_dir, tmp_path / "eval", glue_dir, "--max_steps=0", f"--adapter={run}",
                              "--eval_batch_size=3"))
    assert 0 <= metrics["dev"]["accuracy"] <= 1


def killed_after_checkpoint(argv, out):
    """A train.py process SIGKILLed once its first checkpoint exists."""
    proc = subprocess.Popen([sys.executable, "train.py", *argv], cwd=HERE, env={**os.environ, "OMP_NUM_THREADS": "1"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (out / "ckpt.pt").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "result.json").exists()


# --- resume ---------------------------------------------------------------------------------

def test_resume_checks_the_checkpoint_against_the_flags(tiny_bert_dir, glue_dir, tmp_path):
    run = tmp_path / "run"
    killed_after_checkpoint(sst2(tiny_bert_dir, run, glue_dir, "--max_steps=400", "--ckpt_every=2"), run)
    with pytest.raises(SystemExit, match="holds an unfinished training run; pass --resume"):
        train.main(sst2(tiny_bert_dir, run, glue_dir, "--max_steps=400"))
    for flag, named in (("--rank=16", r"--rank: 8 vs 16.*original flags \(.*--rank=8"),
                        ("--method=lora", "--method: 'goat' vs 'lora'"), ("--experts=2", "--experts: 4 vs 2"),
                        ("--task=cola", "--task")):
        argv = [a for a in sst2(tiny_bert_dir, run, glue_dir, "--max_steps=400", "--resume")
                if not a.startswith(flag.split("=")[0] + "=")] + [flag]
        with pytest.raises(SystemExit, match=named):
            train.main(argv)
    with pytest.raises(SystemExit, match=r"--segments: None vs 2.*original flags \(drop --segments\)"):
        train.main(sst2(tiny_bert_dir, run, glue_dir, "--max_steps=400", "--resume", "--segments=2"))
    with pytest.raises(SystemExit, match=r"original flags \(drop --per_expert_scale\)"):  # a switch, not =False
        train.main(sst2(tiny_bert_dir, run, glue_dir, "--max_steps=400", "--resume", "--per_expert_scale"))
    with pytest.raises(SystemExit, match="--global_batch: 16 vs 8.*--allow_resume_changes"):
        train.main(sst2(tiny_bert_dir, run, glue_dir, "--max_steps=400", "--resume", "--batch_size=8"))
    other = tmp_path / "other"  # files with other contents: another run's data
    shutil.copytree(glue_dir, other)
    rows = (other / "SST-2" / "train.tsv").read_text().split("\n")
    (other / "SST-2" / "train.tsv").write_text("\n".join(rows[:-2]) + "\n")  # one training sentence fewer
    with pytest.raises(SystemExit, match="training data: checkpoint [0-9a-f]{12}, now [0-9a-f]{12}"):
        train.main(sst2(tiny_bert_dir, run, other, "--max_steps=400", "--resume"))
    with pytest.raises(SystemExit, match="beyond this run's 1 steps"):
        train.main(sst2(tiny_bert_dir, run, glue_dir, "--max_steps=1", "--resume", "--allow_resume_changes"))
    with (run / "metrics.jsonl").open("a") as f:
        f.write('{"step": 9999, "loss": 0.')  # a torn last line from the crash
    moved = tmp_path / "moved"  # the same training file in another place (a requeued job), another dev set
    shutil.copytree(glue_dir, moved)
    rows = (moved / "SST-2" / "dev.tsv").read_text().split("\n")
    (moved / "SST-2" / "dev.tsv").write_text("\n".join(rows[:-2]) + "\n")
    train.main(sst2(tiny_bert_dir, run, moved, "--max_steps=6", "--resume", "--allow_resume_changes"))
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().split("\n") if line]
    assert rows[-1]["step"] == 6 and read_result(run)["steps"] == 6
    changes = json.loads((run / "config.json").read_text())["resumed_at_step_with_changes"]["changes"]
    assert [c.split(":")[0] for c in changes] == ["--max_steps", "evaluation data"], changes


def test_resume_accepts_the_default_model_by_its_path(tiny_bert_dir, glue_dir, tmp_path):
    assert flags.model_name("model", None) == flags.model_name("model", flags.default_model())
    assert flags.differences({"model": None}, {"model": flags.default_model()}, ["model"], flags.model_name) == []
    assert flags.differences({"model": "/a/x"}, {"model": "/b/x"}, ["model"], flags.model_name) == []
    assert flags.differences({"model": "/a/x"}, {"model": "/a/y"}, ["model"], flags.model_name)


def test_damaged_checkpoint_and_adapter_files_are_named(tiny_bert_dir, glue_dir, tmp_path, capsys):
    run = tmp_path / "run"
    killed_after_checkpoint(sst2(tiny_bert_dir, run, glue_dir, "--max_steps=400", "--ckpt_every=2"), run)
    good = (run / "ckpt.pt").read_bytes()
    (run / "ckpt.pt").write_bytes(good[:500])
    with pytest.raises(SystemExit, match="ckpt.pt cannot be read"):
        train.main(sst2(tiny_bert_dir, run, glue_dir, "--max_steps=400", "--resume"))
    for foreign in ({"step": 3}, [1, 2]):  # a readable file, but not a checkpoint of train.py
        torch.save(foreign, run / "ckpt.pt")
        with pytest.raises(SystemExit, match="ckpt.pt is not a train.py checkpoint .no model, optimizer"):
            train.main(sst2(tiny_bert_dir, run, glue_dir, "--max_steps=400", "--resume"))
    done = tmp_path / "done"
    train.main(sst2(tiny_bert_dir, done, glue_dir, "--max_steps=2"))
    (done / "adapter.safetensors").write_bytes((done / "adapter.safetensors").read_bytes()[:300])
    refused(sst2(tiny_bert_dir, tmp_path / "eval", glue_dir, "--max_steps=0", f"--adapter={done}"),
            "adapter.safetensors cannot be read", capsys)


def test_a_float16_run_resumes_with_its_loss_scale(tiny_bert_dir, glue_dir, tmp_path):
    """GradScaler's scale is part of the checkpoint: a resumed float16 run goes on with
    the scale it had, not a fresh 65536 (whose overflows would skip steps the whole run
    never skipped)."""
    run = tmp_path / "run"
    killed_after_checkpoint(sst2(tiny_bert_dir, run, glue_dir, "--max_steps=400", "--ckpt_every=2",
                                 "--dtype=float16"), run)
    ckpt = torch.load(run / "ckpt.pt", weights_only=True)
    assert ckpt["config"]["dtype"] == "float16" and ckpt["scaler"]["scale"] > 0
    ckpt["scaler"]["scale"] = 1024.0  # as if it had backed off
    torch.save(ckpt, run / "ckpt.pt")
    train.main(sst2(tiny_bert_dir, run, glue_dir, "--max_steps=400", "--ckpt_every=1", "--dtype=float16", "--resume",
                    "--allow_resume_changes", f"--max_steps={ckpt['step'] + 1}"))
    assert torch.load(run / "ckpt.pt", weights_only=True)["scaler"]["scale"] in (1024.0, 512.0)
    for line in (run / "metrics.jsonl").read_text().split("\n")[:-1]:  # an overflow step's norm is null, not Infinity
        json.loads(line, parse_constant=lambda name: pytest.fail(f"metrics.jsonl holds {name}"))


class SignalWhenSent(processes.StopSignals):
    """The stop signals, with SIGTERM "received" once a test sets `sent`."""
    sent = False

    @property
    def received(self):
        return signal.SIGTERM if type(self).sent else None

    @received.setter
    def received(self, value):
        pass


def calls_to(name, monkeypatch, before=lambda n: None, module=train):
    """A list that grows by one at each call of module.<name>; before(n) runs ahead of the n-th."""
    calls, real = [], getattr(module, name)

    def counted(*a, **k):
        calls.append(1)
        before(len(calls))
        return real(*a, **k)
    monkeypatch.setattr(module, name, counted)
    return calls


def sigterm_during(name, call, monkeypatch, module=train):
    """SIGTERM "arrives" during the call-th call of module.<name> (train_step, evaluate, save_checkpoint)."""
    SignalWhenSent.sent = False
    monkeypatch.setattr(processes, "StopSignals", SignalWhenSent)
    calls_to(name, monkeypatch, lambda n: setattr(SignalWhenSent, "sent", SignalWhenSent.sent or n == call), module)


def stopped_then_resumed(flags_, run, monkeypatch):
    """(the step of the stopped run's checkpoint, the steps evaluated over both runs)."""
    with pytest.raises(SystemExit) as stopped:
        train.main(flags_)
    assert stopped.value.code == 128 + signal.SIGTERM
    step = torch.load(run / "ckpt.pt", weights_only=True)["step"]
    monkeypatch.undo()
    train.main([*flags_, "--resume"])
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return step, [row["step"] for row in rows if "eval" in row]


def test_a_stop_signal_is_checkpointed_before_any_evaluation(tiny_bert_dir, glue_dir, tmp_path, monkeypatch):
    """The grace period after SIGTERM is short: a stop at an --eval_every step writes its
    checkpoint and leaves; the resumed run evaluates that step first, once."""
    evaluated = calls_to("evaluate", monkeypatch)
    sigterm_during("train_step", 3, monkeypatch)
    run = tmp_path / "run"
    step, steps_evaluated = stopped_then_resumed(sst2(tiny_bert_dir, run, glue_dir, "--max_steps=10",
                                                      "--eval_every=1"), run, monkeypatch)
    assert step == 3 and len(evaluated) == 2  # steps 1 and 2
    assert steps_evaluated == list(range(1, 10))  # step 3 too, and no step twice


def test_a_stop_signal_during_an_evaluation_stops_after_it(tiny_bert_dir, glue_dir, tmp_path, monkeypatch):
    """A long evaluation (generation on a large model) may leave too little of the grace
    period for one more step: a signal during step 2's evaluation checkpoints step 2."""
    sigterm_during("evaluate", 2, monkeypatch)
    run = tmp_path / "run"
    step, steps_evaluated = stopped_then_resumed(sst2(tiny_bert_dir, run, glue_dir, "--max_steps=10",
                                                      "--eval_every=1", "--ckpt_every=1000"), run, monkeypatch)
    assert step == 2  # not 3, a step later
    assert steps_evaluated == list(range(1, 10))  # step 2 once, before the stop


def test_a_stop_signal_during_a_checkpoint_write_stops_after_it(tiny_bert_dir, glue_dir, tmp_path, monkeypatch):
    """A full model's checkpoint takes a while to write: a signal meanwhile stops the run
    at that checkpoint's step, before that step's evaluation (the resumed run's first
    work), not after one more step and one more write."""
    evaluated = calls_to("evaluate", monkeypatch)
    sigterm_during("save_checkpoint", 1, monkeypatch, module=run_folder)
    run = tmp_path / "run"
    step, steps_evaluated = stopped_then_resumed(sst2(tiny_bert_dir, run, glue_dir, "--max_steps=10",
                                                      "--ckpt_every=2", "--eval_every=2"), run, monkeypatch)
    assert step == 2 and not evaluated  # not 3, and no evaluation in the grace period
    assert steps_evaluated == [2, 4, 6, 8]


def test_a_refused_resume_names_the_original_flags_as_typed():
    args = flags.parse_args(["--per_expert_scale", "--lora_dropout=0.1"])
    saved = dict(vars(args), per_expert_scale=False, lora_dropout=0.0)  # 0.0 == False in Python
    with pytest.raises(SystemExit, match=r"original flags \(drop --per_expert_scale --lora_dropout=0.0\)"):
        run_folder.check_same_run(saved, args)


def test_a_failed_evaluation_loses_no_step(tiny_bert_dir, glue_dir, tmp_path, monkeypatch):
    """The checkpoint of an --eval_every step is written before its evaluation, which may
    run out of memory (a KV cache): the run resumes from that step, not the one before."""
    def out_of_memory(n):
        if n == 2:
            raise RuntimeError("CUDA out of memory (a test)")
    calls_to("evaluate", monkeypatch, out_of_memory)
    run = tmp_path / "run"
    with pytest.raises(RuntimeError, match="out of memory"):
        train.main(sst2(tiny_bert_dir, run, glue_dir, "--max_steps=10", "--eval_every=2", "--ckpt_every=2"))
    assert torch.load(run / "ckpt.pt", weights_only=True)["step"] == 4
    monkeypatch.undo()
    train.main(sst2(tiny_bert_dir, run, glue_dir, "--max_steps=10", "--eval_every=2", "--ckpt_every=2", "--resume"))
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows if "eval" in row] == [2, 4, 6, 8]  # step 4 evaluated on resuming


def test_a_stop_during_an_evaluation_never_checkpoints_a_bad_step(tiny_bert_dir, glue_dir, tmp_path, monkeypatch):
    """The stop after an evaluation checks the step's health first, as every checkpoint
    does: a NaN at step 2 (no logging step) stops the run there, and nothing is saved."""
    real = train.train_step

    def nan_at_step_2(*a, **k):
        nan_at_step_2.calls += 1
        loss, *rest = real(*a, **k)
        return (loss * float("nan") if nan_at_step_2.calls == 2 else loss), *rest
    nan_at_step_2.calls = 0
    sigterm_during("evaluate", 2, monkeypatch)
    monkeypatch.setattr(train, "train_step", nan_at_step_2)
    run = tmp_path / "run"
    with pytest.raises(SystemExit, match="NaN or infinite at step 2"):
        train.main(sst2(tiny_bert_dir, run, glue_dir, "--max_steps=10", "--eval_every=1", "--log_every=5",
                        "--ckpt_every=1000"))
    assert not (run / "ckpt.pt").exists()


def test_a_resumed_run_evaluates_no_step_twice(tiny_bert_dir, glue_dir, tmp_path):
    """Killed after a checkpoint (its step's evaluation, which follows it, done or not): the
    resumed run evaluates that step once, and no step twice."""
    run, flags_ = tmp_path / "run", ("--ckpt_every=2", "--eval_every=2")
    killed_after_checkpoint(sst2(tiny_bert_dir, run, glue_dir, "--max_steps=400", *flags_), run)
    step = torch.load(run / "ckpt.pt", weights_only=True)["step"]
    train.main(sst2(tiny_bert_dir, run, glue_dir, "--max_steps=400", *flags_, "--resume", "--allow_resume_changes",
                    f"--max_steps={step + 4}"))
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows if "eval" in row] == list(range(2, step + 4, 2))


def test_a_run_stopped_in_its_final_evaluation_resumes_into_it(tiny_bert_dir, glue_dir, tmp_path, capsys):
    """A stop signal after the last step (the loop's handlers are gone) ends the run at once,
    during the final evaluation: the last step's checkpoint is written, and --resume
    evaluates it and ends as the run would have."""
    run = tmp_path / "run"
    first = train.main(sst2(tiny_bert_dir, run, glue_dir, "--max_steps=4"))
    (run / "result.json").unlink()  # as a run ended during its final evaluation leaves it
    manifest = run_folder.read_manifest(run)
    run_folder.atomic_write(run / run_folder.MANIFEST, lambda f: f.write(run_folder.json_text(
        dict(manifest, state="running")).encode()))
    capsys.readouterr()
    assert train.main(sst2(tiny_bert_dir, run, glue_dir, "--max_steps=4", "--resume")) == first
    assert f"resumed from {run / 'ckpt.pt'} at step 4" in capsys.readouterr().out


def test_resume_runs_no_svd(tiny_bert_dir, glue_dir, tmp_path, monkeypatch):
    """The checkpoint holds the initial factors: resuming rebuilds W_res from them."""
    run = tmp_path / "run"
    killed_after_checkpoint(sst2(tiny_bert_dir, run, glue_dir, "--max_steps=400", "--ckpt_every=2"), run)

    def no_svd(*a, **k):
        raise AssertionError("an SVD ran on resume")
    monkeypatch.setattr(goat, "init_factors", no_svd)
    train.main(sst2(tiny_bert_dir, run, glue_dir, "--max_steps=6", "--resume", "--allow_resume_changes"))
    assert read_result(run)["steps"] == 6


# --- adapters ----------------------------------------------------------------------------------

def test_adapter_flags_come_from_the_adapter_file_and_conflicts_are_refused(tiny_bert_dir, glue_dir, tmp_path,
                                                                           capsys):
    run = tmp_path / "molora"
    train.main(sst2(tiny_bert_dir, run, glue_dir, "--method=molora", "--max_steps=3"))
    base = [a for a in sst2(tiny_bert_dir, tmp_path / "x", glue_dir) if not a.startswith(("--rank", "--experts"))]
    refused(base + [f"--adapter={run}", "--method=lora"], "was trained with other flags .--method: 'lora' vs 'molora'",
            capsys)
    train.main([a for a in base if not a.startswith("--out_dir")] + [f"--out_dir={tmp_path / 'more'}",
                                                                      f"--adapter={run}", "--max_steps=2"])
    result, config = read_result(tmp_path / "more"), json.loads((tmp_path / "more" / "config.json").read_text())
    assert result["method"] == config["method"] == "molora" and config["experts"] == 4
    assert result["trainable_params"] == read_result(run)["trainable_params"] and result["trained_steps"] == 5


def test_an_adapter_file_alone_says_what_it_is(tiny_bert_dir, glue_dir, tmp_path):
    """A LoRA adapter.safetensors shared without its folder: method, rank and scale come from
    the file's own metadata, not from train.py's defaults."""
    run = tmp_path / "lora"
    trained = train.main(sst2(tiny_bert_dir, run, glue_dir, "--method=lora", "--rank=4", "--alpha=16",
                              "--max_steps=6"))
    shared = tmp_path / "shared"
    shared.mkdir()
    shutil.copy(run / "adapter.safetensors", shared / "lora_adapter.safetensors")
    argv = [a for a in sst2(tiny_bert_dir, tmp_path / "eval", glue_dir) if not a.startswith(("--rank", "--experts"))]
    metrics = train.main(argv + ["--max_steps=0", f"--adapter={shared / 'lora_adapter.safetensors'}"])
    config = json.loads((tmp_path / "eval" / "config.json").read_text())
    assert (config["method"], config["rank"], config["alpha"]) == ("lora", 4, 16.0) and metrics == trained


def test_adapters_with_bad_tensors_or_metadata_are_refused(tiny_bert_dir, glue_dir, tmp_path, capsys):
    from safetensors.torch import load_file, save_file
    from safetensors import safe_open
    run = tmp_path / "run"
    train.main(sst2(tiny_bert_dir, run, glue_dir, "--max_steps=3"))
    with safe_open(str(run / "adapter.safetensors"), framework="pt") as f:
        meta = f.metadata()
    tensors = load_file(run / "adapter.safetensors")
    key = next(k for k in tensors if k.endswith(".lora_B"))
    bad = dict(tensors, **{key: tensors[key].clone().index_fill_(0, torch.tensor([0]), float("nan"))})
    save_file(bad, tmp_path / "nan.safetensors", metadata=meta)
    with pytest.raises(SystemExit, match=f"{key}.*(NaN|finite)"):
        train.main(sst2(tiny_bert_dir, tmp_path / "e1", glue_dir, "--max_steps=0",
                        f"--adapter={tmp_path / 'nan.safetensors'}"))
    save_file(dict(tensors, **{key: tensors[key].long()}), tmp_path / "int.safetensors", metadata=meta)
    with pytest.raises(SystemExit, match=f"{key}.*(integer|float)"):
        train.main(sst2(tiny_bert_dir, tmp_path / "e2", glue_dir, "--max_steps=0",
                        f"--adapter={tmp_path / 'int.safetensors'}"))
    half = {k: v.half() if k.endswith((".lora_A", ".lora_B")) else v for k, v in tensors.items()}
    save_file(half, tmp_path / "half.safetensors", metadata=meta)  # a user's fp16 copy: loads
    train.main(sst2(tiny_bert_dir, tmp_path / "e3", glue_dir, "--max_steps=0",
                    f"--adapter={tmp_path / 'half.safetensors'}"))
    save_file(tensors, tmp_path / "nometa.safetensors")
    refused(sst2(tiny_bert_dir, tmp_path / "e4", glue_dir, "--max_steps=0",
                 f"--adapter={tmp_path / 'nometa.safetensors'}"), "does not say how it was trained", capsys)
    for odd, named in (("[1]", "does not say how it was trained"),  # not an object
                       ("[" * 100_000 + "]" * 100_000, "does not say how it was trained"),  # past the recursion limit
                       (json.dumps(dict(json.loads(meta["train_flags"]), steps="12")), 'says it trained "12" steps')):
        save_file(tensors, tmp_path / "odd.safetensors", metadata=dict(meta, train_flags=odd))
        refused(sst2(tiny_bert_dir, tmp_path / "e6", glue_dir, "--max_steps=0",
                     f"--adapter={tmp_path / 'odd.safetensors'}"), named, capsys)
    save_file(tensors, tmp_path / "badjson.safetensors", metadata=dict(meta, goat_config="{not json"))
    with pytest.raises(SystemExit, match="goat_config"):
        train.main(sst2(tiny_bert_dir, tmp_path / "e5", glue_dir, "--max_steps=0",
                        f"--adapter={tmp_path / 'badjson.safetensors'}"))
    assert not (tmp_path / "e5").exists()  # a refused evaluation leaves no folder


def test_adapter_with_another_label_count_is_refused(tiny_bert_dir, glue_dir, tmp_path):
    run = tmp_path / "run"
    train.main(sst2(tiny_bert_dir, run, glue_dir, "--max_steps=2"))
    (glue_dir / "MNLI").mkdir(exist_ok=True)
    header = "index\tsentence1\tsentence2\tgold_label"
    rows = [f"{i}\tgood movie\tbad film\t{lab}" for i, lab in enumerate(["entailment", "neutral", "contradiction"] * 4)]
    for name in ("train.tsv", "dev_matched.tsv"):
        (glue_dir / "MNLI" / name).write_text("\n".join([header] + rows) + "\n")
    with pytest.raises(SystemExit, match="another number of labels"):
        train.main(common(tiny_bert_dir, tmp_path / "mnli", "--task=mnli", f"--data_dir={glue_dir}",
                          "--max_steps=0", f"--adapter={run}"))


def test_no_default_moves_when_another_flag_is_given():
    """GOAT's learning rate and eta are set on their own: giving one (or the scaling) leaves
    the others at their defaults."""
    default = flags.parse_args([])
    for argv in (["--lr=3e-3"], ["--scaling=alpha"], ["--eta=0.5"], ["--head_lr=1e-2"]):
        args = flags.parse_args(argv)
        for key in ("lr", "eta", "head_lr"):
            if f"--{key}=" not in argv[0]:
                assert getattr(args, key) == getattr(default, key), (argv, key)


@pytest.mark.parametrize("content,match", [
    (b"", "the file is empty"),
    (b"sentence\tlabel\n", "no examples"),
    (b"sentence\tlabel\ngood\t1\nbad \xff\xfe\t0\n", r"train.tsv:3: not UTF-8"),
])
def test_malformed_files_stop_with_their_name(content, match, tiny_bert_dir, tmp_path):
    (tmp_path / "glue" / "SST-2").mkdir(parents=True)
    (tmp_path / "glue" / "SST-2" / "train.tsv").write_bytes(content)
    (tmp_path / "glue" / "SST-2" / "dev.tsv").write_text("sentence\tlabel\ngood\t1\n")
    with pytest.raises(SystemExit, match=match):
        train.main(common(tiny_bert_dir, tmp_path / "run", "--task=sst2", f"--data_dir={tmp_path / 'glue'}"))
    assert not (tmp_path / "run").exists()


# --- what stops a run ------------------------------------------------------------------------

def test_a_non_finite_loss_stops_the_run_before_anything_is_saved(tiny_bert_dir, glue_dir, tmp_path, monkeypatch):
    run = tmp_path / "huge"  # a scale of 1e30 overflows the first gradient norm
    with pytest.raises(SystemExit, match="NaN or infinite at step 1.*lower"):
        train.main(sst2(tiny_bert_dir, run, glue_dir, "--method=lora", "--scaling=1e30", "--ckpt_every=1",
                        "--max_steps=8"))
    assert not (run / "ckpt.pt").exists() and not (run / "adapter.safetensors").exists()
    real = train.train_step

    def nan_at_step_4(*a, **k):  # the fourth optimizer step (calls counts from 0)
        nan_at_step_4.calls += 1
        loss, *rest = real(*a, **k)
        return (loss * float("nan") if nan_at_step_4.calls == 3 else loss), *rest
    nan_at_step_4.calls = -1
    monkeypatch.setattr(train, "train_step", nan_at_step_4)
    run = tmp_path / "run"
    with pytest.raises(SystemExit, match="NaN or infinite at step 4"):
        train.main(sst2(tiny_bert_dir, run, glue_dir, "--ckpt_every=1", "--log_every=5", "--max_steps=8"))
    ckpt = torch.load(run / "ckpt.pt", weights_only=True)
    assert ckpt["step"] == 3  # the last good step is kept, the bad one never written
    assert not (run / "adapter.safetensors").exists() and not (run / "result.json").exists()


def test_a_diverging_loss_stops_the_run():
    args = flags.parse_args([])
    health = processes.Health("cpu")
    health.check(1, [0.69, 1.0, 0.5, 0.0], args)
    health.check(10, [2.0, 1.0, 0.5, 0.0], args)  # worse, not diverged
    with pytest.raises(SystemExit, match="diverged at step 20: the loss rose from 0.69 to 4916"):
        health.check(20, [4916.0, 1.0, 0.5, 0.0], args)


def test_an_fp16_overflow_step_is_not_a_fault():
    """GradScaler skips a step whose gradients overflow: its gradient norm is inf by design."""
    args = flags.parse_args([])
    health = processes.Health("cpu")
    health.check(1, [0.69, 1.0, float("inf"), 0.0], args, fp16=True)  # no stop
    with pytest.raises(SystemExit, match="NaN or infinite") as stop:
        health.check(1, [0.69, 1.0, float("inf"), 0.0], args)  # bf16/fp32: a real fault
    assert "--dtype" not in str(stop.value)
    with pytest.raises(SystemExit, match="float16 overflows.*try --dtype=bfloat16 or float32"):
        health.check(2, [float("nan"), 1.0, float("inf"), 0.0], args, fp16=True)  # an overflow in the forward


def test_a_bad_step_on_another_process_stops_this_one_too():
    """Under fp16 each process watches its own loss: the flag, averaged with the logged
    values over processes, must stop every process at the same step (none left waiting)."""
    args = flags.parse_args([])
    health = processes.Health("cpu")
    health.update(3, torch.tensor(0.7), torch.tensor(1.0))  # fine here
    assert float(health.flag()) == 0.0
    with pytest.raises(SystemExit, match="NaN or infinite by step 5 on another process"):
        health.check(5, [0.7, 1.0, 0.5, 0.5], args)  # another process's flag, averaged over 2
    with pytest.raises(SystemExit, match="NaN or infinite by step 5"):
        processes.Health("cpu").check(5, [float("nan"), 1.0, 0.5, 0.0], args)
    health.update(4, torch.tensor(float("inf")), torch.tensor(1.0))
    assert float(health.flag()) == 1.0
    with pytest.raises(SystemExit, match="NaN or infinite at step 4"):
        health.check(5, [0.7, 1.0, 0.5, 0.5], args)


def test_a_micro_batch_without_labels_trains_on_without_nan():
    """A micro-batch whose images were all unreadable has every label at -100."""
    from transformers import BertConfig, BertForSequenceClassification
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(vocab_size=60, hidden_size=32, num_hidden_layers=1,
                                                     num_attention_heads=2, intermediate_size=64, num_labels=3))
    goat.add_goat(model, goat.GOATConfig(rank=8, experts=4, top_k=2), exclude=("classifier",))
    model.classifier.requires_grad_(True)
    args = flags.parse_args(["--batch_size=4"])
    batch = {"input_ids": torch.randint(0, 60, (4, 6)), "attention_mask": torch.ones(4, 6, dtype=torch.long),
             "labels": torch.full((4,), -100)}
    params = [p for p in model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    loss, _, norm, _, _ = train.train_step(model.train(), model, [batch], torch.optim.SGD(params, lr=0.1), scaler,
                                           params, args, processes.Processes(), train.nullcontext())
    assert float(loss) == 0.0 and math.isfinite(float(norm))
    assert all(torch.isfinite(p).all() for p in params)
    assert any(not torch.equal(p, b) for p, b in zip(params, before))  # the balance loss still trained the routers


# --- precision and memory --------------------------------------------------------------------

def test_grad_checkpointing_gives_the_same_loss_and_gradients(tiny_bert_dir):
    from transformers import AutoModelForSequenceClassification
    results = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir, num_labels=2)
        goat.add_goat(model, goat.GOATConfig(rank=8, experts=4, top_k=2, dropout=0.0))
        model.classifier.requires_grad_(True)
        if checkpointing:
            processes.enable_grad_checkpointing(model)
        model.train()
        ids = torch.randint(5, 30, (4, 9), generator=torch.Generator().manual_seed(1))
        loss = model(input_ids=ids, labels=torch.tensor([0, 1, 1, 0])).loss + 0.1 * goat.balance_loss(model)
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}))
    torch.testing.assert_close(results[1][0], results[0][0])
    assert any("lora_router" in n for n in results[0][1])
    for name, grad in results[0][1].items():
        torch.testing.assert_close(results[1][1][name], grad, msg=name)


def test_grad_checkpointing_flag_trains_the_same(tiny_bert_dir, glue_dir, tmp_path):
    train.main(sst2(tiny_bert_dir, tmp_path / "plain", glue_dir, "--max_steps=5", "--lora_dropout=0"))
    train.main(sst2(tiny_bert_dir, tmp_path / "ckpt", glue_dir, "--max_steps=5", "--lora_dropout=0",
                    "--grad_checkpointing"))
    np.testing.assert_allclose(read_losses(tmp_path / "ckpt"), read_losses(tmp_path / "plain"), rtol=1e-5)


def test_a_bf16_run_on_cpu_and_its_adapter_on_a_float32_base(tiny_bert_dir, glue_dir, tmp_path):
    """The CUDA default (bf16 base under autocast), run on the CPU; its adapter then
    loads onto the float32 base of the same model."""
    train.main(sst2(tiny_bert_dir, tmp_path / "bf16", glue_dir, "--max_steps=8", "--dtype=bfloat16"))
    losses = read_losses(tmp_path / "bf16")
    assert all(np.isfinite(losses))
    metrics = train.main(sst2(tiny_bert_dir, tmp_path / "eval", glue_dir, "--max_steps=0",
                              f"--adapter={tmp_path / 'bf16'}"))
    assert 0.0 <= metrics["dev"]["accuracy"] <= 1.0


def test_zero_epochs_with_steps_trains():
    args = flags.parse_args(["--epochs=0", "--max_steps=5"])
    assert not args.evaluate_only and args.out_dir == "out"
    assert flags.parse_args(["--epochs=0"]).evaluate_only and flags.parse_args(["--max_steps=0"]).evaluate_only


def test_metrics_rows_are_strict_json_however_deep_a_non_finite_value_sits(tmp_path):
    """An expert load of 0/0 (no routed token) inside a row must not stop rank 0 alone."""
    import run_folder
    folder = run_folder.RunFolder(tmp_path, "train")
    row = {"step": 1, "task_loss": 0.5, "balance_loss": None, "lr": 1e-3, "tokens_per_s": 10.0,
           "grad_norm": float("inf"), "expert_load": {"layer": [0.5, float("nan")]}}
    folder.log(row, 2, 0.1)
    written = json.loads((tmp_path / "metrics.jsonl").read_text(), parse_constant=lambda c: pytest.fail(c))
    assert written["grad_norm"] is None and written["expert_load"] == {"layer": [0.5, None]}
