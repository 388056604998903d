"""The autotuner: the outer loop over the engines' per-iteration SLO planning.

The engines plan every iteration for spec.slo.tbtP99Ms x a margin (the engine's slo_planner);
the loop moves the margin so that the P99 TBT the engines observe lands just under the SLO. One
stage per module:

  fetch      scrape /metrics of every serving engine (timeout, bounded concurrency)
  aggregate  windowed P99 TBT and TTFT, request rate, and the planner's limited and infeasible
             iterations, from counter deltas across engines, robust to counter resets
  loop       the outer loop: a pure function of its state and one window
  record     status (the loop's state verbatim), history, the SLOFeasible condition, Events,
             operator metrics

tuner.py runs one pass; daemon.py runs it per SarathiDeployment inside the operator (whose
reconciler pushes the margin), cli.py against plain engine URLs without Kubernetes.
"""
