"""Shape, gradient, layout and argument tests for the auto-encoder and the discriminators."""

import warnings

import pytest
import torch

from ckaad_fast.models.autoencoder import FeatureAutoEncoder, InstanceNorm2d, interp_channels
from ckaad_fast.models.discriminator import (
    ImageEnergyDiscriminator,
    MultiLayerImageDiscriminator,
    MultiLayerPatchDiscriminator,
    PatchEnergyDiscriminator,
)


def feats_for(channels, strides, image=(64, 64), batch=2, seed=0):
    """Random non-negative maps the size a stride-s backbone gives: ceil(image / s) per side."""
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(batch, c, -(-image[0] // s), -(-image[1] // s), generator=g)
            for c, s in zip(channels, strides)]


def assert_same_shapes(outs, feats):
    assert len(outs) == len(feats)
    for o, f in zip(outs, feats):
        assert o.shape == f.shape
        assert torch.isfinite(o).all()


CONFIGS = {
    # name: (channels, strides, block, image size)
    "resnet-basic": ((64, 128, 256), (4, 8, 16), "basic", (64, 64)),
    "resnet-bottleneck": ((256, 512, 1024), (4, 8, 16), "bottleneck", (48, 48)),
    "resnet18-medical": ((128, 256), (8, 16), "basic", (64, 64)),
    "efficientnet": ((24, 40, 112), (4, 8, 16), "basic", (64, 64)),
    "efficientnet-4": ((24, 40, 112, 320), (4, 8, 16, 32), "bottleneck", (96, 96)),
    "odd-65": ((64, 128, 256), (4, 8, 16), "basic", (65, 65)),
    "odd-rect": ((24, 40, 112), (4, 8, 16), "bottleneck", (65, 97)),
    "skip-layer": ((64, 256), (4, 16), "basic", (64, 64)),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_autoencoder_reconstructs_input_shapes(name):
    channels, strides, block, image = CONFIGS[name]
    torch.manual_seed(0)
    ae = FeatureAutoEncoder(channels, strides, block)
    feats = feats_for(channels, strides, image, batch=1 if block == "bottleneck" else 2)
    with torch.no_grad():
        outs = ae(feats)
    assert_same_shapes(outs, feats)
    z = ae.encode(feats)
    deep = feats[-1].shape[-2:]
    assert z.shape == (feats[0].shape[0], 2 * channels[-1], -(-deep[0] // 2), -(-deep[1] // 2))


def test_odd_feature_sizes_of_65px_image():
    # A ResNet on a 65x65 image gives 17x17, 9x9 and 5x5 maps at layers 1-3.
    ae = FeatureAutoEncoder((64, 128, 256), (4, 8, 16))
    feats = [torch.rand(2, c, n, n) for c, n in zip((64, 128, 256), (17, 9, 5))]
    with torch.no_grad():
        outs = ae(feats)
    assert [tuple(o.shape[-2:]) for o in outs] == [(17, 17), (9, 9), (5, 5)]


def test_encoder_channels_follow_the_paper_for_resnets_and_interpolate_otherwise():
    assert interp_channels(64, 256, 2) == [128, 256]
    assert interp_channels(256, 1024, 2) == [512, 1024]
    assert interp_channels(24, 112, 2) == [52, 112]
    assert interp_channels(40, 112, 1) == [112]
    assert interp_channels(112, 112, 0) == []
    ae = FeatureAutoEncoder((24, 40, 112), (4, 8, 16))
    outs = [[m[0].out_channels for m in r] for r in ae.reducers]
    assert outs == [[52, 112], [112], []]
    assert ae.latent_channels == 224


def test_gradients_reach_every_parameter():
    torch.manual_seed(0)
    for channels, strides, block in [((32, 64, 128), (4, 8, 16), "basic"),
                                     ((32, 64, 128), (4, 8, 16), "bottleneck"),
                                     ((24, 40), (8, 16), "basic")]:
        ae = FeatureAutoEncoder(channels, strides, block, final_relu=block != "basic")
        feats = feats_for(channels, strides, (65, 65))
        outs = ae(feats)
        loss = sum((o * torch.randn_like(o)).sum() for o in outs)
        loss.backward()
        for name, p in ae.named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, (block, name)


def test_final_relu_off_allows_negative_reconstructions():
    torch.manual_seed(0)
    feats = feats_for((24, 40), (8, 16))
    with torch.no_grad():
        pos = FeatureAutoEncoder((24, 40), (8, 16))(feats)
        neg = FeatureAutoEncoder((24, 40), (8, 16), final_relu=False)(feats)
    assert all((o >= 0).all() for o in pos)
    assert all((o < 0).any() for o in neg)


def test_default_decode_sizes_double_per_stage():
    ae = FeatureAutoEncoder((64, 128), (8, 16))
    z = torch.rand(1, 256, 3, 3)
    with torch.no_grad():
        outs = ae.decode(z)
    assert [tuple(o.shape) for o in outs] == [(1, 64, 12, 12), (1, 128, 6, 6)]


def test_resnet_configs_match_official_parameter_counts():
    # Counted on the authors' released ED model (model/encoder.py + model/decoder.py).
    ae = FeatureAutoEncoder.for_backbone("resnet18", (2, 3))
    assert (ae.channels, ae.strides, ae.block) == ((128, 256), (8, 16), "basic")
    assert sum(p.numel() for p in ae.parameters()) == 13_526_272
    ae = FeatureAutoEncoder.for_backbone("wide_resnet50_2", (1, 2, 3))
    assert (ae.channels, ae.strides, ae.block) == ((256, 512, 1024), (4, 8, 16), "bottleneck")
    assert sum(p.numel() for p in ae.parameters()) == 83_802_624
    # Decoder blocks per stage, deepest first, follow ResNet's (3, 4, 6) order.
    assert [len(s.blocks) for s in ae.stages] == [3, 4, 6]
    assert len(ae.bottleneck.blocks) == 3


def test_channels_last_matches_contiguous():
    # Judged against a float64 oracle: channels_last may reorder fp32 sums (and instance norm
    # over few positions amplifies that), but must not be less accurate than contiguous.
    torch.manual_seed(0)
    ae = FeatureAutoEncoder((32, 64), (8, 16), "bottleneck")
    feats = feats_for((32, 64), (8, 16), (72, 72))
    rel = lambda o, r: ((o.double() - r).norm() / r.norm()).item()  # noqa: E731
    with torch.no_grad():
        ref = ae.double()([f.double() for f in feats])
        ae.float()
        contiguous = ae(feats)
        ae_cl = ae.to(memory_format=torch.channels_last)
        out = ae_cl([f.to(memory_format=torch.channels_last) for f in feats])
    for o, c, r in zip(out, contiguous, ref):
        assert o.shape == r.shape
        assert rel(o, r) <= 2 * rel(c, r) + 1e-5


def test_instance_norm_matches_torch_and_keeps_channels_last():
    torch.manual_seed(0)
    x = torch.randn(3, 8, 5, 7, dtype=torch.float64)
    ours = InstanceNorm2d(8).double()
    ref = torch.nn.InstanceNorm2d(8, affine=True).double()
    with torch.no_grad():
        ours.weight.normal_()
        ours.bias.normal_()
        ref.load_state_dict(ours.state_dict())
    torch.testing.assert_close(ours(x), ref(x))
    torch.testing.assert_close(InstanceNorm2d(8, affine=False).double()(x),
                               torch.nn.functional.instance_norm(x))
    xc = x.to(memory_format=torch.channels_last)
    assert ours(xc).is_contiguous(memory_format=torch.channels_last)
    # Even sizes crop nothing, so the whole auto-encoder stays channels_last.
    ae = FeatureAutoEncoder((16, 32), (8, 16)).to(memory_format=torch.channels_last)
    feats = [f.to(memory_format=torch.channels_last) for f in feats_for((16, 32), (8, 16))]
    with torch.no_grad():
        assert all(o.is_contiguous(memory_format=torch.channels_last) for o in ae(feats))


def test_autocast_bf16_cpu():
    torch.manual_seed(0)
    ae = FeatureAutoEncoder((32, 64, 128), (4, 8, 16))
    d = MultiLayerPatchDiscriminator((32, 64, 128))
    di = MultiLayerImageDiscriminator((32, 64, 128), (16, 8, 4))
    feats = feats_for((32, 64, 128), (4, 8, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        outs = ae(feats)
        scores = d(outs)
        img = di(outs)
        loss = sum(s.abs().mean() for s in scores) + img[0].abs().mean()
    assert_same_shapes(outs, feats)
    assert all(o.dtype == torch.bfloat16 for o in outs)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in ae.parameters())


def test_torch_compile_matches_eager():
    torch.manual_seed(0)
    ae = FeatureAutoEncoder((16, 32), (8, 16), "bottleneck")
    feats = feats_for((16, 32), (8, 16), (65, 65))
    ref = ae(feats)
    compiled = torch.compile(ae, backend="aot_eager", fullgraph=True)
    out = compiled(feats)
    for o, r in zip(out, ref):
        torch.testing.assert_close(o, r)
    sum(o.sum() for o in out).backward()
    assert all(p.grad is not None for p in ae.parameters())


def test_patch_discriminator_shapes_and_no_bias():
    d = MultiLayerPatchDiscriminator((16, 32))
    feats = [torch.randn(3, 16, 9, 9), torch.randn(3, 32, 5, 5)]
    scores = d(feats)
    assert [tuple(s.shape) for s in scores] == [(3, 1, 9, 9), (3, 1, 5, 5)]
    assert all(m.bias is None for m in d.modules() if isinstance(m, torch.nn.Conv2d))
    assert sum(p.numel() for p in d.parameters()) == 2 * 16 * 16 + 16 + 2 * 32 * 32 + 32


def test_patch_discriminator_is_invariant_to_positive_per_position_scaling():
    torch.manual_seed(0)
    d = PatchEnergyDiscriminator(24)
    x = torch.randn(2, 24, 7, 5, dtype=torch.float64)
    scale = torch.rand(2, 1, 7, 5, dtype=torch.float64) * 100 + 1e-3
    d = d.double()
    torch.testing.assert_close(d(x * scale), d(x))
    # Not a trivial network: it does depend on the feature directions.
    assert not torch.allclose(d(x), d(x.flip(1)))


def test_image_discriminators_shapes():
    torch.manual_seed(0)
    feats = [torch.randn(2, 16, 17, 17), torch.randn(2, 32, 9, 9), torch.randn(2, 64, 5, 5)]
    fused = MultiLayerImageDiscriminator((16, 32, 64), (17, 9, 5))
    out = fused(feats)
    assert len(out) == 1 and out[0].shape == (2, 1)
    per_layer = MultiLayerImageDiscriminator((16, 32, 64), (17, 9, 5), fuse=False)
    assert [tuple(o.shape) for o in per_layer(feats)] == [(2, 1)] * 3
    single = ImageEnergyDiscriminator(8, (6, 11))
    assert single(torch.randn(4, 8, 6, 11)).shape == (4, 1)
    # The authors' fused layout at 256x256 with wide_resnet50_2 layers 1-3: 64 -> 32 -> 16
    # reducers doubling channels, then 16 -> 8 -> 4 -> 2 -> 1.
    d = MultiLayerImageDiscriminator((256, 512, 1024), (64, 32, 16))
    assert [[m[0].out_channels for m in r] for r in d.reducers] == [[512, 1024], [1024], []]
    assert len(d.head.convs) == 3 and d.head.pool.kernel_size == (2, 2)
    loss = sum(o.abs().mean() for o in fused(feats))
    loss.backward()
    assert all(p.grad is not None for p in fused.parameters())


@pytest.mark.parametrize("kwargs, match", [
    (dict(channels=(64, 128), strides=(4,)), "same length"),
    (dict(channels=(), strides=()), "channels"),
    (dict(channels=(64, 128), strides=(4, 12)), "power of two"),
    (dict(channels=(64, 128), strides=(8, 4)), "strides"),
    (dict(channels=(64, 0), strides=(4, 8)), "channels"),
    (dict(channels=(64, 128), strides=(4, 8), block="dense"), "block"),
    (dict(channels=(64, 128), strides=(4, 8), norm="layer"), "norm"),
    (dict(channels=(64, 128), strides=(4, 8), width_per_group=128), "width_per_group"),
    (dict(channels=(64, 128), strides=(4, 8), encoder_blocks=0), "encoder_blocks"),
    (dict(channels=(64, 128, 256), strides=(4, 8, 16), decoder_blocks=(2, 2)), "decoder_blocks"),
])
def test_autoencoder_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        FeatureAutoEncoder(**kwargs)


def test_bad_forward_inputs():
    ae = FeatureAutoEncoder((16, 32), (8, 16))
    with pytest.raises(ValueError, match="features must hold 2"):
        ae([torch.rand(1, 16, 8, 8)])
    with pytest.raises(ValueError, match=r"features\[1\] must have 32 channels"):
        ae([torch.rand(1, 16, 8, 8), torch.rand(1, 31, 4, 4)])
    with pytest.raises(ValueError, match="batch size"):
        ae([torch.rand(1, 16, 8, 8), torch.rand(2, 32, 4, 4)])
    with pytest.raises(ValueError, match="larger than 2x2"):
        ae([torch.rand(1, 16, 4, 4), torch.rand(1, 32, 2, 2)])
    with pytest.raises(ValueError, match="unknown backbone"):
        FeatureAutoEncoder.for_backbone("vgg16", (1, 2))
    with pytest.raises(ValueError, match="layers"):
        FeatureAutoEncoder.for_backbone("resnet18", (3, 2))
    d = MultiLayerPatchDiscriminator((16, 32))
    with pytest.raises(ValueError, match="features must hold 2"):
        d([torch.rand(1, 16, 8, 8)])
    with pytest.raises(ValueError, match="channels"):
        d([torch.rand(1, 16, 8, 8), torch.rand(1, 16, 4, 4)])
    with pytest.raises(ValueError, match="channels"):
        PatchEnergyDiscriminator(0)
    with pytest.raises(ValueError, match="spatial_size"):
        ImageEnergyDiscriminator(8, (4, 0))
    with pytest.raises(ValueError, match="spatial size"):
        ImageEnergyDiscriminator(8, 4)(torch.rand(1, 8, 5, 5))
    with pytest.raises(ValueError, match="same length"):
        MultiLayerImageDiscriminator((16, 32), (8,))
    with pytest.raises(ValueError, match=r"features\[0\] must have spatial size"):
        MultiLayerImageDiscriminator((16, 32), (8, 4))([torch.rand(1, 16, 9, 9),
                                                        torch.rand(1, 32, 4, 4)])


@pytest.mark.parametrize("backbone, layers, count", [
    ("resnet18", (2, 3), 13_526_272),
    ("resnet34", (2, 3), 20_018_432),
    ("wide_resnet50_2", (1, 2, 3), 83_802_624),
    ("wide_resnet101_2", (1, 2, 3), 87_440_896),
])
def test_the_model_builds_the_authors_autoencoder_for_every_backbone(backbone, layers, count):
    # Through CKAAD(ModelConfig(...)), the path training takes, not a helper only tests call; the
    # counts are those of the authors' released model files. On the meta device: no memory, no time.
    from ckaad_fast.model import ModelConfig
    from ckaad_fast.training import CKAAD

    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random-weights warning: the backbone is not the point here
        model = CKAAD(ModelConfig(backbone=backbone, layers=layers), weights="none")
    assert sum(p.numel() for p in model.autoencoder.parameters()) == count


@pytest.mark.parametrize("shape", [(2, 64, 4, 4), (2, 16, 8, 8)])
def test_instance_norm_in_bfloat16_keeps_the_layout_and_the_values(shape):
    # Small maps take the NCHW path on the CPU (see InstanceNorm2d.forward); large ones do not.
    norm = InstanceNorm2d(shape[1])
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-0.5, 0.5)
    x = torch.randn(shape).contiguous(memory_format=torch.channels_last)
    want = norm(x)
    got = norm(x.bfloat16())
    assert got.dtype == torch.bfloat16 and got.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(got.float(), want, rtol=2e-2, atol=2e-2)
