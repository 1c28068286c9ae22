"""A Hugging Face Hub-compatible HTTP server on loopback, for testing push and pull without a network.

It implements the endpoints huggingface_hub 2.x uses for repos, commits, LFS uploads and
downloads (see shared/notes/hub.md), on an in-memory git-like store: every commit has a sha1
computed from its parent, tree and message, and files are blobs addressed by their git oid
(regular files) or their sha256 (LFS files), exactly as the real Hub reports them.

Knobs the tests turn:
- ``upload_mode``: what ``preupload`` answers for binary files, ``"lfs"`` (needs a client with
  ``HF_HUB_DISABLE_XET=1``, which then uses the LFS batch API) or ``"regular"`` (bytes inline in
  the NDJSON commit; works with xet enabled, because xet is only used for files answered "lfs").
- ``tokens``: ``{token: (user, "read"|"write")}``. Writes need a write token for the namespace
  (401 without a token, 403 otherwise); private repos are invisible without a token.
- ``fail(pattern, status=500 | drop=True, times=N)``: answer matching requests with an error, or
  close the connection without answering.
- ``tree_override``: a listing to return instead of the real tree (a malicious server).
- ``bad_etag``: an ETag to send on resolve (a malicious server trying to escape the cache).
Every request is recorded in ``requests`` (method, path, Host header, Range, bytes sent), and
requests to no known route in ``unhandled``.

Run standalone for manual testing: ``python tests/hub_server.py --port 8999 --mode regular``.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import hashlib
import json
import re
import secrets
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

WRITE_TOKEN = "hf_testwritetokenAAAAAAAAAAAAAAAAAAAA"
READ_TOKEN = "hf_testreadtokenBBBBBBBBBBBBBBBBBBBBB"
USER = "tester"
LFS_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth", ".ckpt", ".h5", ".onnx")
GITATTRIBUTES = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n*.bin filter=lfs diff=lfs merge=lfs -text\n"
_REPO_ID_RE = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[\w.-]{1,96}$")
_HUB_ID_RE = re.compile(r"^(?:[A-Za-z0-9][\w.-]{0,95}/)?[A-Za-z0-9][\w.-]{0,95}$")


def git_blob_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    return (
        f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()
    )


@dataclass(frozen=True)
class Blob:
    """One file version: regular bytes, or an LFS object (the git oid is its pointer's oid)."""

    data: bytes
    lfs: bool

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    @property
    def size(self) -> int:
        return len(self.data)

    @property
    def git_oid(self) -> str:
        if self.lfs:
            return git_blob_oid(lfs_pointer(self.sha256, self.size))
        return git_blob_oid(self.data)

    @property
    def etag(self) -> str:
        return self.sha256 if self.lfs else self.git_oid


@dataclass
class Commit:
    oid: str
    parent: str | None
    files: dict[str, Blob]
    title: str
    message: str
    author: str
    date: str


@dataclass
class Repo:
    repo_id: str
    private: bool
    branches: dict[str, str] = field(default_factory=dict)  # name -> commit oid
    commits: dict[str, Commit] = field(default_factory=dict)

    def resolve(self, rev: str) -> Commit | None:
        if rev in self.branches:
            return self.commits[self.branches[rev]]
        if re.fullmatch(r"[0-9a-f]{40}", rev) and rev in self.commits:
            return self.commits[rev]
        return None

    def history(self, rev: str) -> list[Commit]:
        out: list[Commit] = []
        c = self.resolve(rev)
        while c is not None:
            out.append(c)
            c = self.commits.get(c.parent) if c.parent else None
        return out


@dataclass
class Recorded:
    method: str
    path: str
    host: str
    range: str | None
    authorized: bool
    status: int = 0
    body_bytes: int = 0


@dataclass
class Fault:
    pattern: re.Pattern[str]
    status: int | None
    drop: bool
    times: int | None  # None: forever


class HubServer:
    """The server and its in-memory state; ``start()`` serves on a free loopback port."""

    def __init__(self, *, upload_mode: str = "lfs") -> None:
        self.upload_mode = upload_mode
        self.tokens: dict[str, tuple[str, str]] = {
            WRITE_TOKEN: (USER, "write"),
            READ_TOKEN: (USER, "read"),
        }
        self.repos: dict[str, Repo] = {}
        self.lfs_store: dict[str, bytes] = {}  # sha256 -> bytes, filled by LFS PUTs
        self._upload_sigs: dict[str, str] = {}  # sha256 -> signature expected on the PUT
        self.requests: list[Recorded] = []
        self.unhandled: list[str] = []
        self.faults: list[Fault] = []
        self.tree_override: dict[str, list[dict[str, Any]]] = {}
        self.bad_etag: str | None = None
        self.lock = threading.RLock()
        self._clock = 0
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle -------------------------------------------------------------------------

    def start(self, port: int = 0) -> HubServer:
        handler = type("BoundHandler", (_Handler,), {"hub": self})
        self._httpd = ThreadingHTTPServer(("127.0.0.1", port), handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()

    @property
    def url(self) -> str:
        assert self._httpd is not None
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"

    # -- test helpers ----------------------------------------------------------------------

    def fail(
        self,
        pattern: str,
        *,
        status: int | None = 500,
        drop: bool = False,
        times: int | None = None,
    ) -> None:
        """Fail requests whose ``"METHOD /path"`` matches ``pattern``."""
        with self.lock:
            self.faults.append(Fault(re.compile(pattern), None if drop else status, drop, times))

    def clear_faults(self) -> None:
        with self.lock:
            self.faults.clear()

    def create_repo(self, repo_id: str, *, private: bool = False) -> Repo:
        with self.lock:
            repo = Repo(repo_id, private)
            self.repos[repo_id] = repo
            self.commit(
                repo, "main", {".gitattributes": Blob(GITATTRIBUTES, False)}, "initial commit"
            )
            return repo

    def seed(self, repo_id: str, files: dict[str, bytes], *, message: str = "seed") -> str:
        """Create (if needed) and commit ``files`` straight into the store; returns the commit."""
        with self.lock:
            repo = self.repos.get(repo_id) or self.create_repo(repo_id)
            head = repo.commits[repo.branches["main"]]
            tree = dict(head.files)
            for path, data in files.items():
                tree[path] = Blob(data, path.endswith(LFS_SUFFIXES))
            return self.commit(repo, "main", tree, message).oid

    def commit(
        self,
        repo: Repo,
        branch: str,
        files: dict[str, Blob],
        title: str,
        message: str = "",
        author: str = USER,
    ) -> Commit:
        with self.lock:
            self._clock += 1
            parent = repo.branches.get(branch)
            tree = "".join(f"{p}\0{b.git_oid}\n" for p, b in sorted(files.items()))
            raw = f"tree {hashlib.sha1(tree.encode()).hexdigest()}\nparent {parent}\n"
            raw += f"author {author} {self._clock}\n\n{title}\n\n{message}"
            oid = hashlib.sha1(raw.encode()).hexdigest()
            date = time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(1_700_000_000 + self._clock))
            c = Commit(oid, parent, dict(files), title, message, author, date)
            repo.commits[oid] = c
            repo.branches[branch] = oid
            return c

    def head(self, repo_id: str, branch: str = "main") -> Commit:
        repo = self.repos[repo_id]
        return repo.commits[repo.branches[branch]]

    def file(self, repo_id: str, path: str, branch: str = "main") -> Blob:
        return self.head(repo_id, branch).files[path]

    def requests_matching(self, pattern: str) -> list[Recorded]:
        rx = re.compile(pattern)
        with self.lock:
            return [r for r in self.requests if rx.search(f"{r.method} {r.path}")]

    def mark(self) -> int:
        """An index into ``requests``; ``since(mark)`` lists what came after."""
        with self.lock:
            return len(self.requests)

    def since(self, mark: int) -> list[Recorded]:
        with self.lock:
            return self.requests[mark:]


@contextlib.contextmanager
def running(*, upload_mode: str = "lfs") -> Iterator[HubServer]:
    server = HubServer(upload_mode=upload_mode).start()
    try:
        yield server
    finally:
        server.stop()


class _Dropped(Exception):
    """Close the connection without an answer (a dropped connection)."""


class _HTTPError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str | None = None,
        headers: dict[str, str] | None = None,
        header_message: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = dict(headers or {})
        if code:
            self.headers["X-Error-Code"] = code
        if header_message:
            self.headers["X-Error-Message"] = header_message


class _Handler(BaseHTTPRequestHandler):
    hub: HubServer
    protocol_version = "HTTP/1.1"
    server_version = "FakeHub/1.0"

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    # -- plumbing --------------------------------------------------------------------------

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            out = bytearray()
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return bytes(out)
                out += self.rfile.read(size)
                self.rfile.readline()
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def _dispatch(self, method: str) -> None:
        hub = self.hub
        split = urlsplit(self.path)
        rec = Recorded(
            method,
            self.path,
            self.headers.get("Host", ""),
            self.headers.get("Range"),
            bool(self.headers.get("Authorization")),
        )
        with hub.lock:
            hub.requests.append(rec)
            fault = None
            for f in hub.faults:
                if f.pattern.search(f"{method} {split.path}") and (f.times is None or f.times > 0):
                    if f.times is not None:
                        f.times -= 1
                    fault = f
                    break
        self.body = self._body() if method in ("POST", "PUT", "DELETE") else b""
        self.query = parse_qs(split.query)
        try:
            if fault is not None:
                if fault.drop:
                    raise _Dropped
                raise _HTTPError(fault.status or 500, "injected failure")
            self._check_token()
            status, headers, body = self._route(method, split.path)
        except _Dropped:
            rec.status = -1
            self.close_connection = True
            return
        except _HTTPError as e:
            status, headers = e.status, {**e.headers}
            body = json.dumps({"error": e.message}).encode()
            headers.setdefault("Content-Type", "application/json")
        rec.status = status
        rec.body_bytes = 0 if method == "HEAD" else len(body)
        self.send_response(status)
        headers.setdefault("Content-Length", str(len(body)))
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()
        if method != "HEAD":
            self.wfile.write(body)

    # -- auth ------------------------------------------------------------------------------

    def _token(self) -> str | None:
        auth = self.headers.get("Authorization", "")
        return auth[7:] if auth.startswith("Bearer ") else None

    def _check_token(self) -> None:
        token = self._token()
        if token is not None and token not in self.hub.tokens:
            # What the real Hub sends for a bad token; the client keeps it a plain 401 error.
            raise _HTTPError(
                401,
                "Invalid credentials",
                header_message="Invalid credentials in Authorization header",
            )

    def _user(self) -> tuple[str, str] | None:
        token = self._token()
        return self.hub.tokens.get(token) if token else None

    def _can_write(self, repo_id: str) -> None:
        user = self._user()
        if user is None:
            raise _HTTPError(401, "You must be authenticated to write")
        name, role = user
        if role != "write" or repo_id.split("/")[0] != name:
            raise _HTTPError(
                403,
                f"You don't have the rights to write to {repo_id}",
                header_message="You don't have the rights to write",
            )

    def _repo(self, repo_id: str) -> Repo:
        repo = self.hub.repos.get(repo_id)
        user = self._user()
        if repo is None or (repo.private and (user is None or user[0] != repo_id.split("/")[0])):
            # Like the Hub: missing and invisible look the same, 401 when anonymous.
            raise _HTTPError(404 if user else 401, "Repository not found", code="RepoNotFound")
        return repo

    def _commit_for(self, repo: Repo, rev: str) -> Commit:
        c = repo.resolve(rev)
        if c is None:
            raise _HTTPError(404, f"Invalid rev id: {rev}", code="RevisionNotFound")
        return c

    # -- routing ---------------------------------------------------------------------------

    def _route(self, method: str, raw_path: str) -> tuple[int, dict[str, str], bytes]:
        parts = [unquote(p) for p in raw_path.split("/")[1:]]
        if parts[:1] == ["api"]:
            rest = parts[1:]
            if method == "GET" and rest == ["whoami-v2"]:
                return self._whoami()
            if method == "POST" and rest == ["repos", "create"]:
                return self._create_repo()
            if method == "DELETE" and rest == ["repos", "delete"]:
                return self._delete_repo()
            if method == "POST" and rest == ["validate-yaml"]:
                return self._validate_yaml()
            if len(rest) >= 3 and rest[0] == "models":
                repo_id = f"{rest[1]}/{rest[2]}"
                sub = rest[3:]
                if method == "GET" and not sub:
                    return self._info(repo_id, "main")
                if method == "GET" and len(sub) == 2 and sub[0] == "revision":
                    return self._info(repo_id, sub[1])
                if method == "GET" and len(sub) >= 2 and sub[0] == "tree":
                    return self._tree(repo_id, sub[1], "/".join(sub[2:]))
                if method == "GET" and sub == ["refs"]:
                    return self._refs(repo_id)
                if method == "GET" and len(sub) == 2 and sub[0] == "commits":
                    return self._commits(repo_id, sub[1])
                if method == "POST" and len(sub) == 2 and sub[0] == "preupload":
                    return self._preupload(repo_id, sub[1])
                if method == "POST" and len(sub) == 2 and sub[0] == "commit":
                    return self._commit(repo_id, sub[1])
                if method == "POST" and len(sub) == 2 and sub[0] == "branch":
                    return self._branch(repo_id, sub[1])
                if (
                    method == "GET"
                    and len(sub) == 2
                    and sub[0] in ("xet-write-token", "xet-read-token")
                ):
                    # What a Hub without Xet storage answers (a mirror, a self-hosted Hub).
                    self._repo(repo_id)
                    raise _HTTPError(404, "Xet storage is not enabled on this server")
        elif (
            method == "POST"
            and len(parts) == 6
            and parts[1].endswith(".git")
            and parts[2:] == ["info", "lfs", "objects", "batch"]
        ):
            return self._lfs_batch(f"{parts[0]}/{parts[1][:-4]}")
        elif parts[:1] == ["_lfs"] and len(parts) == 2 and method == "PUT":
            return self._lfs_put(parts[1])
        elif (
            parts[:1] == ["_lfs"] and len(parts) == 3 and parts[2] == "verify" and method == "POST"
        ):
            return self._lfs_verify(parts[1])
        elif len(parts) >= 5 and parts[2] == "resolve" and method in ("GET", "HEAD"):
            return self._resolve(method, f"{parts[0]}/{parts[1]}", parts[3], "/".join(parts[4:]))
        with self.hub.lock:
            self.hub.unhandled.append(f"{method} {raw_path}")
        raise _HTTPError(404, f"no route for {method} {raw_path}")

    def _json(self, doc: Any, status: int = 200) -> tuple[int, dict[str, str], bytes]:
        return status, {"Content-Type": "application/json"}, json.dumps(doc).encode()

    def _payload(self) -> Any:
        try:
            return json.loads(self.body or b"{}")
        except ValueError:
            raise _HTTPError(400, "body is not JSON") from None

    # -- endpoints -------------------------------------------------------------------------

    def _whoami(self) -> tuple[int, dict[str, str], bytes]:
        user = self._user()
        if user is None:
            raise _HTTPError(401, "Invalid user token")
        name, role = user
        return self._json(
            {
                "type": "user",
                "name": name,
                "fullname": name,
                "orgs": [],
                "auth": {
                    "type": "access_token",
                    "accessToken": {"displayName": "test", "role": role},
                },
            }
        )

    def _create_repo(self) -> tuple[int, dict[str, str], bytes]:
        p = self._payload()
        name, org = p.get("name"), p.get("organization")
        if p.get("type", "model") != "model":
            raise _HTTPError(400, "only model repos are supported here")
        repo_id = f"{org}/{name}" if org else f"{USER}/{name}"
        if not _REPO_ID_RE.match(repo_id) or ".." in repo_id or "--" in repo_id:
            raise _HTTPError(400, f"invalid repo name {repo_id!r}")
        self._can_write(repo_id)
        url = f"{self.hub.url}/{repo_id}"
        with self.hub.lock:
            if repo_id in self.hub.repos:
                return self._json({"error": "You already created this model repo", "url": url}, 409)
            private = p.get("private") is True or p.get("visibility") == "private"
            self.hub.create_repo(repo_id, private=private)
        return self._json({"url": url, "name": repo_id, "id": repo_id})

    def _delete_repo(self) -> tuple[int, dict[str, str], bytes]:
        p = self._payload()
        repo_id = f"{p.get('organization') or USER}/{p.get('name')}"
        self._can_write(repo_id)
        with self.hub.lock:
            if self.hub.repos.pop(repo_id, None) is None:
                raise _HTTPError(404, "Repository not found", code="RepoNotFound")
        return self._json({})

    def _validate_yaml(self) -> tuple[int, dict[str, str], bytes]:
        import yaml

        content = self._payload().get("content", "")
        errors: list[dict[str, str]] = []
        meta: Any = {}
        m = re.match(r"^---\s*\n(.*?)\n---\s*(\n|$)", content, re.S)
        if m:
            try:
                meta = yaml.safe_load(m.group(1)) or {}
            except yaml.YAMLError as e:
                errors.append({"message": f"YAML is invalid: {e}"})
        if not isinstance(meta, dict):
            errors.append({"message": "metadata must be a YAML mapping"})
            meta = {}
        base = meta.get("base_model")
        for b in [base] if isinstance(base, str) else base or []:
            # The real Hub rejects anything that is not an existing model id (peft PR #2124).
            if not isinstance(b, str) or not _HUB_ID_RE.match(b) or ".." in b or "--" in b:
                errors.append(
                    {
                        "message": f'"base_model" with value "{b}" is not valid. Use a model id from https://hf.co/models.'
                    }
                )
        rel = meta.get("base_model_relation")
        if rel is not None and rel not in ("adapter", "merge", "quantized", "finetune"):
            errors.append(
                {
                    "message": '"base_model_relation" must be one of adapter, merge, quantized, finetune'
                }
            )
        if rel is not None and base is None:
            errors.append({"message": '"base_model_relation" requires "base_model"'})
        tags = meta.get("tags")
        if tags is not None and not (
            isinstance(tags, list) and all(isinstance(t, str) for t in tags)
        ):
            errors.append({"message": '"tags" must be a list of strings'})
        if errors:
            return self._json({"errors": errors, "warnings": []}, 400)
        return self._json({"errors": [], "warnings": []})

    def _info(self, repo_id: str, rev: str) -> tuple[int, dict[str, str], bytes]:
        repo = self._repo(repo_id)
        c = self._commit_for(repo, rev)
        blobs = "blobs" in self.query
        siblings = []
        for path, b in sorted(c.files.items()):
            s: dict[str, Any] = {"rfilename": path}
            if blobs:
                s.update(size=b.size, blobId=b.git_oid)
                if b.lfs:
                    s["lfs"] = {
                        "sha256": b.sha256,
                        "size": b.size,
                        "pointerSize": len(lfs_pointer(b.sha256, b.size)),
                    }
            siblings.append(s)
        return self._json(
            {
                "_id": hashlib.sha1(repo_id.encode()).hexdigest()[:24],
                "id": repo_id,
                "modelId": repo_id,
                "author": repo_id.split("/")[0],
                "sha": c.oid,
                "private": repo.private,
                "disabled": False,
                "gated": False,
                "lastModified": c.date,
                "createdAt": repo.history(rev)[-1].date,
                "tags": [],
                "downloads": 0,
                "likes": 0,
                "library_name": None,
                "siblings": siblings,
            }
        )

    def _tree(self, repo_id: str, rev: str, prefix: str) -> tuple[int, dict[str, str], bytes]:
        repo = self._repo(repo_id)
        c = self._commit_for(repo, rev)
        if repo_id in self.hub.tree_override:
            return self._json(self.hub.tree_override[repo_id])
        recursive = self.query.get("recursive", ["false"])[0].lower() in ("1", "true")
        base = prefix.strip("/") + "/" if prefix.strip("/") else ""
        if base and not any(p.startswith(base) for p in c.files):
            raise _HTTPError(404, f"{prefix} does not exist", code="EntryNotFound")
        entries: dict[str, dict[str, Any]] = {}
        for path, b in sorted(c.files.items()):
            if not path.startswith(base):
                continue
            rel = path[len(base) :].split("/")
            for i in range(1, len(rel)):  # folders on the way
                if not recursive and i > 1:
                    break
                folder = base + "/".join(rel[:i])
                entries.setdefault(
                    folder,
                    {
                        "type": "directory",
                        "path": folder,
                        "oid": hashlib.sha1(folder.encode()).hexdigest(),
                    },
                )
            if recursive or len(rel) == 1:
                e: dict[str, Any] = {"type": "file", "path": path, "size": b.size, "oid": b.git_oid}
                if b.lfs:
                    e["lfs"] = {
                        "oid": b.sha256,
                        "size": b.size,
                        "pointerSize": len(lfs_pointer(b.sha256, b.size)),
                    }
                entries[path] = e
        return self._json(list(entries.values()))

    def _refs(self, repo_id: str) -> tuple[int, dict[str, str], bytes]:
        repo = self._repo(repo_id)
        branches = [
            {"name": n, "ref": f"refs/heads/{n}", "targetCommit": oid}
            for n, oid in repo.branches.items()
        ]
        return self._json({"branches": branches, "converts": [], "tags": [], "pullRequests": []})

    def _commits(self, repo_id: str, rev: str) -> tuple[int, dict[str, str], bytes]:
        repo = self._repo(repo_id)
        self._commit_for(repo, rev)
        return self._json(
            [
                {
                    "id": c.oid,
                    "title": c.title,
                    "message": c.message,
                    "date": c.date,
                    "authors": [{"user": c.author}],
                }
                for c in repo.history(rev)
            ]
        )

    def _branch(self, repo_id: str, branch: str) -> tuple[int, dict[str, str], bytes]:
        repo = self._repo(repo_id)
        self._can_write(repo_id)
        start = self._payload().get("startingPoint") or "main"
        with self.hub.lock:
            if branch in repo.branches:
                raise _HTTPError(409, f"Reference refs/heads/{branch} already exists")
            repo.branches[branch] = self._commit_for(repo, start).oid
        return self._json({})

    def _mode_for(self, path: str) -> str:
        if self.hub.upload_mode == "lfs" and path.endswith(LFS_SUFFIXES):
            return "lfs"
        return "regular"

    def _preupload(self, repo_id: str, rev: str) -> tuple[int, dict[str, str], bytes]:
        repo = self._repo(repo_id)
        self._can_write(repo_id)
        c = self._commit_for(repo, rev)
        files = []
        for f in self._payload().get("files", []):
            path = f["path"]
            mode = self._mode_for(path) if f.get("size", 0) > 0 else "regular"
            existing = c.files.get(path)
            oid = None
            if existing is not None:
                # The Hub's no-op signal: sha256 for LFS files, git blob sha1 for regular ones.
                oid = existing.sha256 if existing.lfs else existing.git_oid
                if existing.lfs != (mode == "lfs"):
                    oid = None
            files.append({"path": path, "uploadMode": mode, "shouldIgnore": False, "oid": oid})
        return self._json({"files": files, "commitOid": c.oid})

    def _lfs_batch(self, repo_id: str) -> tuple[int, dict[str, str], bytes]:
        self._repo(repo_id)
        self._can_write(repo_id)
        p = self._payload()
        if p.get("operation") != "upload":
            raise _HTTPError(400, "only uploads are supported")
        objects = []
        for o in p.get("objects", []):
            oid, size = o["oid"], o["size"]
            if oid in self.hub.lfs_store:
                objects.append({"oid": oid, "size": size})  # already uploaded: no actions
                continue
            sig = secrets.token_hex(8)
            with self.hub.lock:
                self.hub._upload_sigs[oid] = sig
            # Real-Hub-looking hrefs: the client rewrites huggingface.co to its endpoint.
            objects.append(
                {
                    "oid": oid,
                    "size": size,
                    "authenticated": True,
                    "actions": {
                        "upload": {"href": f"{self.hub.url}/_lfs/{oid}?sig={sig}&size={size}"},
                        "verify": {"href": f"{self.hub.url}/_lfs/{oid}/verify"},
                    },
                }
            )
        return self._json({"transfer": "basic", "objects": objects, "hash_algo": "sha256"})

    def _lfs_put(self, oid: str) -> tuple[int, dict[str, str], bytes]:
        sig = self.query.get("sig", [""])[0]
        if self.hub._upload_sigs.get(oid) != sig:
            raise _HTTPError(403, "bad or expired upload signature")
        size = int(self.query.get("size", ["-1"])[0])
        if len(self.body) != size or hashlib.sha256(self.body).hexdigest() != oid:
            raise _HTTPError(400, "uploaded bytes do not match the announced oid/size")
        with self.hub.lock:
            self.hub.lfs_store[oid] = self.body
        return 200, {"ETag": f'"{hashlib.md5(self.body).hexdigest()}"'}, b""

    def _lfs_verify(self, oid: str) -> tuple[int, dict[str, str], bytes]:
        p = self._payload()
        data = self.hub.lfs_store.get(oid)
        if data is None or p.get("oid") != oid or p.get("size") != len(data):
            raise _HTTPError(404, "object not found")
        return self._json({})

    def _commit(self, repo_id: str, rev: str) -> tuple[int, dict[str, str], bytes]:
        repo = self._repo(repo_id)
        self._can_write(repo_id)
        if rev not in repo.branches:
            raise _HTTPError(404, f"Invalid rev id: {rev}", code="RevisionNotFound")
        if "ndjson" not in self.headers.get("Content-Type", ""):
            raise _HTTPError(400, "commit body must be NDJSON")
        lines = [json.loads(line) for line in self.body.decode().splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise _HTTPError(400, "first NDJSON line must be the header")
        header = lines[0]["value"]
        with self.hub.lock:
            head = repo.commits[repo.branches[rev]]
            parent = header.get("parentCommit")
            if parent and parent != head.oid:
                raise _HTTPError(412, "A commit has happened since. Please refresh and try again.")
            files = dict(head.files)
            for line in lines[1:]:
                key, v = line["key"], line["value"]
                path = v["path"]
                if path.startswith("/") or ".." in path.split("/"):
                    raise _HTTPError(400, f"invalid path {path!r}")
                if key == "file":
                    files[path] = Blob(base64.b64decode(v["content"]), False)
                elif key == "lfsFile":
                    data = self.hub.lfs_store.get(v["oid"])
                    if data is None or len(data) != v["size"]:
                        raise _HTTPError(422, f"LFS object {v['oid']} was never uploaded")
                    files[path] = Blob(data, True)
                elif key == "deletedFile":
                    if files.pop(path, None) is None:
                        raise _HTTPError(
                            404, "A file with this name doesn't exist", code="EntryNotFound"
                        )
                elif key == "deletedFolder":
                    files = {
                        p: b for p, b in files.items() if not p.startswith(path.rstrip("/") + "/")
                    }
                else:
                    raise _HTTPError(400, f"unknown NDJSON key {key!r}")
            c = self.hub.commit(
                repo,
                rev,
                files,
                header.get("summary", ""),
                header.get("description", ""),
                author=(self._user() or (USER, ""))[0],
            )
        return self._json(
            {
                "success": True,
                "commitOid": c.oid,
                "commitUrl": f"{self.hub.url}/{repo_id}/commit/{c.oid}",
                "hookOutput": "",
            }
        )

    def _resolve(
        self, method: str, repo_id: str, rev: str, path: str
    ) -> tuple[int, dict[str, str], bytes]:
        repo = self._repo(repo_id)
        c = self._commit_for(repo, rev)
        b = c.files.get(path)
        if b is None:
            raise _HTTPError(
                404, "Entry not found", code="EntryNotFound", headers={"X-Repo-Commit": c.oid}
            )
        etag = self.hub.bad_etag or b.etag
        headers = {
            "X-Repo-Commit": c.oid,
            "ETag": f'"{etag}"',
            "Accept-Ranges": "bytes",
            "Content-Type": "application/octet-stream",
        }
        if b.lfs:
            headers.update({"X-Linked-Etag": f'"{etag}"', "X-Linked-Size": str(b.size)})
        data = b.data
        status = 200
        rng = self.headers.get("Range")
        if rng:
            m = re.fullmatch(r"bytes=(\d*)-(\d*)", rng.strip())
            if not m or (not m.group(1) and not m.group(2)):
                raise _HTTPError(416, "bad range", headers={"Content-Range": f"bytes */{b.size}"})
            if m.group(1):
                start = int(m.group(1))
                end = min(int(m.group(2)), b.size - 1) if m.group(2) else b.size - 1
            else:
                start, end = max(b.size - int(m.group(2)), 0), b.size - 1
            if start >= b.size or end < start:
                raise _HTTPError(
                    416, "range not satisfiable", headers={"Content-Range": f"bytes */{b.size}"}
                )
            data = data[start : end + 1]
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end}/{b.size}"
        headers["Content-Length"] = str(len(data))
        return status, headers, data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--mode", choices=["lfs", "regular"], default="regular")
    args = parser.parse_args()
    server = HubServer(upload_mode=args.mode).start(args.port)
    print(
        f"serving on {server.url} (write token {WRITE_TOKEN}); HF_ENDPOINT={server.url}", flush=True
    )
    with contextlib.suppress(KeyboardInterrupt):
        while True:
            time.sleep(3600)


if __name__ == "__main__":
    main()
