"""Context parallelism on the CPU (gloo, 4 processes; about 4 minutes on 2 cores): the sample split over CP = 2 and 4 ranks
computes what CP = 1 computes, on the op (outputs, final states and gradients; torch backend in
float64, Triton under the interpreter in float32), and on the whole model with TP, through training steps, with documents that start, end and
cross at rank boundaries and fewer heads than CP ranks."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_tensor_parallel import global_grads, run_distributed

from prism_megatron.config import ModelConfig, ParallelConfig

WORLD = 4
T = 32  # 16, 8 tokens a rank at CP = 2, 4
# Documents ending at 8 and 24 start ranks 1 (CP=4) and 3; the one from 9 crosses ranks 1..2 (CP=4),
# the one from 24 runs to the end; 16 (the CP=2 boundary) lies inside a document.
PACKED = [0, 8, 9, 24, T]


def _inputs(B, H, K, V, L, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def unit(*shape):
        return F.normalize(torch.randn(*shape, generator=gen, dtype=torch.float64), dim=-1).to(dtype)

    return dict(q=unit(B, T, H, K), k=unit(B, T, H, K),
                d=torch.randn(B, T, H, L, V, generator=gen, dtype=torch.float64).to(dtype),
                kx=unit(B, T, H, L - 1, K),
                beta=torch.rand(B, T, H, L, generator=gen, dtype=torch.float64).to(dtype),
                g=(-0.5 * torch.rand(B, T, H, generator=gen, dtype=torch.float64)).to(dtype),
                do=torch.randn(B, T, H, V, generator=gen, dtype=torch.float64).to(dtype))


def _op_worker(backend: str, dtype, K: int, V: int, atol: float):
    import torch.distributed as dist  # noqa: F401 (initialised by initialize_parallel)

    from prism_megatron.context_parallel import ContextSlice, context_parallel_recurrence
    from prism_megatron.model import token_positions
    from prism_megatron.kernels.prism import prism_recurrence
    from prism_megatron.process_groups import cp_rank, initialize_parallel
    from megatron.core import parallel_state

    names = ("q", "k", "d", "kx", "beta", "g")
    # The whole batch at CP = 1, once per batch: the reference of every CP size.
    references = []
    for B, bounds in ((1, PACKED), (2, None)):
        x = _inputs(B, 2, K, V, 3, dtype)
        cu = None if bounds is None else torch.tensor(bounds, dtype=torch.int32)
        full = {n: x[n].clone().requires_grad_() for n in names}
        o_ref, final_ref = prism_recurrence(*(full[n] for n in names), scale=0.5, output_final_state=True,
                                            cu_seqlens=cu, backend=backend)
        o_ref.backward(x["do"])
        references.append((B, bounds, x, cu, full, o_ref, final_ref))
    for cp in (2, 4):
        for B, bounds, x, cu, full, o_ref, final_ref in references:
            sequence_ends = (bounds[1:] if bounds else [T * (row + 1) for row in range(B)])

            initialize_parallel(ParallelConfig(context_parallel_size=cp), seed=0)
            local = T // cp
            part = slice(cp_rank() * local, (cp_rank() + 1) * local)
            context = ContextSlice.build(token_positions(B, T, cu, "cpu"))
            mine = {n: x[n][:, part].clone().requires_grad_() for n in names}
            packed = {n: t.reshape((1, B * local) + t.shape[2:]) for n, t in mine.items()}
            o, final = context_parallel_recurrence(*(packed[n] for n in names), 0.5, context, backend)
            o = o.reshape(B, local, *o.shape[2:])
            o.backward(x["do"][:, part])
            what = f"{backend} CP={cp} B={B}"
            torch.testing.assert_close(o, o_ref[:, part].detach(), atol=atol, rtol=0, msg=lambda m: f"o {what}: {m}")
            # A local sequence that ends a document (or a row) on this rank ends with that one's final state.
            compared = 0
            for i, end in enumerate(context.cu_seqlens[1:].tolist()):  # local flat index just past it
                row = (end - 1) // local
                at = row * T + cp_rank() * local + end - row * local  # the same in the whole batch
                if at in sequence_ends:
                    compared += 1
                    torch.testing.assert_close(final[i], final_ref[sequence_ends.index(at)].detach(), atol=atol,
                                               rtol=0, msg=lambda m: f"final state {what}: {m}")
            mine_end = [e for e in sequence_ends if cp_rank() * local < e - (e - 1) // T * T <= (cp_rank() + 1) * local]
            assert compared == len(mine_end), f"{what}: {compared} final states compared, {len(mine_end)} end here"
            for n in names:
                torch.testing.assert_close(mine[n].grad, full[n].grad[:, part], atol=atol, rtol=0,
                                           msg=lambda m: f"d{n} {what}: {m}")
            parallel_state.destroy_model_parallel()


def _op_backends_worker():
    _op_worker("torch", torch.float64, 8, 8, 1e-12)
    # Triton needs V + K <= 256; at K = V = 16 the augmented pass carries 32 columns.
    _op_worker("triton", torch.float32, 16, 16, 2e-5)


def test_op_matches_cp1():
    run_distributed(WORLD, _op_backends_worker)


TINY = dict(vocab_size=100, hidden_size=32, num_layers=2, num_heads=2, head_k_dim=8, head_v_dim=8,
            ffn_hidden_size=64, solver_steps=3)
STEPS = 3
ATOL, RTOL = 2e-5, 1e-4


def _batch(step: int):
    gen = torch.Generator().manual_seed(100 + step)
    tokens = torch.randint(0, TINY["vocab_size"], (2, T + 1), generator=gen)
    cu = torch.tensor(PACKED + [T + 5, 2 * T], dtype=torch.int32)
    return dict(tokens=tokens[:, :-1], labels=tokens[:, 1:], cu_seqlens=cu)


def _close(name, got, want):
    torch.testing.assert_close(got, want, atol=ATOL, rtol=RTOL, msg=lambda m: f"{name}: {m}")


def _step(model, opt, batch, average_group):
    """One AdamW step with the gradients averaged over `average_group`, as DeepSpeed averages them
    over its data-parallel group (DP x CP); returns the loss averaged the same way."""
    import torch.distributed as dist

    loss = model(batch["tokens"], batch["labels"], cu_seqlens=batch["cu_seqlens"])
    opt.zero_grad()
    loss.backward()
    size = dist.get_world_size(average_group)
    for p in model.parameters():
        dist.all_reduce(p.grad, group=average_group)
        p.grad /= size
    opt.step()
    loss = loss.detach().clone()
    dist.all_reduce(loss, group=average_group)
    return loss / size


def _model_worker(layouts):
    from megatron.core import parallel_state

    from prism_megatron.context_parallel import slice_batch
    from prism_megatron.model import PrismLM
    from prism_megatron.process_groups import deepspeed_mpu, initialize_parallel
    from prism_megatron.sharding import global_state_dict

    cfg = ModelConfig(**TINY)
    initialize_parallel(ParallelConfig(), seed=0)
    ref = PrismLM(cfg, ParallelConfig(), seed=0)
    single = torch.distributed.new_group([torch.distributed.get_rank()])  # ranks' own: no averaging
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-3, weight_decay=0.1)
    ref_losses, ref_grads = [], None
    for step in range(STEPS):
        ref_losses.append(_step(ref, ref_opt, _batch(step), single))
        ref_grads = ref_grads or global_grads(ref)
    ref_final = global_state_dict(ref)

    for tp, cp in layouts:
        parallel_state.destroy_model_parallel()
        parallel = ParallelConfig(tensor_model_parallel_size=tp, context_parallel_size=cp)
        initialize_parallel(parallel, seed=0)
        model = PrismLM(cfg, parallel, seed=0)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
        group = deepspeed_mpu().get_data_parallel_group()
        for step in range(STEPS):
            loss = _step(model, opt, slice_batch(_batch(step)), group)
            _close(f"loss of step {step} (TP={tp} CP={cp})", loss, ref_losses[step])
            if step == 0:
                for name, grad in global_grads(model).items():
                    _close(f"grad of {name} (TP={tp} CP={cp})", grad, ref_grads[name])
        for name, value in global_state_dict(model).items():
            _close(f"{name} after {STEPS} steps (TP={tp} CP={cp})", value, ref_final[name])
    # The model takes this rank's slice: 2 tokens, fewer than the convolution's halo.
    with pytest.raises(ValueError, match="conv_size - 1 = 3 tokens per rank"):
        model(torch.zeros(1, 2, dtype=torch.long))


def test_model_trains_as_cp1():
    # CP = 4 with 2 heads (fewer heads than CP ranks); CP = 2 x TP = 2.
    run_distributed(WORLD, _model_worker, [(1, 4), (2, 2)])
