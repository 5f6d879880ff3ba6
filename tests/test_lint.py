"""floatscope lint: each source rule on injected bugs and on its safe look-alikes, the value tracker, --fix,
ignore comments, pyproject config, the CLI (exit codes, JSON, SARIF), the labelled corpus and the bundled examples."""

from __future__ import annotations

import ast
import importlib.util
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from floatscope._cli.main import main as cli
from floatscope.lint import RULES, lint_paths, lint_source, to_sarif

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "src" / "floatscope" / "examples"
CORPUS = ROOT / "tests" / "fixtures" / "lint_corpus"
HEAD = "import math\nimport numpy as np\nimport torch\nimport torch.nn as nn\nimport torch.nn.functional as F\n"


def findings(code: str, **kwargs):
    return lint_source(HEAD + textwrap.dedent(code), "t.py", **kwargs).findings


def rules(code: str) -> list[tuple[str, int]]:
    """(rule, line) with lines counted from the snippet's first line."""
    offset = HEAD.count("\n")
    return [(f.rule, f.line - offset) for f in findings(code)]


# (snippet, rule, line in the snippet, the fix when --fix applies it, else None)
UNSTABLE = [
    ("y = torch.log(torch.softmax(z, dim=-1))", "FS101", 1, "torch.log_softmax(z, dim=-1)"),
    ("y = torch.log(F.softmax(z, dim=1))", "FS101", 1, "F.log_softmax(z, dim=1)"),
    ("y = z.softmax(-1).log()", "FS101", 1, "z.log_softmax(-1)"),
    ("p = torch.softmax(z, 1)\ny = torch.log(p)", "FS101", 2, None),
    ("loss = F.nll_loss(torch.log(F.softmax(z, 1)), t)", "FS102", 1, "F.log_softmax(z, 1)"),
    ("p = F.softmax(z, 1)\nloss = -torch.log(p[range(4), y]).mean()", "FS102", 2, None),
    ("p = F.softmax(z, 1)\nloss = -(t * torch.log(p)).sum(1)", "FS102", 2, None),
    ("y = torch.log(torch.sigmoid(z))", "FS103", 1, "F.logsigmoid(z)"),
    ("y = torch.log(1 - torch.sigmoid(z))", "FS104", 1, "F.logsigmoid(-z)"),
    ("y = torch.log1p(-z.sigmoid())", "FS104", 1, "F.logsigmoid(-z)"),
    ("loss = F.binary_cross_entropy(torch.sigmoid(z), t)", "FS105", 1, None),
    ("crit = nn.BCELoss()\nloss = crit(z.sigmoid(), t)", "FS105", 2, None),
    ("w = torch.exp(s) / torch.exp(s).sum(dim=-1, keepdim=True)", "FS106", 1, "torch.softmax(s, dim=-1)"),
    ("e = torch.exp(s)\nw = e / e.sum(-1, keepdim=True)", "FS106", 1, None),
    ("y = torch.log(torch.exp(x).sum(dim=1))", "FS107", 1, "torch.logsumexp(x, dim=1)"),
    ("y = torch.log(torch.sum(torch.exp(x), 1))", "FS107", 1, "torch.logsumexp(x, 1)"),
    ("y = torch.log(torch.exp(a) + torch.exp(b))", "FS107", 1, "torch.logaddexp(a, b)"),
    ("y = torch.log(torch.prod(p, dim=1))", "FS108", 1, None),
    ("v = (x ** 2).mean(0) - x.mean(0) ** 2", "FS109", 1, None),  # torch or numpy? both imported: a suggestion
    ("v = torch.mean(x * x, dim=1) - torch.mean(x, dim=1) ** 2", "FS109", 1,
     "torch.var(x, dim=1, correction=0)"),
    ("m = x.mean()\nm2 = x.pow(2).mean()\nv = m2 - m ** 2", "FS109", 3, None),
    ("y = torch.log(1 + x)", "FS110", 1, "torch.log1p(x)"),
    ("y = np.log(x + 1.0)", "FS110", 1, "np.log1p(x)"),
    ("y = (1 + x).log()", "FS110", 1, "x.log1p()"),
    ("y = torch.exp(x) - 1", "FS111", 1, "torch.expm1(x)"),
    ("y = 1 - math.exp(-r)", "FS111", 1, "-math.expm1(-r)"),
    ("y = x / x.norm(dim=-1, keepdim=True)", "FS112", 1, None),
    ("y = (x - x.mean()) / x.std()", "FS112", 1, None),
    ("n = mask.sum()\nloss = total / n", "FS112", 2, None),
    ("d = torch.sqrt(((a - b) ** 2).sum(-1))", "FS113", 1, None),
    ("d = (a - b).pow(2).sum(1) ** 0.5", "FS113", 1, None),
    ("v = x.var(0)\ny = (x - x.mean(0)) / torch.sqrt(v)", "FS114", 2, None),
    ("y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True))", "FS114", 1, None),
    ("a = torch.acos(F.cosine_similarity(u, v))", "FS115", 1, None),
    ("a = np.arcsin(np.dot(u, v) / (np.linalg.norm(u) * np.linalg.norm(v)))", "FS115", 1, None),
    ("y = torch.log(1 + torch.exp(x))", "FS116", 1, None),
    ("x = x.half()\ny = x / (x.sum() + 1e-8)", "FS201", 2, None),
    ("s = s.to(torch.float16)\ns = s.masked_fill(m, -1e9)", "FS203", 2, None),
    ("h = torch.zeros(3, dtype=torch.half)\ny = h * 1e5", "FS204", 2, None),
    ("net = nn.Linear(2, 2).half()\nopt = torch.optim.Adam(net.parameters())", "FS202", 2, None),
    # a subtraction or a minus is a shift only when it is the max of the same tensor, or keeps the argument <= 0
    ("w = torch.exp(-s)\ny = w / w.sum(-1, keepdim=True)", "FS106", 1, None),
    ("e = torch.exp(z - b)\ny = e / e.sum(-1, keepdim=True)", "FS106", 1, None),
    ("y = -torch.log(torch.exp(-s).sum(-1))", "FS107", 1, "torch.logsumexp(-s, -1)"),
    ("y = torch.log(torch.exp(z - 1.0).sum(-1))", "FS107", 1, "torch.logsumexp(z - 1.0, -1)"),
    ("y = torch.log(1 + torch.exp(-t * (x @ a)))", "FS116", 1, None),
    ("y = (1 + (-a * t).exp()).log()", "FS116", 1, None),
    ("y = torch.log1p(torch.exp(-a * t))", "FS116", 1, None),
    ("y = torch.log(1 + torch.exp(z - 0.5))", "FS116", 1, None),
    ("y = torch.exp(s) / torch.exp(s).sum(-1, True)", "FS106", 1, "torch.softmax(s, dim=-1)"),
    # picking the targets' probabilities: diag (CLIP, InfoNCE), diagonal, boolean indexing
    ("p = z.softmax(1)\ny = -torch.log(p.diag())", "FS102", 2, None),
    ("p = z.softmax(1)\ny = -p.diag().log()", "FS102", 2, None),
    ("p = z.softmax(1)\ny = torch.log(torch.diagonal(p))", "FS102", 2, None),
    ("p = F.softmax(z, 1)\ny = torch.log(p[t == 1])", "FS102", 2, None),
    ("s = s.half()\ns = s.masked_fill(m, float(\"-1e9\"))", "FS203", 2, None),
    ("s = s.half()\ns = s.masked_fill(m, -float(\"1e9\"))", "FS203", 2, None),
    ("if (p := F.softmax(z, -1)) is not None:\n    y = torch.log(p)", "FS101", 2, None),
    ("a = torch.acos(torch.clamp(c, -1.0, 1.0))", "FS115", 1, None),
    ("a = torch.acos(F.cosine_similarity(u, v).clamp(-1, 1))", "FS115", 1, None),
    ("a = torch.sum(u * v, -1) / (u.norm(dim=-1) * v.norm(dim=-1))", "FS112", 1, None),
    ("p = F.softmax(z, dim=-1)\nh = -(p * torch.log(p)).sum(-1)", "FS101", 2, None),
]

SAFE = [
    "y = F.log_softmax(z, dim=-1)",
    "y = torch.log(torch.softmax(z, -1) + 1e-8)",
    "y = torch.log(F.softmax(z, -1).clamp(min=1e-12))",
    "loss = F.cross_entropy(z, t)",
    "y = F.logsigmoid(z)",
    "loss = F.binary_cross_entropy_with_logits(z, t)",
    "loss = F.binary_cross_entropy(p, t)",
    "y = torch.log(torch.sigmoid(z) + 1e-6)",
    "e = torch.exp(s - s.max(-1, keepdim=True).values)\nw = e / e.sum(-1, keepdim=True)",
    "w = torch.exp(s - torch.logsumexp(s, -1, keepdim=True))",
    "y = torch.logsumexp(x, dim=1)",
    "m = x.max()\ny = m + torch.log(torch.exp(x - m).sum())",
    "y = torch.log(p).sum(1)",
    "v = torch.var(x, 0)",
    "v = ((x - x.mean(0)) ** 2).mean(0)",
    "v = (x ** 2).mean() - y.mean() ** 2",
    "y = torch.log1p(x)",
    "y = torch.expm1(x)",
    "y = math.log(1 + 1e-3)",
    "y = torch.log(2 + x)",
    "y = torch.exp(x) - 2",
    "y = F.normalize(x, dim=-1)",
    "y = x / (x.norm(dim=-1, keepdim=True) + 1e-8)",
    "y = x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)",
    "y = loss.sum() / mask.sum().clamp(min=1)",
    "y = (x - m) / (x.std() + 1e-5)",
    "y = x / 255.0",
    "d = torch.sqrt(((a - b) ** 2).sum(-1) + 1e-8)",
    "d = torch.sqrt(torch.tensor(2.0))",
    "d = math.sqrt(d_model)",
    "d = np.sqrt(np.sum((a - b) ** 2))",
    "y = x / torch.sqrt(x.var(0) + 1e-5)",
    "y = torch.rsqrt(var + eps)",
    "a = torch.acos(torch.clamp(c, -1 + 1e-7, 1 - 1e-7))",
    "a = np.arccos(np.clip(c, -1.0, 1.0))",  # numpy: no gradient to guard
    "a = torch.acos(torch.tensor(0.5))",
    "s = s.half()\ns = s.masked_fill(m, torch.finfo(s.dtype).min)",
    "s = s.masked_fill(m, -1e9)",
    "x = x.to(torch.bfloat16)\ny = x + 1e-8",
    "x = x.half()\ny = x + 1e-3",
    "net = nn.Linear(2, 2).half()\nopt = torch.optim.Adam(net.parameters(), eps=1e-4)",
    "net = nn.Linear(2, 2)\nopt = torch.optim.Adam(net.parameters())",
    # max-subtracted of the same tensor, or an argument that is never positive
    "k = torch.exp(-d2 / (2 * sigma ** 2))\ny = k / k.sum(-1, keepdim=True)",
    "d2 = ((a - b) ** 2).sum(-1)\nk = torch.exp(-gamma * d2)\ny = k / k.sum(-1, keepdim=True)",
    "k = torch.exp(-torch.cdist(a, b).pow(2) / t)\ny = k / k.sum(-1, keepdim=True)",
    "y = torch.log1p(torch.exp(-x.abs()))",
    "y = torch.log1p(torch.exp(-F.softplus(x)))",
    "y = torch.log1p(torch.exp(-torch.relu(x)))",
    "y = torch.log(torch.exp(-0.5 * ((t - a) / b) ** 2 - s.abs()).sum(-1) + 1e-12)",
    "m, _ = s.max(-1, keepdim=True)\ne = torch.exp(s - m)\ny = e / e.sum(-1, keepdim=True)",
    "e = torch.exp(s - s.max(-1, keepdim=True)[0])\ny = e / e.sum(-1, keepdim=True)",
    "e = torch.exp(s - torch.max(s, -1, keepdim=True).values)\ny = e / e.sum(-1, keepdim=True)",
    "e = torch.exp(s - s.amax(-1, keepdim=True).detach())\ny = e / e.sum(-1, keepdim=True)",
    "s = s - s.amax(-1, keepdim=True)\ne = s.exp()\ny = e / e.sum(-1, keepdim=True)",
    "y = torch.log(torch.exp(s - torch.logsumexp(s, -1, keepdim=True)).sum(-1))",
    "e = np.exp(z - np.max(z, axis=-1, keepdims=True))\ny = e / e.sum(axis=-1, keepdims=True)",
    "s = s.half()\ns = s.masked_fill(m, float(\"-inf\"))",
    "p = F.softmax(z, -1)\nq = F.softmax(w, -1)\nkl = (p * (torch.log(p + 1e-8) - torch.log(q + 1e-8))).sum(-1)",
    # same-function guards on the denominator
    "def f(x):\n    n = x.norm()\n    if n == 0:\n        return x\n    return x / n",
    "def f(x):\n    n = x.sum()\n    if n.item() == 0:\n        raise ValueError('empty')\n    return x / n",
    "def f(xs):\n    for x in xs:\n        n = x.norm()\n        if n < 1e-12:\n            continue\n        x = x / n",
    "def f(x):\n    n = x.sum()\n    if n > 0:\n        x = x / n\n    return x",
    "def f(x):\n    std = x.std(0)\n    std[std == 0] = 1.0\n    return (x - x.mean(0)) / std",
    "def f(x):\n    std = x.std(0)\n    std = std.clamp_min(1e-6)\n    return x / std",
    "def f(x):\n    std = x.std(0)\n    std.masked_fill_(std == 0, 1)\n    return x / std",
    "def f(x):\n    std = x.std(0)\n    std = torch.where(std == 0, torch.ones_like(std), std)\n    return x / std",
    "def iou(inter, a, b):\n    union = (a + b).sum()\n    if union == 0:\n        return 0.0\n    return inter / union",
]


@pytest.mark.parametrize(("code", "rule", "line", "fix"), UNSTABLE, ids=[f"{r}-{i}" for i, (_, r, _, _) in
                                                                         enumerate(UNSTABLE)])
def test_each_rule_fires_with_its_line_and_fix(code, rule, line, fix):
    found = findings(code)
    ours = [f for f in found if f.rule == rule]
    assert [(f.rule, f.line - HEAD.count("\n")) for f in ours] == [(rule, line)], found
    f = ours[0]
    assert f.severity == RULES[rule].severity and f.file == "t.py" and f.col >= 1
    assert f.autofixable == (fix is not None)
    if fix is not None:
        assert f.fix == fix
    else:
        assert f.fix  # a suggestion is always given
    assert len(f.message) > 60 and any(ch.isdigit() for ch in f.message)  # says when it fails, with numbers


@pytest.mark.parametrize("code", SAFE)
def test_safe_look_alikes_are_not_flagged(code):
    assert findings(code) == ()


def test_messages_carry_the_numbers_of_the_failure():
    f = findings("y = torch.exp(s) / torch.exp(s).sum(-1, keepdim=True)")[0]
    assert "88.7" in f.message and "11.1" in f.message and "NaN" in f.message
    f = findings("x = x.half()\ny = x + 1e-8")[0]
    assert "6e-08" in f.message and "float16" in f.message


def test_aliases_and_from_imports():
    code = "from torch import log, softmax\nfrom torch.nn import functional as G\ny = log(softmax(z, 1))\n" \
           "w = log(G.sigmoid(z))\n"
    assert [(f.rule, f.line) for f in lint_source(code).findings] == [("FS101", 3), ("FS103", 4)]
    code = "import torch as th\nimport numpy\ny = th.log(1 + x)\nz = numpy.exp(x) - 1\n"
    found = lint_source(code).findings
    assert [(f.rule, f.fix) for f in found] == [("FS110", "th.log1p(x)"), ("FS111", "numpy.expm1(x)")]


def test_value_tracking_follows_assignments_and_respects_rebinding():
    assert rules("p = torch.softmax(z, -1)\nq = p\nr = q.view(-1)\ny = torch.log(r)") == [("FS101", 4)]
    assert rules("p = torch.softmax(z, -1)\np = p + 1e-6\ny = torch.log(p)") == []
    assert rules("def f(p):\n    return torch.log(p)\np = torch.softmax(z, -1)") == []  # a parameter shadows
    # a module-level binding is visible in a function; a module held in self.<attr> is followed
    assert rules("act = nn.Sigmoid()\ndef f(x):\n    return torch.log(act(x))") == [("FS103", 3)]
    code = """
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.sm = nn.Softmax(dim=-1)

        def forward(self, x):
            p = self.sm(x)
            return torch.log(p)
    """
    assert rules(code) == [("FS101", 9)]
    # x = x / x.sum() rebinding: the right side is judged with the old binding
    assert rules("w = torch.exp(s)\nw = w / w.sum(-1, keepdim=True)") == [("FS106", 1)]


def test_ignore_comments_and_select_ignore():
    code = "y = torch.log(1 + x)  # floatscope: ignore[FS110]\nz = torch.exp(x) - 1  # floatscope: ignore\n" \
           "w = torch.log(1 + x)  # floatscope: ignore[FS101]\n"
    assert [(f.rule, f.line - 5) for f in findings(code)] == [("FS110", 3)]
    code = "y = torch.log(1 + x)\nz = torch.exp(x) - 1\nd = x / x.norm()\n"
    assert {f.rule for f in findings(code, select=["FS11"])} == {"FS110", "FS111", "FS112"}
    assert {f.rule for f in findings(code, select=["FS11"], ignore=["FS110"])} == {"FS111", "FS112"}
    assert {f.rule for f in findings(code, select=["FS110"], ignore=["FS1"])} == {"FS110"}
    from floatscope import UsageError

    with pytest.raises(UsageError, match="FS999"):
        findings(code, select=["FS999"])


def test_syntax_error_is_a_finding_with_file_and_line(tmp_path):
    (tmp_path / "bad.py").write_text("import torch\ndef f(:\n    pass\n")
    (tmp_path / "good.py").write_text("import torch\ny = torch.log(1 + x)\n")
    result = lint_paths([str(tmp_path)], config=False)
    assert [(Path(f.file).name, f.rule, f.line) for f in result.findings] == [("bad.py", "FS001", 2),
                                                                                ("good.py", "FS110", 2)]
    assert result.files == 2 and "syntax error" in result.findings[0].message


def test_fix_rewrites_only_exact_rewrites_keeps_formatting_and_is_idempotent(tmp_path):
    source = textwrap.dedent("""\
        import torch
        import torch.nn.functional as F


        def loss(z,   t):  # odd spacing stays
            # a comment stays
            a = torch.log( 1 + z )   # trailing comment
            b = (torch.exp(z) - 1) * 2
            c = torch.log(torch.softmax(z, dim=-1))
            d = z / z.norm(dim=-1, keepdim=True)
            e = F.binary_cross_entropy(torch.sigmoid(z), t)
            return a + b + c + d + e
        """)
    path = tmp_path / "m.py"
    path.write_text(source)
    result = lint_paths([str(path)], fix=True, config=False)
    fixed = path.read_text()
    assert result.fixed == 3
    assert fixed == source.replace("torch.log( 1 + z )", "torch.log1p(z)").replace(
        "(torch.exp(z) - 1)", "(torch.expm1(z))").replace("torch.log(torch.softmax(z, dim=-1))",
                                                          "torch.log_softmax(z, dim=-1)")
    assert {f.rule for f in result.findings} == {"FS112", "FS105"}  # suggestions only: they change values
    again = lint_paths([str(path)], fix=True, config=False)
    assert again.fixed == 0 and path.read_text() == fixed
    ast.parse(fixed)


def test_variance_fix_needs_to_know_torch_from_numpy():
    found = lint_source("import torch\nv = (x ** 2).mean(0) - x.mean(0) ** 2\n").findings
    assert [(f.fix, f.autofixable) for f in found] == [("x.var(0, correction=0)", True)]
    found = lint_source("import numpy as np\nv = (x ** 2).mean(0) - x.mean(0) ** 2\n").findings
    assert [(f.fix, f.autofixable) for f in found] == [("x.var(0)", True)]


def test_fixes_compute_the_same_values():
    """Each autofix, applied to its snippet, gives the same values (float64, away from the unstable range)."""
    import numpy as np
    import torch

    from floatscope._lint.fix import apply_edits

    z = torch.tensor([[0.3, -1.2, 2.0], [1e-3, 4.0, -0.5]], dtype=torch.float64)
    checked = 0
    for code, rule, _, fix in UNSTABLE:
        if fix is None:
            continue
        source = HEAD + textwrap.dedent(code)
        edits = [f.edit for f in lint_source(source).findings if f.autofixable]
        rewritten, n = apply_edits(source, edits)
        assert n == 1 and fix in rewritten, (code, rewritten)
        results = []
        for text in (source, rewritten):
            names = {"z": z, "x": z.abs(), "s": z, "a": z, "b": z * 2, "r": 0.25, "t": torch.tensor([0, 2])}
            exec(compile(text, "<snippet>", "exec"), names)
            target = ast.parse(text).body[-1].targets[0].id
            results.append(torch.as_tensor(np.asarray(names[target]) if not isinstance(names[target], torch.Tensor)
                                           else names[target], dtype=torch.float64))
        torch.testing.assert_close(results[1], results[0], rtol=1e-12, atol=1e-12, msg=f"{rule}: {code}")
        checked += 1
    assert checked >= 15


def test_pyproject_config_select_ignore_exclude(tmp_path):
    (tmp_path / "pyproject.toml").write_text('[tool.floatscope.lint]\nignore = ["FS110"]\nexclude = ["gen/*"]\n')
    (tmp_path / "a.py").write_text("import torch\ny = torch.log(1 + x)\nz = torch.exp(x) - 1\n")
    (tmp_path / "gen").mkdir()
    (tmp_path / "gen" / "b.py").write_text("import torch\ny = torch.exp(x) - 1\n")
    result = lint_paths([str(tmp_path)])
    assert [(Path(f.file).name, f.rule) for f in result.findings] == [("a.py", "FS111")] and result.files == 1
    assert {f.rule for f in lint_paths([str(tmp_path)], config=False).findings} == {"FS110", "FS111"}
    (tmp_path / "pyproject.toml").write_text('[tool.floatscope.lint]\nselect = ["FS110"]\n')
    assert {f.rule for f in lint_paths([str(tmp_path)]).findings} == {"FS110"}
    assert {f.rule for f in lint_paths([str(tmp_path)], select=["FS111"]).findings} == {"FS111"}
    (tmp_path / "pyproject.toml").write_text('[tool.floatscope.lint]\nselct = ["FS110"]\n')
    from floatscope import UsageError

    with pytest.raises(UsageError, match="selct"):
        lint_paths([str(tmp_path)])


def test_cli_exit_codes_text_and_json(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "clean.py").write_text("import torch\ny = torch.log1p(x)\n")
    (tmp_path / "bad.py").write_text("import torch\ny = torch.log(1 + x)\nz = x / x.norm()\n")
    assert cli(["lint", "clean.py"]) == 0
    assert "no findings in 1 file" in capsys.readouterr().out
    assert cli(["lint", "bad.py", "--json", "out/r.json"]) == 1
    out = capsys.readouterr().out
    assert "bad.py:2:5: FS110 warning:" in out and "fix: torch.log1p(x)" in out and "suggested:" in out
    assert "2 findings (1 error, 1 warning) in 1 file; 1 fixable with floatscope lint --fix" in out
    data = json.loads((tmp_path / "out" / "r.json").read_text())
    assert set(data) == {"findings", "files"} and data["files"] == 1
    types = {"rule": str, "file": str, "line": int, "col": int, "severity": str, "message": str, "autofixable": bool}
    for item in data["findings"]:
        assert list(item) == ["rule", "file", "line", "col", "severity", "message", "fix", "autofixable"]
        assert all(isinstance(item[k], t) for k, t in types.items())
        assert item["fix"] is None or isinstance(item["fix"], str)
    assert [(d["rule"], d["line"], d["col"], d["autofixable"]) for d in data["findings"]] == [
        ("FS110", 2, 5, True), ("FS112", 3, 9, False)]
    assert cli(["lint", "bad.py", "--format", "json", "--select", "FS112"]) == 1
    assert [d["rule"] for d in json.loads(capsys.readouterr().out)["findings"]] == ["FS112"]
    assert cli(["lint", "bad.py", "--ignore", "FS110,FS112"]) == 0
    capsys.readouterr()
    assert cli(["lint", "missing.py"]) == 2
    err = capsys.readouterr().err
    assert err == "floatscope: error: missing.py: no such file or folder\n"
    assert cli(["lint", "bad.py", "--select", "XX1"]) == 2
    assert "XX1" in capsys.readouterr().err


def test_cli_fix_and_the_real_entry_point(tmp_path):
    (tmp_path / "m.py").write_text("import torch\ny = torch.log(1 + x)\n")
    proc = subprocess.run([sys.executable, "-m", "floatscope", "lint", "--fix", "m.py"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "fixed 1 finding; no findings in 1 file" in proc.stdout
    assert (tmp_path / "m.py").read_text() == "import torch\ny = torch.log1p(x)\n"


def test_sarif_is_2_1_0_shaped(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "bad.py").write_text("import torch\ny = torch.log(1 + x)\nz = x / x.norm()\n")
    assert cli(["lint", "--format", "sarif", "bad.py"]) == 1
    log = json.loads(capsys.readouterr().out)
    assert log["version"] == "2.1.0" and log["$schema"].endswith("sarif-2.1.0.json")
    run = log["runs"][0]
    driver = run["tool"]["driver"]
    assert driver["name"] == "floatscope" and [r["id"] for r in driver["rules"]] == list(RULES)
    for rule in driver["rules"]:
        assert {"id", "name", "shortDescription", "fullDescription", "help", "defaultConfiguration"} <= set(rule)
        assert rule["defaultConfiguration"]["level"] in ("error", "warning")
    assert [r["ruleId"] for r in run["results"]] == ["FS110", "FS112"]
    for result in run["results"]:
        assert driver["rules"][result["ruleIndex"]]["id"] == result["ruleId"]
        assert result["level"] in ("error", "warning") and result["message"]["text"]
        loc = result["locations"][0]["physicalLocation"]
        assert loc["artifactLocation"]["uri"] == "bad.py" and loc["region"]["startLine"] >= 1
        assert loc["region"]["startColumn"] >= 1
    replacement = run["results"][0]["fixes"][0]["artifactChanges"][0]["replacements"][0]
    assert replacement["insertedContent"]["text"] == "torch.log1p(x)"
    assert replacement["deletedRegion"] == {"startLine": 2, "startColumn": 5, "endLine": 2, "endColumn": 21}
    assert to_sarif(lint_source("x = 1\n"))["runs"][0]["results"] == []


def _benchmark():
    spec = importlib.util.spec_from_file_location("lint_benchmark", ROOT / "benchmarks" / "lint.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["lint_benchmark"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_corpus_precision_and_recall():
    bench = _benchmark()
    expected = bench.labels()
    unstable = [k for k, v in expected.items() if v]
    assert len(expected) >= 60 and len(expected) - len(unstable) >= len(expected) / 2
    score = bench.score(expected, bench.floatscope_findings(), strict=True)
    assert score.precision >= 0.95 and score.recall >= 0.9, score
    covered = {r for v in expected.values() for r in v}
    assert covered == {r for r in RULES if r not in ("FS001", "FS002")}  # every rule has corpus lines


def test_heldout_corpus_precision_and_recall():
    # Built by an independent tester from public code (tests/fixtures/lint_heldout/LABELS.md); scored on its own.
    bench = _benchmark()
    expected = bench.labels(bench.HELDOUT)
    assert len(expected) == 214 and sum(1 for v in expected.values() if v) == 121
    found = bench.floatscope_findings(bench.HELDOUT)
    assert not any("FS002" in rules for rules in found.values())  # the run analyses every statement
    score = bench.score(expected, found, strict=True)
    assert score.precision >= 0.95 and score.recall >= 0.9, score


def _statement_crash(monkeypatch, marker: str) -> None:
    """Make the analysis of any call whose source mentions ``marker`` raise, as a floatscope bug would."""
    from floatscope._lint import source

    real = source._Analyzer.check_call

    def check_call(self, node, env, scope):
        if marker in ast.unparse(node):
            raise IndexError("list index out of range")
        return real(self, node, env, scope)

    monkeypatch.setattr(source._Analyzer, "check_call", check_call)


def test_an_internal_error_loses_one_statement_not_the_run(tmp_path, monkeypatch, capsys):
    _statement_crash(monkeypatch, "boom")
    (tmp_path / "a.py").write_text("import torch\n\ndef f(x):\n    y = torch.log(1 + x)\n    z = boom(x)\n"
                                   "    return torch.log(torch.softmax(z, -1))\n")
    (tmp_path / "b.py").write_text("import torch\ny = x / x.norm()\n")
    result = lint_paths([str(tmp_path)], config=False)
    got = [(Path(f.file).name, f.rule, f.line) for f in result.findings]
    assert got == [("a.py", "FS110", 4), ("a.py", "FS002", 5), ("a.py", "FS101", 6), ("b.py", "FS112", 2)]
    crash = result.findings[1]
    assert crash.severity == "error" and crash.fix is None
    assert crash.message.startswith(f"floatscope could not analyse {tmp_path / 'a.py'}:5: internal error "
                                    f"IndexError: list index out of range, please report it")
    assert lint_paths([str(tmp_path)], config=False, select=["FS112"]).findings[0].rule == "FS002"  # never hidden
    monkeypatch.chdir(tmp_path)
    assert cli(["lint", "--format", "json", "a.py", "b.py"]) == 4  # not 1: floatscope failed, not only findings
    data = json.loads(capsys.readouterr().out)
    assert [(d["file"], d["rule"]) for d in data["findings"]] == [
        ("a.py", "FS110"), ("a.py", "FS002"), ("a.py", "FS101"), ("b.py", "FS112")]
    assert cli(["lint", "b.py"]) == 1


def test_an_internal_error_outside_a_statement_is_reported_too(monkeypatch):
    from floatscope._lint import source

    def broken(self, tree):
        raise KeyError("x")

    monkeypatch.setattr(source._Analyzer, "collect_imports", broken)
    got = lint_source("import torch\ny = torch.log(1 + x)\n", "t.py").findings
    assert [(f.rule, f.line) for f in got] == [("FS002", 1)] and "KeyError" in got[0].message


def test_softmax_with_axis_keyword_does_not_crash():
    # torch accepts axis= for dim=; the held-out run died with IndexError on this line
    got = findings("def f(X):\n    return torch.exp(X) / torch.exp(X).sum(axis=1, keepdim=True)")
    assert [(f.rule, f.fix) for f in got] == [("FS106", "torch.softmax(X, dim=1)")]
    got = findings("def f(X):\n    return torch.exp(X) / torch.exp(X).sum(axis=(0, 1), keepdim=True)")
    assert [f.rule for f in got] == ["FS106"] and "amax(dim=(0, 1)" in got[0].fix


@pytest.mark.parametrize(("code", "rule"), [
    ("y = torch.log(torch.exp(x) / torch.exp(x).sum(dim=1)[:, None])", "FS106"),
    ("y = x - torch.log(torch.exp(x).sum(dim=1)[:, None])", "FS107"),
    ("y = torch.exp(x) / (torch.exp(x).sum(-1)[:, None])", "FS106"),
    ("y = torch.exp(x) / torch.exp(x).sum(-1)[..., None]", "FS106"),
    ("y = torch.exp(x) / torch.exp(x).sum(-1).unsqueeze(-1).expand(-1, 4)", "FS106"),
    ("y = torch.exp(x) / torch.exp(x).sum(-1).view(-1, 1)", "FS106"),
    ("y = y / torch.norm(y, dim=-1, ).unsqueeze(-1).repeat(1, 3)", "FS112"),
    ("y = y / torch.norm(y, dim=-1).reshape(-1, 1).contiguous().detach()", "FS112"),
    ("y = y / y.norm(dim=0)[None].t()", "FS112"),
    ("y = y / y.norm(dim=0).expand_as(y).clone()", "FS112"),
    ("y = y / y.norm(dim=0).T", "FS112"),
    ("x = feat.pow(2).sum(dim=1).pow(0.5)", "FS113"),
])
def test_shape_only_ops_are_looked_through(code, rule):
    assert rule in [r for r, _ in rules(code)]


def test_an_index_that_picks_is_not_a_shape_op():
    # p[:, 0] picks a column: log of it is a cross-entropy-like pick, not a new axis
    assert [r for r, _ in rules("p = F.softmax(z, 1)\nloss = -torch.log(p[:, 0]).mean()")] == ["FS102"]


def test_a_constant_tensor_is_exempt_only_when_its_values_keep_exp_finite():
    big = "def f():\n    x = torch.tensor([1000., 1001., 1002.])\n    return torch.log(torch.exp(x).sum())"
    assert rules(big) == [("FS107", 3)]
    assert rules("y = torch.exp(torch.tensor(2.0 * 50)) / torch.exp(torch.tensor(100.)).sum()") == [("FS106", 1)]
    assert rules("def f():\n    x = torch.tensor([1., 2., 3.])\n    return torch.log(torch.exp(x).sum())") == []
    assert rules("y = torch.log(torch.exp(torch.tensor(math.log(2))).sum())") == []


def test_a_literal_times_a_name_is_not_of_known_sign():
    got = rules("y = torch.exp(-g * t * z - g * torch.log(1 + torch.exp(-1.0 * z)))")
    assert ("FS116", 1) in got and ("FS110", 1) not in got
    assert [r for r, _ in rules("y = torch.log(1 + torch.exp(2 * z))")] == ["FS116"]
    # a literal times something non-negative by its form keeps its sign
    assert [r for r, _ in rules("y = torch.log(1 + torch.exp(-1.0 * z.abs()))")] == ["FS110"]
    assert [r for r, _ in rules("y = torch.log(1 + torch.exp(-0.5 * d2))")] == ["FS110"]


def test_a_shift_by_the_max_picked_by_argmax_is_safe():
    crf = """\
        def argmax(vec):
            _, idx = torch.max(vec, 1)
            return idx.item()

        def log_sum_exp(vec):
            max_score = vec[0, argmax(vec)]
            max_score_broadcast = max_score.view(1, -1).expand(1, vec.size()[1])
            return max_score + torch.log(torch.sum(torch.exp(vec - max_score_broadcast)))
    """
    assert rules(crf) == []
    assert rules("m = x.gather(1, x.argmax(1, keepdim=True))\ny = torch.log(torch.exp(x - m).sum(1))") == []
    assert rules("m = x[0, torch.argmax(x)]\ny = torch.log(torch.exp(x - m).sum())") == []
    # the max of another tensor is not a guard
    assert rules("m = w[0, argmax(w)]\ny = torch.log(torch.exp(x - m).sum())") == [("FS107", 2)]


@pytest.mark.parametrize("cap", ["temp[temp > 20] = 20", "temp.clamp_(max=20)", "temp = temp.clamp(max=20)",
                                 "temp = torch.clamp(temp, max=20.0)", "temp.clamp_max_(20)",
                                 "temp = torch.clamp(temp, -20, 20)"])
def test_an_upper_cap_on_the_exponent_is_a_guard(cap):
    code = f"def f(x, beta):\n    temp = beta * x\n    {cap}\n    return 1.0 / beta * torch.log(1 + torch.exp(temp))"
    # no overflow left (no FS116); 1 + exp(temp) still rounds for temp below -17: the FS110 warning stays
    assert [(f.rule, f.severity, f.fix) for f in findings(code)] == [
        ("FS110", "warning", "torch.log1p(torch.exp(temp))")]


@pytest.mark.parametrize("cap", ["temp[temp > 1000] = 1000", "temp.clamp_(max=100)", "temp[temp > 20] = 200",
                                 "temp = temp.clamp(max=1e4)"])
def test_a_cap_above_exps_range_is_no_guard(cap):
    code = f"def f(x, beta):\n    temp = beta * x\n    {cap}\n    return torch.log(1 + torch.exp(temp))"
    assert [f.rule for f in findings(code)] == ["FS116"]


def test_a_cap_is_forgotten_when_the_name_is_rebound():
    code = "def f(x):\n    t = x\n    t[t > 20] = 20\n    t = x * 2\n    return torch.log(1 + torch.exp(t))"
    assert [r for r, _ in rules(code)] == ["FS116"]


def test_a_branch_ordering_the_operands_makes_the_exponent_nonpositive():
    code = """\
        def log_sum_exp2(a, b):
            if (a >= b):
                return a + torch.log(1 + torch.exp(b - a))
            else:
                return b + torch.log(1 + torch.exp(a - b))
    """
    assert [r for r, _ in rules(code)] == ["FS110", "FS110"]  # precision warnings only: no overflow
    assert [r for r, _ in rules("def f(a, b):\n    if a < b:\n        return a\n"
                                "    return torch.log(1 + torch.exp(b - a))")] == ["FS110"]
    assert [r for r, _ in rules("y = torch.log(1 + torch.exp(b - a)) if a > b else b")] == ["FS110"]
    # the wrong way round, or outside the branch, is still an overflow
    assert [r for r, _ in rules("def f(a, b):\n    if a >= b:\n        return torch.log(1 + torch.exp(a - b))")] \
        == ["FS116"]
    assert [r for r, _ in rules("def f(a, b):\n    if a >= b:\n        pass\n"
                                "    return torch.log(1 + torch.exp(b - a))")] == ["FS116"]


def test_a_conditional_expression_guards_its_branch():
    assert rules("sh = x.mean() / x.std() * np.sqrt(252) if x.std() > 0 else np.nan") == []
    assert rules("r = total / n.sum() if n.sum() != 0 else 0.0") == []
    assert rules("r = 0.0 if n.sum() == 0 else x / n.sum()") == []
    # the guard covers its own branch only
    assert [r for r, _ in rules("sh = np.nan if x.std() > 0 else x.mean() / x.std()")] == ["FS112"]
    assert [r for r, _ in rules("sh = (x.mean() / x.std() if x.std() > 0 else 0.0) + y / y.std()")] == ["FS112"]


@pytest.mark.parametrize(("name", "rule", "marker"), [
    ("log_softmax_underflow.py", "FS102", "origin: log(0)"),
    ("fp16_exp_overflow.py", "FS106", "origin: no max subtraction"),
    ("sqrt_at_zero.py", "FS113", "origin: gradient is infinite"),
    ("zero_norm_div.py", "FS112", "origin: 0/0"),
    ("adam_fp16_eps.py", "FS202", "eps=1e-8 is 0 in float16"),
])
def test_each_bundled_example_bug_is_found(name, rule, marker):
    from tests.conftest import line_of

    _, line = line_of(marker, EXAMPLES / name)
    result = lint_paths([str(EXAMPLES / name)], config=False)
    assert [(f.rule, f.line) for f in result.findings] == [(rule, line)]


def test_examples_without_a_source_pattern_are_clean():
    # These three bugs are dynamics (compounding error, overfitting), not spellings: nothing to lint.
    names = ["lstm_divergence.py", "lstm_accumulation.py", "deployment_fragility.py"]
    assert lint_paths([str(EXAMPLES / n) for n in names], config=False).findings == ()


def test_import_floatscope_stays_light():
    code = "import sys, floatscope; floatscope.lint; print('libcst' in sys.modules, 'floatscope._lint.fix' in " \
           "sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.stdout.split() == ["False", "False"], proc.stderr


def test_fix_never_keeps_an_overflow_softplus_is_a_suggestion(tmp_path):
    """log(1 + exp(-i * t)) is FS116, not an FS110 whose log1p(exp(...)) rewrite keeps the overflow."""
    source = textwrap.dedent("""\
        import torch


        def softmargin(i, t):
            return (1 + (-i * t).exp()).log()


        def softmargin2(i, t):
            return torch.log(1 + torch.exp(-i * t))


        def scaled(x):
            return torch.log(1 + 2 * torch.exp(x))
        """)
    path = tmp_path / "m.py"
    path.write_text(source)
    result = lint_paths([str(path)], fix=True, config=False)
    assert result.fixed == 0 and path.read_text() == source
    assert [(f.rule, f.line, f.autofixable) for f in result.findings] == [
        ("FS116", 5, False), ("FS116", 9, False), ("FS110", 13, False)]
    assert result.findings[0].fix == "torch.nn.functional.softplus(-i * t)"
    assert "overflows" in result.findings[2].message and "not applied by --fix" in result.findings[2].message
    path.write_text("import torch\ny = torch.log1p(torch.exp(-i * t))\n")  # what the old FS110 fix wrote
    assert [f.rule for f in lint_paths([str(path)], config=False).findings] == ["FS116"]


@pytest.mark.parametrize(("code", "why"), [
    ("y = torch.exp(z) / torch.exp(z).sum((0, 1), keepdim=True)", "softmax takes one dim"),
    ("d = (0, 1)\ny = torch.exp(z) / torch.exp(z).sum(dim=d, keepdim=True)", "a name bound to a tuple"),
    ("y = torch.exp(z) / torch.exp(z).sum([0, 1], keepdim=True)", "a list of dims"),
    ("y = torch.exp(z) / torch.exp(z).sum(-1)", "no keepdim: the division broadcasts differently"),
    ("y = torch.log(1 + z, out=o)", "out= would be dropped"),
    ("y = torch.exp(z, out=o) - 1", "out= would be dropped"),
])
def test_fix_leaves_argument_shapes_it_cannot_keep_as_suggestions(tmp_path, code, why):
    path = tmp_path / "m.py"
    path.write_text("import torch\n" + code + "\n")
    result = lint_paths([str(path)], fix=True, config=False)
    assert result.fixed == 0 and path.read_text() == "import torch\n" + code + "\n", why
    assert result.findings and not any(f.autofixable for f in result.findings), why


def test_softmax_fix_with_a_tuple_of_dims_suggests_code_that_runs():
    import torch

    f = findings("y = torch.exp(z) / torch.exp(z).sum((0, 1), keepdim=True)")[0]
    assert f.rule == "FS106" and not f.autofixable and "dim=(0, 1)" in f.fix and "softmax(z, dim=(0, 1))" not in f.fix
    z = torch.randn(2, 3, 4, dtype=torch.float64)
    names = {"torch": torch, "z": z}
    first, second = f.fix.split("; ")
    exec(first, names)
    torch.testing.assert_close(eval(second, names), torch.exp(z) / torch.exp(z).sum((0, 1), keepdim=True))


def test_fix_keeps_comments_inside_a_multiline_call(tmp_path):
    source = "import torch\nw = torch.log(\n    1 + x  # inner comment\n)\nv = torch.log(1 + x)  # after\n"
    path = tmp_path / "m.py"
    path.write_text(source)
    result = lint_paths([str(path)], fix=True, config=False)
    assert path.read_text() == source.replace("torch.log(1 + x)  # after", "torch.log1p(x)  # after")
    assert result.fixed == 1
    [left] = result.findings
    assert (left.rule, left.line, left.autofixable, left.fix) == ("FS110", 2, False, "torch.log1p(x)")
    assert "#" not in left.message and "inner comment" not in left.message
    assert left.message.startswith("torch.log( 1 + x ):") and "comment inside" in left.message
    from floatscope._lint.fix import apply_edits
    from floatscope._lint.results import Edit

    # an edit over a span with a comment is refused by the rewriter too, not only by the rules
    assert apply_edits(source, [Edit(2, 4, 4, 1, "torch.log1p(x)")]) == (source, 0)


def test_suggestions_use_the_library_and_the_dim_in_the_code():
    found = lint_source("import numpy as np\ne = np.exp(z)\np = e / e.sum(axis=-1, keepdims=True)\n"
                        "y = np.log(p)\n").findings
    assert [(f.rule, f.fix) for f in found] == [
        ("FS106", "scipy.special.softmax(z, axis=-1), or e = np.exp(z - z.max(axis=-1, keepdims=True)); "
                  "e / e.sum(axis=-1, keepdims=True)"),
        ("FS101", "scipy.special.log_softmax(z, axis=-1)")]
    assert not any("F." in f.fix or "torch" in f.fix for f in found)
    found = lint_source("import numpy as np\ne = np.exp(z)\np = e / e.sum(1, keepdims=True)\n"
                        "y = -np.log(p[np.arange(4), t])\n").findings
    assert found[1].rule == "FS102" and found[1].fix.startswith("scipy.special.log_softmax(z, axis=1)")
    assert "cross_entropy" not in found[1].message
    code = """
    e = torch.exp(s)
    w = e / e.sum(2, keepdim=True)
    y = torch.log(w)
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.sm = nn.Softmax(dim=1)

        def forward(self, x):
            return torch.log(self.sm(x))
    """
    assert [(f.rule, f.fix) for f in findings(code)] == [("FS106", "torch.softmax(s, dim=2)"),
                                                         ("FS101", "F.log_softmax(s, dim=2)"),
                                                         ("FS101", "F.log_softmax(x, dim=1)")]
    assert not any("..." in (f.fix or "") for f in findings(code))


def test_entropy_of_a_softmax_is_fs101_with_an_entropy_rewrite():
    [f] = findings("p = F.softmax(z, dim=-1)\nh = -(p * torch.log(p)).sum(-1)")
    assert f.rule == "FS101" and "entropy" in f.message and "target" not in f.message
    assert "F.log_softmax(z, dim=-1)" in f.fix and "Categorical(logits=z).entropy()" in f.fix
    # p * log(q) with q another softmax is not an entropy: targets times log-probabilities
    [g] = findings("p = F.softmax(z, dim=-1)\nq = F.softmax(w, dim=-1)\nh = -(p * torch.log(q)).sum(-1)")
    assert g.rule == "FS102"


def test_acos_of_a_clamp_at_one_says_the_clamp_must_be_inside():
    [f] = findings("a = torch.acos(torch.clamp(c, -1.0, 1.0))")
    assert "strictly inside (-1, 1)" in f.message and "gradient" in f.message
    assert f.fix.startswith("torch.acos(c.clamp(-1 + 1e-7, 1 - 1e-7))")
    assert findings("a = torch.acos(torch.clamp(c, -0.999999, 0.999999))") == ()


def test_division_message_says_inf_when_the_numerator_is_another_tensor():
    same = findings("y = x / x.norm(dim=-1, keepdim=True)")[0].message
    assert "0 / 0 = NaN in the forward" in same and "inf" not in same
    other = findings("n = mask.sum()\nloss = total / n")[0].message
    assert "0 / 0 = NaN (or x / 0 = inf)" in other


def test_guards_only_cover_the_name_they_check():
    assert rules("def f(x, m):\n    n = x.norm()\n    if m == 0:\n        return x\n    return x / n") == [
        ("FS112", 5)]
    assert rules("def f(x):\n    n = x.norm()\n    if n == 0:\n        print(n)\n    return x / n") == [("FS112", 5)]
    assert rules("def f(x):\n    n = x.norm()\n    if n == 0:\n        return x\n    n = x.sum()\n"
                 "    return x / n") == [("FS112", 6)]  # rebound after the guard
    assert rules("def f(x):\n    n = x.norm()\n    if n == 0:\n        return x\n\n\ndef g(x):\n    n = x.norm()\n"
                 "    return x / n") == [("FS112", 9)]  # another function


def test_pyproject_select_as_a_string(tmp_path, capsys):
    (tmp_path / "a.py").write_text("import torch\ny = torch.log(1 + x)\nz = torch.exp(x) - 1\nd = x / x.norm()\n")
    (tmp_path / "pyproject.toml").write_text('[tool.floatscope.lint]\nselect = "FS110"\n')
    assert {f.rule for f in lint_paths([str(tmp_path)]).findings} == {"FS110"}
    (tmp_path / "pyproject.toml").write_text('[tool.floatscope.lint]\nselect = "FS110, FS111"\n')
    assert {f.rule for f in lint_paths([str(tmp_path)]).findings} == {"FS110", "FS111"}
    (tmp_path / "pyproject.toml").write_text('[tool.floatscope.lint]\nselect = ""\n')
    assert cli(["lint", str(tmp_path)]) == 2
    assert "select is empty" in capsys.readouterr().err
    (tmp_path / "pyproject.toml").write_text('[tool.floatscope.lint]\nselect = "FS9"\n')
    assert cli(["lint", str(tmp_path)]) == 2
    assert "FS9" in capsys.readouterr().err


def test_sarif_uris_are_repository_relative(tmp_path, monkeypatch):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "bad.py").write_text("import torch\ny = torch.log(1 + x)\n")
    monkeypatch.chdir(tmp_path)
    run = to_sarif(lint_paths([str(tmp_path / "pkg")], config=False))["runs"][0]
    location = run["results"][0]["locations"][0]["physicalLocation"]["artifactLocation"]
    assert location == {"uri": "pkg/bad.py", "uriBaseId": "%SRCROOT%"}
    assert run["originalUriBaseIds"]["%SRCROOT%"]["uri"] == tmp_path.resolve().as_uri() + "/"
    assert run["results"][0]["fixes"][0]["artifactChanges"][0]["artifactLocation"] == location
    monkeypatch.chdir(tmp_path / "pkg")
    outside = to_sarif(lint_source("import torch\ny = torch.log(1 + x)\n", str(tmp_path / "elsewhere.py")))
    uri = outside["runs"][0]["results"][0]["locations"][0]["physicalLocation"]["artifactLocation"]["uri"]
    assert uri == (tmp_path / "elsewhere.py").as_uri()
