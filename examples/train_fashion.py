"""Trains the class-notes MLP on Fashion-MNIST.

Not written yet: the model, the data loading and the training loop are the next piece of work.
"""

import sys

if __name__ == "__main__":
    sys.exit("examples/train_fashion.py: training is not implemented yet; "
             "the fused ops can be used today through fused_mlp.functional and fused_mlp.nn")
