"""The study's Optuna record in real databases: an Optuna TPE + ASHA study on a real Ray writes PRUNED and
COMPLETE trials with per-epoch intermediate values into SQLite (``optuna.db``), agreeing with results.csv
trial by trial; importances computed from that finished study; the same study kind recorded in a real
PostgreSQL 15 server that the test starts on 127.0.0.1 in a temporary folder; bad storage URLs refused
before Ray starts; a password in the storage URL (a role the server checks with scram-sha-256) reaches no
file of the study, no pickle and no console line, and a resume reads it from PGPASSFILE. (A killed driver
resumed from the database: tests/ray/test_study_ray.py.)
"""
from __future__ import annotations

import json
import os
import pickle
import shutil
import stat
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from study import run
from study.results.importance import MIN_COMPLETE, study_importance
from helpers import free_port, read_csv, write_space

pytestmark = pytest.mark.usefixtures("ray_env")
PG_BIN = Path("/usr/lib/postgresql/15/bin")
REPO = Path(__file__).resolve().parents[2]
STATE_OF = {"TERMINATED": "COMPLETE", "STOPPED": "PRUNED", "ERROR": "FAIL"}
PG_ROLE, PG_PASSWORD = "moreid", "pw-Zq7Xk2Lm9Vb4sRt"  # a role that must give its password (scram-sha-256)


def optuna_space(folder: Path, name: str, epochs: int, trials: int, **fields) -> Path:
    # lr up to 0.1: the large ones spoil the tiny network within its first steps, so that rung values
    # differ (from 1e-6 to 3e-3 the epoch-1 mAPs of these 2-step trials are all within a point, and
    # TPE's seeded start-up happened to hand them out in increasing order: ASHA stopped none).
    params = {"optim.lr": {"type": "loguniform", "low": 1e-6, "high": 1e-1},
              "loss.name": {"type": "choice", "values": ["triplet", "he"]}}
    return write_space(folder, name, epochs, params, searcher={"type": "optuna", "seed": 0}, num_samples=trials,
                       **fields)


@pytest.fixture(scope="module")
def asha_study(tmp_path_factory):
    """A finished Optuna TPE + ASHA study of 6 tiny trials (2 epochs, rung at epoch 1), SQLite record."""
    folder = tmp_path_factory.mktemp("asha")
    space = optuna_space(folder, "tpe_asha", 2, 6, scheduler={"type": "asha", "grace_epochs": 1, "reduction_factor": 2},
                         # one at a time: the rung sees trials in TPE's (seeded) order
                         resources={"max_concurrent": 1, "workers_per_trial": 1, "cpus_per_worker": 1})
    start = time.time()
    code = run.main([str(space), "--storage", str(folder / "studies")])
    print(f"TPE + ASHA study of 6 trials: {time.time() - start:.0f} s")
    assert code == 0
    return folder / "studies" / "tpe_asha"


def test_asha_study_records_pruned_and_complete_trials(asha_study, capsys):
    url = f"sqlite:///{asha_study}/optuna.db"
    assert optuna.get_all_study_names(url) == ["tpe_asha"]  # one cell: named after the study
    study = optuna.load_study(study_name="tpe_asha", storage=url)
    trials = study.get_trials()
    rows = {r["trial_id"]: r for r in read_csv(asha_study / "results.csv")}
    by_tune = {t.user_attrs["tune_trial_id"]: t for t in trials}
    assert len(trials) == 6 and set(by_tune) == set(rows)  # no duplicate, none missing
    for tune_id, trial in by_tune.items():
        row = rows[tune_id]
        assert trial.state.name == STATE_OF[row["status"]], (row, trial)
        # per-epoch intermediate values: the mAP evaluated at each epoch the trial ran
        assert sorted(trial.intermediate_values) == list(range(1, int(row["epochs"]) + 1))
        assert trial.user_attrs["epochs"] == int(row["epochs"])
        assert trial.value == pytest.approx(float(row["final_mAP"]), abs=1e-3)
        assert trial.user_attrs["best_mAP"] == pytest.approx(float(row["best_mAP"]), abs=1e-3)
        assert float(row["optim.lr"]) == pytest.approx(trial.params["optim.lr"])
        assert row["loss.name"] == trial.params["loss.name"]
    states = [t.state for t in trials]
    pruned, complete = states.count(TrialState.PRUNED), states.count(TrialState.COMPLETE)
    print(f"ASHA study: {pruned} PRUNED, {complete} COMPLETE")
    assert pruned >= 1 and complete >= 1 and pruned + complete == 6
    assert all(t.intermediate_values[t.last_step] == t.value for t in trials)  # a pruned trial: its last mAP
    report = (asha_study / "results.md").read_text()
    assert "## Parameter importances (Optuna)" in report and "### tpe_asha" in report


def test_importances_from_the_finished_study(asha_study):
    study = optuna.load_study(study_name="tpe_asha", storage=f"sqlite:///{asha_study}/optuna.db")
    complete = len(study.get_trials(states=(TrialState.COMPLETE,)))
    found = study_importance(study, min_complete=2)
    print(f"importances over {complete} complete trials: {found.importances or found.reason}")
    assert found.counts["COMPLETE"] == complete and sum(found.counts.values()) == 6
    if found.importances:
        assert set(found.importances) <= {"optim.lr", "loss.name"}
        assert sum(found.importances.values()) == pytest.approx(1.0)
        assert list(found.importances.values()) == sorted(found.importances.values(), reverse=True)
    else:  # all complete trials happened to share one loss and lr is continuous: cannot happen
        pytest.fail(found.reason)
    report = (asha_study / "results.md").read_text()
    if complete >= MIN_COMPLETE:
        assert "![importances tpe_asha](plots/importance_00_tpe_asha.png)" in report
        assert (asha_study / "plots" / "importance_00_tpe_asha.png").stat().st_size > 1000
    else:
        assert f"importances need at least {MIN_COMPLETE}" in report


# ---- PostgreSQL -----------------------------------------------------------------------------------------

def _as_postgres() -> list[str]:
    """initdb and postgres refuse to run as root: run them as the postgres user then."""
    return ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []


@pytest.fixture()
def postgres():
    """A PostgreSQL 15 server on 127.0.0.1 in a temporary folder; yields the URL of its superuser (trust
    authentication). Role PG_ROLE, owner of the database, must give PG_PASSWORD (scram-sha-256)."""
    if not (PG_BIN / "initdb").is_file():
        pytest.fail(f"PostgreSQL 15 is not installed ({PG_BIN}/initdb missing): .ci/run installs postgresql-15")
    folder = Path(tempfile.mkdtemp(prefix="moreid-pg-", dir="/tmp"))
    if os.geteuid() == 0:
        shutil.chown(folder, "postgres", "postgres")
    data, port = folder / "data", free_port()
    log = folder / "server.log"
    prefix = _as_postgres()
    subprocess.run([*prefix, str(PG_BIN / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres",
                    "--no-sync", "-E", "UTF8"], check=True, capture_output=True, timeout=120)
    hba = data / "pg_hba.conf"  # the first matching line applies: PG_ROLE's password is checked
    hba.write_text(f"host all {PG_ROLE} 127.0.0.1/32 scram-sha-256\n" + hba.read_text())
    server = subprocess.Popen([*prefix, str(PG_BIN / "postgres"), "-D", str(data), "-p", str(port), "-k", str(folder),
                               "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 60
        while subprocess.run([str(PG_BIN / "pg_isready"), "-h", "127.0.0.1", "-p", str(port)],
                             capture_output=True).returncode != 0:
            assert server.poll() is None and time.time() < deadline, "PostgreSQL did not start"
            time.sleep(0.3)
        subprocess.run([str(PG_BIN / "psql"), "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "-c",
                        f"CREATE ROLE {PG_ROLE} LOGIN PASSWORD '{PG_PASSWORD}'"],
                       check=True, capture_output=True, timeout=60)
        subprocess.run([str(PG_BIN / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "postgres",
                        "-O", PG_ROLE, "optuna"], check=True, capture_output=True, timeout=60)
        yield f"postgresql+psycopg2://postgres@127.0.0.1:{port}/optuna"
    finally:
        server.terminate()  # smart shutdown; the test's connections are closed by then
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        shutil.rmtree(folder, ignore_errors=True)


def test_study_recorded_in_postgresql(tmp_path, postgres, capsys):
    space = write_space(tmp_path, "pg", 1, {"optim.lr": {"type": "loguniform", "low": 1e-5, "high": 1e-3},
                                            "framework.name": {"type": "grid", "values": ["baseline", "moreid"]}},
                        searcher={"type": "optuna", "seed": 0}, num_samples=1)
    start = time.time()
    assert run.main([str(space), "--storage", str(tmp_path / "studies"), "--optuna-storage", postgres]) == 0
    print(f"study recorded in PostgreSQL: {time.time() - start:.0f} s")
    out = capsys.readouterr().out
    assert f"optuna-dashboard {postgres}" in out
    assert not (tmp_path / "studies" / "pg" / "optuna.db").exists()
    names = sorted(optuna.get_all_study_names(postgres))
    assert names == ["pg [framework.name=baseline]", "pg [framework.name=moreid]"]  # one study per grid cell
    rows = {r["trial_id"]: r for r in read_csv(tmp_path / "studies" / "pg" / "results.csv")}
    for name in names:
        study = optuna.load_study(study_name=name, storage=postgres)
        (trial,) = study.get_trials()
        assert study.user_attrs["framework.name"] == name.split("=")[1].rstrip("]")
        row = rows[trial.user_attrs["tune_trial_id"]]
        assert trial.state == TrialState.COMPLETE and row["status"] == "TERMINATED"
        assert row["framework.name"] == study.user_attrs["framework.name"]
        assert trial.value == pytest.approx(float(row["final_mAP"]), abs=1e-3)
        assert trial.intermediate_values == {1: trial.value}
    # The same name again in the same database is refused (it would mix two studies' trials).
    again = run.main([str(space), "--storage", str(tmp_path / "other"), "--optuna-storage", postgres])
    assert again == 2 and "already holds the study 'pg [framework.name=baseline]'" in capsys.readouterr().err


def test_unreachable_or_unknown_storage_is_refused_before_ray(tmp_path, capsys):
    space = optuna_space(tmp_path, "bad", 1, 1)
    port = free_port()  # nothing listens there
    for url, words in ((f"postgresql+psycopg2://postgres@127.0.0.1:{port}/optuna", "Connection refused"),
                       ("nosuchdb://x", "Can't load plugin")):
        assert run.main([str(space), "--storage", str(tmp_path / "studies"), "--optuna-storage", url]) == 2
        captured = capsys.readouterr()
        assert f"cannot open the Optuna storage {url}" in captured.err and words in captured.err
        assert "Ray started" not in captured.out
    assert not (tmp_path / "studies" / "bad" / "study.json").exists()


def _holding(folder: Path, secret: bytes) -> list[str]:
    """Every file under ``folder`` (binary ones too: pickles) whose bytes hold ``secret``."""
    return [str(p) for p in folder.rglob("*") if p.is_file() and not p.is_symlink() and secret in p.read_bytes()]


def _pgpass(folder: Path, url: str, password: str | None) -> Path:
    """A libpq password file for ``url``'s host and port (0600, as libpq demands); ``password`` None: an
    empty file."""
    port = url.rsplit(":", 1)[1].split("/")[0]
    path = folder / "pgpass"
    path.write_text(f"127.0.0.1:{port}:optuna:{PG_ROLE}:{password}\n" if password else "")
    path.chmod(0o600)
    return path


def test_password_reaches_no_file_pickle_or_console_line(tmp_path, postgres, capsys, monkeypatch):
    """--optuna-storage with a password: the password is used (the server demands it) but reaches no
    console line, no file of the study folder (study.json, Tune's pickles, the searcher state, results,
    TensorBoard) and no Optuna record. The study folder, and the storage root it made, are owner-only, its
    checkpoints 0600. A resume without the password reads it from PGPASSFILE; without it, it is refused."""
    secret = PG_PASSWORD.encode()
    monkeypatch.setenv("PGPASSFILE", str(_pgpass(tmp_path, postgres, None)))  # no password from a file here
    monkeypatch.delenv("PGPASSWORD", raising=False)
    with_password = postgres.replace("postgres@", f"{PG_ROLE}:{PG_PASSWORD}@")
    without = postgres.replace("postgres@", f"{PG_ROLE}@")
    space = write_space(tmp_path, "pw", 2, {"optim.lr": {"type": "grid", "values": [1e-4]}})
    root = tmp_path / "studies"
    start = time.time()
    assert run.main([str(space), "--storage", str(root), "--optuna-storage", with_password]) == 0
    captured = capsys.readouterr()
    with capsys.disabled():
        print(f"study with a password URL: {time.time() - start:.0f} s")
    study = root / "pw"
    assert PG_PASSWORD not in captured.out + captured.err
    assert f"optuna-dashboard {without}" in captured.out  # the URL that works with a password file
    assert (study / "tuner.pkl").is_file() and list(study.glob("searcher-state-*.pkl"))  # the pickles exist
    assert _holding(study, secret) == []
    assert json.loads((study / "study.json").read_text())["optuna_storage"] == without
    (trial,) = optuna.load_study(study_name="pw", storage=with_password).get_trials()
    assert trial.state == TrialState.COMPLETE and PG_PASSWORD not in repr(trial.user_attrs)

    # Owner-only: the storage root the study made, the study folder, no group/world-writable entry,
    # checkpoints 0600.
    assert stat.S_IMODE(root.stat().st_mode) == 0o700 and stat.S_IMODE(study.stat().st_mode) == 0o700
    assert [str(p) for p in study.rglob("*") if p.stat().st_mode & 0o022] == []
    checkpoints = list(study.rglob("checkpoint.pt"))
    assert checkpoints and {stat.S_IMODE(p.stat().st_mode) for p in checkpoints} == {0o600}

    # A new driver (a fresh process: the first one's memory is gone) resuming with the URL study.json holds,
    # without the password: refused when nothing gives it (one line, exit 2, before Ray) ...
    resume = [sys.executable, "-m", "study.run", str(space), "--storage", str(root), "--resume"]
    env = {k: v for k, v in os.environ.items() if k != "PGPASSWORD"}
    refused = subprocess.run(resume, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    lines = refused.stderr.strip().splitlines()
    assert refused.returncode == 2 and len(lines) == 1, refused.stderr[-3000:]
    assert "cannot open the Optuna storage" in lines[0] and "password" in lines[0], lines[0]
    # ... and carried on when libpq reads it from PGPASSFILE.
    env["PGPASSFILE"] = str(_pgpass(tmp_path, postgres, PG_PASSWORD))
    start = time.time()
    resumed = subprocess.run([*resume, "--optuna-storage", without], cwd=REPO, env=env, capture_output=True,
                             text=True, timeout=300)
    with capsys.disabled():
        print(f"resumed in a new driver with PGPASSFILE: {time.time() - start:.0f} s")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming the study" in resumed.stdout and PG_PASSWORD not in resumed.stdout + resumed.stderr
    assert _holding(study, secret) == []

    # The same study with the password in the URL again: the URLs match once the password is stripped.
    assert run.main([str(space), "--storage", str(root), "--resume", "--optuna-storage", with_password]) == 0
    captured = capsys.readouterr()
    assert PG_PASSWORD not in captured.out + captured.err and _holding(study, secret) == []

    # A pickle of the study that another user could have rewritten is not unpickled: exit 2 naming it.
    pickled = sorted(study.glob("searcher-state-*.pkl"))[-1]
    pickled.chmod(pickled.stat().st_mode | stat.S_IWGRP)
    assert run.main([str(space), "--storage", str(root), "--resume"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{pickled} is writable by other users" in err, err


def test_wrong_or_unreachable_password_url_is_one_line_without_the_password(tmp_path, postgres, capsys,
                                                                            monkeypatch):
    monkeypatch.setenv("PGPASSFILE", str(_pgpass(tmp_path, postgres, None)))
    space = write_space(tmp_path, "pwbad", 1, {"optim.lr": {"type": "grid", "values": [1e-4]}})
    port = free_port()  # nothing listens there
    unreachable = f"postgresql+psycopg2://{PG_ROLE}:{PG_PASSWORD}@127.0.0.1:{port}/optuna"
    wrong = postgres.replace("postgres@", f"{PG_ROLE}:{PG_PASSWORD}x@")
    for url, words in ((unreachable, "Connection refused"), (wrong, "password authentication failed")):
        assert run.main([str(space), "--storage", str(tmp_path / "studies"), "--optuna-storage", url]) == 2
        captured = capsys.readouterr()
        assert captured.err.count("\n") == 1 and words in captured.err, captured.err
        assert PG_PASSWORD not in captured.out + captured.err
        assert f"{PG_ROLE}:***@127.0.0.1" in captured.err  # masked, as SQLAlchemy's hide_password
    assert not (tmp_path / "studies" / "pwbad" / "study.json").exists()


def test_pickled_record_holds_no_password_and_opens_with_it_in_memory(postgres):
    from study.search.optuna_record import OptunaRecord

    record = OptunaRecord(postgres.replace("postgres@", f"{PG_ROLE}:{PG_PASSWORD}@"), ["r"], "max")
    record.create([{}])
    data = pickle.dumps(record)
    assert PG_PASSWORD.encode() not in data and record.url == postgres.replace("postgres@", f"{PG_ROLE}@")
    assert pickle.loads(data).existing() == ["r"]  # this process was given the password: it opens


# ---- the dashboards, as a person sees them in a browser -------------------------------------------------

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
# Every text node under ``arguments[0]`` (default: the page), through shadow roots and into slotted content.
DEEP_TEXT = """
const out = [];
(function walk(node) {
  if (node.nodeType === 3) { const t = node.textContent.trim(); if (t) out.push(t); return; }
  if (node.shadowRoot) walk(node.shadowRoot);
  for (const child of node.childNodes) walk(child);
})(arguments[0] || document.body);
return out;"""
# TensorBoard's HParams table (a vaadin-grid): its rows as lists of cell texts, the header row first.
HPARAMS_ROWS = """
let grid = null;
(function find(node) {
  if (grid || node.nodeType !== 1 && node.nodeType !== 11) return;
  if (node.tagName === 'VAADIN-GRID' && node.classList.contains('session-group-table')) { grid = node; return; }
  if (node.shadowRoot) find(node.shadowRoot);
  for (const child of node.children) find(child);
})(document.body);
if (!grid) return [];
return [...grid.shadowRoot.querySelectorAll('tr')].map(tr => [...tr.querySelectorAll('th, td')].map(cell => {
  const slot = cell.querySelector('slot');
  const content = slot ? slot.assignedElements()[0] : null;
  return content ? content.innerText.trim() : '';
})).filter(cells => cells.some(text => text));"""


def _browser_or_fail() -> None:
    """Debian's chromium and chromium-driver: installed by .ci/run; installed here when missing and this
    process may (root with apt-get); otherwise the test fails saying so (never skipped)."""
    if CHROMIUM.is_file() and CHROMEDRIVER.is_file():
        return
    reason = ""
    if os.geteuid() == 0 and shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        done = subprocess.run("apt-get update -qq && apt-get install -y -qq chromium chromium-driver", shell=True,
                              env=env, capture_output=True, text=True, timeout=900)
        if done.returncode == 0 and CHROMIUM.is_file() and CHROMEDRIVER.is_file():
            return
        reason = f": apt-get failed ({done.stderr.strip()[-300:]})"
    pytest.fail(f"Debian's chromium and chromium-driver are not installed and cannot be installed "
                f"here{reason or ' (not root, or no apt-get)'}; run .ci/run or apt-get install them")


def _serve(command: list[str], port: int, log: Path) -> subprocess.Popen:
    server = subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT)
    deadline = time.time() + 120
    while True:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return server
        if server.poll() is not None or time.time() > deadline:
            server.kill()
            raise AssertionError(f"{command[0]} did not start: {log.read_text()[-2000:]}")
        time.sleep(0.3)


def _wait_for(driver, script: str, ready, timeout: float = 90.0, *args):
    deadline = time.time() + timeout
    while True:
        value = driver.execute_script(script, *args)
        if ready(value) or time.time() > deadline:
            return value
        time.sleep(0.5)


@pytest.fixture()
def browser():
    _browser_or_fail()
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1600,900", "--hide-scrollbars"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def _screenshot(driver, name: str, tmp_path: Path) -> None:
    """Into $MOREID_SCREENSHOTS (docs/img when refreshing the README's pictures), else the test's folder."""
    folder = Path(os.environ.get("MOREID_SCREENSHOTS") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    driver.save_screenshot(str(folder / name))


def test_dashboards_in_a_real_browser(asha_study, browser, tmp_path):
    rows = read_csv(asha_study / "results.csv")
    bin_dir = Path(sys.executable).parent
    tb_port, od_port = free_port(), free_port()
    url = f"sqlite:///{asha_study}/optuna.db"
    servers = [
        _serve([str(bin_dir / "tensorboard"), "--logdir", str(asha_study / "tensorboard"), "--host", "127.0.0.1",
                "--port", str(tb_port)], tb_port, tmp_path / "tensorboard.log"),
        _serve([str(bin_dir / "optuna-dashboard"), url, "--host", "127.0.0.1", "--port", str(od_port)], od_port,
               tmp_path / "optuna-dashboard.log")]
    try:
        # TensorBoard's HPARAMS table: one row per trial, its searched values and its mAP; mAP the first metric.
        browser.get(f"http://127.0.0.1:{tb_port}/#hparams")
        table = _wait_for(browser, HPARAMS_ROWS, lambda t: len(t) == len(rows) + 1)
        _screenshot(browser, "tensorboard_hparams.png", tmp_path)
        header, *lines = table
        assert header[:1] == ["Trial ID"] and {"loss.name", "optim.lr"} <= set(header), header
        metrics = [h for h in header if h in ("mAP", "best mAP", "R1", "mINP", "loss")]
        assert metrics[0] == "mAP" and "lr" not in header and "epoch_s" not in header
        assert "data.dataset" not in header and "train.seed" not in header  # constant: not columns
        shown = {line[0]: dict(zip(header, line)) for line in lines}
        for row in rows:
            (name,) = [n for n in shown if f"lr={float(row['optim.lr']):.3g}" in n and f"name={row['loss.name']}" in n]
            assert shown[name]["loss.name"] == row["loss.name"]
            assert float(shown[name]["optim.lr"]) == pytest.approx(float(row["optim.lr"]), rel=1e-3)
            assert float(shown[name]["mAP"]) == pytest.approx(float(row["final_mAP"]), abs=2e-3)
        assert all(n[:3].isdigit() for n in shown)  # readable run names: "001 lr=... name=..."
        browser.get(f"http://127.0.0.1:{tb_port}/#scalars&tagFilter=eval%2FmAP")
        texts = _wait_for(browser, DEEP_TEXT, lambda t: all(any(n in x for x in t) for n in shown))
        assert all(any(n in x for x in texts) for n in shown), "SCALARS does not list the readable run names"
        _screenshot(browser, "tensorboard_scalars.png", tmp_path)

        # optuna-dashboard: the study, then its trials with their states.
        study_id = optuna.storages.RDBStorage(url).get_study_id_from_name("tpe_asha")
        browser.get(f"http://127.0.0.1:{od_port}/dashboard")
        assert "tpe_asha" in _wait_for(browser, DEEP_TEXT, lambda t: "tpe_asha" in t)
        browser.get(f"http://127.0.0.1:{od_port}/dashboard/studies/{study_id}/trials")
        expected = {t.number: t.state.name.capitalize()
                    for t in optuna.load_study(study_name="tpe_asha", storage=url).get_trials()}

        def listed(texts: list[str]) -> dict[int, str]:
            return {int(t.split()[1]): texts[i + 1] for i, t in enumerate(texts[:-1])
                    if t.startswith("Trial ") and t.split()[1].isdigit() and len(t.split()) == 2}

        texts = _wait_for(browser, DEEP_TEXT, lambda t: listed(t) == expected)
        assert listed(texts) == expected and {"Complete", "Pruned"} <= set(expected.values())
        _screenshot(browser, "optuna_dashboard_trials.png", tmp_path)
        browser.get(f"http://127.0.0.1:{od_port}/dashboard/studies/{study_id}")
        time.sleep(3)  # the history and intermediate-value plots draw after the data arrives
        _screenshot(browser, "optuna_dashboard_study.png", tmp_path)
    finally:
        for server in servers:
            server.terminate()
            try:
                server.wait(timeout=10)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
