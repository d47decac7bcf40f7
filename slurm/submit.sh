#!/bin/bash
# Submit a recipe (or a sweep as a job array) with slurm/ham.sbatch.
#
#   bash slurm/submit.sh [SBATCH_OPTIONS ...] RECIPE.yaml [key=value ...]
#   bash slurm/submit.sh [SBATCH_OPTIONS ...] --sweep recipes/sweeps/ham_800m_kv.yaml [key=value ...]
#
# Options starting with '-' before the recipe go to sbatch (e.g. --nodes=4 --time=48:00:00).
# The recipe is validated first (a typo fails here, not in the queue). Prints the job id.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(dirname "$here")
PY=${HAM_PYTHON:-python}
SB=()
while [ $# -gt 0 ] && [ "${1#-}" != "$1" ] && [ "$1" != "--sweep" ]; do SB+=("$1"); shift; done
[ $# -ge 1 ] || { sed -n 2,9p "$0"; exit 2; }
cd "$repo"
mkdir -p runs/slurm
if [ "$1" = "--sweep" ]; then
  n=$("$PY" -W ignore -m megatron_ham.training.sweep "$2" --count)
  for ((i = 0; i < n; i++)); do
    mapfile -t a < <("$PY" -W ignore -m megatron_ham.training.sweep "$2" "$i")
    "$PY" -W ignore -m megatron_ham.train "${a[@]}" "${@:3}" --print-config > /dev/null
  done
  exec sbatch --parsable --job-name=ham-sweep --array=0-$((n - 1)) "${SB[@]}" "$here/ham.sbatch" "$@"
fi
"$PY" -W ignore -m megatron_ham.train "$@" --print-config > /dev/null
exec sbatch --parsable "${SB[@]}" "$here/ham.sbatch" "$@"
