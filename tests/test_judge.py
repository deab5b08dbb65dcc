"""Pairwise human judging (`python -m chameleon_jax.judge`): a tiny checkpoint answers a prompts file,
a folder of earlier answers is the other side, and headless Chromium, driven over the DevTools protocol,
judges every prompt on the served page with clicks and keys. The records, mapped back through the
sides the page showed, and the rates must be the sequence the test chose. Pure tests cover the side
mapping, the record format and the rates with their intervals."""
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request

import numpy as np
import pytest
from PIL import Image

from chameleon_jax.evals import pairwise
from chameleon_jax.evals.stats import wilson_interval
from chameleon_jax.generate.answer import Decoding
from chameleon_jax.judge import page, responses, server
from chameleon_jax.sampling import SamplingParams
from test_generate_program import FAST_COMPILE, REPO, make_export

# ---------------------------------------------------------------------------------------------------------------
# pure: sides, records, rates


@pytest.mark.parametrize("choice,left,expected", [
    ("left", "A", "A"), ("left", "B", "B"), ("right", "A", "B"), ("right", "B", "A"), ("tie", "A", "tie"),
    ("tie", "B", "tie")])
def test_a_choice_of_side_maps_back_to_the_checkpoint_shown_there(choice, left, expected):
    r = pairwise.judgement(7, choice, left, "t")
    assert r["winner"] == expected and {r["left"], r["right"]} == {"A", "B"}


def test_sides_are_balanced_reproducible_and_drawn_by_the_seed():
    ids = list(range(1, 12))
    sides = pairwise.assign_sides(ids, seed=3)
    assert list(sides) == ids and abs(sum(v == "A" for v in sides.values()) - 5.5) == 0.5
    assert pairwise.assign_sides(ids, seed=3) == sides
    draws = {tuple(pairwise.assign_sides(ids, seed=s).values()) for s in range(20)}
    assert len(draws) > 15  # the seed, not the prompt order, decides


def test_records_survive_a_truncated_line_and_the_last_judgement_counts():
    lines = [pairwise.judgement(1, "left", "A", "t0"), pairwise.judgement(2, "tie", "B", "t1"),
             pairwise.judgement(1, "left", "B", "t2"), {**pairwise.judgement(3, "left", "A", "t3"), "winner": "B"}]
    text = "\n".join(json.dumps(r) for r in lines) + '\n{"prompt": 4, "choi'
    records, bad = pairwise.parse_records(text)
    assert bad == [4, 5]  # a winner that contradicts the sides, and the line a kill cut short
    last = pairwise.latest(records)
    assert {k: r["winner"] for k, r in last.items()} == {2: "tie", 1: "B"}
    assert pairwise.first_unjudged([1, 2, 3], records) == 3
    assert pairwise.first_unjudged([1, 2], records) is None


def test_rates_count_each_outcome_with_its_wilson_interval():
    choices = {"l": "left", "r": "right", "t": "tie"}
    records = [pairwise.judgement(i, choices[c], "A", "t") for i, c in enumerate("llllrrtlll")]  # 7 A, 2 B, 1 tie
    result = pairwise.rates(records)
    assert [(result[k].count, result[k].n) for k in pairwise.OUTCOMES] == [(7, 10), (1, 10), (2, 10)]
    # Wilson at 7/10, z = 1.959964: centre (0.7 + z²/20) / (1 + z²/10) = 0.6245, half-width 0.2563.
    assert result["win"].low == pytest.approx(0.3968, abs=1e-4) and result["win"].high == pytest.approx(0.8922,
                                                                                                         abs=1e-4)
    text = pairwise.report(result, "run x", "run y", total=12)
    assert text.splitlines()[2:] == ["judged 10 of 12 prompts",
                                     "A wins    70.0%  (7/10)  95% CI [39.7%,  89.2%]",
                                     "ties      10.0%  (1/10)  95% CI [ 1.8%,  40.4%]",
                                     "A loses   20.0%  (2/10)  95% CI [ 5.7%,  51.0%]"]
    empty = pairwise.rates([])
    assert (empty["win"].low, empty["win"].high) == (0.0, 1.0) and math.isnan(empty["win"].rate)


def test_pairing_refuses_missing_and_stale_answers():
    ids, skipped = pairwise.pair_answers([(1, "a"), (2, "b"), (3, "c")], {1: "a", 2: "b", 3: "other"},
                                         {1: "a", 3: "c"})
    assert ids == [1]
    assert skipped[0] == (2, "no readable answer from B") and skipped[1][0] == 3 and "from A is to another prompt" in \
        skipped[1][1]


def test_the_page_escapes_model_output_and_names_no_checkpoint():
    html = page.render_pair({"id": 4, "prompt": "<i>x</i>", "inputs": []},
                            [{"text": "<script>alert(1)</script>"}, {"image": 'a"b.png', "size": [4, 4]}],
                            [{"text": "&amp;"}], judged=0, total=1, token="tok")
    assert "<script>alert" not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "&lt;i&gt;x&lt;/i&gt;" in html and "&amp;amp;" in html
    assert 'src="/image/4/left/a%22b.png"' in html and 'width="16"' in html
    # Input images sit where the prompt's <image> placeholders are.
    html = page.render_pair({"id": 5, "prompt": "a <image> b", "inputs": ["5_1.png"]}, [], [], judged=0, total=1,
                            token="tok")
    assert 'a <img class="input" src="/input/5/0" alt="input image 1"> b</div>' in html


def test_a_restart_after_a_cut_line_appends_on_a_new_line(tmp_path):
    (tmp_path / responses.PAIRING).write_text(json.dumps({"a": "x", "b": "y", "prompts": [
        {"id": 1, "prompt": "p", "inputs": [], "left": "B"}, {"id": 2, "prompt": "q", "inputs": [], "left": "A"}]}))
    (tmp_path / server.JUDGEMENTS).write_text(json.dumps(pairwise.judgement(1, "left", "B", "t")) + '\n{"pro')
    session = server.Session(str(tmp_path))
    session.record(session.by_key["2"], "right")
    session.close()
    records, bad = pairwise.parse_records((tmp_path / server.JUDGEMENTS).read_text())
    assert bad == [2] and [r["winner"] for r in records] == ["B", "B"]


# ---------------------------------------------------------------------------------------------------------------
# the page in Chromium

PROMPTS = [{"prompt": "the red <b>circle</b> & <script>window.pwned = 1</script>"},
           {"prompt": "<image> a small star", "images": ["in.png"]},
           {"prompt": "a blue"},
           "{not json",
           {"prompt": "green line while"},
           {"prompt": "the orange sun"}]
JUDGED = [1, 2, 3, 5, 6]  # line 4 is not JSON


@pytest.fixture(scope="module")
def judging(tmp_path_factory):
    """OUT for a tiny checkpoint (A, sampled) against a folder of earlier answers (B: text, an image, text)."""
    root = tmp_path_factory.mktemp("judge")
    export = make_export(root)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (20, 24, 3), np.uint8)).save(root / "in.png")
    (root / "prompts.jsonl").write_text("\n".join(p if isinstance(p, str) else json.dumps({**p, "mode": "text"})
                                                  for p in PROMPTS) + "\n")
    for line in JUDGED:
        folder = root / "earlier" / str(line)
        folder.mkdir(parents=True)
        Image.fromarray(rng.integers(0, 255, (4, 4, 3), np.uint8)).save(folder / "image_1.png")
        segments = [{"text": f"earlier answer {line} <script>window.pwned = 2</script>"},
                    {"image": "image_1.png", "size": [4, 4]}, {"text": "after the image"}]
        (folder / "output.json").write_text(json.dumps({"prompt": PROMPTS[line - 1]["prompt"], "segments": segments}))
    a = responses.Side(str(export), decoding=Decoding(12, 0, SamplingParams(1.0)))
    b = responses.Side(answers=str(root / "earlier"))
    out = root / "out"
    pairing = responses.prepare(str(out), str(root / "prompts.jsonl"), a, b, sides_seed=0, mesh=(1, 1, 1),
                                compiler_options=FAST_COMPILE, log=lambda line: None)
    return out, pairing


def test_both_sides_are_answered_and_paired(judging):
    out, pairing = judging
    assert [p["id"] for p in pairing["prompts"]] == JUDGED
    assert [s[0] for s in pairing["skipped"]] == [4]
    assert sorted(p["left"] for p in pairing["prompts"]).count("A") in (2, 3)  # balanced sides
    for pid in JUDGED:  # the checkpoint's answers are text, the earlier ones text, an image, text
        assert [list(p) for p in responses.answer_parts(out, "A", pid)] == [["text"]]
        assert [next(iter(p)) for p in responses.answer_parts(out, "B", pid)] == ["text", "image", "text"]
    assert (out / "inputs" / "2_1.png").read_bytes() == (out.parent / "in.png").read_bytes()


def test_one_checkpoint_against_a_second_sample_of_itself(judging, tmp_path):
    """Both sides from one checkpoint: seed 0 again gives the fixture's A answers exactly,
    seed 1 other answers."""
    out, _ = judging
    side = lambda seed: responses.Side(str(out.parent / "export"), decoding=Decoding(12, seed, SamplingParams(1.0)))
    logged = []
    pairing = responses.prepare(str(tmp_path / "out"), str(out.parent / "prompts.jsonl"), side(0), side(1),
                                mesh=(1, 1, 1), compiler_options=FAST_COMPILE, log=logged.append)
    assert [p["id"] for p in pairing["prompts"]] == JUDGED and "(seed 1, temperature 1," in pairing["b"]
    again = {pid: responses.answer_parts(tmp_path / "out", "A", pid) for pid in JUDGED}
    assert again == {pid: responses.answer_parts(out, "A", pid) for pid in JUDGED}
    assert sum(responses.answer_parts(tmp_path / "out", "B", pid) != again[pid] for pid in JUDGED) >= 4
    assert [line.split(":")[0] for line in logged] == ["A", "B"]


class Chromium:
    """Headless Chromium with one page, driven over the Chrome DevTools Protocol (a websocket)."""

    def __init__(self, profile):
        import websocket

        binary = shutil.which("chromium")
        if binary is None:
            pytest.fail("chromium is not installed; install it with `apt-get install -y chromium` (Debian), "
                        "as .ci/run does")
        self.proc = subprocess.Popen(
            [binary, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--no-default-browser-check",
             "--remote-debugging-port=0", "--remote-allow-origins=*", f"--user-data-dir={profile}",
             "--window-size=1000,800", "about:blank"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        port_file = profile / "DevToolsActivePort"
        deadline = time.time() + 60
        while not (port_file.exists() and port_file.read_text().strip()):
            if time.time() > deadline or self.proc.poll() is not None:
                raise RuntimeError("Chromium did not open its DevTools port")
            time.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        targets = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=30).read())
        url = next(t["webSocketDebuggerUrl"] for t in targets if t["type"] == "page")
        self.ws = websocket.create_connection(url, timeout=60, suppress_origin=True)
        self.next_id = 0

    def send(self, method, **params):
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            message = json.loads(self.ws.recv())
            if message.get("id") == self.next_id:  # events and other replies are not ours
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message["result"]

    def js(self, expression):
        result = self.send("Runtime.evaluate", expression=expression, returnByValue=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression, timeout=30):
        """Polls until `expression` is truthy in a fully loaded page (navigations destroy contexts)."""
        deadline = time.time() + timeout
        while True:
            try:
                value = self.js(f"document.readyState === 'complete' && ({expression})")
                if value:
                    return value
            except RuntimeError:
                pass
            if time.time() > deadline:
                raise TimeoutError(f"page never satisfied {expression!r}; at {self.js('location.href')}")
            time.sleep(0.05)

    def go(self, url):
        self.send("Page.navigate", url=url)
        self.wait_for(f"location.href.startsWith({json.dumps(url.rstrip('/'))})")

    def click(self, selector):
        """A real mouse click at the element's centre."""
        box = self.js(f"(() => {{ const e = document.querySelector({json.dumps(selector)}); "
                      "e.scrollIntoView({block: 'center'}); const r = e.getBoundingClientRect(); "
                      "return [r.x + r.width / 2, r.y + r.height / 2]; })()")
        for kind in ("mousePressed", "mouseReleased"):
            self.send("Input.dispatchMouseEvent", type=kind, x=box[0], y=box[1], button="left", clickCount=1)

    KEYS = {"ArrowLeft": ("ArrowLeft", 37, ""), "ArrowRight": ("ArrowRight", 39, ""),
            "ArrowDown": ("ArrowDown", 40, ""), "t": ("KeyT", 84, "t")}

    def press(self, key):
        code, vk, text = self.KEYS[key]
        self.send("Input.dispatchKeyEvent", type="keyDown" if text else "rawKeyDown", key=key, code=code,
                  windowsVirtualKeyCode=vk, text=text)
        self.send("Input.dispatchKeyEvent", type="keyUp", key=key, code=code, windowsVirtualKeyCode=vk)

    def close(self):
        self.ws.close()
        self.proc.terminate()
        self.proc.wait(timeout=30)


def _shown(browser, side):
    """The answer in the page's `side` column as the browser has it: text and image names, in order."""
    return browser.js(f"Array.from(document.querySelectorAll('#{side} > .text, #{side} > img')).map(e => "
                      "e.tagName === 'IMG' ? {image: e.alt} : {text: e.textContent})")


def _as_html_text(parts):
    # The HTML parser turns CR and CRLF into LF and drops NUL: a random model's text may hold them.
    return [{"text": p["text"].replace("\r\n", "\n").replace("\r", "\n").replace("\0", "")} if "text" in p
            else {"image": p["image"]} for p in parts]


def _judge(browser, out, pid, winner, how, pairing):
    """On prompt `pid`'s page: finds which checkpoint the page shows on the left (by the answers' content),
    then expresses `winner` ("A", "B" or "tie") with a click or a key, and waits for the next page."""
    browser.wait_for(f"document.querySelector('h1') && document.querySelector('h1').dataset.prompt === '{pid}'")
    answers = {s: _as_html_text(responses.answer_parts(out, s, pid)) for s in ("A", "B")}
    left, right = _shown(browser, "left"), _shown(browser, "right")
    shown_left = next(s for s in ("A", "B") if answers[s] == left)
    assert right == answers[pairwise.other(shown_left)]
    assert shown_left == next(p["left"] for p in pairing["prompts"] if p["id"] == pid)  # the record will agree
    # Every image is drawn (the server found it by side), and nothing in the answers ran as script.
    assert browser.wait_for("Array.from(document.images).every(i => i.complete && i.naturalWidth > 0)")
    assert browser.js("typeof window.pwned") == "undefined"
    choice = "tie" if winner == "tie" else ("left" if winner == shown_left else "right")
    if how == "click":
        browser.click(f"#choice-{choice}")
    else:
        browser.press({"left": "ArrowLeft", "right": "ArrowRight", "tie": "ArrowDown"}[choice] if how == "arrow"
                      else "t")
    browser.wait_for(f"location.pathname !== '/prompt/{pid}'")
    return choice


def _program(out, stderr, *args):
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
    env.pop("JAX_NUM_CPU_DEVICES", None)
    return subprocess.Popen([sys.executable, "-m", "chameleon_jax.judge", f"--out={out}", *args], env=env,
                            stdout=subprocess.PIPE, stderr=stderr, text=True)


def _wait_for_url(proc, lines):
    for line in proc.stdout:
        lines.append(line)
        m = re.search(r"open (http://127\.0\.0\.1:\d+/)", line)
        if m:
            return m.group(1)
    raise AssertionError("the program did not serve:\n" + "".join(lines))


def test_chromium_judges_every_prompt_and_the_rates_follow(judging, tmp_path):
    out, pairing = judging
    winners = {1: "A", 2: "B", 3: "tie", 5: "A", 6: "A"}
    hows = {1: "click", 2: "arrow", 3: "t", 5: "arrow", 6: "click"}
    httpd, session = server.serve(str(out))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    browser = Chromium(tmp_path / "profile")
    try:
        # First half on a server in this process; every judgement is on disk before the next page shows.
        browser.go(f"http://127.0.0.1:{httpd.server_address[1]}/")
        page_html = browser.js("document.documentElement.outerHTML")
        assert browser.js("document.querySelector('.prompt').textContent").startswith(PROMPTS[0]["prompt"])
        assert browser.js("document.querySelector('.prompt b')") is None
        for hidden in (str(out.parent), pairing["a"], pairing["b"], "/A/", "/B/"):  # nothing says which is which
            assert hidden not in page_html
        chosen = {}
        for k, pid in enumerate(JUDGED[:3], start=1):
            chosen[pid] = _judge(browser, out, pid, winners[pid], hows[pid], pairing)
            records, bad = pairwise.parse_records((out / server.JUDGEMENTS).read_text())
            assert len(records) == k and not bad
        httpd.shutdown()
        httpd.server_close()
        session.close()

        # The program, restarted on the same folder, resumes at the first unjudged prompt.
        errors = open(tmp_path / "stderr.txt", "w")
        proc, lines = _program(out, errors, "--port=0"), []
        try:
            url = _wait_for_url(proc, lines)
            assert "serving the answers already in" in "".join(lines) and "3 judged" in lines[-1]
            browser.go(url)
            for pid in JUDGED[3:]:
                chosen[pid] = _judge(browser, out, pid, winners[pid], hows[pid], pairing)
            # All judged: the rates page. Then prompt 1 judged again, for B: the last judgement counts.
            assert browser.wait_for("location.pathname === '/report'")
            browser.go(url + "prompt/1")
            assert browser.js("document.querySelector('#choice-' + " + json.dumps(chosen[1]) + ").className") == \
                "chosen"
            winners[1] = "B"
            chosen[1] = _judge(browser, out, 1, "B", "click", pairing)
            assert browser.wait_for("location.pathname === '/report'")
            shown_report = browser.js("document.querySelector('#report').textContent")
        finally:
            proc.send_signal(signal.SIGTERM)
            stdout, _ = proc.communicate(timeout=60)
            errors.close()
        assert proc.returncode == 0, (tmp_path / "stderr.txt").read_text()[-3000:]
    finally:
        browser.close()

    # The records, mapped back through the sides each one names, are the chosen sequence.
    records, bad = pairwise.parse_records((out / server.JUDGEMENTS).read_text())
    assert not bad
    assert [r["prompt"] for r in records] == JUDGED + [1]
    left = {p["id"]: p["left"] for p in pairing["prompts"]}
    for r in records:
        assert r["left"] == left[r["prompt"]] and r["right"] == pairwise.other(left[r["prompt"]])
    assert [r["choice"] for r in records[-5:]] == [chosen[p] for p in JUDGED[1:] + [1]]
    assert {p: r["winner"] for p, r in pairwise.latest(records).items()} == winners
    assert records[0]["winner"] == "A" and records[-1]["winner"] == "B"
    # 2 wins (5, 6), 1 tie (3), 2 losses (1, 2) of 5, each with its Wilson interval.
    expected = {"win": 2, "tie": 1, "loss": 2}
    saved = json.loads((out / "rates.json").read_text())
    for k, count in expected.items():
        low, high = wilson_interval(count, 5)
        assert saved["rates"][k]["count"] == count and saved["rates"][k]["n"] == 5
        assert saved["rates"][k]["low"] == pytest.approx(low) and saved["rates"][k]["high"] == pytest.approx(high)
    report = pairwise.report(pairwise.rates(pairwise.latest(records).values()), pairing["a"], pairing["b"], 5)
    assert "A wins    40.0%  (2/5)" in report and "A loses   40.0%  (2/5)" in report
    assert shown_report == report  # on the page at the end ...
    assert stdout.rstrip().endswith(report)  # ... and printed at shutdown
