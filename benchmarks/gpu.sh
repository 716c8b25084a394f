#!/usr/bin/env bash
# Every GPU figure of benchmarks/RESULTS.md, part by part, each part's table saved as OUT_DIR/<part>.md.
#
#   benchmarks/gpu.sh [OUT_DIR] [PART ...]      parts: machine fsq vq8 vq256 vqoom vqchunked train extract
#                                              metrics
#                                              (default: all)
#
# Not yet timed on a GPU; expected on one H100/H200: machine fsq vq8 vqoom vq256 vqchunked about
# 4 min (the fused FSQ compiles once per channel count), train extract about 5 min (compiling two
# 256x256 tokenizers and the encoder; the synthetic shards are PNG-encoded on every core but one).
#
# Run from the repository root on a CUDA host whose Python has torch, triton, webdataset and
# vector-quantize-pytorch (PYTHON=... picks the interpreter). Parts are independent, so a run split
# over several shorter jobs gives the same files. Each part is stopped after PART_TIMEOUT seconds
# (default 540, under a 10-minute job limit with the 30 s kill grace) and the script goes on with
# the next one; it exits 1 when any part failed. DRY_RUN=1 prints each part's command and
# runs nothing (the tests check every command against its module's options that way).
set -uo pipefail

all_parts=(machine fsq vq8 vq256 vqoom vqchunked newer train extract metrics)
out=${1:-benchmarks/gpu-results}
shift || true
parts=("$@")
if [ ${#parts[@]} -eq 0 ]; then
	parts=("${all_parts[@]}")
fi
for name in "$out" "${parts[@]}"; do
	known=0
	for part in "${all_parts[@]}"; do [ "$name" = "$part" ] && known=1; done
	if [ "$name" = "$out" ] && [ $known = 1 ]; then
		echo "'$out' is a part name, not an output directory: benchmarks/gpu.sh OUT_DIR [PART ...]" >&2
		exit 2
	elif [ "$name" != "$out" ] && [ $known = 0 ]; then
		echo "unknown part '$name'; use: ${all_parts[*]}" >&2
		exit 2
	fi
done
read -ra python <<<"${PYTHON:-python3}" # e.g. PYTHON="uv run python"
limit=${PART_TIMEOUT:-540}
failed=()
[ -n "${DRY_RUN:-}" ] || mkdir -p "$out"
export PYTHONUNBUFFERED=1

# The model shape the tokenizer figures use: 256x256 RGB, the GPU profile's width, f = 16.
model=(--device cuda --image-size 256 --channels 3 --base-channels 128 --multipliers 1 1 2 2 4
	--precision bf16 --channels-last)

dry_run=${DRY_RUN:-}

run() {
	local name=$1
	shift
	echo "== $name: ${python[*]} -m $*"
	[ -n "$dry_run" ] && return 0
	local started=$SECONDS
	timeout -k 30 "$limit" "${python[@]}" -m "$@" 2>&1 | tee "$out/$name.md"
	local status=${PIPESTATUS[0]}
	echo "== $name: exit $status after $((SECONDS - started)) s" | tee -a "$out/$name.md"
	[ "$status" = 0 ] || failed+=("$name")
}

for part in "${parts[@]}"; do
	case $part in
	machine)
		if [ -n "$dry_run" ]; then
			echo "== machine: nvidia-smi, torch/triton/peer versions, nproc, date"
			continue
		fi
		(
			status=0
			nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv || status=1
			"${python[@]}" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)" || status=1
			"${python[@]}" -c "import vector_quantize_pytorch, importlib.metadata as m; print('vector-quantize-pytorch', m.version('vector-quantize-pytorch'))" || status=1
			nproc
			date -u +%F
			exit $status
		) 2>&1 | tee "$out/machine.md"
		[ "${PIPESTATUS[0]}" = 0 ] || failed+=(machine)
		;;
	fsq) run fsq benchmarks.quantizers --device cuda --repeats 20 --skip-vq --skip-newer ;;
	vq8) run vq8 benchmarks.quantizers --device cuda --repeats 10 --skip-fsq --vq-dim 8 --skip-newer ;;
	vq256) run vq256 benchmarks.quantizers --device cuda --repeats 10 --skip-fsq --vq-dim 256 --skip-newer ;;
	vqoom) run vqoom benchmarks.quantizers --device cuda --repeats 5 --skip-fsq --vq-vectors 262144 --skip-newer ;;
	vqchunked) run vqchunked benchmarks.quantizers --device cuda --repeats 10 --skip-fsq --vq-search chunked --skip-newer ;;
	newer) run newer benchmarks.quantizers --device cuda --repeats 10 --skip-fsq --skip-vq ;;
	metrics) run metrics benchmarks.metrics --device cuda --batch-size 256 --repeats 10 ;;
	train)
		run train benchmarks.train "${model[@]}" --batch-size 32 --compile --steps 20 --rounds 2 \
			--workers 8 --loader-images 1024
		;;
	extract)
		run extract benchmarks.extract "${model[@]}" --batch-size 128 --compile --images 2048 --shards 16 \
			--workers 8 --steps 10
		;;
	esac
done
if [ ${#failed[@]} -gt 0 ]; then
	echo "== failed parts: ${failed[*]}" >&2
	exit 1
fi
