"""Model contracts: shapes, parity with torchvision's resnet34, weights that load unchanged."""
import pytest
import torch
from torchvision.models import resnet34

from resnet_cls import ResNetClassifier, build_classifier
from resnet_cls import load_backbone, resnet34_state_dict
from unet import UNet


@pytest.fixture(scope="module")
def tv_state():
    torch.manual_seed(0)
    net = resnet34()
    # make BatchNorm statistics non-trivial so that a wrong mapping would show
    for mod in net.modules():
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.running_mean.uniform_(-0.1, 0.1)
            mod.running_var.uniform_(0.5, 1.5)
    return net.state_dict()


@pytest.mark.parametrize("h,w", [(64, 64), (96, 160)])
def test_unet_shape(h, w):
    out = UNet().eval()(torch.randn(2, 3, h, w))
    assert out.shape == (2, 1, h, w)


def test_unet_refuses_size_not_multiple_of_32():
    with pytest.raises(ValueError, match="multiple of 32"):
        UNet()(torch.randn(1, 3, 70, 64))


def test_pooled_logit_map_equals_torchvision_forward(tv_state):
    reference = resnet34(num_classes=5).eval()
    model = ResNetClassifier(5).eval()
    model.backbone.load_state_dict(reference.state_dict())
    x = torch.randn(2, 3, 96, 64)
    with torch.no_grad():
        logit_map = model.forward_map(x)
        assert logit_map.shape == (2, 5, 3, 2)
        assert torch.allclose(logit_map.mean((2, 3)), reference(x), atol=1e-5)
        assert torch.allclose(model(x), reference(x), atol=1e-5)


def test_torchvision_state_dict_loads_into_classifier_and_unet_encoder(tv_state, tmp_path):
    path = tmp_path / "resnet34.pth"
    torch.save(tv_state, path)
    classifier = build_classifier(5, state=resnet34_state_dict(weights_file=path))
    unet = UNet()
    load_backbone(unet.encoder, resnet34_state_dict(weights_file=path))
    for key, value in tv_state.items():
        if key.startswith("fc."):
            continue
        assert torch.equal(classifier.backbone.state_dict()[key], value), key
        assert torch.equal(unet.encoder.state_dict()[key], value), key
    # the encoder computes exactly torchvision's features
    ref = resnet34().eval()
    ref.load_state_dict(tv_state)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        e = unet.eval().encoder
        ours = e.layer4(e.layer3(e.layer2(e.layer1(e.maxpool(e.relu(e.bn1(e.conv1(x))))))))
        theirs = ref.layer4(ref.layer3(ref.layer2(ref.layer1(ref.maxpool(ref.relu(ref.bn1(ref.conv1(x))))))))
    assert torch.equal(ours, theirs)


def test_mask_channel_starts_as_rgb_model(tv_state, tmp_path):
    path = tmp_path / "resnet34.pth"
    torch.save(tv_state, path)
    rgb = build_classifier(5, 3, resnet34_state_dict(weights_file=path)).eval()
    four = build_classifier(5, 4, resnet34_state_dict(weights_file=path)).eval()
    four.backbone.fc.load_state_dict(rgb.backbone.fc.state_dict())
    x = torch.randn(2, 3, 64, 64)
    m = (torch.rand(2, 1, 64, 64) > 0.5).float()
    with torch.no_grad():
        # the 4th filter starts at zero: the mask changes nothing until training uses it
        assert torch.allclose(four(torch.cat([x, m], 1)), rgb(x), atol=1e-5)
    assert four.backbone.conv1.weight.shape == (64, 4, 7, 7)
    assert torch.equal(four.backbone.conv1.weight[:, :3], tv_state["conv1.weight"])


def test_bad_weights_file_is_named(tmp_path):
    path = tmp_path / "not_resnet.pth"
    torch.save({"foo": torch.zeros(1)}, path)
    with pytest.raises(SystemExit, match="not_resnet.pth"):
        resnet34_state_dict(weights_file=path)


def test_weights_file_with_a_non_tensor_value_is_named(tv_state, tmp_path):
    path = tmp_path / "odd.pth"
    torch.save({**tv_state, "conv1.weight": [1.0, 2.0]}, path)
    with pytest.raises(SystemExit, match=r"odd.pth: 'conv1.weight' is a list, not a tensor"):
        resnet34_state_dict(weights_file=path)
