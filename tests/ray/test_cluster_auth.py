"""A Ray head started the way the project's cluster files start one, here on 127.0.0.1: nobody without the
cluster's token drives it.

The head's `ray start` command and its environment are read from `cluster-onprem.yaml` (the same command as
`cluster.yaml` and README's hand-started cluster, which tests/study/test_cluster_yaml.py holds equal), so this test
follows the files: only the ports (free ones), the node address (127.0.0.1), the temp dir and the CPU count
are this machine's. The token is made by Ray's own command, as the files tell the user, in a private HOME
(its default place, ``~/.ray/auth_token``). The head runs with `--block` and is stopped by process id; no
other Ray instance on the machine is touched.

Shown: an HTTP request to the dashboard's job API without the token (or with a wrong one) is refused and no
job runs (the job would create a marker file; with the token the same request runs it); a driver without
the token is refused by the head, the same driver with it connects, runs a task and reads the State API
(what Ray Train's cleaner needs); the GCS answers a tokenless gRPC call UNAUTHENTICATED (the probe a driver's
``--address`` check can use) and the same call with the token; the dashboard listens on 127.0.0.1 only.
A study driver (``python -m study.run --address``) without ``RAY_AUTH_MODE=token``, without a token or with
a wrong one stops with one ``error:`` line, nothing written and no token printed; with the token its study
runs on the head.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from helpers import free_port, process_tree, ray_starts

pytestmark = pytest.mark.ray
REPO = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 180
DRIVER_TIMEOUT_S = 180
AUTH_VARS = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_ADDRESS")


def _pids_naming(text: str) -> list[int]:
    """Processes whose command line contains ``text`` (this head's private temp dir)."""
    pids = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if text in cmdline.read_bytes().decode(errors="replace"):
                pids.append(int(cmdline.parent.name))
        except OSError:
            continue
    return pids


def _request(url: str, method: str = "GET", body: dict | None = None, token: str | None = None):
    """(status, body text) of one HTTP request."""
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


class Head:
    def __init__(self, tmp: Path) -> None:
        self.home = tmp / "home"  # the cluster user's HOME: the token at its default place
        self.stranger = tmp / "stranger"  # a HOME without any token
        self.home.mkdir()
        self.stranger.mkdir()
        self.temp_dir = tempfile.mkdtemp(prefix="ra", dir="/tmp")  # short: socket paths stay < 108 bytes
        self.port, self.dashboard_port = free_port(), free_port()
        self.base_env = {k: v for k, v in os.environ.items() if k not in AUTH_VARS}
        self.base_env.update(RAY_USAGE_STATS_ENABLED="0", PYTHONPATH=str(REPO))
        self.process: subprocess.Popen | None = None
        self.log = (tmp / "ray-start.log").open("w")

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def dashboard(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    @property
    def token(self) -> str:
        return (self.home / ".ray" / "auth_token").read_text().strip()

    def make_token(self) -> None:
        """`(umask 077 && ray get-auth-token --generate >/dev/null)`, as the cluster files say."""
        subprocess.run([sys.executable, "-m", "ray.scripts.scripts", "get-auth-token", "--generate"],
                       env={**self.base_env, "HOME": str(self.home)}, check=True, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, preexec_fn=lambda: os.umask(0o077), timeout=120)

    def command(self, temp_dir: str) -> tuple[dict[str, str], list[str]]:
        """The head's `ray start` from cluster-onprem.yaml (its environment, its arguments) with this
        machine's ports, node address, temp dir and CPU count; `--block`, so that it is one process tree."""
        config = yaml.safe_load((REPO / "cluster-onprem.yaml").read_text())
        (env, args), = [c for c in [(env, args) for env, args, _ in ray_starts(config["head_start_ray_commands"])] if "--head" in c[1]]
        machine_specific = ("--port=", "--autoscaling-config=")
        args = [a for a in args if not a.startswith(machine_specific)]
        return env, [sys.executable, "-m", "ray.scripts.scripts", "start", *args, "--block", "--disable-usage-stats",
                     f"--port={self.port}", f"--dashboard-port={self.dashboard_port}",
                     "--node-ip-address=127.0.0.1", f"--temp-dir={temp_dir}", "--num-cpus=1",
                     "--object-store-memory=80000000", f"--ray-client-server-port={free_port()}",
                     f"--node-manager-port={free_port()}", f"--object-manager-port={free_port()}",
                     f"--dashboard-agent-grpc-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}",
                     f"--metrics-export-port={free_port()}", f"--runtime-env-agent-port={free_port()}"]

    def start(self) -> None:
        env, command = self.command(self.temp_dir)
        self.process = subprocess.Popen(command, env={**self.base_env, **env, "HOME": str(self.home)},
                                        stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.time() + START_TIMEOUT_S
        while time.time() < deadline and self.process.poll() is None:
            try:  # the job API answers (with the token) once the head is up
                if _request(f"{self.dashboard}/api/jobs/", token=self.token)[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.5)
        pytest.fail(f"the Ray head did not start within {START_TIMEOUT_S} s (exit status "
                    f"{self.process.poll()}); see {self.log.name}")

    def stop(self) -> None:
        pids = set(process_tree(self.process.pid)) if self.process else set()
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)  # `ray start --block` stops its own node on SIGTERM
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        deadline = time.time() + 5
        leftovers = (pids | set(_pids_naming(self.temp_dir))) - {os.getpid()}
        while time.time() < deadline and any(Path(f"/proc/{p}").exists() for p in leftovers):
            time.sleep(0.2)
        for pid in leftovers:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.log.close()
        shutil.rmtree(self.temp_dir, ignore_errors=True)

    def driver(self, env: dict[str, str]) -> subprocess.CompletedProcess:
        """A fresh process that joins the head as a study driver does, runs a task and asks the State API."""
        script = (
            "import os, sys, ray\n"
            "from ray.util.state import list_nodes\n"
            "ray.init(address=sys.argv[1], logging_level='ERROR', log_to_driver=False)\n"
            "pid = ray.get(ray.remote(num_cpus=0)(lambda: os.getpid()).remote(), timeout=120)\n"
            "nodes = list_nodes(address=sys.argv[2], timeout=60)\n"
            "print('ACCEPTED', pid != os.getpid(), [n.state for n in nodes])\n")
        # Ray retries a refused connection once a second; five tries show the refusal without waiting 20 s.
        return subprocess.run([sys.executable, "-c", script, self.address, self.dashboard],
                              env={**self.base_env, "RAY_gcs_server_port_wait_time_s": "5", **env},
                              capture_output=True, text=True, timeout=DRIVER_TIMEOUT_S)


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    started = time.time()
    head = Head(tmp_path_factory.mktemp("auth"))
    try:
        head.make_token()
        head.start()
        print(f"token-authenticated head up in {time.time() - started:.1f} s")
        yield head
    finally:
        head.stop()


def test_head_without_its_token_refuses_to_start(head, tmp_path):
    """RAY_AUTH_MODE=token makes a head whose token did not arrive fail instead of starting open (Ray 2.60
    turns token mode on by itself only when it finds a token)."""
    temp_dir = tempfile.mkdtemp(prefix="rb", dir="/tmp")
    env, command = head.command(temp_dir)
    command = [a for a in command if not a.startswith(("--port=", "--dashboard-port="))]
    command += [f"--port={free_port()}", f"--dashboard-port={free_port()}"]
    process = subprocess.Popen(command, env={**head.base_env, **env, "HOME": str(head.stranger)},
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        output, _ = process.communicate(timeout=90)
    except subprocess.TimeoutExpired:
        pids = set(process_tree(process.pid)) | set(_pids_naming(temp_dir))
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        pytest.fail("a head without its token started (or hung) instead of refusing")
    assert process.returncode != 0
    assert "no authentication token was found" in output, output[-2000:]
    assert not _pids_naming(temp_dir)  # nothing was left running
    shutil.rmtree(temp_dir, ignore_errors=True)


def test_token_made_by_rays_command_is_owner_only(head):
    token_file = head.home / ".ray" / "auth_token"
    assert token_file.stat().st_mode & 0o777 == 0o600
    assert (head.home / ".ray").stat().st_mode & 0o777 == 0o700
    assert len(head.token) == 64


def test_job_api_refuses_requests_without_the_token_and_runs_nothing(head, tmp_path):
    marker = tmp_path / "job-ran"
    job = {"entrypoint": f"touch {marker}"}
    status, text = _request(f"{head.dashboard}/api/jobs/", "POST", job)
    assert status == 401, text
    status, text = _request(f"{head.dashboard}/api/jobs/", "POST", job, token="0" * 64)
    assert status == 403, text
    status, text = _request(f"{head.dashboard}/api/jobs/", token=head.token)
    assert status == 200 and json.loads(text) == [], text  # no job was registered
    time.sleep(1.0)
    assert not marker.exists()

    # The same request with the token runs: the refusal above is the token's doing, not the request's.
    status, text = _request(f"{head.dashboard}/api/jobs/", "POST", job, token=head.token)
    assert status == 200, text
    deadline = time.time() + 120
    while not marker.exists() and time.time() < deadline:
        time.sleep(0.5)
    assert marker.exists(), "the authenticated job did not run within 120 s"


def test_driver_without_the_token_is_refused_and_with_it_accepted(head):
    refused = head.driver({"HOME": str(head.stranger)})  # no RAY_AUTH_MODE, no token anywhere
    assert refused.returncode != 0
    assert "InvalidAuthToken" in refused.stderr or "AuthenticationError" in refused.stderr, refused.stderr[-3000:]
    assert "ACCEPTED" not in refused.stdout

    wrong = head.driver({"HOME": str(head.stranger), "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "0" * 64})
    assert wrong.returncode != 0 and "ACCEPTED" not in wrong.stdout
    assert "InvalidAuthToken" in wrong.stderr or "AuthenticationError" in wrong.stderr, wrong.stderr[-3000:]

    accepted = head.driver({"HOME": str(head.home), "RAY_AUTH_MODE": "token"})
    assert accepted.returncode == 0, accepted.stderr[-3000:]
    assert "ACCEPTED True ['ALIVE']" in accepted.stdout


def test_gcs_answers_a_tokenless_call_unauthenticated(head):
    import grpc

    probe = "/ray.rpc.NodeInfoGcsService/GetClusterId"  # an RPC every head's GCS serves (empty request)
    with grpc.insecure_channel(head.address) as channel:
        call = channel.unary_unary(probe)
        with pytest.raises(grpc.RpcError) as caught:
            call(b"", timeout=10)
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as caught:
            call(b"", timeout=10, metadata=[("authorization", "Bearer " + "0" * 64)])
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert call(b"", timeout=10, metadata=[("authorization", f"Bearer {head.token}")])  # the cluster id


def test_dashboard_listens_on_loopback_only(head):
    """No socket of any address but 127.0.0.1 listens on the dashboard's port (from /proc/net/tcp*)."""
    listening = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, port = local.rsplit(":", 1)
            if state == "0A" and int(port, 16) == head.dashboard_port:
                listening.append(address)
    assert listening == ["0100007F"]  # 127.0.0.1, little-endian hex


# ---- a study driver joining the head with --address ------------------------------------------------------

STUDY_TIMEOUT_S = 400


def _study(head: Head, tmp_path: Path, env: dict[str, str]) -> tuple[subprocess.CompletedProcess, Path, float]:
    """``python -m study.run <tiny space> --address <head>`` in a fresh process with ``env``; returns the
    process, the study folder and the seconds it took."""
    from helpers import write_space

    space = write_space(tmp_path, "joined", 1, {"optim.lr": {"type": "grid", "values": [1e-4]}})
    storage = tmp_path / "studies"
    started = time.time()
    process = subprocess.run([sys.executable, "-m", "study.run", str(space), "--address", head.address,
                              "--storage", str(storage)],
                             env={**head.base_env, "MOREID_CACHE": str(tmp_path / "cache"), **env}, cwd=REPO,
                             capture_output=True, text=True, timeout=STUDY_TIMEOUT_S)
    return process, storage / "joined", time.time() - started


@pytest.mark.parametrize("case", ["no auth mode", "no token", "wrong token"])
def test_study_driver_without_the_right_token_stops_before_anything_starts(head, tmp_path, case):
    env = {"no auth mode": {"HOME": str(head.stranger)},
           "no token": {"HOME": str(head.stranger), "RAY_AUTH_MODE": "token"},
           "wrong token": {"HOME": str(head.home), "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "0" * 64}}[case]
    process, study, seconds = _study(head, tmp_path, env)
    print(f"{case}: exit {process.returncode} in {seconds:.1f} s")
    lines = [line for line in process.stderr.splitlines() if line.strip()]
    assert process.returncode == 2 and len(lines) == 1, process.stderr[-3000:]
    expected = {"no auth mode": "the Ray cluster there uses token authentication: set RAY_AUTH_MODE=token",
                "no token": f"no token found (looked in RAY_AUTH_TOKEN (unset) and {head.stranger}/.ray/auth_token)",
                "wrong token": "the cluster refused this token (from RAY_AUTH_TOKEN)"}[case]
    assert lines[0].startswith(f"error: --address {head.address}: ") and expected in lines[0], lines[0]
    output = process.stdout + process.stderr
    assert head.token not in output and "0" * 64 not in output  # no token is ever printed
    assert not study.exists() and "Ray at" not in process.stdout


def test_study_driver_with_the_token_runs_its_study_on_the_head(head, tmp_path):
    process, study, seconds = _study(head, tmp_path, {"HOME": str(head.home), "RAY_AUTH_MODE": "token"})
    print(f"a one-trial study on the token-authenticated head: exit {process.returncode} in {seconds:.0f} s")
    assert process.returncode == 0, (process.stdout[-3000:], process.stderr[-3000:])
    assert f"Ray at {head.address}" in process.stdout
    rows = (study / "results.csv").read_text().splitlines()
    assert len(rows) == 2 and "TERMINATED" in rows[1], rows
    assert head.token not in process.stdout + process.stderr
    assert os.stat(study).st_mode & 0o777 == 0o700
