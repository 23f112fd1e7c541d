"""exporters/zoo.py builds torchvision's classifiers layer for layer: parameter counts must be
torchvision's published ones, and every model must run at the sizes the planner bench uses."""
import pytest

torch = pytest.importorskip("torch")

from edgeprop.exporters import zoo  # noqa: E402


@pytest.mark.parametrize("name", sorted(zoo.TORCHVISION_PARAMS))
def test_parameter_counts_match_torchvision(name):
    assert zoo.count_params(zoo.create(name)) == zoo.TORCHVISION_PARAMS[name]


@pytest.mark.parametrize("name", sorted(set(zoo.MODELS) - {"vit_b_16"}))
def test_forward_at_96_px_gives_one_row_per_sample(name):
    with torch.no_grad():
        out = zoo.create(name, num_classes=10, image_size=96)(torch.randn(2, 3, 96, 96))
    assert out.shape == (2, 10)


def test_mobilenet_v2_width_and_vit_image_size_are_checked():
    assert zoo.count_params(zoo.create("mobilenet_v2", width_mult=0.5)) < zoo.TORCHVISION_PARAMS["mobilenet_v2"]
    with pytest.raises(ValueError, match="not a multiple of the patch"):
        zoo.create("vit_small", image_size=100)
    with pytest.raises(ValueError, match="unknown model"):
        zoo.create("alexnet")
