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
- subspace.py   Span and Subspace: the algebra of the weights, gradients and alpha; reads no files.
                The weights lie in mean + span(P): exactly the checkpoints' span at 32 bits, the
                stored rows' span (an approximation of it) at 16, 8 or 4 bits.
- storage.py    the basis' storage formats (float32, float16 with a gain, affine 8/4-bit) and
                their products; the one workaround for torch.compile.
- sharding.py   which columns of P each process keeps under torch.distributed: equal column
                ranges (Sharding), or the entries of the process's own FSDP2 parameter shards
                (ModelSharding), with which a TWA step needs no weight gather at all.
- checkpoints.py reading state_dicts and flattening them; safetensors_files.py reads Hugging Face's
                files and folders a tensor at a time; errors.py holds CheckpointError.
- batchnorm.py  BatchNorm statistics recomputed for averaged weights.
The integrations, imported by name where their package is installed: twa.lightning (a Lightning
callback: the span recorded while fit trains, then TWA in place of the optimizer) and twa.hf (a
Trainer callback that records the span, and a TWA phase with the same Trainer).
"""
from .build import combination_residual, from_checkpoints, parameter_blocks, reference_from_checkpoints
from .checkpoints import (CheckpointError, check_readable, flatten_checkpoint, load_state_dict,
                          trainable_parameters)
from .optimizer import SubspaceOptimizer
from .recorder import SubspaceRecorder
from .sharding import Sharding
from .storage import Basis
from .subspace import Span, Subspace
from .trainer import TWA

# The constructors that read checkpoints live in build.py (subspace.py reads no files); they are
# offered here under the names the library has always had.
Subspace.from_checkpoints = staticmethod(from_checkpoints)
Subspace.reference_from_checkpoints = staticmethod(reference_from_checkpoints)

__all__ = ["Basis", "CheckpointError", "Sharding", "Span", "Subspace", "SubspaceOptimizer",
           "SubspaceRecorder", "TWA", "check_readable", "combination_residual", "flatten_checkpoint",
           "from_checkpoints", "load_state_dict", "parameter_blocks", "reference_from_checkpoints",
           "trainable_parameters"]
