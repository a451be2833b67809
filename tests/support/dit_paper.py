"""DiT (Peebles & Xie 2023, arXiv 2212.09748), Table 4: forward GFLOPs (multiply-adds) at 256x256 px =
32x32x4 latents, and parameter counts (millions). One table for the FLOP tests and the synthetic sweeps."""

PAPER_GFLOPS = {
    "S/8": 0.36, "S/4": 1.41, "S/2": 6.06, "B/8": 1.42, "B/4": 5.56, "B/2": 23.01,
    "L/8": 5.01, "L/4": 19.70, "L/2": 80.71, "XL/8": 7.39, "XL/4": 29.05, "XL/2": 118.64,
}
# the same, keyed (size, patch)
DIT_GFLOPS = {(short.split("/")[0], int(short.split("/")[1])): g for short, g in PAPER_GFLOPS.items()}
DIT_PARAMS_M = {"S": 33.0, "B": 130.0, "L": 458.0, "XL": 675.0}
