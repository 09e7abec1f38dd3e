"""Studies on a multi-node Ray cluster on this machine: a head and two worker nodes on 127.0.0.1, each a
separate `ray start --block` process (its own raylet and dashboard agent, 1 CPU, a `moreid-node` label, free
ports chosen here), stopped by process id. Studies are run as a user runs them: `python -m study.run ...
--address 127.0.0.1:<port>` in a separate process.

- a study stored in a folder only the driver sees (a tmpfs mounted over it in the driver's own mount
  namespace) is refused before any trial starts, naming the nodes that cannot see it;
- a study of two 2-worker DDP trials (gloo; 1-CPU nodes, so the two ranks of a trial always run on two
  nodes): a worker node hosting a rank of the first trial is killed (its processes, by pid) during epoch 2;
  the trial resumes from its epoch-1 checkpoint on the nodes left. Then the driver is killed during the
  second trial and the study resumed with --resume. One row per trial, none re-run, TensorBoard complete.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import pandas as pd
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from helpers import REPO, free_port, process_tree, read_csv, stop_leftovers, trial_progress, write_space

LABEL = "moreid-node"
START_TIMEOUT_S = 240  # per attempt: a node that is up but slow is waited for; one past Ray's own deadlines exits


class LocalCluster:
    """A head and worker nodes, each a `ray start --block` process; ``nodes`` maps a node's label to its
    process, ``node_ids`` its label to its Ray node id."""

    def __init__(self, env: dict[str, str], log: Path) -> None:
        self.env = env
        self.temp_dir = tempfile.mkdtemp(prefix="rm", dir="/tmp")  # short: socket paths must stay < 108 bytes
        self.port = self.dashboard_port = 0  # chosen when the head starts
        self.nodes: dict[str, subprocess.Popen] = {}
        self.node_ids: dict[str, str] = {}
        self.log = log.open("w")  # the `ray start` outputs; Ray's own logs are under temp_dir/session_*/logs

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start_node(self, label: str, head: bool = False, attempts: int = 3) -> None:
        """Start one node and wait until the cluster lists it alive. A raylet gives up when its dashboard
        agent has not come up within 30 s (Ray 2.60, not configurable), which happens on a loaded 2-core
        machine: then the node is started again, on fresh ports."""
        for attempt in range(attempts):
            if head:
                self.port, self.dashboard_port = free_port(), free_port()
            command = [sys.executable, "-m", "ray.scripts.scripts", "start", "--block", "--disable-usage-stats",
                       "--node-ip-address=127.0.0.1", f"--temp-dir={self.temp_dir}", "--num-cpus=1",
                       f"--labels={LABEL}={label}", "--object-store-memory=80000000",
                       f"--node-manager-port={free_port()}", f"--object-manager-port={free_port()}",
                       f"--dashboard-agent-grpc-port={free_port()}",
                       f"--dashboard-agent-listen-port={free_port()}",
                       f"--metrics-export-port={free_port()}", f"--runtime-env-agent-port={free_port()}"]
            if head:
                command += ["--head", f"--port={self.port}", "--include-dashboard=true",
                            "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard_port}",
                            f"--ray-client-server-port={free_port()}"]
            else:
                command += [f"--address={self.address}", "--include-log-monitor=false"]
            process = subprocess.Popen(command, env=self.env, stdout=self.log, stderr=subprocess.STDOUT)
            self.nodes[label] = process
            deadline = time.time() + START_TIMEOUT_S
            while time.time() < deadline and process.poll() is None:
                node_id = self._alive_labels().get(label)
                if node_id:
                    self.node_ids[label] = node_id
                    return
                time.sleep(1.0)
            stop_leftovers(process_tree(process.pid), timeout=0)
            process.wait()
            print(f"Ray node {label} did not start (attempt {attempt + 1}, exit status {process.returncode})")
        pytest.fail(f"Ray node {label} did not start in {attempts} attempts; see {self.log.name}")

    def _alive_labels(self) -> dict[str, str]:
        from ray.util.state import list_nodes

        try:
            nodes = list_nodes(address=f"http://127.0.0.1:{self.dashboard_port}", timeout=10)
        except Exception:  # the dashboard is not up yet
            return {}
        return {n.labels[LABEL]: n.node_id for n in nodes if n.state == "ALIVE" and LABEL in n.labels}

    def label_of(self, node_id: str) -> str:
        return next(label for label, known in self.node_ids.items() if known == node_id)

    def kill(self, label: str) -> float:
        """SIGKILL a node's processes (its `ray start`, raylet, agents and Ray workers); returns when."""
        pids = process_tree(self.nodes[label].pid)
        killed_at = time.time()
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.nodes[label].wait()
        return killed_at

    def stop(self) -> None:
        trees = {label: process_tree(p.pid) for label, p in self.nodes.items()}
        for label, process in reversed(self.nodes.items()):  # worker nodes first, the head last
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)  # `ray start --block` stops its own node on SIGTERM
                try:
                    process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
        stop_leftovers([pid for tree in trees.values() for pid in tree], timeout=5)
        self.log.close()
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def wait_for(condition: Callable[[], Any], timeout: float, what: str, alive: subprocess.Popen | None = None,
             every: float = 0.2) -> Any:
    """Poll ``condition`` until it returns something other than None; fail after ``timeout`` s, or when
    the process ``alive`` has exited."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = condition()
        if value is not None:
            return value
        if alive is not None and alive.poll() is not None:
            pytest.fail(f"waiting for {what}: process {alive.args[:4]} exited with {alive.returncode}")
        time.sleep(every)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """The head and two worker nodes, one CPU each (a 2-worker trial always spans two nodes)."""
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
           "MOREID_CACHE": str(tmp_path_factory.mktemp("cache"))}
    started = time.time()
    nodes = LocalCluster(env, tmp_path_factory.mktemp("cluster") / "ray-start.log")
    try:
        for label in ("head", "w1", "w2"):
            nodes.start_node(label, head=label == "head")
        print(f"cluster of {len(nodes.nodes)} nodes up in {time.time() - started:.0f} s")
        yield nodes
    finally:
        nodes.stop()


def driver(cluster: LocalCluster, space: Path, storage: Path, log: Path, *extra: str,
           wrap: list[str] = ()) -> subprocess.Popen:
    """`python -m study.run` against the cluster, output to ``log``."""
    command = [*wrap, sys.executable, "-m", "study.run", str(space), "--storage", str(storage),
               "--address", cluster.address, *extra]
    with log.open("a") as out:
        return subprocess.Popen(command, cwd=REPO, env=cluster.env, stdout=out, stderr=subprocess.STDOUT)


def rows_or_none(results: Path, count: int = 1) -> list[dict[str, str]] | None:
    """The rows of results.csv once it has ``count`` of them."""
    rows = read_csv(results) if results.is_file() else []
    return rows if len(rows) >= count else None


def progress_or_none(study: Path, trial_id: str, epochs: int = 1) -> pd.DataFrame | None:
    """A trial's progress.csv once it holds ``epochs`` results."""
    try:
        progress = trial_progress(study, trial_id)
    except (ValueError, FileNotFoundError, pd.errors.EmptyDataError):
        return None
    return progress if len(progress) >= epochs else None


def can_unshare() -> bool:
    return shutil.which("unshare") is not None and subprocess.run(
        ["unshare", "--user", "--map-root-user", "--mount", "true"], capture_output=True).returncode == 0


@pytest.mark.skipif(not can_unshare(), reason="needs unprivileged user and mount namespaces (unshare -rm) to "
                                              "give the driver a folder the other nodes do not see")
def test_storage_other_nodes_cannot_see_is_refused_before_any_trial(cluster, tmp_path):
    storage = tmp_path / "studies"
    storage.mkdir()
    space = write_space(tmp_path, "hidden", 1, {"loss.name": {"type": "grid", "values": ["he"]}},
                        resources={"max_concurrent": 1, "workers_per_trial": 2, "cpus_per_worker": 1})
    log = tmp_path / "driver.log"
    # The driver alone sees a private tmpfs at `storage`: a folder local to its machine, as on a real cluster.
    mount = f"mount -t tmpfs tmpfs {storage} && exec \"$@\""
    started = time.time()
    process = driver(cluster, space, storage, log, wrap=["unshare", "--user", "--map-root-user", "--mount",
                                                          "sh", "-c", mount, "sh"])
    assert process.wait(timeout=300) == 2, log.read_text()[-3000:]
    print(f"storage check refused the study in {time.time() - started:.0f} s")
    out = log.read_text()
    assert f"the study folder {storage}/hidden is a local path that 3 of the cluster's 3 nodes cannot see" in out
    assert socket.gethostname() in out and "give --storage a folder every node mounts" in out.lower()
    assert "started:" not in out  # no trial started
    assert list(storage.iterdir()) == []  # and nothing was written where the nodes look


@pytest.mark.skipif(not can_unshare(), reason="needs unprivileged user and mount namespaces (unshare -rm) to "
                                              "hide a folder from the driver that the other nodes see")
def test_data_only_the_nodes_see_is_read_and_checked_on_a_worker_node(cluster, tmp_path):
    from reid_core.data import synthetic

    hidden = tmp_path / "hidden"  # the driver sees an empty tmpfs here; the nodes see the datasets
    good, bad = hidden / "market", hidden / "broken"
    synthetic.generate(good, "market1501", ids=8, cams=2, images_per_id_cam=2, height=32, width=16, seed=0)
    shutil.copytree(good, bad)
    shutil.rmtree(bad / "query")
    space = write_space(tmp_path, "remote_data", 1, {"loss.name": {"type": "grid", "values": ["he"]}})
    storage = tmp_path / "studies"
    mount = f"mount -t tmpfs tmpfs {hidden} && exec \"$@\""
    wrap = ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", mount, "sh"]

    # A tree without query/: one error naming it, read on a worker node, before any trial.
    log = tmp_path / "bad.log"
    started = time.time()
    process = driver(cluster, space, storage, log, "--dataset", "market1501", "--data-root", str(bad), wrap=wrap)
    assert process.wait(timeout=300) == 2, log.read_text()[-3000:]
    print(f"remote check refused the broken tree in {time.time() - started:.0f} s")
    out = log.read_text()
    assert f"market1501|{bad}: not visible here; read on a worker node before the first trial" in out.replace(
        f"market1501 at {bad}", f"market1501|{bad}")
    (line,) = [line for line in out.splitlines() if line.startswith("error:")]
    assert line.startswith("error: on a worker node: market1501") and "query" in line, line
    assert "started:" not in out and not (storage / "remote_data" / "study.json").exists()

    # The complete tree: read once on a worker node (not the driver's), then trained from that index.
    log = tmp_path / "good.log"
    process = driver(cluster, space, storage, log, "--dataset", "market1501", "--data-root", str(good), wrap=wrap)
    assert process.wait(timeout=300) == 0, log.read_text()[-3000:]
    out = log.read_text()
    (line,) = [line for line in out.splitlines() if "training images" in line and "read in" in line]
    assert f"market1501 at {good}: 16 training images of 4 identities" in line, line
    reader = line.split("on worker node ", 1)[1][:8]  # a node other than the driver's own (which is not seen)
    assert reader in {node_id[:8] for node_id in cluster.node_ids.values()}, line
    (row,) = read_csv(storage / "remote_data" / "results.csv")
    assert row["status"] == "TERMINATED" and row["final_mAP"]


def test_ddp_trials_across_nodes_survive_a_lost_node_and_a_killed_driver(cluster, tmp_path):
    # 12 steps an epoch (several seconds): the kills land inside an epoch. Ray Train polls its workers every
    # 2 s, so with 2-step epochs epoch 2 could be checkpointed before the driver even saw epoch 1.
    space = write_space(tmp_path, "multinode", 2, {"optim.lr": {"type": "grid", "values": [1e-3, 3e-4]}},
                        iters_per_epoch=12,
                        resources={"max_concurrent": 1, "workers_per_trial": 2, "cpus_per_worker": 1})
    storage = tmp_path / "studies"  # every node of this machine sees it: the shared folder
    study = storage / "multinode"
    results = study / "results.csv"
    log = tmp_path / "driver.log"
    started = time.time()
    first = driver(cluster, space, storage, log)
    try:
        # 1. A worker node that hosts a rank of the first trial dies during its epoch 2.
        first_id = wait_for(lambda: rows_or_none(results), 300, "the first trial", first)[0]["trial_id"]
        epoch1 = wait_for(lambda: progress_or_none(study, first_id), 300, "epoch 1 of the first trial", first,
                          every=0.1)
        ranks = epoch1["rank_nodes"].iloc[0].split(",")
        victim = next(cluster.label_of(node) for node in ranks if cluster.label_of(node) != "head")
        killed_at = cluster.kill(victim)
        lost = cluster.node_ids[victim]
        resumed = wait_for(lambda: progress_or_none(study, first_id, 2), 300,
                           "the first trial to train again after the node loss", first)
        seen_at = time.time()
        recovery = seen_at - killed_at - float(resumed["epoch_s"].iloc[1])
        print(f"node {victim} killed; the first trial trained again {recovery:.1f} s later "
              f"(its next epoch reported after {seen_at - killed_at:.1f} s)")
        # 2. The driver dies while the second trial trains (after its epoch-1 checkpoint).
        def second_trial_past_epoch_1() -> list[dict[str, str]] | None:
            rows = rows_or_none(results, 2)
            if rows is None or rows[0]["status"] != "TERMINATED":
                return None
            return rows if progress_or_none(study, rows[1]["trial_id"]) is not None else None

        before = wait_for(second_trial_past_epoch_1, 300, "the second trial's epoch 1", first, every=0.1)
        first.kill()
        first.wait()
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    first_progress = trial_progress(study, first_id)
    second_id = before[1]["trial_id"]
    assert before[1]["status"] == "RUNNING"

    resume = driver(cluster, space, storage, log, "--resume")
    assert resume.wait(timeout=300) == 0, log.read_text()[-4000:]
    print(f"multi-node study with a lost node and a killed driver: {time.time() - started:.0f} s")

    after = read_csv(results)
    assert [r["trial_id"] for r in after] == [first_id, second_id]  # no row lost or duplicated
    assert all(r["status"] == "TERMINATED" and r["epochs"] == "2" and r["final_mAP"] for r in after)
    # The first trial: epoch 1 on two nodes, one of them the lost one; epoch 2 from the epoch-1 checkpoint
    # on the two nodes left; not run again by the resumed driver.
    assert list(first_progress["epoch"]) == [1, 2] and list(first_progress["start_epoch"]) == [0, 1]
    nodes = [set(cell.split(",")) for cell in first_progress["rank_nodes"]]
    assert all(len(n) == 2 for n in nodes)  # the two ranks ran on two different nodes
    assert lost in nodes[0] and lost not in nodes[1]
    pd.testing.assert_frame_equal(trial_progress(study, first_id), first_progress)
    # The second trial carried on from its checkpoint after the driver was killed, on two nodes: from
    # epoch 1, or from epoch 2 when its Train run finished before the killed driver's job was torn down
    # (then the resumed run reports its final result once, without training again).
    second = trial_progress(study, second_id)
    assert second["epoch"].iloc[-1] == 2 and second["start_epoch"].iloc[-1] in (1, 2)
    assert all(len(set(cell.split(","))) == 2 and lost not in cell for cell in second["rank_nodes"])
    assert set(second["world_size"]) == {2} and set(second["ddp_backend"]) == {"gloo"}
    # TensorBoard: every epoch of both trials, once per trial folder.
    runs = sorted(p for p in (study / "tensorboard").iterdir() if p.is_dir())  # "001 ...", in start order
    assert len(runs) == 2
    for run_folder in runs:
        events = EventAccumulator(str(run_folder))
        events.Reload()
        assert sorted({s.step for s in events.Scalars("loss/total")}) == [1, 2]
        assert sorted({s.step for s in events.Scalars("eval/mAP")}) == [1, 2]
    assert (study / "results.md").is_file()
