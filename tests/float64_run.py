"""python float64_run.py SCRIPT ARGS...: run SCRIPT (train_sgd.py, train_twa.py; under torchrun
too) with float64 weights, so that two runs whose sums take other orders (1 process and 2) can be
compared at float64's rounding, 2^29 times finer than float32's. The images stay the float32 values
every run sees; the model widens them."""
import os
import runpy
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import utils  # noqa: E402  (the scripts import this very module)

torch.set_default_dtype(torch.float64)
build_model = utils.build_model


def build_float64_model(*args, **kwargs):
    model = build_model(*args, **kwargs)
    model.register_forward_pre_hook(lambda module, inputs: tuple(x.double() for x in inputs))
    return model


utils.build_model = build_float64_model
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
