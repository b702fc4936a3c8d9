"""Image classification with train.py: the ImageFolder layout, a tiny ViT and a tiny
CLIP vision tower built from configs, small real images drawn by the test with
Pillow, a corrupt image skipped, and an adapter that re-loads to the same metric."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

import data
import train
from conftest import read_losses, read_result

COLOURS = {"blue": (40, 60, 200), "green": (40, 180, 60), "red": (200, 40, 40)}


def draw(colour, rng, size=32):
    """A shape in the class's colour on a random grey background, with noise: the
    colour decides the class, the shape and position do not."""
    image = Image.new("RGB", (size, size), tuple(int(v) for v in rng.integers(90, 160, 3)))
    pen = ImageDraw.Draw(image)
    x, y = (int(v) for v in rng.integers(2, size // 2, 2))
    box = (x, y, x + int(rng.integers(10, 16)), y + int(rng.integers(10, 16)))
    (pen.ellipse if rng.random() < 0.5 else pen.rectangle)(box, fill=colour)
    noisy = np.asarray(image).astype(int) + rng.integers(-20, 20, (size, size, 3))
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


@pytest.fixture(scope="session")
def image_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    rng = np.random.default_rng(0)
    for split, per_class in (("train", 40), ("test", 12)):
        for name, colour in COLOURS.items():
            (root / split / name).mkdir(parents=True)
            for i in range(per_class):
                draw(colour, rng).save(root / split / name / f"{i}.{'png' if i % 2 else 'jpg'}")
    return root


@pytest.fixture(scope="session")
def tiny_vit_dir(tmp_path_factory):
    from transformers import ViTConfig, ViTImageProcessor, ViTModel
    folder = tmp_path_factory.mktemp("tiny_vit")
    torch.manual_seed(0)
    ViTModel(ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                       intermediate_size=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0),
             add_pooling_layer=False).save_pretrained(folder)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory):
    """A CLIP checkpoint (both towers, as released); image classification uses its vision tower."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel
    folder = tmp_path_factory.mktemp("tiny_clip")
    torch.manual_seed(0)
    CLIPModel(CLIPConfig(
        text_config=dict(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=16),
        vision_config=dict(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                           intermediate_size=64), projection_dim=16)).save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


def images(model_dir, out, image_dir, *extra):
    return [f"--model={model_dir}", f"--out_dir={out}", "--task=images", f"--data_dir={image_dir}", "--rank=8",
            "--experts=4", "--batch_size=16", "--lr=1e-2", "--head_lr=1e-2", "--warmup=2", "--log_every=1", *extra]


def test_the_image_folder_layout_parses(image_dir, tmp_path):
    task = data.load_task("images", image_dir)
    assert task.labels == ["blue", "green", "red"] and task.kind == "image"
    assert len(task.train) == 120 and len(task.evals["dev"]) == 36
    assert task.train[0]["label"] == 0 and task.train[-1]["label"] == 2
    assert task.majority_baseline()["dev"]["accuracy"] == pytest.approx(1 / 3)
    (tmp_path / "train" / "cat").mkdir(parents=True)
    (tmp_path / "train" / "dog").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="no test/ or val/ folder"):
        data.load_task("images", tmp_path)
    (tmp_path / "val" / "bird").mkdir(parents=True)
    with pytest.raises(ValueError, match="no images"):
        data.load_task("images", tmp_path)
    Image.new("RGB", (4, 4)).save(tmp_path / "train" / "cat" / "a.png")
    Image.new("RGB", (4, 4)).save(tmp_path / "val" / "bird" / "a.png")
    with pytest.raises(ValueError, match="class 'bird' has no folder under train/"):
        data.load_task("images", tmp_path)


@pytest.mark.parametrize("method", ["goat", "lora"])
def test_a_vit_learns_the_colours_and_its_adapter_reloads(method, tiny_vit_dir, image_dir, tmp_path):
    trained = train.main(images(tiny_vit_dir, tmp_path / "run", image_dir, f"--method={method}", "--max_steps=80"))
    result = read_result(tmp_path / "run")
    assert trained["dev"]["accuracy"] > result["majority_baseline"]["dev"]["accuracy"] + 0.25, trained
    assert result["heads"] == ["classifier"]
    losses = read_losses(tmp_path / "run")
    assert np.mean(losses[-5:]) < 0.6 * np.mean(losses[:5])
    reloaded = train.main(images(tiny_vit_dir, tmp_path / "eval", image_dir, "--max_steps=0",
                                 f"--adapter={tmp_path / 'run'}"))
    assert reloaded == trained


def test_clip_vision_tower_with_a_new_head(tiny_clip_dir, image_dir, tmp_path):
    train.main(images(tiny_clip_dir, tmp_path / "run", image_dir, "--max_steps=30"))
    result = read_result(tmp_path / "run")
    assert result["heads"] == ["classifier"]  # new, trained in full; the text tower is not loaded
    from safetensors.torch import load_file
    saved = load_file(tmp_path / "run" / "adapter.safetensors")
    wrapped = {k.rsplit(".", 1)[0] for k in saved if k.endswith(".lora_A")}
    assert wrapped and all(name.startswith("vision_model.") for name in wrapped)
    assert any(name.endswith("self_attn.q_proj") for name in wrapped) and any(name.endswith("mlp.fc2") for name in wrapped)
    assert result["metrics"]["dev"]["accuracy"] > 0.5


def test_corrupt_images_are_skipped_with_their_names(tiny_vit_dir, image_dir, tmp_path, capsys):
    import shutil
    root = tmp_path / "data"
    shutil.copytree(image_dir, root)
    good = (root / "train" / "red" / "1.png").read_bytes()
    (root / "train" / "red" / "broken.png").write_bytes(good[:len(good) // 2])  # truncated mid-file
    (root / "train" / "blue" / "notes.jpg").write_text("not an image")
    (root / "test" / "green" / "empty.png").write_bytes(b"")
    metrics = train.main(images(tiny_vit_dir, tmp_path / "run", root, "--max_steps=12", "--batch_size=11"))
    out = capsys.readouterr().out
    # a file that is no image at all is left out when the task is read; a truncated one
    # is found when decoded, masked out of the loss, and named each time it comes up
    assert "skipped 1 unreadable image(s)" in out and "notes.jpg" in out and "empty.png" in out
    assert "skipped an unreadable image: " in out and "broken.png" in out
    result = read_result(tmp_path / "run")
    assert result["train_examples"] == 121 and result["skipped_images"]["train"] >= 2  # notes.jpg, broken.png
    assert result["skipped_images"]["dev"] == 1  # empty.png: the metric and the baseline leave it out alike
    assert all(np.isfinite(read_losses(tmp_path / "run")))
    assert 0.0 <= metrics["dev"]["accuracy"] <= 1.0
    assert json.loads((tmp_path / "run" / "config.json").read_text())["task"] == "images"


def test_no_metric_over_nothing_and_the_baseline_scores_what_the_metric_scores(tiny_vit_dir, image_dir, tmp_path):
    """Every test image truncated (readable headers, corrupt data): the run stops instead of
    reporting accuracy over zero images. One truncated test image: the majority-class
    baseline leaves it out exactly as the metric does."""
    import shutil
    root = tmp_path / "data"
    shutil.copytree(image_dir, root)
    def truncate(path):  # the header survives: the file is read, and fails when decoded
        path.write_bytes(path.read_bytes()[:max(50, path.stat().st_size // 3)])
    for path in (root / "test").rglob("*.*"):
        truncate(path)
    with pytest.raises(SystemExit, match="no example could be scored"):
        train.main(images(tiny_vit_dir, tmp_path / "run", root, "--max_steps=2"))
    shutil.rmtree(root / "test")
    shutil.copytree(image_dir / "test", root / "test")
    bad = sorted((root / "test").rglob("*.png"))[0]
    truncate(bad)
    train.main(images(tiny_vit_dir, tmp_path / "one", root, "--max_steps=2"))
    result = read_result(tmp_path / "one")
    assert result["skipped_images"]["dev"] == 1
    task = data.load_task("images", root)
    train_labels = [ex["label"] for ex in task.train]
    majority = max(sorted(set(train_labels)), key=train_labels.count)  # the commonest training label
    labels = [ex["label"] for ex in task.evals["dev"] if ex["image"] != str(bad)]
    expected = sum(label == majority for label in labels) / len(labels)  # over the 1 image fewer
    assert result["majority_baseline"]["dev"]["accuracy"] == pytest.approx(expected)


def test_full_fine_tuning_of_clip_under_ddp(tiny_clip_dir, image_dir, tmp_path):
    """CLIP's post_layernorm feeds nothing the classifier reads: full fine-tuning leaves it
    without a gradient, which DDP must expect (it failed at the second step before)."""
    argv = images(tiny_clip_dir, tmp_path / "run", image_dir, "--method=full", "--max_steps=3", "--batch_size=8",
                  "--lr=1e-3")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "train.py", *argv], cwd=Path(__file__).parent, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert read_result(tmp_path / "run")["steps"] == 3
