"""Federated training on Flower (edgeprop.fleet): partitions, assignment, the client's
round, the server's per-unit averaging and checkpoint, and `edgeprop fleet simulate`."""
import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("flwr")

from conftest import ROOT, edgeprop  # noqa: E402
from edgeprop import bundle as bundles  # noqa: E402
from edgeprop import datasets  # noqa: E402
from edgeprop.datasets import Dataset  # noqa: E402
from edgeprop.device_profile import Profile  # noqa: E402
from edgeprop.errors import DataError, EdgepropError  # noqa: E402
from edgeprop.fleet import assign, partition, records  # noqa: E402
from edgeprop.fleet.client import Setup, train  # noqa: E402
from edgeprop.fleet.server import Fleet, Settings, merge  # noqa: E402
from edgeprop.runtimes import get_engine  # noqa: E402
from edgeprop.storage import load_arrays, save_arrays  # noqa: E402

Y = np.repeat(np.arange(10), 40)  # 40 shards of 10: each shard one class


@pytest.mark.parametrize("how", ["iid", "dirichlet:0.5", "dirichlet:0.1", "shard:2"])
def test_partitions_cover_every_sample_once_and_leave_no_client_empty(how):
    parts = partition.partition(Y, 20, how, seed=3)
    together = np.concatenate(parts)
    assert len(parts) == 20 and min(len(p) for p in parts) > 0
    assert sorted(together.tolist()) == list(range(len(Y)))
    assert [p.tolist() for p in partition.partition(Y, 20, how, seed=3)] == [p.tolist() for p in parts]


def test_label_skew_grows_as_alpha_shrinks_and_shards_hold_few_classes():
    def classes(how):
        return np.mean([len(np.unique(Y[p])) for p in partition.partition(Y, 20, how, seed=0)])
    assert classes("iid") > classes("dirichlet:1") > classes("dirichlet:0.05")
    assert classes("shard:2") <= 2


@pytest.mark.parametrize("text", ["dirichlet", "dirichlet:0", "dirichlet:-1", "shard:0", "shard:x", "random", "iid:2"])
def test_bad_partition_is_one_clear_error(text):
    with pytest.raises(EdgepropError, match="--partition"):
        partition.parse(text)


def test_blocks_round_robin_covers_every_unit_each_round_and_rotates():
    policy = assign.parse("blocks:1")
    seen = {}
    for rnd in (1, 2, 3):
        deal = assign.assign(policy, [7, 3, 5, 1, 9, 4, 2, 8, 6, 0, 11], 11, rnd)
        assert sorted(u for units in deal.values() for u in units) == list(range(11))
        seen[rnd] = deal[0]
    assert len({tuple(v) for v in seen.values()}) > 1  # a client meets different units over rounds
    with pytest.raises(EdgepropError, match="cover fewer"):
        assign.check_coverage(assign.parse("blocks:2"), 5, 11)


def test_by_memory_deals_each_client_what_it_holds_and_all_gives_everything():
    deal = assign.assign(assign.parse("by-memory"), [1, 2, 3], 11, 1, {1: 2, 2: 11})
    assert [len(deal[n]) for n in (1, 2, 3)] == [2, 11, 11]  # node 3 unknown yet: offered all
    assert assign.assign(assign.parse("all"), [4, 5], 3, 9) == {4: [0, 1, 2], 5: [0, 1, 2]}
    for bad in ("blocks:0", "blocks", "memory", "all:1"):
        with pytest.raises(EdgepropError, match="--assign"):
            assign.parse(bad)


def profile(ram: int) -> Profile:
    return Profile("tiny", "tiny", "linux", "aarch64", 1, ram, 1 << 30, 1.0, ("fp32",), ("onnxruntime",))


def test_by_memory_capacity_follows_the_plan_and_refuses_a_device_too_small(digits_bundle):
    b = bundles.load(digits_bundle)
    counts = []
    for mib in range(40, 400, 4):
        try:
            counts.append(assign.units_that_fit(b, profile(mib << 20), "onnxruntime", 1 << 20))
        except EdgepropError as e:
            assert "cannot hold even one unit" in str(e)
            counts.append(0)
    assert counts == sorted(counts) and counts[0] == 0 and counts[-1] == len(b.units)
    assert any(0 < c < len(b.units) for c in counts)


@pytest.fixture(scope="module")
def client(digits_bundle):
    b = bundles.load(digits_bundle)
    data = datasets.load("digits", "train")
    return Setup(b, Dataset(data.x[:200], data.y[:200], "digits:train[:200]"), client=0).check()


def config(b, **over):
    return {"bundle-id": b.id, "units": "block3,head", "local-epochs": 1, "seed": 0, "server-round": 1,
            "slots": "keep", **over}


def test_client_trains_only_its_units_and_keeps_its_slots_between_rounds(client):
    b, engine = client.bundle, get_engine("onnxruntime")
    state, _ = b.initial_state()
    sent = records.shared_arrays(b, state)
    memory = {}
    arrays, metrics = train(client, engine, sent, config(b), memory)
    assert sorted(arrays) == ["block3/param", "head/param"]  # only what it trained goes back
    assert not np.allclose(arrays["block3/param"], sent["block3/param"])
    assert metrics["num-examples"] == 200 and np.isfinite(metrics["loss"]) and metrics["capacity"] == len(b.units)
    steps = -(-200 // b.batch_size)
    assert set(memory) == {"block3", "head"} and memory["head"][1] == steps  # slots kept
    again, _ = train(client, engine, sent, config(b, **{"server-round": 2}), memory)
    assert memory["head"][1] == 2 * steps  # the step count (Adam's bias correction) continues
    reset, _ = train(client, engine, sent, config(b, **{"server-round": 2, "slots": "reset"}), {})
    assert not np.allclose(again["head/param"], reset["head/param"])


def test_fedprox_pulls_the_trained_weights_towards_the_global_ones(client):
    b, engine = client.bundle, get_engine("onnxruntime")
    state, _ = b.initial_state()
    sent = records.shared_arrays(b, state)
    free, _ = train(client, engine, sent, config(b, units="block1"), {})
    prox, _ = train(client, engine, sent, config(b, units="block1", **{"proximal-mu": 5.0}), {})
    drift = [np.linalg.norm(a["block1/param"] - sent["block1/param"]) for a in (free, prox)]
    assert drift[1] < drift[0]


def test_the_servers_learning_rate_scale_scales_the_clients_steps(client):
    """Config "lr-scale" (a schedule over rounds): 0 leaves the weights, 0.5 moves them less."""
    b, engine = client.bundle, get_engine("onnxruntime")
    state, _ = b.initial_state()
    sent = records.shared_arrays(b, state)
    moved = {scale: np.linalg.norm(train(client, engine, sent, config(b, units="block1", slots="reset",
                                                                       **{"lr-scale": scale}), {})[0]["block1/param"]
                                   - sent["block1/param"]) for scale in (0.0, 0.5, 1.0)}
    assert moved[0.0] == 0 and 0 < moved[0.5] < moved[1.0]
    for bad in (-1.0, float("nan")):
        with pytest.raises(EdgepropError, match="lr-scale"):
            train(client, engine, sent, config(b, **{"lr-scale": bad}), {})


def test_supernodes_without_a_client_number_draw_their_own_batches_and_noise(digits_bundle, tmp_path):
    """`edgeprop fleet join` without --client passes client=-1: the node id stands in, so two
    devices never share a round's seed (their updates would share the same noise)."""
    from types import SimpleNamespace

    from edgeprop.fleet.client import round_seed, setup_from_node
    data = tmp_path / "d.npz"
    train_split = datasets.load("digits", "train")
    save_arrays(data, {"x": train_split.x[:50], "y": train_split.y[:50]})
    node = {"data": str(data), "bundle": str(digits_bundle), "client": -1}
    nodes = [setup_from_node(SimpleNamespace(node_id=n, node_config=node, run_config={})) for n in (7, 8)]
    assert [s.client for s in nodes] == [7, 8]
    assert round_seed(0, 3, nodes[0].client) != round_seed(0, 3, nodes[1].client)
    named = setup_from_node(SimpleNamespace(node_id=7, node_config={**node, "client": 2}, run_config={}))
    assert named.client == 2


def test_client_refuses_another_bundle_and_bad_data_in_one_line(client):
    b = client.bundle
    state, _ = b.initial_state()
    with pytest.raises(EdgepropError, match="the server trains bundle 0000") as e:
        train(client, get_engine("onnxruntime"), records.shared_arrays(b, state),
              config(b, **{"bundle-id": "0000"}), {})
    assert "\n" not in str(e.value)
    data = datasets.load("digits", "train")
    with pytest.raises(DataError, match="features"):
        Setup(b, Dataset(data.x[:50, :32], data.y[:50], "narrow")).check()
    with pytest.raises(DataError, match="outside the model's 10 classes"):
        Setup(b, Dataset(data.x[:50], data.y[:50] + 5, "labels")).check()
    with pytest.raises(EdgepropError, match="cannot hold even one unit"):
        replace(client, device=profile(1 << 20)).check()


def test_server_averages_each_unit_over_the_clients_that_trained_it():
    def reply(n, **arrays):
        return n, {k.replace("_", "/"): np.full(2, v, np.float32) for k, v in arrays.items()}

    current = {"a/param": np.zeros(2, np.float32), "b/param": np.zeros(2, np.float32),
               "c/param": np.full(2, 7, np.float32)}
    merged, samples = merge(current, [reply(1, a_param=1.0, b_param=4.0), reply(3, a_param=5.0)])
    assert merged["a/param"].tolist() == [4.0, 4.0]     # (1*1 + 3*5) / 4
    assert merged["b/param"].tolist() == [4.0, 4.0]     # only the first client trained b
    assert merged["c/param"].tolist() == [7.0, 7.0]     # nobody trained c: unchanged
    assert samples == {"a": 4, "b": 1}


def test_fedavgm_steps_with_server_momentum_and_a_resumed_server_takes_the_same_step(bundle_copy):
    def aggregate(fleet, server_round, shift):
        current = {k: v.copy() for k, v in fleet.global_arrays().items()}
        fleet.aggregate(server_round, current, [(5, {k: v + np.float32(shift) for k, v in current.items()})])
        fleet.round = server_round
        fleet.history.append({"round": server_round})
        return current

    b = bundles.load(bundle_copy)
    settings = Settings(rounds=3, strategy="fedavgm", server_momentum=0.5)
    fleet = Fleet(b, settings, log=lambda line: None)
    before = aggregate(fleet, 1, 0.25)["head/param"]
    assert np.allclose(fleet.state["head"]["param"], before + 0.25)  # first step: the average itself
    fleet.save()
    resumed = Fleet(b, settings, log=lambda line: None)
    assert resumed.round == 1
    for f in (fleet, resumed):
        before = aggregate(f, 2, 0.25)["head/param"]
        assert np.allclose(f.state["head"]["param"], before + 0.25 + 0.5 * 0.25)  # momentum carries on
    arrays, meta = load_arrays(b.checkpoint_path())  # a momentum that misses a unit: refused in one line
    save_arrays(b.checkpoint_path(), [(k, v) for k, v in arrays.items() if k != "server/momentum/head/param"], meta)
    with pytest.raises(EdgepropError, match="momentum does not match"):
        Fleet(b, settings, log=lambda line: None)


def test_fedadam_steps_each_unit_at_its_learning_rate(bundle_copy):
    """Adam divides the clients' learning rates out of their updates; the server puts them back:
    a unit's step is server-lr x its rate / the first unit's (the head's: ten times a block's)."""
    b, lines = bundles.load(bundle_copy), []
    fleet = Fleet(b, Settings(strategy="fedadam", server_lr=0.01), log=lines.append)
    assert any("SGD clients" in line for line in lines)  # an AdamW bundle: the measured setting is named
    current = {k: v.copy() for k, v in fleet.global_arrays().items()}
    fleet.aggregate(1, current, [(5, {k: v + np.float32(0.25) for k, v in current.items()})])
    step = {u.name: float(np.mean(fleet.state[u.name]["param"] - current[f"{u.name}/param"])) for u in b.units}
    lr = {u.name: u.lr for u in b.units}
    assert lr["head"] != lr["block1"] and step["block1"] > 0
    assert step["head"] / step["block1"] == pytest.approx(lr["head"] / lr["block1"], rel=1e-3)
    assert step["block2"] == pytest.approx(step["block1"], rel=1e-3)


@pytest.mark.parametrize("strategy", ["fedavgm", "fedadam"])
def test_a_unit_nobody_trained_keeps_its_weights_and_its_server_momentum(bundle_copy, strategy):
    def aggregate(fleet, server_round, shift, skip=()):
        current = {k: v.copy() for k, v in fleet.global_arrays().items()}
        trained = {k: v + np.float32(shift) for k, v in current.items() if records.unit_of(k) not in skip}
        fleet.aggregate(server_round, current, [(5, trained)])
        return current

    fleet = Fleet(bundles.load(bundle_copy), Settings(strategy=strategy, server_momentum=0.5, server_lr=0.1),
                  log=lambda line: None)
    aggregate(fleet, 1, 0.25)
    saved = {k: v.copy() for k, v in fleet._server_state().items() if "/head/" in k}
    before = aggregate(fleet, 2, 0.25, skip=("head",))  # by-memory, or a client that dropped out
    assert np.array_equal(fleet.state["head"]["param"], before["head/param"])  # no step on a zero delta
    assert saved and all(np.array_equal(fleet._server_state()[k], v) for k, v in saved.items())
    assert not np.array_equal(fleet.state["block1"]["param"], before["block1/param"])  # the others stepped
    if strategy == "fedavgm":  # the head's momentum from round 1, undecayed, carries on
        before = aggregate(fleet, 3, 0.25)["head/param"]
        assert np.allclose(fleet.state["head"]["param"], before + 0.25 + 0.5 * 0.25)


def join(*args) -> int:
    from edgeprop.cli import main
    return main(["fleet", "join", *map(str, args)])


def test_join_refuses_bad_data_an_address_and_a_silent_superlink_in_one_line(digits_bundle, tmp_path, capsys):
    import socket
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    narrow = tmp_path / "narrow.npz"
    np.savez(narrow, x=np.zeros((5, 32), np.float32), y=np.zeros(5, np.int64))
    cases = [((narrow,), "samples have 32 features"),  # before it contacts anyone
             (("--wait", 0, "digits"), f"the SuperLink at 127.0.0.1:{port} does not answer")]
    for extra, message in cases:
        args = [*extra[:-1], digits_bundle, f"127.0.0.1:{port}", extra[-1]]
        assert join(*args) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    assert join(digits_bundle, "server-without-port", "digits") == 2
    assert "expected HOST:PORT" in capsys.readouterr().err


def test_join_hands_flower_supernode_the_node_config_the_client_reads():
    from flwr.common.config import parse_config_args

    from edgeprop.fleet.join import supernode_command
    node = {"bundle": "/b/my bundle", "data": "/d/x.npz", "client": 7, "engine": "onnxruntime"}
    command = supernode_command("server:9092", node, ["--root-certificates", "ca.crt"])
    assert Path(command[0]).name == "flower-supernode"
    assert command[1:3] == ["--superlink", "server:9092"] and command[-2:] == ["--root-certificates", "ca.crt"]
    assert parse_config_args([command[command.index("--node-config") + 1]]) == node


def block_torch(tmp_path, monkeypatch) -> None:
    """Every process started from here on (Ray's workers, Flower's app processes) finds a
    `torch` that refuses to import: the fleet's device side must never need it."""
    stub = tmp_path / "blocked" / "torch"
    stub.mkdir(parents=True)
    (stub / "__init__.py").write_text("raise ImportError('torch is blocked: the device side must not import it')\n")
    monkeypatch.setenv("PYTHONPATH", str(stub.parent))


@pytest.mark.slow  # Ray's start-up and two simulations: about a minute
def test_simulate_20_clients_3_rounds_then_resume_and_evaluate(bundle_copy, tmp_path, monkeypatch):
    """Flower's simulation engine, 20 torch-free clients: blocks:1 uploads one unit per
    client; a second run with more rounds resumes from the checkpoint; eval reads it."""
    block_torch(tmp_path, monkeypatch)
    report = tmp_path / "fleet.json"
    proc = edgeprop("fleet", "simulate", bundle_copy, "--data", "digits", "--clients", "20", "--rounds", "2",
                    "--fraction", "0.6", "--local-epochs", "3", "--partition", "dirichlet:0.5", "--assign", "blocks:1",
                    "--json", report, timeout=300)
    assert "round 2/2" in proc.stdout
    r = json.loads(report.read_text())
    b = bundles.load(bundle_copy)
    assert len(r["history"]) == 2 and len(r["accuracy"]) == 2 and r["clients"] == 20
    for entry in r["history"]:
        assert len(entry["clients"]) == 12 and not entry["failed"]
        trained = [u for c in entry["clients"] for u in c["units"]]
        assert len(trained) == 12 and set(trained) == {u.name for u in b.units}  # 12 x 1 unit covers all 11
        assert all(0 < c["received"] < 0.2 * sum(4 * u.n_params for u in b.units) for c in entry["clients"])
    proc = edgeprop("fleet", "simulate", bundle_copy, "--data", "digits", "--clients", "20", "--rounds", "3",
                    "--fraction", "0.6", "--local-epochs", "3", "--partition", "dirichlet:0.5", "--assign", "blocks:1",
                    "--json", report, timeout=300)
    assert "resumed from round 2" in proc.stdout and "round 3/3" in proc.stdout
    _, meta = load_arrays(bundle_copy / "checkpoints" / "last.npz")
    assert meta["fleet"]["round"] == 3 and len(json.loads(report.read_text())["history"]) == 3
    out = edgeprop("eval", bundle_copy, "--data", "digits").stdout
    assert f"{json.loads(report.read_text())['final_accuracy']:.4f}" in out
    # Flower's engine, Ray's workers and the resume between rounds 2 and 3 change nothing: the
    # fleet's global state is the one an in-process replay of the same clients computes.
    history = json.loads(report.read_text())["history"]
    replayed = replay(b, "dirichlet:0.5", 20, history, local_epochs=3, momentum=0.9)
    fleet = load_arrays(bundle_copy / "checkpoints" / "last.npz")[0]
    for key, value in replayed.items():
        np.testing.assert_array_equal(fleet[key], value, err_msg=key)


def replay(b, how: str, clients: int, history: list[dict], local_epochs: int, momentum: float) -> dict:
    """The FedAvgM run a fleet report describes, in this process: each round the clients it
    names train the units it names (the fleet's client code), `merge` averages each unit over
    the clients that trained it, then m = momentum * m + (w - average), w -= m, in float32 as
    Flower's FedAvgM computes it (nine local epochs amplify any other rounding into a
    visible difference)."""
    data, engine = datasets.load("digits", "train"), get_engine("onnxruntime", threads=1)
    setups = [Setup(b, Dataset(data.x[p], data.y[p], f"client{i}"), i).check()
              for i, p in enumerate(partition.partition(data.y, clients, how, 0))]
    state, _ = b.initial_state()
    weights, velocity = records.shared_arrays(b, state), {}
    for entry in history:
        results = []
        for c in entry["clients"]:
            config = {"bundle-id": b.id, "units": ",".join(c["units"]), "local-epochs": local_epochs, "seed": 0,
                      "server-round": entry["round"], "slots": "reset"}
            arrays, metrics = train(setups[c["client"]], engine, weights, config, {})
            results.append((metrics["num-examples"], arrays))
        average, samples = merge(weights, results)
        for key in [k for k in weights if records.unit_of(k) in samples]:
            delta = weights[key] - average[key]
            velocity[key] = momentum * velocity[key] + delta if key in velocity else delta
            weights[key] = weights[key] - velocity[key]
    return weights


@pytest.mark.parametrize("order", ["interleaved", "block-sequential"])
def test_local_steps_train_each_unit_that_many_batches_of_its_epochs(client, order):
    """Config "local-steps" S: a round of S batches per unit (FedSGD at 1), in either order;
    0 (or more batches than the epochs hold) is the whole local epochs."""
    b, engine = client.bundle, get_engine("onnxruntime")
    state, _ = b.initial_state()
    sent = records.shared_arrays(b, state)
    batches = -(-200 // b.batch_size)
    for steps, expected in ((1, 1), (2, 2), (0, 2 * batches), (100, 2 * batches)):
        memory = {}
        train(client, engine, sent, config(b, order=order, **{"local-epochs": 2, "local-steps": steps}), memory)
        assert {u: s for u, (_, s) in memory.items()} == {"block3": expected, "head": expected}, (steps, order)
    for bad in (-1, 1.5, "2"):
        with pytest.raises(EdgepropError, match="local-steps"):
            train(client, engine, sent, config(b, **{"local-steps": bad}), {})


@pytest.mark.slow  # over 5 s alone
def test_simulate_refuses_bad_settings_before_flower_starts(bundle_copy):
    for args, message in ((["--assign", "blocks:1", "--clients", "5"], "cover fewer"),
                          (["--partition", "dirichlet:0"], "--partition"),
                          (["--fraction", "0"], "--fraction"),
                          (["--device", "nope"], "unknown device")):
        proc = edgeprop("fleet", "simulate", bundle_copy, "--data", "digits", *args, check=False)
        assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and message in proc.stderr, proc.stderr


def test_settings_refuse_what_cannot_run_in_one_line():
    with pytest.raises(EdgepropError, match="--secagg needs --assign all"):
        Settings(secagg=True, assign="blocks:1").check()
    with pytest.raises(EdgepropError, match="--server-momentum must be in"):
        Settings(server_momentum=1.0).check()
    with pytest.raises(EdgepropError, match="--local-steps at least 0"):
        Settings(local_steps=-1).check()
    with pytest.raises(EdgepropError, match="--server-beta2 must be in"):
        Settings(server_beta2=1.0).check()
    with pytest.raises(EdgepropError, match="--tau"):
        Settings(tau=0.0).check()


def test_a_train_checkpoint_is_never_replaced_by_a_fleet(bundle_copy):
    edgeprop("train", bundle_copy, "--epochs", "1", "--quiet")
    before = (bundle_copy / "checkpoints" / "last.npz").read_bytes()
    proc = edgeprop("fleet", "simulate", bundle_copy, "--data", "digits", "--clients", "2", check=False)
    assert proc.returncode == 2 and "checkpoint of `edgeprop train`" in proc.stderr
    assert (bundle_copy / "checkpoints" / "last.npz").read_bytes() == before


def test_a_forged_fleet_checkpoint_is_refused_in_one_line_and_kept(bundle_copy):
    from edgeprop.errors import BundleError
    from edgeprop.fleet.server import Fleet, Settings
    from edgeprop.storage import save_arrays
    b = bundles.load(bundle_copy)
    state, _ = b.initial_state()
    fleet = Fleet(b, Settings())
    record = {"round": 3, "history": [], "settings": fleet._settings_record()}
    path = bundle_copy / "checkpoints" / "last.npz"
    arrays = {f"{u}/{k}": v for u, t in state.items() for k, v in t.items()}
    save_arrays(path, arrays, {"bundle": b.id, "fleet": record})
    before = path.read_bytes()
    with pytest.raises(BundleError, match="do not agree") as e:
        Fleet(b, Settings())
    assert "\n" not in str(e.value) and path.read_bytes() == before


def test_fleet_modules_import_without_torch():
    import subprocess
    import sys
    code = ("import sys, pkgutil, importlib; sys.modules.update(torch=None, onnx=None)\n"
            "import edgeprop.fleet\n"
            "for m in pkgutil.iter_modules(edgeprop.fleet.__path__, 'edgeprop.fleet.'):\n"
            "    importlib.import_module(m.name)\n"
            "assert not {'torch', 'onnx'} & {m for m, v in sys.modules.items() if v is not None}")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.slow  # two simulations
@pytest.mark.parametrize("strategy", ["fedprox", "fedadam"])
def test_flowers_other_strategies_train_and_checkpoint_their_state(bundle_copy, strategy):
    for rounds in ("1", "2"):
        proc = edgeprop("fleet", "simulate", bundle_copy, "--data", "digits", "--clients", "3", "--rounds", rounds,
                        "--strategy", strategy, timeout=300)
        assert f"round {rounds}/{rounds}" in proc.stdout
    arrays, meta = load_arrays(bundle_copy / "checkpoints" / "last.npz")
    assert meta["fleet"]["round"] == 2 and meta["fleet"]["settings"]["strategy"] == strategy
    b = bundles.load(bundle_copy)
    init, _ = b.initial_state()
    assert not np.allclose(arrays["block1/param"], init["block1"]["param"])
    moments = {k for k in arrays if k.startswith("server/")}  # FedAdam's m_t and v_t, kept for a resume
    assert (moments == set()) == (strategy == "fedprox")
    if strategy == "fedadam":
        assert {f"server/{m}/head/param" for m in ("m_t", "v_t")} <= moments


@pytest.mark.slow  # two simulations
def test_secagg_round_gives_the_plain_fedavg_aggregate(digits_bundle, tmp_path):
    states = {}
    for name, extra in (("plain", []), ("secagg", ["--secagg"])):
        copy = tmp_path / name
        shutil.copytree(digits_bundle, copy)
        proc = edgeprop("fleet", "simulate", copy, "--data", "digits", "--clients", "3", "--rounds", "1",
                        "--strategy", "fedavg", *extra, timeout=300)
        assert "3 clients, 0 left out" in proc.stdout
        states[name], meta = load_arrays(copy / "checkpoints" / "last.npz")
        assert meta["fleet"]["settings"]["secagg"] == bool(extra)
    init, _ = bundles.load(digits_bundle).initial_state()
    for unit in ("block1", "head"):
        plain, secure = states["plain"][f"{unit}/param"], states["secagg"][f"{unit}/param"]
        assert np.abs(plain - init[unit]["param"]).max() > 1e-3  # the round moved the weights ...
        assert np.abs(plain - secure).max() < 2e-5               # ... and SecAgg+ only by its quantisation
