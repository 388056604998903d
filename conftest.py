"""Root conftest: registers the plugin that provides the `kube_cluster` fixture to every test."""

pytest_plugins = ["e2e.cluster.pytest_plugin"]
