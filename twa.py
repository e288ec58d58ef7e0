"""Trainable Weight Averaging (Li et al., ICLR 2023): train the coefficients of a weighted average of
checkpoints, i.e. run SGD inside the subspace that the checkpoints span.

Works with any nn.Module and any training loop:

    space = Subspace.from_checkpoints(model, [f"ckpt/{i}.pt" for i in range(101)])
    trainer = TWA(model, space)                      # model now holds the mean of the checkpoints
    opt = torch.optim.SGD(trainer.parameters(), lr=2, momentum=0.9, weight_decay=1e-5)
    for x, y in loader:
        F.cross_entropy(model(x), y).backward()
        trainer.step(opt)                            # dL/dc = P g; step on c; weights = P^T c
    alpha = space.checkpoint_coefficients(trainer.coordinates)[0]   # sum_i alpha_i w_i = weights

P (k x D) is an orthonormal basis of the checkpoints' span, built by streaming the checkpoints one at a
time (Gram-Schmidt applied twice per vector), so that only P itself is ever held in memory. Training
the k coordinates c is the paper's projected SGD (g -> P^T P g) written in the subspace's own
coordinates: the same trajectory, with no D-sized optimizer state. Weights are written as
mean + P^T (c - P mean) with the checkpoints' mean kept in float32, so that they stay exactly inside
the span of the stored basis, and a basis stored in 16, 8 or 4 bits only perturbs their deviation
from the mean.

With layer_size=S (the journal version's layer-wise TWA) each block of consecutive parameter tensors
gets its own coefficients: P becomes block-diagonal and alpha has one row per block.
"""
import functools
import logging
import math
import zipfile
from collections.abc import Mapping

import torch
import torch.distributed as dist
from torch import nn

log = logging.getLogger(__name__)

# Columns of a low-precision basis converted to float32 at once. On CPU: long enough that each row's
# piece streams from memory at full speed (shorter pieces measured slower), small enough that the
# float32 block of a 100-row basis (13 MiB) stays in the last-level cache for the product that reads
# it again. Accelerators convert at memory speed and pay per launch, so they take larger blocks.
BLOCK = 1 << 15
DEVICE_BLOCK = 1 << 18
QUANT_GROUP = 256  # entries per row that share one affine quantisation scale (8 and 4 bits)
# Low-precision bases with at least this many columns multiply through one compiled kernel per
# product (see _fused_matvec); smaller ones are not worth its compile time of a few seconds.
FUSED_MIN_COLUMNS = 1 << 18
TILE = 2048  # columns per partial sum of a 16-bit product P v in _fused_matvec
# Blocks of layer-wise TWA smaller than this stay in float32 whatever the storage precision: they cost
# little, and a rounded basis of a block with fewer entries than checkpoints would never reach a
# residual below the tolerance, so it would keep adding rows past the block's own dimension.
SMALL_BLOCK = 16 * QUANT_GROUP
WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # added by DataParallel/DDP and torch.compile
# where training checkpoints keep the model's weights, e.g. {"model": ..., "optimizer": ...}
MODEL_KEYS = ("state_dict", "model", "model_state_dict")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: missing, unreadable, unsafe or of another model."""


# ---------------------------------------------------------------------------------------------------
# Reading checkpoints
# ---------------------------------------------------------------------------------------------------

def check_readable(path):
    """Cheap up-front check that a torch.save file is whole: a zip archive's directory sits at its
    end, so reading it catches truncation without loading any tensor."""
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                archive.namelist()
            return
        with open(path, "rb") as f:
            legacy = f.read(1) == b"\x80"  # torch < 1.6 wrote a plain pickle stream
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint not found: {path}") from None
    except (zipfile.BadZipFile, OSError) as err:
        raise CheckpointError(f"checkpoint {path} is truncated or corrupt ({err})") from None
    if not legacy:
        raise CheckpointError(f"checkpoint {path} is truncated or corrupt (not a torch.save file)")


def load_state_dict(source):
    """A state_dict from a file or a mapping, without wrapper prefixes; files load weights only."""
    if isinstance(source, Mapping):
        state = source
    else:
        try:
            state = torch.load(source, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise CheckpointError(f"checkpoint not found: {source}") from None
        except Exception as err:  # torch raises UnpicklingError, RuntimeError or EOFError here
            if "weights_only" in str(err) or "Unsupported global" in str(err):
                raise CheckpointError(f"refusing to load {source}: it holds pickled Python objects, "
                                      "not just tensors (loaded with weights_only=True)") from None
            raise CheckpointError(f"checkpoint {source} is unreadable "
                                  f"({type(err).__name__}: {str(err).splitlines()[0]})") from None
        state = _unwrap_training_checkpoint(state)
    if not isinstance(state, Mapping):
        raise CheckpointError(f"checkpoint {source} holds a {type(state).__name__}, not a state_dict")
    if state and not any(torch.is_tensor(value) for value in state.values()):
        raise CheckpointError(f"checkpoint {source} holds no tensors at its top level (keys "
                              f"{sorted(map(str, state))[:6]}): save model.state_dict() itself, or "
                              f"a dict with it under one of {list(MODEL_KEYS)}")
    return {_strip_prefixes(key): value for key, value in state.items()}


def _unwrap_training_checkpoint(state):
    """The model's state_dict from a training checkpoint such as {"model": ..., "optimizer": ...}."""
    if isinstance(state, Mapping):
        for key in MODEL_KEYS:
            if isinstance(state.get(key), Mapping):
                return state[key]
    return state


def _strip_prefixes(key):
    for prefix in WRAPPER_PREFIXES:
        while key.startswith(prefix):
            key = key[len(prefix):]
    return key


def _describe(source, index=None):
    if not isinstance(source, Mapping):
        return str(source)
    return "state_dict" if index is None else f"state_dict #{index}"


def trainable_parameters(model):
    """(name, parameter) pairs that TWA averages: trainable parameters, buffers excluded."""
    return [(name, p) for name, p in model.named_parameters() if p.requires_grad]


def flatten_checkpoint(state, params, source="state_dict", out=None, columns=None):
    """The trainable parameters of `state` as one float32 vector, checked against the model's and
    to be finite; columns=(lo, hi) keeps only entries [lo, hi) of that vector (a shard)."""
    total = sum(p.numel() for _, p in params)
    lo, hi = columns or (0, total)
    out = torch.empty(hi - lo, dtype=torch.float32) if out is None else out
    offset = 0
    for name, p in params:
        if name not in state:
            raise CheckpointError(f"{source} does not match the model: it has no '{name}'")
        value = state[name]
        if not torch.is_tensor(value):
            raise CheckpointError(f"{source}: '{name}' is a {type(value).__name__}, not a tensor")
        if tuple(value.shape) != tuple(p.shape):
            raise CheckpointError(f"{source} does not match the model: '{name}' has shape "
                                  f"{tuple(value.shape)}, the model {tuple(p.shape)}")
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            # the whole tensor, not just this shard: every process stops at the same file
            raise CheckpointError(f"{source}: '{name}' holds NaN or Inf values")
        start, stop = max(offset, lo), min(offset + p.numel(), hi)
        if start < stop:
            out[start - lo:stop - lo].copy_(value.reshape(-1)[start - offset:stop - offset])
        offset += p.numel()
    return out


# ---------------------------------------------------------------------------------------------------
# Sharding over processes
# ---------------------------------------------------------------------------------------------------

# the current names of the single-tensor collectives, and those of torch releases before them
_all_gather = getattr(dist, "all_gather_single", None) or getattr(dist, "all_gather_into_tensor", None)
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or \
    getattr(dist, "reduce_scatter_tensor", None)

class Sharding:
    """The columns [lo, hi) of the D-dimensional weight vectors that this process keeps.

    With N processes (torch.distributed initialised) the basis is split by columns: each rank
    stores about D/N entries of every row, and the full k x D basis never exists anywhere. Every
    product with the basis is then a sum of per-shard products, so only k-sized sums cross between
    processes, plus one all-gather of the D weights per training step. Columns rather than rows:
    rows would need the whole D-sized gradient and weights to meet every rank's rows, and rank
    deficiency would leave shards uneven."""

    def __init__(self, dim, group=None):
        distributed = dist.is_available() and dist.is_initialized()
        self.group = group
        self.world = dist.get_world_size(group) if distributed else 1
        self.rank = dist.get_rank(group) if distributed else 0
        self.per_rank = math.ceil(dim / self.world / QUANT_GROUP) * QUANT_GROUP
        self.lo = min(self.rank * self.per_rank, dim)
        self.hi = min(self.lo + self.per_rank, dim)
        self.dim = dim

    @property
    def size(self):
        return self.hi - self.lo

    def columns(self, start, stop):
        """Entries [start, stop) of the D-vector, as a slice of this process's shard (maybe empty)."""
        lo, hi = min(max(start, self.lo), self.hi), max(min(stop, self.hi), self.lo)
        return slice(lo - self.lo, max(lo, hi) - self.lo)

    def sum_(self, tensor):
        """Sum over the processes, in place (k-sized tensors only)."""
        if self.world > 1:
            dist.all_reduce(tensor, group=self.group)
        return tensor

    def norm(self, part):
        """The norm of a vector from its shards (`part`: this process's)."""
        square = torch.linalg.vector_norm(part, dtype=torch.float64).square().reshape(1)
        return self.sum_(square).sqrt().item()

    def gather_(self, full, part):
        """full[:D] = the concatenated shards; `full` holds world x per_rank entries, `part`
        (this process's) per_rank (its tail past hi - lo is ignored)."""
        _all_gather(full, part, group=self.group)

    def scatter_sum_(self, part, full):
        """part = this process's shard of `full` summed over the processes (the reverse of gather_:
        `full` holds world x per_rank entries, `part` per_rank)."""
        _reduce_scatter(part, full, group=self.group)
        return part


# ---------------------------------------------------------------------------------------------------
# Basis storage: k rows of length D at 32, 16, 8 or 4 bits, read and written by column blocks
# ---------------------------------------------------------------------------------------------------

# The products of a large low-precision basis, as torch.compile kernels (C++ on the CPU, Triton on
# GPUs) that convert each stored entry in registers as they read it: one pass over the stored bytes
# per product, with float32 sums and a float32 vector (no vector rounded to 16 bits). The blocked
# products in Basis remain for float32, small bases, and where no compiler is available.

@functools.cache
def _compiled(kernel):
    """kernel through torch.compile, built on first use: importing the compiler takes seconds."""
    return torch.compile(kernel, dynamic=None)


def _outside_graphs(function, *args):
    """function(*args) run as it is even inside a compiled step (--compile): torch 2.14.1 compiled
    the blocked low-precision products of a step into wrong weights (the last partial group of
    columns; tests/test_device.py compares a compiled 8-bit step with the eager one)."""
    return torch.compiler.disable(function)(*args)


def _write(out, values, accumulate, alpha):
    """out += alpha values, or out = alpha values."""
    return out.add_(values, alpha=alpha) if accumulate else torch.mul(values, alpha, out=out)


def _codes(data, scale, bits):
    """The stored codes as float32 pieces (k, groups, entries): one at 8 bits; at 4 bits two, the low
    nibbles (even columns) and the high nibbles (odd columns), unpacked where they are read."""
    data = data.view(data.shape[0], scale.shape[1], -1)
    return [data.float()] if bits == 8 else [(data & 15).float(), (data >> 4).float()]


def _fused_matvec(data, scale, low, v, bits):
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
    pieces = _codes(data, scale, bits)
    v = v.view(scale.shape[1], -1, len(pieces))  # (groups, entries, pieces)
    # one long sum per row and piece (measured faster here than tiles, unlike 16 bits)
    dots = sum((codes * scale[..., None] * v[..., j]).sum((1, 2)) for j, codes in enumerate(pieces))
    return dots + (low * v.sum((1, 2))).sum(1)  # the offsets multiply group sums


def _fused_rmatvec(data, scale, low, c, bits):
    """P^T c at 8 and 4 bits, over all the stored columns (whole groups). (At 16 bits the blocked
    product measured faster: this one reads the rows in an order memory serves worse, which costs
    more the more bytes an entry has.)"""
    weights = (c[:, None] * scale)[..., None]  # (k, groups, 1)
    offsets = (c[:, None] * low).sum(0)[:, None]  # one value per group
    return torch.stack([(codes * weights).sum(0) + offsets for codes in _codes(data, scale, bits)],
                       -1).view(-1)


class Basis:
    """Row-wise storage of a k x D basis. 32 bits: float32; 16: float16, each entry times `gain`;
    8 and 4: affine integer codes with one (scale, low) pair per row and group of QUANT_GROUP
    entries. Every operation walks column blocks, converting each block to float32 once into a
    buffer that stays in cache and handing it to torch.mv/addmv, so no float32 copy of a whole
    low-precision basis is ever made; the products of large bases (`fused`, from FUSED_MIN_COLUMNS
    columns on) go through compiled kernels instead, which convert in registers.

    16 bits are float16 rather than bfloat16: float16 rounds 8 times less (2^-11 relative, not 2^-8)
    and converts as fast. For a random orthonormal 101 x 1.5M basis: max row rounding norm 2.1e-4
    against 1.7e-3, max |P P^T - I| 1.4e-6 against 1.4e-5; one product by blocks about 24 ms in
    either format on one CPU core (float32 19 ms). Unit rows have entries about 1/sqrt(D), near
    float16's subnormal range (6e-5), hence the gain: a power of two near sqrt(D), so that scaling
    is exact; rows up to norm 65504 / sqrt(D) fit."""

    def __init__(self, capacity, dim, bits=32, device="cpu"):
        if bits not in (32, 16, 8, 4):
            raise ValueError(f"bits must be 32, 16, 8 or 4, not {bits}")
        self.bits, self.dim, self.rows, self.device = bits, dim, 0, torch.device(device)
        self.fused = bits < 32 and dim >= FUSED_MIN_COLUMNS  # products by _fused_matvec/_rmatvec
        # per row: the squared norm of what storing it rounded away (0 in float32)
        self.rounding = torch.zeros(capacity, dtype=torch.float64, device=device)
        # float16's largest value is 65504: at most 2^15, so that entries up to 1 never overflow
        self.gain = 2.0 ** min(round(math.log2(max(dim, 1)) / 2), 15) if bits == 16 else 1.0
        if bits >= 16:
            dtype = torch.float32 if bits == 32 else torch.float16
            self.data = torch.zeros(capacity, dim, dtype=dtype, device=device)
        else:  # codes padded to whole groups, two 4-bit codes per byte
            padded = math.ceil(dim / QUANT_GROUP) * QUANT_GROUP
            self.data = torch.zeros(capacity, padded * bits // 8, dtype=torch.uint8, device=device)
            self.scale = torch.zeros(capacity, padded // QUANT_GROUP, device=device)
            self.low = torch.zeros(capacity, padded // QUANT_GROUP, device=device)

    def _tensors(self):
        return {"data": self.data} if self.bits >= 16 else \
            {"data": self.data, "scale": self.scale, "low": self.low}

    def nbytes(self):
        return sum(t.nbytes for t in self._tensors().values())

    def state_dict(self):
        return {"rows": self.rows, "bits": self.bits, "rounding": self.rounding, **self._tensors()}

    def load_state_dict(self, state):
        if state["bits"] != self.bits:
            raise ValueError(f"the stored basis has {state['bits']} bits, not {self.bits}")
        for name, tensor in self._tensors().items():
            tensor.copy_(state[name])
        if state["data"].dtype == torch.bfloat16:  # saved when 16 bits meant bfloat16, whose values
            self.data.copy_(state["data"].float() * self.gain)  # float16 x gain holds (bar subnormals)
        # states saved before the rounding was recorded: its expected value for their format
        self.rounding.copy_(state["rounding"] if "rounding" in state else
                            self._expected_rounding(state["data"]))
        self.rows = state["rows"]

    def _expected_rounding(self, data):
        """Per row, the expected squared norm that storing rounded away (a rounding error uniform
        over one step has variance step^2 / 12): the steps are the quantisation scales at 8 and 4
        bits, and at 16 bits the spacing of the stored format's values around each entry."""
        if self.bits == 32:
            return torch.zeros_like(self.rounding)
        if self.bits < 16:
            return (self.scale.double().square() * QUANT_GROUP / 12).sum(1)
        values = data.double().abs() / (self.gain if data.dtype == torch.float16 else 1.0)
        mantissa = 10 if data.dtype == torch.float16 else 7
        step = torch.where(values > 0, 2.0 ** (torch.floor(torch.log2(values)) - mantissa), 0.0)
        return (step.square() / 12).sum(1)

    def blocks(self):
        size = BLOCK if self.device.type == "cpu" else DEVICE_BLOCK
        return [(start, min(start + size, self.dim)) for start in range(0, self.dim, size)]

    def _buffer(self):
        """Room for one block as float32 (padded to whole groups; float32 needs none), reused by all
        the blocks of a product so that it stays in cache."""
        size = BLOCK if self.device.type == "cpu" else DEVICE_BLOCK
        columns = min(size, math.ceil(self.dim / QUANT_GROUP) * QUANT_GROUP) if self.bits < 32 else 0
        return torch.empty(self.rows * columns, device=self.device)

    def block(self, start, stop):
        """Columns [start, stop) of the stored rows as float32; a view when stored in float32."""
        if self.bits == 32:
            return self.data[:self.rows, start:stop]
        end = math.ceil(stop / QUANT_GROUP) * QUANT_GROUP  # room for whole groups
        buffer = torch.empty(self.rows * (end - start), device=self.device)
        tile, low = self._converted(start, stop, buffer)
        if low is None:
            return tile.div_(self.gain)
        tile = tile.view(self.rows, low.shape[1], QUANT_GROUP).add_(low[..., None])
        return tile.view(self.rows, -1)[:, :stop - start]

    def _converted(self, start, stop, buffer):
        """Columns [start, stop) converted to float32 into `buffer`, as (k, columns), less what the
        products apply afterwards, and those offsets: 32 and 16 bits the stored values (16: still
        times gain), offsets None; 8 and 4 bits codes x scale, padded to whole groups, and the
        offsets `low` (k, groups), which a product applies to group sums instead of to every entry."""
        if self.bits == 32:
            return self.data[:self.rows, start:stop], None
        if self.bits == 16:
            tile = buffer[:self.rows * (stop - start)].view(self.rows, stop - start)
            return tile.copy_(self.data[:self.rows, start:stop]), None
        end = math.ceil(stop / QUANT_GROUP) * QUANT_GROUP
        g0, g1 = start // QUANT_GROUP, end // QUANT_GROUP
        tile = buffer[:self.rows * (end - start)].view(self.rows, g1 - g0, QUANT_GROUP)
        if self.bits == 8:
            tile.copy_(self.data[:self.rows, start:end].view_as(tile))
        else:  # two codes per byte, the low nibble first
            packed, pairs = self.data[:self.rows, start // 2:end // 2], tile.view(self.rows, -1, 2)
            pairs[..., 0].copy_(packed & 15)
            pairs[..., 1].copy_(packed >> 4)
        tile.mul_(self.scale[:self.rows, g0:g1, None])
        return tile.view(self.rows, end - start), self.low[:self.rows, g0:g1]

    def _padded(self, v, start, stop):
        """v[start:stop] as (groups, QUANT_GROUP), zero-padded to whole groups."""
        end = math.ceil(stop / QUANT_GROUP) * QUANT_GROUP
        return torch.nn.functional.pad(v[start:stop], (0, end - stop)).view(-1, QUANT_GROUP)

    def store(self, i, start, stop, values):
        """Write float32 `values` into row i, columns [start, stop) (block-aligned when quantised)."""
        if self.bits >= 16:
            self.data[i, start:stop] = values * self.gain
            if self.bits == 16:
                kept = self.data[i, start:stop].float() / self.gain
                self.rounding[i] += (kept - values).double().square().sum()
            return
        end = math.ceil(stop / QUANT_GROUP) * QUANT_GROUP
        g0, g1 = start // QUANT_GROUP, end // QUANT_GROUP
        values = torch.cat((values, values[-1:].expand(end - stop)))  # pad with an in-range value
        groups = values.view(g1 - g0, QUANT_GROUP)
        low, high = groups.amin(1), groups.amax(1)
        levels = (1 << self.bits) - 1
        scale = ((high - low) / levels).clamp_min(torch.finfo(torch.float32).tiny)
        codes = ((groups - low[:, None]) / scale[:, None]).round_().clamp_(0, levels)
        lost = codes * scale[:, None] + low[:, None] - groups
        self.rounding[i] += lost.view(-1)[:stop - start].double().square().sum()
        codes = codes.to(torch.uint8).view(-1)
        self.scale[i, g0:g1], self.low[i, g0:g1] = scale, low
        if self.bits == 8:
            self.data[i, start:end] = codes
        else:
            self.data[i, start // 2:end // 2] = codes[0::2] | (codes[1::2] << 4)

    def append(self, row):
        for start, stop in self.blocks():
            self.store(self.rows, start, stop, row[start:stop])
        self.rows += 1

    def matvec(self, v, exact=False):
        """P v (length k, float64). exact: float64 sums of per-block products, so that long dot
        products keep float32's relative accuracy whatever D is (used while building the basis)."""
        if self.bits == 32 and not exact:
            return torch.mv(self.data[:self.rows], v).double()
        if torch.compiler.is_compiling():
            return _outside_graphs(Basis.matvec, self, v, exact)
        if self.fused and not exact:
            product = self._try_fused(_fused_matvec, self._padded_to_groups(v))
            if product is not None:
                return product.double() / self.gain
        out = torch.zeros(self.rows, dtype=torch.float64, device=self.device)
        buffer = self._buffer()
        for start, stop in self.blocks():
            tile, low = self._converted(start, stop, buffer)
            if low is None:
                out += torch.mv(tile, v[start:stop]).double() / self.gain
                continue
            # sum_g (scale_g codes_g) . v_g + low_g sum(v_g): the offsets multiply group sums
            v_groups = self._padded(v, start, stop)
            out += (torch.mv(tile, v_groups.view(-1)) + low @ v_groups.sum(1)).double()
        return out

    def rmatvec(self, c, out, accumulate=False, alpha=1.0):
        """out = alpha P^T c, or out += alpha P^T c, written in place block by block."""
        if self.bits < 32 and torch.compiler.is_compiling():
            return _outside_graphs(Basis.rmatvec, self, c, out, accumulate, alpha)
        c = c.to(device=self.device, dtype=torch.float32)
        if self.fused and self.bits < 16:
            product = self._try_fused(_fused_rmatvec, c)
            # the first D columns are taken here: torch 2.14.1 compiled the write of that slice
            # into `out` leaving the last partial group unwritten
            if product is not None:
                return _write(out, product[:self.dim], accumulate, alpha)
        beta = 1.0 if accumulate else 0.0
        spans = [(0, self.dim)] if self.bits == 32 else self.blocks()  # float32 is not converted
        buffer = self._buffer()
        for start, stop in spans:
            piece = out[start:stop]
            tile, low = self._converted(start, stop, buffer)
            if low is None:
                torch.addmv(piece, tile.t(), c, beta=beta, alpha=alpha / self.gain, out=piece)
                continue
            # sum_i c_i (scale_ig codes_ig + low_ig): the offsets add one value per group
            # (torch.mv, not c @ low: compiled, torch 2.14.1 dropped the offset of the last partial
            # group when `c @ low` was broadcast and sliced to the block)
            offsets = torch.mv(low.t(), c)
            values = torch.mv(tile.t(), c).view(-1, QUANT_GROUP).add_(offsets[:, None])
            _write(piece, values.view(-1)[:stop - start], accumulate, alpha)
        return out

    def _try_fused(self, kernel, *args):
        """kernel(stored rows, *args), or None (and the blocked products from then on) where
        torch.compile cannot build it, e.g. with no C++ compiler or no Triton."""
        rows = self.rows
        scale, low = (self.scale[:rows], self.low[:rows]) if self.bits < 16 else (None, None)
        try:
            return _compiled(kernel)(self.data[:rows], scale, low, *args, self.bits)
        except torch._dynamo.exc.BackendCompilerFailed as error:
            log.warning("compiled low-precision products unavailable, using blocked ones: %s",
                        str(error).splitlines()[0])
            self.fused = False
            return None

    def _padded_to_groups(self, v):
        """v zero-padded to the stored columns (whole quantisation groups at 8 and 4 bits)."""
        columns = self.data.shape[1] * 8 // self.bits if self.bits < 16 else self.dim
        return torch.nn.functional.pad(v, (0, columns - self.dim)) if columns > self.dim else v

    def gram(self):
        """P P^T in float64, accumulated block by block."""
        out = torch.zeros(self.rows, self.rows, dtype=torch.float64, device=self.device)
        for start, stop in self.blocks():
            blk = self.block(start, stop).double()
            out += blk @ blk.t()
        return out

    def mix_rows_(self, mix):
        """Replace the rows by mix^T P (mix: k x m, m <= k) and keep only those m rows."""
        mix = mix.to(device=self.device, dtype=torch.float32)
        self.rounding.zero_()
        for start, stop in self.blocks():
            mixed = mix.t() @ self.block(start, stop)  # computed whole before any row is overwritten
            for i, values in enumerate(mixed):
                self.store(i, start, stop, values)
        self.rows = mix.shape[1]
        self.data, self.rounding = self.data[:self.rows].clone(), self.rounding[:self.rows].clone()
        if self.bits < 16:
            self.scale, self.low = self.scale[:self.rows].clone(), self.low[:self.rows].clone()


# ---------------------------------------------------------------------------------------------------
# The subspace spanned by the checkpoints
# ---------------------------------------------------------------------------------------------------

def orthogonalise_(basis, w, shard):
    """Remove from w (in place) its components along the stored rows; classical Gram-Schmidt run
    twice, which keeps the basis orthogonal to working precision even for nearly parallel vectors
    (one pass loses orthogonality in proportion to the angle's condition number).
    Returns the coordinates removed (float64) and the norm of what is left."""
    coords = torch.zeros(basis.rows, dtype=torch.float64, device=basis.device)
    for _ in range(2 if basis.rows else 0):
        h = shard.sum_(basis.matvec(w, exact=True))
        basis.rmatvec(h, out=w, accumulate=True, alpha=-1.0)
        coords += h
    return coords, shard.norm(w)


def parameter_blocks(params, min_size=None):
    """Consecutive groups of the trainable parameters, as (start, stop, names) entry ranges of the
    flat weight vector; each checkpoint gets one coefficient per block. min_size None: one block of
    everything (the ICLR method); 0: one block per tensor; S: tensors are grouped until a block holds
    at least S entries, and a short remainder joins the last block (the journal's layer-wise TWA)."""
    if min_size is None:
        return [(0, sum(p.numel() for _, p in params), [name for name, _ in params])]
    blocks, names, start, offset = [], [], 0, 0
    for name, p in params:
        names.append(name)
        offset += p.numel()
        if offset - start >= max(min_size, 1):
            blocks.append((start, offset, names))
            names, start = [], offset
    if names:
        if not blocks:
            return [(0, offset, names)]
        first, _, joined = blocks.pop()
        blocks.append((first, offset, joined + names))
    return blocks


class Span:
    """The span of the checkpoints restricted to one block of parameters: an orthonormal basis P
    (k x this process's columns of the block, rows stored in a Basis), the coordinates of the
    checkpoints (n x k) and of their mean (k), and to_alpha (n x k), which maps a step in coordinates
    to the averaging coefficients of the checkpoints. `columns` is the block's slice of this process's
    shard of the weight vector."""

    def __init__(self, basis, columns, checkpoint_coords, mean_coords, to_alpha, names=(), size=None):
        self.basis, self.columns, self.names = basis, columns, list(names)
        self.size = basis.dim if size is None else size  # entries of the block over all processes
        # on the basis' device, so that a training step never copies between host and device
        self.checkpoint_coords = checkpoint_coords.to(basis.device)
        self.mean_coords = mean_coords.to(basis.device)
        self.to_alpha = to_alpha.to(basis.device)

    @property
    def rank(self):
        return self.basis.rows


def span_builders(blocks, n, shard, bits, device):
    """One SpanBuilder per block of up to n generators; small blocks of several stay in float32."""
    return [SpanBuilder(n, shard.columns(start, stop),
                        32 if len(blocks) > 1 and stop - start < SMALL_BLOCK else bits,
                        device, names, stop - start)
            for start, stop, names in blocks]


class SpanBuilder:
    """Gram-Schmidt over the generators {mean, w_1 - mean, ..., w_{n-1} - mean} of one block, fed one
    generator at a time (the last deviation is minus the sum of the others, so it adds nothing)."""

    def __init__(self, n, columns, bits, device, names, size):
        self.columns, self.names, self.n, self.size = columns, names, n, size
        self.basis = Basis(min(n, size), columns.stop - columns.start, bits, device)
        self.coords = torch.zeros(n, n, dtype=torch.float64)  # generator j in the basis so far
        self.kept, self.dropped = [], []

    def add(self, j, w, norm, shard, tol):
        """Orthogonalise generator j (w, modified in place) against the rows so far; keep its
        direction unless it is within tol * norm of their span, or, for a rounded basis, within what
        the rounding of the stored rows leaves of a vector that lies in their span."""
        error = self.rounding_error(shard)
        length = shard.norm(w) if error else 0.0  # of w as given: orthogonalise_ changes it
        removed, residual = orthogonalise_(self.basis, w, shard)
        self.coords[j, :self.basis.rows] = removed.cpu()
        if self.basis.rows == self.size:  # a block with fewer entries than checkpoints is full
            return
        # A dependent generator w leaves, against rows stored as q_i = p_i + e_i, the rounding of
        # the earlier generators it combines: about max|e_i| |w| (e: 16 bits 2e-4, 8 bits 7e-3,
        # 4 bits 0.12), up to 2.8 times that measured on real checkpoints, where the dependency
        # sums many of them. A residual within 4 times that is rounding, not a direction.
        if residual <= tol * norm + 4 * error * length or residual == 0.0:
            self.dropped.append((j, residual / max(norm, 1e-300)))
            return
        self.coords[j, self.basis.rows] = residual
        self.basis.append(w.div_(residual))
        self.kept.append(j)

    def rounding_error(self, shard):
        """The largest norm that storing a unit row rounded away (0 for a float32 basis)."""
        if self.basis.bits == 32 or not self.basis.rows:
            return 0.0
        return shard.sum_(self.basis.rounding[:self.basis.rows].clone()).max().sqrt().item()

    def finish(self, gen, checkpoint_coords, mean_coords):
        """The Span, given gen (n x n: generator j as coefficients of the checkpoints) and the
        coordinates P w_i of the checkpoints (n x k) and of their mean (k)."""
        k = self.basis.rows
        # Kept generators = R P with R lower triangular, so P = R^-1 gen W and
        # P^T x = W^T gen^T R^-T x: a step x in coordinates is a step gen^T R^-T x in alpha.
        r_inv_t = torch.linalg.solve_triangular(self.coords[self.kept][:, :k].t(),
                                                torch.eye(k, dtype=torch.float64), upper=True)
        to_alpha = gen[self.kept].t() @ r_inv_t
        return Span(self.basis, self.columns, checkpoint_coords, mean_coords, to_alpha,
                    self.names, self.size)

    def finish_centred(self):
        """For the generators {mean, w_1 - mean, ..., w_{n-1} - mean} (Subspace.from_checkpoints)."""
        n, k = self.n, self.basis.rows
        gen = torch.eye(n, dtype=torch.float64) - 1.0 / n
        gen = torch.cat((torch.full((1, n), 1.0 / n, dtype=torch.float64), gen[:-1]))
        coords = self.coords[:, :k]
        deviations = torch.cat((coords[1:], -coords[1:].sum(0, keepdim=True)))  # P (w_i - mean)
        return self.finish(gen, coords[0] + deviations, coords[0].clone())

    def finish_anchored(self, n):
        """For the generators {w_1, w_2 - w_1, ..., w_n - w_1} (SubspaceRecorder)."""
        gen = torch.eye(n, dtype=torch.float64)
        gen[1:, 0] = -1.0
        coords = self.coords[:n, :self.basis.rows]
        checkpoint_coords = coords.clone()
        checkpoint_coords[1:] += coords[0]
        return self.finish(gen, checkpoint_coords, checkpoint_coords.mean(0))


class Subspace:
    """The weights sum_b sum_i alpha_bi w_i|b that the checkpoints w_i span, block by block, written
    as mean + P^T (c - P mean).

    The mean is kept in float32. P is block-diagonal: each block b of parameters
    (one block for the ICLR method, one per layer group for layer-wise TWA) has its own span (a Span
    with orthonormal rows over the block's entries), and c concatenates their coordinates. Storing P
    in 16, 8 or 4 bits then perturbs only the deviation from the mean, never the mean itself."""

    def __init__(self, spans, mean, names, shard=None):
        self.spans, self.mean, self.names = spans, mean, names
        self.shard = shard or Sharding(mean.numel())
        self.device = mean.device
        self._index_spans()

    def _index_spans(self):
        """Where each span's coordinates sit in c, and the coordinates of the mean (kept, since
        every training step needs them)."""
        sizes = [span.rank for span in self.spans]
        self.offsets = [sum(sizes[:i]) for i in range(len(sizes) + 1)]
        self.mean_coords = self._concat(span.mean_coords for span in self.spans)

    @property
    def rank(self):
        return self.offsets[-1]

    def _concat(self, pieces):
        return torch.cat([p.reshape(-1) for p in pieces]) if self.spans else \
            torch.zeros(0, dtype=torch.float64, device=self.device)

    def _pieces(self, c):
        """c split into the spans' coordinates."""
        return [c[a:b] for a, b in zip(self.offsets, self.offsets[1:])]

    def nbytes(self):
        return sum(span.basis.nbytes() for span in self.spans)

    @classmethod
    def from_checkpoints(cls, model, checkpoints, bits=32, tol=1e-5, device=None, progress=None,
                         group=None, layer_size=None):
        """Build the subspace from checkpoints (files or state_dicts of `model`), streamed one at a
        time in two passes (the mean, then the basis). layer_size: see parameter_blocks (None: one
        coefficient per checkpoint). A checkpoint that, up to `tol` times its norm, lies in the span
        of the mean and the earlier checkpoints (within a block) adds no direction there and is left
        out with a warning. progress(iterable, description) may wrap the passes (e.g. tqdm). Under
        torch.distributed every process of `group` keeps one column shard (see Sharding)."""
        params, device, sources, names, wrap, shard, mean = _first_pass(model, checkpoints, device,
                                                                        progress, group)
        builders = span_builders(parameter_blocks(params, layer_size), len(sources), shard, bits,
                                 device)
        w = mean.clone()
        for j in wrap(range(len(sources)), "orthonormal basis"):
            if j > 0:
                flatten_checkpoint(load_state_dict(sources[j - 1]), params, names[j - 1], out=w,
                                   columns=(shard.lo, shard.hi))
            norms = [shard.norm(w[b.columns]) for b in builders]  # of the checkpoint, per block
            if j > 0:
                w -= mean
            for builder, norm in zip(builders, norms):
                builder.add(j, w[builder.columns], norm, shard, tol)
        _warn_dropped(builders, lambda j: names[j - 1] if j else "the mean of the checkpoints",
                      len(sources))
        return cls([b.finish_centred() for b in builders], mean, names, shard)

    @classmethod
    def reference_from_checkpoints(cls, model, checkpoints, device=None, progress=None, group=None):
        """The ICLR code's basis, kept as an ablation: ONE pass of classical Gram-Schmidt in float32
        over the raw (not centred) checkpoints. In the tail, where checkpoints are nearly parallel,
        its rows drift far from orthonormal, and the reference's weight-space update P^T P g is then
        a preconditioned projection, not the projector onto the span.

        Written as coordinates: w_j = sum_i L_ji p_i (L lower triangular, recorded during the pass)
        and the weights are mean + P^T (c - mean of L's rows). SGD on c with gradient P g and weight
        decay on c is then the reference's SGD on w with gradient P^T P g and weight decay on w, step
        for step (both stay in the row space of P; they differ only by float rounding)."""
        params, device, sources, names, wrap, shard, mean = _first_pass(model, checkpoints, device,
                                                                        progress, group)
        dim = shard.dim
        basis = Basis(len(sources), shard.size, 32, device)
        lower = torch.zeros(len(sources), len(sources), dtype=torch.float64)  # L
        w = torch.empty(shard.size, device=device)
        for j in wrap(range(len(sources)), "one-pass Gram-Schmidt (reference)"):
            flatten_checkpoint(load_state_dict(sources[j]), params, names[j], out=w,
                               columns=(shard.lo, shard.hi))
            h = shard.sum_(basis.matvec(w))  # float32 products, as the reference computes them
            basis.rmatvec(h, out=w, accumulate=True, alpha=-1.0)
            norm = shard.norm(w)
            lower[j, :basis.rows] = h.cpu()
            if norm == 0.0:  # an exact copy of earlier checkpoints: the reference divides by zero
                log.warning("%s adds no new direction; left out of the reference basis", names[j])
                continue
            lower[j, basis.rows] = norm
            basis.append(w.div_(norm))
        coords = lower[:, :basis.rows]
        mean_coords = coords.mean(0)
        # alpha with W^T alpha = P^T c: P = L^+ W on the kept rows, so alpha = 1/n + L^+T (c - P mean)
        to_alpha = torch.linalg.pinv(coords.t())
        span = Span(basis, shard.columns(0, dim), coords, mean_coords, to_alpha, [n for n, _ in params],
                    dim)
        return cls([span], mean, names, shard)

    def to_principal_components(self, n_components):
        """Keep only the top principal directions of the centred checkpoints (the DLDR subspace), in
        each block: mean + their span. They lie in the span, so this is a rotation of P; nothing is
        reloaded. Returns the fraction of the checkpoints' variance that the kept directions explain."""
        largest = max(span.rank for span in self.spans)
        if not 1 <= n_components <= largest:
            raise ValueError(f"n_components must be in [1, {largest}], not {n_components}")
        kept = total = 0.0
        for span in (span for span in self.spans if span.rank):
            m = min(n_components, span.rank)
            centred = span.checkpoint_coords - span.mean_coords
            _, singular, vh = torch.linalg.svd(centred, full_matrices=False)
            directions = vh[:m].t()  # k x m
            span.basis.mix_rows_(directions)
            span.checkpoint_coords = span.checkpoint_coords @ directions
            span.mean_coords = span.mean_coords @ directions
            span.to_alpha = span.to_alpha @ directions
            energy = singular.square()
            kept, total = kept + energy[:m].sum().item(), total + energy.sum().item()
        self._index_spans()
        return kept / max(total, 1e-300)

    def start_coordinates(self, start="mean"):
        """Coordinates of the checkpoints' mean ("mean") or of checkpoint number `start`."""
        if start == "mean":
            return self.mean_coords.clone()
        return self._concat(span.checkpoint_coords[start] for span in self.spans)

    def gradient(self, g):
        """P g (float64, summed over the shards) for this shard's entries g of a D-vector."""
        g = g.to(device=self.device, dtype=torch.float32)
        products = self._concat(span.basis.matvec(g[span.columns]) for span in self.spans)
        return self.shard.sum_(products)

    def nearest_coordinates(self, w):
        """P w, the coordinates of the point of the subspace nearest to w (all D entries)."""
        part = w[self.shard.lo:self.shard.hi].to(device=self.device, dtype=torch.float32)
        centred = part - self.mean
        products = self._concat(span.basis.matvec(centred[span.columns], exact=True)
                                for span in self.spans)
        return self.shard.sum_(products) + self.mean_coords

    def weights(self, c, out):
        """out = mean + P^T (c - P mean): the weights at coordinates c (this shard's entries)."""
        step = c.detach().to(device=self.device, dtype=torch.float64) - self.mean_coords
        out.copy_(self.mean)
        for span, piece in zip(self.spans, self._pieces(step)):
            span.basis.rmatvec(piece, out[span.columns], accumulate=True)
        return out

    def project_(self, g):
        """g <- P^T P g in place: the paper's projected gradient, for optimizers kept in D-space.
        One process only: a sharded basis needs P g summed over the processes first."""
        if self.shard.world > 1:
            raise RuntimeError("project_ needs the whole basis; under torch.distributed use "
                               "gradient() (summed over the shards) and the TWA trainer")
        for span in self.spans:
            span.basis.rmatvec(span.basis.matvec(g[span.columns]), out=g[span.columns])
        return g

    def deviation_directions(self):
        """Per span: the checkpoints' deviations from the mean in coordinates, as unit rows D (n x k,
        a zero row for a checkpoint equal to the mean), with their norms (n) = |w_i - mean| in the
        span's block."""
        out = []
        for span in self.spans:
            deviations = span.checkpoint_coords.to(self.device) - span.mean_coords.to(self.device)
            norms = torch.linalg.vector_norm(deviations, dim=1)
            out.append((deviations / norms.clamp_min(1e-300)[:, None], norms))
        return out

    def checkpoint_coefficients(self, c):
        """alpha (blocks x n) with sum_i alpha_bi w_i = the weights at coordinates c in block b."""
        step = c.detach().to(device=self.device, dtype=torch.float64) - self.mean_coords
        return torch.stack([1.0 / len(self.names) + span.to_alpha @ piece
                            for span, piece in zip(self.spans, self._pieces(step))]).cpu()

    @torch.no_grad()
    def combination_residual(self, model, checkpoints, alpha):
        """How far sum_i alpha_bi w_i (alpha: blocks x n, from checkpoint_coefficients) misses the
        model's trainable weights w: {"miss": |sum - w|, "move": |w - mean|, "relative": miss /
        move}. About float32 rounding for a 32-bit basis; for a rounded one about its precision,
        since w lies in the stored rows' span, which only approximates the checkpoints'. Streams
        the checkpoints once more (every process its shard)."""
        params, shard = trainable_parameters(model), self.shard
        columns = (shard.lo, shard.hi)
        w = flatten_checkpoint(dict(params), params, "the model", columns=columns).to(self.device)
        total = torch.zeros(shard.size, dtype=torch.float64, device=self.device)
        buffer = torch.empty(shard.size, device=self.device)
        for i, source in enumerate(checkpoints):
            x = flatten_checkpoint(load_state_dict(source), params, _describe(source, i), out=buffer,
                                   columns=columns)
            for span, a in zip(self.spans, alpha):
                total[span.columns].add_(x[span.columns], alpha=float(a[i]))
        miss = shard.norm(total - w.double())
        move = shard.norm(w.double() - self.mean.double())
        return {"miss": miss, "move": move, "relative": miss / move if move > 0 else None}

    def orthogonality_error(self):
        """max |P P^T - I| over the blocks, computed in float64 (NaN if the basis holds a NaN)."""
        return self.basis_quality()["orthogonality_error"]

    def basis_quality(self):
        """How far P is from orthonormal: max |P P^T - I| and the range of P P^T's eigenvalues over
        the blocks (both 1 for an orthonormal basis), in float64."""
        errors, low, high = [0.0], [1.0], [1.0]
        for span in (span for span in self.spans if span.rank):
            gram = self.shard.sum_(span.basis.gram())
            errors.append((gram - torch.eye(span.rank, dtype=torch.float64, device=self.device))
                          .abs().max().item())
            eigenvalues = torch.linalg.eigvalsh(gram) if gram.isfinite().all() else gram.new_full(
                (1,), math.nan)
            low.append(eigenvalues.min().item())
            high.append(eigenvalues.max().item())
        return {"orthogonality_error": _nan_or(max, errors),
                "gram_eigenvalues": [_nan_or(min, low), _nan_or(max, high)]}

    def relative_residual(self, w):
        """||w - (nearest point of the subspace)|| / ||w||: 0 for points of the subspace."""
        part = w[self.shard.lo:self.shard.hi].to(device=self.device, dtype=torch.float32)
        inside = self.weights(self.nearest_coordinates(w), torch.empty_like(part))
        return self.shard.norm(part.double() - inside.double()) / max(self.shard.norm(part), 1e-300)


def _nan_or(reduce, values):
    """reduce(values), or NaN when any value is NaN (max and min would silently skip it)."""
    return math.nan if any(map(math.isnan, values)) else reduce(values)


def _warn_dropped(builders, describe, n):
    """describe(j): what generator j is, for the log; n: generators per block."""
    if len(builders) == 1:
        bits = builders[0].basis.bits
        rounded = f", or within the rounding of a {bits}-bit basis" if bits < 32 else ""
        for j, relative in builders[0].dropped:
            log.warning("%s adds no new direction (relative residual %.1e%s); left out of the basis",
                        describe(j), relative, rounded)
        return
    hit = [b for b in builders if b.dropped]
    if hit:
        log.warning("%d of %d block directions add nothing new and are left out of the basis (the "
                    "first: %s in the block of %s)", sum(len(b.dropped) for b in hit),
                    len(builders) * n, describe(hit[0].dropped[0][0]), hit[0].names[0])


def _first_pass(model, checkpoints, device, progress, group):
    """What both bases start from: the trainable parameters, the device, the checkpoints (each
    checked readable before any long work) with their names, the progress wrapper, this process's
    column shard and its part of the checkpoints' mean (the first streamed pass)."""
    params = trainable_parameters(model)
    device = torch.device(device) if device is not None else params[0][1].device
    sources = list(checkpoints)
    if not sources:
        raise ValueError("no checkpoints given")
    for source in sources:
        if not isinstance(source, Mapping):
            check_readable(source)  # fail before any long work, naming the file
    names = [_describe(s, i) for i, s in enumerate(sources)]
    wrap = progress or (lambda items, desc: items)
    shard = Sharding(sum(p.numel() for _, p in params), group)
    return params, device, sources, names, wrap, shard, _mean_of(sources, params, device, wrap, shard)


def _mean_of(sources, params, device, wrap, shard):
    """This shard of the checkpoints' mean, accumulated in float64 on `device`."""
    total = torch.zeros(shard.size, dtype=torch.float64, device=device)
    w = torch.empty(shard.size, device=device)
    for i, source in enumerate(wrap(sources, "mean of the checkpoints")):
        total += flatten_checkpoint(load_state_dict(source), params, _describe(source, i), out=w,
                                    columns=(shard.lo, shard.hi))
    return total.div_(len(sources)).float()


class SubspaceRecorder:
    """Builds the subspace while SGD trains, with no checkpoint files: call add(model) at each point
    where a checkpoint would be saved, then subspace() gives what Subspace.from_checkpoints would
    give for those checkpoints: the same span, mean, alpha bookkeeping, blocks and column shards.

    The files route orthogonalises {mean, w_1 - mean, ...}, but online the mean is known only at the
    end. So the generators here are {w_1, w_2 - w_1, ..., w_n - w_1}: the same linear span, anchored
    at the first recorded weights, so that a 16/8/4-bit basis rounds deviations from w_1 (as the
    files route rounds deviations from the mean) rather than whole weight vectors. Nothing is
    re-orthogonalised at the end: the basis is a rotation of the files' basis, and the exact mean,
    from a float64 running sum, is the mean as usual (weights = mean + P^T (c - P mean), with P mean
    the average of the checkpoints' coordinates). The cost over the files route: the anchor w_1
    in float32 and the float64 sum (3 D-sized vectors more), no extra pass. SGD on the coordinates
    does not see the rotation, so it trains exactly as over the files; AdamW does (use
    train="alpha" in TWA for an order- and rotation-free optimizer)."""

    def __init__(self, model, capacity, bits=32, tol=1e-5, layer_size=None, device=None, group=None):
        self.params = trainable_parameters(model)
        device = torch.device(device) if device is not None else self.params[0][1].device
        self.shard = Sharding(sum(p.numel() for _, p in self.params), group)
        self.capacity, self.tol, self.names = capacity, tol, []
        self.builders = span_builders(parameter_blocks(self.params, layer_size), capacity,
                                      self.shard, bits, device)
        self.total = torch.zeros(self.shard.size, dtype=torch.float64, device=device)
        self.anchor = torch.zeros(self.shard.size, device=device)
        self.work = torch.empty(self.shard.size, device=device)

    @torch.no_grad()
    def add(self, model=None, name=None):
        """Stream the model's current trainable weights into the basis (the model given at
        construction when None). Raises ValueError for non-finite weights, before changing anything."""
        j = len(self.names)
        if j == self.capacity:
            raise ValueError(f"the recorder is full: capacity {self.capacity}")
        params = self.params if model is None else trainable_parameters(model)
        w = flatten_checkpoint(dict(params), self.params, f"the weights recorded as #{j}",
                               out=self.work, columns=(self.shard.lo, self.shard.hi))
        self.total += w
        norms = [self.shard.norm(w[b.columns]) for b in self.builders]
        if j == 0:
            self.anchor.copy_(w)
        else:
            w -= self.anchor
        for builder, norm in zip(self.builders, norms):
            builder.add(j, w[builder.columns], norm, self.shard, self.tol)
        self.names.append(name or f"recorded #{j}")

    def subspace(self):
        n = len(self.names)
        if n == 0:
            raise ValueError("no checkpoint recorded")
        _warn_dropped(self.builders, lambda j: self.names[j], n)
        return Subspace([b.finish_anchored(n) for b in self.builders], (self.total / n).float(),
                        list(self.names), self.shard)

    def state_dict(self):
        """Everything add() has accumulated (for a resume state; about the basis' size)."""
        return {"names": list(self.names), "total": self.total, "anchor": self.anchor,
                "builders": [{"coords": b.coords, "kept": list(b.kept), "dropped": list(b.dropped),
                              **b.basis.state_dict()} for b in self.builders]}

    def load_state_dict(self, state):
        if len(state["builders"]) != len(self.builders):
            raise ValueError("the recorded state has another block layout")
        self.names = list(state["names"])
        self.total.copy_(state["total"])
        self.anchor.copy_(state["anchor"])
        for builder, saved in zip(self.builders, state["builders"]):
            builder.coords.copy_(saved["coords"])
            builder.kept, builder.dropped = list(saved["kept"]), [tuple(d) for d in saved["dropped"]]
            builder.basis.load_state_dict(saved)


# ---------------------------------------------------------------------------------------------------
# Training inside the subspace
# ---------------------------------------------------------------------------------------------------

def flatten_parameters_(params, size=None):
    """Make the parameters and their gradients views into two flat tensors (no copies per step)
    of `size` >= D entries (room for collectives over equal shards)."""
    first = params[0]
    if any(p.dtype != first.dtype or p.device != first.device for p in params):
        raise ValueError("TWA needs all trainable parameters in one dtype on one device")
    dim = sum(p.numel() for p in params)
    weights = torch.zeros(size or dim, dtype=first.dtype, device=first.device)
    grads = torch.zeros(size or dim, dtype=first.dtype, device=first.device)
    offset = 0
    for p in params:
        weights[offset:offset + p.numel()] = p.detach().reshape(-1)
        p.data = weights[offset:offset + p.numel()].view_as(p)
        p.grad = grads[offset:offset + p.numel()].view_as(p)
        offset += p.numel()
    return weights, grads


class TWA:
    """Trains `model`'s trainable parameters as w = mean + P^T (c - P mean) through the k
    coordinates c.

    Give `parameters()` to any torch optimizer; after each backward pass call `step(optimizer)`.
    With P orthonormal, SGD on c (momentum, weight decay) is exactly the paper's projected SGD on w.
    Under torch.distributed (a sharded subspace) the model needs no DistributedDataParallel: each
    step reduce-scatters the gradients (every process gets its shard, averaged over the processes),
    sums the k-sized shard products P g, and all-gathers the new weights from the shards, which is
    about the traffic of DDP's one all-reduce. (Under DDP it stays right: the averaged gradients
    are the same on every process, and so is their average.)

    train="alpha" trains the averaging coefficients instead, as the journal code does: per block,
    w = mean + sum_i beta_i (w_i - mean) / |w_i - mean|, so c = P mean + D^T beta with D the unit
    deviations in coordinates, and dL/dbeta = D P g. An adaptive optimizer (AdamW) then scales each
    checkpoint's own coefficient, which does not depend on the order of the checkpoints, while on c it
    scales the axes of whichever orthonormal basis Gram-Schmidt happened to produce. Plain SGD differs
    between the two only by the preconditioner D^T D."""

    def __init__(self, model, space, start="mean", train="coordinates"):
        if train not in ("coordinates", "alpha"):
            raise ValueError(f"train must be 'coordinates' or 'alpha', not {train!r}")
        self.space, shard = space, space.shard
        self.params = [p for _, p in trainable_parameters(model)]
        dim = sum(p.numel() for p in self.params)
        if dim != shard.dim:
            raise ValueError(f"the model has {dim} trainable parameters, the subspace {shard.dim}")
        self.flat_weights, self.flat_grads = flatten_parameters_(self.params,
                                                                 shard.per_rank * shard.world)
        # the shard's weights are computed here, then gathered into flat_weights; its gradient
        # is reduce-scattered here from flat_grads
        self.shard_weights, self.shard_grads = (self.flat_weights[:dim], None) if shard.world == 1 \
            else torch.zeros(2, shard.per_rank, dtype=self.flat_weights.dtype, device=space.device)
        self.views = [p.grad for p in self.params]
        self.directions = space.deviation_directions() if train == "alpha" else None
        size = space.rank if train == "coordinates" else len(space.names) * len(space.spans)
        self.trained = nn.Parameter(torch.zeros(size, dtype=torch.float64, device=space.device))
        self.move_to(start)

    def parameters(self):
        return [self.trained]

    def tensors(self):
        """Every tensor a step reads or writes besides the model's own, e.g. for CUDA graph capture,
        which needs them at fixed addresses (torch._dynamo.mark_static_address)."""
        found = [self.flat_weights, self.flat_grads, self.shard_weights, self.shard_grads,
                 self.trained, self.space.mean, self.space.mean_coords]
        found += [t for span in self.space.spans for t in span.basis._tensors().values()]
        found += [t for pair in self.directions or () for t in pair]
        return [t for t in found if t is not None]

    @property
    def coordinates(self):
        """The coordinates c of the current weights (the trained tensor itself unless train="alpha")."""
        if self.directions is None:
            return self.trained
        beta = self.trained.detach().view(len(self.space.spans), -1)
        return self.space.mean_coords.to(beta.device) + torch.cat(
            [unit.t() @ b for (unit, _), b in zip(self.directions, beta)])

    @torch.no_grad()
    def step(self, optimizer):
        """dL/dc = P g; one optimizer step on c (or beta); then the weights become mean + P^T (c - P mean)."""
        self._collect_gradients()
        shard = self.space.shard
        if shard.world == 1:
            g = self.flat_grads
        else:  # this process's shard of the gradient averaged over the processes
            g = shard.scatter_sum_(self.shard_grads, self.flat_grads).div_(shard.world)
        grad = self.space.gradient(g[:shard.size]).to(self.trained.device)
        if self.directions is not None:  # chain rule through c = P mean + D^T beta
            grad = torch.cat([unit @ piece for (unit, _), piece in
                              zip(self.directions, self.space._pieces(grad))])
        self.trained.grad = grad
        self.flat_grads.zero_()
        optimizer.step()
        self.write_weights()

    @torch.no_grad()
    def move_to(self, start):
        """Jump to the checkpoints' mean ("mean"), checkpoint number `start`, or a given value of the
        trained tensor (coordinates, or beta with train="alpha")."""
        if torch.is_tensor(start):
            self.trained.copy_(start)
        elif self.directions is None:
            self.trained.copy_(self.space.start_coordinates(start))
        else:  # beta: zero at the mean; checkpoint j is |w_j - mean| along its own direction
            self.trained.zero_()
            if start != "mean":
                beta = self.trained.view(len(self.space.spans), -1)
                beta[:, start] = torch.stack([norms[start] for _, norms in self.directions])
        self.write_weights()

    @torch.no_grad()
    def write_weights(self):
        shard = self.space.shard
        self.space.weights(self.coordinates, out=self.shard_weights[:shard.size])
        if shard.world > 1:
            shard.gather_(self.flat_weights, self.shard_weights)

    def _collect_gradients(self):
        # Gradients normally accumulate in place into the flat views; a loop that set them to None
        # (zero_grad(set_to_none=True)) or a wrapper with its own buckets gets them copied back.
        for p, view in zip(self.params, self.views):
            if p.grad is None:
                view.zero_()
            elif p.grad.data_ptr() != view.data_ptr():
                view.copy_(p.grad)
            p.grad = view
