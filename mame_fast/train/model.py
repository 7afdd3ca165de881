"""Stage 3a: custom CNNs assembled from ``timm.layers`` building blocks, described by a YAML spec.

Not ``timm.create_model`` and no replica of a known architecture: users grow their own network by
editing a spec (stem, stages of blocks with widths, depths, strides, block kind, SE, activation, norm,
drop-path, dropout). This module knows nothing of training.

**Padding-aware.** Full-resolution batches are padded to their bucket (right/bottom). Every block takes
``mask`` (n, 1, H, W; 1 = real pixel) and re-zeroes the padding after each conv-norm-act, squeeze-excite
and the head average only over real pixels, and strided convs subsample the mask (a stride-2 output is
real iff its centre input is, which is also how many outputs the unpadded image has). In eval mode a
padded sample's logits therefore equal those of the same image run alone; in training, BatchNorm
statistics still see the (few, zero) padded pixels. With ``mask=None`` (fixed-size batches) all of it is
skipped.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torch.nn as nn
import yaml
from timm.layers import ConvNormAct, DropPath, SEModule, create_act_layer, get_act_layer, get_norm_layer

from ..config import ConfigError, merge, shipped
from ..input.loader import valid_mask

BLOCKS = ("residual", "inverted")


@dataclass(frozen=True)
class StageSpec:
    width: int = 64
    """Output channels of the stage."""
    depth: int = 1
    """Number of blocks."""
    stride: int = 2
    """Stride of the first block (2 halves the resolution)."""
    block: str = "residual"
    """'residual' (two 3x3 conv-norm-act) or 'inverted' (1x1 expand, 3x3 depthwise, 1x1 project)."""
    expand: float = 4.0
    """Expansion ratio of 'inverted' blocks."""
    se: float = 0.0
    """Squeeze-excite reduction ratio (0: no SE), e.g. 0.25."""
    kernel: int = 3


@dataclass(frozen=True)
class ModelSpec:
    stem_width: int = 32
    """Channels of the stem (one stride-2 3x3 conv-norm-act, then ``stem_depth - 1`` stride-1 ones)."""
    stem_depth: int = 1
    stem_stride: int = 2
    stages: tuple[StageSpec, ...] = (StageSpec(64, 1, 2), StageSpec(128, 1, 2))
    act: str = "relu"
    """Activation, any name timm's get_act_layer knows: relu, silu, gelu, mish, ..."""
    norm: str = "batchnorm2d"
    """Norm layer, any name timm's get_norm_layer knows: batchnorm2d, groupnorm, ..."""
    drop_path: float = 0.0
    """Stochastic depth: drop rate of the last block, growing linearly from 0 at the first."""
    dropout: float = 0.0
    """Dropout before the classifier."""
    head_width: int = 0
    """Optional 1x1 conv-norm-act before pooling (0: none)."""
    num_classes: int = 29


def load_spec(name_or_path: str | Path) -> ModelSpec:
    """A spec shipped in ``configs/models/<name>.yaml`` (by name) or a YAML path; unknown keys are errors."""
    p = Path(name_or_path)
    if not p.suffix:
        p = shipped(f"models/{name_or_path}.yaml")
    if not p.is_file():
        raise ConfigError(f"model: {name_or_path!r} is neither a shipped spec ({', '.join(shipped_specs())}) nor a YAML file")
    try:
        return spec_from_dict(yaml.safe_load(p.read_text()) or {})
    except ConfigError as e:
        raise ConfigError(f"{p}: {e}") from None


def shipped_specs() -> list[str]:
    return sorted(p.stem for p in shipped("models").iterdir() if p.name.endswith(".yaml"))


def spec_from_dict(data: dict) -> ModelSpec:
    """The inverse of ``spec_dict``; unknown keys are errors."""
    data = dict(data)
    stages = data.pop("stages", None)
    spec = merge(ModelSpec(), data)
    return merge_stages(spec, stages) if stages is not None else spec


def merge_stages(spec: ModelSpec, stages: list[dict]) -> ModelSpec:
    from dataclasses import replace

    out = []
    for i, s in enumerate(stages):
        try:
            out.append(merge(StageSpec(), s))
        except ConfigError as e:
            raise ConfigError(f"stages[{i}]: {e}") from None
        if out[-1].block not in BLOCKS:
            raise ConfigError(f"stages[{i}].block: {out[-1].block!r} is not one of {BLOCKS}")
    return replace(spec, stages=tuple(out))


def total_stride(spec: ModelSpec) -> int:
    """How much the network shrinks its input: the stem's stride times every stage's."""
    out = spec.stem_stride
    for s in spec.stages:
        out *= s.stride
    return out


def spec_dict(spec: ModelSpec) -> dict:
    d = {f.name: getattr(spec, f.name) for f in fields(spec)}
    d["stages"] = [{f.name: getattr(s, f.name) for f in fields(s)} for s in spec.stages]
    return d


# ---------------------------------------------------------------------------------------------------


def _m(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    return x if mask is None else x * mask


def _down(mask: torch.Tensor | None, stride: int) -> torch.Tensor | None:
    return mask if mask is None or stride == 1 else mask[:, :, ::stride, ::stride]


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


class ResidualBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, s: StageSpec, act, norm, drop_path: float):
        super().__init__()
        self.stride = stride
        self.conv1 = ConvNormAct(cin, cout, s.kernel, stride=stride, act_layer=act, norm_layer=norm)
        self.conv2 = ConvNormAct(cout, cout, s.kernel, act_layer=act, norm_layer=norm, apply_act=False)
        self.se = MaskedSE(cout, rd_ratio=s.se, act_layer=act) if s.se else None
        # A 1x1 (strided) projection: exact under padding, unlike average-pool shortcuts.
        self.shortcut = (
            ConvNormAct(cin, cout, 1, stride=stride, norm_layer=norm, apply_act=False) if (cin != cout or stride != 1) else None
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
        self.dw = ConvNormAct(mid, mid, s.kernel, stride=stride, groups=mid, act_layer=act, norm_layer=norm)
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
        blocks, cin, i = [], spec.stem_width, 0
        self.stage_ends: list[int] = []
        for s in spec.stages:
            for d in range(s.depth):
                dp = spec.drop_path * i / max(1, n_blocks - 1)
                cls = ResidualBlock if s.block == "residual" else InvertedBlock
                blocks.append(cls(cin, s.width, s.stride if d == 0 else 1, s, act, norm, dp))
                cin, i = s.width, i + 1
            self.stage_ends.append(len(blocks) - 1)
        self.blocks = nn.ModuleList(blocks)
        self.head = ConvNormAct(cin, spec.head_width, 1, act_layer=act, norm_layer=norm) if spec.head_width else None
        self.num_features = spec.head_width or cin
        self.dropout = nn.Dropout(spec.dropout)
        self.fc = nn.Linear(self.num_features, spec.num_classes)
        self._init()

    def _init(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.01)
                nn.init.zeros_(m.bias)
        # Zero-init the last norm of each residual branch: blocks start as identities, deep nets train stably.
        for b in self.blocks:
            last = b.conv2 if isinstance(b, ResidualBlock) else b.project
            nn.init.zeros_(last.bn.weight) if hasattr(last, "bn") and hasattr(last.bn, "weight") else None

    def features(self, x: torch.Tensor, sizes: torch.Tensor | None = None, taps: dict | None = None):
        mask = None if sizes is None else valid_mask(sizes, x.shape[2], x.shape[3], x.dtype)
        for layer in self.stem:
            mask = _down(mask, layer.conv.stride[0])
            x = _m(layer(x), mask)
        for i, b in enumerate(self.blocks):
            x = b(x, mask)
            mask = _down(mask, b.stride)
            if taps is not None and i in self.stage_ends:
                taps[f"stage{self.stage_ends.index(i) + 1}"] = x
        if self.head is not None:
            x = _m(self.head(x), mask)
        return x, mask

    def forward(self, x: torch.Tensor, sizes: torch.Tensor | None = None) -> torch.Tensor:
        x, mask = self.features(x, sizes)
        return self.fc(self.dropout(masked_mean(x, mask).flatten(1)))


def build(spec: ModelSpec) -> Net:
    return Net(spec)


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
    m = build(spec)
    side = int(pixels**0.5)
    return {
        "params": sum(p.numel() for p in m.parameters()),
        "flops_256": count_flops(m, crop, crop),
        "flops_full": count_flops(m, side, side),
        "blocks": len(m.blocks),
        "features": m.num_features,
    }
