"""edgeprop: train on edge devices with per-block local updates compiled ahead of time.

This package (the device side) imports numpy only; engines live in edgeprop.runtimes and the
torch desktop side in edgeprop.exporters.
"""
__version__ = "0.1.0"
