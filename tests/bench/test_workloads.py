import numpy as np
import pytest

from sarathi_engine.bench.workloads import (TOKEN_ID_RANGE, WORKLOADS, RequestSpec, prompt_token_ids, read_trace,
                                            sample_lengths, scale_and_clip)


@pytest.mark.parametrize("name,prompt,output", [("sharegpt4", (1730, 5696), (415, 834)),
                                                ("arxiv_summarization", (7059, 12985), (208, 371))])
def test_fitted_median_and_p90_within_5_percent(name, prompt, output):
    specs = sample_lengths(WORKLOADS[name], 10_000, seed=0)
    for values, (median, p90) in [([s.prompt_len for s in specs], prompt), ([s.output_len for s in specs], output)]:
        assert np.median(values) == pytest.approx(median, rel=0.05)
        assert np.percentile(values, 90) == pytest.approx(p90, rel=0.05)


def test_arxiv_has_longer_prompts_and_shorter_outputs_than_sharegpt():
    chat, arxiv = (sample_lengths(WORKLOADS[n], 2000, seed=1) for n in ("sharegpt4", "arxiv_summarization"))
    assert np.median([s.prompt_len for s in arxiv]) > 3 * np.median([s.prompt_len for s in chat])
    assert np.median([s.output_len for s in arxiv]) < np.median([s.output_len for s in chat])


def test_same_seed_same_requests_other_seed_others():
    w = WORKLOADS["sharegpt4"]
    assert sample_lengths(w, 50, seed=3) == sample_lengths(w, 50, seed=3)
    assert sample_lengths(w, 50, seed=3) != sample_lengths(w, 50, seed=4)
    specs = sample_lengths(w, 5, seed=3)
    assert prompt_token_ids(specs, 3) == prompt_token_ids(specs, 3)


def test_scale_then_clip_to_context():
    specs = [RequestSpec(1000, 400), RequestSpec(100_000, 50), RequestSpec(3, 1), RequestSpec(900, 900),
             RequestSpec(100, 5000)]
    # A long document keeps its output and loses the end of its prompt; an output longer than half
    # the context keeps half of it, or what a short prompt leaves.
    assert scale_and_clip(specs, 0.5, max_model_len=1024) == [
        RequestSpec(500, 200), RequestSpec(999, 25), RequestSpec(2, 1), RequestSpec(450, 450), RequestSpec(50, 974)]
    assert scale_and_clip([RequestSpec(900, 900)], 1.0, max_model_len=1024) == [RequestSpec(512, 512)]
    for spec in scale_and_clip(specs, 1.0, max_model_len=1024):
        assert spec.prompt_len >= 1 and spec.output_len >= 1 and spec.prompt_len + spec.output_len <= 1024


def test_scale_must_be_positive():
    with pytest.raises(ValueError):
        scale_and_clip([RequestSpec(1, 1)], 0, 100)


def test_prompt_ids_have_the_asked_lengths_and_stay_in_range():
    ids = prompt_token_ids([RequestSpec(7, 1), RequestSpec(300, 1)], seed=0)
    assert [len(p) for p in ids] == [7, 300]
    assert all(TOKEN_ID_RANGE[0] <= t < TOKEN_ID_RANGE[1] for p in ids for t in p)


def test_trace_files_csv_and_jsonl(tmp_path):
    csv_file = tmp_path / "t.csv"
    csv_file.write_text("prompt_len,output_len\n10,20\n30,40\n")
    jsonl = tmp_path / "t.jsonl"
    jsonl.write_text('{"num_prefill_tokens": 5, "num_decode_tokens": 6}\n\n{"prompt_len": 7, "output_len": 8}\n')
    assert read_trace(csv_file) == [RequestSpec(10, 20), RequestSpec(30, 40)]
    assert read_trace(jsonl) == [RequestSpec(5, 6), RequestSpec(7, 8)]


def test_trace_without_lengths_is_refused(tmp_path):
    bad = tmp_path / "t.csv"
    bad.write_text("prompt,output\n1,2\n")
    with pytest.raises(ValueError, match="row 1"):
        read_trace(bad)
