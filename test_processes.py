"""train.py on clusters, checked on CPU processes (gloo) and with CUDA faked where a CPU
build of torch allows: device set-up, DDP and FSDP2 against one process, one dropout
stream per process, preemption and Ctrl-C, resume without a checkpoint copy on every
process, loader workers that survive the stop signals and can be spawned, exits under
torchrun, no host sync per micro-step."""
import json
import os
import pickle
import signal
import socket
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

import data
import flags
import goat
import processes
import run_folder
import train
from conftest import HERE, SCRIPT_ENV, read_losses, read_result, run_script, run_scripts
from test_robust import sst2


def torchrun_command(argv, nproc=2):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "train.py", *argv]


def torchrun(argv, nproc=2):
    return run_script(torchrun_command(argv, nproc))


# --- CUDA, faked as far as a CPU build allows ------------------------------------------------

def fake_cuda(monkeypatch, count=2, capability=(9, 0)):
    """torch.cuda as a machine with `count` GPUs of a compute capability shows it, up to the
    first real CUDA call: set_device keeps its own argument check (the check that refused
    "cuda" without an index); bf16 is emulated below 8.0, as torch reports it."""
    chosen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported",
                        lambda including_emulation=True: capability[0] >= 8 or including_emulation)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: chosen.append(torch.cuda._get_device_index(d)))
    return chosen


class DictStore(dict):
    """The rendezvous store's set and get, in memory (bytes out, as a TCPStore gives)."""
    def set(self, key, value):
        self[key] = value.encode()

    def get(self, key):
        return self[key]


@pytest.mark.parametrize("device,local_rank,expected", [("auto", None, "cuda:0"), ("cuda", None, "cuda:0"),
                                                        ("cuda:1", None, "cuda:1"), ("auto", "3", "cuda:3")])
def test_processes_start_on_a_gpu_with_an_indexed_device(device, local_rank, expected, monkeypatch):
    """The crash of every GPU run without torchrun (set_device("cuda")) fails here; under
    torchrun process 3 of a node showing it 4 GPUs takes GPU 3 with NCCL, and its
    control messages go through gloo."""
    chosen, groups = fake_cuda(monkeypatch, count=4), []
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    if local_rank is not None:
        monkeypatch.setenv("RANK", local_rank)
        monkeypatch.setenv("WORLD_SIZE", "4")
        monkeypatch.setenv("LOCAL_RANK", local_rank)
        store = DictStore({f"device kind {rank}": b"cuda" for rank in range(4)})  # the others' GPUs
        monkeypatch.setattr(processes.dist, "rendezvous", lambda *a: iter([(store, 3, 4)]))
        monkeypatch.setattr(processes.dist, "PrefixStore", lambda prefix, store: store)
        monkeypatch.setattr(processes.dist, "init_process_group", lambda backend, **kw: groups.append(backend))
        monkeypatch.setattr(processes.dist, "new_group", lambda backend: groups.append(backend) or "control")
        monkeypatch.setattr(processes, "same_everywhere", lambda *a, **k: None)  # no group to compare flags over
    env = processes.start(flags.parse_args([f"--device={device}"]))
    assert env.device == expected and chosen == [int(expected[-1])] and env.device_type == "cuda"
    assert groups == ([] if local_rank is None else ["nccl", "gloo"])
    with pytest.raises(ValueError, match="specified index"):  # the harness keeps set_device's own check
        torch.cuda.set_device("cuda")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    with pytest.raises(SystemExit, match="every process of this node on GPU 1.*--device=cuda"):
        processes.start(flags.parse_args(["--device=cuda:1"]))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")  # more processes than GPUs: refused before NCCL's late error
    with pytest.raises(SystemExit, match=r"8 processes on this node but 4 GPU\(s\) visible.*--nproc_per_node=4"):
        processes.start(flags.parse_args(["--device=cuda"]))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)  # torchrun shows every process that one GPU
    with pytest.raises(SystemExit, match="8 processes on this node but 1 GPU"):
        processes.start(flags.parse_args(["--device=cuda"]))
    monkeypatch.delenv("LOCAL_WORLD_SIZE")  # a scheduler showing each process only its own GPU
    assert processes.start(flags.parse_args(["--device=cuda"])).device == "cuda:0"


@pytest.mark.parametrize("version,kind,argv,match", [
    ("2.6.0", "cpu", [], "train.py needs torch >= 2.7"),
    ("2.7.1", "cuda", ["--fsdp"], "--fsdp with a bf16 base needs torch >= 2.8"),
    ("2.7.1", "cpu", ["--fsdp", "--dtype=bfloat16"], "--fsdp with a bf16 base needs torch >= 2.8"),
    ("2.7.1", "cpu", ["--fsdp"], None), ("2.13.0", "cuda", ["--fsdp"], None)])
def test_a_torch_too_old_stops_every_process_at_set_up(version, kind, argv, match, monkeypatch):
    """On torch 2.6 DDP fails at the wrap (no init_sync) and FSDP2 on CPUs at the first
    forward; every process (same flags, same torch: checked first) stops at set-up."""
    if kind == "cuda":
        fake_cuda(monkeypatch)
    monkeypatch.setattr(processes.torch, "__version__", version)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    store = DictStore({f"device kind {rank}": kind.encode() for rank in range(2)})
    monkeypatch.setattr(processes.dist, "rendezvous", lambda *a: iter([(store, 0, 2)]))
    monkeypatch.setattr(processes.dist, "PrefixStore", lambda prefix, store: store)
    monkeypatch.setattr(processes.dist, "init_process_group", lambda backend, **kw: None)
    monkeypatch.setattr(processes.dist, "new_group", lambda backend: "control")
    monkeypatch.setattr(processes, "same_everywhere", lambda *a, **k: None)
    args = flags.parse_args([f"--device={kind}", *argv])
    if match:
        with pytest.raises(SystemExit, match=match):
            processes.start(args)
    else:
        assert processes.start(args).fsdp == bool(argv)


@pytest.mark.parametrize("capability,argv,torchrun,expected", [
    ((8, 0), [], False, "bfloat16"), ((7, 5), [], False, "float16"), ((7, 0), ["--fsdp"], True, "float32"),
    ((7, 5), ["--fsdp"], False, "float16"),  # no torchrun: trains unsharded, so float16 is allowed
    ((6, 1), [], False, "float32"), ((7, 5), ["--dtype=bfloat16"], False, "bfloat16")])
def test_auto_dtype_takes_float16_on_gpus_without_bf16_tensor_cores(capability, argv, torchrun, expected,
                                                                    monkeypatch, capsys):
    """A T4 or V100 runs bf16 emulated (torch's own is_bf16_supported says yes there unless
    asked for the hardware): auto takes float16; float32 under FSDP (whose float16 is refused)
    and before Volta (no tensor cores); a --dtype given is kept."""
    fake_cuda(monkeypatch, count=1, capability=capability)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)
    if torchrun:  # a torchrun of one process, so --fsdp stays on
        monkeypatch.setenv("RANK", "0")
        monkeypatch.setenv("WORLD_SIZE", "1")
        store = DictStore({"device kind 0": b"cuda"})
        monkeypatch.setattr(processes.dist, "rendezvous", lambda *a: iter([(store, 0, 1)]))
        monkeypatch.setattr(processes.dist, "PrefixStore", lambda prefix, store: store)
        monkeypatch.setattr(processes.dist, "init_process_group", lambda backend, **kw: None)
        monkeypatch.setattr(processes.dist, "new_group", lambda backend: "control")
        monkeypatch.setattr(processes, "gather", lambda env, value: [value])
    args = flags.parse_args(["--device=cuda", *argv])
    processes.start(args)
    assert args.dtype == expected
    assert ("--dtype=auto: " in capsys.readouterr().out) == (expected != "bfloat16")


def test_processes_that_resolve_auto_dtype_differently_all_stop(monkeypatch):
    """A node of A100s and a node of V100s: bf16 on one, float16 on the other would train
    with different precisions (and FSDP with different shard dtypes)."""
    fake_cuda(monkeypatch, count=1, capability=(7, 0))
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setattr(processes, "gather", lambda env, value: [value, "bfloat16" if value == "float16" else value])
    with pytest.raises(SystemExit, match=r"resolve --dtype=auto differently.*process 1: bfloat16.*same --dtype"):
        processes.start(flags.parse_args(["--device=cuda"]))


def test_fsdp_without_torchrun_trains_unsharded_before_any_fsdp_check(monkeypatch, capsys):
    """One process on a GPU with torch 2.7: --fsdp falls back to plain training, so the
    bf16-with-FSDP check (torch 2.8) has nothing to refuse."""
    fake_cuda(monkeypatch)
    monkeypatch.setattr(processes.torch, "__version__", "2.7.1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    env = processes.start(flags.parse_args(["--device=cuda", "--fsdp"]))
    assert not env.fsdp and "training unsharded" in capsys.readouterr().out


def test_fsdp_shards_the_outermost_of_nested_blocks_once(monkeypatch):
    """transformers lists block classes that nest (Musicgen: its decoder layer and the
    attention inside it) and, before version 5, on the inner model only: each outermost
    block is sharded once, then the root, never a module inside a sharded one."""
    import torch.distributed.fsdp as fsdp

    class Inner(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(4, 4)

    class Outer(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn, self.mlp = Inner(), nn.Linear(4, 4)

    class InnerModel(nn.Module):
        _no_split_modules = ["Outer", "Inner"]

        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList([Outer(), Outer()])

    class TaskModel(nn.Module):
        _no_split_modules = None  # as transformers 4's task models have it

        def __init__(self):
            super().__init__()
            self.inner, self.head = InnerModel(), nn.Linear(4, 2)

    model, calls = TaskModel(), []
    names = {module: name for name, module in model.named_modules()}
    monkeypatch.setattr(fsdp, "fully_shard", lambda module, **kw: calls.append(names[module]))
    processes.shard(model)
    assert calls == ["inner.layers.0", "inner.layers.1", ""]


def test_bad_devices_are_named(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # what a CPU-only build or a hidden GPU says
    for device, match in (("xyz", "--device=xyz is not a device"), ("meta", "runs on cpu or cuda"),
                          ("cuda", "--device=cuda, but this torch sees no CUDA GPU.*--device=cpu")):
        with pytest.raises(SystemExit, match=match):
            processes.start(flags.parse_args([f"--device={device}"]))


# --- several processes (gloo on the CPU) -----------------------------------------------------

def start_torchrun(argv, output):
    """torchrun with two train.py processes, its output (the launcher's log too) into a file."""
    with output.open("w") as file:  # the launcher holds its own copy
        return subprocess.Popen(torchrun_command(argv), cwd=HERE, env=SCRIPT_ENV, stdout=file,
                                stderr=subprocess.STDOUT)


def torchrun_workers(launcher):
    """{local rank: pid} of the launcher's train.py processes, read from Linux's /proc."""
    workers = {}
    for pid in (Path("/proc") / str(launcher.pid) / "task" / str(launcher.pid) / "children").read_text().split():
        try:
            environ = (Path("/proc") / pid / "environ").read_bytes().split(b"\0")
        except FileNotFoundError:  # a short-lived child, gone
            continue
        workers.update({int(e.split(b"=")[1]): int(pid) for e in environ if e.startswith(b"LOCAL_RANK=")})
    assert sorted(workers) == [0, 1], f"torchrun's workers: {workers}"
    return workers


def signal_through_launcher(launcher, workers, sig, output):
    """sig to torchrun, which passes it on to its workers. They are paused (SIGSTOP) until it
    has, so the signal lands at the step it was sent at rather than steps later on a busy
    machine (a run that reached its last step first would end without the stop this test is
    about). Passed on: the launcher has logged sending it, and it is pending or a second has
    gone by (a thread that was not stopped yet may have taken it already)."""
    paused = []
    try:
        for pid in workers:
            os.kill(pid, signal.SIGSTOP)
            paused.append(pid)
        launcher.send_signal(sig)
        sent_at, deadline = {}, time.time() + 10  # well inside torchrun's own 30 s wait for its workers
        while True:
            log = output.read_text()
            for pid in workers:
                if f"Sending process {pid} closing signal {sig.name}" in log:
                    sent_at.setdefault(pid, time.time())
            if len(sent_at) == len(workers) and all(signal_pending(pid, sig) or time.time() > sent_at[pid] + 1
                                                    for pid in workers):
                break
            assert launcher.poll() is None and time.time() < deadline, \
                f"torchrun did not pass {sig.name} on within 10 s:\n{first_traceback_and_tail(log)}"
            time.sleep(0.01)
    finally:
        for pid in paused:
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass


def signal_pending(pid, sig):
    """Whether sig waits to be delivered to the (paused) process: the kernel's pending sets."""
    status = (Path("/proc") / str(pid) / "status").read_text()
    masks = [int(line.split()[1], 16) for line in status.splitlines() if line.startswith(("SigPnd:", "ShdPnd:"))]
    return any(mask >> (sig - 1) & 1 for mask in masks)


def first_traceback_and_tail(out, chars=3000):
    """A failed torchrun's output: the first process's traceback is the cause, and the end says how it ended."""
    start = max(out.find("Traceback"), 0)
    return out[start:start + chars] + "\n[...]\n" + out[-chars:]


needs_proc = pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="finds torchrun's workers in /proc (Linux)")


def preempted_and_resumed(argv, tmp_path, steps_before=5, one_process=False):
    """(the uninterrupted run's folder, the preempted-then-resumed run's folder): a SIGTERM once
    `steps_before` steps are logged, to the launcher (as a scheduler sends it) or, with
    one_process, to local rank 1 alone (every process must still stop after the same step),
    then the same command with --resume. The uninterrupted run goes beside the cut one: each
    run's processes spend part of a step waiting in gloo, which leaves the cores room."""
    whole = start_torchrun([a.replace("@", "whole") for a in argv], tmp_path / "whole.out")
    cut, output = [a.replace("@", "cut") for a in argv], tmp_path / "cut.out"
    cut_run = start_torchrun(cut, output)
    try:
        log = tmp_path / "cut" / "metrics.jsonl"
        deadline = time.time() + 240
        while time.time() < deadline and cut_run.poll() is None and (
                not log.exists() or len(log.read_text().split("\n")) <= steps_before):
            time.sleep(0.02)
        assert cut_run.poll() is None, f"the run ended before step {steps_before}:\n" + \
            first_traceback_and_tail(output.read_text())
        workers = torchrun_workers(cut_run)
        if one_process:
            os.kill(workers[1], signal.SIGTERM)
            said = "stopped by a signal on another process"  # rank 0, which reports, was not signalled
        else:
            signal_through_launcher(cut_run, list(workers.values()), signal.SIGTERM, output)
            said = "stopped by SIGTERM"
        cut_run.wait(timeout=240)
        assert said in output.read_text(), first_traceback_and_tail(output.read_text())
        stopped_at = torch.load(tmp_path / "cut" / "ckpt.pt", weights_only=True)["step"]
        assert steps_before <= stopped_at, f"stopped at step {stopped_at}: no {steps_before} steps logged in 240 s"
        assert not (tmp_path / "cut" / "result.json").exists()
        resumed = torchrun(cut + ["--resume"])
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        assert f"resumed from {tmp_path / 'cut' / 'ckpt.pt'} at step {stopped_at}" in resumed.stdout
        assert whole.wait(timeout=240) == 0, first_traceback_and_tail((tmp_path / "whole.out").read_text())
    finally:  # a failed check leaves no run loading the cores under later tests
        for run in (whole, cut_run):
            if run.poll() is None:
                run.terminate()  # torchrun ends its own workers
                try:
                    run.wait(timeout=40)
                except subprocess.TimeoutExpired:
                    run.kill()
    return tmp_path / "whole", tmp_path / "cut"


@needs_proc
def test_ddp_dropout_streams_differ_per_process_and_a_preempted_run_resumes(tiny_bert_dir, glue_dir, tmp_path):
    """Two processes with dropout: each draws its own masks (their random states differ),
    a SIGTERM to one process alone stops both after the same step with one checkpoint, and
    the resumed run (rank 0 sends the checkpoint's parts tensor by tensor) ends where an
    uninterrupted one does."""
    flags_ = ["--max_steps=40", "--lora_dropout=0.1", "--batch_size=4", "--ckpt_every=1000"]
    whole, cut = preempted_and_resumed(sst2(tiny_bert_dir, tmp_path / "@", glue_dir, *flags_), tmp_path,
                                       one_process=True)
    rngs = torch.load(whole / "ckpt.pt", weights_only=True)["rng"]
    assert len(rngs) == 2 and not torch.equal(rngs[0]["cpu"], rngs[1]["cpu"])
    np.testing.assert_allclose(read_losses(cut), read_losses(whole), rtol=1e-5)
    assert read_result(cut)["metrics"] == read_result(whole)["metrics"]
    manifest = run_folder.read_manifest(cut)  # as if it had stopped after its last checkpoint
    run_folder.atomic_write(cut / run_folder.MANIFEST, lambda f: f.write(run_folder.json_text(
        dict(manifest, state="running")).encode()))
    with pytest.raises(SystemExit, match="--world_size: 2 vs 1"):  # one process: refused
        train.main(sst2(tiny_bert_dir, cut, glue_dir, *flags_, "--resume", "--batch_size=8"))


def test_fsdp_two_processes_match_one_process(tiny_bert_dir, glue_dir, tmp_path):
    """Same global batch, same result. The balance loss is off: it is computed on each
    process's micro-batch (a product of two means, not linear in the batch), so with it
    the runs differ by design, as DDP runs of the reference code do."""
    flags_ = ["--lora_dropout=0", "--max_steps=6", "--grad_accum=2", "--balance_coef=0"]
    varied = tmp_path / "glue"
    (varied / "SST-2").mkdir(parents=True)
    for name in ("train.tsv", "dev.tsv"):  # 5 to 9 words: each process's micro-batches hold their own token counts
        header, *rows = (glue_dir / "SST-2" / name).read_text().splitlines()
        (varied / "SST-2" / name).write_text("\n".join([header] + ["the " * (i % 5) + row for i, row in enumerate(rows)]))
    single, sharded = run_scripts(
        [sys.executable, "train.py", *sst2(tiny_bert_dir, tmp_path / "one", varied, *flags_, "--batch_size=8")],
        torchrun_command(sst2(tiny_bert_dir, tmp_path / "fsdp", varied, *flags_, "--batch_size=4", "--fsdp")))
    assert single.returncode == 0, single.stderr[-3000:]
    assert sharded.returncode == 0, sharded.stderr[-3000:]
    np.testing.assert_allclose(read_losses(tmp_path / "fsdp"), read_losses(tmp_path / "one"), rtol=1e-4, atol=1e-5)
    tokens = lambda run: [row["tokens"] for row in map(json.loads, (tmp_path / run / "metrics.jsonl").open())
                          if "tokens" in row]  # the whole job's, not rank 0's times the processes
    assert tokens("fsdp") == tokens("one") and len(tokens("one")) > 1
    assert read_result(tmp_path / "fsdp")["metrics"] == read_result(tmp_path / "one")["metrics"]
    from safetensors.torch import load_file
    a, b = load_file(tmp_path / "fsdp" / "adapter.safetensors"), load_file(tmp_path / "one" / "adapter.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=2e-5, msg=lambda m, key=key: f"{key}: {m}")
    ckpt = torch.load(tmp_path / "fsdp" / "ckpt.pt", weights_only=True)  # a whole, unsharded checkpoint
    assert ckpt["step"] == 6 and ckpt["optimizer"]["state"]
    metrics = train.main(sst2(tiny_bert_dir, tmp_path / "eval", varied, "--max_steps=0",
                              f"--adapter={tmp_path / 'fsdp'}"))  # its adapter, in one process
    assert metrics["dev"] == read_result(tmp_path / "fsdp")["metrics"]["dev"]


@needs_proc
@pytest.mark.parametrize("method", ["goat", "full"])
def test_fsdp_checkpoints_on_rank_0_and_a_preempted_run_resumes(method, tiny_bert_dir, glue_dir, tmp_path):
    """Under FSDP the whole state is gathered on rank 0 alone (cpu_offload), and a resume
    sends it from rank 0 into the shards (an adapter is rebuilt before sharding, a full
    model's weights go into them); the resumed run ends where an uninterrupted one does."""
    flags_ = [f"--method={method}", "--lr=1e-3", "--batch_size=4", "--balance_coef=0", "--fsdp", "--max_steps=16",
              "--lora_dropout=0", "--grad_accum=2"]  # full: gradients reduce-scattered at every micro-step
    whole, cut = preempted_and_resumed(sst2(tiny_bert_dir, tmp_path / "@", glue_dir, *flags_), tmp_path)
    ckpt = torch.load(whole / "ckpt.pt", weights_only=True)
    assert "classifier.weight" in ckpt["model"] or "head.classifier.weight" in ckpt["model"]
    assert ckpt["optimizer"]["state"]
    np.testing.assert_allclose(read_losses(cut), read_losses(whole), rtol=1e-5)
    assert read_result(cut)["metrics"] == read_result(whole)["metrics"]


@pytest.mark.skipif(processes.torch_older_than(2, 8), reason="train.py refuses it: --fsdp with a bf16 base needs 2.8")
def test_fsdp_with_a_bf16_base_under_autocast(tiny_bert_dir, glue_dir, tmp_path):
    """The CUDA default (bf16 frozen base, float32 adapters, bf16 autocast) sharded over two
    CPU processes: one FSDP group holds both dtypes, and the memory-saving autocast path
    runs inside it."""
    sharded, full = run_scripts(
        torchrun_command(sst2(tiny_bert_dir, tmp_path / "fsdp", glue_dir, "--max_steps=6", "--batch_size=4",
                              "--fsdp", "--dtype=bfloat16")),
        torchrun_command(sst2(tiny_bert_dir, tmp_path / "full", glue_dir, "--max_steps=4", "--batch_size=4", "--fsdp",
                              "--dtype=bfloat16", "--method=full", "--lr=1e-4")))  # FSDP gathers bf16 copies, block by block
    assert sharded.returncode == 0, sharded.stderr[-3000:]
    assert all(np.isfinite(read_losses(tmp_path / "fsdp")))
    from safetensors.torch import load_file
    saved = load_file(tmp_path / "fsdp" / "adapter.safetensors")
    assert all(v.dtype == torch.float32 for k, v in saved.items() if ".lora_" in k)
    assert full.returncode == 0, full.stderr[-3000:]
    assert all(np.isfinite(read_losses(tmp_path / "full")))
    assert all(v.dtype == torch.float32 for v in load_file(tmp_path / "full" / "model.safetensors").values()
               if v.is_floating_point())  # the weights themselves stay float32


def _two_processes(rank, world, port, results):
    """Every cross-process check of processes.py, with one process made to differ."""
    import torch.distributed as dist
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    env = processes.Processes(rank=rank, world=world, control=dist.group.WORLD)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 2))
    model[0].requires_grad_(False)
    outcome = {}

    def attempt(key, work):
        try:
            outcome[key] = work()
        except (SystemExit, ValueError) as e:
            outcome[key] = f"{type(e).__name__}: {e}"
    attempt("same", lambda: processes.check_identical(model, env))
    if rank == 1:
        with torch.no_grad():
            model[0].weight[0, 0] += 1.0  # another model file on this node
    attempt("frozen", lambda: processes.check_identical(model, env))
    args = vars(flags.parse_args(["--rank=8"] if rank == 0 else ["--rank=16"]))
    attempt("flags", lambda: processes.same_everywhere(env, args, "run with different flags", "fix",
                                                       lambda a, b: "; ".join(flags.differences(a, b, sorted(a)))))

    def fails_on_1():  # e.g. a data file missing on one node
        if rank == 1:
            raise SystemExit("data: missing on this node")
        return "loaded"
    attempt("together", lambda: processes.together(env, fails_on_1))
    small = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 4))  # layer "1" is too small: its owner, 1, fails alone
    attempt("svd", lambda: processes.shared_factors(small, goat.GOATConfig(rank=8, experts=4, top_k=2), "all-linear",
                                                    (), env))

    def write_fails():  # rank 0's checkpoint write on a full disk
        raise SystemExit("could not write the checkpoint")
    attempt("write", lambda: processes.from_rank0(env, write_fails))
    attempt("bug", lambda: processes.from_rank0(env, lambda: {}["data"]))  # rank 0 prints the traceback
    attempt("data", lambda: processes.same_everywhere(env, {"training examples": 3 + rank}, "read different data",
                                                      "fix"))
    tree = {"a": torch.arange(6.0).view(2, 3).t(), "b": [torch.tensor([rank]), 7, "x"], "c": (1.5, 2.5)}  # a: strided
    got = processes.broadcast_tree(env, tree if rank == 0 else None)
    outcome["tree"] = (got["a"].tolist(), got["b"][0].tolist(), got["b"][1:], got["c"])
    results[rank] = outcome
    sys.stdout.flush()
    os._exit(0)  # as train.py under torchrun: no interpreter shutdown for gloo's threads to abort


def _start(rank, world, port, results, argv, gpu_ranks=()):
    """processes.start as torchrun runs it, each process with its own command line; the
    processes in gpu_ranks see a GPU (faked), and fail at once if they start a backend:
    NCCL (absent from a CPU build) never meets gloo, so a real one would wait there."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    if rank in gpu_ranks:
        torch.cuda.is_available, torch.cuda.device_count, torch.cuda.set_device = lambda: True, lambda: 1, print

        def nccl(*args, **kwargs):  # not SystemExit: the process dies, and mp.spawn stops the others
            raise RuntimeError("NCCL started on a process whose peers start gloo")
        processes.dist.init_process_group = nccl
    try:
        processes.start(flags.parse_args(argv[rank]))
        results[rank] = "started"
    except SystemExit as e:
        results[rank] = str(e)
    sys.stdout.flush()
    os._exit(0)


def test_processes_started_with_other_flags_all_stop_before_any_check_of_their_own():
    """Process 1 alone asks for fp16 under FSDP, which start refuses: were that checked
    first, process 1 would exit alone and process 0 wait in the next collective. The
    flags are compared first, so both stop, naming the difference."""
    import torch.multiprocessing as mp
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    results = mp.Manager().dict()
    argv = [["--device=cpu", "--fsdp", "--model=/node0/models/MiniLM"],
            ["--device=cpu", "--fsdp", "--dtype=float16", "--model=/node1/cache/MiniLM"]]
    mp.spawn(_start, args=(2, port, results, argv), nprocs=2)
    for rank in (0, 1):  # the model compares by its folder's name: each node may keep it elsewhere
        assert results[rank].endswith("(--dtype: 'auto' vs 'float16'): give every node the same command, "
                                      "and the same --adapter file")


def test_a_process_whose_gpu_is_hidden_stops_with_the_others():
    """Under --device=auto, process 0 sees a GPU and process 1 none: they compare their
    kinds of device through the rendezvous store before either starts a backend (NCCL
    and gloo would each wait for the other), and both stop, naming the difference."""
    import torch.multiprocessing as mp
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    results = mp.Manager().dict()
    mp.spawn(_start, args=(2, port, results, [["--device=auto"]] * 2, (0,)), nprocs=2)
    for rank in (0, 1):
        assert results[rank].startswith("the processes run on different kinds of device (process 0: cuda; "
                                         "process 1: cpu): make a GPU visible to every process")


def test_what_every_process_prints_alike_rank_0_says_once(capsys, monkeypatch):
    for rank, said in ((0, "skipped 2 malformed rows\n"), (1, "")):
        env = processes.Processes(rank=rank)
        assert processes.together(env, lambda: print("skipped 2 malformed rows") or 7) == 7
        assert capsys.readouterr().out == said
    others = [("skipped 2 malformed rows\n", False)] * 2 + [("skipped 5 malformed rows\n", False)]
    monkeypatch.setattr(processes, "gather", lambda env, mine: [mine] + others)  # as 4 processes, one unlike the rest
    processes.together(processes.Processes(), lambda: print("skipped 2 malformed rows"))
    assert capsys.readouterr().out == "skipped 2 malformed rows\nprocess 3: skipped 5 malformed rows\n"


def test_every_node_may_keep_the_model_and_data_elsewhere(tmp_path, monkeypatch):
    """--data_dir is recorded resolved: the same relative path from another working folder
    (another node) is another absolute path, and must still pass the flags check."""
    seen = []
    for node in ("a", "b"):
        (tmp_path / node / "repo").mkdir(parents=True)
        monkeypatch.chdir(tmp_path / node / "repo")
        args = flags.parse_args(["--data_dir=../glue", f"--model={tmp_path / node / 'MiniLM'}"])
        seen.append({k: flags.model_name(k, v) for k, v in vars(args).items()})
    assert seen[0] == seen[1]


def test_a_bug_in_rank_0s_work_in_one_process_is_raised_as_it_is():
    with pytest.raises(KeyError, match="data"):  # its traceback, not a one-line exit
        processes.from_rank0(processes.Processes(), lambda: {}["data"])


def test_processes_must_hold_the_same_weights_flags_and_data():
    import torch.multiprocessing as mp
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    results = mp.Manager().dict()
    mp.spawn(_two_processes, args=(2, port, results), nprocs=2)
    for rank in (0, 1):
        assert results[rank]["same"] is None
        assert "different weights (1 tensors, e.g. 0.weight)" in results[rank]["frozen"]
        assert "different flags (--alpha: 16.0 vs 32.0; --rank: 8 vs 16)" in results[rank]["flags"]
        assert results[rank]["write"] == "SystemExit: could not write the checkpoint"  # both stop, none waits
        assert results[rank]["bug"] == "SystemExit: rank 0 failed: KeyError: 'data'"
        assert "read different data (process 0: {'training examples': 3}; process 1: {'training examples': 4})" \
            in results[rank]["data"]
        assert results[rank]["tree"] == ([[0.0, 3.0], [1.0, 4.0], [2.0, 5.0]], [0], [7, "x"], (1.5, 2.5))
    assert results[1]["together"] == "SystemExit: data: missing on this node"
    assert results[0]["together"] == "SystemExit: process 0 stops: another process failed (see its message)"
    assert results[1]["svd"].startswith("ValueError: 1: SVD segment length")
    assert results[0]["svd"] == "SystemExit: process 0 stops: another process failed (see its message)"


# --- signals, exits, loader workers --------------------------------------------------------------

def test_sigterm_and_ctrl_c_checkpoint_and_the_resumed_run_ends_like_an_uninterrupted_one(tiny_bert_dir, glue_dir,
                                                                                         tmp_path):
    flags_ = ["--epochs=3", "--lora_dropout=0.1", "--batch_size=8"]  # 36 steps, as the default job: no --max_steps

    def start(out_dir, *extra):  # one thread each: the runs of this test go side by side on two cores
        return subprocess.Popen([sys.executable, "train.py", *sst2(tiny_bert_dir, out_dir, glue_dir, *flags_), *extra],
                                cwd=HERE, env=SCRIPT_ENV,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    whole = start(tmp_path / "whole")
    cuts = {name: (sig, start(tmp_path / name)) for sig, name in ((signal.SIGTERM, "SIGTERM"), (signal.SIGINT, "SIGINT"))}
    waiting, deadline = dict(cuts), time.time() + 120
    while waiting and time.time() < deadline:  # each is stopped once it has logged 8 steps
        for name, (sig, proc) in list(waiting.items()):
            log = tmp_path / name / "metrics.jsonl"
            if proc.poll() is not None or (log.exists() and len(log.read_text().split("\n")) >= 9):
                proc.send_signal(sig)
                del waiting[name]
        time.sleep(0.02)
    if waiting:  # a run that is never signalled would train to the end: end them all, then say why
        for proc in (whole, *(proc for _, proc in cuts.values())):
            proc.kill()
    assert not waiting, f"no 8 steps logged within 120 s by {sorted(waiting)}"
    resumed = {}
    for name, (sig, proc) in cuts.items():
        out, err = proc.communicate(timeout=120)
        cut = tmp_path / name
        assert proc.returncode == 128 + sig, err[-3000:]
        assert f"stopped by {name}" in out and "--resume" in out
        assert (cut / "ckpt.pt").exists() and not (cut / "result.json").exists()
        assert 8 <= torch.load(cut / "ckpt.pt", weights_only=True)["step"] < 36
        resumed[name] = start(cut, "--resume")
    out, err = whole.communicate(timeout=300)  # communicate, not wait: a full pipe would block the run
    assert whole.returncode == 0, err[-3000:]
    from safetensors.torch import load_file
    for name, proc in resumed.items():
        cut = tmp_path / name
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
        torch.testing.assert_close(torch.tensor(read_losses(cut)), torch.tensor(read_losses(tmp_path / "whole")))
        a, b = load_file(cut / "adapter.safetensors"), load_file(tmp_path / "whole" / "adapter.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        assert read_result(cut)["metrics"] == read_result(tmp_path / "whole")["metrics"]


def test_loader_workers_outlive_a_signal_to_the_process_group(tmp_path):
    """torchrun signals the whole process group of each process it stops: the DataLoader's
    workers must not die of it, or the main process raises before it can write its checkpoint."""
    script = tmp_path / "group.py"
    script.write_text(f"""
import os, signal, sys
from functools import partial
sys.path.insert(0, {str(HERE)!r})
import data, flags, processes, train
items = [{{"input_ids": [1, 2, 3], "label": i % 2}} for i in range(64)]
args = flags.parse_args(["--batch_size=4"])
batches = train.Batches(items, partial(data.collate, pad_id=0), args, 0, 1, 0, 16)
stop = processes.StopSignals()
stream = train.micro_batches(batches, workers=1)
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


def test_loader_workers_can_be_spawned():
    """Where workers start by spawn or forkserver (macOS, Python 3.14 on Linux) the data
    they serve is pickled: it must hold no process group, and give the same batches."""
    items = [{"input_ids": list(range(1 + i % 5)), "label": i % 2} for i in range(48)]
    batches = train.Batches(items, partial(data.collate, pad_id=0), flags.parse_args(["--batch_size=4"]), 0, 1, 0, 6)
    assert pickle.loads(pickle.dumps(batches))[3]["input_ids"].tolist() == batches[3]["input_ids"].tolist()
    loader = torch.utils.data.DataLoader(batches, batch_size=None, num_workers=1, multiprocessing_context="spawn")
    spawned = [b["input_ids"].tolist() for b in loader]
    assert spawned == [batches[k]["input_ids"].tolist() for k in range(len(batches))]


def _loader_worker_view(queue):
    processes.ignore_stop_signals(0)
    queue.put((os.getpgid(0) == os.getpid(), [signal.getsignal(s) == signal.SIG_IGN for s in processes.STOP_SIGNALS]))


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
    assert processes.exit_status(SystemExit(None)) == 0 and processes.exit_status(SystemExit(0)) == 0
    assert processes.exit_status(SystemExit(143)) == 143  # a preempted run: 128 + SIGTERM
    assert processes.exit_status(SystemExit("--world_size: 2 vs 1")) == 1
    assert "--world_size: 2 vs 1" in capsys.readouterr().err
    try:
        raise ValueError("a bug")
    except ValueError as e:
        assert processes.exit_status(e) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "ValueError: a bug" in err
    assert processes.exit_status(KeyboardInterrupt()) == 130  # 128 + SIGINT, as Python's own exit


# --- the step -----------------------------------------------------------------------------------

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
    args = flags.parse_args(["--batch_size=4", "--grad_accum=3"])
    env = processes.Processes(device="meta")
    stream = train.micro_batches(train.Batches(items, partial(data.collate, pad_id=0), args, 0, 1, 0, 2), workers=0)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    health = processes.Health("meta")
    with HostSyncs() as syncs:
        for step in range(2):
            micro = [next(stream) for _ in range(args.grad_accum)]
            loss, balance, norm, _, _ = train.train_step(model, model, micro, optimizer, scaler, params, args, env,
                                                         train.nullcontext())
            health.update(step + 1, loss, norm)
    assert syncs.calls == [], syncs.calls
    assert loss.device.type == "meta" and all(p.grad is None for p in params)  # the step ran to the end
    with HostSyncs() as syncs, pytest.raises(Exception):  # the counter does see a sync
        loss.item()
    assert syncs.calls == ["item"]


@pytest.mark.parametrize("method, syncs", [("goat", [False, False, True]), ("full", [True, True, True])])
def test_fsdp_reduces_a_full_methods_gradients_at_every_micro_step(method, syncs):
    """FSDP keeps the gradients of a micro-step that skips the reduce-scatter unsharded
    until the last one: an adapter's are small, a full method's the whole model's on
    every GPU, which sharding exists to avoid."""
    class Recorded(TinyLM):
        def set_requires_gradient_sync(self, value):
            self.syncs.append(value)
    torch.manual_seed(0)
    model = Recorded()
    model.syncs = []
    if method == "goat":
        goat.add_goat(model, goat.GOATConfig(rank=8, experts=4, top_k=2), exclude=("head",))
    items = [{"input_ids": list(range(i, i + 6)), "labels": list(range(i + 1, i + 7))} for i in range(12)]
    args = flags.parse_args([f"--method={method}", "--batch_size=4", "--grad_accum=3"])
    stream = train.micro_batches(train.Batches(items, partial(data.collate, pad_id=0), args, 0, 1, 0, 1), workers=0)
    params = [p for p in model.parameters() if p.requires_grad]
    train.train_step(model, model, [next(stream) for _ in range(3)], torch.optim.AdamW(params),
                     torch.amp.GradScaler("cpu", enabled=False), params, args, processes.Processes(fsdp=True),
                     train.nullcontext())
    assert model.syncs == syncs
