"""TWA with Hugging Face's Trainer: a small ViT (built from a config, no downloaded weights) trained on
CIFAR-10 with Trainer, which saves checkpoint-*/ folders; then TWA over those checkpoints with the
same Trainer (twa.hf.train_twa). Prints the test accuracy of the checkpoints' mean (the SWA point)
and of TWA.

    python examples/hf_vit.py [--data ~/.cache/twa-data/cifar10] [--subset 2000] [--epochs 4]
"""
import argparse
import glob
import os

import numpy as np
import torch
import transformers
from torchvision import datasets, transforms

import twa
import twa.hf

MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)  # CIFAR-10's per-channel statistics


class Examples(torch.utils.data.Dataset):
    """ImageFolder images as the Trainer's dataset takes them: {"pixel_values", "labels"}."""

    def __init__(self, folder, subset, seed=0):
        self.images = datasets.ImageFolder(folder, transforms.Compose(
            [transforms.ToTensor(), transforms.Normalize(MEAN, STD)]))
        order = torch.randperm(len(self.images), generator=torch.Generator().manual_seed(seed))
        self.indices = order[:subset].tolist() if subset else order.tolist()

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        pixels, label = self.images[self.indices[i]]
        return {"pixel_values": pixels, "labels": label}


def accuracy(prediction):
    return {"accuracy": float(np.mean(prediction.predictions.argmax(-1) == prediction.label_ids))}


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=os.path.expanduser("~/.cache/twa-data/cifar10"),
                        help="CIFAR-10 as an ImageFolder tree with train/ and test/")
    parser.add_argument("--subset", type=int, default=0, help="train images (0: all); test: a fifth")
    parser.add_argument("--epochs", type=float, default=4, help="epochs of AdamW")
    parser.add_argument("--per-epoch", type=int, default=4, help="checkpoints saved per epoch")
    parser.add_argument("--twa-epochs", type=float, default=1, help="epochs of TWA")
    parser.add_argument("--twa-lr", type=float, default=0.5, help="TWA's learning rate (SGD)")
    parser.add_argument("--out", default="hf_vit_run", help="the Trainer's output folder")
    args = parser.parse_args()
    train = Examples(os.path.join(args.data, "train"), args.subset)
    test = Examples(os.path.join(args.data, "test"), args.subset // 5)
    config = transformers.ViTConfig(image_size=32, patch_size=4, hidden_size=128, num_hidden_layers=4,
                                    num_attention_heads=4, intermediate_size=256, num_labels=10)
    torch.manual_seed(0)
    model = transformers.ViTForImageClassification(config)
    batch = 64
    per_epoch = max(len(train) // batch, 1)
    settings = transformers.TrainingArguments(
        args.out, num_train_epochs=args.epochs, per_device_train_batch_size=batch,
        per_device_eval_batch_size=256, learning_rate=1e-3, weight_decay=0.05,
        save_strategy="steps", save_steps=max(per_epoch // args.per_epoch, 1), save_only_model=True,
        logging_strategy="no", report_to="none", disable_tqdm=True, use_cpu=not torch.cuda.is_available())
    trainer = transformers.Trainer(model=model, args=settings, train_dataset=train, eval_dataset=test,
                                   compute_metrics=accuracy)
    trainer.train()
    folders = sorted(glob.glob(os.path.join(args.out, "checkpoint-*")),
                     key=lambda path: int(path.rsplit("-", 1)[1]))
    space = twa.Subspace.from_checkpoints(model, twa.hf.checkpoints(model, folders))
    with torch.no_grad():  # the SWA point: a ViT has no BatchNorm statistics to recompute
        torch.nn.utils.vector_to_parameters(space.mean, [p for _, p in twa.trainable_parameters(model)])
    swa = trainer.evaluate()["eval_accuracy"]
    print(f"SWA point (mean of {len(folders)} checkpoints): test accuracy {100 * swa:.2f}%")
    result = twa.hf.train_twa(trainer, space, epochs=args.twa_epochs, lr=args.twa_lr)
    print(f"TWA ({args.twa_epochs:g} epochs): test accuracy "
          f"{100 * trainer.evaluate()['eval_accuracy']:.2f}%, alpha "
          f"{[round(a, 3) for a in result.alpha[0].tolist()]}")


if __name__ == "__main__":
    main()
