"""torch.library registration: opcheck of every op, and torch.compile(fullgraph=True) through them."""
import pytest
import torch

import ckaad_fast.ops as ops
from ckaad_fast.ops import reference as ref

from helpers import feature_pair

BACKENDS = ("triton", "native", "torch")


def _op(name):
    return getattr(torch.ops.ckaad_fast, name).default


def _cases():
    a, b = feature_pair((2, 5, 3, 4), torch.float32, "channels_last", "contiguous", seed=0)
    s = 6 * torch.randn(2, 1, 3, 4)
    maps = [torch.randn(2, 3, 4), torch.randn(2, 2, 2)]
    grad_map = torch.randn(2, 9, 7)
    return [
        ("cosine_error_map", (a.requires_grad_(True), b.requires_grad_(True), 1e-8, False)),
        ("cosine_error_map", (a.detach().double(), b.double(), 1e-8, True)),
        ("flat_cosine_loss", ([a.detach().requires_grad_(True), a.detach()[:1, :2]], [b.detach().requires_grad_(True), b[:1, :2]], 1e-8)),
        ("energy_loss", ([s.requires_grad_(True)], [1.0], [True], 5.0)),
        ("energy_loss", ([s.detach().requires_grad_(True), s.detach()[:1].requires_grad_(True)], [0.3, 0.7], [False, True], 4.0)),
        ("upsample_blur_sum", ([m.requires_grad_(True) for m in maps], 9, 7, 1.5, 4.0, "reflect")),
        ("upsample_blur_sum_backward", (grad_map, [3, 4, 2, 2], 1.5, 4.0, "mirror")),
    ]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", range(len(_cases())))
def test_opcheck(backend, case):
    name, args = _cases()[case]
    with ops.backend(backend):
        torch.library.opcheck(_op(name), args)


def _pipeline(fs, ft, scores):
    # A training-and-scoring step in one graph: losses, their gradients' graph, the map and score.
    loss = ops.cosine_reconstruction_loss(fs, ft) + ops.discriminator_loss(scores, scores, scores) + ops.generator_loss(scores)
    amap = ops.anomaly_map(fs, ft, out_size=(24, 20), sigma=2.0)
    return loss, amap, ops.image_score(amap, topk=10), ops.cosine_error_map(fs[0], ft[0])


@pytest.mark.parametrize("backend", BACKENDS)
def test_compile_fullgraph_matches_eager(backend):
    torch._dynamo.reset()
    fs = [torch.randn(2, 6, 6, 5, requires_grad=True), torch.randn(2, 8, 3, 3, requires_grad=True)]
    ft = [f.detach() + 0.2 * torch.randn_like(f) for f in fs]
    scores = [6 * torch.randn(2, 1, 6, 5, requires_grad=True)]
    with ops.backend(backend):
        eager = _pipeline(fs, ft, scores)
        compiled_fn = torch.compile(_pipeline, fullgraph=True, backend="aot_eager")
        compiled = compiled_fn(fs, ft, scores)
        for e, c in zip(eager, compiled):
            torch.testing.assert_close(c, e)
        g_eager = torch.autograd.grad(eager[0], fs + scores)
        g_comp = torch.autograd.grad(compiled[0], fs + scores)
    for e, c in zip(g_eager, g_comp):
        torch.testing.assert_close(c, e)


def test_compile_inductor_fullgraph():
    # The default backend, as a user would call it: Inductor generates the code around the ops.
    torch._dynamo.reset()
    fs = [torch.randn(2, 6, 6, 5), torch.randn(2, 8, 3, 3)]
    ft = [f + 0.2 * torch.randn_like(f) for f in fs]

    def score(fs, ft):
        amap = ops.anomaly_map([f * 2 for f in fs], ft, out_size=16)
        return ops.image_score(amap, topk=5), amap

    compiled = torch.compile(score, fullgraph=True)(fs, ft)
    expected = ref.anomaly_map([f * 2 for f in fs], ft, out_size=16)
    torch.testing.assert_close(compiled[1].double(), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(compiled[0].double(), ref.image_score(expected, 5), rtol=1e-5, atol=1e-6)
