"""The capacity-at-one-SLO benchmark's arithmetic: probe sizes, the one criterion, the ladder's
capacity and stop, and the generated section (the run itself is in docs/benchmarks.md)."""

import pytest

from benchmarks import capacity as benchmark


def summary(tbt_p99, ttft_p50, failed=0):
    return {"num_failed": failed, "tbt_p99": tbt_p99, "tbt_p50": tbt_p99 and tbt_p99 / 3, "ttft_p50": ttft_p50,
            "ttft_p99": ttft_p50 and ttft_p50 * 4, "output_token_throughput": 10.0}


def test_a_probe_holds_100_requests_or_120_seconds_of_arrivals():
    assert benchmark.probe_requests(0.1) == 12  # 120 s at 0.1 req/s
    assert benchmark.probe_requests(0.8) == 96
    assert benchmark.probe_requests(2.0) == 100  # 50 s of arrivals


@pytest.mark.parametrize("s,passed", [(summary(0.4, 2.0), True), (summary(0.6, 2.0), False),
                                      (summary(0.4, 3.5), False), (summary(0.4, 2.0, failed=1), False),
                                      (summary(None, None), False)])
def test_one_criterion_tbt_ttft_and_no_failure(s, passed):
    assert benchmark.passes(s, tbt_slo_s=0.5, ttft_p50_s=3.0) is passed


def test_capacity_is_the_highest_rate_below_the_first_failure():
    probes = [{"qps": q, "summary": summary(t, 1.0)} for q, t in [(0.1, 0.2), (0.2, 0.4), (0.4, 0.9), (0.8, 0.3)]]
    assert benchmark.capacity(probes, 0.5, 3.0) == 0.2  # 0.8 passing after 0.4 failed is noise, not capacity
    assert benchmark.capacity(probes, 1.0, 3.0) == 0.8
    assert benchmark.capacity(probes, 0.1, 3.0) == 0.0
    assert not benchmark.ladder_done(probes[:3], [0.5, 1.0], 3.0)  # 0.4 still passes the relaxed SLO
    assert benchmark.ladder_done(probes[:3], [0.5, 0.8], 3.0)
    rates = [0.1, 0.2, 0.4, 0.8]
    assert benchmark.finished({"probes": probes[:3]}, rates, [0.5, 0.8], 3.0)  # resumed runs keep it
    assert not benchmark.finished({"probes": probes[:3]}, rates, [0.5, 1.0], 3.0)  # interrupted: runs again
    assert benchmark.finished({"probes": probes}, rates, [0.5, 1.0], 3.0)  # every rate ran


def test_the_section_names_the_slos_every_system_and_its_probes(tmp_path):
    results = {"started": "now", "command": "python -m benchmarks.capacity", "load_before": [0.5, 0.6, 0.7],
               "load_after": [1.0, 1.1, 1.2], "machine": {"cpu": "cpu", "cores": 2, "torch": "2", "commit": "abc"},
               "dtype": "float32", "scale": 0.25, "max_model_len": 4096, "seed": 0, "threads": "0-1",
               "ttft_p50_s": 3.0, "decode_tbt_ms": 100.0, "slos_ms": {"strict": 500.0, "relaxed": 2500.0},
               "targets": [{"label": "peer", "probes": [{"qps": 0.1, "requests": 12, "summary": summary(0.4, 1.0)},
                                                        {"qps": 0.2, "requests": 24, "summary": summary(3.0, 1.0)}]},
                           {"label": "ours", "probes": [{"qps": 0.1, "requests": 12, "summary": summary(0.3, 1.0)},
                                                        {"qps": 0.2, "requests": 24, "summary": summary(0.45, 1.0)},
                                                        {"qps": 0.4, "requests": 48, "summary": summary(1.0, 5.0)}]}]}
    text = benchmark.doc_section(results, "capacity.png")
    assert "strict SLO is 500 ms (5x)" in text and "relaxed one 2500 ms (25x)" in text
    assert "| peer | 0.1 | 0.1 | 1.00x | 1.00x | 0.1 ✓✓, 0.2 ✗✗ |" in text
    assert "| ours | 0.2 | 0.2 | 2.00x | 2.00x | 0.1 ✓✓, 0.2 ✓✓, 0.4 ✗✗ |" in text
    results["targets"].append({"label": "down", "probes": [{"qps": 0.1, "requests": 12,
                                                            "summary": summary(None, None, failed=12)}]})
    text = benchmark.doc_section(results, "capacity.png")
    assert "| down | < 0.1 | < 0.1 | < 1.00x | < 1.00x | 0.1 ✗✗ |" in text  # every request failed: still a row
    assert "| down | 0.1 | 12 | – | – | – | – |" in text
    benchmark.figure(results, tmp_path / "figure.png")
    assert (tmp_path / "figure.png").stat().st_size > 10_000
