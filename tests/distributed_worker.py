"""One process of a 2-process synchronized-BatchNorm run (tests/test_distributed.py starts two):

    python tests/distributed_worker.py SCENARIO RANK WORLD INIT_FILE OUT_DIR

gloo on the CPU, init_method=file://, one thread per process. The cases are defined here and
imported by the test, which computes the single-process reference on the concatenated batch.
"""

import os
import sys
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from fused_mlp.nn import FusedMLP, LinearBNReLU, convert_sync_batchnorm

IN_FEATURES = 12
STEPS = 3
LR = 0.05

#: (model, rows per rank, momentum): equal and unequal batches, a rank with one row and one with
#: none, momentum=None; the fused layer, the whole-network module, and SyncBatchNorm1d alone in a
#: stock model (2-D and 3-D input).
CASES = {
    "layer-equal": ("layer", (16, 16), 0.1),
    "layer-unequal": ("layer", (37, 27), 0.1),
    "layer-one-row": ("layer", (1, 20), 0.1),
    "layer-no-rows": ("layer", (0, 9), 0.1),
    "layer-momentum-none": ("layer", (20, 13), None),
    "network-equal": ("network", (16, 16), 0.1),
    "network-unequal": ("network", (37, 27), 0.1),
    "network-one-row": ("network", (1, 20), None),
    "standalone-unequal": ("standalone", (37, 27), 0.1),
    "standalone-one-row": ("standalone", (1, 20), None),
    "standalone-3d": ("standalone-3d", (5, 3), 0.1),
}


def build(kind, momentum):
    """The stock-or-fused model of a case, in float64, the same on every process."""
    torch.manual_seed(0)
    if kind == "layer":
        model = LinearBNReLU(IN_FEATURES, 8, momentum=momentum)
    elif kind == "network":
        model = FusedMLP(IN_FEATURES, (10, 8), 5, momentum=momentum)
    elif kind == "standalone":
        linear = torch.nn.Linear(IN_FEATURES, 8)
        model = torch.nn.Sequential(linear, torch.nn.BatchNorm1d(8, momentum=momentum), torch.nn.ReLU())
    else:  # BatchNorm1d over (N, C, L)
        model = torch.nn.Sequential(torch.nn.BatchNorm1d(4, momentum=momentum))
    model = model.double()
    with torch.no_grad():  # away from the default affine parameters, so their gradients matter
        for p in model.parameters():
            if p.dim() == 1:  # BatchNorm's weight and bias, the Linears' biases
                p.uniform_(0.5, 1.5)
    return model


def batch(kind, step, rows):
    """Step `step`'s global batch (input, loss weights): the concatenation of the ranks' rows."""
    g = torch.Generator().manual_seed(100 + step)
    total = sum(rows)
    shape = (total, 4, 3) if kind == "standalone-3d" else (total, IN_FEATURES)
    x = torch.randn(shape, generator=g, dtype=torch.float64) * 2 + 0.5
    out_shape = {"layer": (total, 8), "network": (total, 5), "standalone": (total, 8)}.get(kind, shape)
    return x, torch.randn(out_shape, generator=g, dtype=torch.float64)


def rank_rows(rows, rank):
    start = sum(rows[:rank])
    return slice(start, start + rows[rank])


def run_parity(rank, world, out_dir, device="cpu", convert=convert_sync_batchnorm, kinds=None):
    results = {}
    for name, (kind, rows, momentum) in CASES.items():
        if kinds is not None and kind not in kinds:
            continue
        model = convert(build(kind, momentum)).to(device)
        ddp = DistributedDataParallel(model, device_ids=[rank] if device != "cpu" else None)
        optimizer = torch.optim.SGD(ddp.parameters(), lr=LR)
        mine = rank_rows(rows, rank)
        steps = []
        for step in range(STEPS):
            x, weights = batch(kind, step, rows)
            x, weights = x[mine].to(device).requires_grad_(), weights[mine].to(device)
            out = ddp(x)
            # The rank's loss is its rows' share of the global mean, times the world size: DDP's
            # average of the ranks' gradients is then the gradient of the global batch's mean.
            loss = (out * weights).sum() * world / sum(rows)
            optimizer.zero_grad()
            loss.backward()
            grads = {n: p.grad.cpu() for n, p in model.named_parameters()}
            steps.append({"out": out.detach().cpu(), "input_grad": x.grad.cpu(), "grads": grads})
            optimizer.step()
        model.eval()
        x, _ = batch(kind, STEPS, rows)
        state = {k: v.cpu() for k, v in model.state_dict().items()}
        results[name] = {"steps": steps, "state": state, "eval": model(x.to(device)).detach().cpu()}
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))


def run_parity_cuda(rank, world, out_dir):
    """On GPUs, the usual recipe: stock torch.nn.SyncBatchNorm inside the fused layers, honoured."""
    convert = torch.nn.SyncBatchNorm.convert_sync_batchnorm
    run_parity(rank, world, out_dir, device=f"cuda:{rank}", convert=convert, kinds=("layer", "network"))


def run_header_mismatch(rank, world, out_dir):
    """Ranks whose layers have different widths: the header exchange must refuse them."""
    bn = convert_sync_batchnorm(torch.nn.BatchNorm1d(6 + 2 * rank))
    bn(torch.randn(5, 6 + 2 * rank))


def run_stock_sync_batchnorm_on_cpu(rank, world, out_dir):
    """A stock torch.nn.SyncBatchNorm inside a fused layer, on the CPU: refused, pointing to the
    helper, before any collective."""
    layer = LinearBNReLU(IN_FEATURES, 8)
    layer.bn = torch.nn.SyncBatchNorm(8)
    layer(torch.randn(5, IN_FEATURES))


def run_unsupported(rank, world, out_dir):
    """torch.func and double backward through synchronized statistics: each a clear error, on both
    ranks alike (so no rank waits on a collective the other never calls)."""
    layer = convert_sync_batchnorm(LinearBNReLU(IN_FEATURES, 8)).double()
    x = torch.randn(6, IN_FEATURES, dtype=torch.float64, requires_grad=True)
    messages = {}
    try:
        torch.func.grad(lambda t: layer(t).sum())(x)
    except RuntimeError as err:
        messages["func"] = str(err)
    out = layer(x)
    try:
        (g,) = torch.autograd.grad(out.square().sum(), x, create_graph=True)
    except RuntimeError as err:
        messages["double_backward"] = str(err)
    # torch.compile breaks the graph around the collectives and gives the eager result.
    compiled = torch.compile(layer)
    y = torch.randn(7 + rank, IN_FEATURES, dtype=torch.float64)
    messages["compiled_matches_eager"] = bool(torch.allclose(compiled(y), layer(y), rtol=1e-12, atol=1e-12))
    torch.save(messages, os.path.join(out_dir, f"rank{rank}.pt"))


def run_rank_exits(rank, world, out_dir):
    """Rank 1 leaves before the first collective; rank 0 must fail, not wait forever."""
    if rank == 1:
        sys.exit(0)
    bn = convert_sync_batchnorm(torch.nn.BatchNorm1d(4))
    bn(torch.randn(5, 4))


SCENARIOS = {
    "parity": run_parity,
    "parity-cuda": run_parity_cuda,
    "header-mismatch": run_header_mismatch,
    "stock-sync-batchnorm-on-cpu": run_stock_sync_batchnorm_on_cpu,
    "unsupported": run_unsupported,
    "rank-exits": run_rank_exits,
}


def main(scenario, rank, world, init_file, out_dir, timeout=60):
    torch.set_num_threads(1)
    cuda = scenario.endswith("-cuda")
    if cuda:
        torch.cuda.set_device(int(rank))
    dist.init_process_group(
        "nccl" if cuda else "gloo",
        init_method=f"file://{init_file}",
        rank=int(rank),
        world_size=int(world),
        timeout=timedelta(seconds=float(timeout)),
    )
    SCENARIOS[scenario](int(rank), int(world), out_dir)
    dist.barrier()  # no rank tears the group down while another still finishes its last collective
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
