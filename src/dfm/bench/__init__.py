"""Benchmarks of the method itself: `dfm bench speed` (cost of DFM vs Flow Matching, the paper's Table 2).

:mod:`dfm.bench.measure` holds the measuring tools (FLOPs, interleaved timing, peak memory, MFU),
:mod:`dfm.bench.speed` the DFM-vs-Flow-Matching comparison and :mod:`dfm.bench.cli` the command line. Importing
this package (or its ``cli``) does not import torch, so that ``dfm --help`` stays fast.
"""
