"""Tile loads, casts and the matrix products shared by the PRISM chunk kernels.

Rows of every [tokens, heads, ...] tensor are addressed by an int64 element offset per row, so
products of B, T, H and the head dims never wrap at 2^31. Tiles that a kernel needs transposed are
loaded transposed from memory, or transposed as elementwise results of loads: Triton miscompiles
`tl.trans` of a `tl.dot` result on Hopper (docs/PERFORMANCE.md), so no kernel here transposes a product.
"""
import os

import triton
import triton.language as tl

# Triton's interpreter truncates float32 -> bfloat16 casts (and garbles those of transposed tiles),
# where the GPU rounds to nearest even. Under it, products round their operands to bfloat16 or TF32
# precision by bit arithmetic, as the tensor cores would, and `cast` rounds stored bfloat16 the same
# way: the CPU tests then see the GPU's rounding error.
INTERPRETED = tl.constexpr(os.environ.get("TRITON_INTERPRET") == "1")


@triton.jit
def chunk_rows(chunks, i_c, i_h, H: tl.constexpr, C: tl.constexpr):
    """Chunk i_c of the chunk table: its first token, its sequence's end, and per row the token, whether
    it lies inside the sequence, and the [token, head] row index for head i_h."""
    t0 = tl.load(chunks + 2 * i_c).to(tl.int64)
    t_end = tl.load(chunks + 2 * i_c + 1).to(tl.int64)
    tok = t0 + tl.arange(0, C)
    m_c = tok < t_end
    return t0, t_end, tok, m_c, tok * H + i_h


@triton.jit
def sequence_chunks(cu_seqlens, chunk_offsets, i_n):
    """Sequence i_n's first and end token, its first chunk and its number of chunks."""
    c0 = tl.load(chunk_offsets + i_n).to(tl.int64)
    n_chunks = tl.load(chunk_offsets + i_n + 1).to(tl.int64) - c0
    return tl.load(cu_seqlens + i_n).to(tl.int64), tl.load(cu_seqlens + i_n + 1).to(tl.int64), c0, n_chunks


@triton.jit
def state_tile(i_v, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
    """Element offsets and mask of the [BK, BV] block i_v of value columns of a K x V state."""
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    return o_k[:, None] * V + o_v[None, :], (o_k < K)[:, None] & (o_v < V)[None, :]


@triton.jit
def load_rows(ptr, row_off, m_row, cols, ncols):
    """[rows, cols] tile in the tensor's own dtype; row r starts at element row_off[r]."""
    mask = m_row[:, None] & (cols < ncols)[None, :]
    return tl.load(ptr + row_off[:, None] + cols[None, :], mask=mask, other=0.0)


@triton.jit
def load_rows_t(ptr, row_off, m_row, cols, ncols):
    """The same tile as load_rows, transposed: [cols, rows]."""
    mask = (cols < ncols)[:, None] & m_row[None, :]
    return tl.load(ptr + row_off[None, :] + cols[:, None], mask=mask, other=0.0)


@triton.jit
def _rounded(x, DROP: tl.constexpr):
    """float32 x rounded to nearest-even with its DROP lowest mantissa bits cleared: 16 gives bfloat16's
    precision, 13 TF32's."""
    i = x.to(tl.float32).to(tl.int32, bitcast=True)
    i = (i + ((1 << (DROP - 1)) - 1) + ((i >> DROP) & 1)) & -(1 << DROP)
    return i.to(tl.float32, bitcast=True)


@triton.jit
def cast(x, dtype: tl.constexpr):
    """x.to(dtype), rounded to nearest even as on the GPU: Triton's interpreter truncates float32 to
    bfloat16, which would bias every stored bfloat16 intermediate by half a unit in the last place."""
    if INTERPRETED:
        if dtype == tl.bfloat16:
            x = _rounded(x, 16)
    return x.to(dtype)


@triton.jit
def operand(x, IEEE: tl.constexpr):
    """x rounded as mm rounds its operands (bfloat16 for 16-bit inputs; float32 ones stay): for tiles a
    kernel keeps only to multiply with, which then take half the registers."""
    if IEEE:
        y = x
    else:
        y = cast(x, tl.bfloat16)
    return y


@triton.jit
def mm(a, b, IEEE: tl.constexpr):
    """a @ b accumulated in float32: bfloat16 operands for 16-bit inputs (the tensor-core rate, and
    half the shared memory of float32 ones), exact float32 products for float32 inputs. (Not tf32x3: it put
    the initial state's gradient outside the float32 budget and needs more shared memory than Hopper has at
    K = 256: docs/PERFORMANCE.md.)"""
    if IEEE:
        c = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    elif INTERPRETED:
        c = tl.dot(_rounded(a, 16), _rounded(b, 16), input_precision="ieee")
    else:
        c = tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16))
    return c


@triton.jit
def mm_tf32(a, b, IEEE: tl.constexpr):
    """a @ b with TF32 operands for 16-bit inputs, for products of float32 tiles that must keep more
    precision than bfloat16 (the triangular inverse's block merges); exact float32 products for float32
    inputs."""
    if IEEE:
        c = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    elif INTERPRETED:
        c = tl.dot(_rounded(a, 13), _rounded(b, 13), input_precision="ieee")
    else:
        c = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="tf32")
    return c


@triton.jit
def chunk_decay(g_cum, m_row, lower: tl.constexpr, strict: tl.constexpr, C: tl.constexpr):
    """exp(G_r - G_i) on the (strict or inclusive) lower triangle r >= i, or its transpose
    (upper triangle, element [i, r]) when lower is False; zero elsewhere and on rows or columns
    past the sequence end (m_row false), whose G is not a decay and could overflow exp."""
    o = tl.arange(0, C)
    if lower:
        diff = g_cum[:, None] - g_cum[None, :]
        if strict:
            keep = o[:, None] > o[None, :]
        else:
            keep = o[:, None] >= o[None, :]
    else:
        diff = g_cum[None, :] - g_cum[:, None]
        if strict:
            keep = o[:, None] < o[None, :]
        else:
            keep = o[:, None] <= o[None, :]
    keep = keep & m_row[:, None] & m_row[None, :]
    return tl.where(keep, tl.exp(tl.where(keep, diff, 0.0)), 0.0)
