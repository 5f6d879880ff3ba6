"""The run store for live jobs: readers while a run writes, many writers, honest statuses, exit
codes, the schema's versions, and the messages. Multi-process tests start real ``floatscope run``
processes; every wait is bounded so a hang fails fast.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

import floatscope.runs as fr
from floatscope import StoreError
from floatscope.runs import RunStore, StoreMissing

CLI = [sys.executable, "-m", "floatscope"]
FIXTURE = Path(__file__).parent / "fixtures" / "store_v1.sqlite"
FIXTURE_V2 = Path(__file__).parent / "fixtures" / "store_v2.sqlite"  # _train_fixture_runs, by version 2

# Trains STEPS steps (0: until told to stop), printing each (flushed), sleeping PAUSE between them.
SLOW = """
import sys, time
import torch
torch.manual_seed(0)
model = torch.nn.Linear(4, 1)
opt = torch.optim.SGD(model.parameters(), lr=0.01)
steps, pause = int(sys.argv[1]), float(sys.argv[2])  # steps 0: until a file "stop" appears (at most 2 min)
import os
deadline = time.monotonic() + 120
step = -1
while (step + 1 < steps) if steps else not os.path.exists("stop") and time.monotonic() < deadline:
    step += 1
    loss = model(torch.randn(8, 4)).pow(2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    print("step", step, flush=True)
    time.sleep(pause)
"""


def cli(*args: str, cwd: Path, timeout: float = 60, env: dict[str, str] | None = None
        ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def start(tmp_path: Path, *args: str) -> subprocess.Popen[str]:
    # faulthandler: a run that hangs is stopped with SIGABRT by finish(), which then shows where it was
    return subprocess.Popen([*CLI, "run", *args], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "PYTHONFAULTHANDLER": "1"})


def wait_for_step(proc: subprocess.Popen[str], step: int, timeout: float = 60) -> None:
    """Read the script's stdout until it printed ``step N`` (the process keeps running)."""
    deadline = time.monotonic() + timeout
    assert proc.stdout is not None
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        if line.strip() == f"step {step}":
            return
    proc.kill()
    raise AssertionError(f"the run never reached step {step}: {proc.stderr.read() if proc.stderr else ''}")


def finish(proc: subprocess.Popen[str], timeout: float = 60) -> tuple[int, str, str]:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGABRT)  # faulthandler writes every thread's Python stack to stderr
        try:
            _, err = proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
        raise AssertionError(f"the run did not end within {timeout} s; its stacks:\n{err[-6000:]}") from None
    return proc.returncode, out, err


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --------------------------------------------------------------------------- readers while a run writes
def test_readers_answer_while_a_run_writes(tmp_path):
    (tmp_path / "slow.py").write_text(SLOW)
    proc = start(tmp_path, "slow.py", "0", "0.02")
    try:
        wait_for_step(proc, 20)
        store = tmp_path / ".floatscope" / "runs.sqlite"
        for command in (["runs"], ["runs", "--json", "runs.json"], ["show", "last"], ["health", "last"],
                        ["report", "last", "-o", "r.html"]):
            answer = cli(*command, cwd=tmp_path, timeout=30)
            assert answer.returncode == 0, (command, answer.stderr)
            assert "locked" not in answer.stderr + answer.stdout
            assert proc.poll() is None, "the run ended before the readers were done: make it longer"
        listing = json.loads((tmp_path / "runs.json").read_text())["runs"]
        assert [(r["status"], r["pid"]) for r in listing] == [("running", proc.pid)]
        live = fr.load_run("last", store=store)
        assert live.status == "running" and live.steps >= 20  # progress is committed while it trains
        assert "still running" in cli("show", "last", cwd=tmp_path).stdout
    finally:
        (tmp_path / "stop").write_text("")
        finish(proc)


# --------------------------------------------------------------------------- many writers
def test_eight_concurrent_runs_in_one_folder_record_everything(tmp_path):
    (tmp_path / "slow.py").write_text(SLOW)
    procs = [start(tmp_path, "--json", f"r{i}.json", "slow.py", "30", "0.01") for i in range(8)]
    results = [finish(p, timeout=180) for p in procs]
    for code, _, err in results:
        assert code == 0, err
        assert "locked" not in err and "unwatched" not in err
    runs = fr.list_runs(tmp_path / ".floatscope" / "runs.sqlite")
    assert len(runs) == 8
    assert {r.status for r in runs} == {"clean"} and {r.steps for r in runs} == {30}
    assert len({r.pid for r in runs}) == 8
    for r in runs:
        steps = fr.steps(r.id, store=tmp_path / ".floatscope" / "runs.sqlite")
        assert [s.step for s in steps] == list(range(30))
    ids = {json.loads((tmp_path / f"r{i}.json").read_text())["run_id"] for i in range(8)}
    assert ids == {r.id for r in runs}


def test_a_writer_waits_for_another_writers_transaction_and_loses_nothing(tmp_path):
    path = tmp_path / "s.sqlite"
    a = RunStore(path, commit_interval=0.0)
    run = a.new_run(name="a")
    blocker = sqlite3.connect(str(path), isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")  # another process inside a transaction
    a.busy_timeout = 0.2
    a._db.execute("PRAGMA busy_timeout=200")
    a.add_step(run, 0, loss=1.0, grad_norm=1.0, loss_scale=None, skipped=False)  # kept: the lock is taken
    time.sleep(0.3)
    with pytest.warns(RuntimeWarning, match="has been locked by another process"):
        a.add_step(run, 1, loss=2.0, grad_norm=1.0, loss_scale=None, skipped=False)
    blocker.execute("COMMIT")
    blocker.close()
    a.add_step(run, 2, loss=3.0, grad_norm=1.0, loss_scale=None, skipped=False)
    a.close()
    assert [s.step for s in fr.steps(run, store=path)] == [0, 1, 2]


def test_training_goes_on_while_another_process_holds_the_store_lock(tmp_path):
    # A periodic commit that finds the lock taken keeps its rows and tries later: the steps go on.
    (tmp_path / "slow.py").write_text(SLOW)
    RunStore(tmp_path / "s.sqlite").close()
    proc = start(tmp_path, "--store", "s.sqlite", "slow.py", "0", "0.02")
    wait_for_step(proc, 3)
    blocker = sqlite3.connect(str(tmp_path / "s.sqlite"), isolation_level=None)
    blocker.execute("BEGIN EXCLUSIVE")
    held_from = time.monotonic()
    assert proc.stdout is not None
    during = 0
    while time.monotonic() - held_from < 3.0:
        if proc.stdout.readline().startswith("step"):
            during += 1
    blocker.execute("COMMIT")
    blocker.close()
    (tmp_path / "stop").write_text("")
    code, _, err = finish(proc)
    assert code == 0, err
    assert during >= 10, f"only {during} steps ran while the lock was held"
    [record] = fr.list_runs(tmp_path / "s.sqlite")
    assert record.status == "clean"
    assert [s.step for s in fr.steps(record.id, store=tmp_path / "s.sqlite")] == list(range(record.steps))


# --------------------------------------------------------------------------- honest statuses
@pytest.mark.parametrize("sig, status, code", [(signal.SIGINT, "interrupted", 130),
                                               (signal.SIGTERM, "terminated", 143)])
def test_a_signal_ends_the_run_with_its_status_and_keeps_what_it_recorded(tmp_path, sig, status, code):
    (tmp_path / "slow.py").write_text(SLOW)
    proc = start(tmp_path, "--json", "r.json", "slow.py", "0", "0.01")
    wait_for_step(proc, 12)
    proc.send_signal(sig)
    returncode, _, err = finish(proc)
    assert returncode == code, err
    run = fr.load_run("last", store=tmp_path / ".floatscope" / "runs.sqlite")
    assert (run.status, run.exit_code) == (status, code)
    assert run.steps >= 13 and run.ended is not None
    assert len(fr.steps(run.id, store=tmp_path / ".floatscope" / "runs.sqlite")) >= 13
    result = json.loads((tmp_path / "r.json").read_text())
    assert (result["status"], result["exit_code"]) == (status, code)


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
def test_a_killed_run_is_reported_died_by_readers(tmp_path):
    (tmp_path / "slow.py").write_text(SLOW)
    proc = start(tmp_path, "slow.py", "0", "0.01")
    wait_for_step(proc, 10)
    time.sleep(0.6)  # past one commit interval
    proc.kill()
    finish(proc)
    store = tmp_path / ".floatscope" / "runs.sqlite"
    run = fr.load_run("last", store=store)
    assert (run.status, run.recorded_status, run.ended) == ("died", "running", None)
    assert run.steps >= 10 and len(fr.steps(run.id, store=store)) >= 10
    listing = cli("runs", "--json", "l.json", cwd=tmp_path)
    assert listing.returncode == 0
    assert json.loads((tmp_path / "l.json").read_text())["runs"][0]["status"] == "died"


def test_a_running_record_of_a_reused_pid_is_died(tmp_path):
    path = tmp_path / "s.sqlite"
    with RunStore(path) as store:
        run = store.new_run(name="x")
        store._live.clear()  # as seen from another process
        store._db.execute("UPDATE runs SET proc_start='1' WHERE id=?", (run,))  # this pid, another process
        assert store.get(run).status == "died"
        store._db.execute("UPDATE runs SET host='elsewhere', heartbeat=? WHERE id=?", (time.time(), run))
        assert store.get(run).status == "running"  # another host with a fresh heartbeat
        store._db.execute("UPDATE runs SET heartbeat=? WHERE id=?", (time.time() - 3600, run))
        assert store.get(run).status == "died"


# --------------------------------------------------------------------------- exit codes
SCRIPT_EXIT = """
import sys
import torch
loss = torch.nn.Linear(2, 1)(torch.ones(1, 2)).sum()
loss.backward()
sys.exit(CODE)
"""


def test_a_scripts_own_exit_status_never_reads_as_an_incident(tmp_path):
    (tmp_path / "s.py").write_text(SCRIPT_EXIT.replace("CODE", "3"))
    proc = cli("run", "--no-store", "--json", "r.json", "s.py", cwd=tmp_path)
    assert proc.returncode == 1 and "reserves for a NaN/Inf incident" in proc.stderr
    result = json.loads((tmp_path / "r.json").read_text())
    assert (result["status"], result["exit_code"], result["script_exit_code"]) == ("error", 1, 3)
    (tmp_path / "s4.py").write_text(SCRIPT_EXIT.replace("CODE", "4"))
    assert cli("run", "--no-store", "s4.py", cwd=tmp_path).returncode == 4


def test_the_incident_exit_status_can_be_chosen(tmp_path):
    (tmp_path / "nan.py").write_text("import torch\nx = torch.zeros(3, requires_grad=True)\n"
                                     "loss = (x / x).sum()\nloss.backward()\n")
    proc = cli("run", "--no-store", "--incident-exit-code", "42", "--json", "r.json", "nan.py", cwd=tmp_path)
    assert proc.returncode == 42, proc.stderr
    assert json.loads((tmp_path / "r.json").read_text())["status"] == "nonfinite"
    (tmp_path / "s.py").write_text(SCRIPT_EXIT.replace("CODE", "42"))
    assert cli("run", "--no-store", "--incident-exit-code", "42", "s.py", cwd=tmp_path).returncode == 1
    for reserved in ("130", "1", "0"):
        bad = cli("run", "--no-store", "--incident-exit-code", reserved, "nan.py", cwd=tmp_path)
        assert bad.returncode == 2 and "choose a status" in bad.stderr, reserved


def test_every_exit_status_is_in_the_help():
    proc = subprocess.run([*CLI, "run", "--help"], capture_output=True, text=True, timeout=60)
    for code in ("0 ", "1 ", "2 ", "3 ", "130", "143"):
        assert f"\n  {code}" in proc.stdout, code
    top = subprocess.run([*CLI, "--help"], capture_output=True, text=True, timeout=60).stdout
    assert "130" in top and "143" in top


# --------------------------------------------------------------------------- runs, --json, messages
def test_runs_on_a_missing_store_is_no_runs_and_creates_nothing(tmp_path):
    proc = cli("runs", "--store", "empty.sqlite", "--json", "l.json", cwd=tmp_path)
    assert proc.returncode == 0 and "no runs yet" in proc.stdout
    assert not (tmp_path / "empty.sqlite").exists()
    assert json.loads((tmp_path / "l.json").read_text()) == {"runs": []}
    for command in (["show", "last"], ["health", "last"], ["report", "last"]):
        answer = cli(*command, "--store", "empty.sqlite", cwd=tmp_path)
        assert answer.returncode == 2 and "no runs yet" in answer.stderr, command
        assert not (tmp_path / "empty.sqlite").exists()
    assert fr.list_runs(tmp_path / "empty.sqlite") == []


def test_runs_json_schema_and_a_table_that_fits_100_columns(tmp_path):
    (tmp_path / "slow.py").write_text(SLOW)
    for _ in range(2):
        assert cli("run", "slow.py", "3", "0", cwd=tmp_path).returncode == 0
    proc = cli("runs", "--json", "l.json", cwd=tmp_path, env={"COLUMNS": "100"})
    assert proc.returncode == 0
    lines = proc.stdout.splitlines()
    assert lines and max(len(line) for line in lines) <= 100, proc.stdout
    runs = json.loads((tmp_path / "l.json").read_text())["runs"]
    assert len(runs) == 2
    for r in runs:
        assert set(r) == {"run_id", "name", "status", "steps", "started", "ended", "host", "pid", "command"}
        assert (r["status"], r["steps"], r["name"]) == ("clean", 3, "slow")
        assert isinstance(r["pid"], int) and r["ended"] and r["command"].startswith("floatscope run slow.py")
        assert datetime.datetime.fromisoformat(r["started"]).tzinfo is not None
        assert r["run_id"] in proc.stdout


def test_json_paths_are_checked_before_the_script_runs(tmp_path):
    (tmp_path / "side_effect.py").write_text("open('ran.txt', 'w').write('yes')\n")
    (tmp_path / "adir").mkdir()
    proc = cli("run", "--no-store", "--json", "adir", "side_effect.py", cwd=tmp_path)
    assert proc.returncode == 2 and "is a folder" in proc.stderr
    assert not (tmp_path / "ran.txt").exists()
    # A missing folder is created, by every command alike.
    assert cli("run", "--no-store", "--json", "new/deeper/r.json", "side_effect.py", cwd=tmp_path).returncode == 0
    assert (tmp_path / "new" / "deeper" / "r.json").exists()
    assert cli("runs", "--json", "other/l.json", cwd=tmp_path).returncode == 0
    assert (tmp_path / "other" / "l.json").exists()
    # A path no one can create, even where os.access says yes (root on /proc), is refused first too.
    if Path("/proc/self").exists():
        (tmp_path / "ran.txt").unlink()
        proc = cli("run", "--no-store", "--json", "/proc/floatscope.json", "side_effect.py", cwd=tmp_path)
        assert proc.returncode == 2 and "cannot create the file" in proc.stderr, proc.stderr
        assert not (tmp_path / "ran.txt").exists()


def test_a_locked_store_is_busy_not_corrupt(tmp_path):
    path = tmp_path / "s.sqlite"
    RunStore(path).close()
    blocker = sqlite3.connect(str(path), isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    try:
        with pytest.raises(StoreError) as info:
            RunStore(path, busy_timeout=0.2)
        assert "busy" in str(info.value) and "corrupt" not in str(info.value)
        with RunStore(path, readonly=True) as reader:  # readers are not blocked by the writer's lock
            assert reader.runs() == []
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()


def test_a_corrupt_file_and_another_programs_database_are_named(tmp_path):
    (tmp_path / "junk.sqlite").write_bytes(b"not a database at all" * 100)
    with pytest.raises(StoreError, match="corrupt or another program's file"):
        RunStore(tmp_path / "junk.sqlite", readonly=True)
    other = sqlite3.connect(str(tmp_path / "other.sqlite"))
    other.execute("CREATE TABLE customers (id INTEGER)")
    other.commit()
    other.close()
    with pytest.raises(StoreError, match="not a floatscope run store"):
        RunStore(tmp_path / "other.sqlite", readonly=True)


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root ignores file permissions")
def test_a_read_only_location_is_said_so(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    shutil.copy(FIXTURE, folder / "runs.sqlite")
    folder.chmod(0o555)
    try:
        assert len(fr.list_runs(folder / "runs.sqlite")) == 2  # readers still read it
        with pytest.raises(StoreError, match="read-only"):
            RunStore(folder / "runs.sqlite")
    finally:
        folder.chmod(0o755)


# --------------------------------------------------------------------------- the schema's versions
def test_the_version_1_fixture_store_is_read_by_this_version(tmp_path):
    path = tmp_path / "v1.sqlite"
    shutil.copy(FIXTURE, path)
    before = digest(path)
    runs = {r.name: r for r in fr.list_runs(path)}
    assert set(runs) == {"clean-v1", "nan-v1"}
    clean, bad = runs["clean-v1"], runs["nan-v1"]
    assert (clean.status, clean.steps, clean.incident) == ("clean", 6, None)
    assert (bad.status, bad.steps, bad.incident.phase) == ("nonfinite", 4, "optimizer")
    assert clean.pid is None and clean.host is None  # version 1 did not record them
    steps = fr.steps(clean.id, store=path)
    assert [s.step for s in steps] == list(range(6)) and all(s.loss is not None for s in steps)
    acts, params = fr.activations(clean.id, store=path), fr.params(clean.id, store=path)
    assert {a.layer for a in acts} == {"0", "1", "2"} and {a.step for a in acts} == {0, 2, 4}
    assert all(p.grad_norm is not None and p.grad_norm > 0 for p in params if p.name.endswith("weight"))
    config = fr.config(clean.id, store=path)
    assert config.model is not None and config.model.type == "Sequential"
    assert config.fingerprint_params == ["0.weight", "0.bias", "2.weight", "2.bias"]
    assert fr.findings(clean.id, store=path) == []
    assert fr.diff(clean.id, clean.id, store=path).identical
    assert digest(path) == before  # reading never wrote


def test_a_writer_migrates_a_version_1_store_and_keeps_its_runs(tmp_path):
    path = tmp_path / "v1.sqlite"
    shutil.copy(FIXTURE, path)
    with RunStore(path) as store:
        assert store.version == fr.SCHEMA_VERSION == 3
        new = store.new_run(name="after-migration")
        store.finish_run(new, status="clean", steps=0, skipped_steps=0, result=None)
    names = [r.name for r in fr.list_runs(path)]
    assert sorted(names) == ["after-migration", "clean-v1", "nan-v1"]
    db = sqlite3.connect(str(path))
    assert db.execute("PRAGMA user_version").fetchone()[0] == 3
    db.close()


def _train_fixture_runs(path: Path) -> None:
    """The two runs of the version 2 fixture (written by floatscope with store version 2)."""
    import torch

    import floatscope

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 8), torch.nn.ReLU(),
                                torch.nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with floatscope.watch(model, opt, store=path, health_every=2, run_name="clean-v2"):
        for _ in range(6):
            loss = model(torch.randn(8, 4)).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    torch.manual_seed(1)  # float16 parameters: the param records hold flush fractions (dicts)
    half = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1)).half()
    opt = torch.optim.SGD(half.parameters(), lr=0.01)
    with floatscope.watch(half, opt, store=path, health_every=2, run_name="half-v2"):
        for _ in range(4):
            loss = half(torch.randn(8, 4).half()).float().pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()


def _everything(path: Path) -> dict[str, tuple]:
    with fr.open_store(path) as store:
        return {r.name: (store.activations(r.id), store.params(r.id), store.fingerprints(r.id, "grad"),
                         store.fingerprints(r.id, "weight")) for r in fr.list_runs(path)}


def _rewrite(stored: dict[str, tuple], path: Path) -> None:
    """Write the samples read from a store again, with this version's writer."""
    from floatscope._store.schema import ActivationSample, ParamSample

    with RunStore(path) as store:
        for name, (acts, params, grads, weights) in stored.items():
            run = store.new_run(name=name)
            for kind, samples, fields in (("activation", acts, list(ActivationSample.FIELDS)),
                                          ("param", params, list(ParamSample.FIELDS))):
                for step in sorted({x.step for x in samples}):
                    rows = [x for x in samples if x.step == step]
                    store.add_health(run, step, kind, fields, [getattr(x, "layer", None) or x.name for x in rows],
                                     [[getattr(x, f) for x in rows] for f in fields])
            for kind, prints in (("grad", grads), ("weight", weights)):
                for step, values in prints.items():
                    store.add_fingerprint(run, step, kind, [float(v) for v in values])
            store.finish_run(run, status="clean", steps=0, skipped_steps=0, result=None)


def _shape(samples: list) -> list:
    """What a sample holds, without its values (these depend on the CPU's kernels)."""
    return [(x.step, getattr(x, "layer", None) or x.name, getattr(x, "type", None), getattr(x, "dtype", None),
             tuple(getattr(x, f) is None for f in x.FIELDS if f not in ("type", "dtype"))) for x in samples]


def test_version_3_packs_health_and_fingerprints_and_reads_back_what_version_2_stored(tmp_path):
    # The fixture holds these runs as version 2 wrote them (JSON numbers); this version writes them packed.
    old = tmp_path / "v2.sqlite"
    shutil.copy(FIXTURE_V2, old)
    before = digest(old)
    stored = _everything(old)
    assert digest(old) == before  # reading never wrote
    packed = tmp_path / "packed.sqlite"
    _rewrite(stored, packed)
    assert _everything(packed) == stored  # the same samples, value for value
    new = tmp_path / "v3.sqlite"
    _train_fixture_runs(new)  # the same runs trained again: the same layers, steps and measured fields
    trained = _everything(new)
    assert {k: [_shape(v[0]), _shape(v[1])] for k, v in trained.items()} == \
        {k: [_shape(v[0]), _shape(v[1])] for k, v in stored.items()}
    half = stored["half-v2"]
    assert half[1][0].grad_flush_frac == {"1": 0.0, "16": 0.0, "256": 0.0, "4096": 0.0, "65536": 0.0}
    assert {a.type for a in stored["clean-v2"][0]} == {"Linear", "Tanh", "ReLU"}
    db = sqlite3.connect(str(new))
    rows = [json.loads(data) for (data,) in db.execute("SELECT data FROM health WHERE kind='activations'")]
    fingerprint = db.execute("SELECT data FROM fingerprints").fetchone()[0]
    db.close()
    assert all(c is None for row in rows for c in row["columns"][:9])  # the numbers, packed in "f8"
    assert {row["columns"][9]["all"] for row in rows} == {"float32", "float16"}  # one dtype per run
    assert json.loads(fingerprint).keys() == {"f8"}
    # A writer migrates the version 2 file and appends packed rows next to its JSON ones.
    with RunStore(old) as store:
        assert store.version == 3
    _train_fixture_runs(old)
    runs = fr.list_runs(old)
    assert sorted(r.name for r in runs) == ["clean-v2", "clean-v2", "half-v2", "half-v2"]
    with fr.open_store(old) as store:
        for r in runs:  # the version 2 rows and the packed ones, side by side in one file
            assert _shape(store.activations(r.id)) == _shape(stored[r.name][0])
            assert _shape(store.params(r.id)) == _shape(stored[r.name][1])


def test_packed_columns_keep_none_and_read_non_finite_numbers_as_json_rows_did():
    from floatscope._store.schema import pack_columns, unpack_columns, pack_floats, unpack_floats

    values = [0.1, -2.5e-300, 3.4028234663852886e38, float("nan"), float("inf"), -float("inf"), 0.0, 7]
    assert unpack_floats(pack_floats(values))[:3] == values[:3]  # exact
    table = json.loads(json.dumps(pack_columns(
        ["x", "n", "t", "d", "e", "s"], ["a", "b"],
        [[1.5, None], [float("nan"), float("-inf")], ["float16", "float32"], [{"1": float("nan")}, None],
         [None, {"16": 0.5}], ["Linear", "Linear"]])))
    assert table["columns"][-1] == {"all": "Linear"}
    assert unpack_columns(table) == [
        ("a", {"x": 1.5, "n": None, "t": "float16", "d": {"1": None}, "e": None, "s": "Linear"}),
        ("b", {"x": None, "n": None, "t": "float32", "d": None, "e": {"16": 0.5}, "s": "Linear"})]


def test_a_packed_layout_stores_what_pack_columns_stores_and_refuses_a_wrong_count():
    from floatscope._store.schema import PackedLayout, pack_columns, unpack_columns

    fields, layers = ["x", "n", "t", "s"], ["a", "b", "c"]
    x, n = [1.5, float("nan"), -2.0], [float("inf"), 0.0, 1e-300]
    others = [["float16", "float32", "float16"], ["Linear"] * 3]
    layout = PackedLayout(fields, layers, 2, others)
    packed = json.loads(layout.pack(x + n))
    assert packed == json.loads(json.dumps(pack_columns(fields, layers, [x, n, *others])))
    assert unpack_columns(packed)[0] == ("a", {"x": 1.5, "n": None, "t": "float16", "s": "Linear"})
    with pytest.raises(ValueError, match="5 numbers for a layout of 6"):
        layout.pack(x + n[:2])
    with pytest.raises(ValueError, match="4 fields but 1 numeric and 2 other"):
        PackedLayout(fields, layers, 1, others)


def test_a_store_from_a_newer_floatscope_is_refused_with_the_fix(tmp_path):
    path = tmp_path / "s.sqlite"
    RunStore(path).close()
    db = sqlite3.connect(str(path))
    db.execute("PRAGMA user_version=99")
    db.commit()
    db.close()
    for readonly in (True, False):
        with pytest.raises(StoreError, match="newer floatscope.*Upgrade"):
            RunStore(path, readonly=readonly)


def test_the_public_api_reads_a_run_the_watch_recorded(tmp_path):
    import torch

    import floatscope

    path = tmp_path / "s.sqlite"
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with floatscope.watch(model, opt, store=path, health_every=2, run_name="api") as w:
        for _ in range(5):
            loss = model(torch.randn(8, 4)).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    with fr.open_store(path) as store:
        run = store.get("last")
        assert (run.id, run.name, run.status, run.steps) == (w.run_id, "api", "clean", 5)
        assert [s.step for s in store.steps(run.id)] == [0, 1, 2, 3, 4]
        assert {a.step for a in store.activations(run.id)} == {0, 2, 4}
        assert {p.name for p in store.params(run.id)} == {"0.weight", "0.bias", "2.weight", "2.bias"}
        assert store.config(run.id).model.parameters["0.weight"] == ([8, 4], "float32")
        assert store.events(run.id) == []
    with pytest.raises(StoreMissing):
        fr.open_store(tmp_path / "missing.sqlite")
