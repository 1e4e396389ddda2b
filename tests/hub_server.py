"""A local stand-in for the Hugging Face Hub's upload API, for tests of ``push_to_hub``.

It answers the endpoints huggingface_hub's ``create_repo`` and ``upload_folder`` call:
``POST /api/repos/create``, ``POST /api/validate-yaml`` (the README's metadata, accepted),
``POST /api/models/{repo}/preupload/{rev}`` (every file is to be sent inline, "regular") and
``POST /api/models/{repo}/commit/{rev}`` (an NDJSON body: a header line, then one line per file
with its base64 content). It records what it received. The client's optional look-up of
``GET /api/agent-harnesses`` gets a 404, which the client ignores; any other request gets a 404
and is recorded as unexpected.
"""

from __future__ import annotations

import base64
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Iterator

_PREUPLOAD = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)/preupload/(?P<rev>[^/?]+)")
_COMMIT = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)/commit/(?P<rev>[^/?]+)")


@dataclass
class HubRecord:
    """What the stand-in received."""

    url: str = ""
    created: list[dict[str, Any]] = field(default_factory=list)
    validated: list[str] = field(default_factory=list)  # README.md contents sent to validate-yaml
    authorizations: set[str] = field(default_factory=set)
    commits: list[dict[str, Any]] = field(
        default_factory=list
    )  # {"repo", "revision", "summary", "files": {path: bytes}}
    unexpected: list[str] = field(default_factory=list)


def _handler(record: HubRecord) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:  # keep the test output clean
            pass

        def _reply(self, status: int, payload: dict[str, Any]) -> None:
            body = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            record.authorizations.add(self.headers.get("Authorization", ""))
            if self.path == "/api/repos/create":
                payload = json.loads(body)
                record.created.append(payload)
                self._reply(200, {"url": f"{record.url}/{payload['organization']}/{payload['name']}"})
            elif self.path == "/api/validate-yaml":
                record.validated.append(json.loads(body)["content"])
                self._reply(200, {"errors": [], "warnings": []})
            elif match := _PREUPLOAD.match(self.path):
                files = json.loads(body)["files"]
                self._reply(
                    200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]}
                )
            elif match := _COMMIT.match(self.path):
                lines = [json.loads(line) for line in body.splitlines() if line.strip()]
                header, *operations = lines
                assert header["key"] == "header" and all(op["key"] == "file" for op in operations), lines
                files = {op["value"]["path"]: base64.b64decode(op["value"]["content"]) for op in operations}
                record.commits.append(
                    {
                        "repo": match["repo"],
                        "revision": match["rev"],
                        "summary": header["value"]["summary"],
                        "files": files,
                    }
                )
                self._reply(
                    200, {"commitUrl": f"{record.url}/{match['repo']}/commit/{'a' * 40}", "commitOid": "a" * 40}
                )
            else:
                record.unexpected.append(f"POST {self.path}")
                self._reply(404, {"error": "not served by the stand-in"})

        def do_GET(self) -> None:
            if self.path != "/api/agent-harnesses":
                record.unexpected.append(f"GET {self.path}")
            self._reply(404, {"error": "not served by the stand-in"})

    return Handler


def serve_hub() -> Iterator[HubRecord]:
    """Run the stand-in on a free local port until the generator is closed; yields its record (``url`` set)."""
    record = HubRecord()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(record))
    record.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield record
    finally:
        server.shutdown()
        server.server_close()
