import pytest

from sarathi_operator.cli import parse_args


def test_defaults_watch_all_namespaces_standalone():
    args = parse_args([])
    assert args.namespaces is None and args.peering is None
    assert (args.health_port, args.metrics_port, args.resync_seconds) == (8080, 8081, 60.0)


def test_namespaces_repeat():
    assert parse_args(["-n", "a", "--namespace", "b"]).namespaces == ["a", "b"]


def test_namespace_and_all_namespaces_exclude_each_other():
    with pytest.raises(SystemExit):
        parse_args(["-n", "a", "-A"])
