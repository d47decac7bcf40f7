#!/bin/bash
# Submit a recipe (or a sweep as a job array) with slurm/ham.sbatch.
#
#   bash slurm/submit.sh [SBATCH_OPTIONS ...] RECIPE.yaml [key=value ...]
#   bash slurm/submit.sh [SBATCH_OPTIONS ...] --sweep recipes/sweeps/ham_800m_kv.yaml [key=value ...]
#
# Options starting with '-' before the recipe go to sbatch (e.g. --nodes=4 --time=48:00:00).
# The recipe and the data / tokenizer paths it names are checked first (a typo fails here, not in
# the queue; HAM_SKIP_PATH_CHECK=1 skips the path part). Python: $HAM_PYTHON, else the checkout's
# .venv, else python3 on PATH (passed on to the job). Prints the job id.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(dirname "$here")
if [ -z "${HAM_PYTHON:-}" ]; then
  if [ -x "$repo/.venv/bin/python" ]; then HAM_PYTHON="$repo/.venv/bin/python"
  else HAM_PYTHON=$(command -v python3 || command -v python || echo python); fi
fi
export HAM_PYTHON
SB=()
while [ $# -gt 0 ] && [ "${1#-}" != "$1" ] && [ "$1" != "--sweep" ]; do SB+=("$1"); shift; done
[ $# -ge 1 ] || { sed -n 2,10p "$0"; exit 2; }
cd "$repo"
echo "[submit] python: $HAM_PYTHON" >&2
"$HAM_PYTHON" -W ignore -m megatron_ham.training.submit_check "$@" || exit 2
mkdir -p runs/slurm
if [ "$1" = "--sweep" ]; then
  n=$("$HAM_PYTHON" -W ignore -m megatron_ham.training.sweep "$2" --count)
  exec sbatch --parsable --job-name=ham-sweep --array=0-$((n - 1)) "${SB[@]}" "$here/ham.sbatch" "$@"
fi
exec sbatch --parsable "${SB[@]}" "$here/ham.sbatch" "$@"
