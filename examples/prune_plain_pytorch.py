"""Prune the small CNN on the bundled digits from a plain PyTorch loop: no Lightning, a Pruner and an optimizer.

python examples/prune_plain_pytorch.py --amount 0.9 --epochs 8
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

from lightning_compress import Pruner, PruningConfig
from lightning_compress.data import DigitsDataModule
from lightning_compress.models import SmallCNN
from lightning_compress.pruning import SparsitySchedule


def accuracy(model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    model.eval()
    with torch.no_grad():
        correct = sum(int((model(inputs).argmax(1) == targets).sum()) for inputs, targets in batches)
    model.train()
    return correct / sum(len(targets) for _, targets in batches)


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--amount", type=float, default=0.9)
    parser.add_argument("--epochs", type=int, default=8)
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    data = DigitsDataModule()
    data.setup("fit")
    model = SmallCNN(num_classes=10, image_size=8)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    pruner = Pruner(model, PruningConfig(amount=args.amount))  # global magnitude pruning of every Conv/Linear weight
    pruner.attach(optimizer)  # the pruned weights stay zero after every optimizer.step()
    # gradual (cubic) pruning in the first half of the epochs, recovery in the second
    schedule = SparsitySchedule(args.amount, "agp", start_epoch=1, end_epoch=args.epochs // 2)
    for epoch in range(args.epochs):
        if epoch in schedule.pruning_epochs():
            pruner.prune(schedule.sparsity_at(epoch))
        for inputs, targets in data.train_dataloader():
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(inputs), targets).backward()
            optimizer.step()
    result = {
        "sparsity": pruner.sparsity()["pruning/sparsity"],
        "val_accuracy": accuracy(model, list(data.val_dataloader())),
    }
    print(f"sparsity {result['sparsity']:.3f}, validation accuracy {result['val_accuracy']:.3f}")
    return result


if __name__ == "__main__":
    main()
