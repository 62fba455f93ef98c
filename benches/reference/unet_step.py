"""The medmesh UNet training step in PyTorch, for the step-time ratio against burn.

Identical network (double 3x3 conv without bias + BatchNorm + ReLU per level, the first one
with stride 2 below the top level, 2x2 stride-2 transposed conv up, skip concatenation, 1x1 head), loss (cross-entropy +
1 - foreground soft Dice, smoothing 1) and optimizer (Adam, lr 1e-3) as
`cargo bench -p medmesh-benches --bench training_step`: batch 8, 128x128, 1 channel,
2 classes, base 16, depth 4.

With --dims 3, the 3D UNet of `model.dims = 3` (3x3x3 convolutions, 2x2x2 transposed ones) on
the bench's 3D input: batch 2 of 16x64x64, the same number of voxels.

Run where torch is installed (not in CI):  python3 benches/reference/unet_step.py [--device cuda] [--dims 3]
Prints the median step time in milliseconds over --steps timed steps.
"""

import argparse
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


# The layer kinds, 2D unless --dims 3 switches them.
Conv, Norm, Up = nn.Conv2d, nn.BatchNorm2d, nn.ConvTranspose2d


class DoubleConv(nn.Module):
    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.conv1 = Conv(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.norm1 = Norm(cout)
        self.conv2 = Conv(cout, cout, 3, padding=1, bias=False)
        self.norm2 = Norm(cout)

    def forward(self, x):
        x = F.relu(self.norm1(self.conv1(x)))
        return F.relu(self.norm2(self.conv2(x)))


class UpBlock(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.up = Up(cin, cout, 2, stride=2)
        self.conv = DoubleConv(2 * cout, cout)


class UNet(nn.Module):
    def __init__(self, in_channels=1, classes=2, depth=4, base=16):
        super().__init__()
        width = [base << level for level in range(depth)]
        self.encoder = nn.ModuleList(
            DoubleConv(in_channels if i == 0 else width[i - 1], width[i], 1 if i == 0 else 2)
            for i in range(depth)
        )
        self.decoder = nn.ModuleList(UpBlock(width[i + 1], width[i]) for i in reversed(range(depth - 1)))
        self.head = Conv(width[0], classes, 1)

    def forward(self, x):
        skips = []
        for block in self.encoder:
            x = block(x)
            skips.append(x)
        skips.pop()
        for block in self.decoder:
            x = block.conv(torch.cat([block.up(x), skips.pop()], dim=1))
        return self.head(x)


def dice_ce_loss(logits, onehot):
    log_p = F.log_softmax(logits, dim=1)
    pixels = logits.numel() // logits.shape[1]
    ce = -(log_p * onehot).sum() / pixels
    p = log_p.exp()
    others = tuple(d for d in range(logits.dim()) if d != 1)
    inter = (p * onehot).sum(dim=others)
    total = p.sum(dim=others) + onehot.sum(dim=others)
    dice = (2 * inter + 1) / (total + 1)
    return ce + 1 - dice[1:].mean()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--dims", type=int, default=2, choices=[2, 3])
    args = parser.parse_args()
    global Conv, Norm, Up
    if args.dims == 3:
        Conv, Norm, Up = nn.Conv3d, nn.BatchNorm3d, nn.ConvTranspose3d
    torch.manual_seed(1)
    device = torch.device(args.device)
    model = UNet().to(device)
    optim = torch.optim.Adam(model.parameters(), lr=1e-3, eps=1e-5)
    shape = (8, 128, 128) if args.dims == 2 else (2, 16, 64, 64)
    x = torch.randn(shape[0], 1, *shape[1:], device=device)
    labels = (torch.rand(*shape, device=device) > 0.7).long()
    onehot = F.one_hot(labels, 2).movedim(-1, 1).float()

    def step():
        optim.zero_grad(set_to_none=True)
        loss = dice_ce_loss(model(x), onehot)
        loss.backward()
        optim.step()
        if device.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(3):
        step()
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    print(f"torch {torch.__version__} {args.device} {args.dims}D threads={torch.get_num_threads()}: "
          f"median step {statistics.median(times) * 1000:.1f} ms over {args.steps} steps")


if __name__ == "__main__":
    main()
