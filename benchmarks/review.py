"""Benchmark: how fast `skinvlm review` shows the next record after a decision, on the AI Hub set's 10,800 records.

    python benchmarks/review.py --n 10800 --decisions 300

Builds a workspace of N small photos (6 classes x 2 views), describes them offline from the templates, fixes
them, starts the real `skinvlm review` server and, as a reviewer's browser does, posts decisions over HTTP:
(a) the page's way: each decision's answer carries the next record, shown in place;
(b) baseline, a server-rendered form's way: the same decision, then the whole page loaded again.
Both take turns. Prints p50/p95 milliseconds from a decision to the next record shown, and the ratio.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from http.cookiejar import CookieJar
from pathlib import Path


def run(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "skinvlm", *args], check=True, capture_output=True)


def build(root: Path, n: int) -> Path:
    from skinvlm.demo.synthetic import write_tree

    per_folder = max(1, n // 12)
    write_tree(root / "src", {"train": per_folder * 8 // 9, "test": per_folder - per_folder * 8 // 9}, size=16)
    workspace = root / "ws"
    run("ingest", str(root / "src"), "-w", str(workspace))
    run("describe", "--template", "-w", str(workspace))
    run("fix", "-w", str(workspace))
    return workspace


class Reviewer:
    def __init__(self, url: str, name: str) -> None:
        self.url = url
        self.opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(CookieJar()))
        self.load_page()
        self.item = self.post("/api/reviewer", {"reviewer": name})

    def post(self, path: str, body: dict) -> dict:
        request = urllib.request.Request(
            self.url + path,
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json", "X-CSRF-Token": self.csrf},
        )
        with self.opener.open(request) as response:
            return json.loads(response.read())

    def load_page(self) -> dict:
        page = self.opener.open(self.url + "/").read().decode()
        self.csrf = page.split('<meta name="csrf" content="')[1].split('"')[0]
        return json.loads(page.split('<script id="boot" type="application/json">')[1].split("</script>")[0])["item"]

    def decide(self, reload: bool) -> float:
        body = {"id": self.item["id"], "version": self.item["version"], "decision": "accept",
                "label": self.item["label"], "text": None, "reason": ""}  # fmt: skip
        started = time.perf_counter()
        self.item = self.post("/api/decide", body)
        if reload:
            self.item = self.load_page()
        return (time.perf_counter() - started) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=10800, help="records (the AI Hub set has 10,800)")
    parser.add_argument("--decisions", type=int, default=300, help="decisions timed per way")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="skinvlm-bench-review-"))
    server = None
    try:
        print(f"building a workspace of {args.n:,} records ...", flush=True)
        workspace = build(tmp, args.n)
        port = 8799
        server = subprocess.Popen(
            [sys.executable, "-m", "skinvlm", "review", "-w", str(workspace), "--port", str(port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )  # fmt: skip
        url = f"http://127.0.0.1:{port}"
        for _ in range(600):
            try:
                urllib.request.urlopen(url + "/api/next", timeout=1)
                break
            except OSError:
                time.sleep(0.1)
        in_place, reloaded = Reviewer(url, "kim"), Reviewer(url, "lee")
        times: dict[str, list[float]] = {"in place (the page)": [], "decision + page reload (baseline)": []}
        for _ in range(args.decisions):
            times["in place (the page)"].append(in_place.decide(reload=False))
            times["decision + page reload (baseline)"].append(reloaded.decide(reload=True))
        records = json.loads(urllib.request.urlopen(url + "/api/next").read())["progress"]["records"]
        print(f"records: {records:,}; decisions per way: {args.decisions} (taking turns), the journal growing")
        medians = {}
        for name, values in times.items():
            values.sort()
            medians[name] = statistics.median(values)
            print(f"{name:38s} p50 {medians[name]:6.1f} ms   p95 {values[int(len(values) * 0.95)]:6.1f} ms")
        ours, baseline = medians.values()
        print(f"speed ratio (baseline / in place, p50): {baseline / ours:.2f}x; target p50 < 100 ms: "
              f"{'met' if ours < 100 else 'MISSED'}")  # fmt: skip
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=30)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
