"""Serving benchmark: workload definitions, the statistics, and one real run against the live server."""

from __future__ import annotations

import json
import math
import random
import statistics

import numpy as np
import pytest
from server_harness import API_KEY

from pagedserve.runtime import cli
from pagedserve.runtime.bench_serve import RequestResult, percentile, summarize
from pagedserve.runtime.workloads import arrival_offsets, file_requests, random_requests


def test_percentile_matches_numpy():
    rng = random.Random(3)
    for n in (1, 2, 7, 100):
        xs = [rng.uniform(0, 10) for _ in range(n)]
        for q in (0, 50, 90, 99, 100):
            assert percentile(xs, q) == pytest.approx(float(np.percentile(xs, q)))


def test_summarize_computes_ttft_tpot_itl_e2e_and_throughput():
    results = [
        RequestResult(True, prompt_len=10, output_len=5, ttft=0.1, e2e=0.5, itls=[0.1, 0.1, 0.1, 0.1]),
        RequestResult(True, prompt_len=20, output_len=3, ttft=0.3, e2e=0.7, itls=[0.2, 0.2]),
        RequestResult(True, prompt_len=5, output_len=1, ttft=0.2, e2e=0.2),
        RequestResult(False, prompt_len=7, error="HTTP 429"),
    ]
    s = summarize(results, duration_s=2.0)
    assert (s["completed"], s["failed"], s["errors"]) == (3, 1, ["HTTP 429"])
    assert (s["total_input_tokens"], s["total_output_tokens"]) == (35, 9)
    assert s["request_throughput"] == pytest.approx(1.5)
    assert s["output_token_throughput"] == pytest.approx(4.5)
    assert s["total_token_throughput"] == pytest.approx(22.0)
    assert s["ttft_ms"]["mean"] == pytest.approx(200.0) and s["ttft_ms"]["median"] == pytest.approx(200.0)
    # TPOT excludes the first token and requests with one token: (0.4/4, 0.4/2)
    assert s["tpot_ms"]["mean"] == pytest.approx(statistics.fmean([100.0, 200.0]))
    assert s["itl_ms"]["p90"] == pytest.approx(float(np.percentile([100] * 4 + [200] * 2, 90)))
    assert s["e2e_ms"]["p99"] == pytest.approx(float(np.percentile([500, 700, 200], 99)))


def test_random_workload_is_seeded_and_in_range():
    pool = list(range(100, 150))
    a = random_requests(50, 40, 20, pool, range_ratio=0.5, seed=1)
    assert a == random_requests(50, 40, 20, pool, range_ratio=0.5, seed=1)
    assert a != random_requests(50, 40, 20, pool, range_ratio=0.5, seed=2)
    for r in a:
        assert 20 <= r.prompt_len <= 60 and 10 <= r.output_len <= 30
        assert len(r.prompt) == r.prompt_len and set(r.prompt) <= set(pool)
    fixed = random_requests(5, 8, 4, pool)
    assert {(r.prompt_len, r.output_len) for r in fixed} == {(8, 4)}
    with pytest.raises(ValueError, match="range_ratio"):
        random_requests(5, 8, 4, pool, range_ratio=1.5)


def test_arrivals_poisson_rate_and_bursts():
    offsets = arrival_offsets(4000, 20.0, "poisson", seed=5)
    gaps = np.diff(offsets)
    assert offsets[0] == 0 and all(g >= 0 for g in gaps)
    assert gaps.mean() == pytest.approx(1 / 20.0, rel=0.06)
    assert gaps.std() == pytest.approx(1 / 20.0, rel=0.1)  # exponential: std == mean
    assert arrival_offsets(6, 2.0, "burst", burst_size=3) == [0, 0, 0, 1.5, 1.5, 1.5]
    assert arrival_offsets(3, math.inf) == [0.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="pattern"):
        arrival_offsets(3, 1.0, "gamma")


def test_file_workload(tmp_path):
    path = tmp_path / "w.jsonl"
    path.write_text('{"prompt": "hello there", "output_len": 7}\n{"prompt": [1, 2, 3]}\n')
    reqs = file_requests(str(path), 5, seed=0, default_output_len=9, count_tokens=lambda s: len(s.split()))
    assert len(reqs) == 5
    assert {(r.prompt_len, r.output_len) for r in reqs} == {(2, 7), (3, 9)}
    (tmp_path / "bad.jsonl").write_text('{"text": "x"}\n')
    with pytest.raises(ValueError, match="entry 0 has no 'prompt'"):
        file_requests(str(tmp_path / "bad.jsonl"), 1)


def test_bench_serve_against_the_live_server(api_server, tmp_path, capsys):
    out = tmp_path / "result.json"
    code = cli.main(["bench", "serve", "--base-url", api_server.base_url, "--api-key", API_KEY, "--num-prompts", "6",
                     "--random-input-len", "8", "--random-output-len", "5", "--max-concurrency", "3",
                     "--request-rate", "50", "--result-file", str(out)])
    assert code == 0
    table = capsys.readouterr().out
    assert "TTFT" in table and "Output token throughput" in table
    result = json.loads(out.read_text())
    s = result["summary"]
    assert (s["completed"], s["failed"]) == (6, 0)
    assert s["total_output_tokens"] == 6 * 5 and s["total_input_tokens"] == 6 * 8  # from the server's usage
    assert 0 < s["ttft_ms"]["median"] <= s["e2e_ms"]["median"]
    assert result["model"] == "tiny" and result["command"].startswith("pagedserve bench serve --base-url")
    assert API_KEY not in out.read_text()
    assert result["config"]["request_rate"] == 50 and "api_key" not in result["config"]
