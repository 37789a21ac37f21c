"""anomalib's Reverse Distillation: swap its ``AnomalyMapGenerator`` for ckaad_fast's.

Before (anomalib/models/image/reverse_distillation/torch_model.py):

    from .anomaly_map import AnomalyMapGenerator
    self.anomaly_map_generator = AnomalyMapGenerator(image_size=input_size, mode=anomaly_map_mode)

After, one line changed, same constructor, same call, same (B, 1, H, W) tensor on the same device:

    from ckaad_fast.dropin import ReverseDistillationAnomalyMapGenerator as AnomalyMapGenerator

or, without editing anomalib, on a built model (``model`` the Lightning module):

    model.model.anomaly_map_generator = ReverseDistillationAnomalyMapGenerator(
        image_size=(256, 256), mode="multiply")

anomalib blurs with a full 33x33 convolution whose kernel it rebuilds at every call; the drop-in
folds the bilinear upsampling and the separable blur (torch's 'reflect' padding, which is scipy's
'mirror' border) into two small cached matrices. Training: anomalib's ``ReverseDistillationLoss``
is ``cosine_distillation_loss``.

anomalib is not needed: when it is not installed, the "before" below is a reimplementation of its
generator from its published semantics. A tiny randomly initialised encoder/decoder stands in for
the networks: ``python examples/anomalib_rd_swap.py`` runs in a few seconds.
"""

import torch
import torch.nn.functional as F
from torch import nn

from _tiny import TinyFeatureReconstructor, best_of
from ckaad_fast.dropin import ReverseDistillationAnomalyMapGenerator, cosine_distillation_loss


class ReimplementedAnomalibGenerator(nn.Module):
    """anomalib's generator as published: product (or sum) of the layers' upsampled cosine-error
    maps from ones (zeros), then a 2-D Gaussian kernel of size 2 int(4 sigma + 0.5) + 1, built at
    every call, applied after F.pad 'reflect'."""

    def __init__(self, image_size, sigma=4, mode="multiply"):
        super().__init__()
        self.image_size, self.sigma, self.mode = tuple(image_size), sigma, mode
        self.kernel_size = 2 * int(4.0 * sigma + 0.5) + 1

    def forward(self, student_features, teacher_features):
        start = torch.ones if self.mode == "multiply" else torch.zeros
        amap = start([student_features[0].shape[0], 1, *self.image_size], device=student_features[0].device)
        for s, t in zip(student_features, teacher_features):
            d = F.interpolate((1 - F.cosine_similarity(s, t)).unsqueeze(1), size=self.image_size, mode="bilinear", align_corners=True)
            amap = amap * d if self.mode == "multiply" else amap + d
        k = self.kernel_size
        x = torch.arange(k, dtype=torch.float32, device=amap.device) - k // 2
        g = torch.exp(-(x**2) / (2.0 * self.sigma**2))
        g = g / g.sum()
        kernel = torch.outer(g, g).view(1, 1, k, k)
        r = k // 2
        return F.conv2d(F.pad(amap, (r, r, r, r), mode="reflect"), kernel / kernel.sum())


try:  # the real one, when anomalib is installed
    from anomalib.models.image.reverse_distillation.anomaly_map import AnomalyMapGenerator as OriginalGenerator
except ImportError:
    OriginalGenerator = ReimplementedAnomalibGenerator


def main():
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = TinyFeatureReconstructor().to(device).eval()
    img = torch.rand(8, 3, 256, 256, device=device)
    with torch.no_grad():
        enc, dec = model(img)
        for mode in ("multiply", "add"):
            before_gen = OriginalGenerator(image_size=(256, 256), mode=mode)
            after_gen = ReverseDistillationAnomalyMapGenerator(image_size=(256, 256), mode=mode)
            ref, t_before = best_of(lambda: before_gen(enc, dec))
            out, t_after = best_of(lambda: after_gen(enc, dec))
            print(f"mode={mode!r}, {img.shape[0]} images on {device} ({OriginalGenerator.__name__} before): "
                  f"before {t_before:.1f} ms, after {t_after:.1f} ms, {t_before / t_after:.1f}x; "
                  f"max abs diff {(out - ref).abs().max().item():.2e}; {tuple(out.shape)} {out.dtype} {out.device}")
    # Training: anomalib's ReverseDistillationLoss(encoder_features, decoder_features).
    loss = cosine_distillation_loss(enc, dec)
    ref = sum(torch.mean(1 - F.cosine_similarity(e.view(e.shape[0], -1), d.view(d.shape[0], -1))) for e, d in zip(enc, dec))
    print(f"loss: before {ref.item():.6f}, after {loss.item():.6f}")


if __name__ == "__main__":
    main()
