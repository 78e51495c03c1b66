"""Tensor and sequence parallelism on the CPU (gloo, several processes): a TP model holding the TP=1
model's weights, split, computes what TP=1 computes, and trains the same way."""
from __future__ import annotations

import os
import traceback

import pytest
import torch
import torch.multiprocessing as mp

from prism_megatron.config import ModelConfig, ParallelConfig
from prism_megatron.process_groups import free_port
from prism_megatron.sharding import ShardSpec, gather_global, padded_vocab_size

# vocab 100 exercises the padding of the vocab-parallel embedding and head.
TINY = dict(vocab_size=100, hidden_size=32, num_layers=2, num_heads=4, head_k_dim=8, head_v_dim=8,
            ffn_hidden_size=64, solver_steps=3)
# fp32 rounding of sums taken in another order, through two layers and a few optimizer steps.
ATOL, RTOL = 2e-5, 1e-4
STEPS = 3
# Small enough that AdamW's normalisation of near-zero gradients keeps rounding differences small.
LR = 1e-3


def global_grads(model) -> dict:
    """Every parameter's gradient as a global tensor (a collective: call on all ranks)."""
    return {name: gather_global(p, p.grad.detach()) for name, p in model.named_parameters()}

def _entry(rank, world, port, fn, args, errors):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    try:
        fn(*args)
    except BaseException:
        errors.put(f"rank {rank}:\n{traceback.format_exc()}")
        raise


def run_distributed(world: int, fn, *args) -> None:
    """Run fn(*args) on `world` gloo processes; fail with the first failing rank's traceback."""
    ctx = mp.get_context("spawn")
    errors = ctx.SimpleQueue()
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(r, world, port, fn, args, errors)) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=600)
    if not errors.empty():
        pytest.fail(errors.get(), pytrace=False)
    assert [p.exitcode for p in procs] == [0] * world


def _batch(step: int, batch: int = 2, length: int = 16):
    """The same tokens, labels and document bounds on every rank."""
    gen = torch.Generator().manual_seed(100 + step)
    tokens = torch.randint(0, TINY["vocab_size"], (batch, length + 1), generator=gen)
    cu_seqlens = torch.tensor([0, 5, 21, batch * length], dtype=torch.int32)
    return tokens[:, :-1], tokens[:, 1:], cu_seqlens


def _close(name, got, want):
    torch.testing.assert_close(got, want, atol=ATOL, rtol=RTOL, msg=lambda m: f"{name}: {m}")


def _train(model, steps):
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.1)
    losses = []
    for step in range(steps):
        tokens, labels, cu = _batch(1 + step)
        loss = model(tokens, labels, cu_seqlens=cu)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def _equivalence_worker(tp: int, sequence_parallel: tuple[bool, ...], tie_embeddings: bool, solver: dict):
    import torch.distributed as dist
    from megatron.core import parallel_state

    from prism_megatron.model import PrismLM
    from prism_megatron.process_groups import initialize_parallel, tp_group
    from prism_megatron.sharding import global_state_dict

    cfg = ModelConfig(**{**TINY, **solver}, tie_embeddings=tie_embeddings)
    tokens, labels, cu = _batch(0)

    initialize_parallel(ParallelConfig(1), seed=0)
    ref = PrismLM(cfg, ParallelConfig(1), seed=0)
    ref_init = global_state_dict(ref)
    ref_logits = ref.gather_logits(ref(tokens, cu_seqlens=cu))
    ref_loss = ref(tokens, labels, cu_seqlens=cu)
    ref_loss.backward()
    ref_grads = global_grads(ref)
    ref_losses = _train(ref, STEPS)
    ref_final = global_state_dict(ref)

    for sp in sequence_parallel:
        parallel_state.destroy_model_parallel()
        parallel = ParallelConfig(tp, sp)
        initialize_parallel(parallel, seed=0)
        model = PrismLM(cfg, parallel, seed=0)
        # Initialization does not depend on the TP size: the shards are the TP=1 weights, split.
        for name, want in global_state_dict(model).items():
            assert torch.equal(want, ref_init[name]), name
        logits = model(tokens, cu_seqlens=cu)
        assert logits.shape == (2, 16, padded_vocab_size(cfg.vocab_size, tp) // tp)
        _close(f"logits (SP={sp})", model.gather_logits(logits), ref_logits)
        loss = model(tokens, labels, cu_seqlens=cu)
        _close(f"loss (SP={sp})", loss, ref_loss)
        loss.backward()
        for name, grad in global_grads(model).items():
            _close(f"grad of {name} (SP={sp})", grad, ref_grads[name])
        for p in model.parameters():
            p.grad = None
        _close(f"losses of training steps (SP={sp})", torch.tensor(_train(model, STEPS)), torch.tensor(ref_losses))
        final = global_state_dict(model)
        for name, p in model.named_parameters():
            _close(f"{name} after training (SP={sp})", final[name], ref_final[name])
            if not p.tensor_model_parallel:
                copies = [torch.empty_like(p) for _ in range(tp)]
                dist.all_gather(copies, p.detach(), group=tp_group())
                assert all(torch.equal(c, copies[0]) for c in copies), f"replicated {name} differs across TP ranks"
    _check_errors(tp)


def _check_errors(tp: int):
    from prism_megatron.model import PrismLM

    for bad, what in ((dict(num_heads=tp + 1), "num_heads"), (dict(ffn_hidden_size=64 + 1), "output part of size")):
        with pytest.raises(ValueError, match=what):
            PrismLM(ModelConfig(**{**TINY, **bad}), ParallelConfig(tp, True))
    with pytest.raises(ValueError, match="tensor_model_parallel_size=1 but the process groups have TP size"):
        PrismLM(ModelConfig(**TINY), ParallelConfig(1))
    model = PrismLM(ModelConfig(**TINY), ParallelConfig(tp, True))
    with pytest.raises(ValueError, match="sequence length 15 does not divide"):
        model(torch.zeros(1, 15, dtype=torch.long))


@pytest.mark.parametrize("tp,sequence_parallel,tie_embeddings,solver", [
    (2, (False, True), False, {}), (4, (True,), True, {}),
    # The split solver with low-rank maps: L + 1 = 4 directions, in_proj's b part, per-head factors.
    (2, (True,), False, dict(solver="split", solver_steps=3, solver_rank=4)),
    # prism with b^1 from in_proj's b part and L - 1 strengths from the anchor.
    (2, (True,), False, dict(solver="prism", solver_steps=2, solver_erase_strength="input"))],
    ids=["tp2", "tp4", "tp2-split", "tp2-prism-erase-from-input"])
def test_tp_matches_tp1(tp, sequence_parallel, tie_embeddings, solver):
    """Same logits, loss, gradients (gathered) and weights after AdamW steps as TP=1, with and
    without SP; replicated parameters identical on every TP rank; clear errors for sizes that do
    not split."""
    run_distributed(tp, _equivalence_worker, tp, sequence_parallel, tie_embeddings, solver)


def _deepspeed_worker():
    import deepspeed
    from megatron.core import parallel_state

    from prism_megatron.model import PrismLM
    from prism_megatron.process_groups import deepspeed_mpu, initialize_parallel
    from prism_megatron.sharding import global_state_dict

    def train(tp):
        parallel = ParallelConfig(tp, tp > 1)
        initialize_parallel(parallel, seed=0)
        model = PrismLM(ModelConfig(**TINY), parallel, seed=0)
        engine, *_ = deepspeed.initialize(
            model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.1),
            mpu=deepspeed_mpu(),
            config={"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
                    "gradient_clipping": 1.0, "zero_optimization": {"stage": 2}, "steps_per_print": 10**9})
        losses = []
        for step in range(STEPS):
            tokens, labels, cu = _batch(step)
            loss = engine(tokens, labels, cu_seqlens=cu)
            engine.backward(loss)
            engine.step()
            losses.append(loss.item())
        state = global_state_dict(model)
        parallel_state.destroy_model_parallel()
        return torch.tensor(losses), state

    # TP=1 on two ranks is data parallel over identical batches: the same steps as one rank.
    ref_losses, ref_state = train(1)
    losses, state = train(2)
    _close("DeepSpeed losses step by step", losses, ref_losses)
    for name, want in ref_state.items():
        _close(f"{name} after DeepSpeed steps", state[name], want)


def test_deepspeed_tp2_matches_tp1():
    """ZeRO-2 with mpu=deepspeed_mpu(): TP=2+SP x DP=1 takes the same steps as TP=1."""
    run_distributed(2, _deepspeed_worker)


def _relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).norm() / want.float().norm()).item()


def _bf16_worker(backend: str):
    from megatron.core import parallel_state

    from prism_megatron.model import PrismLM
    from prism_megatron.process_groups import initialize_parallel
    from prism_megatron.sharding import global_state_dict, load_global_state_dict

    cfg = ModelConfig(vocab_size=1000, hidden_size=256, num_layers=2, num_heads=4, head_k_dim=64, head_v_dim=64,
                      ffn_hidden_size=512, kernel_backend=backend)

    def loss_and_grads(model):
        loss = model(tokens, labels, cu_seqlens=cu)
        loss.backward()
        grads = global_grads(model)
        model.zero_grad(set_to_none=True)
        return loss.float(), grads

    initialize_parallel(ParallelConfig(1), seed=0)  # also picks this rank's GPU
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, cfg.vocab_size, (2, 513), generator=gen).cuda()
    tokens, labels = tokens[:, :-1], tokens[:, 1:]
    cu = torch.tensor([0, 100, 700, 1024], dtype=torch.int32, device="cuda")
    fp32 = PrismLM(cfg, ParallelConfig(1), seed=0)
    weights = global_state_dict(fp32)
    loss32, grads32 = loss_and_grads(fp32)
    loss16, grads16 = loss_and_grads(fp32.bfloat16())
    parallel_state.destroy_model_parallel()

    parallel = ParallelConfig(2, sequence_parallel=True)
    initialize_parallel(parallel, seed=0)
    model = PrismLM(cfg, parallel, seed=1)
    load_global_state_dict(model, weights)
    loss_tp, grads_tp = loss_and_grads(model.bfloat16())
    # TP=2+SP in bf16 is as close to the fp32 model as TP=1 in bf16 is.
    errors = {name: (_relative_error(grads_tp[name], g), _relative_error(grads16[name], g)) for name, g in grads32.items()}
    if torch.distributed.get_rank() == 0:
        print(f"\nbackend {backend}: loss fp32 {loss32.item():.6f} | TP=1 bf16 {loss16.item():.6f} | "
              f"TP=2+SP bf16 {loss_tp.item():.6f}")
        for name, (tp_err, ref_err) in errors.items():
            print(f"  grad rel. error vs fp32 of {name}: TP=2+SP bf16 {tp_err:.2e}, TP=1 bf16 {ref_err:.2e}")
    assert abs(loss_tp - loss16) < 2e-2 and abs(loss_tp - loss32) < 2e-2
    for name, (tp_err, ref_err) in errors.items():
        assert tp_err < 2 * ref_err + 1e-2, (name, tp_err, ref_err)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs (NCCL, bf16)")
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_sp_bf16_on_two_gpus(backend):
    """TP=2 with SP in bf16 over NCCL: loss and gradients as close to the fp32 model as TP=1 bf16."""
    run_distributed(2, _bf16_worker, backend)


@pytest.mark.parametrize("tp", [1, 2, 4, 8])
def test_shard_spec_round_trip(tp):
    """Fused segments and padded vocabularies split and join back for any TP size."""
    full = torch.randn(3 * 8 + 2 * 16, 5)
    spec = ShardSpec(0, segments=(8, 8, 8, 16, 16))
    shards = [spec.shard(full, r, tp) for r in range(tp)]
    assert torch.equal(spec.unshard(shards), full)
    # Each shard holds its slice of every part, in part order.
    assert torch.equal(shards[-1][: 8 // tp], full[8 - 8 // tp: 8])

    vocab = torch.randn(100, 5)
    spec = ShardSpec(0, vocab_size=100)
    shards = [spec.shard(vocab, r, tp) for r in range(tp)]
    assert all(s.shape == (padded_vocab_size(100, tp) // tp, 5) for s in shards)
    assert torch.equal(spec.unshard(shards), vocab)
    assert spec.global_shape(shards[0].shape, tp) == (100, 5)

    row = torch.randn(5, 32)
    spec = ShardSpec(1)
    assert torch.equal(spec.unshard([spec.shard(row, r, tp) for r in range(tp)]), row)
