"""The one place that pins what the local control plane is built from.

Every binary is built from the Go module proxy at these versions; the build cache is keyed
by them, so changing a pin rebuilds exactly once.
"""

KUBERNETES = "v1.36.3"
# The etcd that k8s.io/kubernetes v1.36.3 requires and kubeadm's DefaultEtcdVersion for 1.36.
ETCD = "v3.6.8"
KWOK = "v0.8.0"
HELM = "v3.22.0"
# LeaderWorkerSet, installed on demand (lws.py); v0.9.0 is built against Kubernetes v0.36 libraries.
LWS = "v0.9.0"

KEY = f"k8s-{KUBERNETES}_etcd-{ETCD}_kwok-{KWOK}_helm-{HELM}_lws-{LWS}"
