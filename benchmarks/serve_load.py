"""Load on `cxrclip serve`: N concurrent clients on localhost for a bounded time and count, bad uploads mixed
in; prints requests/s, p50/p95/p99 latency, errors, and the server's RSS before and after.

    python benchmarks/serve_load.py --model_path demo_out/run/checkpoints/model-best.tar --image IMG.png \\
        --clients 8 --seconds 60 --max-requests 1000

The server runs as a separate process (`cxrclip serve` on 127.0.0.1 and a free port), as in production.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path


def http_client():
    """httpx2 (what starlette uses) or httpx: the same API."""
    try:
        import httpx2 as httpx
    except ImportError:
        import httpx
    return httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    httpx = http_client()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with {proc.returncode}")
        try:
            if httpx.get(url + "/healthz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            time.sleep(0.3)
    raise SystemExit("the server did not become ready")


def client_loop(url, image, bad_every, stop_at, budget, latencies, errors, unexpected, lock):
    httpx = http_client()
    with httpx.Client(timeout=30) as client:
        while time.monotonic() < stop_at:
            with lock:
                if budget[0] <= 0:
                    return
                budget[0] -= 1
                n = budget[1] = budget[1] + 1
            bad = bad_every and n % bad_every == 0
            payload = (b"not an image at all", "bad.png") if bad else (image, "x.png")
            start = time.perf_counter()
            try:
                response = client.post(url + "/v1/predict", files={"file": (payload[1], payload[0], "image/png")})
                status = response.status_code
            except httpx.HTTPError as e:
                with lock:
                    errors.append(repr(e))
                continue
            elapsed = time.perf_counter() - start
            with lock:
                if bad:
                    if status != 415:
                        unexpected.append(status)
                elif status == 200:
                    latencies.append(elapsed)
                else:
                    errors.append(status)


def percentile(values, q):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model_path", required=True)
    p.add_argument("--image", required=True, help="a PNG/JPEG/DICOM to send")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--seconds", type=float, default=60)
    p.add_argument("--max-requests", type=int, default=1000)
    p.add_argument("--bad-every", type=int, default=10, help="every n-th request uploads a non-image (0: none)")
    p.add_argument("--workers", type=int, default=2)
    args = p.parse_args()

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "cxrclip.cli", "serve", "--model_path", args.model_path, "--port", str(port),
           "--workers", str(args.workers)]  # fmt: skip
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        start = time.perf_counter()
        wait_ready(url, proc)
        print(f"server ready in {time.perf_counter() - start:.1f} s (pid {proc.pid})")
        image = Path(args.image).read_bytes()
        httpx = http_client()
        for _ in range(3):  # warm-up
            httpx.post(url + "/v1/predict", files={"file": ("x.png", image)}, timeout=60)
        rss_before = rss_mb(proc.pid)
        latencies, errors, unexpected, lock = [], [], [], threading.Lock()
        budget = [args.max_requests, 0]
        stop_at = time.monotonic() + args.seconds
        threads = [
            threading.Thread(
                target=client_loop,
                args=(url, image, args.bad_every, stop_at, budget, latencies, errors, unexpected, lock),
            )
            for _ in range(args.clients)
        ]
        began = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - began
        rss_after = rss_mb(proc.pid)
        done = budget[1]
        ok = len(latencies)
        print(f"clients {args.clients}, server workers {args.workers}, {done} requests in {wall:.1f} s "
              f"({done / wall:.2f} req/s; {ok} good images, {done - ok - len(errors)} bad uploads)")  # fmt: skip
        if latencies:
            print(
                f"latency of good requests: p50 {percentile(latencies, 50):.3f} s, p95 {percentile(latencies, 95):.3f}"
                f" s, p99 {percentile(latencies, 99):.3f} s, mean {statistics.mean(latencies):.3f} s"
            )
        print(f"errors: {len(errors)} {errors[:5]}; bad uploads not answered 415: {len(unexpected)} {unexpected[:5]}")
        print(f"server RSS: {rss_before:.0f} MB before, {rss_after:.0f} MB after ({rss_after - rss_before:+.0f} MB)")
        return 0 if not errors and not unexpected else 1
    finally:
        proc.terminate()
        proc.wait(timeout=30)


if __name__ == "__main__":
    sys.exit(main())
