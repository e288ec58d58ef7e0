"""Per-image results, which test images a model got right: kept in the JSON results as packed bits,
and read back for the paired comparisons of bench/rule.py."""
import base64

import numpy as np


def pack_bits(flags):
    """A boolean vector as a short string (packed bits, base64): which test images a model got right,
    small enough to keep one per evaluated model in the JSON results."""
    packed = np.packbits(np.asarray(flags, dtype=bool))
    return base64.b64encode(packed.tobytes()).decode("ascii")


def unpack_bits(text, n):
    """The boolean vector of length n that pack_bits encoded; a ValueError where the text cannot hold
    exactly n flags (a test set of another size)."""
    flags = np.unpackbits(np.frombuffer(base64.b64decode(text), dtype=np.uint8))
    if len(flags) != -(-n // 8) * 8 or flags[n:].any():
        raise ValueError(f"packed results of {len(flags) // 8} bytes do not hold {n} flags (another "
                         "test set size?)")
    return flags[:n].astype(bool)
