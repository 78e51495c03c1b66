"""How the PRISM chunk kernels are launched: the chunk table their grids run over, and every kernel's
block sizes, warps and pipelining depth. Each kernel module's launcher takes its configuration from here.
"""
from __future__ import annotations

import functools

import torch
import triton

CHUNK = 64


class PackedChunkTable:
    """Where the chunks of packed sequences lie: per chunk its first token and its sequence's end,
    per sequence its first chunk. Every chunk lies inside one sequence."""

    def __init__(self, cu_seqlens: torch.Tensor):
        lengths = cu_seqlens[1:] - cu_seqlens[:-1]
        n_chunks = (lengths + CHUNK - 1) // CHUNK
        self.cu_seqlens = cu_seqlens.to(torch.int32).contiguous()
        self.chunk_offsets = torch.nn.functional.pad(n_chunks.cumsum(0), (1, 0)).to(torch.int32)
        self.num_chunks = int(self.chunk_offsets[-1])
        self.num_seqs = lengths.numel()
        seq = torch.repeat_interleave(torch.arange(self.num_seqs, device=cu_seqlens.device), n_chunks)
        first = cu_seqlens[seq] + (torch.arange(self.num_chunks, device=cu_seqlens.device)
                                   - self.chunk_offsets[seq].long()) * CHUNK
        self.chunks = torch.stack([first, cu_seqlens[seq + 1]], 1).to(torch.int32).contiguous()


def key_blocks(k: torch.Tensor) -> dict:
    """Whole key rows in one block (BK); IEEE for float32 inputs, whose products stay exact float32."""
    K = k.shape[-1]
    return dict(K=K, BK=max(16, triton.next_power_of_2(K)), IEEE=k.dtype == torch.float32)


def value_blocks(k: torch.Tensor, V: int) -> dict:
    """key_blocks and value columns in blocks of BV: 64 for 16-bit inputs, 16 for float32 ones, whose tiles
    take twice the shared memory. (Not 32 for 16-bit inputs: those blocks fault on Hopper, most likely
    a Triton bug with 32-wide dot operands, docs/PERFORMANCE.md. The state scans alone run with 32:
    scan_values.)"""
    blocks = key_blocks(k)
    BV = 16 if blocks["IEEE"] else 64
    return dict(blocks, V=V, BV=min(BV, max(16, triton.next_power_of_2(V))))


# Warps per kernel at BK = 128, the fastest of per-kernel timings (docs/PERFORMANCE.md); the backward's
# gradient kernels hold several [C, BK] float32 accumulators and want the registers of 8.
WARPS = dict(solve=1, wy_fwd=4, state_fwd=4, output=4, du_local=4, state_bwd=8, pseudo_value_grad=4,
             output_state_grad=8, extra_key_grad=8, wy_bwd=4, wy_bwd_extra_keys=8)
# Kernels whose largest tiles are the chunk's [C, C] float32 matrices, which do not shrink with K, so they
# keep their warps at K <= 64. (wy_bwd with extra keys is not among them: it runs faster on half its warps,
# docs/PERFORMANCE.md.)
SQUARE_TILED = ("solve", "wy_fwd", "output", "pseudo_value_grad", "wy_bwd")


def warps(kernel: str, blocks: dict) -> int:
    """Half as many warps for K <= 64, whose [C, BK] and [BK, BV] tiles are half as large."""
    return WARPS[kernel] // 2 if blocks["BK"] <= 64 and kernel not in SQUARE_TILED else WARPS[kernel]


def stages(stage_bytes: int, resident_bytes: int = 0, deepest: int = 2) -> int:
    """Software-pipelining depth of a kernel's loop over chunks (state scans) or value blocks whose every
    iteration loads stage_bytes of tiles, next to resident_bytes of tiles loaded once: the most stages, up
    to deepest, that fit in Hopper's 227 KiB of shared memory with room to spare."""
    fits = [n for n in range(2, deepest + 1) if resident_bytes + n * stage_bytes <= 210 * 1024]
    return max(fits, default=1)


def local_stages(blocks: dict, stage_bytes: int, resident_bytes: int) -> int:
    """stages for the chunk-local gradient kernels' loops over value blocks: up to 3 (Triton's default) for
    16-bit inputs, faster than 2 (docs/PERFORMANCE.md); up to 2 for float32 ones, whose tiles come closest
    to the shared-memory limit."""
    return stages(stage_bytes, resident_bytes, 2 if blocks["IEEE"] else 3)


def tile_bytes(blocks: dict, key: int = 0, value: int = 0, state: int = 0, square: int = 0) -> int:
    """Bytes of tiles in the input dtype: key [C, BK], value [C, BV], state [BK, BV] and square [C, C] ones."""
    size = 4 if blocks["IEEE"] else 2
    return size * (CHUNK * (key * blocks["BK"] + value * blocks["BV"] + square * CHUNK)
                   + state * blocks["BK"] * blocks["BV"])


@functools.lru_cache(maxsize=None)
def multiprocessors(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


def scan_values(blocks: dict, num_seqs: int, H: int, device: torch.device) -> dict:
    """blocks with value blocks of 32 columns for 16-bit inputs where the state scans would otherwise run
    fewer programs than the GPU has multiprocessors (long single sequences): the scans are sequential over
    chunks, so their time is the chunk count times one step's latency, and more programs share it out
    (docs/PERFORMANCE.md). With many programs the scans keep 64 columns."""
    if blocks["IEEE"] or num_seqs * H * triton.cdiv(blocks["V"], blocks["BV"]) >= multiprocessors(device):
        return blocks
    return dict(blocks, BV=min(blocks["BV"], 32))


def wide_values(blocks: dict) -> dict:
    """blocks with value blocks of up to 128 columns for 16-bit inputs at K <= 128 (float32 tiles, or K = 256,
    take twice the shared memory): for kernels that form a [C, C] matrix to multiply every value block with."""
    if blocks["IEEE"] or blocks["BK"] > 128:
        return blocks
    return dict(blocks, BV=min(128, max(16, triton.next_power_of_2(blocks["V"]))))
