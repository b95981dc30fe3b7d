"""Preflight: every node of a fresh allocation checks itself before the expensive part starts.

One task per node (local rank 0) inspects its node (GPUs, driver and software versions, the
shared folder, free space, NVLink) and writes a report into the job folder. Rank 0 waits for
every node's report under one deadline and judges them together: what one node lacks, and what
differs between nodes (a driver, CUDA, NCCL, the image). Every task waits for rank 0's verdict,
so a bad node ends the job within seconds, named with the check and the fix, before torchrun,
Ray or slime start. The verdict lists the bad nodes: with `slurm.exclude_bad_nodes` the
launcher submits once more without them (launch/run.py).

`nvidia-smi` is asked where it exists; without it (CPU nodes) only what Slurm says is checked.

The network is checked three ways: the configured interface must exist, have its link up and an
address on every node; one small all-reduce across the nodes (a full TCP mesh over each node's
address, the connections gloo makes) must finish before the deadline, and a node the others
cannot reach is named; on GPU nodes, one NCCL all-reduce across the nodes, one GPU each, follows
(nccl_probe, in a child process).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from glmsnake import atomic, knobs
from glmsnake.launch import addresses
from glmsnake.errors import GlmsnakeError

VERDICT = "preflight.json"
REPORTS = "preflight"


class PreflightFailed(GlmsnakeError):
    """A node of the allocation failed a check; `bad_nodes` names them."""

    def __init__(self, problem: str, fix: str, bad_nodes: list[str]):
        super().__init__(problem, fix)
        self.bad_nodes = bad_nodes


@dataclass(frozen=True)
class PreflightSpec:
    """What the step asks of every node (picklable plain data)."""

    gpus_per_node: int
    nodes: int
    room_bytes: int = 0  # free space the step will need under the job folder (on base_dir)
    deadline_s: float = 60.0
    interface: str | None = None  # slurm.network_interface: must exist, be up and have an address on every node
    allreduce: bool = True  # one small all-reduce across the nodes: a TCP mesh, the connections gloo makes
    nccl: bool = True  # on GPU nodes, one NCCL all-reduce across the nodes too (nccl_probe, one GPU each)


# --------------------------------------------------------------------------- one node


SMI_TIMEOUT_S = 20.0  # a GPU that hangs nvidia-smi (stuck in the kernel) is a bad GPU, not a reason to wait


class SmiFailed(Exception):
    """nvidia-smi exists but failed or hung: on a GPU node, a finding in itself."""


def _nvidia_smi(*args: str) -> str | None:
    """nvidia-smi's output; None where it does not exist; SmiFailed where it fails or does not answer.

    Run in a thread with a deadline: a process stuck in the kernel ignores SIGKILL, and waiting for
    it (as subprocess.run does after a timeout) would hang the task."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    box: dict[str, Any] = {}

    def call() -> None:
        try:
            p = subprocess.Popen([exe, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            box["p"] = p
            box["out"] = p.communicate()
            box["rc"] = p.returncode
        except OSError as e:
            box["error"] = str(e)

    t = threading.Thread(target=call, daemon=True)
    t.start()
    t.join(SMI_TIMEOUT_S)
    if t.is_alive():
        if "p" in box:
            with contextlib.suppress(OSError):
                box["p"].kill()
        raise SmiFailed(f"`nvidia-smi {' '.join(args)}` did not answer within {SMI_TIMEOUT_S:.0f} s")
    if "error" in box:
        raise SmiFailed(f"nvidia-smi could not run: {box['error']}")
    out, err = box["out"]
    if box["rc"] != 0:
        raise SmiFailed(f"`nvidia-smi {' '.join(args)}` exited with {box['rc']}: {(err or out).strip()[:300]}")
    return out


def _package_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def software_inventory() -> dict[str, str]:
    """{distribution: version} of every Python package the task's interpreter sees, read from the
    `*.dist-info` / `*.egg-info` folder names on sys.path (milliseconds: no metadata is parsed; the
    first on sys.path wins, as for imports), and the OS release as `(os)`. Inside a container it is
    the image's contents: a tag that each node pulls for itself can point at another image by the
    time the last node pulls, and the registry digest is not visible from inside."""
    found: dict[str, str] = {}
    for entry in sys.path:
        try:
            names = os.listdir(entry or ".")
        except OSError:
            continue
        for n in names:
            for suffix in (".dist-info", ".egg-info"):
                if n.endswith(suffix):
                    name, _, version = n[: -len(suffix)].partition("-")
                    found.setdefault(name.lower().replace("_", "-"), version)
    with contextlib.suppress(OSError):
        release = dict(line.split("=", 1) for line in Path("/etc/os-release").read_text().splitlines() if "=" in line)
        found["(os)"] = release.get("PRETTY_NAME", "").strip('"')
    return found


def visible_gpus() -> int | None:
    """GPUs Slurm gave this task (CUDA_VISIBLE_DEVICES, else SLURM_GPUS_ON_NODE); None if neither is set."""
    cvd = os.environ.get("CUDA_VISIBLE_DEVICES")
    if cvd is not None:
        return len([d for d in cvd.split(",") if d.strip() and d.strip() != "-1"])
    n = os.environ.get("SLURM_GPUS_ON_NODE")
    return int(n) if n and n.isdigit() else None


def node_report(spec: PreflightSpec, folder: Path, token: str | None) -> dict[str, Any]:
    """This node's facts, for rank 0 to judge; `token`: what this node read back from the shared folder."""
    t0 = time.monotonic()
    interface: dict[str, Any] = {}
    if spec.interface:
        try:
            interface["interface_error"] = addresses.interface_problem(spec.interface)
            interface["interface_address"] = addresses.interface_address(spec.interface)
        except GlmsnakeError as e:
            interface["interface_error"] = interface["interface_error"] or e.problem
    rep: dict[str, Any] = {
        "visible_gpus": visible_gpus(),
        "image": knobs.CONTAINER_IMAGE.raw(),
        "python": sys.version.split()[0],
        "torch": _package_version("torch"),
        "nccl": _package_version("nvidia-nccl-cu12") or _package_version("nvidia-nccl-cu13"),
        "ray": _package_version("ray"),
        "packages": software_inventory(),
    }
    rep.update(interface)
    rep["token"] = token  # rank 0 compares it with what it wrote: the same shared folder?
    free = shutil.disk_usage(folder).free
    rep["free_bytes"] = free
    try:
        _gpu_facts(rep, spec)
    except SmiFailed as e:
        rep["smi_error"] = str(e)
    rep["seconds"] = round(time.monotonic() - t0, 3)
    return rep


def _gpu_facts(rep: dict[str, Any], spec: PreflightSpec) -> None:
    """What nvidia-smi says, where it exists (raises SmiFailed where it fails)."""
    gpus = _nvidia_smi("--query-gpu=index,uuid,driver_version,ecc.errors.uncorrected.volatile.total",
                       "--format=csv,noheader,nounits")
    if gpus is None:
        return
    # Only rows of four fields with a numeric index: nvidia-smi may print warnings on stdout.
    rows = [r for r in ([c.strip() for c in line.split(",")] for line in gpus.splitlines())
            if len(r) == 4 and r[0].isdigit()]
    rep["smi_gpus"] = len(rows)
    rep["driver"] = rows[0][2] if rows else None
    # ECC: a count, "[N/A]"/"[Not Supported]" (no ECC), or an error in brackets ("[GPU requires reset]").
    rep["ecc_gpus"] = [f"{r[0]} ({r[3]})" if not r[3].isdigit() else r[0] for r in rows
                       if (r[3].isdigit() and int(r[3]) > 0)
                       or (not r[3].isdigit() and r[3] not in ("[N/A]", "N/A", "[Not Supported]"))]
    ours = _job_gpu_indices({r[0] for r in rows})
    uuid_to_index = {r[1]: r[0] for r in rows}
    busy: dict[str, list[str]] = {}
    if spec.gpus_per_node:
        apps = _nvidia_smi("--query-compute-apps=gpu_uuid,pid", "--format=csv,noheader") or ""
        for line in apps.splitlines():
            parts = [c.strip() for c in line.split(",")]
            if len(parts) == 2 and parts[0] in uuid_to_index and uuid_to_index[parts[0]] in ours:
                busy.setdefault(uuid_to_index[parts[0]], []).append(parts[1])
    rep["busy_gpus"] = busy
    m = re.search(r"CUDA Version:\s*([\d.]+)", _nvidia_smi() or "")
    rep["cuda"] = m.group(1) if m else None
    topo = _nvidia_smi("topo", "-m") or ""
    rep["nvlink_refs"] = len(re.findall(r"\bNV\d+\b", topo))  # as slime's run scripts count them


def _job_gpu_indices(all_indices: set[str]) -> set[str]:
    """The GPUs given to this job: CUDA_VISIBLE_DEVICES's indices where nvidia-smi sees more than
    those (no device cgroup), else every GPU nvidia-smi sees."""
    cvd = [d.strip() for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip().isdigit()]
    return set(cvd) & all_indices if cvd and len(all_indices) > len(cvd) else all_indices


# --------------------------------------------------------------------------- the network, all nodes at once

MESH = "mesh"  # each node's all-reduce listening address, one file per node rank


def allreduce(folder: Path, node: str, node_rank: int, nodes: int, address: str, deadline: float) -> dict[str, Any]:
    """A small all-reduce across the nodes over a full TCP mesh on each node's own address (the
    connections gloo's all-reduce makes): every node listens, sends `node_rank + 1` to every other
    node and sums what it receives. Plain sockets, so nothing is imported and nothing stays
    behind in the task. The report lists the nodes this one could not reach or never heard from."""
    t0 = time.monotonic()
    mesh = Path(folder) / MESH
    mesh.mkdir(parents=True, exist_ok=True)
    server = socket.create_server((address, 0))
    server.settimeout(0.2)
    atomic.write_bytes(mesh / str(node_rank), f"{address}:{server.getsockname()[1]}".encode())
    heard: dict[int, float] = {}

    def listen() -> None:
        while len(heard) < nodes - 1 and time.monotonic() < deadline:
            try:
                conn, _ = server.accept()
            except OSError:
                continue
            with conn:
                conn.settimeout(max(0.1, deadline - time.monotonic()))
                with contextlib.suppress(OSError, ValueError):
                    rank, value = conn.makefile().readline().split()
                    heard[int(rank)] = float(value)
                    conn.sendall(b"ok\n")

    listener = threading.Thread(target=listen, daemon=True)
    listener.start()
    unreachable: list[int] = []
    for other in (r for r in range(nodes) if r != node_rank):
        if not _send(mesh / str(other), f"{node_rank} {node_rank + 1}\n".encode(), deadline):
            unreachable.append(other)
    listener.join(max(0.0, deadline - time.monotonic()))
    server.close()
    total = node_rank + 1 + sum(heard.values())
    want = nodes * (nodes + 1) / 2
    out: dict[str, Any] = {"ok": total == want and not unreachable, "sum": total, "want": want,
                           "seconds": round(time.monotonic() - t0, 3)}
    if not out["ok"]:
        out["unreachable"] = unreachable
        out["unheard"] = sorted(set(range(nodes)) - set(heard) - {node_rank})
    return out


def _send(addr_file: Path, message: bytes, deadline: float) -> bool:
    """Deliver `message` to the node whose address `addr_file` will hold, retrying until the deadline."""
    while time.monotonic() < deadline:
        try:
            host, port = addr_file.read_text().rsplit(":", 1)
            with socket.create_connection((host, int(port)), timeout=max(0.1, min(5.0, deadline - time.monotonic()))) as c:
                c.sendall(message)
                if c.makefile().readline().strip() == "ok":
                    return True
        except (OSError, ValueError):
            pass
        time.sleep(0.05)
    return False


NCCL_STORE = "nccl-store"  # node rank 0's TCPStore address for the NCCL all-reduce
NCCL_GAVE_UP = "nccl-gave-up"  # one file per node that cannot take part: the others stop waiting for it


def nccl_allreduce(folder: Path, node_rank: int, nodes: int, address: str, deadline: float,
                   interface: str | None = None, take_part: bool = True) -> dict[str, Any]:
    """One NCCL all-reduce across the nodes, one GPU each, in a child process (nccl_probe): the CUDA
    context and NCCL's threads end with it. Node rank 0 publishes its store's address in the job
    folder. A node that cannot take part (`take_part` False: its TCP all-reduce failed; or its
    torch cannot use the GPUs) leaves a mark, and the others stop waiting for it; a child past the
    deadline is killed. NCCL_SOCKET_IFNAME is the configured interface, as training's."""
    t0 = time.monotonic()
    gave_up = Path(folder) / NCCL_GAVE_UP

    def give_up(result: dict[str, Any]) -> dict[str, Any]:
        gave_up.mkdir(exist_ok=True)
        atomic.write_bytes(gave_up / str(node_rank), result["error"].encode())
        return {**result, "seconds": round(time.monotonic() - t0, 3)}

    def others_gave_up() -> list[int]:
        return sorted(int(p.name) for p in gave_up.glob("[0-9]*")) if gave_up.is_dir() else []

    def stopped(others: list[int]) -> dict[str, Any]:
        why = (f"stopped waiting: node rank(s) {', '.join(map(str, others))} could not take part" if others
               else "no result before the deadline")
        return {"ok": False, "error": why, "waited_for": others, "seconds": round(time.monotonic() - t0, 3)}

    if not take_part:
        return give_up({"ok": False, "error": "skipped: the TCP all-reduce across the nodes failed here"})
    spot = Path(folder) / NCCL_STORE
    if node_rank == 0:
        atomic.write_bytes(spot, f"{address}:{addresses.free_port(address)}".encode())
    while not spot.exists():
        if others_gave_up() or time.monotonic() > deadline:
            return stopped(others_gave_up())
        time.sleep(0.05)
    host, port = spot.read_text().rsplit(":", 1)
    # The child gives up a second before this process would kill it, so its own words come back.
    child_deadline = time.time() + max(1.0, deadline - time.monotonic() - 1.0)
    env = {**os.environ, **({"NCCL_SOCKET_IFNAME": interface} if interface else {})}
    # Run as a file: it needs the standard library and torch only, not glmsnake's package (nor a path to it).
    cmd = [sys.executable, str(Path(__file__).with_name("nccl_probe.py")), host, port, str(node_rank), str(nodes),
           f"{child_deadline:.3f}"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)  # type: ignore[arg-type]
    reader.start()
    # Stop waiting for nodes that gave up only once this node's own checks passed ("ready"): a node
    # whose torch cannot use its GPUs either is named for that itself, not for waiting.
    while proc.poll() is None:
        others = others_gave_up()
        if time.monotonic() > deadline or (others and any('"ready"' in ln for ln in lines)):
            proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=2)  # a process stuck in the GPU driver may not die: do not wait for it
            return stopped(others)
        time.sleep(0.1)
    reader.join(2)
    verdicts = [ln for ln in lines if ln.startswith("{") and '"ok"' in ln]
    try:
        result = json.loads(verdicts[-1])
    except (IndexError, ValueError):
        last = ([ln.strip() for ln in lines if ln.strip()] or ["no output"])[-1][:300]
        result = {"ok": False, "error": f"the NCCL probe exited with {proc.returncode}: {last}"}
    if result.get("local"):
        return give_up(result)
    result["seconds"] = round(time.monotonic() - t0, 3)
    return result


# --------------------------------------------------------------------------- all nodes, on rank 0

CONSISTENT = (("driver", "GPU driver"), ("cuda", "CUDA"), ("nccl", "NCCL"), ("nccl_runtime", "NCCL (as torch loads it)"),
              ("torch", "torch"),
              ("image", "container image"), ("python", "Python"), ("ray", "Ray"))


def judge(spec: PreflightSpec, reports: dict[str, dict[str, Any] | None], folder: Path,
          token: str | None = None) -> dict[str, Any]:
    """The verdict on every node's report: failures (node, check, problem, fix), bad nodes, NVLS."""
    failures: list[dict[str, str]] = []

    def fail(node: str, check: str, problem: str, fix: str) -> None:
        failures.append({"node": node, "check": check, "problem": problem, "fix": fix})

    for node, rep in reports.items():
        if rep is None:
            fail(node, "storage", f"{node} sent no preflight report within {spec.deadline_s:.0f} s: it may not "
                 f"see the job folder {folder} (base_dir must be on storage every node mounts)",
                 "put base_dir on a shared filesystem, or leave the node out")
            continue
        if token is not None and rep.get("token") != token:
            fail(node, "storage", f"{node} reads another file at {folder / REPORTS / 'token'} than the head "
                 "wrote: base_dir is not the same shared filesystem there", "put base_dir on storage every node mounts")
        want = spec.gpus_per_node
        if want and rep.get("smi_error"):
            fail(node, "gpus", f"nvidia-smi fails on {node}: {rep['smi_error']}",
                 "a GPU may be lost or hung: ask the admins to check the node, or leave it out")
        seen = rep.get("smi_gpus") if rep.get("smi_gpus") is not None else rep.get("visible_gpus")
        if want and rep.get("visible_gpus") is not None and rep["visible_gpus"] < want:
            fail(node, "gpus", f"{node} gives the task {rep['visible_gpus']} GPU(s) (CUDA_VISIBLE_DEVICES), the "
                 f"step asked for {want}", "check the node's gres configuration, or leave the node out")
        elif want and seen is not None and seen < want:
            fail(node, "gpus", f"nvidia-smi on {node} sees {seen} GPU(s), the step asked for {want}",
                 "a GPU may have fallen off the bus: ask the admins to check the node, or leave it out")
        for gpu, pids in sorted((rep.get("busy_gpus") or {}).items()):
            fail(node, "gpus", f"GPU {gpu} on {node} is busy with another process's compute (pid {', '.join(pids)})",
                 "leave the node out, or ask the admins to clean it")
        if rep.get("ecc_gpus"):
            fail(node, "gpus", f"GPU(s) {', '.join(rep['ecc_gpus'])} on {node} report uncorrected ECC errors",
                 "leave the node out and report it to the admins")
        if rep.get("interface_error"):
            fail(node, "network", rep["interface_error"],
                 "set `slurm.network_interface` to an interface every node has (see `ip -4 addr`), or leave the node out")
        if spec.room_bytes and rep.get("free_bytes", 0) < spec.room_bytes:
            fail(node, "space", f"{node} sees {rep['free_bytes'] / 1e9:.1f} GB free under {folder}, the step will "
                 f"write about {spec.room_bytes / 1e9:.1f} GB", "free space under base_dir, or move base_dir")
    good = {n: r for n, r in reports.items() if r is not None}
    _judge_allreduce(good, list(reports), fail)
    for key, what in CONSISTENT:
        values: dict[str, list[str]] = {}
        for node, rep in good.items():
            if rep.get(key) is not None:
                values.setdefault(str(rep[key]), []).append(node)
        if len(values) > 1:
            # The majority is right; the rest are named (a tie names every side).
            ranked = sorted(values.items(), key=lambda kv: -len(kv[1]))
            top = len(ranked[0][1])
            tied_at_top = sum(len(ns) == top for _v, ns in ranked) > 1
            odd = ranked if tied_at_top else [(v, ns) for v, ns in ranked if len(ns) < top]
            for v, ns in odd:
                fail(",".join(ns), "software", f"{what} {v} on {', '.join(ns)} differs from the other nodes' "
                     f"({'; '.join(f'{w} on {len(m)} node(s)' for w, m in ranked if w != v)})",
                     f"align the {what} across the nodes, or leave {', '.join(ns)} out")
    if not any(f["check"] == "software" for f in failures):  # a version named above is not named twice
        _judge_inventory(good, fail)
    _judge_nccl(good, fail, others_failed=bool(failures))  # last: the collective needed every node above
    bad = sorted({n for f in failures for n in f["node"].split(",")})
    # Nodes that leaving out would help: not for a full shared disk, never a placeholder name, and
    # never the whole allocation (the problem is then not a node's).
    excludable = sorted({n for f in failures if f["check"] != "space" for n in f["node"].split(",") if " " not in n})
    if len(excludable) >= len(reports):
        excludable = []
    nvlink = [r.get("nvlink_refs") for r in good.values()]
    nvls = 1 if nvlink and all(isinstance(x, int) and x > 0 for x in nvlink) else 0
    return {"ok": not failures, "failures": failures, "bad_nodes": bad, "excludable": excludable, "nvls": nvls,
            "seconds": {n: r["seconds"] for n, r in good.items()}}


def _judge_allreduce(good: dict[str, dict[str, Any]], nodes: list[str], fail) -> None:
    """Name the nodes the all-reduce did not reach: one that most others could not reach or never
    heard from is the bad one (a node that reaches nobody names itself by the same count)."""
    results = {n: r["allreduce"] for n, r in good.items() if isinstance(r.get("allreduce"), dict)}
    if not any(a.get("ok") is False for a in results.values()):
        return
    # Node ranks are Slurm's node order; a node that sent no report is named from the job's node list.
    by_rank = dict(enumerate(_job_nodes())) | {r["node_rank"]: n for n, r in good.items() if "node_rank" in r}
    blamed: dict[str, int] = {}
    for n, a in results.items():
        for rank in set(a.get("unreachable", [])) | set(a.get("unheard", [])):
            other = by_rank.get(rank, f"node rank {rank}")
            blamed[other] = blamed.get(other, 0) + 1
    for n, a in results.items():  # a node that reached nobody
        if a.get("ok") is False and len(a.get("unreachable", [])) >= len(nodes) - 1:
            blamed[n] = len(nodes)
    worst = max(blamed.values(), default=0)
    for n in sorted(n for n, k in blamed.items() if k == worst and n in nodes):
        fail(n, "network", f"{n} did not take part in the all-reduce across the nodes before the deadline "
             f"({worst} node(s) could not reach it or never heard from it)",
             "check the node's network (the interface in `slurm.network_interface`), or leave it out")


def _judge_inventory(good: dict[str, dict[str, Any]], fail) -> None:
    """Every node must see the same packages (the same image): the nodes outside the majority are
    named with what differs on them (a tie names every side)."""
    image = any(rep.get("image") for rep in good.values())
    # Without a container each node runs its own OS: a point release apart is no mismatch.
    seen = {node: {k: v for k, v in rep["packages"].items() if image or k != "(os)"}
            for node, rep in good.items() if isinstance(rep.get("packages"), dict)}
    groups: dict[str, list[str]] = {}
    for node, packages in seen.items():
        groups.setdefault(json.dumps(sorted(packages.items())), []).append(node)
    if len(groups) < 2:
        return
    ranked = sorted(groups.values(), key=len, reverse=True)
    tied = len(ranked[1]) == len(ranked[0])
    base = seen[ranked[0][0]]
    for nodes in ranked if tied else ranked[1:]:
        mine = seen[nodes[0]]
        other = seen[(ranked[1] if nodes is ranked[0] else ranked[0])[0]] if tied else base
        diff = [f"{k} {mine[k]} (others {other[k]})" for k in sorted(mine.keys() & other.keys()) if mine[k] != other[k]]
        diff += [f"+{k} {mine[k]}" for k in sorted(mine.keys() - other.keys())]
        diff += [f"-{k} {other[k]}" for k in sorted(other.keys() - mine.keys())]
        more = f", and {len(diff) - 6} more" if len(diff) > 6 else ""
        fail(",".join(sorted(nodes)), "software", f"the packages on {', '.join(sorted(nodes))} differ from the other "
             f"nodes': {', '.join(diff[:6])}{more}",
             ("run one image on every node (pin it by digest, IMAGE@sha256:..., where each node pulls it)" if image
              else "install one Python environment for every node (on shared storage)")
             + f", or leave {', '.join(sorted(nodes))} out")


def _judge_nccl(good: dict[str, dict[str, Any]], fail, others_failed: bool) -> None:
    """Name what the NCCL all-reduce found. A node where torch cannot use the GPUs that nvidia-smi
    lists is named alone (the others only waited for it), and so is a node that took no part
    while others did (nvidia-smi lists no GPUs there). Otherwise a collective that failed
    everywhere names every node and leaves none out: one broken link stalls them all, and which
    one it is takes NCCL_DEBUG. Where another check already named a node, only such local
    findings count: the collective needed every node."""
    results = {n: r["nccl_allreduce"] for n, r in good.items() if isinstance(r.get("nccl_allreduce"), dict)}
    if not results:
        return
    absent = sorted(n for n in good if n not in results and not good[n].get("smi_error"))  # that one is named already
    for n in absent:
        fail(n, "gpus", f"{n} took no part in the NCCL all-reduce across the nodes: nvidia-smi lists no GPUs there, "
             f"while it does on {len(results)} node(s)", "check the node's GPUs and driver (nvidia-smi), or leave it out")
    failed = {n: a for n, a in results.items() if not a.get("ok")}
    local = {n: a for n, a in failed.items() if a.get("local")}
    for n, a in sorted(local.items()):
        fail(n, "gpus", f"{a.get('error')} on {n}, though nvidia-smi lists them",
             "the image's CUDA may need a newer driver than the node's (compare nvidia-smi's CUDA version with the "
             "image's torch.version.cuda): align them, or leave the node out")
    if absent or local or others_failed or not failed:
        return
    first = next(iter(failed.values())).get("error") or "no reason given"
    if len(failed) == len(results):
        fail(",".join(sorted(failed)), "network", f"the NCCL all-reduce across the nodes failed on every node ({first})",
             "check NCCL's network settings (NCCL_SOCKET_IFNAME, NCCL_IB_HCA) and rerun `glmsnake preflight` "
             "with NCCL_DEBUG=INFO exported")
        return
    for n, a in sorted(failed.items()):
        fail(n, "network", f"the NCCL all-reduce failed on {n} ({a.get('error') or 'no reason given'})",
             "check the node's GPUs and fabric (NCCL_DEBUG=INFO), or leave it out")


def explain(verdict: dict[str, Any]) -> PreflightFailed:
    """The error for a failed verdict: every failure, then one fix."""
    lines = [f"{f['check']}: {f['problem']}" for f in verdict["failures"]]
    fixes = list(dict.fromkeys(f["fix"] for f in verdict["failures"]))
    bad = verdict["bad_nodes"]
    return PreflightFailed(
        f"preflight failed on {', '.join(bad)}:\n  " + "\n  ".join(lines),
        "; ".join(fixes) + " (`slurm.exclude_bad_nodes: true` submits again without them)",
        bad,
    )


# --------------------------------------------------------------------------- in every task


def run(spec: PreflightSpec, folder: Path, rank: int, local_rank: int, node: str, nodes_total: int,
        node_rank: int | None = None, address: str = "127.0.0.1") -> dict[str, Any]:
    """Every task calls this before its work: the verdict, or PreflightFailed (on every rank)."""
    folder = Path(folder)
    reports_dir = folder / REPORTS
    verdict_path = folder / VERDICT
    t0 = time.monotonic()
    deadline = time.monotonic() + spec.deadline_s
    node_rank = rank if node_rank is None else node_rank
    net = spec.allreduce and nodes_total > 1
    if rank == 0:
        reports_dir.mkdir(parents=True, exist_ok=True)
        token = os.urandom(16).hex()
        atomic.write_bytes(reports_dir / "token", token.encode())
    if local_rank == 0:
        seen = _wait_text(reports_dir / "token", deadline)
        rep = node_report(spec, folder, seen)
        # The all-reduces end before the reports' deadline, so a node waiting on a silent one still reports in time.
        margin = max(0.5, min(10.0, 0.2 * spec.deadline_s))
        if net:
            rep["node_rank"] = node_rank
            rep["allreduce"] = allreduce(folder, node, node_rank, nodes_total, address, deadline - margin)
        if spec.nccl and nodes_total > 1 and spec.gpus_per_node and rep.get("smi_gpus"):
            rep["node_rank"] = node_rank
            mesh_ok = not net or rep["allreduce"].get("ok", False)
            rep["nccl_allreduce"] = nccl_allreduce(folder, node_rank, nodes_total, address, deadline - margin,
                                                   spec.interface, take_part=mesh_ok)
            rep["nccl_runtime"] = rep["nccl_allreduce"].get("nccl")  # the library torch loads: an image's own, too
        atomic.write_json(reports_dir / f"{node}.json", rep)
    if rank == 0:
        reports: dict[str, dict[str, Any] | None] = {}
        while True:
            found = {p.stem: p for p in reports_dir.glob("*.json")}
            if len(found) >= nodes_total or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        for name, p in found.items():
            reports[name] = json.loads(p.read_text())
        if len(found) < nodes_total:
            for missing in _missing_nodes(set(found), nodes_total):
                reports[missing] = None
        verdict = judge(spec, reports, folder, token)
        verdict["wall_s"] = round(time.monotonic() - t0, 3)
        atomic.write_json(verdict_path, verdict)
    else:
        raw = _wait_text(verdict_path, deadline + 10)
        verdict = json.loads(raw) if raw else {"ok": False, "failures": [], "bad_nodes": [],
                                               "timeout": True}
        if verdict.get("timeout"):
            raise GlmsnakeError(f"no preflight verdict from rank 0 within {spec.deadline_s + 10:.0f} s",
                                "read rank 0's task log")
    if not verdict["ok"]:
        raise explain(verdict)
    return verdict


def _missing_nodes(found: set[str], total: int) -> list[str]:
    """Slurm's names of the allocation's nodes that sent no report (SLURM_JOB_NODELIST)."""
    names = _job_nodes()
    missing = [n for n in names if n not in found]
    return missing or [f"node {k}" for k in range(len(found), total)]


def _job_nodes() -> list[str]:
    """The job's node names: from what the batch script asked Slurm (a container has no scontrol)."""
    known = list(addresses.job_node_addresses())
    if known:
        return known
    nodelist = os.environ.get("SLURM_JOB_NODELIST", "")
    if not nodelist:
        return []
    try:
        r = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return []
    return r.stdout.split()


def _wait_text(path: Path, deadline: float) -> str | None:
    while time.monotonic() < deadline:
        try:
            return path.read_text()
        except FileNotFoundError:
            time.sleep(0.05)
    return None


__all__ = ["PreflightFailed", "PreflightSpec", "REPORTS", "VERDICT", "judge", "node_report", "run", "visible_gpus"]
