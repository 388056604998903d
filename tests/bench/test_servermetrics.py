import pytest

from sarathi_engine.bench.metrics import summarize
from sarathi_engine.bench.records import RequestRecord
from sarathi_engine.bench.servermetrics import bucket_delta, histogram_buckets, histogram_quantile

OURS = """# HELP sarathi_request_queue_time_seconds Time from arrival to first being scheduled.
# TYPE sarathi_request_queue_time_seconds histogram
sarathi_request_queue_time_seconds_bucket{le="0.1",model_name="m"} 4.0
sarathi_request_queue_time_seconds_bucket{le="1.0",model_name="m"} 8.0
sarathi_request_queue_time_seconds_bucket{le="+Inf",model_name="m"} 10.0
sarathi_request_queue_time_seconds_count{model_name="m"} 10.0
sarathi_request_queue_time_seconds_sum{model_name="m"} 7.0
# TYPE sarathi_num_requests_running gauge
sarathi_num_requests_running{model_name="m"} 0.0
"""
VLLM = """# TYPE vllm:request_queue_time_seconds histogram
vllm:request_queue_time_seconds_bucket{engine="0",le="0.5",model_name="m"} 1.0
vllm:request_queue_time_seconds_bucket{engine="0",le="+Inf",model_name="m"} 2.0
vllm:request_queue_time_seconds_bucket{engine="1",le="0.5",model_name="m"} 3.0
vllm:request_queue_time_seconds_bucket{engine="1",le="+Inf",model_name="m"} 3.0
"""


def test_reads_ours_and_vllms_histogram_and_sums_label_sets():
    assert histogram_buckets(OURS) == {0.1: 4.0, 1.0: 8.0, float("inf"): 10.0}
    assert histogram_buckets(VLLM) == {0.5: 4.0, float("inf"): 5.0}
    assert histogram_buckets("# TYPE other histogram\nother_bucket{le=\"+Inf\"} 1\n") is None


def test_quantiles_interpolate_within_buckets_like_prometheus():
    buckets = {0.1: 4.0, 1.0: 8.0, float("inf"): 10.0}
    assert histogram_quantile(0.2, buckets) == pytest.approx(0.05)
    assert histogram_quantile(0.5, buckets) == pytest.approx(0.1 + 0.9 * 0.25)
    assert histogram_quantile(0.99, buckets) == 1.0  # in +Inf: the last finite bound
    assert histogram_quantile(0.5, {0.1: 0.0, float("inf"): 0.0}) is None


def test_a_run_is_the_difference_of_two_scrapes():
    before = {0.1: 4.0, 1.0: 8.0, float("inf"): 10.0}
    after = {0.1: 4.0, 1.0: 18.0, float("inf"): 20.0}
    assert bucket_delta(after, before) == {0.1: 0.0, 1.0: 10.0, float("inf"): 10.0}
    assert bucket_delta(after, None) == after


def test_summary_prefers_per_response_delay_then_server_metrics_then_estimate():
    records = [RequestRecord(0, 10, 2, 0.0, token_times=[1.0, 1.1])]
    queue = {"scheduling_delay_p50": 0.25, "scheduling_delay_p90": 0.5, "scheduling_delay_p99": 0.7}
    from_metrics = summarize(records, 1.0, server_queue_time=queue)
    assert from_metrics["scheduling_delay_p50"] == 0.25 and from_metrics["scheduling_delay_source"] == "server-metrics"
    reported = [RequestRecord(0, 10, 2, 0.0, token_times=[1.0, 1.1], server_scheduling_delay=0.125)]
    exact = summarize(reported, 1.0, server_queue_time=queue)
    assert exact["scheduling_delay_p50"] == 0.125 and exact["scheduling_delay_source"] == "server"
    assert summarize(records, 1.0, server_queue_time={"scheduling_delay_p50": None})["scheduling_delay_p50"] is None
