"""The judging server: a local page per prompt, each preference appended to OUT/judgements.jsonl.

    httpd, session = serve("/tmp/judge", port=0)     # 127.0.0.1, a free port
    print(f"http://127.0.0.1:{httpd.server_address[1]}/")
    httpd.serve_forever()

GET  /                            the first unjudged prompt (or the rates when all are judged)
GET  /prompt/<id>                 the prompt and its two answers, left and right
POST /prompt/<id>                 choice=left|right|tie: one judgement, appended, flushed and fsynced
GET  /report, /report.json        A's win / tie / loss rates with 95% intervals
GET  /image/<id>/<side>/<name>    an answer's image, addressed by side so the page stays blind
GET  /input/<id>/<k>              a prompt's input image

Only files that pairing.json and the answers' output.json name are served. Each judgement is on disk
before the browser moves on, so stopping the server at any moment loses none; a restart resumes at the
first unjudged prompt. A form token (new per start) keeps other pages open in the judge's browser
from posting judgements; a page from before a restart asks to reload.
"""
from __future__ import annotations

import datetime
import http.server
import json
import mimetypes
import os
import secrets
import threading
import urllib.parse

from etils import epath

from chameleon_jax.evals import pairwise
from chameleon_jax.judge import page, responses

JUDGEMENTS = "judgements.jsonl"


class Session:
    """The judging state of one OUT folder: its pairing, and the judgements so far (kept on disk)."""

    def __init__(self, out: str):
        if "://" in str(out):
            raise ValueError(f"--out={out}: judging appends to a local file; give a local folder (copy the "
                             "answers there first)")
        self.out = epath.Path(out)
        self.pairing = responses.read_pairing(out)
        self.prompts = self.pairing["prompts"]
        self.ids = [p["id"] for p in self.prompts]
        self.by_key = {str(p["id"]): p for p in self.prompts}
        self.token = secrets.token_urlsafe(16)
        path = self.out / JUDGEMENTS
        text = path.read_text() if path.exists() else ""
        self.records, self.bad_lines = pairwise.parse_records(text)
        self._lock = threading.Lock()
        self._file = open(path, "a", encoding="utf-8")
        if text and not text.endswith("\n"):  # a line cut short by a kill: the next record starts a new line
            self._file.write("\n")
            self._flush()

    def _flush(self):
        self._file.flush()
        os.fsync(self._file.fileno())

    def record(self, prompt: dict, choice: str) -> dict:
        """Appends the judge's `choice` for `prompt`, with the sides it was shown on; on disk on return."""
        now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds")
        r = pairwise.judgement(prompt["id"], choice, prompt["left"], now)
        with self._lock:
            self._file.write(json.dumps(r) + "\n")
            self._flush()
            self.records.append(r)
        return r

    def latest(self) -> dict:
        with self._lock:
            return pairwise.latest(self.records)

    def first_unjudged(self):
        with self._lock:
            return pairwise.first_unjudged(self.ids, self.records)

    def rates(self) -> dict:
        return pairwise.rates(self.latest().values())

    def rates_json(self) -> dict:
        return {"total": len(self.ids), "judged": len(self.latest()), "a": self.pairing["a"],
                "b": self.pairing["b"], "rates": pairwise.as_json(self.rates())}

    def report(self) -> str:
        text = pairwise.report(self.rates(), self.pairing["a"], self.pairing["b"], total=len(self.ids))
        if self.bad_lines:
            text += f"\n({len(self.bad_lines)} unreadable line(s) of {JUDGEMENTS} left out: {self.bad_lines})"
        return text

    def close(self):
        self._file.close()


class _Handler(http.server.BaseHTTPRequestHandler):
    server_version = "chameleon-judge"

    @property
    def session(self) -> Session:
        return self.server.session

    def log_message(self, format, *args):  # noqa: A002 - the base class's name
        pass  # the terminal is for the URL and the rates; requests are not news

    def _send(self, status: int, body: bytes, content_type: str = "text/html; charset=utf-8", headers=()):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        for k, v in headers:
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def _redirect(self, location: str):
        self._send(303, b"", headers=[("Location", location)])

    def _error(self, status: int, why: str):
        self._send(status, why.encode(), "text/plain; charset=utf-8")

    def _local_host(self) -> bool:
        # Another site in the judge's browser may resolve its own name to 127.0.0.1 (DNS rebinding).
        host = self.headers.get("Host", "").rsplit(":", 1)[0]
        return host in ("127.0.0.1", "localhost")

    def _route(self):
        return [urllib.parse.unquote(p) for p in urllib.parse.urlsplit(self.path).path.split("/")[1:]]

    def do_GET(self):  # noqa: N802 - http.server's name
        if not self._local_host():
            return self._error(403, "open the page at http://127.0.0.1:<port>/")
        route, s = self._route(), self.session
        if route in ([""], []):
            nxt = s.first_unjudged()
            return self._redirect("/report" if nxt is None else f"/prompt/{urllib.parse.quote(str(nxt))}")
        if route[0] == "prompt" and len(route) == 2 and route[1] in s.by_key:
            return self._send(200, self._pair_page(s.by_key[route[1]]).encode())
        if route == ["report"]:
            nxt = s.first_unjudged()
            return self._send(200, page.render_report(s.report(), done=nxt is None, first_unjudged=nxt,
                                                      bad_lines=s.bad_lines).encode())
        if route == ["report.json"]:
            return self._send(200, json.dumps(s.rates_json()).encode(), "application/json")
        if route[0] == "image" and len(route) == 4 and route[1] in s.by_key and route[2] in pairwise.SIDES:
            prompt = s.by_key[route[1]]
            side = prompt["left"] if route[2] == "left" else pairwise.other(prompt["left"])
            names = {p["image"] for p in responses.answer_parts(s.out, side, prompt["id"]) if "image" in p}
            if route[3] in names:
                return self._send_file(s.out / side / str(prompt["id"]) / route[3])
        if route[0] == "input" and len(route) == 3 and route[1] in s.by_key and route[2].isdigit():
            inputs = s.by_key[route[1]]["inputs"]
            if int(route[2]) < len(inputs):
                return self._send_file(s.out / "inputs" / inputs[int(route[2])])
        return self._error(404, "no such page")

    def do_POST(self):  # noqa: N802
        if not self._local_host():
            return self._error(403, "open the page at http://127.0.0.1:<port>/")
        route, s = self._route(), self.session
        if not (len(route) == 2 and route[0] == "prompt" and route[1] in s.by_key):
            return self._error(404, "no such prompt")
        length = int(self.headers.get("Content-Length") or 0)
        form = urllib.parse.parse_qs(self.rfile.read(min(length, 4096)).decode("utf-8", "replace"))
        if form.get("token") != [s.token]:
            return self._error(403, "this page is from before the server restarted (or from elsewhere): "
                                    "reload it and judge again")
        choice = (form.get("choice") or [""])[0]
        if choice not in pairwise.CHOICES:
            return self._error(400, f"choice must be one of {pairwise.CHOICES}")
        s.record(s.by_key[route[1]], choice)
        return self._redirect("/")

    def _pair_page(self, prompt: dict) -> str:
        s = self.session
        left = responses.answer_parts(s.out, prompt["left"], prompt["id"])
        right = responses.answer_parts(s.out, pairwise.other(prompt["left"]), prompt["id"])
        latest = s.latest()
        i = s.ids.index(prompt["id"])
        earlier = latest.get(prompt["id"], {}).get("choice")
        return page.render_pair(prompt, left, right, judged=len(latest), total=len(s.ids), token=s.token,
                                earlier=earlier, previous_id=s.ids[i - 1] if i else None,
                                next_id=s.ids[i + 1] if i + 1 < len(s.ids) else None)

    def _send_file(self, path: epath.Path):
        kind = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        return self._send(200, path.read_bytes(), kind)


def serve(out: str, port: int = 0) -> tuple[http.server.ThreadingHTTPServer, Session]:
    """A server on 127.0.0.1:`port` (0: a free one) over the answers in OUT; call serve_forever()."""
    session = Session(out)
    try:
        httpd = http.server.ThreadingHTTPServer(("127.0.0.1", port), _Handler)
    except OSError as e:
        session.close()
        raise ValueError(f"cannot serve on 127.0.0.1:{port} ({e.strerror}); port 0 (--port=0) picks a free "
                         "one") from e
    httpd.session = session
    return httpd, session


def write_rates(session: Session) -> str:
    """OUT/rates.json (the rates as report.json serves them) and the report's text."""
    (session.out / "rates.json").write_text(json.dumps(session.rates_json(), indent=1))
    return session.report()


def run(out: str, port: int = 0, log=print) -> None:
    """Serves OUT until Ctrl-C or SIGTERM, then prints the rates (also to OUT/rates.json)."""
    import signal

    httpd, session = serve(out, port)
    nxt = session.first_unjudged()
    log(f"judging {len(session.ids)} prompt(s), {len(session.latest())} judged; open "
        f"http://127.0.0.1:{httpd.server_address[1]}/ (keys: left/right arrows, down arrow or T for a tie; "
        "Ctrl-C stops and prints the rates)" + ("" if nxt is not None else " -- all judged already"))

    def stop(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        httpd.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        httpd.server_close()
        session.close()
        log(write_rates(session))
