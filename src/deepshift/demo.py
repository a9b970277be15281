"""`make demo` (core version): float vs DeepShift-Q vs DeepShift-PS on scikit-learn's digits.

Trains the paper's simple MNIST conv model (conv 1->20 5x5, pool, conv 20->50 5x5, pool,
FC 800->500, FC 500->10) on the 1,797 real 8x8 digits bundled with scikit-learn, upsampled to
28x28, and prints the three test accuracies side by side. Runs in well under 2 minutes on 2 cores.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch import nn

import deepshift


def mnist_conv() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 20, 5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(20, 50, 5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(800, 500), nn.ReLU(), nn.Linear(500, 10),
    )


def load_digits_28(seed: int = 0):
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = F.interpolate(x, size=(28, 28), mode="bilinear", align_corners=False)
    x = (x - x.mean()) / x.std()
    y = torch.tensor(data.target)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    n_test = len(x) // 5
    test, train = perm[:n_test], perm[n_test:]
    return (x[train], y[train]), (x[test], y[test])


def run(method: str, train, test, epochs: int = 8, seed: int = 0) -> tuple[float, float]:
    torch.manual_seed(seed)
    model = mnist_conv()
    lr = 1e-3
    if method == "q":
        deepshift.convert_(model, deepshift.QConfig(weight_bits=5))
    elif method == "ps":
        deepshift.convert_(model, deepshift.PSConfig(weight_bits=5))
        lr = 1e-2  # the paper's PS learning rate
    opt = torch.optim.RAdam(deepshift.param_groups(model, lr=lr))
    (x, y), (xt, yt) = train, test
    start = time.perf_counter()
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        model.train()
        for idx in torch.randperm(len(x), generator=gen).split(32):
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            deepshift.clamp_parameters_(model)
    model.eval()
    with torch.no_grad():
        acc = (model(xt).argmax(1) == yt).float().mean().item() * 100
    return acc, time.perf_counter() - start


def main() -> None:
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    train, test = load_digits_28()
    print(f"digits: {len(train[1])} train / {len(test[1])} test images (scikit-learn, 8x8 -> 28x28)")
    print(f"{'model':<12}{'method':<10}{'test top-1':>12}{'seconds':>10}")
    for method, label in (("none", "float"), ("q", "Q 5-bit"), ("ps", "PS 5-bit")):
        acc, secs = run(method, train, test)
        print(f"{'mnist-conv':<12}{label:<10}{acc:>11.2f}%{secs:>10.1f}", flush=True)


if __name__ == "__main__":
    main()
