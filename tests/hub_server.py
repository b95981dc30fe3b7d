"""A hub-compatible HTTP endpoint on 127.0.0.1 serving folders as repos (tests only).

It answers the calls huggingface_hub's real download code makes — repo info,
tree listing, HEAD/GET `resolve` with Range — so tests drive the real client via
HF_ENDPOINT. Knobs let a test corrupt a file or drop a connection mid-transfer.
"""

from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse

LFS_SUFFIXES = (".safetensors", ".bin", ".jsonl")


@dataclass
class Repo:
    folder: Path
    branches: dict[str, str]  # name -> commit sha
    repo_type: str = "model"


@dataclass
class HubState:
    repos: dict[str, Repo] = field(default_factory=dict)
    corrupt: set[str] = field(default_factory=set)  # files served with one byte flipped
    drop_after: dict[str, int] = field(default_factory=dict)  # file -> bytes sent before dropping (once)
    requests: list[tuple[str, str, str | None]] = field(default_factory=list)  # (method, path, Range)


def _sha(data: bytes, kind: str) -> str:
    if kind == "git":
        return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
    return hashlib.sha256(data).hexdigest()


def _files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


class Handler(BaseHTTPRequestHandler):
    state: HubState
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # quiet
        pass

    # ---- routing
    def do_GET(self) -> None:
        self._route(head=False)

    def do_HEAD(self) -> None:
        self._route(head=True)

    def _route(self, head: bool) -> None:
        path = unquote(urlparse(self.path).path)
        self.state.requests.append((self.command, path, self.headers.get("Range")))
        parts = path.strip("/").split("/")
        if parts[0] == "api" and len(parts) >= 6 and parts[4] in ("revision", "tree"):
            repo_id = f"{parts[2]}/{parts[3]}"
            return self._api(parts[1], repo_id, parts[4], parts[5])
        if parts[0] == "datasets":
            parts = parts[1:]
        if len(parts) >= 5 and parts[2] == "resolve":
            return self._resolve(f"{parts[0]}/{parts[1]}", parts[3], "/".join(parts[4:]), head)
        self._error(404, "EntryNotFound", "not found")

    # ---- helpers
    def _json(self, obj, status: int = 200) -> None:
        body = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _error(self, status: int, code: str, message: str) -> None:
        body = json.dumps({"error": message}).encode()
        self.send_response(status)
        self.send_header("X-Error-Code", code)
        self.send_header("X-Error-Message", message)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _commit(self, repo: Repo, revision: str) -> str | None:
        if revision in repo.branches:
            return repo.branches[revision]
        return revision if revision in repo.branches.values() else None

    def _api(self, kind: str, repo_id: str, what: str, revision: str) -> None:
        repo = self.state.repos.get(repo_id)
        if repo is None:
            return self._error(404, "RepoNotFound", f"Repository {repo_id} not found")
        commit = self._commit(repo, revision)
        if commit is None:
            return self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        if what == "revision":
            siblings = [{"rfilename": n} for n in _files(repo.folder)]
            return self._json({"id": repo_id, "sha": commit, "siblings": siblings, "private": False})
        entries = []
        for name in _files(repo.folder):
            data = (repo.folder / name).read_bytes()
            entry = {"type": "file", "path": name, "size": len(data), "oid": _sha(data, "git")}
            if name.endswith(LFS_SUFFIXES):
                entry["lfs"] = {"oid": _sha(data, "sha256"), "size": len(data), "pointerSize": 134}
            entries.append(entry)
        self._json(entries)

    def _resolve(self, repo_id: str, revision: str, name: str, head: bool) -> None:
        repo = self.state.repos.get(repo_id)
        commit = self._commit(repo, revision) if repo else None
        path = repo.folder / name if repo else None
        if commit is None or path is None or not path.is_file():
            return self._error(404, "EntryNotFound", f"{name} not found")
        data = path.read_bytes()
        etag = _sha(data, "sha256" if name.endswith(LFS_SUFFIXES) else "git")
        if name in self.state.corrupt:
            data = bytes([data[0] ^ 0xFF]) + data[1:]
        start = 0
        rng = self.headers.get("Range")
        if rng and rng.startswith("bytes="):
            start = int(rng.removeprefix("bytes=").split("-")[0])
        body = data[start:]
        self.send_response(206 if start else 200)
        self.send_header("X-Repo-Commit", commit)
        self.send_header("ETag", f'"{etag}"')
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Length", str(len(body)))
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.end_headers()
        if head:
            return
        cut = self.state.drop_after.pop(name, None) if not start else None
        if cut is not None:
            # Send part of the body, then drop the connection: the client must resume with Range.
            self.wfile.write(body[:cut])
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(2)
            return
        self.wfile.write(body)


class HubServer:
    """`with HubServer() as hub:` ... `hub.url` is the HF_ENDPOINT; stops on exit."""

    def __init__(self) -> None:
        self.state = HubState()
        handler = type("BoundHandler", (Handler,), {"state": self.state})
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def add_repo(self, repo_id: str, folder: Path, branches: dict[str, str] | None = None, repo_type: str = "model") -> None:
        self.state.repos[repo_id] = Repo(Path(folder), branches or {"main": "a" * 40}, repo_type)

    def gets(self, name: str) -> list[str | None]:
        """The Range headers of every GET of a file (None for a plain GET)."""
        return [r for m, p, r in self.state.requests if m == "GET" and p.endswith("/" + name)]

    def __enter__(self) -> "HubServer":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
