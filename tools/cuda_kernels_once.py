"""Every op of fused_mlp once on one device, at shapes that cover its kernels' paths: rows shorter
than a warp, of a few warps and of many blocks; ragged tails that no vector, warp or tile divides;
float32, float16 and bfloat16; with and without dropout, BatchNorm statistics of the batch and the
running ones, every reduction of the loss, each optimizer of the training step.

    python tools/cuda_kernels_once.py [--device cuda|cpu]

`make gpu-check` runs it under compute-sanitizer (memcheck, racecheck) on a GPU; its dry run runs it
with --device cpu, the same calls on the CPU kernels. It fails when an op registered by the package
was not called, so a new op cannot slip past the sanitizers."""

import argparse
import sys

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from fused_mlp import ops
from fused_mlp.models import MLP
from fused_mlp.step import TrainStep

fused = torch.ops.fused_mlp

# (rows, classes) of the cross-entropy: one row, sub-warp rows, rows of a few warps, long rows.
CROSS_ENTROPY_SHAPES = [(1, 1), (5, 3), (7, 31), (33, 33), (67, 1000), (3, 5000), (2, 40001)]
# (rows, in, out) of the layer: a batch of 2, ragged tails, more rows than a block takes.
LAYER_SHAPES = [(2, 3, 1), (5, 17, 33), (67, 130, 257), (300, 64, 10), (1025, 8, 3)]


class OpsCalled(TorchDispatchMode):
    """Records the name of each fused_mlp op that reaches the dispatcher."""

    def __init__(self):
        super().__init__()
        self.names = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        namespace, name = str(func).split(".")[:2]
        if namespace == "fused_mlp":
            self.names.add(name)
        return func(*args, **(kwargs or {}))


def cross_entropy(device):
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for rows, classes in CROSS_ENTROPY_SHAPES:
            x = torch.randn(rows, classes, device=device, dtype=dtype)
            target = torch.randint(0, classes, (rows,), device=device)
            target[0] = -100  # an ignored row
            weight = torch.rand(classes, device=device, dtype=dtype)
            for reduction, w, smoothing in ((0, None, 0.0), (1, weight, 0.1), (2, None, 0.2)):
                loss, lse = fused.cross_entropy_forward(x, target, w, reduction, -100, smoothing)
                grad = torch.ones_like(loss)
                fused.cross_entropy_backward(grad, x, target, w, lse, reduction, -100, smoothing)


def layer(device):
    seed = fused.philox_seed_offset(torch.empty(1, device=device))
    for rows, k, c in LAYER_SHAPES:
        x, w, b = (torch.randn(*s, device=device) for s in ((rows, k), (c, k), (c,)))
        gamma, beta = torch.rand(c, device=device) + 0.5, torch.randn(c, device=device)
        rm, rv = torch.zeros(c, device=device), torch.ones(c, device=device)
        for use_batch_stats in (False, True):
            for p in (0.0, 0.3):
                out, pre_bn, mean, invstd, batch_var = fused.linear_bn_relu_forward(
                    x, w, b, gamma, beta, rm, rv, use_batch_stats, 1e-5, p, seed
                )
                g = torch.randn_like(out)
                saved = pre_bn if use_batch_stats else out
                fused.linear_bn_relu_backward(g, x, w, b, gamma, beta, saved, mean, invstd, use_batch_stats, p, seed)
        fused.bn_update_running_stats_(rm, rv, mean, batch_var, 0.1)
        # The stages of synchronized BatchNorm, on the last forward's batch (statistics of the batch).
        mean, invstd, _ = fused.bn_batch_stats(pre_bn, 1e-5)
        fused.bn_relu_dropout(pre_bn, mean, invstd, gamma, beta, 0.3, seed)
        sum_dy, sum_dy_zhat = fused.bn_backward_sums(g, pre_bn, mean, invstd, gamma, beta, 0.3, seed)
        fused.bn_backward_finish(g, x, w, pre_bn, mean, invstd, gamma, beta, sum_dy, sum_dy_zhat, rows, 0.3, seed)
        for p in (0.0, 0.3):
            fused.linear_relu_dropout_forward(x, w, b, p, seed)
    fused.philox4x32_10(torch.randint(0, 2**32, (37, 4), device=device), torch.tensor([7, 9], device=device))
    for numel, start in ((1, 0), (1000, 0), (4099, 5)):
        fused.dropout_mask(seed, numel, 0.3, start)


def network(device):
    seed = fused.philox_seed_offset(torch.empty(1, device=device))
    for rows in (2, 67, 300):
        for batch_norm in (True, False):
            widths = (50, 33, 17, 10)
            ws = [torch.randn(o, i, device=device) * i**-0.5 for i, o in zip(widths, widths[1:])]
            bs = [torch.randn(o, device=device) for o in widths[1:]]
            hidden = widths[1:-1]
            gammas = [torch.rand(c, device=device) + 0.5 for c in hidden] if batch_norm else []
            betas = [torch.randn(c, device=device) for c in hidden] if batch_norm else []
            rms = [torch.zeros(c, device=device) for c in hidden] if batch_norm else []
            rvs = [torch.ones(c, device=device) for c in hidden] if batch_norm else []
            x = torch.randn(rows, widths[0], device=device)
            out, hid, pre_bn, mean, invstd, batch_var = fused.mlp_forward(
                x, ws, bs, gammas, betas, rms, rvs, batch_norm, batch_norm, 1e-5, 0.3, seed
            )
            fused.mlp_backward(
                torch.randn_like(out), x, ws, bs, gammas, betas, hid, pre_bn, mean, invstd, batch_norm, batch_norm,
                0.3, seed, True, [True] * len(ws),
            )  # fmt: skip
            if batch_norm:
                fused.mlp_update_running_stats_(rms, rvs, mean, batch_var, [0.1] * len(rms))
            fused.mlp_inference(x, ws, bs)


def train_step(device):
    for batch_norm, make_optimizer in (
        (True, lambda p: torch.optim.Adam(p, lr=1e-3)),
        (True, lambda p: torch.optim.AdamW(p, lr=1e-3, amsgrad=True)),
        (False, lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True)),
    ):
        model = MLP(in_features=50, hidden=(33, 17), num_classes=10, batch_norm=batch_norm).to(device)
        step = TrainStep(model, make_optimizer(model.parameters()), strict=True)
        for rows in (2, 67):
            x = torch.randn(rows, 50, device=device)
            step(x, torch.randint(0, 10, (rows,), device=device))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda needs a CUDA GPU")
    torch.manual_seed(0)
    with OpsCalled() as called:
        for part in (cross_entropy, layer, network, train_step):
            part(args.device)
    if args.device == "cuda":
        torch.cuda.synchronize()
    missed = sorted(set(ops.SCHEMAS) - called.names)
    if missed:
        print(f"cuda_kernels_once: ops never called: {', '.join(missed)}", file=sys.stderr)
        return 1
    print(f"cuda_kernels_once: {len(called.names)} ops called on {args.device}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
