"""Train the 36-class character classifier and write model.onnx and test.npz next to this file.

A Jaderberg-style text-spotting character CNN (24x24 grey crop -> 16x16 -> 8x8 -> 1x1, large
kernels, no pooling) trained on crops rendered on the fly from the training font families
(render.py); the test set is rendered from held-out families only. BatchNorm is used while
training and folded into the convolutions before export, so the ONNX graph is a plain
Conv/Relu chain behind a per-crop standardisation. Development-only: needs torch and pillow.

    python samples/charnet/train.py     # from the repository root, 20-40 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import render
import torch
from torch import nn

HERE = Path(__file__).resolve().parent
EPS = 1e-4  # variance floor of the per-crop standardisation, for blank crops
CHANNELS_LAST = torch.channels_last  # 1.6x faster training on CPU with oneDNN


class Standardize(nn.Module):
    """Per-crop zero mean and unit variance, so contrast and brightness do not matter."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        centred = x - mean
        variance = (centred * centred).mean(dim=(1, 2, 3), keepdim=True)
        return centred / torch.sqrt(variance + EPS)


class CharNet(nn.Module):
    """conv 9x9 -> conv 9x9 -> conv 8x8 -> conv 1x1 over a 24x24 crop, ReLU between."""

    def __init__(self, widths: tuple[int, int, int] = (48, 128, 128), classes: int = 36):
        super().__init__()
        c1, c2, c3 = widths
        self.standardize = Standardize()
        self.conv1, self.bn1 = nn.Conv2d(1, c1, 9, bias=False), nn.BatchNorm2d(c1)
        self.conv2, self.bn2 = nn.Conv2d(c1, c2, 9, bias=False), nn.BatchNorm2d(c2)
        self.conv3, self.bn3 = nn.Conv2d(c2, c3, 8, bias=False), nn.BatchNorm2d(c3)
        self.dropout = nn.Dropout(0.2)
        self.conv4 = nn.Conv2d(c3, classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.standardize(x)
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        x = torch.relu(self.bn3(self.conv3(x)))
        return torch.flatten(self.conv4(self.dropout(x)), 1)


def fold_batchnorm(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """A conv with bias equal to conv followed by bn in eval mode."""
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
    folded = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride)
    folded.weight.data = (conv.weight.detach() * scale[:, None, None, None]).contiguous()
    folded.bias.data = ((bias - bn.running_mean) * scale + bn.bias).detach()
    return folded


class DeployedCharNet(nn.Module):
    """The exported graph: standardisation, then four convs with BatchNorm folded in."""

    def __init__(self, trained: CharNet):
        super().__init__()
        self.standardize = Standardize()
        self.conv1 = fold_batchnorm(trained.conv1, trained.bn1)
        self.conv2 = fold_batchnorm(trained.conv2, trained.bn2)
        self.conv3 = fold_batchnorm(trained.conv3, trained.bn3)
        self.conv4 = trained.conv4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.standardize(x)
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.conv2(x))
        x = torch.relu(self.conv3(x))
        return torch.flatten(self.conv4(x), 1)


@torch.no_grad()
def predict(model: nn.Module, x: np.ndarray, batch: int = 500) -> np.ndarray:
    """Logits for all of x in eval mode."""
    model.eval()
    parts = [model(torch.from_numpy(x[i : i + batch])).numpy() for i in range(0, len(x), batch)]
    return np.concatenate(parts)


def train(model: CharNet, fonts: dict, args: argparse.Namespace) -> None:
    """AdamW with a one-cycle schedule on freshly rendered batches."""
    rng = np.random.default_rng(args.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=5e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=args.lr, total_steps=args.steps, pct_start=0.15
    )
    model.to(memory_format=CHANNELS_LAST)
    start, correct, seen = time.time(), 0, 0
    for step in range(1, args.steps + 1):
        model.train()
        images, labels = render.render_batch(fonts, args.batch, rng)
        logits = model(torch.from_numpy(images).contiguous(memory_format=CHANNELS_LAST))
        target = torch.from_numpy(labels)
        loss = nn.functional.cross_entropy(logits, target, label_smoothing=0.05)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        correct += int((logits.argmax(1) == target).sum())
        seen += len(labels)
        if step % 100 == 0 or step == args.steps:
            print(
                f"step {step:5d}  loss {loss.item():.3f}  train acc {correct / seen:.3f}  "
                f"{time.time() - start:6.0f} s",
                flush=True,
            )
            correct = seen = 0


def export(model: nn.Module, path: Path) -> None:
    """ONNX opset 17, input `input` (N x 1 x 24 x 24), output `logits`, dynamic batch."""
    model.eval()
    torch.onnx.export(
        model,
        (torch.zeros(1, 1, render.SIZE, render.SIZE),),
        str(path),
        dynamo=False,
        opset_version=17,
        input_names=["input"],
        output_names=["logits"],
        dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
    )
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)


def onnx_logits(path: Path, x: np.ndarray) -> np.ndarray:
    """Logits of the saved model in onnxruntime on CPU."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(["logits"], {"input": x})[0]


def main() -> None:
    """Render the test set, train, fold, export, and check ONNX against PyTorch."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1200)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--test-count", type=int, default=5040)
    parser.add_argument("--out-dir", type=Path, default=HERE)
    args = parser.parse_args()
    torch.set_num_threads(2)
    torch.manual_seed(args.seed)

    train_fonts, test_fonts = render.split_fonts(render.discover_fonts())
    for name, fonts in (("train", train_fonts), ("test", test_fonts)):
        print(
            f"{name} fonts: {len(fonts)} families, {sum(map(len, fonts.values()))} files: "
            + ", ".join(fonts)
        )
    x_test, y_test = render.render_batch(test_fonts, args.test_count, np.random.default_rng(12345))

    model = CharNet()
    start = time.time()
    train(model, train_fonts, args)
    print(f"training took {time.time() - start:.0f} s")

    deployed = DeployedCharNet(model)
    torch_logits = predict(model, x_test)
    deployed_logits = predict(deployed, x_test)
    print(
        f"max |trained - folded| logit difference: "
        f"{np.abs(torch_logits - deployed_logits).max():.2e}"
    )
    args.out_dir.mkdir(parents=True, exist_ok=True)
    model_path = args.out_dir / "model.onnx"
    export(deployed, model_path)
    ort_logits = onnx_logits(model_path, x_test)
    torch_acc = float((torch_logits.argmax(1) == y_test).mean())
    ort_acc = float((ort_logits.argmax(1) == y_test).mean())
    difference = np.abs(torch_logits - ort_logits).max()
    print(f"max |torch - onnxruntime| logit difference: {difference:.2e}")
    print(f"test accuracy: torch {torch_acc:.4f}  onnxruntime {ort_acc:.4f}  (n={len(y_test)})")
    np.savez_compressed(args.out_dir / "test.npz", x=x_test, y=y_test)


if __name__ == "__main__":
    main()
