"""Property tests of goat.py: the paper's theory (SPEC section 4), the layer against
slow oracles, injection, adapters and bad input. Shapes, ranks, experts, k and
seeds are drawn by hypothesis (never raw floats: they make top-k ties); float64
wherever an identity is claimed to be exact."""
import copy
import io
import math

import pytest
import torch
import torch.nn as nn
from hypothesis import given, strategies as st

import goat
from goat import GOATConfig, GOATLinear, UpcycledMoE

EXACT = dict(rtol=1e-9, atol=1e-10)  # float64 identities


@st.composite
def layer_setups(draw, inits=goat.INITS, max_experts=4):
    """A GOAT config and a Linear shape on which it is valid."""
    experts = draw(st.sampled_from([e for e in (1, 2, 4, 8) if e <= max_experts]))
    d = draw(st.integers(1, 3))
    init = draw(st.sampled_from(inits))
    m = draw(st.integers(experts * d, 40))
    n = draw(st.integers(experts * d, 40))
    scaling = draw(st.sampled_from(["paper", "adam", "alpha", "rslora", 2.5]))
    per_expert = init in goat.SVD_INITS and scaling != "adam" and draw(st.booleans())  # GOAT-s
    cfg = GOATConfig(rank=experts * d, experts=experts, top_k=draw(st.integers(1, experts)),
                     init=init, scaling=scaling, per_expert_scale=per_expert,
                     alpha=draw(st.sampled_from([4.0, 16.0])), eta=draw(st.sampled_from([1.0, 0.1])),
                     rho=draw(st.sampled_from([1.0, 10.0])), dropout=0.0,
                     init_cof=draw(st.sampled_from([None, 1.0, 0.5])))
    return cfg, m, n, draw(st.integers(0, 2**31 - 1)), draw(st.booleans())


def make_layer(cfg, m, n, seed, bias=True, dtype=torch.float64, train_factors=True):
    """A GOATLinear on a random Linear; with train_factors, A, B and the router are
    moved off their init so no identity holds by accident of B = 0."""
    torch.manual_seed(seed)
    base = nn.Linear(n, m, bias=bias).to(dtype)
    W0 = base.weight.detach().clone()
    layer = GOATLinear(base, cfg)
    if train_factors:
        with torch.no_grad():
            for p in layer.parameters():
                if p.requires_grad:
                    p.add_(0.3 * p.abs().mean().clamp_min(0.1) * torch.randn_like(p))
    return layer, W0


def expert_slices(layer):
    d = layer.expert_rank
    return [slice(i * d, (i + 1) * d) for i in range(layer.experts)]


def per_token_oracle(layer, x):
    """Slowest, most obvious form: for each token, softmax, pick top-k, renormalise,
    add each chosen expert's s B_i A_i x."""
    xs = x.reshape(-1, x.shape[-1])
    rows = []
    for t in range(xs.shape[0]):
        xt = xs[t]
        y = layer.base.weight @ xt + (layer.base.bias if layer.base.bias is not None else 0)
        scales = layer.expert_scales()
        if layer.lora_router is None:
            y = y + scales[0] * layer.lora_B @ (layer.lora_A @ xt)
        else:
            p = torch.softmax(layer.lora_router @ xt, dim=0)
            top = sorted(range(layer.experts), key=lambda i: -p[i].item())[:layer.top_k]
            total = sum(p[i] for i in top)
            for i in top:
                sl = expert_slices(layer)[i]
                y = y + (p[i] / total) * scales[i] * layer.lora_B[:, sl] @ (layer.lora_A[sl] @ xt)
        rows.append(y)
    return torch.stack(rows).view(*x.shape[:-1], -1)


def grads_of(module, fn, x, dy):
    module.zero_grad()
    (fn(x) * dy).sum().backward()
    return {name: p.grad.clone() for name, p in module.named_parameters() if p.requires_grad}


# --- SPEC 4.1: SVD initialisation ------------------------------------------------

@given(layer_setups(inits=goat.SVD_INITS))
def test_svd_init_gives_each_expert_its_singular_triplets(setup):
    cfg, m, n, seed, _ = setup
    layer, W0 = make_layer(cfg, m, n, seed, train_factors=False)
    U, S, Vh = torch.linalg.svd(W0, full_matrices=False)
    h, d, t = min(m, n), cfg.expert_rank, min(m, n) // cfg.experts
    if cfg.init == "goat_random":  # random, so read back: d sorted components per expert
        drawn = goat.svd_indices(cfg.init, h, cfg.rank, cfg.experts, generator=goat._random_generator("layer"))
        expected = [sorted(drawn[i * d:(i + 1) * d]) for i in range(cfg.experts)]
        assert [j for idx in expected for j in idx] == drawn
    else:
        expected = {  # SPEC section 2, written out independently of goat.svd_indices
            "goat": [list(range(i * t, i * t + d)) for i in range(cfg.experts)],
            "goat_mini": [list(range((i + 1) * t - d, (i + 1) * t)) for i in range(cfg.experts)],
            "pissa": [list(range(i * d, (i + 1) * d)) for i in range(cfg.experts)],
            "milora": [list(range(h - cfg.rank + i * d, h - cfg.rank + (i + 1) * d)) for i in range(cfg.experts)],
        }[cfg.init]
    flat = [j for idx in expected for j in idx]
    assert len(set(flat)) == len(flat) and all(0 <= j < h for j in flat)  # disjoint, in range
    if cfg.init != "goat_random":
        assert goat.svd_indices(cfg.init, h, cfg.rank, cfg.experts) == flat
    slices, scales = expert_slices(layer), layer.expert_scales()
    for i, idx in enumerate(expected):
        A_i, B_i = layer.lora_A[slices[i]].detach(), layer.lora_B[:, slices[i]].detach()
        target = U[:, idx] @ torch.diag(S[idx]) @ Vh[idx] / cfg.rho
        torch.testing.assert_close(scales[i] * B_i @ A_i, target, **EXACT)
        for j in range(i + 1, cfg.experts):  # experts are orthogonal to each other
            A_j, B_j = layer.lora_A[slices[j]].detach(), layer.lora_B[:, slices[j]].detach()
            torch.testing.assert_close(A_i @ A_j.T, torch.zeros(d, d, dtype=A_i.dtype), atol=1e-10, rtol=0)
            torch.testing.assert_close(B_i.T @ B_j, torch.zeros(d, d, dtype=A_i.dtype), atol=1e-10, rtol=0)


def authors_goat_init(weight, rank, experts, scaling, rho, init_cof):
    """The authors' svd_init for init_type 'goat' (Facico/GOAT-PEFT, layer.py),
    restated: float32 SVD, E pieces of each factor concatenated, S / (s rho)."""
    V, S, Uh = torch.linalg.svd(weight.float(), full_matrices=False)
    vlen, mlen = V.shape[-1] // experts, rank // experts
    Vr = torch.cat([V[:, i * vlen:i * vlen + mlen] for i in range(experts)], dim=1)
    Sr = torch.cat([S[i * vlen:i * vlen + mlen] for i in range(experts)]) / (scaling * rho)
    Uhr = torch.cat([Uh[i * vlen:i * vlen + mlen] for i in range(experts)], dim=0)
    A, B = torch.diag(torch.sqrt(Sr)) @ Uhr, Vr @ torch.diag(torch.sqrt(Sr))
    return A, B, weight - init_cof * scaling * B @ A


@pytest.mark.parametrize("shape", [(96, 80), (64, 128)])
def test_matches_authors_reference_init_and_loop(shape):
    torch.manual_seed(0)
    base = nn.Linear(shape[1], shape[0])
    W0 = base.weight.detach().clone()
    cfg = GOATConfig(rank=32, experts=8, top_k=2, init="goat", scaling="alpha", alpha=64,
                     rho=10, init_cof=1 / 8, dropout=0.0)
    layer = GOATLinear(base, cfg)
    assert layer.scaling == 64 / 4
    A, B, W_res = authors_goat_init(W0, 32, 8, 16.0, 10.0, 1 / 8)
    torch.testing.assert_close(layer.lora_A.detach(), A, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(layer.lora_B.detach(), B, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(layer.base.weight.detach(), W_res, rtol=1e-5, atol=1e-6)
    x, dy = torch.randn(4, 7, shape[1]), torch.randn(4, 7, shape[0])
    dense, loop = grads_of(layer, layer, x, dy), grads_of(layer, lambda v: goat.moe_loop_forward(layer, v), x, dy)
    torch.testing.assert_close(layer(x), goat.moe_loop_forward(layer, x), rtol=1e-5, atol=1e-5)
    for name in dense:
        torch.testing.assert_close(dense[name], loop[name], rtol=1e-4, atol=1e-5)


def test_svd_on_another_device_gives_the_same_factors():
    torch.manual_seed(10)
    base = nn.Linear(40, 32)
    cfg = GOATConfig(rank=8, experts=4, dropout=0.0)
    here, there = GOATLinear(copy.deepcopy(base), cfg), GOATLinear(copy.deepcopy(base), cfg, svd_device="cpu")
    for name in ("lora_A0", "lora_B0"):
        torch.testing.assert_close(getattr(here, name), getattr(there, name))
    torch.testing.assert_close(here.base.weight, there.base.weight)


def test_random_inits_are_drawn_on_the_cpu_whatever_the_device():
    """One seed, the same initial LoRA A and routers on any device and with or without FSDP
    (whose model is still on the CPU when add_goat runs): both are drawn from the global CPU
    generator, then moved. A meta weight stands in for a GPU: a draw made there would leave
    the CPU generator untouched."""
    cfg = goat.preset("molora", rank=8, experts=4, alpha=16)
    weight = torch.randn(12, 16)
    for draw in (lambda device: goat.init_factors(weight.to(device), cfg)[0],  # LoRA's A
                 lambda device: goat.linear_init(4, 16, torch.float32, device)):  # a router
        torch.manual_seed(0)
        draw("cpu")
        after_cpu = torch.get_rng_state()
        torch.manual_seed(0)
        assert draw("meta").is_meta
        assert torch.equal(torch.get_rng_state(), after_cpu)  # the same draw, made on the CPU
    torch.manual_seed(0)
    A_cpu = goat.init_factors(weight, cfg)[0]
    router_cpu = goat.linear_init(4, 16, torch.float32, "cpu")
    base = nn.Linear(16, 12)
    torch.manual_seed(0)  # and they are the layer's: A first, then the router
    layer = GOATLinear(base, cfg)
    assert torch.equal(layer.lora_A0, A_cpu) and torch.equal(layer.lora_router, router_cpu)


# --- SPEC 4.2: the residual (Thm 3.4) ---------------------------------------------

@given(layer_setups(inits=goat.SVD_INITS))
def test_residual_plus_uniform_average_of_experts_is_w0(setup):
    cfg, m, n, seed, _ = setup
    layer, W0 = make_layer(cfg, m, n, seed, train_factors=False)
    total = sum(s_i * layer.lora_B[:, sl].detach() @ layer.lora_A[sl].detach()  # sum_i s_i B_i A_i
                for s_i, sl in zip(layer.expert_scales(), expert_slices(layer)))
    torch.testing.assert_close(layer.base.weight + cfg.cof * total, W0, **EXACT)
    if cfg.init_cof is None:  # default c = 1/E: the router-averaged equivalent weight is W0
        torch.testing.assert_close(layer.base.weight + total / cfg.experts, W0, **EXACT)


@pytest.mark.parametrize("method", ["pissa", "milora"])
def test_single_expert_with_c_one_reproduces_w0(method):
    torch.manual_seed(1)
    base = nn.Linear(24, 20).double()
    W0 = base.weight.detach().clone()
    layer = GOATLinear(base, goat.preset(method, rank=4, alpha=8, dropout=0.0))
    torch.testing.assert_close(layer.base.weight + layer.scaling * layer.lora_B @ layer.lora_A, W0, **EXACT)


def test_uniform_router_with_all_experts_reproduces_base_output():
    """k = E and a zero router give gate 1/E for every expert: y = W0 x exactly."""
    torch.manual_seed(2)
    base = nn.Linear(32, 24).double()
    reference = copy.deepcopy(base)
    layer = GOATLinear(base, GOATConfig(rank=8, experts=4, top_k=4, dropout=0.0))
    with torch.no_grad():
        layer.lora_router.zero_()
    x = torch.randn(5, 32, dtype=torch.float64)
    torch.testing.assert_close(layer(x), reference(x), **EXACT)


# --- SPEC 4.3: gradients equal those of the upcycled full MoE ------------------------

@given(layer_setups(max_experts=8))
def test_gradients_equal_upcycled_full_moe(setup):
    cfg, m, n, seed, bias = setup
    layer, _ = make_layer(cfg, m, n, seed, bias=bias)
    scales, slices = layer.expert_scales(), expert_slices(layer)
    moe = UpcycledMoE(copy.deepcopy(layer.base), max(cfg.experts, 1), cfg.top_k)
    with torch.no_grad():  # W^i = W~^i = W_res + s_i B_i A_i, same router
        for i, sl in enumerate(slices):
            moe.weight[i] = layer.base.weight + scales[i] * layer.lora_B[:, sl] @ layer.lora_A[sl]
        if layer.lora_router is not None:
            moe.router.copy_(layer.lora_router)
    x = torch.randn(3, 5, n, dtype=torch.float64)
    dy = torch.randn(3, 5, m, dtype=torch.float64)
    torch.testing.assert_close(layer(x), moe(x), **EXACT)
    g_lora, g_moe = grads_of(layer, layer, x, dy), grads_of(moe, moe, x, dy)
    for i, sl in enumerate(slices):
        g_i, s = g_moe["weight"][i], scales[i]
        torch.testing.assert_close(g_lora["lora_A"][sl], s * layer.lora_B[:, sl].detach().T @ g_i, **EXACT)
        torch.testing.assert_close(g_lora["lora_B"][:, sl], s * g_i @ layer.lora_A[sl].detach().T, **EXACT)
    if layer.lora_router is not None:
        torch.testing.assert_close(g_lora["lora_router"], g_moe["router"], **EXACT)


# --- SPEC 4.4: Lemma 2.2 by finite difference ---------------------------------------

@given(layer_setups(max_experts=8), st.sampled_from([1e-3, 1e-4]))
def test_sgd_step_changes_each_expert_as_lemma_2_2(setup, mu):
    cfg, m, n, seed, _ = setup
    layer, _ = make_layer(cfg, m, n, seed)
    scales, slices = layer.expert_scales(), expert_slices(layer)
    x = torch.randn(6, n, dtype=torch.float64)
    dy = torch.randn(6, m, dtype=torch.float64)
    grads = grads_of(layer, layer, x, dy)
    if layer.lora_router is None:
        gate = torch.ones(6, 1, dtype=torch.float64)
    else:
        gate = goat.route(x, layer.lora_router.detach(), cfg.top_k)[2].double()
    A, B = layer.lora_A.detach(), layer.lora_B.detach()
    A1, B1 = A - mu * grads["lora_A"], B - mu * grads["lora_B"]
    for i, sl in enumerate(slices):
        g_i, s = (gate[:, i:i + 1] * dy).T @ x, scales[i]  # dL/dW~^i of the full MoE
        change = s * B1[:, sl] @ A1[sl] - s * B[:, sl] @ A[sl]
        first_order = -mu * s**2 * (B[:, sl] @ B[:, sl].T @ g_i + g_i @ A[sl].T @ A[sl])
        # what remains is exactly second order: mu^2 s dB_i dA_i
        second_order = mu**2 * s * grads["lora_B"][:, sl] @ grads["lora_A"][sl]
        torch.testing.assert_close(change - first_order, second_order, rtol=1e-6, atol=1e-12)


# --- SPEC 4.5: Thm 3.5, the scaling factor --------------------------------------------

@pytest.mark.parametrize("eta", [1.0, 0.1])
def test_scaling_factor_aligns_first_step_with_full_finetuning(eta):
    torch.manual_seed(3)
    n, m, d, draws, mu = 48, 16, 4, 800, 1e-2
    cfg = GOATConfig(rank=d, experts=1, top_k=1, init="lora", scaling="paper", eta=eta, dropout=0.0)
    assert math.isclose(goat.scaling_factor(n, d, eta), math.sqrt(3 * eta * n / d))
    x, dy = torch.randn(10, n, dtype=torch.float64), torch.randn(10, m, dtype=torch.float64)
    g = dy.T @ x  # dL/dW for full fine-tuning
    gram, update = torch.zeros(n, n, dtype=torch.float64), torch.zeros(m, n, dtype=torch.float64)
    for _ in range(draws):
        layer = GOATLinear(nn.Linear(n, m).double(), cfg)
        s, A0 = layer.scaling, layer.lora_A.detach().clone()
        gram += s**2 * A0.T @ A0 / draws
        grads = grads_of(layer, layer, x, dy)
        B1, A1 = -mu * grads["lora_B"], A0 - mu * grads["lora_A"]
        update += s * B1 @ A1 / draws  # equivalent-weight change of one SGD step (B0 = 0)
    # E[s^2 A0^T A0] = eta I; entries' sampling error is ~eta / sqrt(d draws) ~ 0.018 eta
    assert (gram - eta * torch.eye(n, dtype=torch.float64)).abs().max() < 0.1 * eta
    assert abs(gram.diagonal().mean() - eta) < 0.02 * eta
    rel = (update - (-mu * eta * g)).norm() / (mu * eta * g).norm()
    assert rel < 0.2, rel  # measured about 0.09 at 800 draws


def sgd_trajectories(mu, eta=0.5, misscale=1.0, steps=20, experts=2, top_k=2, m=6, n=5, seed=0):
    """A LoRA MoE (expert rank d = n, B0 = 0, A0 orthogonal with s^2 A0^T A0 = misscale^2 eta I)
    and the upcycled full MoE, the same router, the same batches, SGD at mu and eta mu.
    Returns (max over experts of ||W~_i - W_i|| / ||W_i - W0||, same top-k at every step)."""
    torch.manual_seed(seed)
    base = nn.Linear(n, m).double()
    W0 = base.weight.detach().clone()
    moe = UpcycledMoE(copy.deepcopy(base), experts, top_k)
    moe.bias.requires_grad_(False)  # the LoRA MoE's bias is frozen too
    cfg = GOATConfig(rank=experts * n, experts=experts, top_k=top_k, init="lora", eta=eta, dropout=0.0)
    layer = GOATLinear(base, cfg)
    with torch.no_grad():
        Q = torch.cat([torch.linalg.qr(torch.randn(n, n, dtype=torch.float64))[0] for _ in range(experts)])
        A0 = misscale * math.sqrt(eta) / layer.scaling * Q
        layer.lora_A.copy_(A0)
        layer.lora_A0.copy_(A0)  # B0 = 0: W_res = W0 whatever A0 is
        layer.lora_router.copy_(moe.router)
    lora_opt = torch.optim.SGD([{"params": [layer.lora_A, layer.lora_B], "lr": mu},
                                {"params": [layer.lora_router], "lr": eta * mu}])
    full_opt = torch.optim.SGD([moe.weight, moe.router], lr=eta * mu)
    same_routes = True
    for _ in range(steps):
        x, target = torch.randn(16, n, dtype=torch.float64), torch.randn(16, m, dtype=torch.float64)
        for module, optimizer in ((layer, lora_opt), (moe, full_opt)):
            loss = 0.5 * (module(x) - target).square().sum(-1).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        same_routes &= torch.equal(layer._chosen, moe._chosen)
    with torch.no_grad():
        gaps = [float((layer.base.weight + layer.scaling * layer.lora_B[:, sl] @ layer.lora_A[sl] - moe.weight[i]).norm()
                      / (moe.weight[i] - W0).norm()) for i, sl in enumerate(expert_slices(layer))]
    return max(gaps), same_routes


def test_lora_moe_follows_the_full_moe_over_many_sgd_steps():
    """Thm. 3.2 / 3.5 over T = 20 steps. By Lemma 2.2 with B0 = 0 and s^2 A0^T A0 = eta I,
    each step moves W~_i by -eta mu g_i + O(mu^2), the full MoE's step at eta mu; so the
    relative gap ||W~_i - W_i|| / ||W_i - W0|| vanishes with mu. Checked: the same top-k
    at every step, the gap below 10% at mu = 0.025 (mu T = 0.5; measured 6%) and at least halving when mu
    halves; a scale off by 2 (s^2 A0^T A0 = 4 eta I) keeps it above 1 (it tends to 2^2 - 1)."""
    gaps = []
    for mu in (0.05, 0.025, 0.0125):
        gap, same_routes = sgd_trajectories(mu)
        assert same_routes
        gaps.append(gap)
    assert gaps[1] < 0.10, gaps
    assert gaps[1] < gaps[0] / 2 and gaps[2] < gaps[1] / 2, gaps
    assert sgd_trajectories(0.0125, misscale=2.0)[0] > 1.0


# --- Beyond the paper: the scale under Adam, GOAT-s, random segments, one segment -------

def equivalent_step_rms(cfg, lr, m=96, n=64, tokens=256, seed=0):
    """RMS of each expert's equivalent-weight change s_i (B_i A_i)' - s_i B_i A_i after one
    Adam step on a random loss, in units of lr (full fine-tuning at eta lr: eta)."""
    torch.manual_seed(seed)
    layer = GOATLinear(nn.Linear(n, m).double(), cfg)
    optimizer = torch.optim.Adam([layer.lora_A, layer.lora_B], lr=lr)
    products = lambda: [s * layer.lora_B[:, sl].detach() @ layer.lora_A[sl].detach()
                        for s, sl in zip(layer.expert_scales(), expert_slices(layer))]
    before = products()
    x, dy = torch.randn(tokens, n, dtype=torch.float64), torch.randn(tokens, m, dtype=torch.float64)
    (layer(x) * dy).sum().backward()
    optimizer.step()
    return [float((a - b).square().mean().sqrt()) / lr for a, b in zip(products(), before)]


@pytest.mark.parametrize("init", ["goat", "goat_mini", "goat_random", "pissa", "milora", "lora"])
@pytest.mark.parametrize("eta", [1.0, 0.1])
def test_adam_scale_gives_each_expert_the_rms_step_of_full_finetuning(init, eta):
    """adam_scaling_factor: under Adam each expert's equivalent weight moves by an RMS of
    eta * lr in its first step, as a full expert at eta * lr does, whatever the init and
    segment. Bound: within 15% (the derivation drops the cross term of dB A and B dA,
    which has random signs, and second-order terms, small at lr 1e-5)."""
    cfg = GOATConfig(rank=16, experts=4, top_k=2, init=init, scaling="adam", eta=eta, dropout=0.0)
    ratios = [r / eta for r in equivalent_step_rms(cfg, lr=1e-5)]
    assert all(0.85 < r < 1.15 for r in ratios), ratios
    if init != "lora":  # the paper's SGD scale does not: its step depends on eta, the init and the segment
        paper = equivalent_step_rms(GOATConfig(rank=16, experts=4, top_k=2, init=init, eta=eta, dropout=0.0), 1e-5)
        assert max(abs(r / eta - 1) for r in paper) > 0.15, paper


def test_adam_scale_formula():
    assert math.isclose(goat.adam_scaling_factor(96, 64, eta=0.5, d=4), 0.5 * math.sqrt(3 * 64 / 4))
    assert math.isclose(goat.adam_scaling_factor(96, 64, eta=0.5, sigma_sum=3.0, rho=10),
                        0.25 * 96 * 64 * 10 / (160 * 3.0))


def test_goat_s_gives_every_expert_the_same_s_squared_sigma():
    """GOAT-s (Appendix E): expert 1 keeps GOAT's s, s_i^2 sigma_i is the same for all
    (sigma_i: the sum of expert i's singular values)."""
    torch.manual_seed(4)
    base = nn.Linear(40, 48).double()
    W0 = base.weight.detach().clone()
    cfg = GOATConfig(rank=8, experts=4, top_k=2, per_expert_scale=True, dropout=0.0)
    layer = GOATLinear(base, cfg)
    S = torch.linalg.svdvals(W0)
    sigma = [float(S[i * 10:i * 10 + 2].sum()) for i in range(4)]  # segments of 40 / 4 = 10, d = 2
    scales = layer.expert_scales()
    assert math.isclose(scales[0], goat.scaling_factor(40, 2, 1.0))
    products = [s ** 2 * x for s, x in zip(scales, sigma)]
    assert max(products) - min(products) < 1e-9 * max(products)
    assert scales == sorted(scales)  # weaker segments, larger scales


def test_random_segments_follow_the_seed_and_the_layer():
    draw = lambda seed, name: (torch.manual_seed(seed), goat.svd_indices(
        "goat_random", 40, 8, 4, generator=goat._random_generator(name)))[1]
    assert draw(0, "a") == draw(0, "a")
    assert draw(0, "a") != draw(1, "a") and draw(0, "a") != draw(0, "b")
    assert len(set(draw(0, "a"))) == 8 and draw(0, "a") != goat.svd_indices("goat", 40, 8, 4)


def test_one_segment_takes_the_top_of_that_segment():
    torch.manual_seed(5)
    W = torch.randn(48, 40, dtype=torch.float64)
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    for j in range(4):
        cfg = GOATConfig(rank=6, experts=1, top_k=1, segments=4, segment=j, init_cof=1.0, rho=1.0, scaling=2.0)
        A, B, s = goat.init_factors(W, cfg)
        idx = list(range(j * 10, j * 10 + 6))
        torch.testing.assert_close(s * B @ A, U[:, idx] @ torch.diag(S[idx]) @ Vh[idx], **EXACT)
    with pytest.raises(ValueError, match="segment"):
        GOATConfig(rank=8, experts=4, segment=1)


# --- SPEC 4.6: Lemma 3.3 ----------------------------------------------------------------

@pytest.mark.parametrize("experts,k", [(4, 1), (8, 2), (8, 3)])
def test_iid_logits_give_expected_gate_one_over_e(experts, k):
    torch.manual_seed(4)
    logits = torch.randn(40000, experts)  # routed with router = I: the logits are the input
    _, _, gate = goat.route(logits, torch.eye(experts), k)
    assert (gate.mean(dim=0) - 1 / experts).abs().max() < 0.01


# --- SPEC 4.7: dense path against oracles; gradcheck; no missing grads ------------------

@given(layer_setups(max_experts=8), st.sampled_from([(7,), (2, 3), (2, 1, 3)]))
def test_dense_forward_and_gradients_equal_loop_oracles(setup, lead):
    cfg, m, n, seed, bias = setup
    layer, _ = make_layer(cfg, m, n, seed, bias=bias)
    x = torch.randn(*lead, n, dtype=torch.float64)
    dy = torch.randn(*lead, m, dtype=torch.float64)
    y = layer(x)
    assert y.shape == (*lead, m)
    torch.testing.assert_close(y, per_token_oracle(layer, x), **EXACT)
    dense = grads_of(layer, layer, x, dy)
    for oracle in (lambda v: per_token_oracle(layer, v), lambda v: goat.moe_loop_forward(layer, v)):
        torch.testing.assert_close(oracle(x), y, **EXACT)
        slow = grads_of(layer, oracle, x, dy)
        assert slow.keys() == dense.keys()
        for name in dense:
            torch.testing.assert_close(dense[name], slow[name], **EXACT)


@given(layer_setups(max_experts=8))
def test_dropout_path_equals_loop_with_the_same_mask(setup):
    """With dropout on, the layer takes its unfused path (one shared mask, clean router
    input); the loop oracle draws the same mask from the same seed."""
    cfg, m, n, seed, bias = setup
    cfg = GOATConfig(**{**cfg.__dict__, "dropout": 0.3})
    layer, _ = make_layer(cfg, m, n, seed, bias=bias)
    x, dy = torch.randn(2, 5, n, dtype=torch.float64), torch.randn(2, 5, m, dtype=torch.float64)

    def seeded(fn):
        def run(v):
            torch.manual_seed(seed)
            return fn(v)
        return run
    dense, loop = seeded(layer), seeded(lambda v: goat.moe_loop_forward(layer, v))
    torch.testing.assert_close(dense(x), loop(x), **EXACT)
    g_dense, g_loop = grads_of(layer, dense, x, dy), grads_of(layer, loop, x, dy)
    for name in g_dense:
        torch.testing.assert_close(g_dense[name], g_loop[name], **EXACT)
    torch.manual_seed(seed)
    assert not torch.allclose(layer(x), layer.eval()(x))  # the mask did something in training mode


@given(layer_setups(max_experts=4))
def test_routing_rows_sum_to_one_on_the_top_k(setup):
    cfg, m, n, seed, _ = setup
    torch.manual_seed(seed)
    x, router = torch.randn(50, n), torch.randn(cfg.experts, n)
    probs, chosen, gate = goat.route(x, router, cfg.top_k)
    torch.testing.assert_close(gate.sum(-1), torch.ones(50))
    assert ((gate > 0).sum(-1) == cfg.top_k).all()
    assert torch.equal(gate > 0, chosen > 0)
    top = probs.topk(cfg.top_k, dim=-1)
    torch.testing.assert_close(gate.gather(-1, top.indices), top.values / top.values.sum(-1, keepdim=True))


def test_an_expert_no_token_chose_gets_no_router_gradient_from_the_output():
    """The gate depends on the chosen logits alone, so the router row of an expert that no
    token chose gets exactly zero gradient from the output. In float32, renormalising p
    leaves it 1e-10 to 1e-9 of rounding noise, which Adam (dividing by the gradient's
    size, eps 1e-8) would turn into up to a tenth of a step; only the balance loss should
    move it. The same for the upcycled full MoE, which routes by the same rule."""
    for seed in range(3):
        torch.manual_seed(seed)
        layer = GOATLinear(nn.Linear(32, 24), GOATConfig(rank=8, experts=8, top_k=2, dropout=0.0))
        full_moe = goat.UpcycledMoE(nn.Linear(32, 24), experts=8, top_k=2)
        with torch.no_grad():
            full_moe.weight.add_(0.1 * torch.randn_like(full_moe.weight))  # experts apart, as after training
        x = torch.randn(3, 32)  # 3 tokens, top-2 of 8: at least 2 experts unchosen
        for moe, router in ((layer, layer.lora_router), (full_moe, full_moe.router)):
            moe(x).square().sum().backward()
            unchosen = moe._chosen.sum(0) == 0  # what this very forward chose
            grad = router.grad
            assert unchosen.sum() >= 2 and torch.equal(grad[unchosen], torch.zeros_like(grad[unchosen]))
            assert (grad[~unchosen] != 0).any(dim=-1).all()  # the chosen rows do learn


def test_a_nan_logit_shows_in_the_gate_rather_than_being_routed_round():
    _, _, gate = goat.gate_from_logits(torch.tensor([[1.0, float("nan"), 2.0, 0.0]]), top_k=2)
    assert gate.isnan().any()  # a diverged router shows in the loss (train.py stops on it), not hidden


def test_gradcheck_tiny_layer():
    torch.manual_seed(5)
    layer = GOATLinear(nn.Linear(6, 5).double(), GOATConfig(rank=4, experts=2, top_k=1, dropout=0.0))
    x = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    params = (layer.lora_A, layer.lora_B, layer.lora_router)

    def fn(x, A, B, R):
        with torch.no_grad():
            saved = [p.clone() for p in params]
        for p, v in zip(params, (A, B, R)):
            p.data = v.detach()  # gradcheck perturbs v; route the layer through it
        out = torch.func.functional_call(layer, {"lora_A": A, "lora_B": B, "lora_router": R}, (x,))
        for p, v in zip(params, saved):
            p.data = v
        return out
    assert torch.autograd.gradcheck(fn, (x, *[p.detach().clone().requires_grad_() for p in params]))


@given(layer_setups(max_experts=8))
def test_every_adapter_parameter_gets_a_gradient(setup):
    cfg, m, n, seed, _ = setup
    layer, _ = make_layer(cfg, m, n, seed)
    layer(torch.randn(2, 9, n, dtype=torch.float64)).square().sum().backward()
    for name, p in layer.named_parameters():
        assert (p.grad is not None) == p.requires_grad, name
    assert not any(p.requires_grad for p in layer.base.parameters())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision_base_weights(dtype):
    torch.manual_seed(6)
    base = nn.Linear(32, 24)
    reference = GOATLinear(copy.deepcopy(base).double(), GOATConfig(rank=8, experts=4, dropout=0.0))
    torch.manual_seed(6)
    layer = GOATLinear(base.to(dtype), GOATConfig(rank=8, experts=4, dropout=0.0))
    assert layer.lora_A.dtype == torch.float32 and layer.base.weight.dtype == dtype
    with torch.no_grad():
        for name in ("lora_A", "lora_B", "lora_router"):
            getattr(layer, name).copy_(getattr(reference, name))
    x = torch.randn(3, 4, 32)
    y = layer(x.to(dtype))
    assert y.dtype == dtype
    tol = {torch.float32: 1e-5, torch.bfloat16: 5e-2, torch.float16: 5e-3}[dtype]
    torch.testing.assert_close(y.double(), reference(x.double()), rtol=tol, atol=tol)
    y.float().sum().backward()
    assert layer.lora_A.grad.dtype == torch.float32


def test_autocast_keeps_router_in_float32_and_matches_float64():
    torch.manual_seed(9)
    base = nn.Linear(32, 24)
    reference = GOATLinear(copy.deepcopy(base).double(), GOATConfig(rank=8, experts=4, dropout=0.0))
    layer = GOATLinear(base, GOATConfig(rank=8, experts=4, dropout=0.0))
    with torch.no_grad():
        for name in ("lora_A", "lora_B", "lora_router"):
            getattr(layer, name).copy_(getattr(reference, name))
    x = torch.randn(6, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16 and layer._probs.dtype == torch.float32
    torch.testing.assert_close(layer._probs.double(), goat.route(x.double(), reference.lora_router, 2)[0])
    torch.testing.assert_close(y.double(), reference(x.double()), rtol=5e-2, atol=5e-2)


# --- SPEC 5: balance loss and expert load ------------------------------------------------

@given(layer_setups(max_experts=8))
def test_balance_loss_value_and_that_it_trains_only_the_router(setup):
    cfg, m, n, seed, _ = setup
    layer, _ = make_layer(cfg, m, n, seed)
    x = torch.randn(30, n, dtype=torch.float64)
    layer(x)
    loss = goat.balance_loss(layer)
    if cfg.experts == 1:
        assert loss.item() == 0 and goat.expert_load(layer) == {}
        return
    probs = torch.softmax(x @ layer.lora_router.detach().T, dim=-1)
    counts = torch.zeros(cfg.experts, dtype=torch.float64)
    for row in probs:
        for i in row.topk(cfg.top_k).indices:
            counts[i] += 1
    expected = sum(cfg.experts / (cfg.top_k * 30) * counts[i] * probs[:, i].mean() for i in range(cfg.experts))
    torch.testing.assert_close(loss.double(), expected.double(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(goat.expert_load(layer)[""].double(), counts / counts.sum())
    layer.zero_grad()
    loss.backward()
    for p in (layer.lora_A, layer.lora_B):  # None, or zeros where A shares a matmul with the router
        assert p.grad is None or not p.grad.any()
    assert layer.lora_router.grad.abs().sum() > 0


def test_balance_loss_is_one_under_uniform_routing_and_sums_layers():
    torch.manual_seed(7)
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16))
    goat.add_goat(model, GOATConfig(rank=8, experts=4, top_k=2, dropout=0.0), ["0", "2"])
    for layer in (model[0], model[2]):
        with torch.no_grad():
            layer.lora_router.zero_()
    model(torch.randn(10, 16))
    torch.testing.assert_close(goat.balance_loss(model), torch.tensor(2.0))


# --- Injection ----------------------------------------------------------------------

def tiny_bert(seed=0, num_labels=2):
    from transformers import BertConfig, BertForSequenceClassification
    torch.manual_seed(seed)
    return BertForSequenceClassification(BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=48, max_position_embeddings=64, num_labels=num_labels)).eval()


def tiny_llama(seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=48, max_position_embeddings=64)).eval()


def expected_trainable(model, names, cfg):
    total = 0
    for name in names:
        m, n = model.get_submodule(name).base.weight.shape
        total += cfg.rank * (n + m) + (cfg.experts * n if cfg.experts > 1 else 0)
    return total


@pytest.mark.parametrize("build,targets,expected", [
    (tiny_bert, ["query", "value"], ["bert.encoder.layer.0.attention.self.query", "bert.encoder.layer.0.attention.self.value",
                                     "bert.encoder.layer.1.attention.self.query", "bert.encoder.layer.1.attention.self.value"]),
    (tiny_llama, ["q_proj", "down_proj"], ["model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj",
                                           "model.layers.1.self_attn.q_proj", "model.layers.1.mlp.down_proj"]),
])
def test_injection_wraps_exactly_the_targets(build, targets, expected):
    model = build()
    cfg = GOATConfig(rank=8, experts=4, top_k=2, dropout=0.0)
    names = goat.add_goat(model, cfg, targets)
    assert sorted(names) == sorted(expected)
    assert sorted(n for n, _ in goat.goat_layers(model)) == sorted(expected)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert all(".lora_" in n for n in trainable) and trainable
    assert goat.trainable_parameters(model) == expected_trainable(model, names, cfg)


@pytest.mark.parametrize("build,head", [(tiny_bert, "classifier"), (tiny_llama, "lm_head")])
@pytest.mark.parametrize("method", list(goat.PRESETS))
def test_all_linear_injection_keeps_outputs_as_theory_predicts(build, head, method):
    """At init: lora/molora (B = 0) and pissa/milora (c = 1) leave the model's output
    unchanged; goat does too once its routers are uniform over all experts."""
    model, reference = build(), build()
    model.double(), reference.double()
    overrides = dict(rank=4, alpha=8, dropout=0.0)
    if method == "goat":
        overrides.update(top_k=4, experts=4)
    elif method == "molora":
        overrides.update(experts=2)
    cfg = goat.preset(method, **overrides)
    names = goat.add_goat(model, cfg, "all-linear")
    linears = [n for n, m in reference.named_modules() if isinstance(m, nn.Linear) and not n.startswith(head)]
    assert sorted(names) == sorted(linears)
    assert goat.trainable_parameters(model) == expected_trainable(model, names, cfg)
    for _, layer in goat.goat_layers(model):
        if layer.lora_router is not None:
            with torch.no_grad():
                layer.lora_router.zero_()
    ids = torch.randint(0, 100, (2, 9))
    torch.testing.assert_close(model(ids).logits, reference(ids).logits, rtol=1e-9, atol=1e-9)


# --- Portable adapters -----------------------------------------------------------------

def trained_bert(cfg, steps=3, lr=0.1):
    model = tiny_bert()
    goat.add_goat(model, cfg, "all-linear")
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    for step in range(steps):
        ids = torch.randint(0, 100, (4, 10), generator=torch.Generator().manual_seed(step))
        out = model(ids, labels=torch.tensor([0, 1, 1, 0]))
        (out.loss + 1e-3 * goat.balance_loss(model)).backward()
        opt.step()
        opt.zero_grad()
    return model.eval()


@pytest.mark.parametrize("method, extra", [("goat", {}), ("lora", {}), ("pissa", {}), ("goat", {"scaling": "adam"}),
                                           ("goat", {"per_expert_scale": True}), ("goat", {"init": "goat_random"})])
def test_adapter_reloads_onto_pristine_base(method, extra):
    cfg = goat.preset(method, rank=8, alpha=16, **extra)
    model = trained_bert(cfg)
    ids = torch.randint(0, 100, (3, 11))
    state = goat.goat_state_dict(model)
    assert not any("base" in key for key in state)
    initial = dict(zip(*[[k for k in state if k.endswith(s)] for s in (".lora_B", ".lora_B0")]))
    assert any(not torch.equal(state[k], state[k + "0"]) for k in initial)  # B has moved
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    fresh = tiny_bert()
    goat.load_goat_state_dict(fresh, state)
    fresh.eval()
    torch.testing.assert_close(fresh(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)
    goat.remove_goat(fresh)
    pristine = tiny_bert()
    for (name, p), (_, q) in zip(fresh.named_parameters(), pristine.named_parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)


def test_adapter_refuses_another_base_or_shape():
    state = goat.goat_state_dict(trained_bert(goat.preset("goat", rank=8)))
    with pytest.raises(ValueError, match="does not match the one the adapter was trained on"):
        goat.load_goat_state_dict(tiny_bert(seed=1), state)
    from transformers import BertConfig, BertForSequenceClassification
    wider = BertForSequenceClassification(BertConfig(vocab_size=100, hidden_size=48, num_hidden_layers=2,
                                                     num_attention_heads=2, intermediate_size=48))
    with pytest.raises(ValueError, match="shape"):
        goat.load_goat_state_dict(wider, state)
    with pytest.raises(ValueError, match="not in this model"):
        goat.load_goat_state_dict(tiny_llama(), state)


def test_remove_goat_restores_w0():
    model, reference = tiny_llama(), tiny_llama()
    goat.add_goat(model, goat.preset("goat", rank=8), "all-linear")
    goat.remove_goat(model)
    assert not goat.goat_layers(model)
    for (name, p), (_, q) in zip(model.named_parameters(), reference.named_parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)


def test_upcycled_moe_starts_as_the_base_layer():
    torch.manual_seed(8)
    base = nn.Linear(12, 10).double()
    moe = UpcycledMoE(copy.deepcopy(base), experts=4, top_k=2)
    x = torch.randn(3, 5, 12, dtype=torch.float64)
    torch.testing.assert_close(moe(x), base(x), **EXACT)
    model = nn.Sequential(nn.Linear(12, 10))
    goat.add_upcycled_moe(model, 4, 2)
    assert goat.trainable_parameters(model) == 4 * 12 * 10 + 10 + 4 * 12


# --- Bad input ------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,match", [
    (dict(rank=10, experts=4), "not divisible by experts"),
    (dict(rank=8, experts=4, top_k=0), "top_k"),
    (dict(rank=8, experts=4, top_k=5), "top_k"),
    (dict(init="svd"), "init='svd' is unknown"),
    (dict(scaling="alpha"), "needs alpha"),
    (dict(scaling="big"), "scaling='big' is unknown"),
])
def test_bad_config_is_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GOATConfig(**kwargs)


def test_bad_layers_and_targets_are_refused():
    with pytest.raises(ValueError, match="enc.0: rank 16 exceeds min"):
        GOATLinear(nn.Linear(8, 12), GOATConfig(rank=16, experts=4), "enc.0")
    with pytest.raises(ValueError, match="segment .* shorter than the per-expert rank"):
        # unreachable through GOATLinear (rank <= min(m, n) implies it), so call the init
        goat.init_factors(torch.randn(6, 6), GOATConfig(rank=8, experts=4), "enc.0")
    model = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8))
    with pytest.raises(ValueError, match="'query' matches no module"):
        goat.add_goat(model, GOATConfig(rank=4, experts=2), ["query"])
    with pytest.raises(ValueError, match="not nn.Linear"):
        goat.add_goat(model, GOATConfig(rank=4, experts=2), ["1"])
    quantised = nn.Linear(8, 8)
    quantised.weight = nn.Parameter(torch.zeros(8, 8, dtype=torch.int8), requires_grad=False)
    with pytest.raises(ValueError, match="integer or quantised"):
        GOATLinear(quantised, GOATConfig(rank=4, experts=2), "q")
    with pytest.raises(ValueError, match="unknown method"):
        goat.preset("dora")
