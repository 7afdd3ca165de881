"""The one place that decides precision: by the hardware, from (device, compute capability, request), so that every
GPU generation is checked on a machine without one."""

from __future__ import annotations

import pytest

from mame_fast.train.runtime import PrecisionError, choose_precision, setup_runtime

GPUS = {"P100": (6, 0), "V100": (7, 0), "T4": (7, 5), "A100": (8, 0), "RTX 4090": (8, 9), "H100": (9, 0)}


@pytest.mark.parametrize("gpu", sorted(GPUS))
def test_auto_takes_bf16_from_ampere_on_and_fp16_with_a_scaler_below(gpu):
    chosen, why = choose_precision("auto", "cuda", GPUS[gpu])
    want = "bf16" if GPUS[gpu] >= (8, 0) else "fp16"
    assert chosen == want and f"{GPUS[gpu][0]}.{GPUS[gpu][1]}" in why and ("GradScaler" in why) == (want == "fp16")


@pytest.mark.parametrize("gpu", ["P100", "V100", "T4"])
def test_an_explicit_bf16_below_ampere_is_refused_naming_fp16(gpu):
    with pytest.raises(PrecisionError, match=r"precision=bf16 on a GPU of compute capability .*use precision=fp16"):
        choose_precision("bf16", "cuda", GPUS[gpu])
    assert choose_precision("bf16", "cuda", GPUS[gpu], training=False)[0] == "bf16"  # a run trained elsewhere, evaluated


@pytest.mark.parametrize("gpu", sorted(GPUS))
@pytest.mark.parametrize("request_", ["fp16", "fp32"])
def test_fp16_and_fp32_run_on_every_gpu_as_asked(gpu, request_):
    assert choose_precision(request_, "cuda", GPUS[gpu]) == (request_, "as asked")


@pytest.mark.parametrize("request_, want", [("auto", "fp32"), ("fp32", "fp32"), ("bf16", "bf16"), ("fp16", "fp16")])
def test_the_cpu_runs_fp32_by_default_and_any_precision_asked(request_, want):
    assert choose_precision(request_, "cpu")[0] == want


def test_a_cpu_runtime_in_fp16_has_a_grad_scaler_and_says_why():
    rt = setup_runtime("fp16")
    assert rt.scaler.is_enabled() and rt.precision == "fp16" and rt.precision_reason == "as asked"
    rt = setup_runtime("auto")
    assert not rt.scaler.is_enabled() and rt.precision == "fp32" and "auto on the CPU" in rt.precision_reason
    assert not setup_runtime("fp16", training=False).scaler.is_enabled()  # evaluation needs none
