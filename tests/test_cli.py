"""The command line: exit codes, JSON, the store commands, crash durability, the demo."""

from __future__ import annotations

import json
import re
import signal
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import floatscope.runs as fr

CLI = [sys.executable, "-m", "floatscope"]


def floatscope(*args: str, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout)


def write(path: Path, source: str) -> Path:
    path.write_text(textwrap.dedent(source))
    return path


TRAIN = """
import sys
import torch
torch.manual_seed(0)
model = torch.nn.Linear(4, 2)
opt = torch.optim.SGD(model.parameters(), lr=0.1)
steps = int(sys.argv[1]) if len(sys.argv) > 1 else 5
for step in range(steps):
    x = torch.randn(8, 4) * (1e30 if step == BAD else 1.0)
    loss = model(x).pow(2).mean()  # MARK
    opt.zero_grad()
    loss.backward()
    opt.step()
    print("step", step, flush=True)
"""


def test_clean_script_exits_0_and_records_the_run(tmp_path):
    script = write(tmp_path / "train.py", TRAIN.replace("BAD", "-1"))
    proc = floatscope("run", "--json", "out.json", "train.py", "3", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "step 2" in proc.stdout and "step 3" not in proc.stdout  # ARGS reached the script
    result = json.loads((tmp_path / "out.json").read_text())
    assert result["status"] == "clean" and result["steps"] == 3 and result["incident"] is None
    assert fr.load_run(result["run_id"], store=tmp_path / ".floatscope" / "runs.sqlite").status == "clean"
    assert script.exists()


def test_incident_exits_3_with_json_diagnosis(tmp_path):
    write(tmp_path / "train.py", TRAIN.replace("BAD", "2"))
    proc = floatscope("run", "--json", "out.json", "train.py", cwd=tmp_path)
    assert proc.returncode == 3, proc.stderr
    assert "step 2" not in proc.stdout  # stopped at the incident
    incident = json.loads((tmp_path / "out.json").read_text())["incident"]
    assert incident["op"] == "aten.pow.Tensor_Scalar" and incident["phase"] == "forward"
    assert incident["step"] == 2 and incident["line"] == 10
    assert incident["file"] == str((tmp_path / "train.py").resolve())
    assert set(incident) >= {"kind", "backward_node", "module", "param", "category", "explanation", "suggestions",
                             "operands"}
    assert incident["operands"][0]["dtype"] == "float32"
    assert "aten.pow.Tensor_Scalar" in proc.stderr and "overflow" in proc.stderr


def test_keep_going_lets_the_script_finish(tmp_path):
    write(tmp_path / "train.py", TRAIN.replace("BAD", "1"))
    proc = floatscope("run", "--keep-going", "--json", "o.json", "train.py", "4", cwd=tmp_path)
    assert proc.returncode == 3
    assert "step 3" in proc.stdout
    assert json.loads((tmp_path / "o.json").read_text())["incident"]["step"] == 1


def test_script_errors_keep_their_traceback_and_status(tmp_path):
    write(tmp_path / "broken.py", "import torch\nx = torch.ones(2)\nraise KeyError('missing column')\n")
    proc = floatscope("run", "--json", "o.json", "broken.py", cwd=tmp_path)
    assert proc.returncode == 1
    assert "broken.py\", line 3" in proc.stderr and "KeyError: 'missing column'" in proc.stderr
    assert "floatscope/_cli" not in proc.stderr
    assert json.loads((tmp_path / "o.json").read_text())["status"] == "error"
    write(tmp_path / "exits.py", "import sys\nsys.exit(5)\n")
    assert floatscope("run", "exits.py", cwd=tmp_path).returncode == 5


def test_bad_cli_input_is_one_line_and_exit_2(tmp_path):
    proc = floatscope("run", "missing.py", cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "missing.py" in proc.stderr and "Traceback" not in proc.stderr
    proc = floatscope("run", "--max-consecutive-skips", "0", "x.py", cwd=tmp_path)
    assert proc.returncode == 2
    assert floatscope("show", "nothing", cwd=tmp_path).returncode == 2


def test_corrupt_and_foreign_stores_are_clear_errors(tmp_path):
    write(tmp_path / "train.py", TRAIN.replace("BAD", "-1"))
    (tmp_path / "junk.sqlite").write_bytes(b"this is not a database at all" * 100)
    proc = floatscope("run", "--store", "junk.sqlite", "train.py", cwd=tmp_path)
    assert proc.returncode == 2 and "not a readable floatscope run store" in proc.stderr
    assert "Traceback" not in proc.stderr
    db = sqlite3.connect(tmp_path / "other.sqlite")
    db.execute("CREATE TABLE customers (id INTEGER)")
    db.commit()
    db.close()
    proc = floatscope("runs", "--store", "other.sqlite", cwd=tmp_path)
    assert proc.returncode == 2 and "not a floatscope run store" in proc.stderr


def test_runs_and_show_reprint_the_diagnosis(tmp_path):
    write(tmp_path / "train.py", TRAIN.replace("BAD", "2"))
    run = floatscope("run", "--json", "o.json", "train.py", cwd=tmp_path)
    run_id = json.loads((tmp_path / "o.json").read_text())["run_id"]
    listing = floatscope("runs", cwd=tmp_path)
    assert listing.returncode == 0 and run_id in listing.stdout and "nonfinite" in listing.stdout
    shown = floatscope("show", run_id[:10], "--json", "again.json", cwd=tmp_path)
    assert shown.returncode == 3
    squeezed = re.sub(r"[\s│]", "", shown.stdout)  # long paths wrap inside the panel
    assert "aten.pow.Tensor_Scalar" in shown.stdout and "train.py:10" in squeezed
    assert json.loads((tmp_path / "again.json").read_text())["incident"]["line"] == 10
    assert run.returncode == 3
    # STORE:RUN, as health, report and diff take it, from another folder
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    store = tmp_path / ".floatscope" / "runs.sqlite"
    by_path = floatscope("show", f"{store}:last", cwd=elsewhere)
    assert by_path.returncode == 3 and run_id in by_path.stdout and "aten.pow.Tensor_Scalar" in by_path.stdout


def test_a_diff_of_a_run_with_itself_says_so(tmp_path):
    write(tmp_path / "train.py", TRAIN.replace("BAD", "-1"))
    assert floatscope("run", "train.py", cwd=tmp_path).returncode == 0
    proc = floatscope("diff", "last", "last", cwd=tmp_path)
    assert proc.returncode == 0 and "A and B are the same run" in proc.stdout


def test_determinism_names_the_module_or_says_there_is_none(tmp_path):
    write(tmp_path / "model.py", """
        import torch

        def make():
            torch.manual_seed(0)
            return torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 8)), (
                torch.randn(512, 64),)
    """)
    proc = floatscope("determinism", "model.py:make", "--backward", "--json", "d.json", cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "module 'None'" not in proc.stdout
    data = json.loads((tmp_path / "d.json").read_text())
    assert [s["setting"].split()[0] for s in data["settings"]] == ["repeat", "threads", "reduction-order"]
    for s in data["settings"]:
        assert set(s) == {"setting", "identical", "ops_compared", "first_op", "first_op_index", "module", "phase",
                          "max_ulp", "max_abs", "on_nondeterministic_list", "fixed_by_seed_everything", "note"}
        if not s["identical"]:
            where = f"module '{s['module']}'" if s["module"] else ("root" if s["module"] == "" else "outside any module")
            assert where in proc.stdout


def test_determinism_calls_a_dropout_mask_a_random_draw_not_reassociation(tmp_path):
    write(tmp_path / "drop.py", """
        import torch

        def make():
            torch.manual_seed(0)
            model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.Dropout(0.5), torch.nn.ReLU(),
                                        torch.nn.Linear(256, 4)).train()
            return model, (torch.randn(32, 64),)
    """)
    proc = floatscope("determinism", "drop.py:make", "--json", "d.json", cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr
    permuted = [s for s in json.loads((tmp_path / "d.json").read_text())["settings"]
                if s["setting"].startswith("reduction-order")][0]
    assert permuted["first_op"].startswith("aten.bernoulli") and permuted["max_ulp"] is None
    assert "RNG stream" in permuted["note"] and "associative" not in permuted["note"]
    assert "a different random draw" in proc.stdout


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
def test_kill_9_keeps_what_was_committed(tmp_path):
    write(tmp_path / "killed.py", """
        import os, signal, time
        import torch
        model = torch.nn.Linear(4, 1)
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        for step in range(8):
            loss = model(torch.randn(8, 4)).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            if step == 5:
                time.sleep(0.7)
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    proc = floatscope("run", "killed.py", cwd=tmp_path)
    assert proc.returncode == -signal.SIGKILL
    store = tmp_path / ".floatscope" / "runs.sqlite"
    record = fr.list_runs(store)[0]
    assert (record.status, record.recorded_status) == ("died", "running")  # its pid is gone
    assert len(fr.steps(record.id, store=store)) >= 6
    shown = floatscope("show", "last", cwd=tmp_path)
    assert shown.returncode == 0 and "the process died" in shown.stdout


def test_demo_diagnoses_every_bundled_example(tmp_path):
    proc = floatscope("demo", cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    for name, op in [("lstm_divergence", "aten.pow"), ("log_softmax_underflow", "aten.log.default"),
                     ("fp16_exp_overflow", "aten.exp.default"), ("sqrt_at_zero", "aten.sqrt"),
                     ("zero_norm_div", "aten.div.Tensor"), ("adam_fp16_eps", "Adam.step")]:
        section = out[out.index(name):]
        assert op in section[:3000], f"{name}: {op} not in its diagnosis"
    assert "missed" not in out
    runs = fr.list_runs(tmp_path / ".floatscope" / "runs.sqlite")
    assert len(runs) == 6 and all(r.status == "nonfinite" for r in runs)
    ops = {r.name: r.incident.op for r in runs}
    assert ops["demo:fp16_exp_overflow"] == "aten.exp.default"
    assert ops["demo:sqrt_at_zero"] == "aten.sqrt.default"
    assert ops["demo:adam_fp16_eps"] == "Adam.step"
    assert {r.incident.phase for r in runs} == {"forward", "backward", "optimizer"}


def test_import_has_no_side_effects():
    code = textwrap.dedent("""
        import sys
        import torch
        from torch.nn.modules import module as m
        from torch.optim import optimizer as o
        before = (dict(m._global_forward_hooks), dict(m._global_forward_pre_hooks), dict(o._global_optimizer_pre_hooks))
        import floatscope
        after = (dict(m._global_forward_hooks), dict(m._global_forward_pre_hooks), dict(o._global_optimizer_pre_hooks))
        assert before == after
        assert len(torch.overrides._get_current_function_mode_stack()) == 0
        heavy = [n for n in ("rich", "plotly", "onnx", "onnxruntime", "jinja2", "transformers") if n in sys.modules]
        assert not heavy, heavy
        print("ok")
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.stdout.strip() == "ok", proc.stderr


@pytest.mark.parametrize("body, expected", [
    ("x = torch.ones(2)\n", 0),
    ("raise ValueError('bad config')\n", 1),
    ("m = torch.nn.Linear(2, 2)\nm(torch.full((1, 2), float('nan'))).sum().backward()\n"
     "torch.optim.SGD(m.parameters(), lr=1.0).step()\n", 3),
])
def test_run_leaves_no_trace_in_process(tmp_path, capsys, body, expected):
    from conftest import torch_global_state
    from floatscope._cli.run import run_script

    script = write(tmp_path / "s.py", "import torch\n" + body)
    before_state, argv, path = torch_global_state(), sys.argv[:], sys.path[:]
    code, result = run_script(script, ["--flag"], store=None)
    assert code == expected
    assert torch_global_state() == before_state
    assert sys.argv == argv and sys.path == path
