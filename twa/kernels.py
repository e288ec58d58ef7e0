"""The compiled products of large low-precision bases (storage.py uses them from FUSED_MIN_COLUMNS
columns on): torch.compile kernels (C++ on the CPU, Triton on GPUs) that convert each stored entry
in registers as they read it, with float32 sums and a float32 vector (no vector rounded to 16 bits)."""
import functools

import torch

TILE = 2048  # columns per partial sum of a 16-bit product P v in fused_matvec


@functools.cache
def compiled(kernel):
    """kernel through torch.compile, built on first use: importing the compiler takes seconds."""
    return torch.compile(kernel, dynamic=None)


def codes(data, scale, bits):
    """The stored codes as float32 pieces (k, groups, entries): one at 8 bits; at 4 bits two, the low
    nibbles (even columns) and the high nibbles (odd columns), unpacked where they are read."""
    data = data.view(data.shape[0], scale.shape[1], -1)
    return [data.float()] if bits == 8 else [(data & 15).float(), (data >> 4).float()]


def fused_matvec(data, scale, low, v, bits):
    """P v, v padded to the stored columns; 16 bits: times gain."""
    # 16 bits as partial sums over tiles of columns: the generated loop then hands whole rows to
    # each thread (a plain row sum splits every row between the threads); 99 against 119 ms at
    # 101 x 15M here
    if bits == 16:
        k, dim = data.shape
        whole = dim // TILE * TILE
        tiles = data.as_strided((whole // TILE, k, TILE), (TILE, dim, 1))
        partial = (tiles.float() * v[:whole].view(-1, 1, TILE)).sum(2)  # (tiles, k)
        return partial.sum(0) + (data[:, whole:].float() * v[whole:]).sum(1)
    pieces = codes(data, scale, bits)
    v = v.view(scale.shape[1], -1, len(pieces))  # (groups, entries, pieces)
    # one long sum per row and piece (measured faster here than tiles, unlike 16 bits)
    dots = sum((codes * scale[..., None] * v[..., j]).sum((1, 2)) for j, codes in enumerate(pieces))
    return dots + (low * v.sum((1, 2))).sum(1)  # the offsets multiply group sums


def fused_rmatvec(data, scale, low, c, bits):
    """P^T c at 8 and 4 bits, over all the stored columns (whole groups). (At 16 bits the chunked
    product measured faster: this one reads the rows in an order memory serves worse, which costs
    more the more bytes an entry has.)"""
    weights = (c[:, None] * scale)[..., None]  # (k, groups, 1)
    offsets = (c[:, None] * low).sum(0)[:, None]  # one value per group
    return torch.stack([(codes * weights).sum(0) + offsets for codes in codes(data, scale, bits)],
                       -1).view(-1)
