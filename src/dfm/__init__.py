"""Decomposable Flow Matching (DFM).

Time convention for the whole package: t = 0 is pure noise, t = 1 is data.
"""

__version__ = "0.1.0"
