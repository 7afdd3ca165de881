"""Models: spec-built CNNs from timm layers build, are padding-invariant, and their parameter and FLOP counts are right."""

from __future__ import annotations

import pytest
import torch

from mame_fast.train.model import ModelSpec, StageSpec, build, load_spec, summary_rows

FAMILY = ["tiny", "small", "medium", "large"]


@pytest.mark.parametrize("name", FAMILY)
def test_family_builds_forward_backward(name):
    m = build(load_spec(name))
    x = torch.randn(2, 3, 64, 64)
    m(x).sum().backward()  # fixed size (256 mode)
    sizes = torch.tensor([[64, 40], [50, 72]])
    out = m(torch.randn(2, 3, 64, 72), sizes)  # padded variable-shape batch
    assert out.shape == (2, 29) and torch.isfinite(out).all()


def _randomize_norms(m):
    for mod in m.modules():
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.running_mean.uniform_(-1, 1)
            mod.running_var.uniform_(0.5, 2)
            mod.weight.data.uniform_(0.5, 1.5)
            mod.bias.data.uniform_(-0.5, 0.5)


@pytest.mark.parametrize("block", ["residual", "inverted"])
def test_padding_does_not_change_a_samples_output(block):
    torch.manual_seed(0)
    stages = (StageSpec(24, 2, 2, block, se=0.25), StageSpec(48, 2, 2, block, se=0.25))
    spec = ModelSpec(stem_width=16, stem_depth=2, stages=stages,
                     act="silu", head_width=64)
    m = build(spec).eval()
    _randomize_norms(m)
    imgs = [torch.randn(1, 3, 61, 83), torch.randn(1, 3, 96, 40)]
    batch = torch.zeros(2, 3, 96, 128)
    for i, im in enumerate(imgs):
        batch[i, :, : im.shape[2], : im.shape[3]] = im
    with torch.no_grad():
        padded = m(batch, torch.tensor([[61, 83], [96, 40]]))
        for i, im in enumerate(imgs):
            torch.testing.assert_close(padded[i], m(im)[0], atol=1e-5, rtol=1e-5)
        assert not torch.allclose(m(batch)[0], m(imgs[0])[0], atol=1e-5)  # without the mask it would differ




def test_parameter_and_flop_counts_match_a_hand_count():
    """stem 3->8 (3x3, stride 2) + BN; one residual block 8->16 (3x3 stride 2, 3x3, 1x1 stride-2 shortcut, each + BN);
    a 16->29 classifier. At 32x32: the stem runs at 16x16, the block at 8x8; FLOPs count a multiply-add as 2."""
    spec = ModelSpec(stem_width=8, stages=(StageSpec(16, 1, 2, "residual"),), num_classes=29)
    params = (3 * 8 * 9 + 2 * 8) + (8 * 16 * 9 + 2 * 16) + (16 * 16 * 9 + 2 * 16) + (8 * 16 + 2 * 16) + (16 * 29 + 29)
    flops = 2 * (3 * 8 * 9 * 16 * 16 + 8 * 16 * 9 * 8 * 8 + 16 * 16 * 9 * 8 * 8 + 8 * 16 * 8 * 8 + 16 * 29)
    r = summary_rows(spec, crop=32, pixels=32 * 32)
    assert r["params"] == params == 4405
    assert r["flops_256"] == r["flops_full"] == flops
