"""A test-only local pod runner: a stand-in kubelet that runs the pods bound to its own node as
processes of this checkout, so that the e2e suite and the demo see engines really serve.
See README.md beside this file."""

from .runner import Runner

__all__ = ["Runner"]
