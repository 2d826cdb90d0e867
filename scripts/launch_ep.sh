#!/usr/bin/env bash
# Launch moepatch expert parallelism: one process per GPU (accelerate), or per CPU rank (torchrun + gloo).
#
#   scripts/launch_ep.sh [-n NPROC] [--torchrun] {demo|bench|eval} [ARGS...]
#
#   scripts/launch_ep.sh bench --out results/bench_ep          # all local GPUs, recipes/accelerate/epN.yaml
#   scripts/launch_ep.sh -n 2 demo --strategy reroute
#   scripts/launch_ep.sh -n 2 bench --smoke --out /tmp/bench   # on a CPU machine: torchrun + gloo
#
# demo and eval run `python -m moepatch.launch demo|eval ...` on every rank, bench scripts/bench_ep.py.
# With GPUs it runs `accelerate launch --config_file recipes/accelerate/epN.yaml ...`
# (N = NPROC, default: every visible GPU; a config without a recipe gets --multi_gpu --num_processes N),
# or torchrun with --torchrun.  Without GPUs it always uses torchrun (accelerate's multi-CPU mode wants MPI).
# The checkout runs without installing (PYTHONPATH); MOEPATCH_EP_TIMEOUT_S bounds every collective
# (default 300 s; see docs/expert-parallel.md).  NCCL settings of the environment are left alone.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
nproc=""
launcher=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    -n|--nproc) nproc="$2"; shift 2 ;;
    --torchrun) launcher="torchrun"; shift ;;
    -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
    *) break ;;
  esac
done
if [[ $# -lt 1 ]]; then
  echo "usage: $0 [-n NPROC] [--torchrun] {demo|bench|eval} [ARGS...]" >&2
  exit 2
fi

gpus="$(python3 -c 'import torch; print(torch.cuda.device_count())')"
if [[ -z "$nproc" ]]; then
  nproc=$(( gpus > 0 ? gpus : 2 ))
fi
if [[ "$gpus" -eq 0 ]]; then
  launcher="torchrun"
fi
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
case "$1" in
  demo|eval) target=(-m moepatch.launch "$@") ;;
  bench) shift; target=("$repo/scripts/bench_ep.py" "$@") ;;
  *) echo "$0: unknown command '$1'; accepted: demo, bench, eval" >&2; exit 2 ;;
esac
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"

if [[ "${launcher:-accelerate}" == "torchrun" ]]; then
  exec torchrun --standalone --nproc_per_node "$nproc" "${target[@]}"
fi
config="$repo/recipes/accelerate/ep$nproc.yaml"
if [[ -f "$config" ]]; then
  exec accelerate launch --config_file "$config" "${target[@]}"
fi
exec accelerate launch --multi_gpu --num_processes "$nproc" --num_machines 1 --mixed_precision no \
  "${target[@]}"
