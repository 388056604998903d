import numpy as np
import pytest

from sarathi_engine.bench.metrics import PrefillModel, meets_slo, percentile, scheduling_delay, summarize
from sarathi_engine.bench.records import RequestRecord


def record(i, token_times, prompt_len=10, delay=None, error=None):
    return RequestRecord(i, prompt_len, len(token_times), send_time=float(i), token_times=token_times,
                         end=token_times[-1] if token_times else None, server_scheduling_delay=delay, error=error)


def test_percentiles_interpolate_linearly():
    values = list(range(1, 101))  # 1..100
    assert percentile(values, 50) == 50.5
    assert percentile(values, 99) == pytest.approx(99.01)
    assert percentile([3.0], 99) == 3.0
    assert percentile([], 50) is None


def test_tbt_gaps_include_zero_for_tokens_of_one_chunk():
    r = record(0, [0.5, 0.6, 0.6, 0.9])
    assert r.ttft == 0.5
    assert r.tbts == pytest.approx([0.1, 0.0, 0.3])


def test_summary_pools_every_gap_and_counts_failures():
    records = [record(0, [1.0, 1.1, 1.2]), record(1, [2.0, 2.5]), record(2, [], error="HTTP 429: busy")]
    s = summarize(records, duration=10.0)
    assert s["num_requests"] == 3 and s["num_failed"] == 1
    assert s["output_tokens"] == 5 and s["output_token_throughput"] == 0.5 and s["request_throughput"] == 0.2
    assert s["ttft_p50"] == 1.5
    assert s["tbt_max"] == pytest.approx(0.5)
    assert s["tbt_p50"] == pytest.approx(np.median([0.1, 0.1, 0.5]))
    assert "goodput" not in s


def test_scheduling_delay_prefers_the_server_figure_then_estimates():
    prefill = PrefillModel.fit([100, 200, 400], [0.2, 0.3, 0.5])  # 0.1 s + 1 ms per token
    assert prefill(300) == pytest.approx(0.4)
    assert scheduling_delay(record(0, [1.0], prompt_len=300, delay=0.05), prefill) == 0.05
    assert scheduling_delay(record(0, [1.0], prompt_len=300), prefill) == pytest.approx(0.6)
    assert scheduling_delay(record(0, [0.3], prompt_len=300), prefill) == 0.0
    assert scheduling_delay(record(0, [1.0]), None) is None


def test_delay_source_is_named():
    prefill = PrefillModel(0.0, 0.0)
    assert summarize([record(0, [1.0], delay=0.2)], 1.0, prefill)["scheduling_delay_source"] == "server"
    assert summarize([record(0, [1.0])], 1.0, prefill)["scheduling_delay_source"] == "estimated"
    mixed = summarize([record(0, [1.0], delay=0.2), record(1, [1.0])], 1.0, prefill)
    assert mixed["scheduling_delay_source"] == "mixed" and mixed["scheduling_delay_p50"] == pytest.approx(0.6)
    assert summarize([record(0, [1.0])], 1.0)["scheduling_delay_source"] is None


def test_goodput_counts_requests_within_both_slos():
    fast, stalled, late = record(0, [0.1, 0.2, 0.3]), record(1, [0.1, 0.9]), record(2, [2.0, 2.1])
    assert meets_slo(fast, 0.2, 1.0) and not meets_slo(stalled, 0.2, 1.0) and not meets_slo(late, 0.2, 1.0)
    assert meets_slo(late, 0.2, None)
    s = summarize([fast, stalled, late, record(3, [], error="x")], duration=2.0, tbt_slo=0.2, ttft_slo=1.0)
    assert s["slo_attainment"] == 0.25 and s["goodput"] == 0.5
