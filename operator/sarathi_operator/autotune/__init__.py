"""Online tuning of the engines' token budget from the time between tokens they report.

A pipeline in the shape of AIBrix's pod autoscaler, one stage per module:

  fetch      scrape /metrics of every serving engine (timeout, bounded concurrency)
  aggregate  windowed P99 TBT, P99 TTFT, request rate and budget pressure from histogram
             deltas across engines, robust to counter resets
  decide     the controller's rules (model.py estimates TBT as a function of the budget)
  apply      PATCH /admin/config on every engine that runs another budget, read back
  record     status, history, Events and operator metrics

tuner.py runs one pass of the pipeline; daemon.py runs it per SarathiDeployment inside the
operator, cli.py against plain engine URLs without Kubernetes.
"""
