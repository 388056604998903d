import asyncio

import numpy as np
import pytest
from bench_fake_server import make_app, with_server

from sarathi_engine.bench.calibrate import calibration_lengths, decode_gaps, measure_decode_time, measure_prefill
from sarathi_engine.bench.metrics import PrefillModel
from sarathi_engine.bench.workloads import RequestSpec


def test_decode_gaps_keep_the_tokens_that_came_once_all_decode():
    times = [[0.1, 0.2, 0.3, 0.5], [0.25, 0.35, 0.45, 0.6]]
    assert decode_gaps(times, decoding_from=[2, 1]).tolist() == pytest.approx([0.2, 0.1, 0.15])


def test_decode_gaps_of_a_stream_whose_clock_started_late_are_kept():
    # The second stream was sent 5 ms after the first, so its clock reads 5 ms less; its tokens
    # came in one burst right after the check. A window in the first stream's clock lost them
    # all (CI: "decode calibration saw no gaps"); counting tokens keeps them.
    times = [[0.010, 0.012, 0.014], [0.005, 0.0081, 0.0082, 0.0083]]
    assert decode_gaps(times, decoding_from=[3, 1]).tolist() == pytest.approx([0.0001, 0.0001])


def test_decode_time_of_a_server_with_fixed_iterations_and_streams_cancelled():
    app, seen = make_app(tokens_per_chunk=[1], gap=0.02)

    async def body(url):
        return await measure_decode_time(url, "tiny", batch=4, context=8, max_model_len=4096, num_gaps=5)

    assert 0.015 <= asyncio.run(with_server(app, body)) < 0.1
    assert len(seen) == 4 and all(b["max_tokens"] == 4088 and len(b["prompt"]) == 8 for b in seen)


def test_decode_calibration_needs_room_to_generate():
    with pytest.raises(ValueError, match="room"):
        asyncio.run(measure_decode_time("http://127.0.0.1:9", "tiny", 2, context=100, max_model_len=110))


@pytest.mark.parametrize("batch, num_gaps", [(0, 16), (2, 0)])
def test_decode_calibration_needs_a_request_and_a_gap(batch, num_gaps):
    with pytest.raises(ValueError, match="at least one request and one gap"):
        asyncio.run(measure_decode_time("http://127.0.0.1:9", "tiny", batch, context=8, max_model_len=512,
                                        num_gaps=num_gaps))


def test_prefill_model_from_the_fastest_ttft_per_length():
    app, seen = make_app(tokens_per_chunk=[1], gap=0.01)
    model = asyncio.run(with_server(app, lambda url: measure_prefill(url, "tiny", [10, 50], repeats=2)))
    assert len(seen) == 4 and all(b["max_tokens"] == 1 for b in seen)
    assert 0.005 <= model(30) < 0.1


def test_prefill_model_fits_a_line_and_one_length_goes_through_the_origin():
    model = PrefillModel.fit([100, 300], [0.2, 0.4])
    assert (model.intercept, model.per_token) == pytest.approx((0.1, 0.001))
    assert PrefillModel.fit([200, 200], [0.4, 0.4])(100) == pytest.approx(0.2)


def test_calibration_lengths_span_the_workload():
    specs = [RequestSpec(p, 1) for p in np.arange(1, 1001)]
    lens = calibration_lengths(specs)
    assert len(lens) == 4 and lens[0] == pytest.approx(100, abs=2) and lens[-1] == pytest.approx(950, abs=2)
    assert calibration_lengths([RequestSpec(64, 1)] * 10) == [64]
