//go:build tools

// Package tools names the commands built from the wrapper module whose go.mod
// e2e/cluster/build.py generates from the pinned Kubernetes release's own go.mod.
// The build tag keeps it from compiling: main packages cannot be imported.
package tools

import (
	_ "go.etcd.io/etcd/server/v3"
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kube-controller-manager"
	_ "k8s.io/kubernetes/cmd/kube-scheduler"
	_ "k8s.io/kubernetes/cmd/kubectl"
)
