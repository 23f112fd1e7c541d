"""Desktop side (torch): NoProp-DT models, compile-time step graphs, the torch reference.

    from edgeprop.exporters import export
    export("runs/digits", data="digits")

`export` is imported on first use, so the onnx-only parts (liveness, model_memory) load
without torch.
"""
__all__ = ["export"]


def __getattr__(name):
    if name == "export":
        from .bundle_export import export
        return export
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
