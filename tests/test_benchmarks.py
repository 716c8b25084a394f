"""The benchmark scripts run: every GPU command parses, and each benchmark runs scaled down on CPU.

Speed is not asserted here (benchmarks measure it); these tests keep the scripts runnable, so the
first run on a GPU host does not spend its time on a typo, and check that their tables are complete.
"""

from __future__ import annotations

import importlib
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import needs_compiler

from benchmarks.common import UtilisationSampler, parse_nvidia_smi_utilisation, utilisation_reader
from benchmarks.quantizers import memory_floor_bytes

REPO = Path(__file__).resolve().parents[1]
GPU_PARTS = {"fsq", "vq8", "vq256", "vqoom", "vqchunked", "newer", "train", "extract", "metrics"}


def gpu_script(*args: str, dry_run: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "DRY_RUN": "1" if dry_run else ""}
    return subprocess.run(
        ["bash", str(REPO / "benchmarks" / "gpu.sh"), *args], cwd=REPO, env=env, capture_output=True,
        text=True, timeout=60,
    )  # fmt: skip


def gpu_commands() -> dict[str, tuple[str, list[str]]]:
    """Part name -> (module, arguments) of every part ``benchmarks/gpu.sh`` runs with Python."""
    done = gpu_script("unused-out-dir")
    assert done.returncode == 0, done.stderr
    commands = {}
    for line in done.stdout.splitlines():
        head, _, command = line.removeprefix("== ").partition(": ")
        words = command.split()
        if "-m" in words:
            at = words.index("-m")
            commands[head] = (words[at + 1], words[at + 2 :])
    return commands


def run_benchmark(module: str, *args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", module, *args], cwd=REPO, capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, f"{module} {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def table(text: str, first_header_cell: str) -> list[list[str]]:
    """The body rows (cells stripped) of the markdown table whose header starts with the given cell."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {first_header_cell} |"))
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows


def number(cell: str) -> float:
    value = float(cell.replace(",", "").removesuffix("x"))
    assert math.isfinite(value) and value > 0, cell
    return value


def test_every_gpu_command_parses_with_the_options_of_its_module():
    commands = gpu_commands()
    assert set(commands) == GPU_PARTS
    parsed = {}
    for part, (module, args) in commands.items():
        parsed[part] = importlib.import_module(module).build_parser().parse_args(args)
        assert parsed[part].device == "cuda", part
    assert parsed["vqoom"].vq_vectors == 262_144 and parsed["vqoom"].skip_fsq
    assert parsed["vq256"].vq_dim == 256 and parsed["vqchunked"].vq_search == "chunked"
    assert parsed["newer"].skip_fsq and parsed["newer"].skip_vq and not parsed["newer"].skip_newer
    assert all(parsed[part].skip_newer for part in ("fsq", "vq8", "vq256", "vqoom", "vqchunked"))
    for part in ("train", "extract"):  # the goal's shape: 256x256 RGB, bf16, channels_last, compiled
        options = parsed[part]
        assert (options.image_size, options.channels, options.precision) == (256, 3, "bf16")
        assert options.channels_last and options.compile and options.workers > 0


def test_the_gpu_script_refuses_an_unknown_part_and_a_part_given_as_the_output_directory():
    unknown = gpu_script("out", "fsq", "fqs")
    assert unknown.returncode == 2 and "unknown part 'fqs'" in unknown.stderr
    swapped = gpu_script("fsq", "vq8")
    assert swapped.returncode == 2 and "is a part name, not an output directory" in swapped.stderr


@needs_compiler
def test_quantizer_benchmark_tables_give_every_path_the_peer_and_the_memory_floor():
    out = run_benchmark(
        "benchmarks.quantizers", "--fsq-vectors", "1024", "--vq-vectors", "256", "--sizes", "256", "4096",
        "--newer-vectors", "256", "--repeats", "1",
    )  # fmt: skip
    fsq = table(out, "size")
    assert [row[0] for row in fsq] == ["2^8 [8, 6, 5]", "2^12 [7, 5, 5, 5, 5]"]
    for row in fsq:
        assert len(row) == 14 and number(row[1]) == 1024
        floor_ms, kernel_ms, kernel_ratio = number(row[2]), number(row[3]), number(row[4])
        # printed to 3 significant digits (the floor) and 0.1 (the ratio)
        assert kernel_ratio == pytest.approx(kernel_ms / floor_ms, rel=0.1, abs=0.1)
        for cell in row[5:]:
            number(cell)
    counts = table(out, "codes")
    assert [row[0] for row in counts] == ["2^8", "2^12"]
    assert all(number(cell) for row in counts for cell in row[1:])
    vq = table(out.split("VQ (EMA codebook)", 1)[1], "size")
    assert [row[0] for row in vq] == ["K=2^8, dim 8", "K=2^12, dim 8"]
    for row in vq:
        assert number(row[1]) == 256
        for cell in row[3:]:
            number(cell)
    newer = table(out.split("LFQ, BSQ", 1)[1], "size")
    assert [row[0] for row in newer] == [
        "LFQ 2^8", "BSQ 2^8", "SimVQ 2^8, dim 8", "residual FSQ 2 x [8, 6, 5]",
        "LFQ 2^12", "BSQ 2^12", "SimVQ 2^12, dim 8", "residual FSQ 2 x [7, 5, 5, 5, 5]",
    ]  # fmt: skip
    for row in newer:
        for cell in row[3:]:
            number(cell)
    assert "none fell back" in out


def scaled_down(part: str, *overrides: str, drop: tuple[str, ...] = ()) -> list[str]:
    """The GPU part's own arguments, then CPU-sized overrides (argparse keeps the last value)."""
    _, args = gpu_commands()[part]
    return [arg for arg in args if arg not in drop] + ["--device", "cpu", *overrides]


@needs_compiler
def test_training_benchmark_runs_the_gpu_parts_options_scaled_down_on_cpu():
    args = scaled_down(
        "train", "--image-size", "16", "--base-channels", "8", "--multipliers", "1", "2", "--batch-size",
        "4", "--steps", "2", "--rounds", "2", "--warmup", "2", "--workers", "1", "--loader-images", "16",
    )  # fmt: skip
    out = run_benchmark("benchmarks.train", *args)
    rows = table(out, "step with")
    assert [row[0] for row in rows] == ["imtok FSQ", "vector-quantize-pytorch FSQ"]
    for row in rows:
        number(row[1]), number(row[2])
        assert row[3:] == ["-", "-", "-"]  # peak memory, MFU and utilisation are CUDA figures
    assert "bf16, channels_last, compiled" in out and "loader alone: **" in out
    assert "none fell back" in out


def test_extraction_benchmark_runs_the_gpu_parts_options_scaled_down_on_cpu():
    args = scaled_down(
        "extract", "--image-size", "16", "--base-channels", "8", "--multipliers", "1", "2", "--batch-size",
        "8", "--images", "40", "--shards", "3", "--workers", "1", "--steps", "2", "--warmup", "1",
        drop=("--compile",),  # the compiled encoder is covered by the training benchmark's compile
    )  # fmt: skip
    out = run_benchmark("benchmarks.extract", *args)
    rows = table(out, "part")
    assert len(rows) == 4 and rows[3][0] == "stage (`extract_shards`), 1 loader workers"
    for row in rows:
        number(row[1])
    assert "40 synthetic images in 3 shards" in out and "none fell back" in out


def test_data_and_codebook_benchmarks_run_at_tiny_sizes():
    data = run_benchmark(
        "benchmarks.data", "--images", "120", "--repeats", "1", "--workers", "0", "--maxcount", "50",
        "--prepare-workers", "2", "--tokens", "40", "--token-grid", "4",
    )  # fmt: skip
    (row,) = table(data, "workers")
    assert row[0] == "0" and all(number(cell) for cell in row[1:])
    serial, parallel = table(data, "encoding processes")
    assert parallel[0] == "2" and all(number(cell) for cell in serial[1:] + parallel[1:])
    rows = table(data, "step")
    assert ["decode_tokens" in row[0] for row in rows] == [True, False, True, False]  # ours, then the peer
    assert all(number(cell) for row in rows for cell in row[1:])
    assert "40 samples of 4x4" in data
    codebooks = run_benchmark(
        "benchmarks.codebooks", "--sizes", "256", "--samples", "2", "--repeats", "1", "--batch-size", "4",
        "--hidden-dim", "32", "--depth", "1",
    )  # fmt: skip
    (row,) = table(codebooks, "codes")
    assert row[0] == "256" and all(number(cell) for cell in row[1:])


def test_the_ssim_benchmark_compares_with_its_peer_and_the_float64_reference():
    out = run_benchmark(
        "benchmarks.metrics", "--shapes", "1x16x16", "3x12x20", "--batch-size", "4", "--repeats", "1"
    )
    rows = table(out, "image (CxHxW)")
    assert [row[0] for row in rows] == ["1x16x16", "3x12x20"]
    for row in rows:
        assert row[1] == "4" and all(number(cell) for cell in row[2:5])
        assert row[5] == row[6] == "-"  # no peak memory on a CPU
        assert float(row[7]) < 1e-5 and float(row[8]) < 1e-3  # both agree with torchmetrics in float64
    assert "peer: torchmetrics" in out


def test_the_memory_floor_counts_reading_z_writing_codes_and_int32_indices():
    z = torch.zeros(2, 6, 4, 5)
    assert memory_floor_bytes(z) == 2 * 6 * 20 * 4 * 2 + 2 * 20 * 4


def test_nvidia_smi_utilisation_is_parsed_and_odd_output_refused():
    assert parse_nvidia_smi_utilisation("87\n") == 87.0
    with pytest.raises(ValueError, match="one utilisation line"):
        parse_nvidia_smi_utilisation("87\n12\n")
    with pytest.raises(ValueError, match="percentage"):
        parse_nvidia_smi_utilisation("187")
    with pytest.raises(ValueError):
        parse_nvidia_smi_utilisation("[N/A]")


def test_on_a_cpu_there_is_no_utilisation_to_sample_and_the_sampler_is_inert():
    cpu = torch.device("cpu")
    assert utilisation_reader(cpu) is None
    sampler = UtilisationSampler(cpu, interval_s=0.01)
    with sampler:
        pass
    with sampler:  # re-enterable
        pass
    assert sampler.source is None and sampler.mean is None and sampler.samples == []


def test_time_call_times_bursts_per_call_where_asked_and_single_calls_otherwise():
    from benchmarks.common import BURST_S, MAX_BURST, burst_size, time_call

    calls = []
    seconds = time_call(lambda: calls.append(1), torch.device("cpu"), warmup=1, repeats=3)
    assert len(calls) == 1 + 3 and seconds >= 0  # on a CPU, one call per sample
    calls.clear()
    seconds = time_call(lambda: calls.append(1), torch.device("cpu"), warmup=1, repeats=3, burst=True)
    bursts, rest = divmod(len(calls) - 4, 3)  # less the warm-up and the three probe calls
    assert rest == 0 and bursts > 1 and 0 <= seconds < BURST_S  # a call of microseconds: many per sample
    assert burst_size(1e-9, True) == MAX_BURST
    assert burst_size(BURST_S / 4, True) == 4 and burst_size(1.0, True) == 1 and burst_size(1e-9, False) == 1


def test_the_fsq_cpu_benchmark_times_our_default_path_beside_the_peer_at_every_table_one_size():
    out = run_benchmark("benchmarks.fsq_cpu", "--vectors", "512", "--repeats", "1", "--threads", "1")
    rows = table(out, "levels")
    assert [row[0] for row in rows][:2] == ["[8, 6, 5]", "[8, 5, 5, 5]"] and len(rows) == 5
    for row in rows:
        assert number(row[1]) > 0 and number(row[2]) > 0 and row[3].endswith("x")
