"""
GOAT: a LoRA mixture of experts with SVD-segment initialisation and a scaling
factor that aligns it with a fully fine-tuned mixture of experts.

    Fan et al., "Make LoRA Great Again: Boosting LoRA with Adaptive Singular
    Values and Mixture-of-Experts Optimization Alignment", ICML 2025,
    arXiv:2502.16894. Authors' code: github.com/Facico/GOAT-PEFT.

One file, PyTorch only. Where each piece of the paper lives:

- Routing (Sec. 3.1): `route` - float32 router logits, softmax, top-k,
  renormalised gate G (T x E, k non-zeros per row summing to one).
- MoE forward y = W_res x + s * sum_i G_i(x) B_i A_i x: `GOATLinear.forward`,
  computed densely as one rank-r LoRA, B ((A x) * expand(G)). `moe_loop_forward`
  is the per-expert loop of the authors' code, kept as the readable reference.
- SVD-segment init ("O" in the paper, Sec. 3.2) and PiSSA / MiLoRA / LoRA inits:
  `init_factors`. s B_i A_i = U_i S_i Vh_i / rho.
- Residual W_res = W0 - c s sum_i B_i A_i, c = 1/E (Thm. 3.4): `GOATLinear.__init__`.
- Scaling factor s = sqrt(3 eta n / d) (Thm. 3.5): `scaling_factor`.
- Load-balancing loss (Switch Transformer form, Sec. 3.3): `balance_loss`.
- The reference it is aligned with, an upcycled fully fine-tuned MoE: `UpcycledMoE`.

The adapter cannot be merged into the base weight: routing depends on the input.

Around the method, what makes it safe to drop into any model: `find_targets`
leaves alone the Linears it must not wrap (tied weights, output embeddings,
nn.MultiheadAttention's, already wrapped ones); routing statistics are read once
by `balance_loss` and hold no graph outside training (deepcopy, LayerDrop,
checkpointing); adapters stay float32 under `model.to(bf16)`; under autocast
`_AutocastInput` keeps one low-precision copy of the input for backward; adapters
carry their initial factors and base-weight fingerprints (`goat_state_dict`), and
`load_goat_state_dict` checks all of it before changing anything. Runs on torch 2.2+.
"""

import contextlib
import json
import math
import zlib
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

INITS = ("goat", "goat_mini", "goat_random", "pissa", "milora", "lora")
SVD_INITS = ("goat", "goat_mini", "goat_random", "pissa", "milora")
SCALINGS = ("paper", "adam", "alpha", "rslora")
# Modules that "all-linear" leaves alone: task heads, which are trained in full.
DEFAULT_EXCLUDE = ("classifier", "lm_head", "score", "qa_outputs")


@dataclass
class GOATConfig:
    rank: int = 32            # total rank r over all experts
    experts: int = 8          # E
    top_k: int = 2            # k
    init: str = "goat"        # one of INITS
    scaling: object = "paper"  # "paper" | "adam" | "alpha" | "rslora" | a number
    alpha: float = None       # for "alpha" (s = alpha / d) and "rslora" (s = alpha / sqrt(d))
    eta: float = 1.0          # lr_full / lr_lora, for "paper" and "adam" scaling
    rho: float = 10.0         # SVD inits put S / rho into the adapter
    init_cof: float = None    # c in W_res = W0 - c s sum B_i A_i; None means 1/E
    dropout: float = 0.05
    segments: int = None      # goat/goat_mini: equal spectrum segments; None means E (an ablation sets it)
    segment: int = None       # goat: one adapter from this segment alone (the per-segment sweep of Fig. 1)
    per_expert_scale: bool = False  # GOAT-s (Appendix E): s_i = s sqrt(sigma_1 / sigma_i), SVD inits

    def __post_init__(self):
        """Refuse what would train silently wrong: a zero, negative or NaN scale gives an
        all-NaN or frozen adapter; a rank that experts do not divide has no expert layout."""
        if self.init not in INITS:
            raise ValueError(f"unknown init {self.init!r}; choose one of {INITS}")
        numeric = isinstance(self.scaling, (int, float)) and not isinstance(self.scaling, bool)
        if not numeric and self.scaling not in SCALINGS:
            raise ValueError(f"unknown scaling {self.scaling!r}; choose one of {SCALINGS} or a number")
        if self.scaling in ("alpha", "rslora") and self.alpha is None:
            raise ValueError(f"scaling={self.scaling!r} needs alpha (e.g. alpha=2*rank)")
        for name in ("rank", "experts", "top_k", "segments"):
            value = getattr(self, name)
            if not (value is None and name == "segments") and (isinstance(value, bool) or not isinstance(value, int)
                                                               or value < 1):
                raise ValueError(f"{name}={value!r} must be a positive integer")
        positive = {"rho": self.rho, "eta": self.eta if self.scaling in ("paper", "adam") else 1.0,
                    "alpha": self.alpha if self.scaling in ("alpha", "rslora") else 1.0,
                    "scaling": self.scaling if numeric else 1.0}
        for name, value in positive.items():
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"{name}={value!r} must be a positive finite number")
        if self.init_cof is not None and not (isinstance(self.init_cof, (int, float)) and math.isfinite(self.init_cof)
                                              and self.init_cof >= 0):
            raise ValueError(f"init_cof={self.init_cof!r} must be a finite number >= 0 (None means 1/experts)")
        if self.rank % self.experts:
            raise ValueError(f"rank {self.rank} is not divisible by experts {self.experts}: "
                             f"each expert gets rank/experts components; pick e.g. rank={self.experts * max(1, self.rank // self.experts)}")
        if self.segments is not None and self.rank % self.segments and self.segment is None:
            raise ValueError(f"segments {self.segments} must divide rank {self.rank}")
        if self.segment is not None and (self.init != "goat" or self.experts != 1 or isinstance(self.segment, bool)
                                         or not isinstance(self.segment, int)
                                         or not 0 <= self.segment < self.n_segments):
            raise ValueError(f"segment={self.segment!r}: one adapter (experts=1, init='goat') from segment "
                             f"0 .. segments-1 (segments={self.n_segments})")
        if self.per_expert_scale and (self.init not in SVD_INITS or self.scaling == "adam"):
            raise ValueError("per_expert_scale (GOAT-s) rescales the paper's or alpha scaling per SVD segment: "
                             "it needs an SVD init, and 'adam' scaling is per expert already")
        if not 1 <= self.top_k <= self.experts:
            raise ValueError(f"top_k {self.top_k} must lie in [1, experts={self.experts}]")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout {self.dropout} must lie in [0, 1)")

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
    if cfg.scaling == "adam":
        return cfg.eta * math.sqrt(3.0 * n / d)
    if cfg.scaling == "alpha":
        return cfg.alpha / d
    if cfg.scaling == "rslora":
        return cfg.alpha / math.sqrt(d)
    return float(cfg.scaling)


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


def expert_scales(cfg, m, n, S_chosen):
    """s per expert (a tuple of E floats) for scales that depend on the spectrum: "adam"
    with an SVD init, and GOAT-s. S_chosen: the singular values given to the experts."""
    sums = S_chosen.double().view(cfg.experts, -1).sum(dim=1)
    sums = sums.clamp_min(max(float(sums.max()), 1.0) * 1e-12)  # a zero segment: any s (its factors are 0)
    if cfg.scaling == "adam":
        return tuple(adam_scaling_factor(m, n, cfg.eta, sigma_sum=float(x), rho=cfg.rho) for x in sums)
    s = resolve_scaling(cfg, n)  # GOAT-s: expert 1 keeps s, s_i^2 sigma_i is the same for all
    return tuple(s * math.sqrt(float(sums[0]) / float(x)) for x in sums)


def _random_generator(name):
    """goat_random's components: the same on every process (the seed and the layer's name)."""
    return torch.Generator().manual_seed((torch.initial_seed() * 1_000_003 + zlib.crc32(name.encode())) % 2 ** 63)


def init_factors(weight, cfg, name="layer", svd_device=None):
    """Initial (A0, B0, s): r x n and m x r, float32 (float64 for float64 weights), on
    the weight's device, and the scaling s (a float, or a tuple with one per expert).
    `svd_device` (e.g. "cuda") factorises there instead: one layer at a time, so a
    model kept on the CPU is initialised at GPU speed."""
    if svd_device is not None and cfg.init in SVD_INITS:
        A, B, s = init_factors(weight.to(svd_device), cfg, name)
        return A.to(weight.device), B.to(weight.device), s
    m, n = weight.shape
    dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
    if cfg.init == "lora":  # kaiming_uniform(a=sqrt(5)) = U(-1/sqrt(n), 1/sqrt(n)), B = 0
        A = torch.empty(cfg.rank, n, dtype=dtype, device=weight.device)
        nn.init.kaiming_uniform_(A, a=math.sqrt(5))
        return A, torch.zeros(m, cfg.rank, dtype=dtype, device=weight.device), resolve_scaling(cfg, n)
    h, segments = min(m, n), cfg.n_segments
    d, t = (cfg.rank, h // segments) if cfg.segment is not None else (cfg.rank // segments, h // segments)
    if t < d:
        raise ValueError(f"{name}: SVD segment length min(out, in) / segments = {h}/{segments} = {t} "
                         f"is shorter than the {'rank' if cfg.segment is not None else 'per-expert rank'} {d}; "
                         f"lower rank or experts")
    # bf16/fp16 have no SVD kernel: factorise in float32 (float64 stays float64), cast back once.
    U, S, Vh = torch.linalg.svd(weight.detach().to(dtype), full_matrices=False)
    generator = _random_generator(name) if cfg.init == "goat_random" else None
    idx = torch.tensor(svd_indices(cfg.init, h, cfg.rank, segments, cfg.segment, generator), device=weight.device)
    if cfg.scaling == "adam" or cfg.per_expert_scale:
        s = expert_scales(cfg, m, n, S[idx])
        per_slot = torch.tensor(s, dtype=dtype, device=weight.device).repeat_interleave(cfg.expert_rank)
        root = (S[idx] / (per_slot * cfg.rho)).sqrt()
    else:
        s = resolve_scaling(cfg, n)
        root = (S[idx] / (s * cfg.rho)).sqrt()   # sqrt(S_I'), S_I' = S_I / (s rho)
    return root[:, None] * Vh[idx], U[:, idx] * root[None, :], s


def _autocast_dtype(device_type):
    """The autocast dtype in effect on this device, or None (works on torch 2.2 to 2.13+)."""
    try:
        enabled = torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4 has no device argument
        enabled = torch.is_autocast_enabled() if device_type == "cuda" else torch.is_autocast_cpu_enabled()
    except RuntimeError:  # a device type without autocast (meta, ...)
        return None
    if not enabled:
        return None
    if hasattr(torch, "get_autocast_dtype"):
        return torch.get_autocast_dtype(device_type)
    return torch.get_autocast_gpu_dtype() if device_type == "cuda" else torch.get_autocast_cpu_dtype()


def _in_backward():
    """True while autograd runs a backward pass: activation checkpointing re-runs the
    forward there, and that re-run must not replace the routing statistics."""
    graph_task = getattr(torch._C, "_current_graph_task_id", None)
    return graph_task is not None and graph_task() != -1


def _autocast_off(device_type):
    """A context that turns autocast off where it is on."""
    if _autocast_dtype(device_type) is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type, enabled=False)


def router_logits(x, router):
    """x @ R^T in at least float32, also under autocast (bf16 logits would make
    near-ties arbitrary); float64 stays float64."""
    dtype = torch.promote_types(torch.promote_types(x.dtype, router.dtype), torch.float32)
    with _autocast_off(x.device.type):
        return F.linear(x.to(dtype), router.to(dtype))


def gate_from_logits(logits, top_k):
    """Softmax probabilities p (T x E), the top-k indicator (T x E), and the gate
    G = top-k probabilities renormalised to sum to one (zero elsewhere). No host sync."""
    probs = logits.softmax(dim=-1)
    chosen = torch.zeros_like(probs).scatter_(-1, probs.topk(top_k, dim=-1).indices, 1.0)
    kept = probs * chosen
    return probs, chosen, kept / kept.sum(dim=-1, keepdim=True)


def route(x, router, top_k):
    """Top-k routing of tokens x (T x n) by router R (E x n): (p, top-k indicator, G)."""
    return gate_from_logits(router_logits(x, router), top_k)


class _AutocastInput(torch.autograd.Function):
    """The adapter's input side under autocast: u = drop(x) A^T in the autocast dtype,
    and router logits x R^T in float32 from the exact x. Plain autograd would keep,
    per layer, a float32 copy of x for the router's gradient and a dropped copy for
    A's; this keeps x in the autocast dtype (the copy the base layer reads) and the
    boolean dropout mask, and recomputes the dropped input in backward. The gradients
    are autocast's: A's from the low-precision input, the router's in float32 from it."""

    @staticmethod
    def forward(ctx, x, x_low, A, router, mask, keep_scale):
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
        x_low, mask, A, router = ctx.saved_tensors
        drop = (lambda t: t) if mask is None else (lambda t: t * mask * ctx.keep_scale)
        with _autocast_off(x_low.device.type):
            grad_u = grad_u.to(x_low.dtype)
            grad_x = drop(grad_u @ A.to(x_low.dtype)).float()
            grad_A = (grad_u.t() @ drop(x_low)).to(A.dtype) if ctx.needs_input_grad[2] else None
            grad_router = None
            if router is not None and grad_logits is not None:
                grad_logits = grad_logits.float()
                grad_x = grad_x + grad_logits @ router.float()
                if ctx.needs_input_grad[3]:
                    grad_router = (grad_logits.t() @ x_low.float()).to(router.dtype)
        return grad_x.to(ctx.x_dtype), None, grad_A, grad_router, None, None


class _Routed(nn.Module):
    """Keeps the routing statistics of a layer's latest forward until balance_loss
    reads them. They carry the router's autograd graph only in a training forward
    with grad enabled, and reading them clears them: a layer skipped in a forward
    (LayerDrop, a branch) adds nothing stale, an evaluation forward keeps no graph,
    and a copy of the model (deepcopy, pickle) carries none of them."""
    experts = 1
    top_k = 1
    name = "layer"
    _probs = _chosen = None
    _ran_without_graph = False

    def _remember(self, probs, chosen, router):
        if _in_backward():  # activation checkpointing re-runs the forward; its statistics were used
            return
        graph = self.training and torch.is_grad_enabled()
        self._probs, self._chosen = (probs if graph else probs.detach()), chosen.detach()
        # reentrant activation checkpointing runs a training forward with autograd off
        self._ran_without_graph = self.training and not torch.is_grad_enabled() and router.requires_grad

    def __getstate__(self):
        state = dict(self.__dict__)
        for key in ("_probs", "_chosen", "_ran_without_graph"):
            state.pop(key, None)
        return state

    def layer_balance_loss(self):
        """Switch-Transformer loss sum_i f_i P_i with f_i = E/(kT) * #tokens routed to i,
        P_i = mean_t p_i, of the latest forward, read once. Uniform routing gives 1;
        the gradient reaches P (the router) only."""
        if self.experts == 1 or self._probs is None:
            return None
        if self._ran_without_graph and torch.is_grad_enabled():
            raise RuntimeError(
                f"{self.name}: ran in training mode without autograd (reentrant activation checkpointing?), "
                "so the balance loss cannot reach its router. Use non-reentrant checkpointing: "
                "model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={'use_reentrant': False}) "
                "or torch.utils.checkpoint.checkpoint(..., use_reentrant=False)")
        f = self._chosen.mean(dim=0) * (self.experts / self.top_k)
        loss = (f * self._probs.mean(dim=0)).sum()
        self._probs = None
        return loss

    def layer_expert_load(self):
        """Fraction of routed (token, slot) pairs per expert in the latest forward:
        sums to 1, uniform is 1/E."""
        if self.experts == 1 or self._chosen is None:
            return None
        return self._chosen.mean(dim=0) / self.top_k


def _check_linear(module, name):
    if not isinstance(module, nn.Linear):
        raise ValueError(f"{name}: is {type(module).__name__}, not nn.Linear; GOAT wraps nn.Linear "
                         f"only, so name a Linear (or use targets='all-linear')")
    if not module.weight.dtype.is_floating_point or module.weight.dtype.itemsize < 2:
        raise ValueError(f"{name}: weight dtype {module.weight.dtype} is integer or quantised; "
                         f"load the base model in float32, bfloat16 or float16 before adding GOAT")
    if module.weight.is_meta:
        raise ValueError(f"{name}: weight is on the meta device (no values); GOAT's initialisation reads W0, "
                         f"so load the weights first (e.g. model.to_empty(device=...) and load_state_dict)")


FINGERPRINT_PICKS = 16


def weight_fingerprint(weight):
    """Two statistics and a few entries of a weight, after rounding it to bfloat16: the
    same weights in float32, bf16 or fp16 give the same values (within one bf16 step,
    0.4%), while another model's weights differ in every entry."""
    w = weight.detach()
    flat = w.reshape(-1)
    picks = flat[_pick_indices(flat.numel()).to(w.device)]
    sample = w[::7, ::5].to(torch.bfloat16).float()
    stats = torch.stack([sample.abs().mean(), sample.square().mean().sqrt()])
    return torch.cat([stats, picks.to(torch.bfloat16).float()]).double().cpu()


def _pick_indices(numel, legacy=False):
    """FINGERPRINT_PICKS evenly spaced entries, in integers (exact at any size, on any device).
    legacy: the float32 spacing goat.py used until 2026-12, wrong past 2**24 entries."""
    if legacy:
        return torch.linspace(0, numel - 1, FINGERPRINT_PICKS).long()
    return torch.arange(FINGERPRINT_PICKS) * (numel - 1) // (FINGERPRINT_PICKS - 1)


def fingerprints_match(saved, weight):
    if saved.numel() == 5:  # written by goat.py before 2026-11: statistics of the unrounded weight
        w = weight.detach().double()
        now = torch.stack([w.abs().mean(), w.square().mean().sqrt(), w[::7, ::5].mean(), w[:, 0].mean(), w[0].mean()])
        return torch.allclose(saved, now.cpu(), rtol=2e-2, atol=1e-6)
    # relative to each entry, and to the weight's RMS for entries near zero (a W0 rebuilt
    # as W_res + c s B0 A0 in bf16 is off by a rounding step of W_res, not of the entry)
    close = lambda now: torch.allclose(saved, now, rtol=1e-2, atol=1e-2 * float(saved[1]))
    if close(weight_fingerprint(weight)):
        return True
    old_picks = _pick_indices(weight.numel(), legacy=True)
    if old_picks.max() >= weight.numel():  # the legacy spacing failed on this size: it wrote nothing
        return False
    legacy = weight.detach().reshape(-1)[old_picks.to(weight.device)]
    return close(torch.cat([weight_fingerprint(weight)[:2], legacy.to(torch.bfloat16).double().cpu()]))


class GOATLinear(_Routed):
    """y = W_res x + b + s * B ((A drop(x)) * expand(G(x))).

    `base` is the frozen nn.Linear, its weight holding W_res. lora_A (r x n) stacks
    the experts' A_i, lora_B (m x r) their B_i; expert i owns rank slots
    [i d, (i+1) d). lora_router (E x n) exists when E > 1. lora_A0 / lora_B0 hold
    the initial factors so the adapter can be re-applied to a pristine base.
    Adapter tensors stay float32 (float64 for a float64 base) whatever dtype the
    model is later cast to.

    The adapter cannot be merged into the weight: the gate depends on the input.
    """

    def __init__(self, base, cfg, name="layer", factors=None, svd_device=None):
        super().__init__()
        _check_linear(base, name)
        m, n = base.weight.shape
        if (cfg.rank if cfg.init in SVD_INITS else cfg.expert_rank) > min(m, n):  # SVD experts share one spectrum
            raise ValueError(f"{name}: rank {cfg.rank} exceeds min(out={m}, in={n}); lower the rank")
        self.cfg, self.name = cfg, name
        self.experts, self.top_k, self.expert_rank = cfg.experts, cfg.top_k, cfg.expert_rank
        self.fingerprint = weight_fingerprint(base.weight)
        if factors is None:
            A0, B0, scale = init_factors(base.weight, cfg, name, svd_device)
        else:  # computed elsewhere (another process, another device): kept on this weight's device
            A0, B0, scale = factors
            A0, B0 = A0.to(base.weight.device), B0.to(base.weight.device)
        dtype = A0.dtype
        if isinstance(scale, (tuple, list)) and len(set(scale)) == 1:
            scale = scale[0]
        if isinstance(scale, (tuple, list)):  # one s per expert (GOAT-s, "adam" on an SVD init)
            self.register_buffer("scaling", torch.tensor(scale, dtype=dtype, device=A0.device))
        else:
            self.scaling = float(scale)
        self.register_buffer("lora_A0", A0.clone())
        self.register_buffer("lora_B0", B0.clone())
        self.lora_A = nn.Parameter(A0.clone())
        self.lora_B = nn.Parameter(B0.clone())
        if self.experts > 1:
            self.lora_router = nn.Parameter(torch.empty(self.experts, n, dtype=dtype, device=A0.device))
            nn.init.kaiming_uniform_(self.lora_router, a=math.sqrt(5))  # as nn.Linear
        else:
            self.lora_router = None  # one expert: gate is 1, plain LoRA
        self.lora_dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()
        # Thm 3.4: W_res = W0 - c s sum_i B_i A_i, computed once in the adapter dtype.
        with torch.no_grad():
            base.weight.copy_(base.weight.to(dtype) - self._init_delta())
        base.requires_grad_(False)
        self.base = base

    def _init_delta(self):
        if isinstance(self.scaling, float):
            return self.cfg.cof * self.scaling * (self.lora_B0 @ self.lora_A0)
        return self.cfg.cof * (self.lora_B0 * self.scaling.repeat_interleave(self.expert_rank)) @ self.lora_A0

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

    def forward(self, x):
        xs = x.reshape(-1, x.shape[-1])
        low = _autocast_dtype(x.device.type)
        if low is not None:  # one low-precision copy of x serves the base, A and the router's gradient
            x_low = xs.to(low)
            y = self.base(x_low)
            mask = None
            if self.training and isinstance(self.lora_dropout, nn.Dropout):
                mask = torch.empty_like(x_low, dtype=torch.bool).bernoulli_(1 - self.cfg.dropout)
            u, logits = _AutocastInput.apply(xs, x_low, self.lora_A, self.lora_router, mask,
                                             1.0 / (1 - self.cfg.dropout))
        else:
            y = self.base(xs)  # W_res x + b, T x m
            xa, logits = xs.to(self.lora_A.dtype), None
            if (self.training and isinstance(self.lora_dropout, nn.Dropout)) or self.lora_router is None:
                # one dropout mask shared by all experts; the router sees the clean input
                u = F.linear(self.lora_dropout(xa), self.lora_A)  # T x r
                if self.lora_router is not None:
                    logits = router_logits(xs, self.lora_router)
            else:  # same input for both: one pass over x computes A x and the router logits
                both = F.linear(xa, torch.cat([self.lora_A, self.lora_router]))
                u, logits = both[:, :self.cfg.rank], both[:, self.cfg.rank:]
        if logits is None:  # plain LoRA
            u = u * self.scaling
        else:
            probs, chosen, gate = gate_from_logits(logits, self.top_k)
            self._remember(probs, chosen, self.lora_router)
            # expand(G): each expert's gate weight (times s) over its d rank slots, via a view
            weights = (gate * self.scaling).to(u.dtype).unsqueeze(-1)
            u = (u.view(-1, self.experts, self.expert_rank) * weights).view_as(u)
        if u.dtype == y.dtype or low is not None:
            out = torch.addmm(y, u, self.lora_B.t())  # y + B u in one kernel
        else:  # e.g. a bf16 base without autocast: adapter in float32, sum cast back
            out = y + F.linear(u, self.lora_B).to(y.dtype)
        return out.view(*x.shape[:-1], self.base.out_features)

    def extra_repr(self):
        scales = self.expert_scales()
        scaling = f"{scales[0]:.4g}" if len(set(scales)) == 1 else f"{min(scales):.4g}..{max(scales):.4g}"
        return (f"rank={self.cfg.rank}, experts={self.experts}, top_k={self.top_k}, "
                f"init={self.cfg.init}, scaling={scaling}")


def moe_loop_forward(layer, x):
    """The same output as GOATLinear.forward, written as the authors' per-expert loop
    (softmax, top-k, then a torch.where and an indexed add per expert). Slow: it syncs
    with the host and loops in Python. A reference for tests and benchmarks."""
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


class UpcycledMoE(_Routed):
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
        self.router = nn.Parameter(torch.empty(experts, base.in_features, dtype=base.weight.dtype,
                                               device=base.weight.device))
        nn.init.kaiming_uniform_(self.router, a=math.sqrt(5))

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


# ---------------------------------------------------------------------------------
# Injection into any model, and the adapter as a portable state dict.

def _parent(model, name):
    parent_name, _, child = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child


def _excluded(name, exclude):
    return name in exclude or any(part in exclude for part in name.split("."))


def unwrappable_linears(model):
    """{name: why} for the nn.Linear modules GOAT must leave alone in any model."""
    why = {}
    uses = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        uses[id(p)] = uses.get(id(p), 0) + 1
    try:
        output_embeddings = model.get_output_embeddings()  # Hugging Face models
    except (AttributeError, NotImplementedError):
        output_embeddings = None
    for name, mod in model.named_modules():
        if isinstance(mod, _Routed):
            why.update({f"{name}.{sub}": "it is inside a GOAT or upcycled-MoE layer already"
                        for sub, _ in mod.named_modules() if sub})
        elif isinstance(mod, nn.MultiheadAttention):  # its forward reads out_proj.weight: an adapter would be bypassed
            why.update({f"{name}.{sub}": "nn.MultiheadAttention reads its out_proj.weight directly, so a wrapped "
                        "out_proj would be bypassed; GOAT adapts the model's other Linears (e.g. the feed-forward "
                        "linear1/linear2 of nn.TransformerEncoderLayer)"
                        for sub, child in mod.named_modules() if isinstance(child, nn.Linear)})
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear) and name not in why:
            if uses.get(id(mod.weight), 0) > 1:
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
    skip = unwrappable_linears(model)
    modules = dict(model.named_modules())
    if targets == "all-linear":
        names = [name for name, mod in modules.items() if isinstance(mod, nn.Linear)
                 and name not in skip and not _excluded(name, exclude)]
        if not names:
            raise ValueError("targets='all-linear' found no nn.Linear outside "
                             f"the excluded modules {tuple(exclude)}")
        for name in names:
            _check_linear(modules[name], name)
        return names
    if isinstance(targets, str):
        targets = [targets]
    if not targets or not all(isinstance(t, str) and t for t in targets):
        raise ValueError(f"targets={targets!r}: give 'all-linear' or module-name suffixes such as ['query', 'value']")
    names = []
    for target in targets:
        hits = [name for name in modules if (name == target or name.endswith("." + target))
                and not _excluded(name, exclude)]  # a head named like a target stays a head
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


def _swap(model, names, make):
    """Replace each named module by make(module, name); only the new modules'
    own parameters (not a wrapped base) stay trainable."""
    for name in names:
        parent, child = _parent(model, name)
        setattr(parent, child, make(getattr(parent, child), name))
    model.requires_grad_(False)
    for name in names:
        for pname, p in model.get_submodule(name).named_parameters():
            p.requires_grad_(not pname.startswith("base."))
    _no_fused_encoder_path(model)
    return names


def _no_fused_encoder_path(model):
    """nn.TransformerEncoderLayer (batch_first, in eval) has a fused inference path that
    reads linear1/linear2.weight and would skip the adapter (a GOATLinear has no .weight,
    so it fails instead). Layers and encoders holding wrapped modules are marked so that
    they take their ordinary path, which calls the modules."""
    for mod in model.modules():
        if isinstance(mod, (nn.TransformerEncoderLayer, nn.TransformerEncoder)) \
                and any(isinstance(m, _Routed) for m in mod.modules()):
            if isinstance(mod, nn.TransformerEncoderLayer):
                mod.activation_relu_or_gelu = 0  # read only by the fused path's checks
            else:
                mod.use_nested_tensor = False


def _refuse_if_wrapped(model):
    wrapped = [name for name, mod in model.named_modules() if isinstance(mod, _Routed)]
    if wrapped:
        raise ValueError(f"the model already has {len(wrapped)} GOAT or upcycled-MoE layers (e.g. {wrapped[0]}); "
                         "wrapping again would nest them: call remove_goat(model) first, or "
                         "load_goat_state_dict(model, state) to replace the adapter")


def initial_factors(model, cfg, names, svd_device=None):
    """{name: (A0, B0, s)} for the named Linears: the SVD work of add_goat, separable so
    that several processes can share it (each computes some layers, then all exchange)."""
    out = {}
    for name in names:
        weight = model.get_submodule(name).weight
        out[name] = init_factors(weight, cfg, name, svd_device)
    return out


def add_goat(model, cfg, targets="all-linear", exclude=DEFAULT_EXCLUDE, svd_device=None, factors=None):
    """Wrap the target nn.Linear modules of `model` in place with GOATLinear, freeze
    everything else, return the wrapped names. Train a head afterwards with
    `head.requires_grad_(True)`. `svd_device`: where to run the SVD inits;
    `factors`: {name: (A0, B0, s)} computed beforehand (see initial_factors)."""
    _refuse_if_wrapped(model)
    names = find_targets(model, targets, exclude)
    factors = factors or {}
    return _swap(model, names, lambda mod, name: GOATLinear(mod, cfg, name, factors=factors.get(name),
                                                           svd_device=svd_device))


def add_upcycled_moe(model, experts=8, top_k=2, targets="all-linear", exclude=DEFAULT_EXCLUDE):
    """The "full-moe" reference: every target Linear becomes an UpcycledMoE."""
    _refuse_if_wrapped(model)
    names = find_targets(model, targets, exclude)
    return _swap(model, names, lambda mod, name: UpcycledMoE(mod, experts, top_k, name))


def goat_layers(model):
    return [(name, mod) for name, mod in model.named_modules() if isinstance(mod, GOATLinear)]


def balance_loss(model):
    """Sum over routed layers of the balance loss of their latest forward (0 if none).
    Each layer's statistics are read once: call it once per forward, before backward."""
    losses = [mod.layer_balance_loss() for mod in model.modules() if isinstance(mod, _Routed)]
    losses = [loss for loss in losses if loss is not None]
    return torch.stack(losses).sum() if losses else torch.zeros(())


def expert_load(model):
    """{layer name: fraction of routed tokens per expert (E,)} from the latest forward."""
    loads = {name: mod.layer_expert_load() for name, mod in model.named_modules()
             if isinstance(mod, _Routed)}
    return {name: load for name, load in loads.items() if load is not None}


CONFIG_KEY = "goat_config"  # the one non-tensor entry of a GOAT state dict (a JSON string)


def goat_state_dict(model):
    """The adapter alone: per layer A, B, router, A0, B0 and the base-weight
    fingerprint, plus CONFIG_KEY: a JSON string of each layer's config."""
    state, layers = {}, {}
    for name, mod in goat_layers(model):
        for key in ("lora_A", "lora_B", "lora_router", "lora_A0", "lora_B0"):
            tensor = getattr(mod, key)
            if tensor is not None:  # a sharded (FSDP) tensor is gathered: every process must call this
                tensor = tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor
                state[f"{name}.{key}"] = tensor.detach().cpu().contiguous()
        state[f"{name}.fingerprint"] = mod.fingerprint
        layers[name] = dict(asdict(mod.cfg), shape=list(mod.base.weight.shape), scale=mod.expert_scales())
    if not layers:
        raise ValueError("the model has no GOAT layers; call add_goat first")
    state[CONFIG_KEY] = json.dumps({"layers": layers})
    return state


def _check_adapter(model, state):
    """Every key, shape, config and base-weight fingerprint of a saved adapter against
    `model`, before anything changes. Returns {layer name: (GOATConfig, s per expert)}."""
    if not isinstance(state, dict) or CONFIG_KEY not in state:
        raise ValueError(f"not a GOAT adapter: no {CONFIG_KEY!r} entry (write it with goat_state_dict)")
    layers = json.loads(state[CONFIG_KEY])["layers"]
    modules = dict(model.named_modules())
    cfgs = {}
    for name, info in layers.items():
        mod = modules.get(name)
        if mod is None:
            raise ValueError(f"adapter layer {name!r} is not in this model: was it saved from another architecture?")
        base = mod.base if isinstance(mod, GOATLinear) else mod
        _check_linear(base, name)
        m, n = base.weight.shape
        if [m, n] != info["shape"]:
            raise ValueError(f"{name}: adapter was saved for a weight of shape {info['shape']}, "
                             f"this model's is {[m, n]}; load it onto its own base model")
        cfg = GOATConfig(**{k: v for k, v in info.items() if k not in ("shape", "scale")})
        cfgs[name] = cfg, tuple(info["scale"])
        shapes = {"lora_A": (cfg.rank, n), "lora_B": (m, cfg.rank), "lora_A0": (cfg.rank, n),
                  "lora_B0": (m, cfg.rank), "fingerprint": None}
        if cfg.experts > 1:
            shapes["lora_router"] = (cfg.experts, n)
        for key, shape in shapes.items():
            tensor = state.get(f"{name}.{key}")
            if not isinstance(tensor, torch.Tensor):
                raise ValueError(f"adapter lacks {name}.{key}: the file is incomplete or not a GOAT adapter")
            if shape is not None and tuple(tensor.shape) != shape:
                raise ValueError(f"{name}.{key} has shape {tuple(tensor.shape)}, expected {shape}")
    for name in layers:  # then the base weights: is this the model the adapter was trained on?
        mod = modules[name]
        base = mod.base if isinstance(mod, GOATLinear) else mod
        pristine = base.weight
        if isinstance(mod, GOATLinear):  # W0 = W_res + c s B0 A0, without touching the model
            pristine = base.weight.to(mod.lora_A0.dtype) + mod._init_delta()
        if not fingerprints_match(state[f"{name}.fingerprint"], pristine):
            raise ValueError(f"{name}: base weight does not match the one the adapter was trained on; "
                             f"load the adapter onto a pristine copy of its own base model "
                             f"(the same checkpoint, in any of float32, bfloat16 or float16)")
    return cfgs


def load_goat_state_dict(model, state):
    """Apply a saved adapter to a pristine copy of its base model (layers already
    wrapped are restored to W0 first): rebuilds W_res from the saved initial factors,
    then loads the trained A, B and router. Checks everything first: a refused
    adapter (another base, shape or architecture, a missing key) changes nothing."""
    cfgs = _check_adapter(model, state)
    remove_goat(model)

    def make(mod, name):
        ref = mod.weight
        A0, B0 = (state[f"{name}.{k}"].to(ref.device) for k in ("lora_A0", "lora_B0"))
        cfg, scale = cfgs[name]
        layer = GOATLinear(mod, cfg, name, factors=(A0, B0, scale))
        with torch.no_grad():
            for key in ("lora_A", "lora_B", "lora_router"):
                if getattr(layer, key) is not None:
                    getattr(layer, key).copy_(state[f"{name}.{key}"])
        return layer
    return _swap(model, list(cfgs), make)


def remove_goat(model):
    """Unwrap every GOATLinear, restoring W0 = W_res + c s B0 A0 (to float tolerance)."""
    for name, mod in goat_layers(model):
        with torch.no_grad():
            mod.base.weight.copy_(mod.base.weight.to(mod.lora_A0.dtype) + mod._init_delta())
        parent, child = _parent(model, name)
        setattr(parent, child, mod.base)
    return model


def trainable_parameters(model):
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
