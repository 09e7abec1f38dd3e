"""The driver's checks of a study's input before anything runs: the study name, storage, Ray address, data
root, Optuna storage and a study folder already there, and the preflight of every trial's data. Each
raises :class:`~study.space.SpaceError` (or :class:`~study.trial.errors.PreflightError`) naming the bad
setting and the fix."""
from __future__ import annotations

import csv
import io
import os
from pathlib import Path
from typing import Any

import grpc  # a dependency of Ray, much lighter than importing Ray

from study.driver.preflight import Preflight, preflight
from study.driver.storage import StudyStorage, is_uri
from study.layout import OPTUNA_DB, RESULTS_FILE
from study.search.optuna_record import OptunaRecord, default_url, masked, split_password, study_names
from study.space import SearchSpace, SpaceError, checked_params, plan
from study.space.schema import NAME_RE

FAIL_HOOK_ENV = "MOREID_STUDY_FAIL_AT_EPOCH"  # tests: "<epoch>:<marker file>", a worker dies once
# tests, with FAIL_HOOK_ENV: "oom" or "nccl": instead of dying, every worker raises that error (torch's own
# exception type) after each epoch from <epoch> on, every attempt; rank 0 adds a line to the marker file
FAIL_RAISES_ENV = "MOREID_STUDY_FAIL_RAISES"
FAIL_RAISES = ("oom", "nccl")
STORAGE_WAIT_S = 10.0  # a storage URI that does not answer in this time is reported unreachable
ADDRESS_WAIT_S = 5.0
GCS_PROBE = "/ray.rpc.NodeInfoGcsService/GetClusterId"  # an RPC every Ray head's GCS serves (empty request)


def check_study_name(name: str | None) -> None:
    """A study name is one folder under --storage (a word, like a space's name)."""
    if name is not None and not NAME_RE.match(name):
        raise SpaceError(f"--name {name!r}: must be a word of letters, digits, '-' or '_' (it names the study "
                         f"folder under --storage)")


def check_space_name(name: Any, source: str) -> None:
    """A resumed study's name (the space's, when no --name) follows the rule of a fresh start: a word, so
    that the study folder is one folder under --storage."""
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise SpaceError(f"{source}: name {name!r}: must be a word of letters, digits, '-' or '_' (it names the "
                         f"study folder under --storage)")


def check_storage(storage: StudyStorage) -> None:
    """The storage root must be a folder (or creatable as one) or a URI that answers."""
    if storage.remote:
        storage.check_reachable(STORAGE_WAIT_S)
        return
    path = Path(storage.root)
    for folder in (path, *path.parents):
        if folder.exists():
            if not folder.is_dir():
                raise SpaceError(f"--storage {storage.root}: {folder} is a file, not a folder: give a folder "
                                 f"(created if missing) or a URI such as s3://bucket/studies")
            if not os.access(folder, os.W_OK | os.X_OK):
                raise SpaceError(f"--storage {storage.root}: {folder} is not writable")
            return


def check_address(address: str) -> None:
    """An explicit ``host:port`` must be a Ray head's GCS that answers: one gRPC call with a deadline
    (``ray.init`` itself retries an unreachable or wrong address for minutes). A head with token
    authentication answers UNAUTHENTICATED: then this driver needs ``RAY_AUTH_MODE=token`` and the
    cluster's token (found as Ray finds it), which the head must accept. The token is never printed."""
    if address == "auto" or address.startswith("local"):
        return
    target = address.split("://")[-1]
    host, sep, port = target.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise SpaceError(f"--address {address!r}: expected auto or host:port (e.g. 10.0.0.1:6379)")
    code = _probe_gcs(target)
    if code is None:
        return
    if code == grpc.StatusCode.UNAUTHENTICATED:
        _check_token(address, target)
        return
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        raise SpaceError(f"--address {address}: no answer within {ADDRESS_WAIT_S:g} s (unreachable host or a "
                         f"firewall): check the head node's address")
    if code == grpc.StatusCode.UNAVAILABLE:
        raise SpaceError(f"--address {address}: cannot connect (nothing listens there): is a Ray head running "
                         f"there? (ray start --head --port {port})")
    raise SpaceError(f"--address {address}: something answers there, but not a Ray head ({code.name}): "
                     f"give the head's GCS address (ray start --head prints it)")


def _probe_gcs(target: str, token: str | None = None) -> grpc.StatusCode | None:
    """The status code of one GCS call (None: it answered)."""
    metadata = [("authorization", f"Bearer {token}")] if token is not None else None
    channel = grpc.insecure_channel(target)
    try:
        channel.unary_unary(GCS_PROBE)(b"", timeout=ADDRESS_WAIT_S, metadata=metadata)
        return None
    except grpc.RpcError as exc:
        return exc.code()
    finally:
        channel.close()


def ray_token() -> tuple[str | None, str]:
    """``(token or None, where it was looked for)``, in Ray's own order: ``RAY_AUTH_TOKEN``, the file
    ``RAY_AUTH_TOKEN_PATH`` names, ``~/.ray/auth_token`` (whitespace around it dropped)."""
    text = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    if text:
        return text, "RAY_AUTH_TOKEN"
    named = os.environ.get("RAY_AUTH_TOKEN_PATH")
    path = Path(named).expanduser() if named else Path.home() / ".ray" / "auth_token"
    where = f"RAY_AUTH_TOKEN_PATH={named}" if named else str(path)
    try:
        text = path.read_text().strip()
    except OSError:
        text = ""
    return (text or None), (where if named else f"RAY_AUTH_TOKEN (unset) and {where}")


def _check_token(address: str, target: str) -> None:
    if os.environ.get("RAY_AUTH_MODE", "").lower() != "token":
        raise SpaceError(f"--address {address}: the Ray cluster there uses token authentication: set "
                         f"RAY_AUTH_MODE=token and give its token (~/.ray/auth_token, RAY_AUTH_TOKEN_PATH or "
                         f"RAY_AUTH_TOKEN)")
    token, where = ray_token()
    if token is None:
        raise SpaceError(f"--address {address}: RAY_AUTH_MODE=token but no token found (looked in {where}): copy "
                         f"the cluster's token there (ray get-auth-token on the head prints it)")
    code = _probe_gcs(target, token)
    if code == grpc.StatusCode.UNAUTHENTICATED:
        raise SpaceError(f"--address {address}: the cluster refused this token (from {where}): give the token "
                         f"the head was started with")
    if code is not None:
        raise SpaceError(f"--address {address}: the head did not answer the authenticated call ({code.name})")


def check_data(space: SearchSpace) -> None:
    """Real datasets need a root; relative roots are resolved (trial workers run in other folders)."""
    dataset, root = space.base["data.dataset"], space.base["data.root"]
    if dataset != "synthetic" and not root:
        raise SpaceError(f"{space.source}: data.root is empty for dataset {dataset}: give --data-root")
    if root and not is_uri(root) and not Path(root).is_absolute():
        space.base["data.root"] = str(Path(root).resolve())


def fail_hook() -> dict[str, Any] | None:
    text = os.environ.get(FAIL_HOOK_ENV)
    if not text:
        return None
    epoch, _, marker = text.partition(":")
    if not epoch.isdigit() or not marker:
        raise SpaceError(f"{FAIL_HOOK_ENV} must read '<epoch>:<marker file>', got {text!r}")
    raises = os.environ.get(FAIL_RAISES_ENV) or None
    if raises is not None and raises not in FAIL_RAISES:
        raise SpaceError(f"{FAIL_RAISES_ENV} must be one of {', '.join(FAIL_RAISES)}, got {raises!r}")
    return {"epoch": int(epoch), "marker": marker, **({"raises": raises} if raises else {})}


def run_preflight(space: SearchSpace, *, generate: bool, unseen: str, done: Preflight | None = None,
                  trials: list | None = None) -> Preflight:
    """Every trial config of ``space`` (Optuna: the draws that stand for it) checked against its data."""
    trials = plan(space) if trials is None else trials
    configs = getattr(trials, "configs", None)  # validate_plan's: built once
    if configs is None:
        configs = [space.config_for(params) for params in checked_params(space, trials)]
    return preflight(configs, space.resources.workers_per_trial, generate=generate, unseen=unseen, done=done)


def optuna_record(space: SearchSpace, storage: StudyStorage, url: str | None) -> OptunaRecord:
    """The study's Optuna record (``url``: SQLAlchemy URL; default ``optuna.db`` in the study folder)."""
    if not url:
        storage.local.mkdir(parents=True, exist_ok=True)
    return OptunaRecord(url or default_url(storage.local), study_names(space, storage.name), space.mode)


def check_optuna_storage(args: Any, space: SearchSpace, storage: StudyStorage,
                         study_file: dict[str, Any], replaced: bool = False) -> str | None:
    """The Optuna storage URL of the study (None: the default SQLite file in the study folder), reachable,
    and holding this study's Optuna studies exactly when resuming. ``replaced``: the study folder was just
    replaced (``--restart``, or a study with no finished trial), so its Optuna studies go too. The URL is
    recorded in ``study_file`` (study.json), where ``--resume`` finds it."""
    url = args.optuna_storage
    clean, password = split_password(url) if url else (url, None)
    if args.resume:
        saved = study_file.get("optuna_storage")
        if url and saved and clean != split_password(saved)[0]:
            raise SpaceError(f"this study records its Optuna trials in {masked(saved)}; resume it without "
                             f"--optuna-storage or with that URL")
        url = url or saved
        clean = clean or saved
    study_file["optuna_storage"] = clean  # never the password: it is read again at run time
    if not url and not storage.path(OPTUNA_DB).is_file():
        return url  # the default SQLite file, not made yet: nothing to open (nor to leave behind)
    record = optuna_record(space, storage, url)
    try:
        existing = record.existing()
    except Exception as exc:  # SQLAlchemy: bad URL, no driver, server unreachable, no such database
        reason = getattr(exc, "orig", None) or exc  # the database driver's own message, when there is one
        detail = " ".join(line.strip() for line in str(reason).splitlines() if line.strip())
        if password:
            detail = detail.replace(password, "***")
        raise SpaceError(f"cannot open the Optuna storage {masked(url)}: {type(reason).__name__}: {detail}") from None
    if existing and not args.resume:
        if not replaced:
            raise SpaceError(f"the Optuna storage {masked(url)} already holds the study {existing[0]!r}: pass "
                             f"--resume to carry it on, or --name for a new one")
        record.delete(existing)
    return url


def replace_unfinished(storage: StudyStorage, restart: bool) -> bool:
    """A study folder already there is replaced when none of its trials finished (a failed start, or
    every trial failed) or with --restart; else it is an error pointing at --resume. Returns whether
    one was replaced."""
    if not storage.exists():
        return False
    finished = 0
    text = storage.read_text(RESULTS_FILE)
    if text:
        rows = list(csv.DictReader(io.StringIO(text)))
        finished = sum(1 for row in rows if row.get("status") in ("TERMINATED", "STOPPED"))
    if finished and not restart:
        raise SpaceError(f"a study already exists in {storage.uri} with {finished} finished trial(s): pass "
                         f"--resume to carry it on, --restart to replace it, or --name / --storage for a new one")
    print(f"replacing the study in {storage.uri} ({finished} finished trial(s))", flush=True)
    storage.remove()
    return True
