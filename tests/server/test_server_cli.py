"""The ``pagedserve`` command line: the serve flags the operator relies on, the operator dispatch, --help."""

from __future__ import annotations

import subprocess
import sys
import types

import pytest
from server_harness import REPO

from pagedserve.runtime import cli

# What the operator's pod builder passes (operator/builders.py runtime_args), flag for flag.
OPERATOR_ARGS = [
    "/models/llama", "--host", "0.0.0.0", "--port", "8000", "--served-model-name", "llama3", "llama",
    "--max-model-len", "4096", "--gpu-memory-utilization", "0.85", "--block-size", "32",
    "--num-kv-cache-tokens", "65536", "--tensor-parallel-size", "2", "--max-num-seqs", "128",
    "--max-num-batched-tokens", "4096", "--max-waiting-requests", "64", "--shutdown-timeout", "25",
    "--log-level", "INFO", "--log-json", "--device", "cuda", "--dtype", "bfloat16", "--seed", "7",
    "--api-key", "s3cret", "--no-enable-prefix-caching", "--speculative-config", '{"method": "ngram", "k": 4}',
]


def test_serve_flags_map_onto_the_server_and_engine_config():
    args = cli.build_parser().parse_args(["serve", *OPERATOR_ARGS])
    cfg = cli.server_config_from_args(args)
    assert cfg.model == "/models/llama"
    assert (cfg.host, cfg.port, cfg.names) == ("0.0.0.0", 8000, ["llama3", "llama"])
    assert (cfg.api_key, cfg.max_waiting_requests, cfg.shutdown_timeout) == ("s3cret", 64, 25.0)
    assert args.log_level == "info" and args.log_json
    assert cfg.engine_kwargs == {
        "max_model_len": 4096, "gpu_memory_utilization": 0.85, "block_size": 32, "num_kv_cache_tokens": 65536,
        "tensor_parallel_size": 2, "max_num_seqs": 128, "max_num_batched_tokens": 4096,
        "enable_prefix_caching": False, "scheduling_policy": "fcfs", "long_prefill_token_threshold": 0,
        "device": "cuda", "dtype": "bfloat16", "seed": 7, "enforce_eager": False,
        "speculative_config": {"method": "ngram", "k": 4}, "async_scheduling": None,
    }
    from pagedserve.runtime.engine import EngineArgs

    EngineArgs.from_kwargs(cfg.model, **cfg.engine_kwargs)  # every key is a real engine argument


def test_defaults_and_the_api_key_environment_variable(monkeypatch):
    monkeypatch.setenv("PAGEDSERVE_API_KEY", "from-env")
    args = cli.build_parser().parse_args(["serve", "/m"])
    cfg = cli.server_config_from_args(args)
    assert cfg.api_key == "from-env" and cfg.names == ["/m"] and cfg.port == 8000
    assert cfg.engine_kwargs["enable_prefix_caching"] is True


@pytest.mark.parametrize("bad", [["--port", "70000"], ["--max-num-seqs", "0"], ["--device", "tpu"],
                                 ["--speculative-config", "{not json"], ["--block-size", "12"],
                                 ["--shutdown-timeout", "-1"], ["--log-level", "loud"]])
def test_bad_flags_are_refused(bad, capsys):
    with pytest.raises(SystemExit) as e:
        cli.build_parser().parse_args(["serve", "/m", *bad])
    assert e.value.code == 2
    assert bad[0] in capsys.readouterr().err


def test_operator_subcommand_dispatches_with_its_own_argv(monkeypatch):
    seen = {}
    fake = types.ModuleType("pagedserve.operator.main")

    def fake_main(argv):
        seen["argv"] = argv
        return 3

    fake.main = fake_main
    monkeypatch.setitem(sys.modules, "pagedserve.operator.main", fake)
    assert cli.main(["operator", "--namespace", "team-a", "--help"]) == 3
    assert seen["argv"] == ["--namespace", "team-a", "--help"]


def test_help_runs_as_a_module():
    out = subprocess.run([sys.executable, "-m", "pagedserve.runtime.cli", "serve", "--help"], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    for flag in ("--host", "--port", "--served-model-name", "--max-model-len", "--gpu-memory-utilization",
                 "--block-size", "--num-kv-cache-tokens", "--tensor-parallel-size", "--max-num-seqs",
                 "--max-num-batched-tokens", "--max-waiting-requests", "--shutdown-timeout", "--log-level",
                 "--log-json", "--device", "--dtype", "--seed", "--api-key", "--enable-prefix-caching",
                 "--speculative-config"):
        assert flag in out.stdout, flag
    assert "--debug-step-delay" not in out.stdout
