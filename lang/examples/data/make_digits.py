#!/usr/bin/env python3
"""Convert scikit-learn's handwritten digits (8x8, 1,797 samples) into the
safetensors files that `lang/examples/digits.dl` trains on.

Run once (needs numpy, scikit-learn, safetensors); the outputs are committed:
    python3 lang/examples/data/make_digits.py

Split: a fixed permutation (numpy RandomState(0)); the first 1,437 samples
train, the remaining 360 are held out. Pixels are scaled from 0..16 to 0..1.
"""
import os

import numpy as np
from safetensors.numpy import save_file
from sklearn.datasets import load_digits

here = os.path.dirname(os.path.abspath(__file__))
digits = load_digits()
x = (digits.images.astype(np.float32) / 16.0).reshape(-1, 1, 8, 8)
y = digits.target.astype(np.int32)
perm = np.random.RandomState(0).permutation(len(y))
x, y = x[perm], y[perm]
n_train = 1437
save_file({"x": np.ascontiguousarray(x[:n_train]), "label": y[:n_train]},
          os.path.join(here, "digits_train.safetensors"))
save_file({"x": np.ascontiguousarray(x[n_train:]), "label": y[n_train:]},
          os.path.join(here, "digits_test.safetensors"))
print(f"train {n_train}, test {len(y) - n_train}")
