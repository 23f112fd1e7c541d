"""The pitfalls of docs/noprop.md as assertions on an exported bundle and the trainer."""
import numpy as np
import pytest

from edgeprop import bundle as bundles
from edgeprop import datasets, prng
from edgeprop.runtimes import get_engine
from edgeprop.trainer import TrainConfig, Trainer, evaluate


def test_schedule_in_the_bundle_runs_noise_to_clean_with_positive_weights(digits_bundle):
    b = bundles.load(digits_bundle)
    assert np.all(np.diff(b.schedule.alpha_bar) > 0)
    w = np.array(b.manifest["noise"]["weights"])
    assert np.all(np.isfinite(w)) and np.all(w > 0) and len(w) == len(b.blocks) == 10


def test_head_never_sends_gradient_into_a_block(digits_bundle):
    """The head's step graph reads only its own state and z_T ~ q(z_T|y), writes only its own state."""
    b = bundles.load(digits_bundle)
    head_state = {t.name for t in b.head.state}
    step = b.graphs[b.head.step_graph]
    assert {t.name for t in step.inputs} == head_state | {"z", "target", "mask", "lr", "step"}
    assert {t.name for t in step.outputs} == {f"next.{k}" for k in head_state} | {"loss"}
    assert next(t for t in step.inputs if t.name == "param").shape == (b.head.n_params,)
    # And stepping the head leaves every block untouched.
    trainer = Trainer(b, get_engine(), datasets.load("digits", "train"), TrainConfig(epochs=1))
    before = {u: s["param"].copy() for u, s in trainer.state.items()}
    trainer.step(len(b.units) - 1)  # interleaved item U-1 is the head's first update
    assert all(np.array_equal(trainer.state[u]["param"], before[u]) for u in before if u != "head")
    assert not np.array_equal(trainer.state["head"]["param"], before["head"])


def test_head_is_trained_on_noised_clean_labels_not_block_outputs(digits_bundle):
    b = bundles.load(digits_bundle)
    state, emb = b.initial_state()
    trainer = Trainer(b, get_engine(), datasets.load("digits", "train"), TrainConfig(epochs=1))
    feeds = trainer.rule.feeds(len(b.units) - 1, 0, 0)
    idx = prng.permutation(prng.key(0, prng.ORDER, 0), len(trainer.rule.y))[:b.batch_size]
    eps = prng.normal(prng.key(0, prng.NOISE, 0, 0, len(b.units) - 1), (b.batch_size, emb.shape[1]))
    ab = b.schedule.alpha_bar[-1]
    np.testing.assert_allclose(feeds["z"], np.sqrt(ab) * emb[trainer.rule.y[idx]] + np.sqrt(1 - ab) * eps, rtol=1e-6)


def test_blocks_are_independent(digits_bundle):
    """Own weights per block (no shared trunk); stepping one block leaves every other unit alone."""
    b = bundles.load(digits_bundle)
    trainer = Trainer(b, get_engine(), datasets.load("digits", "train"), TrainConfig(epochs=1))
    assert not np.array_equal(trainer.state["block1"]["param"], trainer.state["block2"]["param"])
    before = {u: {k: v.copy() for k, v in s.items()} for u, s in trainer.state.items()}
    trainer.step(0)  # interleaved item 0 is block1
    for unit, tensors in trainer.state.items():
        changed = any(not np.array_equal(v, before[unit][k]) for k, v in tensors.items())
        assert changed == (unit == "block1"), unit


class RecordingEngine:
    """Wraps an engine and records every array fed to any graph."""

    suffix = ".onnx"
    trains_itself = False

    def __init__(self, engine):
        self.engine, self.fed = engine, []

    def load(self, path, spec=None):
        graph = self.engine.load(path, spec)
        outer = self

        class Recorded:
            def run(self, feeds):
                outer.fed.append({k: v.copy() for k, v in feeds.items()})
                return graph.run(feeds)
        return Recorded()


def test_evaluation_never_sees_labels(digits_bundle):
    b = bundles.load(digits_bundle)
    state, _ = b.initial_state()
    test = datasets.load("digits", "test")
    shuffled = datasets.Dataset(test.x, np.random.default_rng(5).permutation(test.y), test.name)
    spies = [RecordingEngine(get_engine()), RecordingEngine(get_engine())]
    evaluate(b, spies[0], test, state, seed=3)
    evaluate(b, spies[1], shuffled, state, seed=3)
    assert len(spies[0].fed) == len(spies[1].fed) > 0
    for a, c in zip(*[s.fed for s in spies]):
        assert a.keys() == c.keys() and "target" not in a
        for k in a:
            np.testing.assert_array_equal(a[k], c[k])


def test_cosine_learning_rate_schedule_is_fed_to_the_graph(digits_bundle):
    from edgeprop.trainer import learning_rate
    assert learning_rate(1e-3, "constant", 7, 10) == 1e-3
    assert learning_rate(1e-3, "cosine", 1, 10) == 1e-3
    assert learning_rate(1e-3, "cosine", 10, 10) < 3e-5
    b = bundles.load(digits_bundle)
    trainer = Trainer(b, get_engine(), datasets.load("digits", "train"), TrainConfig(epochs=2, lr_schedule="cosine"))
    per_unit = trainer.plan.epochs * trainer.plan.n_batches
    assert trainer.lr_at("block1", 1) == pytest.approx(1e-3) and trainer.lr_at("block1", per_unit) < 1e-5
    assert trainer.lr_at("head", 1) == pytest.approx(1e-2)


def test_flat_layout_names_every_parameter(digits_bundle):
    b = bundles.load(digits_bundle)
    block = b.blocks[0]
    assert [v.name for v in block.layout][:2] == ["image.0.weight", "image.0.bias"]
    assert block.n_params == b.initial_state()[0]["block1"]["param"].size == 60426
    views = block.unflatten(b.initial_state()[0]["block1"]["param"])
    assert views["joint.2.weight"].shape == (10, 128)
    assert block.locate(64 * 3 + 5) == "image.0.weight[3, 5]"
