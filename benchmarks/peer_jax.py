"""The JAX training peer, run in a process of its own by benchmarks/peers.py (never imported
by a process that also runs PyTorch: XLA's thread pool spins after work and takes the other side's
cores).

    python -m benchmarks.peer_jax --batches 64,256,1024 --reps 40 [--nobn-batches 64]

The same models as the PyTorch side, written as a JAX user writes them:
- the class-notes MLP, 784-512-256-128-64-10, BatchNorm1d (batch statistics, running statistics
  updated as torch does), ReLU, Dropout 0.3, cross-entropy, optax.adam(1e-3);
- the side notes' 784-128-64-10 ReLU net, no BatchNorm or dropout, optax.sgd(0.01, momentum=0.9).

One training step is a jax.jit of forward, loss, gradient and the optimizer update, with the
parameters, optimizer state, batch statistics and PRNG key donated (donate_argnums) and a fresh
dropout key split inside the step. Inputs are placed on the device once (jax.device_put). Each
timing runs `reps` steps back to back and waits for the last, as a training loop does.
Prints one JSON object: {"train_bn": {batch: ms}, "train_nobn": {batch: ms}}.
"""

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

EPS, MOMENTUM, DROPOUT = 1e-5, 0.1, 0.3


def init_mlp(key, widths, batch_norm):
    """nn.Linear's initialization (uniform in +-1/sqrt(fan_in)), BatchNorm's (ones, zeros)."""
    params, stats = [], []
    for fan_in, fan_out in zip(widths, widths[1:]):
        key, kw, kb = jax.random.split(key, 3)
        bound = 1.0 / np.sqrt(fan_in)
        layer = {
            "w": jax.random.uniform(kw, (fan_out, fan_in), jnp.float32, -bound, bound),
            "b": jax.random.uniform(kb, (fan_out,), jnp.float32, -bound, bound),
        }
        params.append(layer)
    hidden = widths[1:-1]
    if batch_norm:
        for i, c in enumerate(hidden):
            params[i]["gamma"] = jnp.ones((c,), jnp.float32)
            params[i]["beta"] = jnp.zeros((c,), jnp.float32)
            stats.append({"mean": jnp.zeros((c,), jnp.float32), "var": jnp.ones((c,), jnp.float32)})
    return params, stats


def forward(params, stats, x, key, batch_norm, dropout):
    """Training-mode forward: logits and the updated running statistics."""
    new_stats = []
    keys = jax.random.split(key, max(len(params) - 1, 1))
    n = x.shape[0]
    for i, layer in enumerate(params[:-1]):
        z = x @ layer["w"].T + layer["b"]
        if batch_norm:
            mean = z.mean(axis=0)
            var = z.var(axis=0)
            z = (z - mean) * jax.lax.rsqrt(var + EPS) * layer["gamma"] + layer["beta"]
            s = stats[i]
            new_stats.append(
                {
                    "mean": (1 - MOMENTUM) * s["mean"] + MOMENTUM * mean,
                    "var": (1 - MOMENTUM) * s["var"] + MOMENTUM * var * (n / (n - 1)),
                }
            )
        x = jax.nn.relu(z)
        if dropout > 0:
            keep = jax.random.bernoulli(keys[i], 1.0 - dropout, x.shape)
            x = jnp.where(keep, x / (1.0 - dropout), 0.0)
    out = params[-1]
    return x @ out["w"].T + out["b"], new_stats


def make_step(optimizer, batch_norm, dropout):
    def loss_fn(params, stats, x, y, key):
        logits, new_stats = forward(params, stats, x, key, batch_norm, dropout)
        loss = jnp.mean(jax.nn.logsumexp(logits, axis=1) - jnp.take_along_axis(logits, y[:, None], axis=1)[:, 0])
        return loss, new_stats

    def step(params, opt_state, stats, key, x, y):
        key, sub = jax.random.split(key)
        (loss, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, stats, x, y, sub)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, new_stats, key, loss

    return jax.jit(step, donate_argnums=(0, 1, 2, 3))


def time_training(widths, batch_norm, dropout, optimizer, batch, reps, rounds):
    key = jax.random.PRNGKey(0)
    params, stats = init_mlp(key, widths, batch_norm)
    opt_state = optimizer.init(params)
    rng = np.random.default_rng(0)
    x = jax.device_put(rng.standard_normal((batch, widths[0]), dtype=np.float32))
    y = jax.device_put(rng.integers(0, widths[-1], (batch,), dtype=np.int32))
    step = make_step(optimizer, batch_norm, dropout)
    state = (params, opt_state, stats, key)
    for _ in range(5):  # compile and warm up
        *state, loss = step(*state, x, y)
    loss.block_until_ready()
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(reps):
            *state, loss = step(*state, x, y)
        loss.block_until_ready()
        times.append((time.perf_counter() - start) / reps * 1e3)
    return statistics.median(times)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", default="64,256,1024")
    parser.add_argument("--nobn-batches", default="64")
    parser.add_argument("--reps", type=int, default=20, help="steps per timing")
    parser.add_argument("--rounds", type=int, default=5, help="timings per case; the median is reported")
    args = parser.parse_args(argv)
    result = {"train_bn": {}, "train_nobn": {}}
    for b in (int(v) for v in args.batches.split(",") if v):
        result["train_bn"][b] = time_training(
            (784, 512, 256, 128, 64, 10), True, DROPOUT, optax.adam(1e-3), b, args.reps, args.rounds
        )
    for b in (int(v) for v in args.nobn_batches.split(",") if v):
        result["train_nobn"][b] = time_training(
            (784, 128, 64, 10), False, 0.0, optax.sgd(0.01, momentum=0.9), b, args.reps, args.rounds
        )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
