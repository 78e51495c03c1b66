"""The PRISM language model on one process (TP=1): the Gated DeltaNet special case against an
independent implementation, packed documents, presets, config errors."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from prism_megatron.config import ModelConfig, ParallelConfig
from prism_megatron.token_layout import WholeSequences

CONFIGS = Path(__file__).resolve().parents[1] / "launch" / "configs"
SMALL = dict(vocab_size=64, hidden_size=32, num_layers=2, num_heads=2, head_k_dim=8, head_v_dim=16,
             ffn_hidden_size=48, conv_size=4)


# Rank 0 of 1 (the model's TP layers need megatron-core's process groups).
pytestmark = pytest.mark.usefixtures("single_process")


def _model(**overrides):
    from prism_megatron.model import PrismLM

    return PrismLM(ModelConfig(**{**SMALL, **overrides}), ParallelConfig(), seed=0)


def _gated_deltanet_layer(mixer, x):
    """Gated DeltaNet (fla's layer and naive recurrence), written from its definition with the
    mixer's weights: fused projection, causal depthwise Conv1d + SiLU on q, k, v, q and k
    l2-normalised (fla's l2norm: eps inside the root), the delta rule with decay exp(g) and strength beta, gated RMSNorm, output projection."""
    B, T, _ = x.shape
    H, K, V = mixer.heads, mixer.head_k_dim, mixer.head_v_dim
    q, k, v, z, a, b = mixer.layout.split(x @ mixer.in_proj.weight.T, 1, ("q", "k", "v", "z", "a", "b"))
    qkv = torch.cat([q, k, v], -1).transpose(1, 2)
    width = mixer.conv_weight.shape[1]
    qkv = F.conv1d(qkv, mixer.conv_weight[:, None, :], padding=width - 1, groups=qkv.shape[1])[..., :T]
    q, k, v = F.silu(qkv.transpose(1, 2)).split([H * K, H * K, H * V], dim=-1)
    q, k = (x / torch.sqrt(x.pow(2).sum(-1, keepdim=True) + 1e-6) for x in (q.reshape(B, T, H, K), k.reshape(B, T, H, K)))
    v = v.reshape(B, T, H, V)
    g = -mixer.A_log.exp() * F.softplus(a + mixer.dt_bias)
    beta = torch.sigmoid(b)
    S = x.new_zeros(B, H, K, V)
    outputs = []
    for t in range(T):
        S = S * g[:, t].exp()[..., None, None]
        kt = k[:, t]
        u = beta[:, t, :, None] * (v[:, t] - torch.einsum("bhk,bhkv->bhv", kt, S))
        S = S + torch.einsum("bhk,bhv->bhkv", kt, u)
        outputs.append(torch.einsum("bhk,bhkv->bhv", q[:, t] * K**-0.5, S))
    o = torch.stack(outputs, 1)
    o = o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + mixer.out_norm.eps) * mixer.out_norm.weight
    o = o * F.silu(z.reshape(B, T, H, V))
    return o.reshape(B, T, H * V) @ mixer.out_proj.weight.T


@pytest.mark.parametrize("backend", ["naive", "torch"])
def test_solver_none_is_gated_deltanet(backend):
    model = _model(solver="none", kernel_backend=backend).double()
    mixer = model.layers[0].mixer
    x = torch.randn(2, 11, SMALL["hidden_size"], dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    position = torch.arange(11).expand(2, 11)
    with torch.no_grad():
        torch.testing.assert_close(mixer(x, WholeSequences(position, None)), _gated_deltanet_layer(mixer, x),
                                   atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("solver", ["prism", "split", "none"])
def test_packed_documents_equal_separate_runs(solver):
    """With cu_seqlens the state and the convolution restart at each document."""
    model = _model(solver=solver)
    gen = torch.Generator().manual_seed(1)
    first, second = torch.randint(0, 64, (1, 7), generator=gen), torch.randint(0, 64, (1, 9), generator=gen)
    packed = model(torch.cat([first, second], 1), cu_seqlens=torch.tensor([0, 7, 16], dtype=torch.int32))
    separate = torch.cat([model(first), model(second)], 1)
    torch.testing.assert_close(packed, separate, atol=1e-5, rtol=1e-5)
    # Rows of a batch are sequences too, and cu_seqlens spans the flattened rows.
    rows = torch.cat([first[:, :6], second[:, :6]])
    torch.testing.assert_close(model(rows), model(rows, cu_seqlens=torch.tensor([0, 6, 12], dtype=torch.int32)),
                               atol=1e-5, rtol=1e-5)


def test_loss_and_gradients():
    """The loss is the mean token cross-entropy of the logits; every parameter gets a gradient."""
    model = _model(tie_embeddings=True)
    gen = torch.Generator().manual_seed(2)
    tokens, labels = torch.randint(0, 64, (2, 8), generator=gen), torch.randint(0, 64, (2, 8), generator=gen)
    logits = model.gather_logits(model(tokens))
    assert logits.shape == (2, 8, 64)
    loss = model(tokens, labels)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, F.cross_entropy(logits.reshape(-1, 64), labels.reshape(-1)))
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert model.lm_head.weight is None  # tied: the head uses the embedding
    assert model.num_parameters() == _model().num_parameters() - 64 * SMALL["hidden_size"]


def test_logits_of_the_kept_positions_only():
    """logits_to_keep as transformers means it: the last n positions, or the positions a tensor names."""
    model = _model()
    tokens = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        logits = model(tokens)
        torch.testing.assert_close(model(tokens, logits_to_keep=3), logits[:, -3:])
        torch.testing.assert_close(model(tokens, logits_to_keep=torch.tensor([0, 5])), logits[:, [0, 5]])


def test_initialization_is_deterministic():
    a, b, c = _model(), _model(), _model()
    c.reset_parameters(seed=1)
    for (name, pa), pb, pc in zip(a.named_parameters(), b.parameters(), c.parameters()):
        assert torch.equal(pa, pb), name
        assert name.endswith(("norm.weight", "gain_bias", "strength_bias")) or not torch.equal(pa, pc), name


def test_any_seed_draws_the_weights():
    """An unseeded process's torch.initial_seed() (PrismLM's seed by default) takes all 64 bits."""
    from prism_megatron.model import PrismLM

    with torch.random.fork_rng():
        torch.manual_seed(2**64 - 1)
        model = PrismLM(ModelConfig(vocab_size=50, hidden_size=32, num_layers=1, num_heads=2, head_k_dim=8,
                                    head_v_dim=8, ffn_hidden_size=48), ParallelConfig())
    assert all(p.isfinite().all() for p in model.parameters())


@pytest.mark.parametrize("name,low,high", [("tiny", 2e6, 5e6), ("125m", 1.1e8, 1.4e8), ("1.3b", 1.25e9, 1.45e9),
                                           ("2.7b", 2.5e9, 2.9e9), ("7b", 6.5e9, 7.5e9)])
def test_presets(name, low, high):
    """Each preset's model section builds (on the meta device: nothing allocated) at its size."""
    from prism_megatron.model import PrismLM

    cfg = ModelConfig(**yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())["model"])
    with torch.device("meta"):
        model = PrismLM(cfg, ParallelConfig())
    assert low <= model.num_parameters() <= high


@pytest.mark.parametrize("field,value", [("solver", "gdn"), ("recompute", "some"), ("fused_ops", "maybe"),
                                         ("num_heads", 0), ("norm_eps", 0.0)])
def test_bad_config_names_the_field(field, value):
    with pytest.raises(ValueError, match=f"model.{field}"):
        ModelConfig(**{field: value}).validate()


def test_weight_decay_spares_biases_and_norms():
    from prism_megatron.launch.engine import weight_decay_groups

    model = _model(solver_steps=3)
    decay, no_decay = weight_decay_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)].rsplit(".", 1)[-1] for p in decay["params"]}
    spared = {names[id(p)].rsplit(".", 1)[-1] for p in no_decay["params"]}
    assert {"gain_bias", "strength_bias", "dt_bias", "A_log"} <= spared
    assert {"gain_weight", "key_weight", "strength_weight", "weight"} <= decayed
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_packed_layout_is_built_once_per_batch(monkeypatch):
    """The Triton path reads cu_seqlens back to the host once per forward (in PrismLM.forward) and
    builds the kernel's chunk table once, not once per layer."""
    from prism_megatron.kernels.prism import launch_config

    model = _model(num_layers=3, kernel_backend="triton")
    reads, tables = [], []
    tolist, table_init = torch.Tensor.tolist, launch_config.PackedChunkTable.__init__
    monkeypatch.setattr(torch.Tensor, "tolist", lambda self: reads.append(self.shape) or tolist(self))
    monkeypatch.setattr(launch_config.PackedChunkTable, "__init__",
                        lambda self, cu: tables.append(cu.shape) or table_init(self, cu))
    model(torch.zeros(1, 16, dtype=torch.long), cu_seqlens=torch.tensor([0, 7, 16])).sum().backward()
    assert reads == [torch.Size([3])] and tables == [torch.Size([3])]


@pytest.mark.parametrize("recompute", ["selective", "full"])
def test_recompute_gives_the_same_gradients(recompute, monkeypatch):
    """Recomputation re-runs the recurrence in the backward and changes no loss or gradient (float64,
    packed documents)."""
    from prism_megatron import token_layout

    calls = []
    recurrence = token_layout.prism_recurrence
    monkeypatch.setattr(token_layout, "prism_recurrence", lambda *a, **kw: calls.append(1) or recurrence(*a, **kw))
    gen = torch.Generator().manual_seed(4)
    tokens, labels = torch.randint(0, 64, (2, 10), generator=gen), torch.randint(0, 64, (2, 10), generator=gen)
    cu_seqlens = torch.tensor([0, 3, 10, 20])
    results = []
    for mode in ("none", recompute):
        model = _model(recompute=mode).double()
        loss = model(tokens, labels, cu_seqlens=cu_seqlens)
        loss.backward()
        results.append((loss, {name: p.grad for name, p in model.named_parameters()}))
    assert len(calls) == 3 * SMALL["num_layers"]  # once per layer without recomputation, twice with
    (loss, grads), (loss_r, grads_r) = results
    torch.testing.assert_close(loss_r, loss, atol=0, rtol=0)
    for name in grads:
        torch.testing.assert_close(grads_r[name], grads[name], atol=1e-14, rtol=1e-12, msg=name)


@pytest.mark.parametrize("solver", [dict(solver="prism"), dict(solver="split", solver_steps=2, solver_rank=4),
                                    dict(solver="none"),
                                    dict(solver="prism", solver_steps=2, solver_first_residual="v",
                                         solver_erase_strength="input", solver_extra_strength_bias=-2.0)],
                         ids=["prism", "split", "none", "prism-options"])
def test_fused_ops_match_the_reference(solver):
    """The fused glue (Triton short convolution under the interpreter, torch.compile's C++ kernels on
    the CPU, the solver's recomputing backward, SwiGLU with the down projection) against the PyTorch
    code it replaces, in float32 on packed documents: the loss and every gradient to rounding."""
    gen = torch.Generator().manual_seed(5)
    tokens, labels = torch.randint(0, 64, (2, 12), generator=gen), torch.randint(0, 64, (2, 12), generator=gen)
    cu_seqlens = torch.tensor([0, 5, 12, 24])
    results = []
    for mode in ("off", "on"):
        model = _model(**solver, fused_ops=mode)
        loss = model(tokens, labels, cu_seqlens=cu_seqlens)
        loss.backward()
        results.append((loss, {name: p.grad for name, p in model.named_parameters()}))
    (loss, grads), (loss_fused, grads_fused) = results
    torch.testing.assert_close(loss_fused, loss, atol=0, rtol=1e-6)
    for name, grad in grads.items():  # relative to each gradient's norm: float32 rounding is ~1e-7
        assert (grads_fused[name] - grad).norm() <= 2e-6 * grad.norm(), name


@pytest.mark.gpu
@pytest.mark.parametrize("solver", ["prism", "none"])
def test_fused_ops_within_bf16_rounding_gpu(solver):
    """bf16 on the GPU, Triton recurrence in both: the fused model's loss and gradients are as close to
    the float32 reference model's as the bf16 reference model's are (no more than 1.5x as far)."""
    shape = dict(hidden_size=256, num_layers=2, num_heads=4, head_k_dim=64, head_v_dim=64, ffn_hidden_size=512,
                 vocab_size=512, solver=solver, kernel_backend="triton")
    gen = torch.Generator().manual_seed(6)
    tokens = torch.randint(0, 512, (1, 1024), generator=gen).cuda()
    labels = torch.randint(0, 512, (1, 1024), generator=gen).cuda()
    cu_seqlens = torch.tensor([0, 300, 301, 1024]).cuda()

    def run(mode, dtype):
        with torch.device("cuda"):
            model = _model(**shape, fused_ops=mode).to(dtype)
        loss = model(tokens, labels, cu_seqlens=cu_seqlens)
        loss.backward()
        return loss.double(), {name: p.grad.double() for name, p in model.named_parameters()}

    exact_loss, exact = run("off", torch.float32)
    ref_loss, ref = run("off", torch.bfloat16)
    fused_loss, fused = run("auto", torch.bfloat16)
    assert abs(fused_loss - exact_loss) <= 1.5 * abs(ref_loss - exact_loss) + 1e-3
    for name, grad in exact.items():
        ref_err, fused_err = (ref[name] - grad).norm(), (fused[name] - grad).norm()
        assert fused_err <= 1.5 * ref_err + 1e-3 * grad.norm(), (name, fused_err.item(), ref_err.item())
