"""Shared test settings: hypothesis profiles (a derandomised one for CI), the
location of the optional shared data, and tiny models and data sets built in the
test session (no download)."""
import inspect
import json
import os
import subprocess
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, settings

# CI sets CI=true: same examples every run, so a red build is reproducible.
settings.register_profile("ci", derandomize=True, max_examples=20, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", max_examples=20, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))

SHARED_DATA = Path(__file__).resolve().parent.parent / "shared" / "data"
# study.py unpacks its pinned copy of the repository (tests included) under runs/: not ours to collect
collect_ignore_glob = ["runs/*", "out*/*"]


HERE = Path(__file__).resolve().parent
WORDS = ("good great fine nice lovely superb bad awful poor sad terrible boring the a movie film plot was is "
         "and very not it this true false answer option1 option2 correct question yes no").split()
POSITIVE, NEGATIVE = WORDS[:6], WORDS[6:12]


def write_tokenizer(folder):
    from transformers import BertTokenizerFast
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS + list("abcdefghijklmnopqrstuvwxyz0123456789.,:#!?")
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    if "vocab_file" in inspect.signature(BertTokenizerFast.__init__).parameters:  # transformers 4
        tokenizer = BertTokenizerFast(vocab_file=str(folder / "vocab.txt"))
    else:
        tokenizer = BertTokenizerFast(vocab={word: i for i, word in enumerate(vocab)})
    assert tokenizer("good movie")["input_ids"] == [2, 5, 19, 3]
    tokenizer.save_pretrained(folder)
    return len(vocab)


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory):
    """A 2-layer BERT encoder (no head) with a word-level vocabulary; no dropout so
    runs are comparable across processes."""
    from transformers import BertConfig, BertModel
    folder = tmp_path_factory.mktemp("tiny_bert")
    vocab = write_tokenizer(folder)
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=128, hidden_dropout_prob=0.0,
                         attention_probs_dropout_prob=0.0)).save_pretrained(folder)
    return folder


def save_tiny_llama(folder, pad_token_id=0, positions=512):
    """A 2-layer LLaMA with the word-level vocabulary; pad_token_id None as in the released checkpoints."""
    from transformers import LlamaConfig, LlamaForCausalLM
    vocab = write_tokenizer(folder)
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, intermediate_size=64, max_position_embeddings=positions,
                                 bos_token_id=None, eos_token_id=3, pad_token_id=pad_token_id,
                                 initializer_range=0.2)).save_pretrained(folder)  # big enough logits to fit
    return folder


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("tiny_llama"))


def sentiment_rows(n, seed):
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        label = int(rng.integers(2))
        words = list(rng.choice(POSITIVE if label else NEGATIVE, 2)) + list(rng.choice(WORDS[12:20], 3))
        rng.shuffle(words)
        rows.append((" ".join(words), label))
    return rows


@pytest.fixture(scope="session")
def glue_dir(tmp_path_factory):
    """A tiny, learnable SST-2 in the GLUE layout."""
    root = tmp_path_factory.mktemp("glue")
    (root / "SST-2").mkdir()
    for name, n, seed in (("train.tsv", 96, 0), ("dev.tsv", 40, 1)):
        lines = ["sentence\tlabel"] + [f"{text}\t{label}" for text, label in sentiment_rows(n, seed)]
        (root / "SST-2" / name).write_text("\n".join(lines) + "\n")
    return root


def common(model_dir, out_dir, *extra):
    # --eta=1 pinned, so that the tests do not move with train.py's defaults
    return [f"--model={model_dir}", f"--out_dir={out_dir}", "--log_every=1", "--ckpt_every=1000", "--eta=1", *extra]


def read_losses(out_dir):
    return [r["task_loss"] for r in map(json.loads, (Path(out_dir) / "metrics.jsonl").read_text().splitlines())
            if "task_loss" in r]


def read_result(out_dir):
    return json.loads((Path(out_dir) / "result.json").read_text())


SCRIPT_ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}  # one thread, output as it comes


def run_script(args):
    """A train.py process (one thread, unbuffered) in the repository folder."""
    return run_scripts(args)[0]


def run_scripts(*commands):
    """Several such processes side by side (one thread each: a test's runs share the cores)."""
    run = partial(subprocess.run, cwd=HERE, env=SCRIPT_ENV, capture_output=True, text=True, timeout=300)
    with ThreadPoolExecutor(len(commands)) as pool:
        return list(pool.map(run, commands))
