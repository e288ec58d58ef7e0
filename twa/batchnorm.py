"""BatchNorm statistics for weights that no training step produced (an average of checkpoints):
reset, then a cumulative average over one pass of the training data, as
torch.optim.swa_utils.update_bn does, and under torch.distributed averaged over the processes."""
import torch
import torch.distributed as dist
from torch.nn.modules.batchnorm import _BatchNorm


def batch_norm_layers(model):
    return [m for m in model.modules() if isinstance(m, _BatchNorm)]


@torch.no_grad()
def recompute_batch_norm(model, batches, forward):
    """Reset every BatchNorm layer of `model` and average its statistics over one pass of
    `batches`, each run through the model by forward(batch) (e.g. lambda b: model(b[0])); under
    torch.distributed, each process's statistics of its part of the data are then averaged."""
    layers = batch_norm_layers(model)
    if not layers:
        return
    momenta = [layer.momentum for layer in layers]
    for layer in layers:
        layer.reset_running_stats()
        layer.momentum = None  # a cumulative average, not a running one
    was_training = model.training
    model.train()
    for batch in batches:
        forward(batch)
    model.train(was_training)
    distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    for layer, momentum in zip(layers, momenta):
        layer.momentum = momentum
        for statistic in (layer.running_mean, layer.running_var) if distributed else ():
            dist.all_reduce(statistic)
            statistic.div_(dist.get_world_size())
