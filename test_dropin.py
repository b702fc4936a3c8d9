"""goat.py as a drop-in for models people write themselves, and under hostile use:
nn.TransformerEncoder and a nanoGPT-style model trained with add_goat and the
balance loss; tied weights and output embeddings; deepcopy, pickling, skipped
layers, forwards without backward, activation checkpointing, meta tensors, later
dtype casts; adapters checked in full before anything changes; bad configs; the
memory-saving autocast path against plain autograd."""
import copy
import dataclasses
import json
import pickle
import warnings
from collections import OrderedDict

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.checkpoint import checkpoint

import bench
import goat
from goat import GOATConfig, GOATLinear

TORCH = tuple(int(v) for v in torch.__version__.split(".")[:2])  # goat.py runs on torch 2.2 and later


# --- models written by hand, as users write them ---------------------------------------

class Block(nn.Module):
    """A nanoGPT block: causal self-attention from plain Linears, then an MLP."""

    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.ln_1, self.ln_2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.c_attn, self.c_proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.c_fc, self.mlp_proj = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

    def attention(self, x):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.heads, C // self.heads).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, C))

    def forward(self, x):
        x = x + self.attention(self.ln_1(x))
        return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x))))


class NanoGPT(nn.Module):
    def __init__(self, vocab=50, dim=32, heads=4, layers=2, block_size=16, checkpointing=None):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, dim), nn.Embedding(block_size, dim)
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)
        self.lm_head.weight = self.wte.weight  # weight tying, as nanoGPT does
        self.checkpointing = checkpointing  # None, "reentrant" or "non-reentrant"
        self.skip = set()  # block indices to skip (LayerDrop)

    def forward(self, idx, targets=None):
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1]))
        for i, block in enumerate(self.blocks):
            if i in self.skip:
                continue
            if self.checkpointing:
                x = checkpoint(block, x, use_reentrant=self.checkpointing == "reentrant")
            else:
                x = block(x)
        logits = self.lm_head(self.ln_f(x))
        return logits if targets is None else F.cross_entropy(logits.flatten(0, 1), targets.flatten())


class EncoderClassifier(nn.Module):
    def __init__(self, vocab=50, dim=32, classes=3):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        layer = nn.TransformerEncoderLayer(dim, nhead=4, dim_feedforward=64, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
        self.classifier = nn.Linear(dim, classes)

    def forward(self, idx):
        return self.classifier(self.encoder(self.embed(idx)).mean(dim=1))


CFG = GOATConfig(rank=8, experts=4, top_k=2, dropout=0.0)


def wrapped_nanogpt(seed=0):
    """A NanoGPT with GOAT on every Linear it may wrap, in training mode."""
    torch.manual_seed(seed)
    model = NanoGPT()
    goat.add_goat(model, CFG)
    return model.train()


def lm_batch(seed, batch=8, length=12, vocab=50):
    """A learnable sequence task: each token is followed by (token + 1) mod vocab."""
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(0, vocab, (batch, 1), generator=g)
    seq = (start + torch.arange(length + 1)) % vocab
    return seq[:, :-1], seq[:, 1:]


def train(model, step_loss, steps=40, lr=3e-3):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    losses = []
    for step in range(steps):
        loss = step_loss(step)
        (loss + 1e-3 * goat.balance_loss(model)).backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def test_nanogpt_with_tied_head_trains_and_keeps_its_embedding():
    torch.manual_seed(0)
    model = NanoGPT()
    embedding = model.wte.weight.detach().clone()
    names = goat.add_goat(model, CFG)
    assert "lm_head" not in names and len(names) == 8  # 4 Linears per block; the tied head is left alone
    assert torch.equal(model.wte.weight, embedding)  # no residual written into the shared weight
    model.train()
    losses = train(model, lambda step: model(*lm_batch(step)), steps=60)
    assert sum(losses[-5:]) < 0.7 * sum(losses[:5]), losses
    assert torch.equal(model.wte.weight, embedding)  # frozen and untouched
    with pytest.raises(ValueError, match="tied to another module"):
        goat.add_goat(NanoGPT(), CFG, ["lm_head"], exclude=())  # named explicitly, no default exclusions


def test_transformer_encoder_trains_and_multihead_attention_is_left_alone():
    torch.manual_seed(0)
    model = EncoderClassifier()
    names = goat.add_goat(model, CFG)
    assert sorted(names) == [f"encoder.layers.{i}.linear{j}" for i in (0, 1) for j in (1, 2)]
    model.classifier.requires_grad_(True)
    model.train()
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(0, 50, (64, 6), generator=g)
    labels = idx[:, 0] % 3  # the class is a function of the first token
    losses = train(model, lambda step: F.cross_entropy(model(idx), labels), steps=60, lr=1e-2)
    assert sum(losses[-5:]) < 0.5 * sum(losses[:5]), losses
    with pytest.raises(ValueError, match="MultiheadAttention reads its out_proj.weight"):
        goat.add_goat(EncoderClassifier(), CFG, ["out_proj"])


def test_tied_output_embedding_of_a_masked_lm_is_not_wrapped():
    from transformers import BertConfig, BertForMaskedLM
    torch.manual_seed(0)
    model = BertForMaskedLM(BertConfig(vocab_size=60, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                       intermediate_size=48, max_position_embeddings=32))
    embedding = model.bert.embeddings.word_embeddings.weight.detach().clone()
    names = goat.add_goat(model, CFG)
    assert "cls.predictions.decoder" not in names and names
    assert torch.equal(model.bert.embeddings.word_embeddings.weight, embedding)


def test_exclude_takes_full_names_and_name_parts():
    model = NanoGPT()
    names = goat.add_goat(model, CFG, exclude=("blocks.0.c_fc", "mlp_proj"))
    assert "blocks.0.c_fc" not in names and "blocks.1.c_fc" in names
    assert not any(name.endswith("mlp_proj") for name in names)


def test_deepcopy_and_pickle_after_a_training_forward():
    model = wrapped_nanogpt()
    idx, targets = lm_batch(0)
    model(idx, targets)  # statistics with a graph are held now
    twin = copy.deepcopy(model)  # e.g. an EMA or best-model copy
    restored = pickle.loads(pickle.dumps(model))
    model.eval(), twin.eval(), restored.eval()
    torch.testing.assert_close(twin(idx), model(idx))
    torch.testing.assert_close(restored(idx), model(idx))


def test_a_copy_carries_no_routing_statistics():
    model = NanoGPT()
    goat.add_goat(model, CFG)
    model.train()
    model(*lm_batch(0))
    twin = copy.deepcopy(model)
    assert all(mod._probs is None and mod._chosen is None for _, mod in goat.goat_layers(twin))
    assert all(mod._probs is not None for _, mod in goat.goat_layers(model))


def held_balance_loss(mod):
    """sum_i f_i P_i from the statistics a layer holds, without reading them out."""
    f = mod._chosen.mean(dim=0) * (mod.experts / mod.top_k)
    return (f * mod._probs.mean(dim=0)).sum()


def test_a_skipped_layer_adds_no_stale_balance_loss():
    model = wrapped_nanogpt()
    idx, targets = lm_batch(0)
    (model(idx, targets) + goat.balance_loss(model)).backward()
    model.skip = {1}  # LayerDrop: block 1 does not run in this forward
    loss = model(idx, targets)
    only_block0 = sum(held_balance_loss(mod) for name, mod in goat.goat_layers(model) if name.startswith("blocks.0"))
    assert all(mod._probs is None for name, mod in goat.goat_layers(model) if name.startswith("blocks.1"))
    balance = goat.balance_loss(model)
    torch.testing.assert_close(balance, only_block0)
    (loss + balance).backward()  # no "backward through the graph a second time"
    assert goat.balance_loss(model) == 0  # read once: a second call has nothing left


def test_forwards_without_backward_keep_no_graph():
    torch.manual_seed(0)
    model = NanoGPT()
    goat.add_goat(model, CFG)
    idx, targets = lm_batch(0)
    model.eval()
    model(idx, targets)  # grad enabled, evaluation mode: statistics without a graph
    assert all(mod._probs.grad_fn is None for _, mod in goat.goat_layers(model))
    model.train()
    loss = model(idx, targets)
    assert all(mod._probs.grad_fn is not None for _, mod in goat.goat_layers(model))
    goat.balance_loss(model)  # the statistics are handed to the caller's loss, not kept
    assert all(mod._probs is None for _, mod in goat.goat_layers(model))
    assert goat.expert_load(model)  # the load (no graph) stays for logging
    del loss


@pytest.mark.parametrize("mode", ["non-reentrant", "reentrant"])
def test_activation_checkpointing(mode):
    """Non-reentrant checkpointing gives the same loss and gradients, router included;
    reentrant checkpointing would silently cut the balance loss off, so it is refused."""
    torch.manual_seed(0)
    plain = NanoGPT()
    goat.add_goat(plain, CFG)
    ckpt = copy.deepcopy(plain)
    ckpt.checkpointing = mode
    plain.train(), ckpt.train()
    idx, targets = lm_batch(0)
    if mode == "reentrant":
        ckpt(idx, targets)
        with pytest.raises(RuntimeError, match="use_reentrant"):
            goat.balance_loss(ckpt)
        return
    results = []
    for model in (plain, ckpt):
        loss = model(idx, targets) + 0.1 * goat.balance_loss(model)
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}))
    torch.testing.assert_close(results[0][0], results[1][0])
    assert any("lora_router" in n for n in results[0][1])
    for name, grad in results[0][1].items():
        torch.testing.assert_close(results[1][1][name], grad, msg=name)
    # the re-run forward inside backward does not leave statistics behind
    assert all(mod._probs is None for _, mod in goat.goat_layers(ckpt))


def test_meta_device_model_is_refused_clearly():
    with torch.device("meta"):
        model = NanoGPT()
    with pytest.raises(ValueError, match="meta device"):
        goat.add_goat(model, CFG)


def test_later_cast_to_low_precision_keeps_the_adapter_float32():
    torch.manual_seed(0)
    model = NanoGPT()
    goat.add_goat(model, CFG)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    model.to(torch.bfloat16)
    layer = model.blocks[0].c_fc
    assert layer.base.weight.dtype == torch.bfloat16
    for name, p in model.named_parameters():
        if "lora_" in name:
            assert p.dtype == torch.float32 and torch.equal(p, before[name]), name
    assert layer.lora_A0.dtype == torch.float32
    x = torch.randn(2, 5, 32, dtype=torch.bfloat16)
    assert layer(x).dtype == torch.bfloat16
    model.half()
    assert layer.lora_B.dtype == torch.float32 and layer.base.weight.dtype == torch.float16
    model.double()  # widening is allowed
    assert layer.lora_B.dtype == torch.float64


def test_zero_tokens_give_an_empty_output_of_the_right_shape():
    for cfg in (CFG, goat.preset("lora", rank=4, alpha=8)):
        layer = GOATLinear(nn.Linear(16, 12), cfg)
        layer.train()
        for shape in ((0, 16), (2, 0, 16)):
            y = layer(torch.randn(*shape))
            assert y.shape == (*shape[:-1], 12)


def test_add_goat_twice_is_refused_and_the_adapter_survives():
    model = NanoGPT()
    goat.add_goat(model, CFG)
    with pytest.raises(ValueError, match="already has 8 GOAT"):
        goat.add_goat(model, CFG)
    with pytest.raises(ValueError, match="already has"):
        goat.add_upcycled_moe(model)
    assert len(goat.goat_state_dict(model)) > 8
    goat.remove_goat(model)
    assert not goat.goat_layers(model)


def trained_nanogpt(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    model = NanoGPT().to(dtype)
    goat.add_goat(model, CFG)
    model.train()
    train(model, lambda step: model(*lm_batch(step)), steps=3, lr=0.05)
    return model.eval()


def outputs(model):
    with torch.no_grad():
        return model(lm_batch(9)[0]).float()


def test_refused_adapter_changes_nothing():
    model = trained_nanogpt()
    state = goat.goat_state_dict(model)
    other = trained_nanogpt(seed=1)
    expected = outputs(other)
    broken = {k: v for k, v in state.items() if not k.endswith("blocks.1.c_fc.lora_B")}
    with pytest.raises(ValueError, match="lacks blocks.1.c_fc.lora_B"):
        goat.load_goat_state_dict(other, broken)
    with pytest.raises(ValueError, match="does not match the one the adapter was trained on"):
        goat.load_goat_state_dict(other, state)  # another base (seed 1)
    reshaped = dict(state, **{"blocks.0.c_attn.lora_router": torch.zeros(3, 32)})
    with pytest.raises(ValueError, match="shape"):
        goat.load_goat_state_dict(other, reshaped)
    with pytest.raises(ValueError, match="not a GOAT adapter"):
        goat.load_goat_state_dict(other, {"weight": torch.zeros(1)})
    assert len(goat.goat_layers(other)) == 8
    torch.testing.assert_close(outputs(other), expected, rtol=0, atol=0)


@pytest.mark.parametrize("trained_in", [torch.bfloat16, torch.float16])
def test_adapter_from_a_low_precision_base_loads_onto_float32(trained_in):
    """The CUDA default trains on a bf16 base; the same checkpoint in float32 must accept it."""
    torch.manual_seed(0)
    pristine = NanoGPT()
    low = copy.deepcopy(pristine).to(trained_in)
    goat.add_goat(low, CFG)
    state = goat.goat_state_dict(low)
    goat.load_goat_state_dict(pristine, state)  # does not raise
    assert len(goat.goat_layers(pristine)) == 8


def test_fingerprint_of_a_weight_beyond_float32_integers():
    """A LLaMA MLP weight has more than 2**24 entries: float32 spacing of the picks ran past the end."""
    w = torch.randn(4100, 4096)  # 16,793,600 entries: float32 rounds the last index, 16,793,599, up
    fp = goat.weight_fingerprint(w)
    assert fp[-1] == w[-1, -1].to(torch.bfloat16).double()  # the last pick is the last entry
    assert fp[2] == w[0, 0].to(torch.bfloat16).double()
    assert goat.fingerprints_match(fp, w)
    assert not goat.fingerprints_match(fp, torch.randn(4100, 4096))


def test_nn_transformer_encoder_in_eval_calls_the_adapter():
    """batch_first encoder layers have a fused inference path that reads linear1.weight
    directly: in eval the wrapped model must give what its ordinary path gives."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(32, nhead=4, dim_feedforward=64, dropout=0.0, batch_first=True)
    encoder = nn.TransformerEncoder(layer, num_layers=2)  # nested tensors on, as by default
    goat.add_goat(encoder, CFG)
    with torch.no_grad():
        for name, mod in goat.goat_layers(encoder):
            mod.lora_B.normal_()  # an adapter that changes the output
    x = torch.randn(3, 5, 32)
    padding = torch.tensor([[False] * 5, [False] * 3 + [True] * 2, [False] * 4 + [True]])
    with torch.no_grad():
        expected = encoder.train()(x, src_key_padding_mask=padding)  # training: the ordinary path
        got = encoder.eval()(x, src_key_padding_mask=padding)
        got_unmasked = encoder(x)
        expected_unmasked = encoder.train()(x)
    keep = ~padding
    torch.testing.assert_close(got[keep], expected[keep], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_unmasked, expected_unmasked, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kwargs,match", [
    (dict(eta=0.0), "eta=0.0 must be a positive finite number"),
    (dict(eta=float("nan")), "eta=nan"),
    (dict(rho=0.0), "rho=0.0"),
    (dict(scaling=float("nan")), "scaling=nan"),
    (dict(scaling=-1.0), "scaling=-1.0"),
    (dict(scaling="alpha", alpha=0.0), "alpha=0.0"),
    (dict(init_cof=float("inf")), "init_cof=inf"),
    (dict(rank=0), "rank=0 must be a positive integer"),
    (dict(experts=0), "experts=0"),
    (dict(rank=8.0), "rank=8.0"),
    (dict(dropout=float("nan")), "dropout"),
    (dict(segments=3), "segments=3 must divide rank=32"),
])
def test_bad_scales_and_counts_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GOATConfig(**kwargs)


def test_one_lora_on_goats_segments_takes_goats_components():
    torch.manual_seed(0)
    W = torch.randn(48, 40, dtype=torch.float64)
    goat_cfg = GOATConfig(rank=8, experts=4, top_k=2, scaling=2.0)
    single = GOATConfig(rank=8, experts=1, top_k=1, segments=4, init_cof=1.0, scaling=2.0)
    A_goat, B_goat, _ = goat.init_factors(W, goat_cfg)
    A_one, B_one, _ = goat.init_factors(W, single)
    torch.testing.assert_close(A_one, A_goat, rtol=0, atol=0)
    torch.testing.assert_close(B_one, B_goat, rtol=0, atol=0)
    pissa = goat.init_factors(W, GOATConfig(rank=8, experts=1, top_k=1, scaling=2.0))[0]
    assert not torch.allclose(A_one, pissa)


# --- the autocast path --------------------------------------------------------------------

def reference_autocast_step(layer, x, mask):
    """The same computation with plain autograd: dropped low-precision input, A in
    bf16, router logits in float32 from the exact x whose gradient uses the bf16 x."""
    x_low = x.to(torch.bfloat16)
    y = F.linear(x_low, layer.base.weight.to(torch.bfloat16), layer.base.bias.to(torch.bfloat16))
    dropped = x_low * mask / (1 - layer.cfg.dropout)
    u = F.linear(dropped, layer.lora_A.to(torch.bfloat16))
    exact = F.linear(x.float(), layer.lora_router)
    via_low = F.linear(x_low.float(), layer.lora_router)
    logits = via_low + (exact - via_low).detach()
    _, _, gate = goat.gate_from_logits(logits, layer.top_k)
    weights = (gate * layer.scaling).to(u.dtype).unsqueeze(-1)
    u = (u.view(-1, layer.experts, layer.expert_rank) * weights).view_as(u)
    return torch.addmm(y, u, layer.lora_B.to(torch.bfloat16).t())


def test_autocast_path_equals_plain_autograd_with_the_same_mask():
    torch.manual_seed(0)
    layer = GOATLinear(nn.Linear(24, 20), GOATConfig(rank=8, experts=4, top_k=2, dropout=0.2))
    layer.train()
    x = torch.randn(30, 24, requires_grad=True)
    dy = torch.randn(30, 20)
    state = torch.get_rng_state()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    (y.float() * dy).sum().backward()
    got = {n: p.grad.clone() for n, p in layer.named_parameters() if p.requires_grad}
    got_x = x.grad.clone()
    torch.set_rng_state(state)  # the same draw gives the same mask
    mask = torch.empty(30, 24, dtype=torch.bool).bernoulli_(0.8)
    layer.zero_grad()
    x.grad = None
    with torch.autocast("cpu", enabled=False):
        y_ref = reference_autocast_step(layer, x, mask)
    (y_ref.float() * dy).sum().backward()
    torch.testing.assert_close(y.float(), y_ref.float())
    torch.testing.assert_close(x.grad, got_x, rtol=1e-2, atol=1e-3)
    for name, p in layer.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(got[name], p.grad, rtol=1e-2, atol=1e-3, msg=name)


@pytest.mark.parametrize("input_dtype", [torch.bfloat16, torch.float32])
def test_goat_saves_at_most_a_quarter_more_than_lora_under_autocast(input_dtype):
    """Issue budget: GOAT's saved activations at most 1.25x LoRA's at the same total rank."""
    sizes = {}
    for method in ("lora", "goat"):
        torch.manual_seed(0)
        layer = GOATLinear(nn.Linear(256, 256).to(torch.bfloat16), goat.preset(method, rank=32, alpha=64))
        layer.train()
        x = torch.randn(512, 256, dtype=input_dtype, requires_grad=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            _, sizes[method] = bench.saved_bytes(lambda: layer(x), exclude=list(layer.parameters()))
    assert sizes["goat"] <= 1.25 * sizes["lora"], sizes


def test_a_head_named_like_a_target_stays_a_head():
    model = nn.ModuleDict({"layer": nn.ModuleDict({"dense": nn.Linear(8, 8)}),
                           "classifier": nn.ModuleDict({"dense": nn.Linear(8, 8)})})
    assert goat.add_goat(model, CFG, ["dense"]) == ["layer.dense"]
    with pytest.raises(ValueError, match="matches no module outside"):
        goat.add_goat(nn.ModuleDict({"classifier": nn.Linear(8, 8)}), CFG, ["query"])


def test_a_target_naming_only_a_task_head_says_so():
    model = nn.ModuleDict({"encoder": nn.Linear(8, 8), "classifier": nn.Linear(8, 2)})
    head = r"'classifier' names only excluded modules \(classifier; .*a task head is trained in full, not wrapped"
    with pytest.raises(ValueError, match=head):
        goat.add_goat(model, CFG, ["classifier"])


@pytest.mark.parametrize("seed", [0, 12])  # seeds the old, absolute tolerance refused
def test_an_adapter_replaces_another_on_a_wrapped_bf16_model(seed):
    """Re-loading onto a model already wrapped in bf16: its W0 is rebuilt as W_res + c s B0 A0
    from a rounded W_res, and must still be recognised as the same base."""
    model = trained_nanogpt(torch.bfloat16, seed=seed)
    state = goat.goat_state_dict(model)
    goat.load_goat_state_dict(model, state)  # does not raise
    assert len(goat.goat_layers(model)) == 8


# --- torch.compile, memory and FSDP ------------------------------------------------------------

class GOATBlocks(nn.Module):
    """Two MLP blocks of GOAT layers: the second block's input is bf16 under autocast."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16)) for _ in range(2))

    def forward(self, x):
        for block in self.blocks:
            x = x + block(x)
        return x


@pytest.mark.skipif(TORCH < (2, 6),
                    reason="torch < 2.6 compiles each GOATLinear as a graph of its own (2.2.2, 2.4.1 measured)")
@pytest.mark.parametrize("autocast", [False, True])
def test_training_forward_traces_without_graph_breaks(autocast):
    """--compile: one graph for the training forward and its balance loss (dropout on), in
    float32 and under bf16 autocast, where a bf16 input is also its own low-precision copy."""
    import torch._dynamo
    torch.manual_seed(0)
    model = GOATBlocks()
    goat.add_goat(model, GOATConfig(rank=8, experts=4, top_k=2, dropout=0.1))
    model.train()
    x = torch.randn(4, 5, 16, requires_grad=True)
    torch._dynamo.reset()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        explained = torch._dynamo.explain(lambda v: model(v).float().sum() + goat.balance_loss(model))(x)
    assert explained.graph_break_count == 0, [r.reason for r in explained.break_reasons]
    torch._dynamo.reset()


class PeakBytes(TorchDispatchMode):
    """The peak of the bytes held by tensors that ops create while the mode is on, each
    storage counted once (views and in-place results of inputs add nothing); a tensor
    counts until Python drops it."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self.storages = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        import weakref
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in torch.utils._pytree.tree_flatten((args, kwargs))[0]
                  if isinstance(t, torch.Tensor)}
        for t in torch.utils._pytree.tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            key, size = t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()
            if key in inputs or key in self.storages or not size:
                continue
            self.storages.add(key)
            self.live += size
            self.peak = max(self.peak, self.live)
            weakref.finalize(t, self._free, key, size)
        return out

    def _free(self, key, size):
        self.storages.discard(key)
        self.live -= size


@pytest.mark.parametrize("input_dtype", [torch.float32, torch.bfloat16])
def test_autocast_backward_holds_one_float32_temporary(input_dtype):
    """The autocast path's backward holds dL/dx and at most about one float32 T x n
    temporary (it held about four: 2.9 GB for a LLaMA down_proj at 16k tokens)."""
    T, n = 2048, 256
    torch.manual_seed(0)
    x = torch.randn(T, n).to(input_dtype).requires_grad_(True)
    x_low = None if input_dtype == torch.bfloat16 else x.detach().to(torch.bfloat16)
    A, router = torch.randn(8, n, requires_grad=True), torch.randn(4, n, requires_grad=True)
    mask = torch.rand(T, n) > 0.2
    with torch.autocast("cpu", dtype=torch.bfloat16):
        u, logits = goat._AutocastInput.apply(x, x_low, A, router, mask, 1 / 0.8)
    mode = PeakBytes()
    with mode:
        torch.autograd.backward([u, logits], [torch.randn_like(u), torch.randn_like(logits)])
    returned, temporary = T * n * x.element_size(), T * n * 4
    assert mode.peak <= returned + 1.05 * temporary, (mode.peak / temporary, returned / temporary)


def test_initial_factors_are_frozen_parameters_that_nothing_trains():
    """lora_A0 / lora_B0 are parameters (FSDP shards those, not buffers), frozen
    through add_goat, training, a cast to bf16 and a reload."""
    model = wrapped_nanogpt()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.rsplit(".", 1)[-1] in ("lora_A", "lora_B", "lora_router") for n in trainable)
    layer = model.blocks[0].c_fc
    assert {"lora_A0", "lora_B0"} <= {n for n, _ in layer.named_parameters()}
    assert not any("lora_A0" in n or "lora_B0" in n for n, _ in model.named_buffers())
    assert goat.trainable_parameters(model) == sum(p.numel() for n, p in model.named_parameters() if n in trainable)
    before = layer.lora_A0.detach().clone()
    train(model, lambda step: model(*lm_batch(step)), steps=2, lr=0.05)
    assert torch.equal(layer.lora_A0, before) and layer.lora_A0.grad is None
    state = goat.goat_state_dict(model)
    torch.manual_seed(0)
    fresh = NanoGPT()
    goat.load_goat_state_dict(fresh, state)
    assert {n for n, p in fresh.named_parameters() if p.requires_grad} == trainable
    fresh.to(torch.bfloat16)
    assert fresh.blocks[0].c_fc.lora_B0.dtype == torch.float32 and not fresh.blocks[0].c_fc.lora_B0.requires_grad


def test_fully_shard_shards_the_initial_factors_and_the_adapter_gathers_them():
    """FSDP2 (here one CPU process over gloo): lora_A0 / lora_B0 become sharded tensors like
    every parameter (buffers would stay whole on each GPU), and goat_state_dict gathers them."""
    dist = pytest.importorskip("torch.distributed")
    try:
        from torch.distributed.fsdp import fully_shard
        from torch.distributed.tensor import DTensor
    except ImportError:
        pytest.skip("no FSDP2 in this torch")
    if not dist.is_available() or dist.is_initialized():
        pytest.skip("needs torch.distributed and no process group yet")
    if TORCH < (2, 7):
        pytest.skip("FSDP2 on CPUs needs torch >= 2.7 (pytorch#145935)")
    model = wrapped_nanogpt()
    expected = goat.goat_state_dict(model)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        for block in model.blocks:
            fully_shard(block)
        fully_shard(model)
        layer = model.blocks[0].c_fc
        assert isinstance(layer.lora_A0, DTensor) and isinstance(layer.lora_B0, DTensor)
        assert not layer.lora_A0.requires_grad
        model(*lm_batch(0)).backward()
        state = goat.goat_state_dict(model)
    finally:
        dist.destroy_process_group()
    for key, value in expected.items():
        if isinstance(value, torch.Tensor):
            assert type(state[key]) is torch.Tensor and torch.equal(state[key], value), key


# --- adapters that must be refused, or accepted -------------------------------------------------

@pytest.mark.parametrize("damage,match", [
    (lambda t: t.to(torch.int64), "blocks.1.c_fc.lora_B holds torch.int64 values"),
    (lambda t: t.index_fill(0, torch.tensor([0]), float("nan")), "blocks.1.c_fc.lora_B holds NaN or inf"),
    (lambda t: t.index_fill(0, torch.tensor([0]), float("inf")), "blocks.1.c_fc.lora_B holds NaN or inf"),
])
def test_adapter_tensors_must_be_finite_floats(damage, match):
    state = goat.goat_state_dict(trained_nanogpt())
    state["blocks.1.c_fc.lora_B"] = damage(state["blocks.1.c_fc.lora_B"])
    torch.manual_seed(0)
    fresh = NanoGPT()
    with pytest.raises(ValueError, match=match):
        goat.load_goat_state_dict(fresh, state)
    assert not goat.goat_layers(fresh)  # refused before anything changed


@pytest.mark.parametrize("saved_in", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("model_dtype", [torch.float32, torch.float64])
def test_half_precision_adapter_tensors_are_cast_to_the_layer(saved_in, model_dtype):
    """fp16 / bf16 adapter tensors load as if cast to the layer's dtype beforehand (they
    failed with "Half did not match Double")."""
    full = goat.goat_state_dict(trained_nanogpt())
    lowered = lambda dtype: {k: v.to(saved_in).to(dtype) if ".lora_" in k else v for k, v in full.items()}
    models = []
    for state in (lowered(saved_in), lowered(model_dtype)):  # float32 or float64: the layer's dtype
        torch.manual_seed(0)
        models.append(NanoGPT().to(model_dtype))
        goat.load_goat_state_dict(models[-1], state)
    layer = models[0].blocks[0].c_fc
    assert layer.lora_A.dtype == layer.lora_A0.dtype == model_dtype
    assert torch.equal(outputs(models[0]), outputs(models[1]))


def _with_config(state, config):
    return dict(state, **{goat.CONFIG_KEY: config})


def _edit_layer(state, edit):
    config = json.loads(state[goat.CONFIG_KEY])
    edit(config["layers"]["blocks.0.c_fc"])
    return _with_config(state, json.dumps(config))


@pytest.mark.parametrize("make,match", [
    (lambda s: _with_config(s, "{not json"), "is not JSON"),
    (lambda s: _with_config(s, b"bytes"), "is not JSON"),
    (lambda s: _with_config(s, None), "is not JSON"),
    (lambda s: _with_config(s, "[1, 2]"), "holds no 'layers' table"),
    (lambda s: _with_config(s, '{"layer": {}}'), "holds no 'layers' table"),
    (lambda s: _with_config(s, '{"layers": {"blocks.0.c_fc": 3}}'), "'blocks.0.c_fc' is int, not a table"),
    (lambda s: _edit_layer(s, lambda c: c.pop("scale")), r"missing keys \['scale'\]"),
    (lambda s: _edit_layer(s, lambda c: c.pop("rank")), r"missing keys \['rank'\]"),
    (lambda s: _edit_layer(s, lambda c: c.update(colour="red")), r"unknown keys \['colour'\]"),
    (lambda s: _edit_layer(s, lambda c: c.update(dropout="x")), "'blocks.0.c_fc' is invalid: dropout='x'"),
    (lambda s: _edit_layer(s, lambda c: c.update(scale=[1.0])), r"scale=\[1.0\]; expected one positive"),
    (lambda s: _edit_layer(s, lambda c: c.update(scale=[float("nan")] * 4)), "expected one positive finite"),
    (lambda s: dict(s, **{"blocks.0.c_fc.fingerprint": torch.zeros(5, dtype=torch.float64)}),
     r"fingerprint has shape \(5,\), expected \(18,\)"),
])
def test_a_damaged_adapter_config_is_refused_naming_the_problem(make, match):
    state = make(goat.goat_state_dict(trained_nanogpt()))
    torch.manual_seed(0)
    fresh = NanoGPT()
    with pytest.raises(ValueError, match=match):
        goat.load_goat_state_dict(fresh, state)
    assert not goat.goat_layers(fresh)


# --- hostile use, round two ----------------------------------------------------------------------

def test_zero_tokens_add_no_balance_loss():
    model = wrapped_nanogpt()
    idx, targets = lm_batch(0)
    model(idx, targets)
    goat.balance_loss(model)
    model(idx[:, :0])  # an empty batch: no token routed
    assert goat.balance_loss(model).item() == 0 and goat.expert_load(model) == {}
    model(idx, targets)
    assert torch.isfinite(goat.balance_loss(model)) and goat.expert_load(model)


def test_remove_goat_refuses_an_upcycled_moe():
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))
    goat.add_upcycled_moe(model, 4, 2)
    with pytest.raises(ValueError, match="0 .*is an upcycled MoE: .*cannot be turned back into one nn.Linear"):
        goat.remove_goat(model)
    assert isinstance(model[0], goat.UpcycledMoE)


def test_one_linear_under_two_names_is_refused_naming_both():
    shared = nn.Linear(8, 8)
    model = nn.ModuleDict({"encoder": shared, "decoder": shared, "head": nn.Linear(8, 2)})
    why = "registered under 2 names \\(encoder, decoder\\): wrapping one name would leave the others"
    with pytest.raises(ValueError, match="decoder: GOAT cannot wrap it: this one nn.Linear is " + why):
        goat.add_goat(model, CFG, ["decoder"])
    with pytest.raises(ValueError, match="found no nn.Linear to wrap .*" + why):
        goat.add_goat(model, CFG, exclude=("head",))
    tied = nn.ModuleDict({"encoder": nn.Linear(8, 8), "decoder": nn.Linear(8, 8)})
    tied.decoder.weight = tied.encoder.weight  # a weight shared by two modules stays "tied"
    with pytest.raises(ValueError, match="decoder: GOAT cannot wrap it: its weight is tied"):
        goat.add_goat(tied, CFG, ["decoder"])


@pytest.mark.parametrize("alpha", [float("nan"), float("inf"), 0.0, -2.0, "16"])
def test_a_bad_alpha_is_refused_even_where_the_scaling_ignores_it(alpha):
    with pytest.raises(ValueError, match=f"alpha={alpha!r} must be a positive finite number"):
        GOATConfig(scaling="paper", alpha=alpha)
    GOATConfig(scaling="paper", alpha=None)  # not given: fine where it is not used


@pytest.mark.parametrize("kwargs", [
    dict(init="svd"), dict(scaling="big"), dict(scaling="alpha"), dict(rank=0), dict(rank=10, experts=4),
    dict(top_k=9), dict(eta=-1.0), dict(rho=float("nan")), dict(alpha=float("nan")), dict(dropout=1.0),
    dict(init_cof=-1.0), dict(segments=3), dict(segment=9), dict(init="lora", per_expert_scale=True),
])
def test_config_messages_start_with_the_field_and_its_value(kwargs):
    """train.py's flag checks delegate to GOATConfig and print its messages as --field=value."""
    with pytest.raises(ValueError) as refused:
        GOATConfig(**kwargs)
    field, _, value = str(refused.value).split()[0].partition("=")
    assert field in {f.name for f in dataclasses.fields(GOATConfig)} and value, str(refused.value)


def test_new_layers_take_the_training_mode_of_the_linears_they_wrap():
    """An eval-mode model stays deterministic after add_goat and after loading an adapter
    (dropout in a new layer left in training mode would change every call)."""
    state = goat.goat_state_dict(trained_nanogpt())
    cfg = dataclasses.replace(CFG, dropout=0.5)
    for load in (lambda m: goat.add_goat(m, cfg), lambda m: goat.load_goat_state_dict(m, state)):
        torch.manual_seed(0)
        model = NanoGPT().eval()
        load(model)
        assert not any(layer.training for _, layer in goat.goat_layers(model))
        torch.testing.assert_close(outputs(model), outputs(model), rtol=0, atol=0)
    model = NanoGPT().train()
    goat.add_goat(model, cfg)
    assert all(layer.training for _, layer in goat.goat_layers(model))


class DoubledLinear(nn.Linear):
    def forward(self, x):
        return 2.0 * super().forward(x)


class PlainSubclass(nn.Linear):
    pass


class MatmulLinear(nn.Linear):
    """A forward of its own that still computes x W^T + b (as transformers' FalconLinear)."""
    def forward(self, x):
        return x @ self.weight.T + self.bias


class TupleLinear(nn.Linear):
    def forward(self, x):
        return super().forward(x), None


def test_linears_whose_output_goat_cannot_reproduce_are_left_alone_and_named():
    """A subclass whose forward is not W x + b (probed), and a parametrized weight: skipped
    by "all-linear", refused by name (GOAT writes W_res into a plain weight and relies on
    the layer computing W_res x + b); a subclass whose own forward is W x + b is wrapped."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # the legacy weight_norm, still in use
        legacy = nn.utils.weight_norm(nn.Linear(32, 32))
    model = nn.Sequential(nn.Linear(32, 32), DoubledLinear(32, 32), PlainSubclass(32, 32),
                          nn.utils.parametrizations.spectral_norm(nn.Linear(32, 32)), legacy,
                          MatmulLinear(32, 32), nn.Sequential(TupleLinear(32, 32)))
    why = goat.unwrappable_linears(model)
    assert "parametrization" in why["3"] and "parametrization" in why["4"]
    assert "does not compute W x + b" in why["1"] and "does not compute W x + b" in why["6.0"]
    assert not {"0", "2", "5"} & set(why)
    with pytest.raises(ValueError, match="1: GOAT cannot wrap it: its class DoubledLinear has a forward of its own "
                                         "that does not compute W x"):
        goat.add_goat(model, CFG, targets=["1"])
    assert goat.add_goat(model, CFG) == ["0", "2", "5"]
    quantised = type("Int8Linear", (MatmulLinear,), {})(4, 4)
    quantised.weight = nn.Parameter(torch.zeros(4, 4, dtype=torch.int8), requires_grad=False)
    with pytest.raises(ValueError, match="q: weight dtype torch.int8 is integer or quantised"):
        goat.add_goat(nn.Sequential(OrderedDict(q=quantised)), CFG, targets=["q"])


def test_a_refusal_in_any_target_changes_nothing_and_names_the_head():
    """The last Linear (3 outputs, a user's own head not named like one) cannot hold rank
    8: nothing is wrapped or rewritten, and the message says how to leave it out."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 32), nn.Linear(32, 3))
    x = torch.randn(4, 32)
    expected = model(x)
    with pytest.raises(ValueError, match=r"3: rank 8 exceeds min\(out=3, in=32\); lower the rank, or, if it is a "
                                         r"task head .*exclude=goat.DEFAULT_EXCLUDE \+ \('3',\)"):
        goat.add_goat(model, CFG)
    assert not goat.goat_layers(model) and all(p.requires_grad for p in model.parameters())
    torch.testing.assert_close(model(x), expected, rtol=0, atol=0)
    assert goat.add_goat(model, CFG, exclude=goat.DEFAULT_EXCLUDE + ("3",)) == ["0", "2"]
    nested = nn.Sequential(nn.Sequential(nn.Linear(32, 32), nn.Linear(32, 32), nn.Linear(32, 32)),
                           nn.Sequential(nn.Linear(32, 32), nn.Linear(32, 32), nn.Linear(32, 3)))
    with pytest.raises(ValueError, match=r"exclude=goat.DEFAULT_EXCLUDE \+ \('1.2',\)"):
        goat.add_goat(nested, CFG)
    assert len(goat.add_goat(nested, CFG, exclude=goat.DEFAULT_EXCLUDE + ("1.2",))) == 5  # that head alone


def test_factors_for_another_model_are_refused_before_anything_changes():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 32), nn.Linear(32, 32), nn.Linear(32, 32))
    other = nn.Sequential(nn.Linear(32, 32), nn.Linear(32, 48), nn.Linear(48, 32))
    factors = goat.initial_factors(other, CFG, ["0", "1", "2"])
    x = torch.randn(4, 32)
    expected = model(x)
    with pytest.raises(ValueError, match=r"1: its factors hold A0 \(8, 32\) and B0 \(48, 8\)"):
        goat.add_goat(model, CFG, factors=factors)
    assert not goat.goat_layers(model)
    torch.testing.assert_close(model(x), expected, rtol=0, atol=0)


def test_training_a_model_left_in_eval_mode_warns_that_the_balance_loss_reaches_no_router():
    torch.manual_seed(0)
    model = NanoGPT().eval()  # as from_pretrained returns it
    goat.add_goat(model, CFG)
    model(*lm_batch(0))  # a training step's forward, autograd on, but in eval mode
    with pytest.warns(UserWarning, match=r"8 routed layers \(e.g. blocks.0.c_attn\) ran in eval mode"):
        assert not goat.balance_loss(model).requires_grad
    model.train()
    model(*lm_batch(0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert goat.balance_loss(model).requires_grad
    with torch.no_grad():  # an evaluation forward: nothing to warn about
        model.eval()(*lm_batch(0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        goat.balance_loss(model)


def test_add_goat_refuses_clearly_what_is_not_a_model_and_a_config():
    with pytest.raises(ValueError, match="the model is itself an nn.Linear.*goat.GOATLinear"):
        goat.add_goat(nn.Linear(16, 16), CFG)
    with pytest.raises(TypeError, match="cfg is str, not a GOATConfig"):
        goat.add_goat(NanoGPT(), "goat")


def test_a_single_excluded_name_is_a_name_not_its_letters():
    model = nn.Sequential(OrderedDict(h=nn.Linear(32, 32), lm_head=nn.Linear(32, 50)))  # "h" is in "lm_head"
    assert goat.add_goat(model, CFG, exclude="lm_head") == ["h"]


def test_a_wrapped_linear_keeps_its_feature_counts():
    layer = GOATLinear(nn.Linear(48, 16), CFG)
    assert (layer.in_features, layer.out_features) == (48, 16)
