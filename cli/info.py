"""`edgeprop info`: describe a bundle and its checkpoint."""
from __future__ import annotations

from edgeprop import bundle as bundles

HELP = "describe a bundle"


def add_arguments(i) -> None:
    i.add_argument("bundle")


def run(args) -> int:
    from edgeprop.trainer import checkpoint_meta
    bundle = bundles.load(args.bundle)
    m = bundle.manifest
    n_params = sum(u.n_params for u in bundle.units)
    print(f"bundle     {bundle.root} (schema {m['schema_version']}, id {bundle.id})")
    model = bundle.model
    roles = {}
    for u in bundle.units:
        roles[u.role] = roles.get(u.role, 0) + 1
    print(f"rule       {bundle.rule}: " + ", ".join(f"{n} {role}{'s' if n > 1 else ''}" for role, n in roles.items()))
    if "layers" in model:
        layers = " ".join(d["type"] for d in model["layers"])
        print(f"model      sequential ({model['source']}): {layers}; blocks {model['blocks']}")
    elif model.get("kind") == "graph":
        units = ", ".join(f"{u['name']} ({len(u['train']['nodes'])} ops)" for u in model["units"])
        auto = model.get("trainable_auto")  # its list of names is long: say what auto chose
        trainable = f"auto on {auto['device']}: {auto['chose']}" if auto else model["trainable"]
        print(f"model      your own ({model['source']}), trainable {trainable}: units {units}")
    else:
        print(f"model      {model['kind']} width {model.get('width')}, {model.get('embedding')} embedding "
              f"(d={model.get('embed_dim')})")
    print(f"           input {bundle.input_shape}, {bundle.num_classes} classes, {n_params:,} trained parameters")
    lrs = ", ".join(sorted({f"{u.role} {u.lr:g}" for u in bundle.units}))
    print(f"training   batch {bundle.batch_size}, {bundle.optimizer['name']} lr {lrs}")
    if bundle.schedule is not None:
        print(f"noise      eta {bundle.schedule.eta:g}, block weights "
              + " ".join(f"{w:.3g}" for w in bundle.schedule.weights))
    if bundle.temperature is not None:
        note = f" ({bundle.temperature_note})" if bundle.temperature_note else ""
        print(f"inference  temperature {bundle.temperature:g}{note}: 0 the mean chain, 1 the paper's sampled chain")
    for key, g in bundle.graphs.items():
        size = bundle.graph_path(key).stat().st_size
        print(f"graph      {key:12s} {g.file} ({size / 1024:.0f} KiB, {len(g.inputs)} inputs)")
    if bundle.fused is not None:  # optional: train --fused-step
        g = bundle.fused.graph
        size = bundle.path(g.file).stat().st_size
        print(f"graph      {'fused_step':12s} {g.file} ({size / 1024:.0f} KiB, {len(g.inputs)} inputs): every unit "
              f"in one call (train --fused-step)")
    ckpt = bundle.checkpoint_path()
    if ckpt.exists():
        from edgeprop.trainer import epoch_losses
        meta = checkpoint_meta(bundle)  # the run's record, checked; no array is read
        print(f"checkpoint {ckpt}: {meta.get('done')}/{meta.get('total')} steps "
              f"({meta.get('order')}, seed {meta.get('seed')})")
        memory = meta.get("memory")
        if memory:
            from edgeprop.sizes import format_size as fmt
            print(f"  memory   working set {fmt(memory['working_set'])} measured above runtime and data "
                  f"({fmt(memory['baseline'])}){', --stream' if memory.get('stream') else ''}")
        history = epoch_losses(meta.get("history", {}))
        for unit in bundle.units:
            means = history.get(unit.name)
            if means:
                print(f"  {unit.name:8s} mean loss, epoch 1: {means[0]:.3g}  epoch {len(means)}: {means[-1]:.3g}")
        from edgeprop.trainer import load_eval

        from .eval import format_eval
        report = load_eval(bundle)
        if report:
            print(f"  eval     on {report.get('data')} ({report['n']} samples, {report['runs']} run(s)): "
                  + format_eval(report, report["runs"]).replace("\n", "\n           "))
    else:
        print("checkpoint none (not trained yet)")
    return 0
