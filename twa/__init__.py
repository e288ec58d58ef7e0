"""Trainable Weight Averaging (Li et al., ICLR 2023): train the coefficients of a weighted average of
checkpoints, i.e. run SGD inside the subspace that the checkpoints span.

Works with any nn.Module and any training loop or trainer that takes a torch optimizer:

    model.load_state_dict(torch.load("ckpt/100.pt", weights_only=True))  # frozen layers, buffers
    space = Subspace.from_checkpoints(model, [f"ckpt/{i}.pt" for i in range(101)])
    opt = SubspaceOptimizer(model, space, torch.optim.SGD, lr=2, momentum=0.9, weight_decay=1e-5)
    for x, y in loader:                              # model now holds the mean of the checkpoints
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()                                   # dL/dc = P g; step on c; weights from c
    alpha = space.checkpoint_coefficients(opt.coordinates)[0]   # sum_i alpha_i w_i = weights

SubspaceOptimizer is TWA(model, space) and its step(inner_optimizer) in the shape of a torch
optimizer; a loop may use those two directly (trainer.step(opt) with opt built on
trainer.parameters()), for the same steps.

P (k x D) is an orthonormal basis of the checkpoints' span, built by streaming the checkpoints one at a
time (Gram-Schmidt applied twice per vector), so that only P itself is ever held in memory. Training
the k coordinates c is the paper's projected SGD (g -> P^T P g) written in the subspace's own
coordinates: the same trajectory, with no D-sized optimizer state. With layer_size=S (the journal
version's layer-wise TWA) each block of consecutive parameter tensors gets its own coefficients: P is
block-diagonal and alpha has one row per block.

The public names are the seven below: Subspace (built by Subspace.from_checkpoints, or by a
SubspaceRecorder while SGD trains), TWA and SubspaceOptimizer (which train in it),
combination_residual (how far alpha misses the weights), trainable_parameters (what TWA averages)
and CheckpointError. twa.checkpoints reads checkpoint files for those who read them themselves
(its __all__: load_state_dict, check_readable, flatten_checkpoint, load_sharded, and reshard for an
FSDP2 model evaluated between steps); the integrations are twa.lightning and twa.hf. The other
modules are the implementation, and the scripts use only these names.

Wrong arguments raise ValueError or TypeError naming them (CheckpointError, a ValueError, for
checkpoints) before anything changes; a model or subspace changed under a TWA raises RuntimeError
at its next step.

Where each piece lives (imports run downwards only):
- optimizer.py  SubspaceOptimizer: TWA as a torch.optim.Optimizer, for trainers and LR schedulers.
- trainer.py    TWA: the model's weights are w = mean + P^T (c - m), rewritten after every step.
- binding.py    what TWA(model, space) bound, which every step checks is still the model's.
- recorder.py   SubspaceRecorder: the span built while SGD trains, from weights in memory.
- build.py      the streaming construction from checkpoints and its generator schemes; what m (the
                stored mean's coordinates), the checkpoints' coordinates and to_alpha
                (alpha = 1/n + to_alpha (c - m)) are is decided in SpanBuilder.finish.
- subspace.py   Block and Subspace: the algebra of the weights, gradients and alpha; reads no files.
                The weights lie in mean + span(P): exactly the checkpoints' span at 32 bits, the
                stored rows' span (an approximation of it) at 16, 8 or 4 bits.
- storage.py    the basis' storage formats (float32, float16 with a gain, affine 8/4-bit) and
                their products; the one workaround for torch.compile. kernels.py: the compiled
                products of large low-precision bases.
- sharding.py   the two routes under torch.distributed, one class each with the same questions
                answered: which entries of P this process keeps, how its gradient entries are
                gathered and new weights published, how checkpoints are read and the dtypes and
                untrained entries checked. ColumnSharding: equal column ranges (one process, DDP);
                ModelSharding: the process's own FSDP2 parameter shards, with which a TWA step
                needs no weight gather at all. groups.py: a low-bit block split between processes
                keeps one process's quantisation groups (GroupAligned), on either route.
- compat.py     the torch names that differ between builds and releases.
- checkpoints.py reading state_dicts and flattening them; safetensors_files.py reads Hugging Face's
                files and folders a tensor at a time; errors.py holds CheckpointError.
- batchnorm.py  BatchNorm statistics recomputed for averaged weights.
The integrations, imported by name where their package is installed: twa.lightning (a Lightning
callback: the span recorded while fit trains, then TWA in place of the optimizer) and twa.hf (a
Trainer callback that records the span, and a TWA phase with the same Trainer).
"""
from .build import combination_residual
from .checkpoints import CheckpointError, trainable_parameters
from .optimizer import SubspaceOptimizer
from .recorder import SubspaceRecorder
from .subspace import Subspace
from .trainer import TWA

__all__ = ["CheckpointError", "Subspace", "SubspaceOptimizer", "SubspaceRecorder", "TWA",
           "combination_residual", "trainable_parameters"]
