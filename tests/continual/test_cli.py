"""`unipeft continual`: bad input exits 2 with one line; a small run prints the table and writes JSON."""
import json

import pytest

from unipeft import continual as cl
from unipeft.cli import main
from unipeft.continual import cli as ccli


@pytest.mark.parametrize("argv, needle", [
    (["--benchmark", "seq-cifar"], "unknown benchmark 'seq-cifar'; valid benchmarks: seq-digits, seq-fortunes"),
    (["--method", "er,ewc"], "unknown method 'ewc'"),
    (["--scenario", "domain-il"], "unknown scenario 'domain-il'"),
    (["--fpf-budget", "2"], "budget"),
])
def test_bad_input_exits_2_with_one_line(capsys, argv, needle):
    assert main(["continual", *argv, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("unipeft continual: error:") and needle in err


def test_small_run_prints_table_and_writes_json(capsys, tmp_path):
    out = tmp_path / "r.json"
    code = main(["continual", "--benchmark", "seq-digits", "--method", "er+fpf", "--method", "kfpf", "--epochs", "1",
                 "--fpf-steps", "10", "--k", "2", "--report", "--no-progress", "--json", str(out)])
    assert code == 0
    text = capsys.readouterr().out
    assert "| er+fpf |" in text and "| kfpf |" in text and "forgetting-prone modules" in text
    payload = json.loads(out.read_text())
    assert payload["config"]["epochs"] == 1 and payload["config"]["fpf"]["steps"] == 10
    row = payload["per_seed"]["kfpf"][0]
    assert row["fpf_phases"] == 2 and row["vs_er"]["batch_steps"] > 0
    assert 0 <= payload["summary"]["er+fpf"]["final_average_accuracy"]["mean"] <= 1


def test_cli_names_match_the_library(capsys):
    assert ccli.METHOD_NAMES == tuple(cl.METHODS) and ccli.BENCHMARK_NAMES == tuple(cl.BENCHMARKS)
    assert main(["continual", "--list"]) == 0
    assert "kfpf-kd" in capsys.readouterr().out
