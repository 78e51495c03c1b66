"""The solvers of docs/SOLVERS.md (prism, split, none) and their options (rank, key normalisation,
initial biases and key scale, prism's first residual and erase strength): the mixer's output and
gradients against a float64 token loop written here from the equations, parameter counts against the
documented formulas, and config errors."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from prism_megatron.config import SOLVER_INIT, ModelConfig, ParallelConfig
from prism_megatron.token_layout import WholeSequences

SMALL = dict(vocab_size=64, hidden_size=32, num_layers=1, num_heads=2, head_k_dim=8, head_v_dim=16,
             ffn_hidden_size=48, conv_size=4)

pytestmark = pytest.mark.usefixtures("single_process")


def _l2norm(x):
    return x / torch.sqrt(x.pow(2).sum(-1, keepdim=True) + 1e-6)


def _head_map(solver, name, h, l):
    """W^l of head h as one matrix [out, V]: the full weight, or the product of the low-rank factors."""
    if solver.rank is None:
        return getattr(solver, f"{name}_weight")[h, l]
    return getattr(solver, f"{name}_up")[h, l] @ getattr(solver, f"{name}_down")[h]


def _writes(cfg, solver, h, u, v, k, b):
    """One token of head h: the writes (strength, key, direction) of S += strength * key direction^T,
    the first of which also erases along its key. u, v: [V]; k: [K]; b: the in_proj's strength logit."""
    if cfg.solver == "none":
        return [(torch.sigmoid(b), k, v)]
    L, init = cfg.solver_steps, cfg.solver_init
    strength = [torch.sigmoid(solver.strength_weight[h, s] @ u + solver.strength_bias[h, s])
                for s in range(solver.strength_bias.shape[1])]
    gain = [_head_map(solver, "gain", h, l) @ u + solver.gain_bias[h, l] for l in range(L)]
    if cfg.solver == "prism":  # Eq. 11-16
        if cfg.solver_erase_strength == "input":  # b^1 from x, as Gated DeltaNet's
            strength = [torch.sigmoid(b)] + strength
        keys = [k] + [_head_map(solver, "key", h, l) @ u for l in range(L - 1)]
        keys = keys[:1] + [_l2norm(x) if init.key_norm else x for x in keys[1:]]
        residual, writes = v if cfg.solver_first_residual == "v" else v - u, []
        for l in range(L):
            d = F.gelu(gain[l] * residual)
            writes.append((strength[l], keys[l], d))
            residual = residual - d
        return writes
    share = [torch.sigmoid(p) for p in gain]  # split: stick-breaking shares of v
    keys = [_head_map(solver, "key", h, l) @ u for l in range(L)]
    keys = [_l2norm(x) if init.key_norm else x for x in keys]
    return [(torch.sigmoid(b), k, v)] + [
        (strength[l], keys[l], share[l] * math.prod(1 - share[j] for j in range(l)) * v) for l in range(L)]


def reference_mixer(mixer, cfg, x):
    """The mixer's output from its weights, token by token: in_proj, causal depthwise conv (SiLU on
    q, k, v; none on the anchor u), l2-normalised q and k, decay, the solver's writes, the state update
    S = a (S - b^1 k k^T S) + sum_l b^l kappa^l d^l^T, o = S^T q / sqrt(K), gated RMSNorm, out_proj."""
    B, T, _ = x.shape
    H, K, V = cfg.num_heads, cfg.head_k_dim, cfg.head_v_dim
    names = tuple(name for name, _ in mixer.layout.parts)
    parts = dict(zip(names, mixer.layout.split(x @ mixer.in_proj.weight.T, 1, names)))
    conv_in = torch.cat([parts[name] for name in mixer.layout.conv_parts], -1).transpose(1, 2)
    width = mixer.conv_weight.shape[1]
    conv = F.conv1d(conv_in, mixer.conv_weight[:, None, :], padding=width - 1, groups=conv_in.shape[1])
    conv = conv[..., :T].transpose(1, 2)
    q, k, v, u = (conv.split([H * K, H * K, H * V, H * V], -1) if "u" in parts
                  else (*conv.split([H * K, H * K, H * V], -1), None))
    q, k = (_l2norm(F.silu(y).reshape(B, T, H, K)) for y in (q, k))
    v = F.silu(v).reshape(B, T, H, V)
    u = u.reshape(B, T, H, V) if u is not None else v  # Gated DeltaNet has no anchor: a stand-in, unused
    b = parts.get("b", torch.zeros(B, T, H, dtype=x.dtype))
    g = -mixer.A_log.exp() * F.softplus(parts["a"] + mixer.dt_bias)
    o = torch.zeros(B, T, H, V, dtype=x.dtype)
    for n in range(B):
        for h in range(H):
            S = x.new_zeros(K, V)
            for t in range(T):
                writes = _writes(cfg, mixer.solver, h, u[n, t, h], v[n, t, h], k[n, t, h], b[n, t, h])
                erase_strength, erase_key, _ = writes[0]
                S = g[n, t, h].exp() * (S - erase_strength * torch.outer(erase_key, erase_key @ S))
                for strength, key, direction in writes:
                    S = S + strength * torch.outer(key, direction)
                o[n, t, h] = S.T @ q[n, t, h] * K**-0.5
    o = o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + mixer.out_norm.eps) * mixer.out_norm.weight
    o = o * F.silu(parts["z"].reshape(B, T, H, V))
    return o.reshape(B, T, H * V) @ mixer.out_proj.weight.T


VARIANTS = {
    "none": dict(solver="none"),
    "prism-L1": dict(solver="prism", solver_steps=1),
    "prism-L3": dict(solver="prism", solver_steps=3),
    "prism-L3-rank3": dict(solver="prism", solver_steps=3, solver_rank=3),
    "prism-L2-options": dict(solver="prism", solver_steps=2, solver_key_norm=False, solver_gain_bias=0.5,
                             solver_strength_bias=-1.0),
    "split-L1": dict(solver="split", solver_steps=1),
    "split-L3": dict(solver="split", solver_steps=3),
    "split-L2-rank3-options": dict(solver="split", solver_steps=2, solver_rank=3, solver_key_norm=True,
                                   solver_gain_bias=-0.5, solver_strength_bias=1.0),
    # The candidates of issue 31's screen (docs/SOLVERS.md section 4).
    "prism-L2-first-residual-v": dict(solver="prism", solver_steps=2, solver_first_residual="v"),
    "prism-L3-erase-from-input": dict(solver="prism", solver_steps=3, solver_erase_strength="input",
                                      solver_extra_strength_bias=-3.0),
    "prism-L2-extra-strength-bias": dict(solver="prism", solver_steps=2, solver_strength_bias=0.5,
                                         solver_extra_strength_bias=-4.0, solver_key_init_std=0.01),
    "prism-L1-erase-from-input-v": dict(solver="prism", solver_steps=1, solver_erase_strength="input",
                                        solver_first_residual="v"),
    "split-L2-rank3-key-init-std": dict(solver="split", solver_steps=2, solver_rank=3, solver_strength_bias=0.0,
                                        solver_key_init_std=0.006),
}


def initial_strength_biases(cfg: ModelConfig) -> list[float]:
    """docs/SOLVERS.md's initial c_b of each strength the solver makes from the anchor."""
    init, L = cfg.solver_init, cfg.solver_steps
    if cfg.solver == "split":
        return [init.strength_bias] * L
    extra = init.strength_bias if cfg.solver_extra_strength_bias is None else cfg.solver_extra_strength_bias
    return ([] if cfg.solver_erase_strength == "input" else [init.strength_bias]) + [extra] * (L - 1)


def _mixer(variant, backend="torch"):
    from prism_megatron.model import PrismLM

    cfg = ModelConfig(**SMALL, **VARIANTS[variant], kernel_backend=backend)
    return PrismLM(cfg, ParallelConfig(), seed=0).double().layers[0].mixer, cfg


@pytest.mark.parametrize("variant", VARIANTS)
def test_mixer_matches_token_loop(variant):
    """Output, and the gradients of the input and every parameter."""
    mixer, cfg = _mixer(variant)
    if mixer.solver is not None:  # the biases start where the config says
        biases = torch.tensor(initial_strength_biases(cfg), dtype=torch.float64)
        assert torch.all(mixer.solver.gain_bias == cfg.solver_init.gain_bias)
        assert torch.equal(mixer.solver.strength_bias, biases.expand(mixer.solver.strength_bias.shape))
    # Generic weights, so that a mixed-up index or a missing term shows.
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in mixer.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    x = torch.randn(2, 9, SMALL["hidden_size"], dtype=torch.float64, generator=gen, requires_grad=True)
    dy = torch.randn(2, 9, SMALL["hidden_size"], dtype=torch.float64, generator=gen)
    inputs = [x, *mixer.parameters()]
    got = mixer(x, WholeSequences(torch.arange(9).expand(2, 9), None))
    expected = reference_mixer(mixer, cfg, x)
    torch.testing.assert_close(got, expected, atol=1e-12, rtol=1e-10)
    names = ["x"] + [name for name, _ in mixer.named_parameters()]
    # materialize_grads: prism at L = 1 with b^1 from x has empty strength parameters, which the loop skips.
    expected_grads = torch.autograd.grad(expected, inputs, dy, materialize_grads=True)
    for name, a, b in zip(names, torch.autograd.grad(got, inputs, dy), expected_grads):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10, msg=name)


def solver_parameters(cfg: ModelConfig) -> int:
    """docs/SOLVERS.md's count of one layer's solver parameters."""
    H, K, V, L, r = cfg.num_heads, cfg.head_k_dim, cfg.head_v_dim, cfg.solver_steps, cfg.solver_rank
    if cfg.solver == "none":
        return 0
    keys = L - 1 if cfg.solver == "prism" else L
    strengths = L - (cfg.solver_erase_strength == "input")  # b^1 from x: not the solver's

    def maps(outputs, size):
        return 0 if outputs == 0 else (outputs * size * V if r is None else r * V + outputs * size * r)

    return H * (maps(L, V) + L * V + maps(keys, K) + strengths * V + strengths)


@pytest.mark.parametrize("variant", VARIANTS)
def test_parameter_count(variant):
    """The solver's parameters match the documented formula; in_proj's parts are the layout's."""
    mixer, cfg = _mixer(variant)
    counted = sum(p.numel() for p in mixer.solver.parameters()) if mixer.solver is not None else 0
    assert counted == solver_parameters(cfg)
    H, K, V, D = cfg.num_heads, cfg.head_k_dim, cfg.head_v_dim, cfg.hidden_size
    anchor = cfg.solver != "none"
    b_from_x = cfg.solver != "prism" or cfg.solver_erase_strength == "input"
    assert mixer.in_proj.weight.numel() == D * (2 * H * K + 2 * H * V + H + anchor * H * V + b_from_x * H)


def test_unset_options_take_the_solver_defaults():
    assert ModelConfig(solver="split").solver_init == SOLVER_INIT["split"]
    assert ModelConfig(solver="prism", solver_strength_bias=3.0).solver_init.strength_bias == 3.0
    assert ModelConfig(solver="prism", solver_strength_bias=3.0).solver_init.gain_bias == SOLVER_INIT["prism"].gain_bias


@pytest.mark.parametrize("fields,key", [
    (dict(solver="split", solver_steps=4), "model.solver_steps"),  # 5 directions
    (dict(solver="prism", solver_steps=5), "model.solver_steps"),
    (dict(solver_rank=0), "model.solver_rank"),
    (dict(solver_rank=64, head_v_dim=64), "model.solver_rank"),
    (dict(solver="none", solver_rank=8), "model.solver_rank"),
    (dict(solver="none", solver_key_norm=False), "model.solver_key_norm"),
    (dict(solver="none", solver_strength_bias=2.0), "model.solver_strength_bias"),
    (dict(solver="none", solver_key_init_std=0.01), "model.solver_key_init_std"),
    (dict(solver_key_init_std=0.0), "model.solver_key_init_std"),
    (dict(solver_steps=1, solver_key_init_std=0.01), "model.solver_key_init_std"),  # no extra keys
    (dict(solver_first_residual="u"), "model.solver_first_residual"),
    (dict(solver="split", solver_first_residual="v"), "model.solver_first_residual"),
    (dict(solver_erase_strength="x"), "model.solver_erase_strength"),
    (dict(solver="none", solver_erase_strength="input"), "model.solver_erase_strength"),
    (dict(solver="split", solver_extra_strength_bias=-6.0), "model.solver_extra_strength_bias"),
    (dict(solver_steps=1, solver_extra_strength_bias=-6.0), "model.solver_extra_strength_bias"),
])
def test_bad_solver_config_names_the_key(fields, key):
    with pytest.raises(ValueError, match=key) as error:
        ModelConfig(**fields).validate()
    assert "\n" not in str(error.value)


def test_key_init_std_scales_the_key_map():
    """solver_key_init_std draws the same map W_k (seeded by its name) at another std than V^-1/2."""
    from prism_megatron.model import PrismLM

    maps = [PrismLM(ModelConfig(**SMALL, solver="split", solver_steps=2, **fields), ParallelConfig(), seed=0)
            .layers[0].mixer.solver.key_weight for fields in ({}, dict(solver_key_init_std=0.006))]
    torch.testing.assert_close(maps[1], maps[0] * 0.006 * SMALL["head_v_dim"] ** 0.5, rtol=3e-7, atol=0)


def test_headwise_linear_matches_einsum():
    """The solvers' GEMM over heads, on strided token rows as the mixer passes them (a slice of the
    convolution's output), against einsum: output and both gradients, float64."""
    from prism_megatron.solver import HeadwiseLinear

    gen = torch.Generator().manual_seed(0)
    wide = torch.randn(7, 3 * 5 + 4, generator=gen, dtype=torch.float64)
    x = wide[:, 2:2 + 3 * 5].unflatten(-1, (3, 5)).requires_grad_()  # [N=7, H=3, I=5], rows strided
    weight = torch.randn(3, 6, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    dy = torch.randn(7, 3, 6, generator=gen, dtype=torch.float64)
    expected = torch.einsum("nhi,hoi->nho", x, weight)
    grads = torch.autograd.grad(expected, (x, weight), dy)
    got = HeadwiseLinear.apply(x, weight)
    torch.testing.assert_close(got, expected, atol=1e-14, rtol=1e-14)
    for a, b in zip(torch.autograd.grad(got, (x, weight), dy), grads):
        torch.testing.assert_close(a, b, atol=1e-14, rtol=1e-14)
