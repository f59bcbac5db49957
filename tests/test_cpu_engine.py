"""The CPU engine: `--dtype auto` (bf16 where the CPU computes it natively), the compiled step,
and the verify bucket chosen from a measured profile."""

import pytest
import torch

from specbench import environment
from specbench.errors import UserError
from specbench.targets.loading import dtype_choice, resolve_dtype


@pytest.mark.parametrize("amx, avx, expected", [(True, False, torch.bfloat16), (False, True, torch.bfloat16),
                                                (False, False, torch.float32)])
def test_dtype_auto_on_cpu_is_bf16_only_where_the_cpu_computes_it(monkeypatch, amx, avx, expected):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx)
    dtype, why = dtype_choice("auto", torch.device("cpu"))
    assert dtype == expected and resolve_dtype("auto", torch.device("cpu")) == expected
    assert why.startswith("auto: ") and ("AMX" in why if amx else "AVX512_BF16" in why)
    assert environment.cpu_bf16()[0] == (expected == torch.bfloat16)


def test_a_given_dtype_is_kept_and_a_wrong_one_is_one_line():
    assert dtype_choice("float32", torch.device("cpu")) == (torch.float32, "given")
    with pytest.raises(UserError, match="unknown dtype 'fp8': use auto, float32"):
        dtype_choice("fp8", torch.device("cpu"))
