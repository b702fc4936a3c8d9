"""train.py under hostile use and on clusters: every flag checked before anything is
written, output folders never silently reused, resume and --adapter checked against
the flags, non-finite losses stop the run before they are saved, preemption by
signal, no host sync per micro-step, activation checkpointing, one dropout stream
per process, DDP resume, and FSDP2 on CPU processes (gloo) against one process."""
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
import torch.nn as nn

import goat
import train
from conftest import HERE, common, read_losses, read_result, run_script


def sst2(model_dir, out, glue_dir, *extra):
    return common(model_dir, out, "--task=sst2", f"--data_dir={glue_dir}", "--rank=8", "--experts=4",
                  "--batch_size=16", "--lr=5e-3", "--warmup=2", *extra)


# --- flags ---------------------------------------------------------------------------------

@pytest.mark.parametrize("argv,match", [
    (["--eta=0"], "eta=0.0 must be a positive finite number"),
    (["--rho=0"], "rho=0.0 must be a positive finite number"),
    (["--scaling=nan"], "scaling=nan must be a positive finite number"),
    (["--scaling=-1"], "scaling=-1.0 must be a positive finite number"),
    (["--method=pissa", "--alpha=0"], "alpha=0.0 must be a positive finite number"),
    (["--lr=0"], "--lr=0.0 must be a finite number in"),
    (["--lr=10"], "--lr=10.0 must be a finite number in .*AdamW"),
    (["--lr=nan"], "--lr=nan"),
    (["--epochs=-1"], "--epochs=-1.0 must be"),
    (["--max_train_examples=-5"], "--max_train_examples=-5 must be at least 1"),
    (["--max_eval_examples=0"], "--max_eval_examples=0 must be at least 1"),
    (["--targets="], "--targets='' names no module"),
    (["--targets=,"], "names no module"),
    (["--method=full-moe", "--experts=0", "--top_k=0"], "--experts=0 must be at least 1"),
    (["--method=full-moe", "--top_k=9"], "--top_k=9 must be at most --experts=8"),
    (["--lora_dropout=1"], "--lora_dropout=1.0"),
    (["--warmup=-2"], "--warmup=-2.0"),
    (["--resume", "--overwrite"], "pick one"),
])
def test_bad_flags_are_refused_with_the_flag_named(argv, match, capsys):
    with pytest.raises(SystemExit):
        train.parse_args(argv)
    assert __import__("re").search(match, capsys.readouterr().err), match


def test_max_len_beyond_the_models_positions_is_refused(tiny_bert_dir, glue_dir, tmp_path):
    with pytest.raises(SystemExit, match="--max_len=256 exceeds the 128 positions"):
        train.main(sst2(tiny_bert_dir, tmp_path / "run", glue_dir, "--max_len=256", "--max_steps=2"))
    assert not (tmp_path / "run" / "config.json").exists()


def test_cuda_without_a_gpu_is_named(tiny_bert_dir, glue_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # what a CPU-only build or a hidden GPU says
    with pytest.raises(SystemExit, match="--device=cuda, but this torch sees no CUDA GPU.*--device=cpu"):
        train.main(sst2(tiny_bert_dir, tmp_path / "run", glue_dir, "--device=cuda", "--max_steps=2"))
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())


# --- the output folder ---------------------------------------------------------------------

def test_readme_sequence_leaves_every_run_intact(tiny_bert_dir, glue_dir, tmp_path):
    """Train into out/x, then evaluate its adapter with the default --out_dir."""
    run = tmp_path / "goat_eta01"
    trained = train.main(sst2(tiny_bert_dir, run, glue_dir, "--max_steps=20"))
    files = {name: (run / name).read_bytes() for name in ("adapter.safetensors", "metrics.jsonl", "result.json",
                                                          "config.json")}
    argv = [a for a in sst2(tiny_bert_dir, run, glue_dir) if not a.startswith("--out_dir")]
    evaluated = train.main(argv + ["--max_steps=0", f"--adapter={run}"])
    assert evaluated == trained
    assert read_result(run / "eval-sst2")["metrics"] == read_result(run)["metrics"]
    assert {name: (run / name).read_bytes() for name in files} == files
    with pytest.raises(SystemExit, match="would overwrite the adapter it reads"):
        train.main(argv + ["--max_steps=0", f"--adapter={run}", f"--out_dir={run}", "--overwrite"])
    with pytest.raises(SystemExit, match="holds a finished run"):  # the same evaluation again
        train.main(argv + ["--max_steps=0", f"--adapter={run}"])
    assert {name: (run / name).read_bytes() for name in files} == files


def test_a_failed_run_destroys_nothing(tiny_bert_dir, glue_dir, tmp_path):
    run = tmp_path / "run"
    train.main(sst2(tiny_bert_dir, run, glue_dir, "--max_steps=4"))
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    with pytest.raises(SystemExit, match="holds a finished run"):
        train.main(sst2(tiny_bert_dir, run, glue_dir, "--max_steps=4"))
    bad = [a if not a.startswith("--data_dir") else f"--data_dir={tmp_path / 'typo'}" for a in
           sst2(tiny_bert_dir, run, glue_dir, "--max_steps=4", "--overwrite")]
    with pytest.raises(SystemExit, match="no such file"):
        train.main(bad)
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before


def test_two_runs_cannot_share_a_folder(tiny_bert_dir, glue_dir, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (run / "train.lock").write_text(json.dumps({"pid": alive.pid, "host": os.uname().nodename,
                                                    "machine": train.machine_identity()}))
        with pytest.raises(SystemExit, match="in use by another run"):
            train.main(sst2(tiny_bert_dir, run, glue_dir, "--max_steps=2"))
    finally:
        alive.kill()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (run / "train.lock").write_text(json.dumps({"pid": dead.pid, "host": os.uname().nodename,
                                                "machine": train.machine_identity()}))
    train.main(sst2(tiny_bert_dir, run, glue_dir, "--max_steps=2"))  # a dead run's lock is taken over
    assert not (run / "train.lock").exists() and (run / "result.json").exists()


def test_a_lock_of_our_own_pid_is_stale_and_release_spares_another_runs_lock(tmp_path):
    """A requeued container often gets the same pid and hostname as the run that died in it."""
    import socket
    path = tmp_path / "train.lock"
    path.write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "machine": train.machine_identity()}))
    lock = train.Lock(tmp_path)  # taken over, not refused
    assert json.loads(path.read_text())["token"] == lock.me["token"]
    path.write_text(json.dumps({"pid": 1, "host": "node7", "token": "theirs"}))  # another run took it over
    lock.release()
    assert json.loads(path.read_text())["token"] == "theirs"
    path.unlink()
    lock = train.Lock(tmp_path)
    lock.release()
    assert not path.exists()
    # another container with the same host name and, in its own pid namespace, our pid: alive, refused
    path.write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "machine": "other-boot:1"}))
    with pytest.raises(SystemExit, match="in use by another run"):
        train.Lock(tmp_path)


def test_loader_workers_outlive_a_signal_to_the_process_group(tmp_path):
    """torchrun signals the whole process group of each process it stops: the DataLoader's
    workers must not die of it, or the main process raises before it can write its checkpoint."""
    script = tmp_path / "group.py"
    script.write_text(f"""
import os, signal, sys
sys.path.insert(0, {str(HERE)!r})
import train
items = [{{"input_ids": [1, 2, 3], "label": i % 2}} for i in range(64)]
args = train.parse_args(["--batch_size=4"])
env = train.SimpleNamespace(world=1, rank=0, device="cpu", fsdp=False)
batches = train.Batches(items, args, env, train.partial(train.data.collate, pad_id=0))
stop = train.StopSignals()
stream = train.micro_batch_stream(batches, 0, 16, workers=1)
next(stream)
os.killpg(os.getpgid(0), signal.SIGTERM)
for _ in range(10):
    next(stream)
print("received", stop.received)
stream.close()  # as run() does: the workers ignore SIGTERM, so their owner ends them
import multiprocessing
print("workers left", len(multiprocessing.active_children()))
""")
    proc = subprocess.run([sys.executable, str(script)], cwd=HERE, capture_output=True, text=True, timeout=120,
                          start_new_session=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"received {int(signal.SIGTERM)}" in proc.stdout and "workers left 0" in proc.stdout


def test_a_failed_save_leaves_no_temp_file_and_still_prints_the_metric(tiny_bert_dir, glue_dir, tmp_path,
                                                                     monkeypatch, capsys):
    def full_disk(f):
        f.write(b"partial")
        raise OSError(28, "No space left on device")
    real = train.atomic_write
    monkeypatch.setattr(train, "atomic_write", lambda path, write: real(path, full_disk)
                        if str(path).endswith(".safetensors") else real(path, write))
    with pytest.raises(SystemExit, match="could not write the adapter.*No space left"):
        train.main(sst2(tiny_bert_dir, tmp_path / "run", glue_dir, "--max_steps=3"))
    assert "RESULT {" in capsys.readouterr().out
    assert not list((tmp_path / "run").glob("*.tmp"))


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


def test_resume_checks_the_checkpoint_against_the_flags(tiny_bert_dir, glue_dir, tmp_path):
    run = tmp_path / "run"
    killed_after_checkpoint(sst2(tiny_bert_dir, run, glue_dir, "--max_steps=400", "--ckpt_every=2"), run)
    with pytest.raises(SystemExit, match="holds an unfinished run; pass --resume"):
        train.main(sst2(tiny_bert_dir, run, glue_dir, "--max_steps=400"))
    for flag, named in (("--rank=16", "--rank: checkpoint 8, now 16"), ("--method=lora", "--method: checkpoint"),
                        ("--experts=2", "--experts: checkpoint 4, now 2"), ("--task=cola", "--task")):
        argv = [a for a in sst2(tiny_bert_dir, run, glue_dir, "--max_steps=400", "--resume")
                if not a.startswith(flag.split("=")[0] + "=")] + [flag]
        with pytest.raises(SystemExit, match=named):
            train.main(argv)
    with pytest.raises(SystemExit, match="--global_batch: checkpoint 16, now 8.*--allow_resume_changes"):
        train.main(sst2(tiny_bert_dir, run, glue_dir, "--max_steps=400", "--resume", "--batch_size=8"))
    other = tmp_path / "other"  # files with other contents: another run's data
    shutil.copytree(glue_dir, other)
    rows = (other / "SST-2" / "train.tsv").read_text().splitlines()
    (other / "SST-2" / "train.tsv").write_text("\n".join(rows[:-1]) + "\n")  # one training sentence fewer
    with pytest.raises(SystemExit, match="trained on other data .training data: checkpoint [0-9a-f]{12}, now "):
        train.main(sst2(tiny_bert_dir, run, other, "--max_steps=400", "--resume"))
    with (run / "metrics.jsonl").open("a") as f:
        f.write('{"step": 9999, "loss": 0.')  # a torn last line from the crash
    moved = tmp_path / "moved"  # the same training file in another place (a requeued job), another dev set
    shutil.copytree(glue_dir, moved)
    rows = (moved / "SST-2" / "dev.tsv").read_text().splitlines()
    (moved / "SST-2" / "dev.tsv").write_text("\n".join(rows[:-1]) + "\n")
    train.main(sst2(tiny_bert_dir, run, moved, "--max_steps=6", "--resume", "--allow_resume_changes"))
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 6 and read_result(run)["steps"] == 6
    changes = json.loads((run / "config.json").read_text())["resumed_at_step_with_changes"]["changes"]
    assert [c.split(":")[0] for c in changes] == ["--max_steps", "evaluation data"], changes  # the training data is the same


def test_damaged_checkpoint_and_adapter_files_are_named(tiny_bert_dir, glue_dir, tmp_path):
    run = tmp_path / "run"
    train.main(sst2(tiny_bert_dir, run, glue_dir, "--max_steps=2"))
    (run / "result.json").unlink()
    (run / "ckpt.pt").write_bytes((run / "ckpt.pt").read_bytes()[:500])
    with pytest.raises(SystemExit, match="ckpt.pt cannot be read"):
        train.main(sst2(tiny_bert_dir, run, glue_dir, "--max_steps=2", "--resume"))
    for foreign in ({"step": 3}, [1, 2]):  # a readable file, but not a checkpoint of train.py
        torch.save(foreign, run / "ckpt.pt")
        with pytest.raises(SystemExit, match="ckpt.pt is not a train.py checkpoint .no model, optimizer"):
            train.main(sst2(tiny_bert_dir, run, glue_dir, "--max_steps=2", "--resume"))
    (run / "adapter.safetensors").write_bytes((run / "adapter.safetensors").read_bytes()[:300])
    with pytest.raises(SystemExit, match="adapter.safetensors cannot be read"):
        train.main(sst2(tiny_bert_dir, tmp_path / "eval", glue_dir, "--max_steps=0", f"--adapter={run}"))


def test_a_float16_run_resumes_with_its_loss_scale(tiny_bert_dir, glue_dir, tmp_path):
    """GradScaler's scale is part of the checkpoint: a resumed float16 run goes on with
    the scale it had, not a fresh 65536 (whose overflows would skip steps the whole run
    never skipped)."""
    run = tmp_path / "run"
    train.main(sst2(tiny_bert_dir, run, glue_dir, "--max_steps=3", "--ckpt_every=1", "--dtype=float16"))
    ckpt = torch.load(run / "ckpt.pt", weights_only=True)
    assert ckpt["config"]["dtype"] == "float16" and ckpt["scaler"]["scale"] > 0
    ckpt["scaler"]["scale"], ckpt["step"] = 1024.0, 2  # as if it had backed off, and the run stopped at step 2
    torch.save(ckpt, run / "ckpt.pt")
    (run / "result.json").unlink()
    train.main(sst2(tiny_bert_dir, run, glue_dir, "--max_steps=3", "--ckpt_every=1", "--dtype=float16", "--resume"))
    assert torch.load(run / "ckpt.pt", weights_only=True)["scaler"]["scale"] in (1024.0, 512.0)


def test_a_stop_signal_is_checkpointed_before_any_evaluation(tiny_bert_dir, glue_dir, tmp_path, monkeypatch):
    """The grace period after SIGTERM is short: a stop at an --eval_every step writes its
    checkpoint and leaves; the evaluation waits for the resumed run."""
    class SignalAtStep3(train.StopSignals):
        reads = 0

        @property
        def received(self):  # read once per step by the loop: SIGTERM arrives during step 3
            type(self).reads += 1
            return signal.SIGTERM if type(self).reads >= 3 else None

        @received.setter
        def received(self, value):
            pass
    evaluated = []
    real_evaluate = train.evaluate
    monkeypatch.setattr(train, "StopSignals", SignalAtStep3)
    monkeypatch.setattr(train, "evaluate", lambda *a, **k: evaluated.append(1) or real_evaluate(*a, **k))
    run = tmp_path / "run"
    with pytest.raises(SystemExit) as stopped:
        train.main(sst2(tiny_bert_dir, run, glue_dir, "--max_steps=10", "--eval_every=1"))
    assert stopped.value.code == 128 + signal.SIGTERM
    assert torch.load(run / "ckpt.pt", weights_only=True)["step"] == 3 and len(evaluated) == 2  # steps 1 and 2


def test_older_checkpoints_and_default_goat_adapters_keep_their_settings(tiny_bert_dir, glue_dir, tmp_path):
    """A checkpoint that recorded --dtype=auto resumes as the run it was (float32 on a CPU);
    a refused resume names the checkpoint's own flags; continuing from an adapter trained
    with GOAT's default eta keeps GOAT's default learning rate (they are a pair)."""
    run = tmp_path / "run"
    train.main(sst2(tiny_bert_dir, run, glue_dir, "--max_steps=3", "--ckpt_every=1"))
    ckpt = torch.load(run / "ckpt.pt", weights_only=True)
    ckpt["config"]["dtype"], ckpt["step"] = "auto", 2
    torch.save(ckpt, run / "ckpt.pt")
    (run / "result.json").unlink()
    with pytest.raises(SystemExit, match=r"--eta: checkpoint 1.0, now 0.5. Resume with the original flags \(--eta=1.0\)"):
        train.main(sst2(tiny_bert_dir, run, glue_dir, "--max_steps=3", "--resume", "--eta=0.5"))
    train.main(sst2(tiny_bert_dir, run, glue_dir, "--max_steps=3", "--resume"))  # auto on a CPU was float32
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter.json").write_text(json.dumps({"method": "goat", "eta": train.GOAT_DEFAULT["eta"]}))
    assert train.parse_args([f"--adapter={adapter}"]).lr == train.GOAT_DEFAULT["lr"]


def test_adapter_flags_come_from_the_adapter_and_conflicts_are_refused(tiny_bert_dir, glue_dir, tmp_path):
    run = tmp_path / "molora"
    train.main(sst2(tiny_bert_dir, run, glue_dir, "--method=molora", "--max_steps=3"))
    base = [a for a in sst2(tiny_bert_dir, tmp_path / "x", glue_dir) if not a.startswith(("--rank", "--experts"))]
    with pytest.raises(SystemExit):
        train.parse_args(base + [f"--adapter={run}", "--method=lora"])
    train.main([a for a in base if not a.startswith("--out_dir")] + [f"--out_dir={tmp_path / 'more'}",
                                                                      f"--adapter={run}", "--max_steps=2"])
    result, config = read_result(tmp_path / "more"), json.loads((tmp_path / "more" / "config.json").read_text())
    assert result["method"] == config["method"] == "molora" and config["experts"] == 4
    assert result["trainable_params"] == read_result(run)["trainable_params"]


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
    assert not (tmp_path / "run" / "config.json").exists()


@pytest.mark.parametrize("rows,split,match", [
    ([], "test.json", "no examples"),
    ([{"instruction": "x", "input": "", "output": None, "answer": "true"}], "train.json", r"null or empty \['output'\]"),
    ([{"instruction": None, "input": "", "output": "y", "answer": "true"}], "train.json", "instruction"),
])
def test_bad_instruction_files_stop_with_their_name(rows, split, match, tmp_path):
    good = [{"instruction": "x", "input": None, "output": "y", "answer": "true"}]
    (tmp_path / "toy").mkdir()
    for name in ("train.json", "test.json"):
        (tmp_path / "toy" / name).write_text(json.dumps(rows if name == split else good))
    with pytest.raises(ValueError, match=match):
        train.data.load_task("instruct", tmp_path, ["toy"])


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
    args = train.parse_args([])
    health = train.Health("cpu")
    health.check(1, [0.69, 1.0, 0.5, 0.0], args)
    health.check(10, [2.0, 1.0, 0.5, 0.0], args)  # worse, not diverged
    with pytest.raises(SystemExit, match="diverged at step 20: the loss rose from 0.69 to 4916"):
        health.check(20, [4916.0, 1.0, 0.5, 0.0], args)


def test_an_fp16_overflow_step_is_not_a_fault():
    """GradScaler skips a step whose gradients overflow: its gradient norm is inf by design."""
    args = train.parse_args([])
    health = train.Health("cpu")
    health.check(1, [0.69, 1.0, float("inf"), 0.0], args, fp16=True)  # no stop
    with pytest.raises(SystemExit, match="NaN or infinite"):
        health.check(1, [0.69, 1.0, float("inf"), 0.0], args)  # bf16/fp32: a real fault


def test_a_bad_step_on_another_process_stops_this_one_too():
    """Under fp16 each process watches its own loss: the flag, summed with the logged
    values over processes, must stop every process at the same step (none left waiting)."""
    args = train.parse_args([])
    health = train.Health("cpu")
    health.update(3, torch.tensor(0.7), torch.tensor(1.0))  # fine here
    assert float(health.flag()) == 0.0
    with pytest.raises(SystemExit, match="NaN or infinite by step 5 on another process"):
        health.check(5, [0.7, 1.0, 0.5, 0.5], args)  # another process's flag, averaged over 2
    with pytest.raises(SystemExit, match="NaN or infinite by step 5"):
        train.Health("cpu").check(5, [float("nan"), 1.0, 0.5, 0.0], args)
    health.update(4, torch.tensor(float("inf")), torch.tensor(1.0))
    assert float(health.flag()) == 1.0
    with pytest.raises(SystemExit, match="NaN or infinite at step 4"):
        health.check(5, [0.7, 1.0, 0.5, 0.5], args)


def test_sigterm_checkpoints_and_the_resumed_run_ends_like_an_uninterrupted_one(tiny_bert_dir, glue_dir, tmp_path):
    flags = ["--max_steps=40", "--lora_dropout=0.1", "--batch_size=8"]
    whole = run_script([sys.executable, "train.py", *sst2(tiny_bert_dir, tmp_path / "whole", glue_dir, *flags)])
    assert whole.returncode == 0, whole.stderr[-3000:]
    argv = [sys.executable, "train.py", *sst2(tiny_bert_dir, tmp_path / "cut", glue_dir, *flags)]
    proc = subprocess.Popen(argv, cwd=HERE, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log = tmp_path / "cut" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and (not log.exists() or len(log.read_text().splitlines()) < 8):
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert "stopped by SIGTERM" in out and "--resume" in out
    assert (tmp_path / "cut" / "ckpt.pt").exists() and not (tmp_path / "cut" / "result.json").exists()
    stopped_at = torch.load(tmp_path / "cut" / "ckpt.pt", weights_only=True)["step"]
    assert 8 <= stopped_at < 40
    resumed = run_script(argv + ["--resume"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    torch.testing.assert_close(torch.tensor(read_losses(tmp_path / "cut")), torch.tensor(read_losses(tmp_path / "whole")))
    from safetensors.torch import load_file
    a, b = load_file(tmp_path / "cut" / "adapter.safetensors"), load_file(tmp_path / "whole" / "adapter.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert read_result(tmp_path / "cut")["metrics"] == read_result(tmp_path / "whole")["metrics"]


# --- the step ----------------------------------------------------------------------------------

class HostSyncs(torch.overrides.TorchFunctionMode):
    """Counts the calls that make the host wait for a value on the device. The test runs
    the step on the meta device, which stands in for a GPU here: host tensors (the
    batch as collated, the data order, the optimizer's step counts) stay on the CPU."""
    SYNCS = {"item", "tolist", "__bool__", "__int__", "__float__", "__index__", "numpy", "cpu", "nonzero"}

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in self.SYNCS and args and isinstance(args[0], torch.Tensor) and args[0].device.type != "cpu":
            self.calls.append(name)
        if name == "to" and args and isinstance(args[0], torch.Tensor) and args[0].device.type != "cpu" and \
                "cpu" in [str(a) for a in args[1:]] + [str(v) for v in (kwargs or {}).values()]:
            self.calls.append("to(cpu)")
        return func(*args, **(kwargs or {}))


class TinyLM(nn.Module):
    """A pure-PyTorch model with a .loss output: whatever syncs happen are GOAT's or train.py's."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(50, 32)
        self.body = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32))
        self.head = nn.Linear(32, 50)

    def forward(self, input_ids, attention_mask, labels):
        logits = self.head(self.body(self.embed(input_ids)))
        return type("Out", (), {"loss": nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten())})()


def test_a_training_step_has_no_host_sync():
    torch.manual_seed(0)
    model = TinyLM()
    goat.add_goat(model, goat.GOATConfig(rank=8, experts=4, top_k=2, dropout=0.1), exclude=("head",))
    model.to("meta").train()
    items = [{"input_ids": list(range(i, i + 6)), "labels": list(range(i + 1, i + 7))} for i in range(32)]
    args = train.parse_args(["--batch_size=4", "--grad_accum=3"])
    env = train.SimpleNamespace(world=1, rank=0, device="meta", fsdp=False)
    batches = train.Batches(items, args, env, train.partial(train.data.collate, pad_id=0))
    stream = train.micro_batch_stream(batches, 0, 2, workers=0)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    health = train.Health("meta")
    with HostSyncs() as syncs:
        for step in range(2):
            micro_batches = [next(stream) for _ in range(args.grad_accum)]
            loss, balance, norm, _, _ = train.train_step(model, model, micro_batches, optimizer, scaler, params, args,
                                                         env, train.nullcontext(), True)
            health.update(step + 1, loss, norm)
    assert syncs.calls == [], syncs.calls
    assert loss.device.type == "meta" and all(p.grad is None for p in params)  # the step ran to the end
    with HostSyncs() as syncs, pytest.raises(Exception):  # the counter does see a sync
        loss.item()
    assert syncs.calls == ["item"]


def test_a_micro_batch_without_labels_trains_on_without_nan():
    """A micro-batch whose images were all unreadable has every label at -100."""
    from transformers import BertConfig, BertForSequenceClassification
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(vocab_size=60, hidden_size=32, num_hidden_layers=1,
                                                     num_attention_heads=2, intermediate_size=64, num_labels=3))
    goat.add_goat(model, goat.GOATConfig(rank=8, experts=4, top_k=2), exclude=("classifier",))
    model.classifier.requires_grad_(True)
    args = train.parse_args(["--batch_size=4"])
    env = train.SimpleNamespace(world=1, rank=0, device="cpu", fsdp=False)
    batch = {"input_ids": torch.randint(0, 60, (4, 6)), "attention_mask": torch.ones(4, 6, dtype=torch.long),
             "labels": torch.full((4,), -100)}
    params = [p for p in model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    loss, _, norm, _, _ = train.train_step(model.train(), model, [batch], torch.optim.SGD(params, lr=0.1), scaler,
                                           params, args, env, train.nullcontext(), True)
    assert float(loss) == 0.0 and math.isfinite(float(norm))
    assert all(torch.isfinite(p).all() for p in params)
    assert any(not torch.equal(p, b) for p, b in zip(params, before))  # the balance loss still trained the routers


def test_grad_checkpointing_gives_the_same_loss_and_gradients(tiny_bert_dir):
    from transformers import AutoModelForSequenceClassification
    results = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir, num_labels=2)
        goat.add_goat(model, goat.GOATConfig(rank=8, experts=4, top_k=2, dropout=0.0))
        model.classifier.requires_grad_(True)
        if checkpointing:
            train.enable_grad_checkpointing(model)
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


# --- several processes (gloo on the CPU) -----------------------------------------------------

def torchrun(argv, nproc=2):
    return run_script([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                       "train.py", *argv])


def _loader_worker_view(queue):
    train.leave_process_group(0)
    queue.put((os.getpgid(0) == os.getpid(), [signal.getsignal(s) == signal.SIG_IGN for s in train.STOP_SIGNALS]))


def test_loader_workers_are_out_of_reach_of_the_stop_signals():
    """SLURM signals every process of the step and torchrun the whole process group: a
    loader worker killed by that SIGTERM would crash the step before its checkpoint."""
    import multiprocessing
    ctx = multiprocessing.get_context("fork")  # as the DataLoader starts its workers on Linux
    queue = ctx.Queue()
    worker = ctx.Process(target=_loader_worker_view, args=(queue,))
    worker.start()
    own_group, ignored = queue.get(timeout=60)
    worker.join(timeout=60)
    assert own_group and all(ignored), (own_group, ignored)


def test_torchrun_processes_exit_with_the_status_python_would_give(capsys):
    """Under torchrun train.py leaves by os._exit (no interpreter shutdown for gloo's threads
    to abort): the status and message must be the ones Python itself would give."""
    assert train.exit_status(SystemExit(None)) == 0 and train.exit_status(SystemExit(0)) == 0
    assert train.exit_status(SystemExit(143)) == 143  # a preempted run: 128 + SIGTERM
    assert train.exit_status(SystemExit("--world_size: checkpoint 2, now 1")) == 1
    assert "--world_size: checkpoint 2, now 1" in capsys.readouterr().err
    try:
        raise ValueError("a bug")
    except ValueError as e:
        assert train.exit_status(e) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "ValueError: a bug" in err
    assert train.exit_status(KeyboardInterrupt()) == 130  # Ctrl-C in a terminal: 128 + SIGINT, as Python's own exit


def test_ddp_dropout_streams_differ_per_process_and_a_preempted_run_resumes(tiny_bert_dir, glue_dir, tmp_path):
    """Two processes with dropout: each draws its own masks (their random states differ),
    a SIGTERM to the launcher stops both after the same step with one checkpoint, and
    the resumed run ends where an uninterrupted one does."""
    flags = ["--max_steps=40", "--lora_dropout=0.1", "--batch_size=4", "--ckpt_every=1000"]
    whole = torchrun(sst2(tiny_bert_dir, tmp_path / "whole", glue_dir, *flags))
    assert whole.returncode == 0, whole.stderr[-3000:]
    rngs = torch.load(tmp_path / "whole" / "ckpt.pt", weights_only=True)["rng"]
    assert len(rngs) == 2 and not torch.equal(rngs[0]["cpu"], rngs[1]["cpu"])
    cut = tmp_path / "cut"
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             "train.py", *sst2(tiny_bert_dir, cut, glue_dir, *flags)], cwd=HERE,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log = cut / "metrics.jsonl"
    deadline = time.time() + 180
    while time.time() < deadline and proc.poll() is None and (not log.exists() or len(log.read_text().splitlines()) < 5):
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)  # the scheduler's preemption notice, to the launcher
    out = proc.communicate(timeout=180)[0]
    assert "stopped by SIGTERM" in out, out[-3000:]
    stopped_at = torch.load(cut / "ckpt.pt", weights_only=True)["step"]
    assert 5 <= stopped_at < 40 and not (cut / "result.json").exists()
    resumed = torchrun(sst2(tiny_bert_dir, cut, glue_dir, *flags, "--resume"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {cut / 'ckpt.pt'} at step {stopped_at}" in resumed.stdout
    np.testing.assert_allclose(read_losses(cut), read_losses(tmp_path / "whole"), rtol=1e-5)
    assert read_result(cut)["metrics"] == read_result(tmp_path / "whole")["metrics"]
    (cut / "result.json").unlink()
    with pytest.raises(SystemExit, match="--world_size: checkpoint 2, now 1"):  # one process: refused
        train.main(sst2(tiny_bert_dir, cut, glue_dir, *flags, "--resume", "--batch_size=8"))


def test_resume_runs_no_svd(tiny_bert_dir, glue_dir, tmp_path, monkeypatch):
    """The checkpoint holds the initial factors: resuming rebuilds W_res from them."""
    run = tmp_path / "run"
    killed_after_checkpoint(sst2(tiny_bert_dir, run, glue_dir, "--max_steps=400", "--ckpt_every=2"), run)

    def no_svd(*a, **k):
        raise AssertionError("an SVD ran on resume")
    monkeypatch.setattr(goat, "init_factors", no_svd)
    train.main(sst2(tiny_bert_dir, run, glue_dir, "--max_steps=6", "--resume", "--allow_resume_changes"))
    assert read_result(run)["steps"] == 6


def test_fsdp_two_processes_match_one_process(tiny_bert_dir, glue_dir, tmp_path):
    """Same global batch, same result. The balance loss is off: it is computed on each
    process's micro-batch (a product of two means, not linear in the batch), so with it
    the runs differ by design, as DDP runs of the reference code do."""
    flags = ["--lora_dropout=0", "--max_steps=6", "--grad_accum=2", "--balance_coef=0"]
    single = run_script([sys.executable, "train.py", *sst2(tiny_bert_dir, tmp_path / "one", glue_dir, *flags,
                                                           "--batch_size=8")])
    assert single.returncode == 0, single.stderr[-3000:]
    sharded = torchrun(sst2(tiny_bert_dir, tmp_path / "fsdp", glue_dir, *flags, "--batch_size=4", "--fsdp"))
    assert sharded.returncode == 0, sharded.stderr[-3000:]
    np.testing.assert_allclose(read_losses(tmp_path / "fsdp"), read_losses(tmp_path / "one"), rtol=1e-4, atol=1e-5)
    assert read_result(tmp_path / "fsdp")["metrics"] == read_result(tmp_path / "one")["metrics"]
    from safetensors.torch import load_file
    a, b = load_file(tmp_path / "fsdp" / "adapter.safetensors"), load_file(tmp_path / "one" / "adapter.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=2e-5, msg=key)
    ckpt = torch.load(tmp_path / "fsdp" / "ckpt.pt", weights_only=True)  # a whole, unsharded checkpoint
    assert ckpt["step"] == 6 and ckpt["optimizer"]["state"]
    metrics = train.main(sst2(tiny_bert_dir, tmp_path / "eval", glue_dir, "--max_steps=0",
                              f"--adapter={tmp_path / 'fsdp'}"))  # its adapter, in one process
    assert metrics["dev"] == read_result(tmp_path / "fsdp")["metrics"]["dev"]


def test_folders_train_py_did_not_write_are_refused(tiny_bert_dir, glue_dir, tmp_path):
    for flag in ((), ("--resume",), ("--overwrite",)):
        with pytest.raises(SystemExit, match="the model's own folder"):
            train.main(sst2(tiny_bert_dir, tiny_bert_dir, glue_dir, "--max_steps=2", *flag))
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "config.json").write_text("{}")  # e.g. a model someone saved there
    for flag in ((), ("--resume",), ("--overwrite",)):
        with pytest.raises(SystemExit, match="holds files that train.py did not write"):
            train.main(sst2(tiny_bert_dir, foreign, glue_dir, "--max_steps=2", *flag))
    assert (foreign / "config.json").read_text() == "{}"
    assert (tiny_bert_dir / "model.safetensors").exists() and (tiny_bert_dir / "config.json").exists()


def test_zero_epochs_with_steps_trains():
    args = train.parse_args(["--epochs=0", "--max_steps=5"])
    assert not args.evaluate_only and args.out_dir == "out"
    assert train.parse_args(["--epochs=0"]).evaluate_only and train.parse_args(["--max_steps=0"]).evaluate_only


def _two_processes(rank, world, port, results):
    import torch.distributed as dist
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    env = train.SimpleNamespace(rank=rank, world=world, distributed=True, control=dist.group.WORLD, master=rank == 0)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 2))
    model[0].requires_grad_(False)
    outcome = {}
    try:
        train.check_identical(model, env)
        outcome["same"] = "ok"
    except SystemExit as e:
        outcome["same"] = str(e)
    if rank == 1:
        with torch.no_grad():
            model[0].weight[0, 0] += 1.0  # another model file on this node
    try:
        train.check_identical(model, env)
        outcome["frozen"] = "ok"
    except SystemExit as e:
        outcome["frozen"] = str(e)
    args = train.parse_args(["--rank=8"] if rank == 0 else ["--rank=16"])
    try:
        train.check_same_flags(args, env)
        outcome["flags"] = "ok"
    except SystemExit as e:
        outcome["flags"] = str(e)

    def fails_on_1():  # e.g. a data file missing on one node
        if rank == 1:
            raise SystemExit("data: missing on this node")
        return "loaded"
    try:
        outcome["together"] = train.together(env, fails_on_1)
    except SystemExit as e:
        outcome["together"] = str(e)
    # the SVD of layer "1" (too small for the rank) runs on its owner, process 1, alone
    small = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 4))
    env.device = "cpu"
    try:
        train.shared_factors(small, goat.GOATConfig(rank=8, experts=4, top_k=2), "all-linear", (), env)
        outcome["svd"] = "ok"
    except (SystemExit, ValueError) as e:
        outcome["svd"] = f"{type(e).__name__}: {e}"

    def write_fails():  # rank 0's checkpoint write on a full disk
        raise SystemExit("could not write the checkpoint")
    try:
        train.from_rank0(env, write_fails)
        outcome["write"] = "ok"
    except SystemExit as e:
        outcome["write"] = str(e)
    import data
    task = data.Task("t", "classification", [], {"dev": [{"text": "x", "label": 0}]}, "accuracy", ["a", "b"])
    same = [{"input_ids": [1, 2], "label": 0}] * 3
    train.check_same_data(env, task, same, train.data_fingerprint(task, same))  # the same: passes
    items = [{"input_ids": [1, 2], "label": 0}] * (3 if rank == 0 else 4)  # node 1 holds another copy
    try:
        train.check_same_data(env, task, items, train.data_fingerprint(task, items))
        outcome["data"] = "ok"
    except SystemExit as e:
        outcome["data"] = str(e)
    results[rank] = outcome
    dist.destroy_process_group()


def test_processes_must_hold_the_same_weights_and_flags():
    import socket
    import torch.multiprocessing as mp
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    results = mp.Manager().dict()
    mp.spawn(_two_processes, args=(2, port, results), nprocs=2)
    for rank in (0, 1):
        assert results[rank]["same"] == "ok"
        assert "different weights (1 tensors, e.g. 0.weight)" in results[rank]["frozen"]
        assert "different flags (--alpha: 16.0 vs 32.0; --rank: 8 vs 16)" in results[rank]["flags"]
        assert results[rank]["write"] == "could not write the checkpoint"  # both stop, none waits
        assert "the processes read different data (process 0: 3 training examples" in results[rank]["data"]
        assert "process 1: 4 training examples" in results[rank]["data"]
    assert results[1]["together"] == "data: missing on this node"
    assert results[0]["together"] == "process 0 stops: another process failed (see its message)"
    assert results[1]["svd"].startswith("ValueError: 1: SVD segment length")
    assert results[0]["svd"] == "SystemExit: process 0 stops: another process failed (see its message)"


def test_fsdp_with_a_bf16_base_under_autocast(tiny_bert_dir, glue_dir, tmp_path):
    """The CUDA default (bf16 frozen base, float32 adapters, bf16 autocast) sharded over two
    CPU processes: one FSDP group holds both dtypes, and the memory-saving autocast path
    runs inside it."""
    sharded = torchrun(sst2(tiny_bert_dir, tmp_path / "fsdp", glue_dir, "--max_steps=6", "--batch_size=4",
                            "--fsdp", "--dtype=bfloat16"))
    assert sharded.returncode == 0, sharded.stderr[-3000:]
    assert all(np.isfinite(read_losses(tmp_path / "fsdp")))
    from safetensors.torch import load_file
    saved = load_file(tmp_path / "fsdp" / "adapter.safetensors")
    assert all(v.dtype == torch.float32 for k, v in saved.items() if ".lora_" in k)
