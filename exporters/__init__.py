"""Desktop side (torch): NoProp-DT models, compile-time step graphs, the torch reference.

    from edgeprop.exporters import export
    export("runs/digits", data="digits")
"""
from .export import export

__all__ = ["export"]
