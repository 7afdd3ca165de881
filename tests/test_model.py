"""Models: spec-built CNNs from timm layers build, are padding-invariant, and their parameter and FLOP counts are right."""

from __future__ import annotations

import pytest
import torch
import yaml

from mame_fast.config import ConfigError
from mame_fast.train.model import build, stage_rows, summary_rows
from mame_fast.train.spec import ModelSpec, StageSpec, load_spec, receptive_fields, shipped_specs, spec_dict, spec_from_dict

from .helpers import Dispatched


@pytest.mark.parametrize("name", shipped_specs())
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


# Every kind of layer the spec language has, each in a model whose padded logits must equal the unpadded ones.
DESIGNS = {
    "residual + SE + 1x1 head": dict(stages=(StageSpec(24, 2, 2, "residual", se=0.25), StageSpec(48, 2, 2, "residual", se=0.25)),
                                     head_width=64),
    "inverted + SE": dict(stages=(StageSpec(24, 2, 2, "inverted", se=0.25), StageSpec(48, 2, 2, "inverted", se=0.25))),
    "plain + max pools + two-FC head": dict(stages=(StageSpec(24, 1, 2, "plain", "max"), StageSpec(48, 2, 2, "plain", "max")),
                                            fc=(32,), dropout=0.5),
    "plain + avg pools + avgmax pooling": dict(stages=(StageSpec(24, 1, 2, "plain", "avg", convs=3),
                                                       StageSpec(48, 1, 2, "plain", "avg")), pool="avgmax", fc=(40, 24)),
    "separable + dilated + groups + per-stage act": dict(stages=(
        StageSpec(24, 1, 2, "residual", depthwise=True, dilation=2, kernel=5),
        StageSpec(48, 2, 2, "residual", groups=4, act="gelu"))),
    "max global pooling": dict(stages=(StageSpec(32, 2, 2, "residual"),), pool="max"),
}


@pytest.mark.parametrize("design", sorted(DESIGNS))
def test_padding_does_not_change_a_samples_output(design):
    torch.manual_seed(0)
    spec = ModelSpec(stem_width=16, stem_depth=2, act="silu", **DESIGNS[design])
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


@pytest.mark.parametrize("design", sorted(DESIGNS) + ["relu"])
def test_training_makes_no_activation_copies(design):
    """No layer makes autograd save a copy of an activation (timm's in-place SiLU did, one per layer: 18 extra kernels
    and activation-sized writes per step in the `small` model), in fixed and padded batches; ReLU stays in place."""
    kw = DESIGNS.get(design, dict(stages=(StageSpec(24, 2, 2, "residual"),), act="relu"))
    m = build(ModelSpec(stem_width=16, **{"act": "silu", **kw})).train()
    with Dispatched() as d:
        m(torch.randn(2, 3, 64, 64)).sum().backward()
        m(torch.randn(2, 3, 64, 72), torch.tensor([[64, 40], [50, 72]])).sum().backward()
    assert "aten.clone" not in d.ops and "aten.convolution" in d.ops
    relus = [a for a in m.modules() if isinstance(a, torch.nn.ReLU)]
    assert all(a.inplace for a in relus) and (design != "relu" or relus)


def test_plain_net_with_a_two_fc_head_trains_a_step():
    """The plain conv/pool spec with max-pool stages and a hidden FC layer with dropout: one SGD step lowers the loss on
    the batch (dropout off for the comparison, on for the step)."""
    spec = load_spec("plain")
    assert {s.block for s in spec.stages} == {"plain"} and any(s.pool == "max" for s in spec.stages) and spec.fc and spec.dropout
    torch.manual_seed(0)
    m = build(spec)
    x, y = torch.randn(8, 3, 64, 64), torch.arange(8)
    opt = torch.optim.SGD(m.parameters(), lr=0.05)
    loss = lambda: torch.nn.functional.cross_entropy(m(x), y)  # noqa: E731
    m.eval()
    before = loss().item()
    m.train()
    for _ in range(3):
        opt.zero_grad()
        loss().backward()
        opt.step()
    m.eval()
    assert loss().item() < before


def test_receptive_field_per_stage_matches_a_hand_count(tmp_path):
    """stem: a 3x3 conv of stride 2 (rf 3, jump 2); stage 1: a 2x2 max pool (rf 3+1*2=5, jump 4), then two 3x3 convs
    (5+2*4=13, then 21); stage 2: a residual block of 3x3 convs of dilation 2, the first of stride 2 (21+4*4=37, jump 8;
    then 37+4*8=69). The model table prints them and flags stage 2 at 64 px (69 > 64) but not at 96."""
    spec = spec_from_dict({"stem_width": 8, "stages": [{"width": 16, "depth": 1, "stride": 2, "block": "plain", "pool": "max"},
                                                         {"width": 16, "depth": 1, "stride": 2, "dilation": 2}]})
    assert receptive_fields(spec) == [3, 21, 69]
    rows = stage_rows(spec, crop=64, pixels=96 * 96)
    assert [r["rf"] for r in rows] == [3, 21, 69] and [r["rf_exceeds"] for r in rows] == [[], [], ["small"]]
    assert [r["size_small"] for r in rows] == [(32, 32), (16, 16), (8, 8)] and rows[2]["channels"] == 16
    from typer.testing import CliRunner

    from mame_fast.cli import app

    path = tmp_path / "rf.yaml"
    path.write_text(yaml.safe_dump(spec_dict(spec)))
    r = CliRunner().invoke(app, ["model", str(path), "--crop", "64", "--pixels", str(96 * 96)])
    out = " ".join(r.output.split())
    assert "21 px" in out and "69 px *small" in out


@pytest.mark.parametrize("bad, message", [
    ({"stages": [{"width": 8, "block": "dense"}]}, "stages[0].block: 'dense' is not one of 'plain', 'residual', 'inverted'"),
    ({"stages": [{"width": 0}]}, "stages[0].width: 0 is not a positive integer"),
    ({"stages": [{"width": 2.5}]}, "stages[0]: width: expected int, got 2.5"),
    ({"stages": [{"width": 8, "stride": 2}] * 7}, "stages[6].stride: the strides so far shrink a 224 px input below one pixel"),
    ({"stages": [{"width": 10, "groups": 4}]}, "stages[0].groups: 4 does not divide the widths 32 -> 10"),
    ({"stages": [{"width": 8, "kernel": 4}]}, "stages[0].kernel: 4 must be an odd positive integer"),
    ({"stages": [{"width": 8}], "pool": "median"}, "pool: 'median' is not one of 'avg', 'max', 'avgmax'"),
    ({"stages": [{"width": 8}], "fc": [64, 0]}, "fc[1]: 0 is not a positive integer"),
    ({"stages": [{"width": 8}], "act": "sparkle"}, "act: 'sparkle' is not an activation timm knows"),
    ({"stages": []}, "stages: a model needs at least one stage"),
])
def test_a_bad_spec_is_refused_when_it_loads(bad, message):
    with pytest.raises(ConfigError) as e:
        spec_from_dict(bad)
    assert message in str(e.value), str(e.value)


def test_parameter_and_flop_counts_match_a_hand_count():
    """stem 3->8 (3x3, stride 2) + BN; one residual block 8->16 (3x3 stride 2, 3x3, 1x1 stride-2 shortcut, each + BN);
    a 16->29 classifier. At 32x32: the stem runs at 16x16, the block at 8x8; FLOPs count a multiply-add as 2."""
    spec = ModelSpec(stem_width=8, stages=(StageSpec(16, 1, 2, "residual"),), num_classes=29)
    params = (3 * 8 * 9 + 2 * 8) + (8 * 16 * 9 + 2 * 16) + (16 * 16 * 9 + 2 * 16) + (8 * 16 + 2 * 16) + (16 * 29 + 29)
    flops = 2 * (3 * 8 * 9 * 16 * 16 + 8 * 16 * 9 * 8 * 8 + 16 * 16 * 9 * 8 * 8 + 8 * 16 * 8 * 8 + 16 * 29)
    r = summary_rows(spec, crop=32, pixels=32 * 32)
    assert r["params"] == params == 4405
    assert r["flops_256"] == r["flops_full"] == flops


_STRIDED_POINTWISE = """
import torch
from timm.layers import get_act_layer, get_norm_layer
from mame_fast.train.model import ResidualBlock
from mame_fast.train.spec import StageSpec
torch.manual_seed(0)
b = ResidualBlock(8, 16, 2, StageSpec(16), get_act_layer("relu"), get_norm_layer("batchnorm2d"), 0.0)
b = b.to(memory_format=torch.channels_last)
x = torch.randn(16, 8, 64, 64).contiguous(memory_format=torch.channels_last).requires_grad_()
for _ in range(50):
    b.zero_grad()
    b(x, None).square().mean().backward()
print("survived")
"""


def test_a_strided_projection_trains_on_cpu_without_corrupting_memory():
    """A residual block's stride-2 1x1 projection, channels-last, backward 50 times on the CPU, in its own process. Built as
    a strided 1x1 conv it ends in a segfault every time with torch 2.14.1 (oneDNN corrupts the heap; in the suite it
    aborted a later, unrelated test now and then); built as model.py builds it, it survives."""
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-c", _STRIDED_POINTWISE], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "survived" in r.stdout, (r.returncode, r.stderr[-2000:])


@pytest.mark.parametrize("separable", [False, True])
def test_a_subsampled_pointwise_conv_is_the_strided_one(separable):
    """conv_norm_act's 1x1 stride-2 layer (subsample, then stride 1) computes what the strided conv computes, forward
    and backward, on odd and even sides, and keeps the strided layer's parameter names."""
    from timm.layers import ConvNormAct, SeparableConvNormAct

    from mame_fast.train.model import conv_norm_act

    torch.manual_seed(0)
    kw = dict(norm_layer="batchnorm2d", act_layer="relu")
    sub = conv_norm_act(6, 10, 1, 2, separable=separable, **kw)
    ref = (SeparableConvNormAct if separable else ConvNormAct)(6, 10, 1, stride=2, **kw)
    assert sub.state_dict().keys() == ref.state_dict().keys()
    ref.load_state_dict(sub.state_dict())
    x = torch.randn(3, 6, 13, 20, requires_grad=True)  # contiguous: the reference takes the safe kernel
    xs = x.detach().clone().requires_grad_()
    torch.testing.assert_close(sub(xs), ref(x))
    sub(xs).square().sum().backward()
    ref(x).square().sum().backward()
    torch.testing.assert_close(xs.grad, x.grad)
    for (k, a), b in zip(sub.named_parameters(), ref.parameters()):
        torch.testing.assert_close(a.grad, b.grad, msg=k)
