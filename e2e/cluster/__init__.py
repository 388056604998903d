"""A real Kubernetes control plane on this machine, built from the Go module proxy.

`python -m e2e.cluster {build,up,down,status}`; the pytest fixture `kube_cluster` lives in
`e2e.cluster.pytest_plugin`. See README.md beside this file.
"""
