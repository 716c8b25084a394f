"""The fused Triton nearest-code kernel against brute force, run by Triton's interpreter on the CPU.

``TRITON_INTERPRET=1`` has to be set before the kernel is defined, so the checks run in a child
process; on a GPU machine the same kernel is compiled instead of interpreted.
"""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from imtok.quantizers.search import fused_search_applies

pytest.importorskip("triton", reason="the fused search needs Triton (it ships with torch's Linux wheels)")

CHECKS = textwrap.dedent(
    """
    import torch
    from imtok.quantizers.search import nearest_code, squared_distances
    from imtok.quantizers.search_triton import BLOCK_CODES, BLOCK_ROWS, fused_nearest_code

    def brute(x, codebook):
        return squared_distances(x.double(), codebook.double()).min(dim=1)

    generator = torch.Generator().manual_seed(0)
    # Small integers: every product and sum is exact in float32, so the argmin must match exactly,
    # ties included (many codes repeat, and the lowest index must win).
    for rows, codes, dim in [(BLOCK_ROWS * 2 + 3, BLOCK_CODES * 3 + 5, 8), (5, 7, 1), (70, 300, 33)]:
        x = torch.randint(-3, 4, (rows, dim), generator=generator).float()
        codebook = torch.randint(-2, 3, (codes, dim), generator=generator).float()
        indices, values = fused_nearest_code(x, codebook)
        expected_values, expected_indices = brute(x, codebook)
        assert indices.dtype == torch.int64 and indices.shape == (rows,), (indices.dtype, indices.shape)
        assert torch.equal(indices, expected_indices), (rows, codes, dim)
        assert torch.equal(values.double(), expected_values), (rows, codes, dim)

    # Gaussian data: the chosen code is at the brute-force minimum distance, to float32 rounding.
    x = torch.randn(257, 8, generator=generator)
    codebook = torch.randn(1000, 8, generator=generator)
    indices, values = fused_nearest_code(x, codebook)
    expected_values, _ = brute(x, codebook)
    chosen = (x.double() - codebook.double()[indices]).pow(2).sum(dim=1)
    assert torch.allclose(chosen, expected_values, rtol=0, atol=1e-5)
    assert torch.allclose(values.double(), expected_values, rtol=0, atol=1e-4)
    assert torch.equal(nearest_code(x, codebook, fused=True)[0], indices)

    empty, empty_values = fused_nearest_code(torch.empty(0, 8), codebook)
    assert empty.shape == (0,) and empty_values.shape == (0,)
    for bad, message in [((torch.randn(4, 65), torch.randn(9, 65)), "up to 64"),
                         ((torch.randn(4, 8), torch.randn(9, 7)), "equal D")]:
        try:
            fused_nearest_code(*bad)
        except ValueError as error:
            assert message in str(error), error
        else:
            raise AssertionError(f"no error for {message}")
    print("fused search ok")
    """
)


def test_fused_kernel_matches_brute_force_in_the_interpreter():
    environment = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-c", CHECKS],
        cwd=Path(__file__).resolve().parents[1],
        env=environment,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "fused search ok" in result.stdout


def test_the_default_takes_the_fused_kernel_only_on_cuda():
    x, codebook = torch.randn(4, 8), torch.randn(16, 8)
    assert not fused_search_applies(x, codebook, None)  # CPU tensors: the chunked path
    assert fused_search_applies(x, codebook, True)
    assert not fused_search_applies(x, codebook, False)


def test_a_kernel_that_fails_to_build_hands_over_to_the_chunked_search(monkeypatch, caplog):
    from imtok.quantizers import search, search_triton
    from imtok.quantizers.common import FAST_PATH_FAILURES

    def broken(x, codebook):
        raise RuntimeError("no compiler for this GPU")

    monkeypatch.setattr(search_triton, "fused_nearest_code", broken)

    # As on a CUDA machine: the default takes the kernel until it has failed once.
    def applies(x, codebook, fused):
        return fused if fused is not None else search.FUSED_PATH not in FAST_PATH_FAILURES

    monkeypatch.setattr(search, "fused_search_applies", applies)
    x, codebook = torch.randn(6, 8), torch.randn(16, 8)
    expected = search.nearest_code(x, codebook, fused=False)
    try:
        with caplog.at_level("WARNING", logger="imtok.quantizers.common"):
            indices, distances = search.nearest_code(x, codebook)
        assert torch.equal(indices, expected[0]) and torch.equal(distances, expected[1])
        assert (
            "using the reference path" in caplog.text
            and "no compiler" in FAST_PATH_FAILURES[search.FUSED_PATH]
        )
        with pytest.raises(RuntimeError, match="no compiler"):  # asked for explicitly: the error stands
            search.nearest_code(x, codebook, fused=True)
    finally:
        FAST_PATH_FAILURES.pop(search.FUSED_PATH, None)


def test_under_a_dispatch_mode_the_search_runs_the_chunked_path_the_mode_can_count(monkeypatch):
    # A Triton launch would hide its work from FlopCounterMode (and cannot run under FakeTensorMode):
    # even asked for, the kernel steps aside and the counted FLOPs are the chunked matmul's.
    from torch.utils.flop_counter import FlopCounterMode

    from imtok.quantizers import search, search_triton

    def kernel(x, codebook):
        raise AssertionError("the fused kernel ran under a dispatch mode")

    monkeypatch.setattr(search_triton, "fused_nearest_code", kernel)
    x, codebook = torch.randn(6, 8), torch.randn(16, 8)
    with FlopCounterMode(display=False) as counter:
        indices, _ = search.nearest_code(x, codebook, fused=True)
    assert torch.equal(indices, search.nearest_code(x, codebook, fused=False)[0])
    assert counter.get_total_flops() == 2 * 6 * 16 * 8
