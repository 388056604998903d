"""`sarathi bench compare` against our real server (a tiny random-weight model): it starts one
server per policy, counts every generated token through the real SSE stream, and stops them."""
import json

import pytest

from sarathi_engine.cli import main

pytest.importorskip("sarathi_engine.server.main", reason="the server (issue 3) has not landed")


def test_compare_two_policies_on_the_real_server(tiny_models, tmp_path):
    code = main(["bench", "compare", "--model", str(tiny_models["llama"]), "--target", "sarathi:32", "--target", "vllm",
                 "--qps", "20", "--num-requests", "6", "--scale", "0.05", "--max-model-len", "512",
                 "--slo-tbt", "5x", "--decode-batch", "2", "--decode-context", "400", "--out", str(tmp_path)])
    assert code == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert [t["label"] for t in results["targets"]] == ["sarathi (budget 32)", "vllm"]
    assert results["meta"]["decode_time_s"] > 0
    for target in results["targets"]:
        (point,) = target["points"]
        records = point["records"]
        assert point["summary"]["num_failed"] == 0 and len(records) == 6
        for r in records:  # ignore_eos: exactly max_tokens tokens, each seen once in the stream
            assert len(r["token_times"]) == r["output_tokens"] == r["max_tokens"]
        assert point["summary"]["output_tokens"] == sum(r["max_tokens"] for r in records)
        assert point["summary"]["scheduling_delay_source"] == "server"  # the first chunk reports it
        assert point["summary"]["scheduling_delay_p50"] is not None
    logs = sorted(p.name for p in (tmp_path / "logs").iterdir())
    assert logs == ["sarathi-32.log", "vllm-512.log"]
    assert "ready" in (tmp_path / "logs" / "vllm-512.log").read_text()
