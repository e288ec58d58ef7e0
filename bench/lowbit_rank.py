"""Which checkpoints a 16/8/4-bit basis keeps, and how closely alpha then rebuilds the weights.

    python bench/lowbit_rank.py --save-dir DIR --params_start A --params_end B [--duplicate J]

Over checkpoints A..B-1 of DIR (train_sgd.py files, ResNet-20 on CIFAR-10 by default), with
checkpoint J entered twice when --duplicate is given, builds the basis at every storage precision
and prints its rank, the largest rounding error of a stored row, and the miss of sum_i alpha_i w_i
relative to the weights' move from the mean, at a point half a checkpoint spread away from the mean
in a random direction of the span (one seed for every precision).
"""
import argparse
import os
import sys

import torch

import common

sys.path.insert(0, common.ROOT)
import twa  # noqa: E402


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_checkpoint_range_args(parser)
    parser.add_argument("--duplicate", type=int, default=None, help="enter this checkpoint twice")
    args = parser.parse_args()
    return (args, *common.model_and_checkpoints(parser, args))


def main():
    args, model, files = parse_args()
    if args.duplicate is not None:
        files.append(os.path.join(args.save_dir, f"{args.duplicate}.pt"))
    print(f"{len(files)} checkpoints of {args.save_dir}" +
          (f", {args.duplicate}.pt twice" if args.duplicate is not None else ""))
    print("| bits | rank | max row rounding | alpha miss / move |")
    print("|---|---|---|---|")
    for bits in (32, 16, 8, 4):
        gen = torch.Generator().manual_seed(0)
        space = twa.Subspace.from_checkpoints(model, files, bits=bits)
        spread = (space.blocks[0].checkpoint_coords - space.mean_coords).norm(dim=1).mean()
        direction = torch.randn(space.rank, generator=gen, dtype=torch.float64)
        direction[0] = 0  # the mean's own direction: stay on the checkpoints' affine hull
        trainer = twa.TWA(model, space)
        trainer.move_to(space.mean_coords + 0.5 * spread * direction / direction.norm())
        residual = twa.combination_residual(space, model, files,
                                              space.checkpoint_coefficients(trainer.coordinates))
        rounding = space.blocks[0].basis.rounding[:space.rank].max().sqrt().item()
        print(f"| {bits} | {space.rank} | {rounding:.2g} | {residual['relative']:.2g} |", flush=True)


if __name__ == "__main__":
    try:
        main()
    except twa.CheckpointError as err:  # a file that is not a checkpoint of --arch
        sys.exit(f"error: {err}")
