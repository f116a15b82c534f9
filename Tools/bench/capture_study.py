"""What the numpy studies of the 32K Gemma capture share: their common options and the capture's arrays.

The folder is what `Tools/bench/capture32k.sh` writes: layerNN_{keys,values,queries,prefill_queries}.npy.
"""
import argparse

import numpy as np


def parser(doc):
    """An argument parser with the options every capture study takes (--dir, --layers, --groups, --scale)."""
    p = argparse.ArgumentParser(description=doc.split("\n")[0])
    p.add_argument("--dir", default="Tools/bench/out/gemma32k")
    p.add_argument("--layers", default="05,11,17")
    p.add_argument("--groups", type=int, default=16, help="decode query groups (of 4 heads) per layer")
    p.add_argument("--scale", type=float, default=0.0625, help="softmax scale (Gemma 3: 1/16)")
    return p


def load(folder, layer, name):
    """One array of a captured layer as float32 (name: keys, values, queries or prefill_queries)."""
    return np.load(f"{folder}/layer{layer}_{name}.npy").astype(np.float32)
