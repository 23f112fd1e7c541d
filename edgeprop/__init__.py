"""edgeprop: train on edge devices with per-block local updates compiled ahead of time.

This package is the ground floor: the bundle format, the trainer, the rules' device halves,
the memory planner. It imports numpy and the standard library only, and nothing from the
folders above it (tests/test_layers.py checks): engines live in edgeprop.runtimes, the torch
desktop side in edgeprop.exporters, device profiles in edgeprop.devices, deploy targets in
edgeprop.targets and the command line in edgeprop.cli.
"""
__version__ = "0.1.0"
