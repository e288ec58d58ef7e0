"""How far the reference's one-pass basis is from orthonormal on real checkpoints, and why.

    python bench/basis_spectrum.py --save-dir DIR --params_start A --params_end B [--name NAME]

Builds, over checkpoints A..B-1 of DIR (files of train_sgd.py, ResNet-20 on CIFAR-10 by default):
- ours: Gram-Schmidt twice on the first checkpoint and the differences from it (train_twa.py
  --basis orthonormal);
- reference, float32, streamed (train_twa.py --basis reference);
- reference, float32, as the ICLR code writes it (all rows in one matrix, torch.mm);
- reference, float64: the same one pass in double precision.
For each: max |PP^T - I|, the eigenvalue range of PP^T, and how many of its eigenvalues exceed 0.5
(directions a step still moves along at least half as fast). Also the principal-component spectrum
of the centred checkpoints (the share of their variance in the top 1, 2, 5, 10 directions). Prints a
table and writes results/basis-spectrum-<name>.json, with the command line and the git revision
("+dirty" when the tree had uncommitted changes).
"""
import argparse
import os
import shlex
import sys

import torch

import common

sys.path.insert(0, common.ROOT)
import runfiles  # noqa: E402
import twa  # noqa: E402


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_checkpoint_range_args(parser)
    parser.add_argument("--name", default=None, help="results/basis-spectrum-<name>.json")
    parser.add_argument("--results", default=os.path.join(common.ROOT, "results"))
    args = parser.parse_args()
    return (args, *common.model_and_checkpoints(parser, args))


def quality(gram):
    eigenvalues = torch.linalg.eigvalsh(gram.double())
    eye = torch.eye(len(gram), dtype=torch.float64)
    return {"orthogonality_error": (gram.double() - eye).abs().max().item(),
            "gram_eigenvalues": [eigenvalues.min().item(), eigenvalues.max().item()],
            "eigenvalues_above_half": int((eigenvalues > 0.5).sum()),
            "rank": len(gram)}


def main():
    args, model, paths = parse_args()
    params = twa.trainable_parameters(model)
    rows = torch.stack([twa.checkpoints.flatten_checkpoint(twa.checkpoints.load_state_dict(p), params, p) for p in paths])
    report = {"save_dir": args.save_dir, "checkpoints": [args.params_start, args.params_end - 1],
              "commands": [shlex.join(["python", *sys.argv])], "git": runfiles.git_revision()}
    ours = twa.Subspace.from_checkpoints(model, paths)
    report["orthonormal"] = {**quality(ours.blocks[0].basis.gram()), "rank": ours.rank}
    streamed = twa.Subspace.reference_from_checkpoints(model, paths).blocks[0].basis
    report["reference float32, streamed"] = quality(streamed.gram())
    matrix32 = common.one_pass_gram_schmidt_(rows.float().clone())
    report["reference float32, one matrix"] = quality(matrix32 @ matrix32.t())
    matrix64 = common.one_pass_gram_schmidt_(rows.double())
    report["reference float64"] = quality(matrix64 @ matrix64.t())
    block = streamed.as_float32(0, rows.shape[1])
    report["streamed vs one-matrix float32, max row difference"] = (block - matrix32).abs().max().item()
    centred = rows.double() - rows.double().mean(0)
    energy = torch.linalg.svdvals(centred).square()
    report["pca_variance_share"] = {k: (energy[:k].sum() / energy.sum()).item() for k in (1, 2, 5, 10)}
    cosines = torch.nn.functional.cosine_similarity(rows[1:].double(), rows[:-1].double(), dim=1)
    report["neighbour_cosine_min"] = cosines.min().item()
    for name, values in report.items():
        print(f"{name}: {values}")
    path = os.path.join(args.results, f"basis-spectrum-{args.name or os.path.basename(args.save_dir)}.json")
    runfiles.save_json(report, path)
    print(f"wrote {path}")


if __name__ == "__main__":
    try:
        main()
    except twa.CheckpointError as err:  # a file that is not a checkpoint of --arch
        sys.exit(f"error: {err}")
