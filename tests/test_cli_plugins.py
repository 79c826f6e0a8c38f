"""The core CLI finds `editinfinity pipeline` through the ``editinfinity.cli`` entry points, imports it only when
that command is used, and works without kfp."""

from __future__ import annotations

import sys

import pytest

from editinfinity import cli


def _without_kfp(monkeypatch):
    """Make ``import kfp`` fail (None in sys.modules) and forget the pipelines package, as if kfp were absent."""
    monkeypatch.setitem(sys.modules, "kfp", None)
    for name in [n for n in sys.modules if n == "pipelines" or n.startswith(("pipelines.", "components"))]:
        monkeypatch.delitem(sys.modules, name)


def test_pipeline_is_listed_through_the_entry_point_but_not_imported(monkeypatch):
    _without_kfp(monkeypatch)
    parser = cli.build_parser(["edit", "--help"])
    sub = next(a for a in parser._actions if a.dest == "command")
    assert "pipeline" in sub.choices and "eval" in sub.choices and "bench" in sub.choices
    assert "pipelines" not in sys.modules and sys.modules["kfp"] is None


def test_core_cli_runs_without_kfp_and_the_pipeline_command_says_what_is_missing(monkeypatch, capsys):
    _without_kfp(monkeypatch)
    args = cli.build_parser(["eval", "toy-piebench", "--out", "x"]).parse_args(["eval", "toy-piebench", "--out", "x"])
    assert args.handler is not None
    assert cli.main(["pipeline", "compile"]) == 2
    err = capsys.readouterr().err
    assert "editinfinity pipeline" in err and "pip install 'editinfinity[pipeline]'" in err


def test_pipeline_command_registers_when_used():
    pytest.importorskip("kfp")
    args = cli.build_parser(["pipeline"]).parse_args(["pipeline", "compile", "batch", "--fused"])
    assert args.pipeline == "batch" and args.fused and args.handler.__module__ == "pipelines.cli"
