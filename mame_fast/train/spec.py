"""Stage 3a: the model language: a CNN described in YAML as a stem, stages and a head, checked when it loads.

A student designs a network by writing a spec, not by picking a known architecture:

- stem: ``stem_width`` channels, ``stem_depth`` 3x3 conv-norm-act layers, the first of stride ``stem_stride``;
- stages, each ``depth`` blocks of ``width`` channels: ``plain`` (conv-norm-act layers, no skip), ``residual``
  (two convs and a skip) or ``inverted`` (1x1 expand, depthwise, 1x1 project); per stage the kernel, groups
  or depthwise-separable convs, dilation, squeeze-excite and activation; a stage of stride 2 shrinks the map
  with a strided conv (``pool: conv``) or with a 2x2 max or average pool before its blocks;
- head: global pooling (``avg``, ``max`` or ``avgmax``, all over real pixels only), then the ``fc`` hidden
  layers and the classifier, with ``dropout`` before each of them.

Every choice is checked when the spec loads, naming the key: an unknown block, a width that is not a positive
integer, groups that do not divide the widths, a stride that shrinks a 224 px input below one pixel.
``summary`` gives per stage the output size, channels, parameters, FLOPs and receptive field (``mame-fast model``).
"""

from __future__ import annotations

import math
import typing
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Literal

from ..config import ConfigError, merge, read_yaml, shipped


@dataclass(frozen=True)
class StageSpec:
    width: int = 64
    """Output channels of the stage."""
    depth: int = 1
    """Number of blocks."""
    stride: int = 2
    """1 keeps the resolution, 2 halves it (at the stage's start)."""
    block: Literal["plain", "residual", "inverted"] = "residual"
    """'plain' (``convs`` conv-norm-act, no skip), 'residual' (two convs and a skip) or 'inverted' (1x1 expand,
    depthwise, 1x1 project, with a skip where the shape allows)."""
    pool: Literal["conv", "max", "avg"] = "conv"
    """How a stride-2 stage shrinks the map: its first conv strided, or a 2x2 max or average pool before its blocks."""
    convs: int = 2
    """Conv layers per 'plain' block."""
    kernel: int = 3
    """Kernel size of the spatial convs (odd)."""
    dilation: int = 1
    """Dilation of the spatial convs."""
    groups: int = 1
    """Groups of the spatial convs of 'plain' and 'residual' blocks (must divide the widths)."""
    depthwise: bool = False
    """'plain'/'residual': each spatial conv depthwise-separable (a depthwise conv, then a 1x1)."""
    expand: float = 4.0
    """Expansion ratio of 'inverted' blocks."""
    se: float = 0.0
    """Squeeze-excite reduction ratio (0: no SE), e.g. 0.25; SE sees the whole image (global context)."""
    act: str = ""
    """This stage's activation ('': the model's ``act``)."""


@dataclass(frozen=True)
class ModelSpec:
    stem_width: int = 32
    """Channels of the stem (``stem_depth`` 3x3 conv-norm-act layers, the first of stride ``stem_stride``)."""
    stem_depth: int = 1
    """Conv layers in the stem."""
    stem_stride: int = 2
    """Stride of the stem's first conv (1 or 2)."""
    stages: tuple[StageSpec, ...] = (StageSpec(64, 1, 2), StageSpec(128, 1, 2))
    """The stages, in order."""
    act: str = "relu"
    """Activation, any name timm's get_act_layer knows: relu, silu, gelu, mish, ..."""
    norm: str = "batchnorm2d"
    """Norm layer, any name timm's get_norm_layer knows: batchnorm2d, groupnorm, layernorm2d, ..."""
    drop_path: float = 0.0
    """Stochastic depth of skip blocks: drop rate of the last one, growing linearly from 0 at the first."""
    head_width: int = 0
    """Optional 1x1 conv-norm-act before the global pooling (0: none)."""
    pool: Literal["avg", "max", "avgmax"] = "avg"
    """Global pooling over the real pixels: average, maximum, or both concatenated."""
    fc: tuple[int, ...] = ()
    """Widths of hidden fully connected layers between the pooling and the classifier (each with the activation)."""
    dropout: float = 0.0
    """Dropout before each fully connected layer (the hidden ones and the classifier)."""
    num_classes: int = 29
    """Classes of the classifier (set from the shards' classes when training)."""


ANALYSIS_SIDE = 224  # the input a spec must not shrink below one pixel


def load_spec(name_or_path: str | Path) -> ModelSpec:
    """A spec shipped in ``configs/models/<name>.yaml`` (by name) or a YAML path, checked (see the module docstring)."""
    p = Path(name_or_path)
    if not p.suffix:
        p = shipped(f"models/{name_or_path}.yaml")
    if not p.is_file():
        raise ConfigError(f"model: {name_or_path!r} is neither a shipped spec ({', '.join(shipped_specs())}) nor a YAML file")
    data = read_yaml(p) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: expected a mapping of spec keys (stem_width, stages, ...) at the top level")
    try:
        return spec_from_dict(data)
    except ConfigError as e:
        raise ConfigError(f"{p}: {e}") from None


def shipped_specs() -> list[str]:
    return sorted(p.stem for p in shipped("models").iterdir() if p.name.endswith(".yaml"))


def spec_from_dict(data: dict) -> ModelSpec:
    """The inverse of ``spec_dict``, checked; unknown keys are errors."""
    data = dict(data)
    stages = data.pop("stages", None)
    if "fc" in data:
        data["fc"] = tuple(data["fc"] or ())
    spec = merge(ModelSpec(), data)
    if stages is not None:
        if not isinstance(stages, list):
            raise ConfigError(f"stages: {stages!r} is not a list of stages; write one mapping per stage, e.g. "
                              f"stages: [{{width: 32, depth: 1, stride: 2}}, {{width: 64, depth: 2, stride: 2}}]")
        spec = replace(spec, stages=tuple(_stage(i, s) for i, s in enumerate(stages)))
    check(spec)
    return spec


def _stage(i: int, s: dict) -> StageSpec:
    if not isinstance(s, dict):
        raise ConfigError(f"stages[{i}]: {s!r} is not a mapping of stage keys; write it as {{width: 32, depth: 1, "
                          f"stride: 2}} (keys: {', '.join(f.name for f in fields(StageSpec))})")
    try:
        return merge(StageSpec(), s)
    except ConfigError as e:
        raise ConfigError(f"stages[{i}]: {e}") from None


def check(spec: ModelSpec) -> None:
    """Refuse a spec that cannot build or would make no sense, naming the key. The names timm must know come last: asking
    timm imports torch, seconds that a typo in the structure need not wait for."""
    _choices(spec, "")
    for i, s in enumerate(spec.stages):
        _choices(s, f"stages[{i}].")
    _positive(spec.stem_width, "stem_width")
    _positive(spec.stem_depth, "stem_depth")
    _choice(spec.stem_stride, (1, 2), "stem_stride")
    _fraction(spec.drop_path, "drop_path")
    _fraction(spec.dropout, "dropout")
    for k, w in enumerate(spec.fc):
        _positive(w, f"fc[{k}]")
    if not spec.stages:
        raise ConfigError("stages: a model needs at least one stage")
    side, cin = ANALYSIS_SIDE / spec.stem_stride, spec.stem_width
    for i, s in enumerate(spec.stages):
        key = f"stages[{i}]"
        for name in ("width", "depth", "convs", "dilation", "groups"):
            _positive(getattr(s, name), f"{key}.{name}")
        _choice(s.stride, (1, 2), f"{key}.stride")
        if s.kernel < 1 or s.kernel % 2 == 0:
            raise ConfigError(f"{key}.kernel: {s.kernel} must be an odd positive integer")
        if s.expand <= 0 or not 0 <= s.se < 1:
            raise ConfigError(f"{key}: expand must be > 0 and se in [0, 1)")
        if s.block != "inverted" and not s.depthwise and (cin % s.groups or s.width % s.groups):
            raise ConfigError(f"{key}.groups: {s.groups} does not divide the widths {cin} -> {s.width}")
        side /= s.stride
        if side < 1:
            raise ConfigError(f"{key}.stride: the strides so far shrink a {ANALYSIS_SIDE} px input below one pixel")
        cin = s.width
    from timm.layers import get_act_layer, get_norm_layer

    for name in {spec.act} | {s.act for s in spec.stages if s.act}:
        try:
            get_act_layer(name)
        except Exception:  # timm raises various types for an unknown name
            raise ConfigError(f"act: {name!r} is not an activation timm knows (relu, silu, gelu, mish, ...)") from None
    try:
        get_norm_layer(spec.norm)
    except Exception:
        raise ConfigError(f"norm: {spec.norm!r} is not a norm layer timm knows (batchnorm2d, layernorm2d, ...)") from None


def _choices(obj, prefix: str) -> None:
    """Every ``Literal`` field of a spec dataclass holds one of its values."""
    for name, tp in typing.get_type_hints(type(obj)).items():
        if typing.get_origin(tp) is Literal and getattr(obj, name) not in typing.get_args(tp):
            raise ConfigError(f"{prefix}{name}: {getattr(obj, name)!r} is not one of {', '.join(map(repr, typing.get_args(tp)))}")


def _positive(v, key: str) -> None:
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise ConfigError(f"{key}: {v!r} is not a positive integer")


def _choice(v, choices: tuple, key: str) -> None:
    if v not in choices:
        raise ConfigError(f"{key}: {v!r} is not one of {', '.join(map(str, choices))}")


def _fraction(v: float, key: str) -> None:
    if not 0 <= v < 1:
        raise ConfigError(f"{key}: {v!r} must lie in [0, 1)")


def check_for_data(spec: ModelSpec, cfg) -> None:
    """The spec against the run's data config (a ``TrainConfig``): at full resolution the bucket sides must be multiples
    of the network's total stride, or its feature maps would end in ragged borders."""
    if cfg.data.res == "full" and cfg.data.side_multiple % total_stride(spec):
        raise ConfigError(f"data.side_multiple={cfg.data.side_multiple} is not a multiple of model {cfg.model}'s total "
                          f"stride {total_stride(spec)}: bucket sides would leave ragged borders; set data.side_multiple "
                          f"to a multiple of it")


def total_stride(spec: ModelSpec) -> int:
    """How much the network shrinks its input: the stem's stride times every stage's."""
    return spec.stem_stride * math.prod(s.stride for s in spec.stages)


def spec_dict(spec: ModelSpec) -> dict:
    d = {f.name: getattr(spec, f.name) for f in fields(spec)}
    d["stages"] = [{f.name: getattr(s, f.name) for f in fields(s)} for s in spec.stages]
    d["fc"] = list(spec.fc)
    return d


# -- receptive fields -----------------------------------------------------------------------------------


def stage_layers(spec: ModelSpec) -> list[list[tuple[int, int, int]]]:
    """Per stage (the stem first), its spatial layers on the longest path as (kernel, stride, dilation)."""
    stem = [(3, spec.stem_stride, 1)] + [(3, 1, 1)] * (spec.stem_depth - 1)
    out = [stem]
    for s in spec.stages:
        layers = []
        for d in range(s.depth):
            stride = s.stride if d == 0 else 1
            if stride == 2 and s.pool != "conv":
                layers.append((2, 2, 1))
                stride = 1
            convs = {"plain": s.convs, "residual": 2, "inverted": 1}[s.block]
            layers += [(s.kernel, stride, s.dilation)] + [(s.kernel, 1, s.dilation)] * (convs - 1)
        out.append(layers)
    return out


def receptive_fields(spec: ModelSpec) -> list[int]:
    """Receptive field (pixels of the input) at the end of the stem and of each stage, along the conv path (SE and the
    global pooling see the whole image on top of it): r += (k - 1) * dilation * jump; jump *= stride."""
    r, jump, out = 1, 1, []
    for layers in stage_layers(spec):
        for k, stride, dil in layers:
            r += (k - 1) * dil * jump
            jump *= stride
        out.append(r)
    return out
