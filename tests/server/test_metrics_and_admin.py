"""/metrics tells the truth about what was served, and the admin API turns the token budget and the TBT SLO
live."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
from serving import ADMIN_TOKEN, count, get, post, scrape


def admin(server, body: dict | None = None, token: str | None = ADMIN_TOKEN) -> tuple[int, dict]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    if body is None:
        return get(server.url + "/admin/config", headers)
    return post(server.url + "/admin/config", body, method="PATCH", headers=headers)


def test_latency_histogram_counts_match_requests_and_tokens(smol_server):
    before = scrape(smol_server.url)
    lengths = [1, 5, 17, 32, 9, 24]
    with ThreadPoolExecutor(len(lengths)) as pool:
        results = list(pool.map(lambda n: post(smol_server.url + "/v1/completions", {
            "prompt": f"Count to {n}:", "max_tokens": n, "ignore_eos": True, "temperature": 0}), lengths))
    assert [r[1]["usage"]["completion_tokens"] for r in results] == lengths
    after = scrape(smol_server.url)

    def delta(name, **labels):
        return count(after, name, **labels) - count(before, name, **labels)

    assert delta("sarathi_time_to_first_token_seconds_count") == len(lengths)
    assert delta("sarathi_time_between_tokens_seconds_count") == sum(n - 1 for n in lengths)
    assert delta("sarathi_e2e_request_latency_seconds_count") == len(lengths)
    assert delta("sarathi_request_queue_time_seconds_count") == len(lengths)
    assert delta("sarathi_generation_tokens_total") == sum(lengths)
    assert delta("sarathi_requests_total", finish_reason="length") == len(lengths)
    assert delta("sarathi_iteration_tokens_count") >= max(lengths)
    tbt_buckets = [k for k in after if k[0] == "sarathi_time_between_tokens_seconds_bucket"]
    edges = sorted(float(dict(k[1])["le"]) for k in tbt_buckets)
    assert edges[0] <= 0.005 and edges[-2] >= 10 and all(b / a < 1.2 for a, b in zip(edges[:-2], edges[1:-1]))
    for name in ("sarathi_num_requests_running", "sarathi_num_requests_waiting", "sarathi_kv_cache_usage_ratio",
                 "sarathi_num_preemptions_total", "sarathi_prompt_tokens_total"):
        assert (name, ()) in after, name


def test_prefix_cache_counters_count_prompt_tokens_looked_up_and_found(smol_server):
    prompt = [2000 + i for i in range(300)]
    before = scrape(smol_server.url)
    first = post(smol_server.url + "/v1/completions", {"prompt": prompt, "max_tokens": 4, "temperature": 0})
    middle = scrape(smol_server.url)
    second = post(smol_server.url + "/v1/completions", {"prompt": prompt + [7, 8], "max_tokens": 4, "temperature": 0})
    after = scrape(smol_server.url)

    def delta(a, b, name):
        return count(b, name) - count(a, name)

    assert delta(before, middle, "sarathi_prefix_cache_queries_total") == 300
    assert delta(before, middle, "sarathi_prefix_cache_hits_total") == 0
    assert delta(middle, after, "sarathi_prefix_cache_queries_total") == 302
    assert delta(middle, after, "sarathi_prefix_cache_hits_total") == 300 // 16 * 16  # its full blocks
    assert first[1]["usage"]["prompt_tokens"] == 300 and second[1]["usage"]["prompt_tokens"] == 302


def test_patching_the_budget_changes_the_gauge_and_the_iterations(smol_server):
    status, config = admin(smol_server)
    assert status == 200 and config["policy"] == "sarathi" and config["max_num_seqs"] == 128
    for budget, chunk_bucket, smaller_bucket in ((64, "64.0", "48.0"), (128, "128.0", "96.0")):
        # A prompt of its own each time: a cached prefix would leave fewer tokens to chunk.
        long_prompt = {"prompt": [budget + i for i in range(600)], "max_tokens": 2, "temperature": 0}
        status, config = admin(smol_server, {"token_budget": budget})
        assert status == 200 and config["token_budget"] == budget
        assert count(scrape(smol_server.url), "sarathi_token_budget") == budget
        before = scrape(smol_server.url)
        assert post(smol_server.url + "/v1/completions", long_prompt)[0] == 200
        after = scrape(smol_server.url)

        def delta(le):
            key = "sarathi_iteration_tokens_bucket"
            return count(after, key, le=le) - count(before, key, le=le)

        iterations = count(after, "sarathi_iteration_tokens_count") - count(before, "sarathi_iteration_tokens_count")
        assert delta(chunk_bucket) == iterations  # no iteration above the budget
        assert iterations - delta(smaller_bucket) >= 600 // budget  # full chunks of exactly the budget
    admin(smol_server, {"token_budget": 256})


@pytest.mark.parametrize("body,token,status,message", [
    (None, None, 401, "missing or wrong admin bearer token"),
    (None, "wrong", 401, "missing or wrong admin bearer token"),
    ({"token_budget": 64}, "wrong", 401, "missing or wrong admin bearer token"),
    ({"token_budget": 0}, ADMIN_TOKEN, 400, "token_budget must be a positive integer"),
    ({"token_budget": "64"}, ADMIN_TOKEN, 400, "token_budget must be a positive integer"),
    ({"token_budget": 64, "policy": "vllm"}, ADMIN_TOKEN, 400, "only these change live"),
    ([], ADMIN_TOKEN, 400, "only these change live"),
    ({}, ADMIN_TOKEN, 400, "only these change live"),
    ({"tbt_slo_ms": 0}, ADMIN_TOKEN, 400, "tbt_slo_ms must be a number of milliseconds"),
    ({"tbt_slo_ms": "50"}, ADMIN_TOKEN, 400, "tbt_slo_ms must be a number of milliseconds"),
    ({"tbt_slo_ms": 1e12}, ADMIN_TOKEN, 400, "tbt_slo_ms must be a number of milliseconds"),
    ({"token_budget": 64, "tbt_slo_ms": -1}, ADMIN_TOKEN, 400, "tbt_slo_ms must be"),  # and the budget stays
    ({"slo_margin": 0}, ADMIN_TOKEN, 400, "slo_margin must be a number in [0.1, 2.0]"),
    ({"token_budget": 64, "slo_margin": "0.9"}, ADMIN_TOKEN, 400, "slo_margin must be"),
])
def test_admin_api_refuses_bad_tokens_and_values(smol_server, body, token, status, message):
    code, error = admin(smol_server, body, token)
    assert code == status and message in error["error"]["message"]
    config = admin(smol_server)[1]
    assert config["token_budget"] == 256 and config["tbt_slo_ms"] is None and config["slo_margin"] == 1.0


def test_a_live_tbt_slo_plans_the_iterations_and_shows_its_model(smol_server):
    status, config = admin(smol_server, {"tbt_slo_ms": 250})
    assert status == 200 and config["tbt_slo_ms"] == 250 and config["token_budget"] == 256
    assert count(scrape(smol_server.url), "sarathi_tbt_slo_seconds") == 0.25
    before = scrape(smol_server.url)
    assert post(smol_server.url + "/v1/completions", {"prompt": [100 + i for i in range(300)], "max_tokens": 16,
                                                      "temperature": 0})[0] == 200
    after = scrape(smol_server.url)
    iterations = count(after, "sarathi_iteration_seconds_count") - count(before, "sarathi_iteration_seconds_count")
    ratios = (count(after, "sarathi_iteration_predicted_ratio_count")
              - count(before, "sarathi_iteration_predicted_ratio_count"))
    assert iterations >= 16 and ratios == iterations  # the model predicted every one of them
    decodes = (count(after, "sarathi_decode_iteration_seconds_count")
               - count(before, "sarathi_decode_iteration_seconds_count"))
    assert 0 < decodes < iterations  # the prompt's first chunks carried no decode
    assert any(k[0] == "sarathi_slo_infeasible_iterations_total" for k in after)
    planning = admin(smol_server)[1]["slo_planning"]
    assert planning["active"] and planning["samples"] > 0 and config["slo_margin"] == 1.0
    assert set(planning["coefficients_seconds"]) == {"constant", "any_prefill", "tokens", "prefill_attention",
                                                   "decode_context", "sequences"}
    assert planning["prediction_ratio_p99"] >= 1.0
    status, config = admin(smol_server, {"slo_margin": 0.8})
    assert status == 200 and config["slo_margin"] == 0.8 and count(scrape(smol_server.url), "sarathi_slo_margin") == 0.8
    assert admin(smol_server, {"slo_margin": 1.0})[0] == 200
    status, config = admin(smol_server, {"tbt_slo_ms": None})
    assert status == 200 and config["tbt_slo_ms"] is None
    assert count(scrape(smol_server.url), "sarathi_tbt_slo_seconds") == 0


def test_admin_api_is_disabled_without_a_token(tiny_server):
    server = tiny_server(env={"SARATHI_ADMIN_TOKEN": ""})
    code, error = admin(server, {"token_budget": 64})
    assert code == 403 and "admin API disabled" in error["error"]["message"]


def test_an_api_key_guards_the_openai_routes_only(tiny_server):
    import openai

    server = tiny_server("--max-model-len", "128", env={"SARATHI_API_KEY": "sk-test", "SARATHI_ADMIN_TOKEN": ADMIN_TOKEN})
    wrong = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError, match="missing or wrong API key"):
        wrong.completions.create(model="any", prompt="hi", max_tokens=2)
    code, error = get(server.url + "/v1/models")  # no key at all
    assert code == 401 and error["error"]["type"] == "authentication_error"
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="sk-test", max_retries=0)
    [model] = [m.id for m in client.models.list().data]
    assert client.completions.create(model=model, prompt="hi", max_tokens=2).usage.completion_tokens == 2
    assert get(server.url + "/health")[0] == get(server.url + "/ready")[0] == 200
    assert "sarathi_generation_tokens_total" in str(scrape(server.url))
    assert admin(server)[0] == 200  # the admin API keeps its own token
