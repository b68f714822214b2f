"""The ONNX Runtime inference peer, run in a process of its own by benchmarks/peers.py (its
thread pool spins after work and would take the cores of a PyTorch process sharing them).

    python -m benchmarks.peer_onnxruntime --model mlp.onnx --batches 64,256,1024 [--threads 2]

The model is the stock class-notes MLP in eval mode, exported by benchmarks/peers.py with
torch.onnx.export. The session is ONNX Runtime's CPUExecutionProvider with every graph
optimization on and `threads` intra-op threads; inputs are numpy arrays made once. Each timing runs
`reps` calls back to back. Prints one JSON object: {"infer": {batch: ms}}.
"""

import argparse
import json
import statistics
import time

import numpy as np
import onnxruntime as ort


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--batches", default="64,256,1024")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(args.model, options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    result = {"infer": {}}
    for batch in (int(v) for v in args.batches.split(",") if v):
        x = np.random.default_rng(0).standard_normal((batch, 784), dtype=np.float32)
        for _ in range(10):
            session.run(None, {name: x})
        times = []
        for _ in range(args.rounds):
            start = time.perf_counter()
            for _ in range(args.reps):
                session.run(None, {name: x})
            times.append((time.perf_counter() - start) / args.reps * 1e3)
        result["infer"][batch] = statistics.median(times)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
