"""
GOAT: a LoRA mixture of experts with SVD-segment initialisation and a scaling
factor that aligns it with a fully fine-tuned mixture of experts.

    Fan et al., "Make LoRA Great Again: Boosting LoRA with Adaptive Singular
    Values and Mixture-of-Experts Optimization Alignment", ICML 2025,
    arXiv:2502.16894. Authors' code: github.com/Facico/GOAT-PEFT.

One file, PyTorch only (2.2+). The method comes first, in this order:

- Hyperparameters: `GOATConfig`; LoRA, PiSSA, MiLoRA and MoLoRA are `PRESETS` of the same layer.
- Scaling factor s = sqrt(3 eta n / d) (Thm. 3.5): `scaling_factor`. Its counterpart
  under Adam (ours, not the paper's): `adam_scaling_factor`.
- SVD-segment init ("O" in the paper, Sec. 3.2) and the PiSSA / MiLoRA / LoRA inits:
  `svd_indices` (which singular components each expert gets) and `init_factors`,
  with s B_i A_i = U_i S_i Vh_i / rho.
- Routing (Sec. 3.1): `route` - float32 router logits, softmax, top-k, and the gate G
  (T x E, k non-zeros per row summing to one).
- The layer y = W_res x + s B ((A drop(x)) * expand(G)): `GOATLinear`. All experts
  are computed densely as one rank-r LoRA. Its __init__ writes the residual
  W_res = W0 - c s sum_i B_i A_i, c = 1/E (Thm. 3.4).
- Load-balancing loss (Switch Transformer form, Sec. 3.3): `balance_loss`.
- Into a model and out again: `add_goat`, `remove_goat`.
- References: the per-expert loop of the authors' code (`moe_loop_forward`), and
  the model GOAT aligns with, an upcycled fully fine-tuned MoE (`UpcycledMoE`,
  `add_upcycled_moe`).

A routed adapter (E > 1) cannot be merged into the base weight: routing depends on
the input (the one-expert presets could be; goat.py does not).

Below the banner is what makes the layer cheap and safe to drop into any model:
mixed precision and torch.compile (under autocast, `_AutocastInput` keeps one
low-precision copy of the input for backward; adapters stay float32 under
model.to(bf16)); drop-in safety (`find_targets` leaves alone the Linears it must
not wrap: tied or aliased weights, output embeddings, nn.MultiheadAttention's);
and adapters on disk (`goat_state_dict` carries the initial factors and
base-weight fingerprints; `load_goat_state_dict` checks all of it before it
changes anything).
"""

import contextlib
import dataclasses
import json
import math
import warnings
import zlib
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

# ---------------------------------------------------------------------------------
# Hyperparameters


@dataclass
class GOATConfig:
    rank: int = 32            # total rank r over all experts
    experts: int = 8          # E
    top_k: int = 2            # k
    init: str = "goat"        # one of INITS
    scaling: object = "paper"  # one of SCALINGS, or a number (s itself)
    alpha: float = None       # for "alpha" (s = alpha / d) and "rslora" (s = alpha / sqrt(d))
    eta: float = 1.0          # lr_full / lr_lora, for "paper" and "adam" scaling
    rho: float = 10.0         # SVD inits put S / rho into the adapter
    init_cof: float = None    # c in W_res = W0 - c s sum B_i A_i; None means 1/E
    dropout: float = 0.05
    segments: int = None      # goat/goat_mini: equal spectrum segments; None means E (an ablation sets it)
    segment: int = None       # goat: one adapter from this segment alone (the per-segment sweep of Fig. 1)
    per_expert_scale: bool = False  # GOAT-s (Appendix E): s_i = s sqrt(sigma_1 / sigma_i), SVD inits

    def __post_init__(self):
        _check_config(self)  # in "drop-in safety" below: the one place these ranges are checked

    @property
    def expert_rank(self):
        return self.rank // self.experts

    @property
    def n_segments(self):
        return self.experts if self.segments is None else self.segments

    @property
    def cof(self):
        return 1.0 / self.experts if self.init_cof is None else self.init_cof


# Baselines are presets of the same layer, so every comparison runs the same code path.
PRESETS = {
    "lora": dict(init="lora", experts=1, top_k=1, scaling="alpha"),
    "pissa": dict(init="pissa", experts=1, top_k=1, scaling="alpha", rho=1.0, init_cof=1.0),
    "milora": dict(init="milora", experts=1, top_k=1, scaling="alpha", rho=1.0, init_cof=1.0),
    "molora": dict(init="lora", experts=8, top_k=2, scaling="alpha"),
    "goat": dict(init="goat", experts=8, top_k=2, scaling="paper", rho=10.0, init_cof=None),
}


def preset(method, **overrides):
    """GOATConfig for a named method; `overrides` (rank, alpha, eta, ...) win."""
    if method not in PRESETS:
        raise ValueError(f"unknown method {method!r}; choose one of {tuple(PRESETS)}")
    return GOATConfig(**{**PRESETS[method], **overrides})


# ---------------------------------------------------------------------------------
# The scaling factor s (Thm. 3.5)

SCALINGS = ("paper", "adam", "alpha", "rslora")


def scaling_factor(n, d, eta=1.0):
    """The scaling s that aligns a LoRA expert with full fine-tuning (Thm. 3.5).

    For W~ = W + s B A with B0 = 0 and A0 drawn like PyTorch's default Linear
    init (entries U(-1/sqrt(n), 1/sqrt(n)), variance 1/(3n)), one SGD step with
    learning rate mu and g = dL/dW~ gives dB = -mu s g A0^T, so the equivalent
    weight moves by s dB A0 = -mu s^2 g A0^T A0. Since E[A0^T A0] = d/(3n) I,
    this is -mu s^2 d/(3n) g on average. Asking it to equal a full fine-tuning
    step at learning rate eta * mu gives s^2 d / (3n) = eta:
        s = sqrt(3 eta n / d),  n = in_features, d = rank of one expert,
    with eta = lr_full / lr_lora (paper: 1 at lr 1e-5..1e-4, 0.1 for LLaMA at 1e-4).
    """
    return math.sqrt(3.0 * eta * n / d)


def adam_scaling_factor(m, n, eta=1.0, d=None, sigma_sum=None, rho=10.0):
    """The scale that gives an expert's equivalent weight the step of full fine-tuning
    under Adam (AdamW), as scaling_factor does under SGD. Not in the paper.

    Adam moves every parameter by about its learning rate whatever the gradient's size
    (its first step is exactly -lr sign(grad)), so a full expert W (m x n) trained at
    eta * lr moves each entry by eta * lr. The equivalent weight W~ = W_res + s B A
    moves by s (dB A + B dA), with dB = -lr sign(g A^T), dA = -lr sign(B^T g). For A with
    orthogonal rows and B with orthogonal columns (the SVD inits; about so for random A),
    ||dB A||_F^2 = lr^2 m ||A||_F^2 and ||B dA||_F^2 = lr^2 n ||B||_F^2, and the cross
    term has random signs. Asking the root-mean-square step of W~ to be eta * lr:
        s^2 (m ||A||_F^2 + n ||B||_F^2) = eta^2 m n.
    - LoRA init (B0 = 0, A0 entries of variance 1/(3n), so ||A0||_F^2 = d/3):
        s = eta sqrt(3 n / d)     (the paper's form, with eta where SGD has sqrt(eta):
                                   Adam's step does not carry the gradient's factor s)
    - SVD inits (||A0||_F^2 = ||B0||_F^2 = sigma_sum / (s rho), sigma_sum the sum of the
      expert's singular values):
        s = eta^2 m n rho / ((m + n) sigma_sum)   (one per expert: an expert on a weak
                                                   segment gets a larger s)
    Under this scale the effective step of every init and segment is the same, so
    that changing the init does not change how fast the adapter learns."""
    if sigma_sum is None:
        return eta * math.sqrt(3.0 * n / d)
    return eta ** 2 * m * n * rho / ((m + n) * sigma_sum)


def resolve_scaling(cfg, n):
    """s where it does not depend on the weight's spectrum (see expert_scales)."""
    d = cfg.expert_rank
    if cfg.scaling == "paper":
        return scaling_factor(n, d, cfg.eta)
    if cfg.scaling == "adam":  # the LoRA init's; SVD inits get one per expert from expert_scales
        return adam_scaling_factor(None, n, cfg.eta, d=d)
    if cfg.scaling == "alpha":
        return cfg.alpha / d
    if cfg.scaling == "rslora":
        return cfg.alpha / math.sqrt(d)
    return float(cfg.scaling)


def expert_scales(cfg, m, n, S_chosen):
    """s per expert (a tuple of E floats) for scales that depend on the spectrum: "adam"
    with an SVD init, and GOAT-s. S_chosen: the singular values given to the experts."""
    sums = S_chosen.double().view(cfg.experts, -1).sum(dim=1)
    sums = sums.clamp_min(max(float(sums.max()), 1.0) * 1e-12)  # a zero segment: any s (its factors are 0)
    if cfg.scaling == "adam":
        return tuple(adam_scaling_factor(m, n, cfg.eta, sigma_sum=float(x), rho=cfg.rho) for x in sums)
    s = resolve_scaling(cfg, n)  # GOAT-s: expert 1 keeps s, s_i^2 sigma_i is the same for all
    return tuple(s * math.sqrt(float(sums[0]) / float(x)) for x in sums)


# ---------------------------------------------------------------------------------
# Initialisation (Sec. 3.2): which part of W0 each expert starts from. A new init
# is a name here and a branch in svd_indices (an SVD slice) or init_factors (any other).

INITS = ("goat", "goat_mini", "goat_random", "pissa", "milora", "lora")
SVD_INITS = ("goat", "goat_mini", "goat_random", "pissa", "milora")


def svd_indices(init, h, rank, segments, segment=None, generator=None):
    """Singular-value indices given to the experts, concatenated expert by expert.
    goat/goat_mini cut the spectrum into `segments` equal parts (one per expert);
    `segment` j: the top `rank` components of segment j alone; goat_random: `rank`
    components drawn at random from the whole spectrum (by `generator`)."""
    d, t = rank // segments, h // segments  # components per segment, segment length
    if init == "goat" and segment is not None:
        return list(range(segment * t, segment * t + rank))
    if init == "goat":  # top of each of E equal segments of the spectrum
        return [j for i in range(segments) for j in range(i * t, i * t + d)]
    if init == "goat_mini":  # bottom of each segment
        return [j for i in range(segments) for j in range((i + 1) * t - d, (i + 1) * t)]
    if init == "goat_random":  # each expert d components from anywhere in the spectrum, no two share one
        chosen = torch.randperm(h, generator=generator)[:rank].view(segments, d).sort(dim=1).values
        return chosen.reshape(-1).tolist()
    if init == "pissa":  # principal components
        return list(range(rank))
    if init == "milora":  # minor components
        return list(range(h - rank, h))
    raise ValueError(f"{init!r} is not an SVD init")


def _random_generator(name):
    """goat_random's components: the same on every process (the seed and the layer's name)."""
    return torch.Generator().manual_seed((torch.initial_seed() * 1_000_003 + zlib.crc32(name.encode())) % 2 ** 63)


def adapter_dtype(weight):
    """Adapters train in float32 (float64 on a float64 base): AdamW steps on bf16 weights round away."""
    return torch.float64 if weight.dtype == torch.float64 else torch.float32


def linear_init(rows, cols, dtype, device):
    """nn.Linear's default init, U(-1/sqrt(cols), 1/sqrt(cols)), for LoRA's A and the routers.
    Drawn on the CPU from the global generator, then moved: one seed gives the same values
    on every device (a CUDA generator draws other numbers) and with or without FSDP
    (which adds the adapter while the model still waits on the CPU)."""
    t = torch.empty(rows, cols, dtype=dtype)
    nn.init.kaiming_uniform_(t, a=math.sqrt(5))
    return t.to(device)


def init_factors(weight, cfg, name="layer", svd_device=None):
    """Initial (A0, B0, s): r x n and m x r, in adapter_dtype, on the weight's device, and
    the scaling s (a float, or a tuple with one per expert). `svd_device` (e.g. "cuda")
    factorises there instead: one layer at a time, so a model kept on the CPU is
    initialised at GPU speed."""
    m, n = weight.shape
    dtype, device = adapter_dtype(weight), weight.device
    if cfg.init == "lora":  # A as nn.Linear's init, B = 0: W0 is unchanged
        A = linear_init(cfg.rank, n, dtype, device)
        return A, torch.zeros(m, cfg.rank, dtype=dtype, device=device), resolve_scaling(cfg, n)
    if svd_device is not None:
        A, B, s = init_factors(weight.to(svd_device), cfg, name)
        return A.to(device), B.to(device), s
    h, segments = min(m, n), cfg.n_segments
    d, t = (cfg.rank, h // segments) if cfg.segment is not None else (cfg.rank // segments, h // segments)
    if t < d:
        raise ValueError(f"{name}: SVD segment length min(out, in) / segments = {h}/{segments} = {t} "
                         f"is shorter than the {'rank' if cfg.segment is not None else 'per-expert rank'} {d}; "
                         f"lower rank or experts")
    # bf16/fp16 have no SVD kernel: factorise in float32 (float64 stays float64), cast back once.
    U, S, Vh = torch.linalg.svd(weight.detach().to(dtype), full_matrices=False)
    generator = _random_generator(name) if cfg.init == "goat_random" else None
    idx = torch.tensor(svd_indices(cfg.init, h, cfg.rank, segments, cfg.segment, generator), device=device)
    if cfg.scaling == "adam" or cfg.per_expert_scale:
        s = expert_scales(cfg, m, n, S[idx])
        per_slot = torch.tensor(s, dtype=dtype, device=device).repeat_interleave(cfg.expert_rank)
        root = (S[idx] / (per_slot * cfg.rho)).sqrt()
    else:
        s = resolve_scaling(cfg, n)
        root = (S[idx] / (s * cfg.rho)).sqrt()   # sqrt(S_I'), S_I' = S_I / (s rho)
    return root[:, None] * Vh[idx], U[:, idx] * root[None, :], s


# ---------------------------------------------------------------------------------
# Routing (Sec. 3.1): one rule for GOATLinear, the reference loop and UpcycledMoE


def router_logits(x, router):
    """x @ R^T in at least float32, also under autocast (bf16 logits would make
    near-ties arbitrary); float64 stays float64."""
    dtype = torch.promote_types(torch.promote_types(x.dtype, router.dtype), torch.float32)
    with _autocast_off(x.device.type):
        return F.linear(x.to(dtype), router.to(dtype))


def gate_from_logits(logits, top_k):
    """Softmax probabilities p (T x E), the top-k indicator (T x E), and the gate
    G = top-k probabilities renormalised to sum to one (zero elsewhere). No host sync.
    G is computed as the softmax of the chosen logits alone, the same numbers: an expert
    left out then gets exactly zero gradient from G. Renormalising p instead leaves it
    rounding noise (1e-10 to 1e-9 in float32), which Adam, dividing by the gradient's
    size, turns into steps: without the balance loss, never-chosen router rows drift.
    The top-k of the logits, not of p: the same experts, but no ties where p underflows,
    and a NaN logit is chosen (topk ranks NaN highest), so G shows it, not routes round it.
    With top-1, G is 1 for the chosen expert: the router learns from the balance loss alone."""
    probs = logits.softmax(dim=-1)
    picked = logits.topk(top_k, dim=-1).indices
    chosen = torch.zeros_like(probs).scatter_(-1, picked, 1.0)
    gate = torch.zeros_like(probs).scatter(-1, picked, logits.gather(-1, picked).softmax(dim=-1))
    return probs, chosen, gate


def route(x, router, top_k):
    """Top-k routing of tokens x (T x n) by router R (E x n): (p, top-k indicator, G)."""
    return gate_from_logits(router_logits(x, router), top_k)


class Routed(nn.Module):
    """A layer with a router (GOATLinear, UpcycledMoE). It keeps the routing statistics
    of its latest forward until balance_loss reads them. They carry the router's
    autograd graph only in a training forward with grad enabled, and reading them
    clears them: a layer skipped in a forward (LayerDrop, a branch) adds nothing
    stale, an evaluation forward keeps no graph, and a copy of the model (deepcopy,
    pickle) carries none of them."""
    experts = 1
    top_k = 1
    name = "layer"
    _probs = _chosen = None
    _ran_without_graph = _ran_in_eval_with_grad = False

    def _remember(self, probs, chosen, router):
        if _in_backward():  # activation checkpointing re-runs the forward; its statistics were used
            return
        graph = self.training and torch.is_grad_enabled()
        self._probs, self._chosen = (probs if graph else probs.detach()), chosen.detach()
        # autograd on in eval mode: most likely training a model left in eval (from_pretrained returns one)
        self._ran_in_eval_with_grad = not self.training and torch.is_grad_enabled() and router.requires_grad
        # reentrant activation checkpointing runs a training forward with autograd off
        self._ran_without_graph = self.training and not torch.is_grad_enabled() and router.requires_grad

    def _take_probs(self):
        """The latest forward's probabilities, handed over once (None if read already)."""
        if self._probs is not None and self._ran_without_graph and torch.is_grad_enabled():
            raise RuntimeError(
                f"{self.name}: ran in training mode without autograd (reentrant activation checkpointing?), "
                "so the balance loss cannot reach its router. Use non-reentrant checkpointing: "
                "model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={'use_reentrant': False}) "
                "or torch.utils.checkpoint.checkpoint(..., use_reentrant=False)")
        probs, self._probs = self._probs, None
        return probs

    def __getstate__(self):
        state = dict(self.__dict__)
        for key in ("_probs", "_chosen", "_ran_without_graph", "_ran_in_eval_with_grad"):
            state.pop(key, None)
        return state


# ---------------------------------------------------------------------------------
# The layer


class GOATLinear(Routed):
    """y = W_res x + b + s * B ((A drop(x)) * expand(G(x))).

    `base` is the frozen nn.Linear, its weight holding W_res. lora_A (r x n) stacks
    the experts' A_i, lora_B (m x r) their B_i; expert i owns rank slots
    [i d, (i+1) d), and expand(G) repeats its gate weight over them. lora_router
    (E x n) exists when E > 1. Adapter tensors stay float32 (float64 for a float64
    base) whatever dtype the model is later cast to.

    lora_A0 / lora_B0 hold the initial factors, so that the adapter can be re-applied
    to a pristine base and W0 = W_res + c s B0 A0 rebuilt (rebuild_w0). They are
    frozen nn.Parameters (requires_grad=False), not buffers: FSDP2's fully_shard
    shards parameters but leaves buffers whole on every GPU (1.7 GB for LLaMA-2-70B
    at rank 32). Nothing trains them: add_goat freezes all but lora_A, lora_B and
    lora_router, and an optimizer over the parameters that require grad skips them.

    With E > 1 the adapter cannot be merged into the weight: the gate depends on the input.
    """

    def __init__(self, base, cfg, name="layer", factors=None, svd_device=None):
        super().__init__()
        _check_fits(base, cfg, name)
        m, n = base.weight.shape
        self.cfg, self.name = cfg, name
        self.experts, self.top_k, self.expert_rank = cfg.experts, cfg.top_k, cfg.expert_rank
        self.fingerprint = weight_fingerprint(base.weight)
        # factors computed elsewhere (another process, a saved adapter) are cast to this layer
        A0, B0, scale = init_factors(base.weight, cfg, name, svd_device) if factors is None else factors
        dtype, device = adapter_dtype(base.weight), base.weight.device
        A0, B0 = A0.to(device=device, dtype=dtype), B0.to(device=device, dtype=dtype)
        if isinstance(scale, (tuple, list)) and len(set(scale)) == 1:
            scale = scale[0]
        if isinstance(scale, (tuple, list)):  # one s per expert (GOAT-s, "adam" on an SVD init)
            self.register_buffer("scaling", torch.tensor(scale, dtype=dtype, device=device))
        else:
            self.scaling = float(scale)
        self.lora_A = nn.Parameter(A0.clone())
        self.lora_B = nn.Parameter(B0.clone())
        # one expert: the gate is 1, plain LoRA
        self.lora_router = nn.Parameter(linear_init(self.experts, n, dtype, device)) if self.experts > 1 else None
        self.lora_A0 = nn.Parameter(A0.clone(), requires_grad=False)
        self.lora_B0 = nn.Parameter(B0.clone(), requires_grad=False)
        self.lora_dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()
        # Thm 3.4: W_res = W0 - c s sum_i B_i A_i, computed once in the adapter dtype.
        with torch.no_grad():
            base.weight.copy_(base.weight.to(dtype) - self._initial_product())
        base.requires_grad_(False)
        self.base = base

    in_features = property(lambda self: self.base.in_features)
    out_features = property(lambda self: self.base.out_features)

    def forward(self, x):
        xs = x.reshape(-1, x.shape[-1])  # routing is per token, over all leading dimensions
        low = _autocast_dtype(x.device.type)
        if low is not None:
            y, ax, logits = self._autocast_input_side(xs, low)
        else:
            y = self.base(xs)  # W_res x + b, T x m
            ax, logits = self._input_side(xs)  # A drop(x), T x r; router logits, T x E
        if logits is None:  # one expert: plain LoRA
            ax = ax * self.scaling
        else:
            probs, chosen, gate = gate_from_logits(logits, self.top_k)
            self._remember(probs, chosen, self.lora_router)
            # expand(G): each expert's gate weight (times s) over its d rank slots, via a view
            weights = (gate * self.scaling).to(ax.dtype).unsqueeze(-1)
            ax = (ax.view(-1, self.experts, self.expert_rank) * weights).view_as(ax)
        if ax.dtype == y.dtype or low is not None:
            out = torch.addmm(y, ax, self.lora_B.t())  # y + B (...) in one kernel
        else:  # e.g. a bf16 base without autocast: adapter in float32, sum cast back
            out = y + F.linear(ax, self.lora_B).to(y.dtype)
        return out.view(*x.shape[:-1], self.base.out_features)

    def _input_side(self, xs):
        """A drop(x) and the router logits (None with one expert). One dropout mask is
        shared by all experts, and the router sees the clean input."""
        xa = xs.to(self.lora_A.dtype)
        if self.lora_router is None:
            return F.linear(self.lora_dropout(xa), self.lora_A), None
        if self.training and self.cfg.dropout > 0:
            return F.linear(self.lora_dropout(xa), self.lora_A), router_logits(xs, self.lora_router)
        # the same input for both: one pass over x computes A x and the router logits
        both = F.linear(xa, torch.cat([self.lora_A, self.lora_router]))
        return both[:, :self.cfg.rank], both[:, self.cfg.rank:]

    def _autocast_input_side(self, xs, low):
        """Under autocast: W_res x + b, A drop(x) and the router logits, with one
        low-precision copy of x serving the base, A and the router's gradient."""
        x_low = xs.to(low)
        y = self.base(x_low)
        mask = None
        if self.training and self.cfg.dropout > 0:
            mask = torch.empty_like(x_low, dtype=torch.bool).bernoulli_(1 - self.cfg.dropout)
        # x already in the autocast dtype is x_low itself: passed once (a tensor passed twice
        # to an autograd.Function breaks torch.compile's graph)
        ax, logits = _AutocastInput.apply(xs, None if xs.dtype == low else x_low, self.lora_A, self.lora_router,
                                          mask, 1.0 / (1 - self.cfg.dropout))
        return y, ax, logits

    def _initial_product(self):
        """c sum_i s_i B0_i A0_i: what __init__ took out of W0."""
        if isinstance(self.scaling, float):
            return self.cfg.cof * self.scaling * (self.lora_B0 @ self.lora_A0)
        return self.cfg.cof * (self.lora_B0 * self.scaling.repeat_interleave(self.expert_rank)) @ self.lora_A0

    def rebuild_w0(self):
        """W0 = W_res + c s B0 A0 (to float tolerance), in the adapter dtype; changes nothing."""
        return self.base.weight.to(self.lora_A0.dtype) + self._initial_product()

    def expert_scales(self):
        """s of each expert, as floats."""
        if isinstance(self.scaling, float):
            return [self.scaling] * self.experts
        return self.scaling.tolist()

    def _apply(self, fn, recurse=True):
        """model.to(torch.bfloat16) (or .half()) casts the frozen base but not the adapter,
        which stays in float32: AdamW updates on bf16 weights round away. Device moves apply."""
        if recurse:
            for module in self.children():
                module._apply(fn)

        def keep_precision(t):
            out = fn(t)
            if out.is_floating_point() and out.dtype != t.dtype and out.element_size() < 4:
                return t.to(out.device)
            return out
        return super()._apply(keep_precision, recurse=False)

    def extra_repr(self):
        scales = self.expert_scales()
        scaling = f"{scales[0]:.4g}" if len(set(scales)) == 1 else f"{min(scales):.4g}..{max(scales):.4g}"
        return (f"rank={self.cfg.rank}, experts={self.experts}, top_k={self.top_k}, "
                f"init={self.cfg.init}, scaling={scaling}")


# ---------------------------------------------------------------------------------
# Load balancing (Sec. 3.3)


def balance_loss(model):
    """Sum over routed layers of sum_i f_i P_i (the Switch Transformer loss) of their
    latest forward, with f_i = E/(kT) * #tokens whose top-k holds i and P_i = mean_t p_i.
    Uniform routing gives 1 per layer; the gradient reaches P (the routers) only.
    Each layer's statistics are read once: call it once per forward, before backward.
    A layer that did not run, or ran over no token, adds nothing (0 if none). A layer
    called several times in one forward (one block looped, weights shared across depth)
    counts its latest call only."""
    losses, in_eval = [], []
    for layer in model.modules():
        if isinstance(layer, Routed) and layer.experts > 1:
            if layer._probs is not None and layer._ran_in_eval_with_grad:
                in_eval.append(layer.name)
            probs = layer._take_probs()
            if probs is not None and probs.shape[0] > 0:
                f = layer._chosen.mean(dim=0) * (layer.experts / layer.top_k)
                losses.append((f * probs.mean(dim=0)).sum())
    if in_eval:
        warnings.warn(f"{len(in_eval)} routed layers (e.g. {in_eval[0]}) ran in eval mode with autograd on, so the "
                      "balance loss reaches no router (routing statistics keep a graph in training mode only): "
                      "call model.train() before training (from_pretrained returns a model in eval mode)",
                      stacklevel=2)
    return torch.stack(losses).sum() if losses else torch.zeros(())


def expert_load(model):
    """{layer name: fraction of routed (token, slot) pairs per expert (E,)} from the
    latest forward: sums to 1, uniform is 1/E. For logging and plots."""
    return {name: mod._chosen.mean(dim=0) / mod.top_k for name, mod in model.named_modules()
            if isinstance(mod, Routed) and mod.experts > 1 and mod._chosen is not None and mod._chosen.shape[0] > 0}


# ---------------------------------------------------------------------------------
# Into a model, and out again

# Modules that "all-linear" leaves alone: task heads, which are trained in full.
DEFAULT_EXCLUDE = ("classifier", "lm_head", "score", "qa_outputs")


def add_goat(model, cfg, targets="all-linear", exclude=DEFAULT_EXCLUDE, svd_device=None, factors=None):
    """Wrap the target nn.Linear modules of `model` in place with GOATLinear, freeze
    everything else, return the wrapped names. Train a head afterwards with
    `head.requires_grad_(True)`. `svd_device`: where to run the SVD inits;
    `factors`: {name: (A0, B0, s)} computed beforehand (see initial_factors).
    Every target is checked before any is wrapped: a refusal changes nothing.
    A new layer takes the training mode of the Linear it wraps."""
    if not isinstance(cfg, GOATConfig):
        raise TypeError(f"add_goat(model, cfg): cfg is {type(cfg).__name__}, not a GOATConfig; "
                        "give e.g. goat.preset('goat') or goat.GOATConfig(rank=32)")
    _refuse_if_wrapped(model)
    names = find_targets(model, targets, exclude)
    factors = factors or {}
    for name in names:
        _check_fits(model.get_submodule(name), cfg, name, factors.get(name))
    return _swap(model, names, lambda mod, name: GOATLinear(mod, cfg, name, factors=factors.get(name),
                                                           svd_device=svd_device))


def initial_factors(model, cfg, names, svd_device=None):
    """{name: (A0, B0, s)} for the named Linears: the SVD work of add_goat, separable so
    that several processes can share it (each computes some layers, then all exchange)."""
    return {name: init_factors(model.get_submodule(name).weight, cfg, name, svd_device) for name in names}


def add_upcycled_moe(model, experts=8, top_k=2, targets="all-linear", exclude=DEFAULT_EXCLUDE):
    """The "full-moe" reference: every target Linear becomes an UpcycledMoE."""
    _refuse_if_wrapped(model)
    names = find_targets(model, targets, exclude)
    return _swap(model, names, lambda mod, name: UpcycledMoE(mod, experts, top_k, name))


def _swap(model, names, make):
    """Replace each named module by make(module, name), then freeze the whole model but
    what the new modules train (a GOATLinear: lora_A, lora_B, lora_router): a head
    trained alongside is unfrozen afterwards."""
    made = []
    for name in names:
        parent, child = _parent(model, name)
        original = getattr(parent, child)
        made.append(make(original, name).train(original.training))  # an eval-mode model stays in eval
        setattr(parent, child, made[-1])
    trained = [p for mod in made for p in mod.parameters() if p.requires_grad]
    model.requires_grad_(False)
    for p in trained:
        p.requires_grad_(True)
    _no_fused_encoder_path(model)
    return names


def _parent(model, name):
    parent_name, _, child = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child


def remove_goat(model):
    """Unwrap every GOATLinear, restoring W0 = W_res + c s B0 A0 (to float tolerance)."""
    upcycled = [name for name, mod in model.named_modules() if isinstance(mod, UpcycledMoE)]
    if upcycled:  # checked before anything changes
        raise ValueError(f"{upcycled[0]} ({len(upcycled)} layers in all) is an upcycled MoE: its E trained copies "
                         "of the weight cannot be turned back into one nn.Linear; reload the base model instead")
    for name, mod in goat_layers(model):
        with torch.no_grad():
            mod.base.weight.copy_(mod.rebuild_w0())
        parent, child = _parent(model, name)
        setattr(parent, child, mod.base)
    return model


def goat_layers(model):
    return [(name, mod) for name, mod in model.named_modules() if isinstance(mod, GOATLinear)]


def trainable_parameters(model):
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# ---------------------------------------------------------------------------------
# References: the authors' per-expert loop, and the upcycled full MoE GOAT aligns with


def moe_loop_forward(layer, x):
    """The same output as GOATLinear.forward, written as the authors' per-expert loop
    (softmax, top-k, then a torch.where and an indexed add per expert). Slow: it syncs
    with the host and loops in Python. A reference for tests and benchmarks. Its gate
    renormalises p, so an unchosen expert's router gradient is rounding noise, not zero."""
    y = layer.base(x)
    xs = x.reshape(-1, x.shape[-1])
    xd = layer.lora_dropout(xs.to(layer.lora_A.dtype))
    out = torch.zeros(xs.shape[0], layer.lora_B.shape[0], dtype=xd.dtype, device=x.device)
    if layer.lora_router is None:
        out = layer.scaling * F.linear(F.linear(xd, layer.lora_A), layer.lora_B)
    else:
        probs, _, _ = route(xs, layer.lora_router, layer.top_k)
        weights, selected = probs.topk(layer.top_k, dim=-1)
        weights = weights / weights.sum(dim=-1, keepdim=True)
        d = layer.expert_rank
        for i in range(layer.experts):
            rows, slot = torch.where(selected == i)
            A_i, B_i = layer.lora_A[i * d:(i + 1) * d], layer.lora_B[:, i * d:(i + 1) * d]
            expert_out = layer.expert_scales()[i] * F.linear(F.linear(xd[rows], A_i), B_i)
            out = out.index_add(0, rows, weights[rows, slot, None].to(xd.dtype) * expert_out)
    return y + out.view(*x.shape[:-1], -1).to(y.dtype)


class UpcycledMoE(Routed):
    """The reference GOAT aligns with: E fully trainable copies W^i of a Linear
    (all = W0 at start, "upcycled"), the same top-k router, y = sum_i G_i(x) W^i x + b.
    It has E times the weights: a reference for small models, not a method."""

    def __init__(self, base, experts=8, top_k=2, name="layer"):
        super().__init__()
        _check_linear(base, name)
        if not 1 <= top_k <= experts:
            raise ValueError(f"{name}: top_k {top_k} must lie in [1, experts={experts}]")
        self.experts, self.top_k, self.name = experts, top_k, name
        self.weight = nn.Parameter(base.weight.detach().expand(experts, -1, -1).clone())
        self.bias = None if base.bias is None else nn.Parameter(base.bias.detach().clone())
        self.router = nn.Parameter(linear_init(experts, base.in_features, base.weight.dtype, base.weight.device))

    def forward(self, x):
        xs = x.reshape(-1, x.shape[-1])
        probs, chosen, gate = route(xs, self.router, self.top_k)
        self._remember(probs, chosen, self.router)
        # each expert computes only the tokens routed to it (k of E): E / k times less work than
        # all of them, the same values (the others have gate 0)
        y = xs.new_zeros(xs.shape[0], self.weight.shape[1])
        for i, weight in enumerate(self.weight.unbind(0)):
            rows = gate[:, i].nonzero().squeeze(1)  # a host sync: the reference need not be fast
            y = y.index_add(0, rows, gate[rows, i:i + 1].to(xs.dtype) * F.linear(xs[rows], weight))
        if self.bias is not None:
            y = y + self.bias
        return y.view(*x.shape[:-1], self.weight.shape[1])


# =================================================================================
# The method ends here. What follows keeps it cheap and safe inside any model:
# mixed precision and torch.compile, drop-in safety, adapters on disk.
# =================================================================================

# ---------------------------------------------------------------------------------
# Mixed precision and torch.compile


class _AutocastInput(torch.autograd.Function):
    """The adapter's input side under autocast: u = drop(x) A^T in the autocast dtype,
    and router logits x R^T in float32 from the exact x. Plain autograd would keep,
    per layer, a float32 copy of x for the router's gradient and a dropped copy for
    A's; this keeps x in the autocast dtype (the copy the base layer reads) and the
    boolean dropout mask, and recomputes the dropped input in backward. The gradients
    are autocast's: A's from the low-precision input, the router's in float32 from it.
    x_low is None when x is in the autocast dtype already (then it is x)."""

    @staticmethod
    def forward(ctx, x, x_low, A, router, mask, keep_scale):
        x_low = x if x_low is None else x_low
        dropped = x_low if mask is None else x_low * mask * keep_scale
        u = F.linear(dropped, A.to(x_low.dtype))
        logits = None
        if router is not None:
            with _autocast_off(x.device.type):
                logits = F.linear(x.float(), router.float())
        ctx.save_for_backward(x_low, mask, A, router)
        ctx.keep_scale, ctx.x_dtype = keep_scale, x.dtype
        return u, logits

    @staticmethod
    def backward(ctx, grad_u, grad_logits):
        # At most one float32 T x n temporary besides dL/dx (plain autograd held about four):
        # dropout is applied in place, and the two terms of dL/dx (through A, through the
        # router) are summed in one float32 buffer, which is dL/dx itself for a float32 x.
        x_low, mask, A, router = ctx.saved_tensors
        low = x_low.dtype
        routed = router is not None and grad_logits is not None
        grad_x = grad_A = grad_router = None
        with _autocast_off(x_low.device.type):
            grad_u = grad_u.to(low)
            if ctx.needs_input_grad[2]:
                dropped = x_low if mask is None else (x_low * mask).mul_(ctx.keep_scale)
                grad_A = (grad_u.t() @ dropped).to(A.dtype)
                del dropped
            if routed:
                grad_logits = grad_logits.float()
                if ctx.needs_input_grad[3]:
                    grad_router = (grad_logits.t() @ x_low.float()).to(router.dtype)
            if ctx.needs_input_grad[0]:
                grad_x = grad_u @ A.to(low)
                if mask is not None:
                    grad_x.mul_(mask).mul_(ctx.keep_scale)
                if routed:  # the sum in float32, then x's dtype (in place when that is the low one)
                    total = (grad_logits @ router.float()).add_(grad_x)
                    grad_x = grad_x.copy_(total) if ctx.x_dtype == low else total.to(ctx.x_dtype)
                else:
                    grad_x = grad_x.to(ctx.x_dtype)
        return grad_x, None, grad_A, grad_router, None, None


# torch < 2.4's is_autocast_enabled takes no device. Found out once here, not in the
# forward: torch.compile (2.2) turns the TypeError into an error of its own.
try:
    torch.is_autocast_enabled("cpu")
    _AUTOCAST_TAKES_DEVICE = True
except TypeError:
    _AUTOCAST_TAKES_DEVICE = False


def _autocast_dtype(device_type):
    """The autocast dtype in effect on this device, or None (works on torch 2.2 to 2.13+)."""
    try:
        if _AUTOCAST_TAKES_DEVICE:
            enabled = torch.is_autocast_enabled(device_type)
        else:
            enabled = torch.is_autocast_enabled() if device_type == "cuda" else torch.is_autocast_cpu_enabled()
    except RuntimeError:  # a device type without autocast (meta, ...)
        return None
    if not enabled:
        return None
    if hasattr(torch, "get_autocast_dtype"):
        return torch.get_autocast_dtype(device_type)
    return torch.get_autocast_gpu_dtype() if device_type == "cuda" else torch.get_autocast_cpu_dtype()


def _autocast_off(device_type):
    """A context that turns autocast off where it is on."""
    if _autocast_dtype(device_type) is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type, enabled=False)


try:
    from torch.compiler import is_compiling as _compiling  # torch >= 2.3
except ImportError:
    from torch._dynamo import is_compiling as _compiling


def _in_backward():
    """True while autograd runs a backward pass: non-reentrant activation checkpointing
    re-runs the forward there, and that re-run must not replace the routing statistics.
    Compiled code never re-runs the Python forward (compiled checkpointing recomputes
    inside the graph), and asking autograd would break the graph: False there."""
    if _compiling():
        return False
    graph_task = getattr(torch._C, "_current_graph_task_id", None)
    return graph_task is not None and graph_task() != -1


# ---------------------------------------------------------------------------------
# Drop-in safety: the config's ranges, which Linears may be wrapped, and how the
# model must then run


def _is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_config(cfg):
    """GOATConfig's ranges, the one place they are checked (train.py's flags delegate here),
    so every message starts with `field=value` and says what to do. Refused is what would
    train silently wrong (a zero, negative or NaN scale gives an all-NaN or frozen adapter;
    a rank that the experts do not divide has no expert layout) or fail later."""
    def refuse(field, why):
        raise ValueError(f"{field}={getattr(cfg, field)!r} {why}")
    if cfg.init not in INITS:
        refuse("init", f"is unknown; choose one of {INITS}")
    numeric = _is_number(cfg.scaling)
    if not numeric and cfg.scaling not in SCALINGS:
        refuse("scaling", f"is unknown; choose one of {SCALINGS} or a positive number")
    for field in ("rank", "experts", "top_k") + (("segments",) if cfg.segments is not None else ()):
        value = getattr(cfg, field)
        if not (_is_number(value) and isinstance(value, int) and value >= 1):
            refuse(field, "must be a positive integer")
    if cfg.scaling in ("alpha", "rslora") and cfg.alpha is None:
        refuse("alpha", f"but scaling={cfg.scaling!r} needs alpha (s = alpha / d); e.g. alpha=2*rank")
    # a value given must be valid even where this scaling ignores it: it is recorded with the run
    hints = {"rho": "SVD inits put S / rho into the adapter; the paper's is 10",
             "eta": "lr_full / lr_lora; the paper's is 1, or 0.1 for LLaMA at lr 1e-4",
             "alpha": "s = alpha / d; e.g. alpha=2*rank", "scaling": "a number is s itself"}
    for field, hint in hints.items():
        value = getattr(cfg, field) if field != "scaling" or numeric else None
        needed = field == "rho" or (field == "eta" and cfg.scaling in ("paper", "adam"))
        if (value is not None or needed) and not (_is_number(value) and math.isfinite(value) and value > 0):
            refuse(field, f"must be a positive finite number ({hint})")
    if cfg.init_cof is not None and not (_is_number(cfg.init_cof) and math.isfinite(cfg.init_cof)
                                         and cfg.init_cof >= 0):
        refuse("init_cof", "must be a finite number >= 0 (None means 1/experts)")
    if cfg.rank % cfg.experts:
        refuse("rank", f"is not divisible by experts={cfg.experts}: each expert gets rank/experts components; "
                       f"pick e.g. rank={cfg.experts * max(1, cfg.rank // cfg.experts)}")
    if cfg.segments is not None and cfg.rank % cfg.segments and cfg.segment is None:
        refuse("segments", f"must divide rank={cfg.rank}")
    if cfg.segment is not None and (cfg.init != "goat" or cfg.experts != 1 or isinstance(cfg.segment, bool)
                                    or not isinstance(cfg.segment, int) or not 0 <= cfg.segment < cfg.n_segments):
        refuse("segment", f"takes one adapter (experts=1, init='goat') from segment 0 .. segments-1 "
                          f"(segments={cfg.n_segments})")
    if cfg.per_expert_scale and (cfg.init not in SVD_INITS or cfg.scaling == "adam"):
        refuse("per_expert_scale", f"(GOAT-s) rescales the paper's or alpha scaling per SVD segment: it needs an "
                                   f"SVD init {SVD_INITS}, and 'adam' scaling is per expert already")
    if not 1 <= cfg.top_k <= cfg.experts:
        refuse("top_k", f"must lie in [1, experts={cfg.experts}]")
    if not (_is_number(cfg.dropout) and 0.0 <= cfg.dropout < 1.0):
        refuse("dropout", "must be a number in [0, 1) (the paper's is 0.05)")


def _unusual_linear(module):
    """Why this nn.Linear's output is not W x + b, which GOAT relies on when it writes W_res
    into W (None: it is, or its weight cannot be read, which _check_linear names)."""
    if "weight" not in module._parameters:  # parametrize, weight_norm, spectral_norm
        return ("its weight is computed from other parameters (a parametrization such as weight_norm or "
                "spectral_norm), and GOAT writes W_res into a plain weight: remove the parametrization first")
    weight = module.weight
    if type(module).forward is nn.Linear.forward or weight.is_meta or not weight.dtype.is_floating_point:
        return None
    # a subclass with a forward of its own (e.g. transformers' FalconLinear: x W^T + b, fine): probe it
    probe = torch.randn(2, weight.shape[1], generator=torch.Generator().manual_seed(0)).to(weight)
    with torch.no_grad():
        try:
            out = module.forward(probe)
        except Exception as e:  # noqa: BLE001 - any failure means it is not a plain Linear
            out = e
        expected = F.linear(probe, weight, module.bias).float()
        if not (isinstance(out, torch.Tensor) and out.shape == expected.shape
                and torch.allclose(out.float(), expected, rtol=2e-2, atol=2e-2 * float(expected.abs().max()))):
            return (f"its class {type(module).__name__} has a forward of its own that does not compute W x + b "
                    "(checked on a random input), and GOAT's W_res = W0 - c s sum B_i A_i assumes it does")
    return None


def _check_linear(module, name):
    if not isinstance(module, nn.Linear):
        raise ValueError(f"{name}: is {type(module).__name__}, not nn.Linear; GOAT wraps nn.Linear "
                         f"only, so name a Linear (or use targets='all-linear')")
    if "weight" in module._parameters and (not module.weight.dtype.is_floating_point
                                           or module.weight.dtype.itemsize < 2):
        raise ValueError(f"{name}: weight dtype {module.weight.dtype} is integer or quantised; "
                         f"load the base model in float32, bfloat16 or float16 before adding GOAT")
    if module.weight.is_meta:
        raise ValueError(f"{name}: weight is on the meta device (no values); GOAT's initialisation reads W0, "
                         f"so load the weights first (e.g. model.to_empty(device=...) and load_state_dict)")
    if unusual := _unusual_linear(module):
        raise ValueError(f"{name}: GOAT cannot wrap it: {unusual}")


def _check_fits(base, cfg, name, factors=None):
    """That cfg (and initial factors computed elsewhere, if given) fit this Linear."""
    _check_linear(base, name)
    m, n = base.weight.shape
    if (cfg.rank if cfg.init in SVD_INITS else cfg.expert_rank) > min(m, n):  # SVD experts share one spectrum
        raise ValueError(f"{name}: rank {cfg.rank} exceeds min(out={m}, in={n}); lower the rank, or, if it is a "
                         f"task head (trained in full, not adapted), leave it out: "
                         f"exclude=goat.DEFAULT_EXCLUDE + ({name!r},)")
    if factors is not None and (tuple(factors[0].shape), tuple(factors[1].shape)) != ((cfg.rank, n), (m, cfg.rank)):
        raise ValueError(f"{name}: its factors hold A0 {tuple(factors[0].shape)} and B0 {tuple(factors[1].shape)}, "
                         f"not {(cfg.rank, n)} and {(m, cfg.rank)}: they were computed for another model or config")


def _excluded(name, exclude):
    return name in exclude or any(part in exclude for part in name.split("."))


def unwrappable_linears(model):
    """{name: why} for the nn.Linear modules GOAT must leave alone in any model."""
    why = {}
    aliases = {}  # module -> every name it is registered under
    for name, mod in model.named_modules(remove_duplicate=False):
        aliases.setdefault(id(mod), []).append(name)
    owners = {}  # parameter -> the modules holding it
    for mod in model.modules():
        for p in mod.parameters(recurse=False):
            owners.setdefault(id(p), set()).add(id(mod))
    try:
        output_embeddings = model.get_output_embeddings()  # Hugging Face models
    except (AttributeError, NotImplementedError):
        output_embeddings = None
    for name, mod in model.named_modules(remove_duplicate=False):
        if isinstance(mod, Routed):
            why.update({f"{name}.{sub}": "it is inside a GOAT or upcycled-MoE layer already"
                        for sub, _ in mod.named_modules() if sub})
        elif isinstance(mod, nn.MultiheadAttention):  # its forward reads out_proj.weight: an adapter would be bypassed
            why.update({f"{name}.{sub}": "nn.MultiheadAttention reads its out_proj.weight directly, so a wrapped "
                        "out_proj would be bypassed; GOAT adapts the model's other Linears (e.g. the feed-forward "
                        "linear1/linear2 of nn.TransformerEncoderLayer)"
                        for sub, child in mod.named_modules() if isinstance(child, nn.Linear)})
    for name, mod in model.named_modules(remove_duplicate=False):
        if isinstance(mod, nn.Linear) and name not in why:
            if unusual := _unusual_linear(mod):
                why[name] = unusual
            elif len(aliases[id(mod)]) > 1:
                why[name] = (f"this one nn.Linear is registered under {len(aliases[id(mod)])} names "
                             f"({', '.join(aliases[id(mod)])}): wrapping one name would leave the others "
                             "calling the unwrapped Linear, bypassing the adapter")
            elif len(owners[id(mod.weight)]) > 1:
                why[name] = ("its weight is tied to another module (e.g. an output layer sharing the input "
                             "embedding); writing W_res into it would change both")
            elif mod is output_embeddings:
                why[name] = "it is the model's output embedding (a head)"
    return why


def find_targets(model, targets, exclude=DEFAULT_EXCLUDE):
    """Names of the modules to wrap: "all-linear" (every nn.Linear but those in
    `exclude`, matched against the full name or any dotted part of it, and those
    unwrappable_linears names), or a list of name suffixes, each of which must match
    a module outside `exclude`."""
    if isinstance(model, nn.Linear):
        raise ValueError("the model is itself an nn.Linear: add_goat wraps the Linears inside a model; "
                         "wrap a lone Linear with goat.GOATLinear(linear, cfg)")
    if isinstance(exclude, str):  # one name, not its letters
        exclude = (exclude,)
    skip = unwrappable_linears(model)
    modules = dict(model.named_modules(remove_duplicate=False))
    if targets == "all-linear":
        names = [name for name, mod in modules.items() if isinstance(mod, nn.Linear)
                 and name not in skip and not _excluded(name, exclude)]
        if not names:
            left = "".join(f"; {name}: {reason}" for name, reason in list(skip.items())[:3])
            raise ValueError(f"targets='all-linear' found no nn.Linear to wrap outside the excluded modules "
                             f"{tuple(exclude)}{left}")
        for name in names:
            _check_linear(modules[name], name)
        return names
    if isinstance(targets, str):
        targets = [targets]
    if not targets or not all(isinstance(t, str) and t for t in targets):
        raise ValueError(f"targets={targets!r}: give 'all-linear' or module-name suffixes such as ['query', 'value']")
    names = []
    for target in targets:
        matching = [name for name in modules if name == target or name.endswith("." + target)]
        hits = [name for name in matching if not _excluded(name, exclude)]  # a head named like a target stays a head
        if matching and not hits:
            raise ValueError(f"target {target!r} names only excluded modules ({', '.join(matching)}; exclude="
                             f"{tuple(exclude)}): a task head is trained in full, not wrapped; drop it from the "
                             "targets and train it with requires_grad_(True)")
        if not hits:
            linears = sorted({n.rsplit(".", 1)[-1] for n, m in modules.items() if isinstance(m, nn.Linear)})
            raise ValueError(f"target {target!r} matches no module outside {tuple(exclude)}; Linear names in "
                             f"this model: {linears} (or use 'all-linear')")
        for name in hits:
            if name in skip:
                raise ValueError(f"{name}: GOAT cannot wrap it: {skip[name]}")
            _check_linear(modules[name], name)
        names += [name for name in hits if name not in names]
    return names


def _refuse_if_wrapped(model):
    wrapped = [name for name, mod in model.named_modules() if isinstance(mod, Routed)]
    if wrapped:
        raise ValueError(f"the model already has {len(wrapped)} GOAT or upcycled-MoE layers (e.g. {wrapped[0]}); "
                         "wrapping again would nest them: call remove_goat(model) first, or "
                         "load_goat_state_dict(model, state) to replace the adapter")


def _no_fused_encoder_path(model):
    """nn.TransformerEncoderLayer (batch_first, in eval) has a fused inference path that
    reads linear1/linear2.weight and would skip the adapter (a GOATLinear has no .weight,
    so it fails instead). Layers and encoders holding wrapped modules are marked so that
    they take their ordinary path, which calls the modules."""
    for mod in model.modules():
        if isinstance(mod, (nn.TransformerEncoderLayer, nn.TransformerEncoder)) \
                and any(isinstance(m, Routed) for m in mod.modules()):
            if isinstance(mod, nn.TransformerEncoderLayer):
                mod.activation_relu_or_gelu = 0  # read only by the fused path's checks
            else:
                mod.use_nested_tensor = False


# ---------------------------------------------------------------------------------
# Adapters on disk: the adapter alone, with what it needs to check its base model

CONFIG_KEY = "goat_config"  # the one non-tensor entry of a GOAT state dict (a JSON string)
FINGERPRINT_PICKS = 16


def weight_fingerprint(weight):
    """Two statistics and FINGERPRINT_PICKS evenly spaced entries of a weight, after
    rounding it to bfloat16: the same weights in float32, bf16 or fp16 give the same
    values (within one bf16 step, 0.4%), while another model's weights differ in every
    entry. The spacing is in integers: exact at any size, on any device."""
    w = weight.detach()
    flat = w.reshape(-1)
    picks = flat[(torch.arange(FINGERPRINT_PICKS) * (flat.numel() - 1) // (FINGERPRINT_PICKS - 1)).to(w.device)]
    sample = w[::7, ::5].to(torch.bfloat16).float()
    stats = torch.stack([sample.abs().mean(), sample.square().mean().sqrt()])
    return torch.cat([stats, picks.to(torch.bfloat16).float()]).double().cpu()


def fingerprints_match(saved, weight):
    # relative to each entry, and to the weight's RMS for entries near zero (a W0 rebuilt
    # as W_res + c s B0 A0 in bf16 is off by a rounding step of W_res, not of the entry)
    return torch.allclose(saved, weight_fingerprint(weight), rtol=1e-2, atol=1e-2 * float(saved[1]))


def goat_state_dict(model):
    """The adapter alone: per layer A, B, router, A0, B0 and the base-weight
    fingerprint, plus CONFIG_KEY: a JSON string of each layer's config, shape and
    scale. Under FSDP every process must call it (the shards are gathered)."""
    state, layers = {}, {}
    for name, mod in goat_layers(model):
        for key in ("lora_A", "lora_B", "lora_router", "lora_A0", "lora_B0"):
            tensor = getattr(mod, key)
            if tensor is not None:
                tensor = tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor  # a sharded tensor
                state[f"{name}.{key}"] = tensor.detach().cpu().contiguous()
        state[f"{name}.fingerprint"] = mod.fingerprint
        layers[name] = dict(asdict(mod.cfg), shape=list(mod.base.weight.shape), scale=mod.expert_scales())
    if not layers:
        raise ValueError("the model has no GOAT layers; call add_goat first")
    state[CONFIG_KEY] = json.dumps({"layers": layers})
    return state


def load_goat_state_dict(model, state):
    """Apply a saved adapter to a pristine copy of its base model (layers already
    wrapped are restored to W0 first): rebuilds W_res from the saved initial factors,
    then loads the trained A, B and router. Checks everything first: a refused
    adapter (another base, shape or architecture, a missing key, a broken tensor)
    changes nothing. Half-precision adapter tensors are cast to the layer's dtype.
    As add_goat, it freezes all but the adapter (unfreeze a head to train it on)."""
    cfgs = _check_adapter(model, state)
    remove_goat(model)

    def make(mod, name):
        cfg, scale = cfgs[name]
        layer = GOATLinear(mod, cfg, name, factors=(state[f"{name}.lora_A0"], state[f"{name}.lora_B0"], scale))
        with torch.no_grad():
            for key in ("lora_A", "lora_B", "lora_router"):
                if getattr(layer, key) is not None:
                    getattr(layer, key).copy_(state[f"{name}.{key}"])
        return layer
    return _swap(model, list(cfgs), make)


def _read_adapter_config(state):
    """CONFIG_KEY's per-layer table, each entry checked: {name: (GOATConfig, shape, scale)}."""
    if not isinstance(state, dict) or CONFIG_KEY not in state:
        raise ValueError(f"not a GOAT adapter: no {CONFIG_KEY!r} entry (write it with goat_state_dict)")
    try:
        layers = json.loads(state[CONFIG_KEY])
    except (TypeError, ValueError, RecursionError) as e:
        raise ValueError(f"the adapter's {CONFIG_KEY!r} is not JSON ({e}): the file is damaged or was not "
                         "written by goat_state_dict") from None
    layers = layers.get("layers") if isinstance(layers, dict) else None
    if not isinstance(layers, dict) or not layers:
        raise ValueError(f"the adapter's {CONFIG_KEY!r} holds no 'layers' table of per-layer configs: the file "
                         "is damaged or was not written by goat_state_dict")
    fields = {f.name for f in dataclasses.fields(GOATConfig)}
    keys = fields | {"shape", "scale"}
    out = {}
    for name, info in layers.items():
        if not isinstance(info, dict):
            raise ValueError(f"the adapter's config of layer {name!r} is {type(info).__name__}, not a table")
        missing, unknown = keys - set(info), set(info) - keys
        if missing or unknown:
            raise ValueError(f"the adapter's config of layer {name!r} has "
                             + "; ".join(f"{what} keys {sorted(keys)}" for what, keys in
                                         (("missing", missing), ("unknown", unknown)) if keys)
                             + ": it was not written by this goat.py's goat_state_dict")
        try:
            cfg = GOATConfig(**{k: info[k] for k in fields})
        except (TypeError, ValueError) as e:
            raise ValueError(f"the adapter's config of layer {name!r} is invalid: {e}") from None
        scale = info["scale"]
        if not (isinstance(scale, list) and len(scale) == cfg.experts
                and all(_is_number(s) and math.isfinite(s) and s > 0 for s in scale)):
            raise ValueError(f"the adapter's config of layer {name!r} has scale={scale!r}; expected one positive "
                             f"finite number per expert ({cfg.experts})")
        out[name] = cfg, info["shape"], tuple(scale)
    return out


def _check_adapter(model, state):
    """Every key, shape, dtype, config and base-weight fingerprint of a saved adapter
    against `model`, before anything changes. Returns {layer name: (GOATConfig, s per expert)}."""
    layers = _read_adapter_config(state)
    modules = dict(model.named_modules())
    for name, (cfg, shape, _) in layers.items():
        mod = modules.get(name)
        if mod is None:
            raise ValueError(f"adapter layer {name!r} is not in this model: was it saved from another architecture?")
        base = mod.base if isinstance(mod, GOATLinear) else mod
        _check_linear(base, name)
        m, n = base.weight.shape
        if [m, n] != shape:
            raise ValueError(f"{name}: adapter was saved for a weight of shape {shape}, "
                             f"this model's is {[m, n]}; load it onto its own base model")
        shapes = {"lora_A": (cfg.rank, n), "lora_B": (m, cfg.rank), "lora_A0": (cfg.rank, n),
                  "lora_B0": (m, cfg.rank), "fingerprint": (2 + FINGERPRINT_PICKS,)}
        if cfg.experts > 1:
            shapes["lora_router"] = (cfg.experts, n)
        for key, expected in shapes.items():
            tensor = state.get(f"{name}.{key}")
            if not isinstance(tensor, torch.Tensor):
                raise ValueError(f"adapter lacks {name}.{key}: the file is incomplete or not a GOAT adapter")
            if tuple(tensor.shape) != expected:
                raise ValueError(f"{name}.{key} has shape {tuple(tensor.shape)}, expected {expected}")
            if not tensor.is_floating_point():
                raise ValueError(f"{name}.{key} holds {tensor.dtype} values: adapter tensors are floating point "
                                 "(the file is damaged or not a GOAT adapter)")
            if not torch.isfinite(tensor).all():
                raise ValueError(f"{name}.{key} holds NaN or inf: the adapter is broken (did its training diverge?)")
    for name in layers:  # then the base weights: is this the model the adapter was trained on?
        mod = modules[name]
        pristine = mod.rebuild_w0() if isinstance(mod, GOATLinear) else mod.weight
        if not fingerprints_match(state[f"{name}.fingerprint"], pristine):
            raise ValueError(f"{name}: base weight does not match the one the adapter was trained on; "
                             f"load the adapter onto a pristine copy of its own base model "
                             f"(the same checkpoint, in any of float32, bfloat16 or float16)")
    return {name: (cfg, scale) for name, (cfg, _, scale) in layers.items()}
