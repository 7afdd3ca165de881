"""Stage 3b: the CNN a spec (``spec.py``) describes, built from ``timm.layers`` (``ConvNormAct``,
``SeparableConvNormAct``, ``SEModule``, ``DropPath``, activation and norm factories) and ``torch.nn`` where timm has
nothing. Never ``timm.create_model``. This module knows nothing of training.

**Padding-aware.** Full-resolution batches are padded to their bucket (right/bottom). Every block takes
``mask`` (n, 1, H, W; 1 = real pixel) and re-zeroes the padding after each conv-norm-act; squeeze-excite, the
pools between stages and the global pooling see real pixels only (a max ignores the padding, an average divides
by the real pixels), and strided layers subsample the mask (a stride-2 output is real iff its first input is,
which is also how many outputs the unpadded image has, with pools in ceil mode). In eval mode a padded sample's
logits therefore equal those of the same image run alone; in training, BatchNorm statistics still see the (few,
zero) padded pixels. With ``mask=None`` (fixed-size batches) all of it is skipped.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import ConvNormAct, DropPath, SEModule, SeparableConvNormAct, create_act_layer, get_act_layer, get_norm_layer

from ..tensors import valid_mask
from .spec import ModelSpec, StageSpec, receptive_fields


def _m(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    return x if mask is None else x * mask


def _down(mask: torch.Tensor | None, stride: int) -> torch.Tensor | None:
    return mask if mask is None or stride == 1 else mask[:, :, ::stride, ::stride]


def masked_max(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """(n, c, 1, 1) maximum over the real pixels."""
    if mask is not None:
        x = x.masked_fill(mask == 0, float("-inf"))
    return x.amax((2, 3), keepdim=True)


def masked_mean(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """(n, c, 1, 1) mean over the real pixels."""
    if mask is None:
        return x.mean((2, 3), keepdim=True)
    return (x * mask).sum((2, 3), keepdim=True) / mask.sum((2, 3), keepdim=True).clamp_min(1)


class MaskedSE(SEModule):
    """timm's SEModule with the squeeze averaged over real pixels only."""

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        s = self.fc2(self.act(self.bn(self.fc1(masked_mean(x, mask)))))
        return x * self.gate(s)


class _Subsampled:
    """Mixin: take every ``down``-th row and column, then the layer at stride 1."""

    down = 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x[:, :, :: self.down, :: self.down])


class SubsampledConvNormAct(_Subsampled, ConvNormAct):
    pass


class SubsampledSeparableConvNormAct(_Subsampled, SeparableConvNormAct):
    pass


def conv_norm_act(cin: int, cout: int, kernel: int, stride: int = 1, separable: bool = False, **kw) -> nn.Module:
    """timm's ConvNormAct (or SeparableConvNormAct). A strided 1x1 conv is built as a subsampling followed by the conv
    at stride 1: the same function and the same parameter names, because the CPU kernel for the strided form is unsafe:
    torch 2.14.1's oneDNN corrupts the heap in the backward pass of a 1x1 stride-2 conv on channels-last input
    (tests/test_model.py reproduces it), which crashed CPU training at random points afterwards."""
    if kernel == 1 and stride > 1:
        m = (SubsampledSeparableConvNormAct if separable else SubsampledConvNormAct)(cin, cout, kernel, stride=1, **kw)
        m.down = stride
        return m
    return (SeparableConvNormAct if separable else ConvNormAct)(cin, cout, kernel, stride=stride, **kw)


def spatial(cin: int, cout: int, s: StageSpec, stride: int, act, norm, apply_act: bool = True) -> nn.Module:
    """The stage's spatial conv: kernel, dilation and groups as specified, or depthwise-separable."""
    if s.depthwise:
        return conv_norm_act(cin, cout, s.kernel, stride, separable=True, dilation=s.dilation, norm_layer=norm, act_layer=act,
                             apply_act=apply_act)
    return conv_norm_act(cin, cout, s.kernel, stride, dilation=s.dilation, groups=s.groups, norm_layer=norm, act_layer=act,
                         apply_act=apply_act)


class Pool(nn.Module):
    """A 2x2 max or average pool of stride 2 between stages, over real pixels only (ceil mode: an odd side keeps its
    last row, as the subsampled mask does)."""

    stride = 2

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        if self.kind == "max":
            y = F.max_pool2d(x if mask is None else x.masked_fill(mask == 0, float("-inf")), 2, 2, ceil_mode=True)
        else:
            y = F.avg_pool2d(_m(x, mask), 2, 2, ceil_mode=True)
            if mask is not None:
                y = y / F.avg_pool2d(mask, 2, 2, ceil_mode=True).clamp_min(1e-6)
        m = _down(mask, 2)
        return y if m is None else torch.where(m > 0, y, torch.zeros((), dtype=y.dtype, device=y.device))


class PlainBlock(nn.Module):
    """``convs`` conv-norm-act layers, no skip (then SE, if asked)."""

    def __init__(self, cin: int, cout: int, stride: int, s: StageSpec, act, norm, drop_path: float):
        super().__init__()
        self.stride = stride
        self.convs = nn.ModuleList([spatial(cin if i == 0 else cout, cout, s, stride if i == 0 else 1, act, norm)
                                    for i in range(s.convs)])
        self.se = MaskedSE(cout, rd_ratio=s.se, act_layer=act) if s.se else None

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        m = _down(mask, self.stride)
        for conv in self.convs:
            x = _m(conv(x), m)
        return x if self.se is None else self.se(x, m)


class ResidualBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, s: StageSpec, act, norm, drop_path: float):
        super().__init__()
        self.stride = stride
        self.conv1 = spatial(cin, cout, s, stride, act, norm)
        self.conv2 = spatial(cout, cout, s, 1, act, norm, apply_act=False)
        self.se = MaskedSE(cout, rd_ratio=s.se, act_layer=act) if s.se else None
        # A 1x1 (strided) projection: exact under padding, unlike average-pool shortcuts.
        self.shortcut = (
            conv_norm_act(cin, cout, 1, stride, norm_layer=norm, apply_act=False) if (cin != cout or stride != 1) else None
        )
        self.drop_path = DropPath(drop_path) if drop_path else nn.Identity()
        self.act = create_act_layer(act, inplace=True)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        m = _down(mask, self.stride)
        y = _m(self.conv1(x), m)
        y = _m(self.conv2(y), m)
        if self.se is not None:
            y = self.se(y, m)
        sc = x if self.shortcut is None else self.shortcut(x)
        return _m(self.act(self.drop_path(y) + sc), m)


class InvertedBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, s: StageSpec, act, norm, drop_path: float):
        super().__init__()
        self.stride = stride
        mid = max(8, int(round(cin * s.expand / 8)) * 8)
        self.expand = ConvNormAct(cin, mid, 1, act_layer=act, norm_layer=norm)
        self.dw = conv_norm_act(mid, mid, s.kernel, stride, dilation=s.dilation, groups=mid, act_layer=act, norm_layer=norm)
        self.se = MaskedSE(mid, rd_ratio=s.se / s.expand, act_layer=act) if s.se else None
        self.project = ConvNormAct(mid, cout, 1, norm_layer=norm, apply_act=False)
        self.residual = cin == cout and stride == 1
        self.drop_path = DropPath(drop_path) if drop_path else nn.Identity()

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        m = _down(mask, self.stride)
        y = _m(self.expand(x), mask)
        y = _m(self.dw(y), m)
        if self.se is not None:
            y = self.se(y, m)
        y = _m(self.project(y), m)
        return x + self.drop_path(y) if self.residual else y


BLOCKS = {"plain": PlainBlock, "residual": ResidualBlock, "inverted": InvertedBlock}


class Stage(nn.Module):
    """An optional pool, then the stage's blocks."""

    def __init__(self, cin: int, s: StageSpec, act, norm, drop_paths: list[float]):
        super().__init__()
        self.pool = Pool(s.pool) if s.stride == 2 and s.pool != "conv" else None
        first = 1 if self.pool is not None else s.stride
        self.blocks = nn.ModuleList([BLOCKS[s.block](cin if d == 0 else s.width, s.width, first if d == 0 else 1, s, act, norm,
                                                     drop_paths[d]) for d in range(s.depth)])

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.pool is not None:
            x, mask = self.pool(x, mask), _down(mask, 2)
        for b in self.blocks:
            x = b(x, mask)
            mask = _down(mask, b.stride)
        return x, mask


class Net(nn.Module):
    """A CNN built from a ModelSpec. ``forward(x, sizes=None)``: sizes (n, 2) valid (h, w) per image."""

    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.spec = spec
        act, norm = get_act_layer(spec.act), get_norm_layer(spec.norm)
        stem = [ConvNormAct(3, spec.stem_width, 3, stride=spec.stem_stride, act_layer=act, norm_layer=norm)]
        stem += [ConvNormAct(spec.stem_width, spec.stem_width, 3, act_layer=act, norm_layer=norm)
                 for _ in range(spec.stem_depth - 1)]
        self.stem = nn.ModuleList(stem)
        n_blocks = sum(s.depth for s in spec.stages)
        rates = [spec.drop_path * i / max(1, n_blocks - 1) for i in range(n_blocks)]
        stages, cin = [], spec.stem_width
        for s in spec.stages:
            stages.append(Stage(cin, s, get_act_layer(s.act) if s.act else act, norm, rates[: s.depth]))
            rates, cin = rates[s.depth :], s.width
        self.stages = nn.ModuleList(stages)
        self.head = ConvNormAct(cin, spec.head_width, 1, act_layer=act, norm_layer=norm) if spec.head_width else None
        feat = (spec.head_width or cin) * (2 if spec.pool == "avgmax" else 1)
        hidden = []
        for w in spec.fc:
            hidden += [nn.Dropout(spec.dropout), nn.Linear(feat, w), create_act_layer(act, inplace=True)]
            feat = w
        self.hidden = nn.Sequential(*hidden)
        self.num_features = feat
        self.dropout = nn.Dropout(spec.dropout)
        self.fc = nn.Linear(feat, spec.num_classes)
        self._init()
        self._out_of_place()

    def _init(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.Linear):
                if m is self.fc:
                    nn.init.normal_(m.weight, std=0.01)  # small logits at the start
                else:
                    nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                nn.init.zeros_(m.bias)
        # Zero-init the last norm of each residual branch: blocks start as identities, deep nets train stably.
        for stage in self.stages:
            for b in stage.blocks:
                last = b.conv2 if isinstance(b, ResidualBlock) else b.project if isinstance(b, InvertedBlock) else None
                bn = getattr(last, "bn", None)
                if getattr(bn, "weight", None) is not None:
                    nn.init.zeros_(bn.weight)

    # Activations that may run in place while training: their gradient reads their output, which autograd keeps anyway.
    _IN_PLACE_OK = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.Hardtanh)

    def _out_of_place(self) -> None:
        """Every other activation runs out of place (timm builds them in place). An in-place SiLU, GELU or Mish has a
        gradient that reads its input, so autograd first saves a copy of it: one more kernel and one more
        activation-sized write per layer, for no memory saved (tests/test_model.py counts the copies)."""
        for m in self.modules():
            if getattr(m, "inplace", False) is True and not isinstance(m, self._IN_PLACE_OK):
                m.inplace = False

    def features(self, x: torch.Tensor, sizes: torch.Tensor | None = None, taps: dict | None = None):
        mask = None if sizes is None else valid_mask(sizes, x.shape[2], x.shape[3], x.dtype)
        for layer in self.stem:
            mask = _down(mask, layer.conv.stride[0])
            x = _m(layer(x), mask)
        for i, stage in enumerate(self.stages):
            x, mask = stage(x, mask)
            if taps is not None:
                taps[f"stage{i + 1}"] = x
        if self.head is not None:
            x = _m(self.head(x), mask)
        return x, mask

    def forward(self, x: torch.Tensor, sizes: torch.Tensor | None = None) -> torch.Tensor:
        x, mask = self.features(x, sizes)
        pooled = {"avg": lambda: masked_mean(x, mask), "max": lambda: masked_max(x, mask),
                  "avgmax": lambda: torch.cat([masked_mean(x, mask), masked_max(x, mask)], 1)}[self.spec.pool]()
        return self.fc(self.dropout(self.hidden(pooled.flatten(1))))


def build(spec: ModelSpec) -> Net:
    return Net(spec)


def for_evaluation(spec: ModelSpec, weights: dict, device: torch.device, channels_last: bool) -> Net:
    """A network with saved ``weights`` (best.pt's, last.pt's or the EMA's), on ``device`` in the memory format the
    loader hands over, in eval mode: what the test set and the evidence pictures evaluate."""
    model = build(spec)
    model.load_state_dict(weights)
    model = model.to(device)
    return (model.to(memory_format=torch.channels_last) if channels_last else model).eval()


def count_flops(model: nn.Module, h: int, w: int) -> int:
    """Forward FLOPs (multiply-add = 2) of one h x w image, by torch's FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode

    was = model.training
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        model(torch.zeros(1, 3, h, w, device=next(model.parameters()).device))
    model.train(was)
    return fc.get_total_flops()


def summary_rows(spec: ModelSpec, crop: int = 224, pixels: int = 360_000) -> dict:
    """Parameters and forward FLOPs per image at a ``crop`` square and at the full-resolution budget (a square of
    ``pixels``). Built and counted on the meta device: shapes only, no memory and no arithmetic (the counts are the
    same), so the trainer can record them at every start."""
    with torch.device("meta"):
        m = build(spec)
    side = int(pixels**0.5)
    return {
        "params": sum(p.numel() for p in m.parameters()),
        "flops_256": count_flops(m, crop, crop),
        "flops_full": count_flops(m, side, side),
        "blocks": sum(s.depth for s in spec.stages),
        "features": m.num_features,
    }


@torch.no_grad()
def stage_rows(spec: ModelSpec, crop: int = 224, pixels: int = 360_000) -> list[dict]:
    """Per stage (the stem first): output size at ``crop`` and at the full budget, channels, parameters, forward FLOPs
    at both sizes, and receptive field, flagged where it already exceeds the input's side."""
    from torch.utils.flop_counter import FlopCounterMode

    m = build(spec).eval()
    side = int(pixels**0.5)
    rows = [{"name": "stem", "channels": spec.stem_width, "params": sum(p.numel() for p in m.stem.parameters())}]
    rows += [{"name": f"stage {i + 1} ({s.block}{', ' + s.pool + ' pool' if s.stride == 2 and s.pool != 'conv' else ''})",
              "channels": s.width, "params": sum(p.numel() for p in m.stages[i].parameters())} for i, s in enumerate(spec.stages)]
    for key, n in (("small", crop), ("full", side)):
        x = torch.zeros(1, 3, n, n)
        for row, layer in zip(rows, [None, *m.stages]):
            with FlopCounterMode(display=False) as fc:
                if layer is None:
                    for conv in m.stem:
                        x = conv(x)
                else:
                    x, _ = layer(x, None)
            row[f"size_{key}"], row[f"flops_{key}"] = tuple(x.shape[2:]), fc.get_total_flops()
    for row, rf in zip(rows, receptive_fields(spec)):
        row["rf"] = rf
        row["rf_exceeds"] = [k for k, n in (("small", crop), ("full", side)) if rf > n]
    return rows
