#!/usr/bin/env bash
# One-shot GPU check of isoprobe (issue 11 §5), for a machine with a CUDA GPU and a copy of the
# repository. Run from the repository root:   OUT=/some/dir bash bench/gpu_check.sh
#
# 1. Python environment: a venv under $VENV (default /tmp/isoprobe-gpu-venv). If a python on the
#    machine already imports a CUDA-capable torch, the venv is made with --system-site-packages
#    and uses it; otherwise the venv installs `torch` (the default index's Linux wheel is the
#    CUDA build; `torch==2.13.0+cpu` as used on the CPU machines would not do), first from the
#    wheels in ./.whl if present (offline), else from the package index. It says which.
# 2. The test suite with ISOPROBE_TEST_CUDA=1 (CUDA tests run, the CPU ones too).
# 3. bench/bench_probe.py on cuda at 8 × 1024 tokens (target: Probe ≤ 1.10× the plain forward),
#    with the profiler's count of host synchronisations inside the Probe's hooks (must be 0).
# 4. The fig7 reproduction (Joudaki et al. Fig. 7: LN-MLPs of width 1000, SGD) at the paper's
#    sizes on the data available there (CIFAR10 if present, else the built-in synthetic set,
#    which the run's json says), timed.
# Everything goes to $OUT (at most 8 files): env.txt, pytest.txt, bench_cuda.txt,
# bench_cuda.json, fig7.txt, fig7.json, summary.txt. Each step has its own time limit (seconds:
# TESTS_S, BENCH_S, FIG7_S; the defaults fit one 10-minute device command after a quick setup)
# and STEPS selects steps (default "tests bench fig7"); a failed step is reported and the next
# one still runs. fig7 at the paper's sizes may need more than FIG7_S: then its json is missing
# and summary.txt says it timed out (exit 124); rerun with STEPS=fig7 FIG7_S=580.
set -u
OUT=${OUT:-$PWD/gpu-check-out}
VENV=${VENV:-/tmp/isoprobe-gpu-venv}
STEPS=${STEPS:-tests bench fig7}
TESTS_S=${TESTS_S:-240} BENCH_S=${BENCH_S:-150} FIG7_S=${FIG7_S:-150}
mkdir -p "$OUT"
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT" || exit 2
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 MPLBACKEND=Agg
summary() { echo "$*" | tee -a "$OUT/summary.txt"; }
: >"$OUT/summary.txt"

cuda_torch() {  # does this python import a torch that sees a GPU?
  "$1" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null
}

# ---------------------------------------------------------------- 1. environment
{
  date -u; uname -a; nvidia-smi 2>&1 | head -15; nproc; free -g | head -2
} >"$OUT/env.txt" 2>&1
SYS_PY=""
for py in python3 python /usr/bin/python3; do
  if command -v "$py" >/dev/null && cuda_torch "$(command -v "$py")"; then SYS_PY=$(command -v "$py"); break; fi
done
if [ -n "$SYS_PY" ]; then
  "$SYS_PY" -m venv --system-site-packages "$VENV" || exit 2
  summary "environment: venv $VENV on the existing CUDA-capable torch of $SYS_PY"
else
  BASE=$(command -v python3 || command -v python) || { summary "no python on this machine"; exit 2; }
  "$BASE" -m venv "$VENV" || exit 2
  if [ -d .whl ] && "$VENV/bin/pip" install -q --no-index --find-links .whl torch >>"$OUT/env.txt" 2>&1; then
    summary "environment: venv $VENV, torch installed from the wheels in ./.whl (offline)"
  elif timeout 300 "$VENV/bin/pip" install -q --timeout 15 --retries 1 torch >>"$OUT/env.txt" 2>&1; then
    summary "environment: venv $VENV, torch (CUDA build) installed from the package index"
  else
    summary "environment: no CUDA-capable torch found and none could be installed (see env.txt)"; exit 3
  fi
fi
PY="$VENV/bin/python"
cuda_torch "$PY" || { summary "torch in $VENV does not see a GPU"; exit 3; }
missing=$("$PY" - <<'EOF'
import importlib.util
need = ["transformers", "datasets", "numpy", "matplotlib", "click", "tqdm", "pytest", "sklearn"]
print(" ".join(n for n in need if importlib.util.find_spec(n) is None))
EOF
)
if [ -n "$missing" ]; then
  pkgs=$(echo "$missing" | sed 's/sklearn/scikit-learn/')
  if [ -d .whl ]; then "$VENV/bin/pip" install -q --no-index --find-links .whl $pkgs >>"$OUT/env.txt" 2>&1; fi
  timeout 300 "$VENV/bin/pip" install -q --timeout 15 --retries 1 $pkgs >>"$OUT/env.txt" 2>&1 || summary "could not install: $pkgs"
fi
"$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name(0))' \
  2>&1 | tee -a "$OUT/env.txt" "$OUT/summary.txt"

# ---------------------------------------------------------------- 2. tests
if [[ " $STEPS " == *" tests "* ]]; then
start=$(date +%s)
ISOPROBE_TEST_CUDA=1 timeout "$TESTS_S" "$PY" -m pytest -q -p no:cacheprovider tests >"$OUT/pytest.txt" 2>&1
rc=$?
summary "tests (ISOPROBE_TEST_CUDA=1): exit $rc in $(( $(date +%s) - start )) s: $(tail -1 "$OUT/pytest.txt")"
grep -E "^(FAILED|ERROR)" "$OUT/pytest.txt" | head -20 | tee -a "$OUT/summary.txt"
fi

# ---------------------------------------------------------------- 3. Probe cost on cuda
if [[ " $STEPS " == *" bench "* ]]; then
start=$(date +%s)
timeout "$BENCH_S" "$PY" bench/bench_probe.py --device cuda --seq 1024 --threads 0 --reps 5 \
  --json "$OUT/bench_cuda.json" >"$OUT/bench_cuda.txt" 2>&1
rc=$?
summary "bench_probe --device cuda --seq 1024: exit $rc in $(( $(date +%s) - start )) s"
grep -E "Probe\(model|host synchronisations" "$OUT/bench_cuda.txt" | tee -a "$OUT/summary.txt"
fi

# ---------------------------------------------------------------- 4. fig7 at the paper's sizes
if [[ " $STEPS " == *" fig7 "* ]]; then
work=$(mktemp -d)
start=$(date +%s)
timeout "$FIG7_S" "$PY" -c "from isoprobe.cli import main; main()" repro fig7 --device cuda --data auto \
  --no-progress --out "$work" >"$OUT/fig7.txt" 2>&1
rc=$?
summary "fig7 (paper sizes, --device cuda): exit $rc, wall $(( $(date +%s) - start )) s"
cp "$work"/fig7.json "$OUT/fig7.json" 2>/dev/null && "$PY" - "$OUT/fig7.json" <<'EOF' | tee -a "$OUT/summary.txt"
import json, sys
d = json.load(open(sys.argv[1]))
print("fig7:", d.get("verdict"), "| elapsed_s", d.get("elapsed_s"), "| data", d.get("data"))
EOF
rm -rf "$work"
fi
exit 0
