"""The crfr command: every subcommand explains itself, and bad input is one clear line, never a traceback."""

from __future__ import annotations

import subprocess
import sys

import pytest

from crfr.cli import build_parser, main

SUBCOMMANDS = [
    ["data", "check"], ["data", "prepare"], ["data", "synthesize"], ["train", "teacher"], ["train", "student"],
    ["evaluate"], ["promote"], ["embed"], ["verify"], ["identify"], ["bench", "ops"], ["bench", "train"],
    ["bench", "data"], ["pipeline", "compile"], ["pipeline", "submit"], ["pipeline", "local"],
    ["pipeline", "prefect"], ["report"], ["export", "onnx"], ["gallery", "build"], ["gallery", "add"],
    ["gallery", "info"], ["serve"], ["bench", "serve"], ["bench", "gallery"], ["params", "show"],
]


def test_top_level_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    for command in ("data", "train", "evaluate", "promote", "embed", "verify", "identify", "bench", "pipeline",
                    "report"):
        assert f"    {command}" in out


@pytest.mark.parametrize("words", SUBCOMMANDS, ids=" ".join)
def test_each_subcommand_has_help(words, capsys):
    with pytest.raises(SystemExit) as done:
        main([*words, "--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: crfr " + " ".join(words))
    assert len(out.splitlines()) > 4  # a description and options, not just a usage line


@pytest.mark.parametrize(
    "args,needle",
    [
        (["train", "teacher", "--set", "teacher.lr=-1"], "'teacher.lr': Input should be greater than 0"),
        (["train", "teacher", "--params", "nope.yaml"], "params file not found: nope.yaml"),
        (["train", "teacher", "--prepared", "/nonexistent/prepared"], "/nonexistent/prepared"),
        (["params", "show", "--set", "loss.wavesim_reduction=bogus"],
         "'loss.wavesim_reduction': Input should be 'mean' or 'sum' (got 'bogus')"),
        (["params", "show", "--section", "nope"], "--section 'nope': not a section of params"),
        (["verify", "/nonexistent/a.jpg", "/nonexistent/b.jpg", "--model", "/nonexistent/model"], "/nonexistent"),
    ],
)
def test_bad_input_is_one_clear_line_without_traceback(args, needle, tmp_path):
    result = subprocess.run([sys.executable, "-m", "crfr.cli", *args], capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert needle in result.stderr
    assert "Traceback" not in result.stderr


def test_parser_builds_without_heavy_imports():
    """`crfr --help` must stay fast: building the parser imports no torch-heavy step module."""
    code = "import sys; from crfr.cli import build_parser; build_parser(); print('mlflow' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
    assert build_parser().prog == "crfr"


def test_a_reader_closing_the_pipe_ends_quietly():
    """`crfr ... | head`: no traceback when head stops reading."""
    import subprocess
    import sys

    code = ("import sys; from crfr.cli import run_guarded; "
            "sys.exit(run_guarded(lambda: [print('x' * 1000) for _ in range(10000)]))")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout.read(10) == b"x" * 10
    proc.stdout.close()
    err = proc.stderr.read()
    assert proc.wait(timeout=60) == 141 and b"Traceback" not in err, err.decode()


def test_params_show_prints_what_a_profile_resolves_to(capsys):
    import json

    import yaml

    assert main(["params", "show", "--set", "profile=paper", "--set", "teacher.epochs=20", "--json"]) == 0
    paper = json.loads(capsys.readouterr().out)
    assert paper["profile"] == "paper" and paper["teacher"]["epochs"] == 20 and paper["model"]["depth"] == 50
    assert main(["params", "show", "--section", "loss", "--section", "ablation_rows"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("# params.yaml, profile demo, 0 --set: resolved and validated")
    assert set(yaml.safe_load(out)) == {"loss", "ablation_rows"}
    assert yaml.safe_load(out)["loss"]["wavesim_reduction"] == "mean"
