"""floatscope lint on a file.py:factory target: dtype rules on the torch.export graph, pointing at the user's line."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from floatscope._cli.main import main as cli
from floatscope.lint import lint_paths, lint_target

MODEL = '''\
import torch


class Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(8, 8)

    def forward(self, x, mask):
        y = self.proj(x)
        y = y / (y.norm(dim=-1, keepdim=True) + 1e-8)  # eps line
        s = y @ y.transpose(-1, -2)
        s = s.masked_fill(mask, -1e9)  # mask line
        t = s.masked_fill(mask, torch.finfo(s.dtype).min)  # finfo line
        return torch.softmax(s, -1) + torch.softmax(t, -1)


def make_half():
    return Block().half(), (torch.randn(2, 4, 8).half(), torch.zeros(2, 4, 4, dtype=torch.bool))


def make_float():
    return Block(), (torch.randn(2, 4, 8), torch.zeros(2, 4, 4, dtype=torch.bool))
'''


@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("graph") / "model.py"
    path.write_text(MODEL)
    return path


def line(marker: str) -> int:
    return next(i for i, text in enumerate(MODEL.splitlines(), start=1) if marker in text)


def test_half_model_epsilon_and_mask_found_at_the_user_line(model_file):
    result = lint_target(f"{model_file}:make_half")
    found = [(f.rule, f.line) for f in result.findings]
    assert found == [("FS201", line("eps line")), ("FS203", line("mask line"))]
    eps, mask = result.findings
    assert Path(eps.file).resolve() == model_file.resolve()
    assert "float16" in eps.message and "aten.add.Tensor" in eps.message and "6e-08" in eps.message
    assert eps.col == MODEL.splitlines()[line("eps line") - 1].index("1e-8") + 1
    assert "65504" in mask.message and "NaN" in mask.message and "finfo" in mask.fix
    assert not any(f.line == line("finfo line") for f in result.findings)  # finfo.min is the safe mask


def test_float32_model_is_clean_and_cli_reports_graph_and_source(model_file, capsys):
    assert lint_target(f"{model_file}:make_float").findings == ()
    assert cli(["lint", "--no-config", "--format", "json", f"{model_file}:make_half"]) == 1
    data = json.loads(capsys.readouterr().out)
    assert data["files"] == 1
    assert [(d["rule"], d["line"]) for d in data["findings"]] == [("FS201", line("eps line")),
                                                                   ("FS203", line("mask line"))]


def test_source_and_graph_findings_are_not_duplicated(tmp_path):
    path = tmp_path / "m.py"
    path.write_text(textwrap.dedent('''\
        import torch


        class M(torch.nn.Module):
            def forward(self, x):
                x = x.half()
                return x / (x.sum(-1, keepdim=True) + 1e-8)


        def make():
            return M(), (torch.rand(2, 3),)
        '''))
    source_only = lint_paths([str(path)], config=False).findings
    assert [(f.rule, f.line) for f in source_only] == [("FS201", 7)]  # the source sees .half() too
    both = lint_paths([f"{path}:make"], config=False).findings
    assert [(f.rule, f.line) for f in both] == [("FS201", 7)]


def test_a_model_that_cannot_be_exported_says_why(tmp_path, capsys):
    path = tmp_path / "dyn.py"
    path.write_text(textwrap.dedent('''\
        import torch


        class M(torch.nn.Module):
            def forward(self, x):
                if x.sum().item() > 0:
                    return x * 2
                return x


        def make():
            return M(), (torch.rand(3),)
        '''))
    result = lint_target(f"{path}:make")
    assert result.findings == () and len(result.notes) == 1
    assert "torch.export failed" in result.notes[0]
    assert cli(["lint", "--no-config", f"{path}:make"]) == 0
    assert "floatscope: note:" in capsys.readouterr().err


def test_bad_targets_are_usage_errors(tmp_path, capsys):
    (tmp_path / "m.py").write_text("import torch\n")
    assert cli(["lint", f"{tmp_path / 'm.py'}:nothere"]) == 2
    assert "no callable 'nothere'" in capsys.readouterr().err
    assert cli(["lint", f"{tmp_path / 'absent.py'}:make"]) == 2
    assert "no such file or folder" in capsys.readouterr().err


def test_graph_findings_in_another_file_are_relative_and_counted(tmp_path, monkeypatch, capsys):
    """The factory's file imports the model from a second file: its findings are shown relative to the current
    directory like the source findings, in JSON, text and SARIF, and that file counts as one of the files."""
    (tmp_path / "net.py").write_text(MODEL.split("\n\ndef make_half")[0] + "\n")
    (tmp_path / "factories.py").write_text(textwrap.dedent('''\
        import torch
        from net import Block


        def make():
            return Block().half(), (torch.randn(2, 4, 8).half(), torch.zeros(2, 4, 4, dtype=torch.bool))
        '''))
    monkeypatch.chdir(tmp_path)
    assert cli(["lint", "--no-config", "--format", "json", "factories.py:make"]) == 1
    data = json.loads(capsys.readouterr().out)
    assert [(d["file"], d["rule"], d["line"]) for d in data["findings"]] == [
        ("net.py", "FS201", line("eps line")), ("net.py", "FS203", line("mask line"))]
    assert data["files"] == 2
    assert cli(["lint", "--no-config", "factories.py:make"]) == 1
    out = capsys.readouterr().out
    assert out.splitlines()[0].startswith(f"net.py:{line('eps line')}:") and "in 2 files" in out
    assert cli(["lint", "--no-config", "--format", "sarif", "factories.py:make"]) == 1
    results = json.loads(capsys.readouterr().out)["runs"][0]["results"]
    assert {r["locations"][0]["physicalLocation"]["artifactLocation"]["uri"] for r in results} == {"net.py"}
