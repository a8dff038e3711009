#!/usr/bin/env bash
# The GPU-relevant benchmarks in one short run (issue 31 item 7), for whenever a CUDA machine is lent:
#
#     benchmarks/gpu_check.sh                 # every row; about 10 minutes at most (each row has a time limit)
#     ONLY="qlora compile" benchmarks/gpu_check.sh
#
# Rows: the many-LoRA batch (benchmarks/grouped.py), Arrow (arrow.py), torch.compile per kind (compile.py),
# a QLoRA training step (qlora.py) and DeepSpeed ZeRO-3 training and merging (deepspeed_zero3.py, when
# deepspeed is installed). On CPU everything runs at its --quick size and the rows that only mean something
# on CUDA are skipped with the reason. grouped, arrow and compile have no device option yet:
# they measure on CPU even on a GPU machine, and their rows say so. Exit status 1 if a row failed.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
export PYTHONPATH=. TRANSFORMERS_VERBOSITY=error
ONLY=${ONLY:-grouped arrow compile qlora qlora-full deepspeed}
LIMIT=${LIMIT:-120}  # seconds per row: five rows stay under the 8 minutes a lent GPU allows for this check

cuda=$("$PY" -c 'import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")' 2>/dev/null)
"$PY" -c 'import bitsandbytes' >/dev/null 2>&1 && bnb=1 || bnb=0
"$PY" -c 'import deepspeed' >/dev/null 2>&1 && ds=1 || ds=0
echo "# gpu_check $(date -u +%FT%TZ) on ${cuda:-CPU only} ($(nproc) cores); $("$PY" -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)')"
summary=()
failed=0

wanted() { [[ " $ONLY " == *" $1 "* ]]; }
skip() { summary+=("| $1 | skipped | $2 |"); echo "## $1: skipped: $2"; }
row() {  # row NAME NOTE MODULE ARGS...: run `python -m benchmarks.MODULE ARGS` under the time limit
    local name=$1 note=$2 start status; shift 2
    wanted "$name" || return 0
    echo "## $name: python -m benchmarks.$*"
    start=$(date +%s)
    if timeout "$LIMIT" "$PY" -m "benchmarks.$@"; then status=ok; else status="failed (exit $?; 124 = over ${LIMIT} s)"; failed=1; fi
    summary+=("| $name | $status in $(( $(date +%s) - start )) s | $note |")
}

cpu_note="measured on CPU: the benchmark has no CUDA path yet"
row grouped "$cpu_note" grouped --quick --only inference
row arrow "$cpu_note" arrow --quick --sizes 8 64
row compile "$cpu_note" compile --quick
if [ "$bnb" = 0 ]; then
    wanted qlora && skip qlora "bitsandbytes is not installed (pip install bitsandbytes)"
    wanted qlora-full && skip qlora-full "bitsandbytes is not installed"
else
    if [ -n "$cuda" ]; then where="on CUDA"; else where="on CPU (bitsandbytes' CPU layers)"; fi
    row qlora "$where" qlora --quick
    if [ -n "$cuda" ]; then
        row qlora-full "on CUDA, hidden 1024 x 8 layers" qlora
    else
        wanted qlora-full && skip qlora-full "CUDA only: the full size takes minutes on 2 CPU cores and its memory peak is a CUDA measure"
    fi
fi
if [ "$ds" = 0 ]; then
    wanted deepspeed && skip deepspeed "deepspeed is not installed (pip install deepspeed)"
elif [ -n "$cuda" ]; then
    row deepspeed "ZeRO-3 on CUDA, one rank: IA3, LN, LoRA train and merge as one process does" deepspeed_zero3
else
    wanted deepspeed && skip deepspeed "on CPU DeepSpeed first compiles its shared-memory op (about 7 minutes): run benchmarks/deepspeed_zero3.py by hand"
fi

echo
echo "| row | result | note |"
echo "|---|---|---|"
printf '%s\n' "${summary[@]}"
exit "$failed"
