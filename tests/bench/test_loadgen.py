"""The load generator against a scripted OpenAI-style SSE server on 127.0.0.1."""
import asyncio

import pytest
from bench_fake_server import make_app, with_server

from sarathi_engine.bench.loadgen import Load, TokenClock, run_load, ServerTraits, probe_server, served_model
from sarathi_engine.bench.records import RequestRecord


def run(app, load, continuous=True):
    return asyncio.run(with_server(app, lambda url: run_load(url, "tiny", load, continuous)))


def test_counts_every_token_when_chunks_carry_several():
    app, seen = make_app(tokens_per_chunk=[1, 3, 2])
    (record,), duration = run(app, Load([[5, 6, 7]], [10], [0.0]))
    assert record.ok and record.output_tokens == 10 and len(record.token_times) == 10
    gaps = record.tbts
    assert (gaps == 0).sum() == 5  # 3 chunks of 3, 2, 3 tokens: 2 + 1 + 2 tokens ride with another
    assert gaps[gaps > 0].min() >= 0.015  # the server's 20 ms between chunks; a busy machine only adds
    assert duration >= record.e2e
    assert seen[0]["prompt"] == [5, 6, 7] and seen[0]["ignore_eos"] is True and seen[0]["stream"] is True


def test_without_continuous_usage_counts_chunks_and_keeps_the_final_usage():
    app, seen = make_app(tokens_per_chunk=[2])
    (record,), _ = run(app, Load([[1]], [6], [0.0]), continuous=False)
    assert "continuous_usage_stats" not in seen[0]["stream_options"]
    assert len(record.token_times) == 3 and record.output_tokens == 6


def test_warm_up_detects_what_the_server_offers():
    async def check(url):
        return await probe_server(url, "tiny", [1, 2]), await served_model(url)

    assert asyncio.run(with_server(make_app([1])[0], check)) == (ServerTraits(True, False), "tiny")
    refusing = make_app([1], reject_continuous=True, report_delay=0.1)[0]
    assert asyncio.run(with_server(refusing, check)) == (ServerTraits(False, True), "tiny")
    with pytest.raises(RuntimeError, match="HTTP 429"):
        asyncio.run(with_server(make_app([1], fail_status=429)[0], check))


def test_requests_leave_at_their_send_times_and_record_server_delay():
    app, _ = make_app(tokens_per_chunk=[1], gap=0.005, report_delay=0.125)
    records, _ = run(app, Load([[1], [2], [3]], [2, 2, 2], [0.0, 0.2, 0.4]))
    assert [r.send_time for r in records] == pytest.approx([0.0, 0.2, 0.4], abs=0.1)
    assert all(r.server_scheduling_delay == 0.125 for r in records)


def test_http_errors_are_recorded_not_raised():
    app, _ = make_app(tokens_per_chunk=[1], fail_status=429)
    (record,), _ = run(app, Load([[1]], [3], [0.0]))
    assert not record.ok and record.error.startswith("HTTP 429")


def test_unreachable_server_is_an_error():
    load = Load([[1]], [3], [0.0])
    (record,), _ = asyncio.run(run_load("http://127.0.0.1:9", "tiny", load))
    assert not record.ok and "ClientConnectorError" in record.error


def test_token_clock_without_usage_counts_a_token_per_choice_chunk_even_with_held_back_text():
    record = RequestRecord(0, 1, 5, 0.0)
    clock = TokenClock(record)
    clock.on_chunk(0.1, {"choices": [{"text": ""}]})
    clock.on_chunk(0.2, {"choices": [{"text": "x"}]})
    clock.on_chunk(0.3, {"choices": [], "usage": {"completion_tokens": 4}})
    assert record.token_times == [0.1, 0.2] and record.output_tokens == 4


def test_token_clock_with_usage_in_every_chunk_counts_its_growth():
    record = RequestRecord(0, 1, 5, 0.0)
    clock = TokenClock(record)
    clock.on_chunk(0.1, {"choices": [{"text": ""}], "usage": {"completion_tokens": 1}})
    clock.on_chunk(0.2, {"choices": [{"text": "xyz"}], "usage": {"completion_tokens": 4}})
    clock.on_chunk(0.3, {"choices": [], "usage": {"completion_tokens": 4}})
    assert record.token_times == [0.1, 0.2, 0.2, 0.2] and record.output_tokens == 4


def test_load_lengths_must_agree():
    with pytest.raises(ValueError):
        Load([[1]], [1, 2], [0.0])
