"""Fused Linear + BatchNorm1d + ReLU + Dropout vs the stock modules (eager, torch.compile) and the GEMM floor.

python -m benchmarks.bench_linear_bn_relu            # the tables, written to benchmarks/results/
python -m benchmarks.bench_linear_bn_relu --quick    # one tiny case, one round: a smoke run
"""

from collections import OrderedDict

import torch
from torch import nn

from benchmarks.harness import interleaved_medians, machine_description, parse_args, publish, saved_activation_bytes
from fused_mlp.nn import LinearBNReLU

CASES = [(batch, n_in, n_out) for n_in, n_out in [(784, 512), (512, 256)] for batch in (64, 256, 1024)]
QUICK_CASES = [(64, 32, 16)]
IMPLS = ("eager", "compile", "fused")
MODES = ("train", "eval")
DROPOUT = 0.3


def make_modules(n_in, n_out, seed=0, device="cpu"):
    """The stock Sequential, the same module under torch.compile, and the fused layer holding a
    copy of its parameters and buffers (the state_dict keys map one to one), on `device`."""
    torch.manual_seed(seed)
    stock = nn.Sequential(
        OrderedDict(
            linear=nn.Linear(n_in, n_out), bn=nn.BatchNorm1d(n_out), relu=nn.ReLU(), dropout=nn.Dropout(DROPOUT)
        )
    ).to(device)
    fused = LinearBNReLU(n_in, n_out, dropout=DROPOUT).to(device)
    fused.load_state_dict(stock.state_dict())
    # Every (shape, train/eval) pair is one more compilation of the shared Sequential.forward.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    return {"eager": stock, "compile": torch.compile(stock, dynamic=False), "fused": fused}


def make_inputs(batch, n_in, n_out, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, n_in, generator=g).requires_grad_()
    grad = torch.randn(batch, n_out, generator=g)
    return x, grad


def make_step(module, x, grad, mode):
    """train: one forward + backward, the gradients dropped so every call allocates them afresh;
    eval: one forward under no_grad."""
    module.train(mode == "train")
    params = list(module.parameters())
    if mode == "eval":

        def step():
            with torch.no_grad():
                module(x)

        return step

    def step():
        module(x).backward(grad)
        x.grad = None
        for p in params:
            p.grad = None

    return step


def gemm_floor(x, weight, bias, grad, mode):
    """The GEMMs any implementation must do: the forward addmm, and in train the two backward mms."""
    x, w, b = x.detach(), weight.detach(), bias.detach()
    if mode == "eval":
        return lambda: torch.addmm(b, x, w.t())
    return lambda: (torch.addmm(b, x, w.t()), torch.mm(grad, w), torch.mm(grad.t(), x))


def run(cases, rounds):
    results = []
    for mode in MODES:
        for batch, n_in, n_out in cases:
            modules = make_modules(n_in, n_out)
            x, grad = make_inputs(batch, n_in, n_out)
            steps = {name: make_step(modules[name], x, grad, mode) for name in IMPLS}
            linear = modules["eager"].linear
            steps["floor"] = gemm_floor(x, linear.weight, linear.bias, grad, mode)
            medians = interleaved_medians(steps, rounds=rounds, warmup=2)  # warm-up compiles
            saved = None
            if mode == "train":
                saved = {
                    name: saved_activation_bytes(lambda: modules[name](x), exclude=(x, *modules[name].parameters()))
                    for name in ("eager", "fused")
                }
                saved["ratio"] = saved["fused"] / saved["eager"]
            results.append((mode, (batch, n_in, n_out), medians, saved))
    return results


def format_table(results, mode):
    header = (
        "| (batch, in, out) | eager ms | compile ms | fused ms | floor ms | fused vs eager "
        "| fused vs compile | fused / floor |"
    )
    align = "|---|---:|---:|---:|---:|---:|---:|---:|"
    if mode == "train":
        header += " saved for backward, eager | fused | fused / eager |"
        align += "---:|---:|---:|"
    lines = [header, align]
    for row_mode, (batch, n_in, n_out), m, saved in results:
        if row_mode != mode:
            continue
        line = (
            f"| ({batch}, {n_in}, {n_out}) | {m['eager'] * 1e3:.3f} | {m['compile'] * 1e3:.3f} | "
            f"{m['fused'] * 1e3:.3f} | {m['floor'] * 1e3:.3f} | {m['eager'] / m['fused']:.2f}x | "
            f"{m['compile'] / m['fused']:.2f}x | {m['fused'] / m['floor']:.2f} |"
        )
        if saved is not None:
            line += f" {saved['eager'] / 1e6:.3f} MB | {saved['fused'] / 1e6:.3f} MB | {saved['ratio']:.2f} |"
        lines.append(line)
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv, __doc__)
    cases = QUICK_CASES if args.quick else CASES
    results = run(cases, rounds=args.rounds)
    report = (
        f"# Linear + BatchNorm1d + ReLU + Dropout({DROPOUT}), CPU\n\n{machine_description()}\n\n"
        "Median of interleaved rounds. floor = the GEMMs alone, no autograd: addmm in eval, "
        "addmm + the two backward mms in train. Saved for backward = bytes autograd keeps "
        "beyond the input and the parameters.\n\n"
        "## Forward + backward (train mode)\n\n" + format_table(results, "train") + "\n\n"
        "## Forward only (eval mode, no_grad)\n\n" + format_table(results, "eval") + "\n"
    )
    publish(report, "linear_bn_relu_cpu.md", args.quick)
    return results


if __name__ == "__main__":
    main()
