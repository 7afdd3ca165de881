"""Configuration: unknown keys are errors that list the valid ones, and every field has its one-line doc."""

from __future__ import annotations

import ast
import inspect

import pytest

from mame_fast import config as config_module
from mame_fast.config import ConfigError, TrainConfig, load, merge, parse_sets
from mame_fast.train.spec import load_spec


def test_unknown_config_keys_are_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown config key 'optim.lrr'; valid keys here: .*lr.*momentum"):
        merge(TrainConfig(), parse_sets(["optim.lrr=1"]))
    with pytest.raises(ConfigError, match=r"unknown config key 'epoch'.*epochs"):
        load(None, ["epoch=3"])
    bad = tmp_path / "x.yaml"
    bad.write_text("data:\n  batchsize: 3\n")
    with pytest.raises(ConfigError, match=r"x.yaml: unknown config key 'data.batchsize'; valid keys here: .*batch_size"):
        load(bad)
    with pytest.raises(ConfigError, match=r"epochs: expected int"):
        load(None, ["epochs=many"])
    spec = tmp_path / "m.yaml"
    spec.write_text("stages:\n  - {width: 8, dpth: 1}\n")
    with pytest.raises(ConfigError, match=r"stages\[0\]: unknown config key 'dpth'"):
        load_spec(spec)
    assert load(None, ["optim.lr=0.5", "data.res=full"]).optim.lr == 0.5
    with pytest.raises(ConfigError, match=r"compile_mode: 'reduce-overhead' has no effect without compile=true"):
        load(None, ["compile_mode=reduce-overhead"])
    with pytest.raises(ConfigError, match=r"compile_mode: 'fast' is not one of 'default', 'reduce-overhead'"):
        load(None, ["compile=true", "compile_mode=fast"])
    assert load(None, ["compile=true", "compile_mode=reduce-overhead"]).compile_mode == "reduce-overhead"




@pytest.mark.parametrize("cls", ["DataConfig", "OptimConfig", "TrainConfig"])
def test_every_config_field_has_a_doc_line(cls):
    """A string literal right after each field, as the dataclass documents it (read from the source, not the names)."""
    tree = ast.parse(inspect.getsource(config_module))
    body = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == cls).body
    fields = [(i, s.target.id) for i, s in enumerate(body) if isinstance(s, ast.AnnAssign) and not s.target.id.startswith("_")]
    def doc(i: int) -> str:
        nxt = body[i + 1] if i + 1 < len(body) else None
        ok = isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str)
        return nxt.value.value.strip() if ok else ""

    undocumented = [name for i, name in fields if not doc(i)]
    assert fields and not undocumented, f"{cls}: no doc line for {undocumented}"
