"""Checks that a study's storage works on every node of a multi-node Ray cluster, before any trial starts.

A study stored in a local folder (``--storage /mnt/shared/studies``) works on a cluster only when that
folder is the same shared file system (NFS, EFS, ...) on every node: Ray Train's workers write the
trials' checkpoints there and a retried trial reads them back, possibly on another node. A folder that
only the driver's machine has (``./studies`` on the head) would lose every checkpoint written elsewhere.

The check: the driver writes a marker file with a random token into the study folder, then a small
zero-CPU Ray task pinned to each alive node reads it back. A node that does not find the token is named in
the error. URIs (``s3://``, ``gs://``) are not checked: every node reaches them through pyarrow.
"""
from __future__ import annotations

import secrets
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from study.space import SpaceError

MARKER_PREFIX = ".storage-check-"
# How long the nodes get to start a worker process and answer (seconds); a node that has not answered by
# then is reported as unchecked, not as blind.
ANSWER_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class NodeView:
    """What one node saw of the marker file."""

    node_id: str
    address: str  # the node's IP as Ray knows it
    hostname: str
    seen: bool  # the marker exists there with the driver's token


def _read_marker(path: str, token: str) -> tuple[str, bool]:
    """Runs on one node: (hostname, whether ``path`` holds ``token``)."""
    try:
        seen = Path(path).read_text() == token
    except OSError:
        seen = False
    return socket.gethostname(), seen


def node_views(folder: Path, timeout_s: float = ANSWER_TIMEOUT_S) -> tuple[list[NodeView], list[str]]:
    """Ask every alive node of the connected Ray cluster whether it sees ``folder`` as the driver does.
    Returns the answers and the addresses of nodes that did not answer within ``timeout_s``."""
    nodes = [n for n in ray.nodes() if n["Alive"]]
    token = secrets.token_hex(16)
    folder.mkdir(parents=True, exist_ok=True)
    marker = folder / f"{MARKER_PREFIX}{token}"
    marker.write_text(token)
    try:
        read = ray.remote(num_cpus=0, max_retries=0)(_read_marker)
        refs = {read.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
                .remote(str(marker), token): n for n in nodes}
        ready, pending = ray.wait(list(refs), num_returns=len(refs), timeout=timeout_s)
        views = []
        for ref in ready:
            node = refs[ref]
            try:
                hostname, seen = ray.get(ref)
            except ray.exceptions.RayError:  # the node went away meanwhile
                continue
            views.append(NodeView(node["NodeID"], node["NodeManagerAddress"], hostname, seen))
        for ref in pending:
            ray.cancel(ref, force=True)
        return views, [refs[ref]["NodeManagerAddress"] for ref in pending]
    finally:
        marker.unlink(missing_ok=True)


def check_storage_visible(folder: Path, timeout_s: float = ANSWER_TIMEOUT_S) -> None:
    """Raise :class:`SpaceError` when some node of a multi-node cluster does not see the local study
    ``folder`` (the one the driver writes). A single-node Ray needs no check."""
    if sum(1 for n in ray.nodes() if n["Alive"]) < 2:
        return
    views, unanswered = node_views(folder, timeout_s)
    blind = [v for v in views if not v.seen]
    if blind:
        names = ", ".join(f"{v.hostname} ({v.address}, node {v.node_id[:8]})" for v in blind)
        raise SpaceError(
            f"the study folder {folder} is a local path that {len(blind)} of the cluster's "
            f"{len(views) + len(unanswered)} nodes cannot see: {names}. Trial checkpoints written there would "
            f"be lost. Give --storage a folder every node mounts (NFS, e.g. /mnt/shared/studies) or a URI "
            f"(s3://bucket/studies)")
    if unanswered:
        print(f"warning: node(s) {', '.join(unanswered)} did not answer within {timeout_s:.0f} s; could not "
              f"check that they see {folder}", file=sys.stderr, flush=True)
