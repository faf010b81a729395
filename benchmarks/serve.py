"""Load test of `smdm serve` on loopback: N concurrent clients send a fixed number of streamed completion requests
(mixed prompt lengths), against two servers side by side, batching on (--max-batch 16) and off (--max-batch 1), for
an MDM (dual cache, semi-autoregressive blocks) and an ARM (KV cache). Prints requests/s, completion tokens/s,
p50/p95 latency and p50 time-to-first-chunk (medians of alternating repeats), and the batching speed-up (on / off).

Models are random-initialised checkpoints of --model with a small BPE tokenizer (throughput does not depend on the
weights), or pass --mdm / --arm checkpoints. Every request must come back complete: failures are counted and
printed, never dropped. Usage: python benchmarks/serve.py [--model tiny-1m] [--requests 32] [--clients 1,4,16]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WORDS = ["the", "cat", "sat", "on", "the", "mat", "and", "the", "dog", "sat", "on", "the", "log", "while", "a", "bird",
         "in", "the", "hand", "sang"]


def make_checkpoints(model: str, work: Path) -> dict[str, Path]:
    import torch

    from smdm.checkpoint import save_checkpoint
    from smdm.config import ModelConfig
    from smdm.model import Transformer
    from smdm.tokenizer import train_bpe

    tokenizer_file = work / "tokenizer.json"
    tokenizer = train_bpe([" ".join(WORDS)] * 50, 300, tokenizer_file)
    config = ModelConfig.from_name(model, vocab_size=tokenizer.vocab_size)
    paths = {}
    for objective in ("mdm", "arm"):
        torch.manual_seed(0)
        meta = {"objective": objective, "tokenizer": {"fingerprint": tokenizer.fingerprint,
                                                      "vocab_size": tokenizer.vocab_size, "eos_id": tokenizer.eos_id}}
        paths[objective] = save_checkpoint(work / objective, Transformer(config, causal=objective == "arm"), config,
                                           meta, tokenizer_file=tokenizer_file)
    return paths


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(checkpoint: Path, max_batch: int, threads: int, device: str = "auto") -> tuple[subprocess.Popen, int]:
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "smdm", "serve", "--checkpoint", str(checkpoint), "--port",
                                str(port), "--name", "bench", "--max-batch", str(max_batch), "--max-queue", "256",
                                "--threads", str(threads), "--device", device], cwd=REPO, stderr=subprocess.DEVNULL,
                               env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(threads)})
    for _ in range(600):
        try:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            connection.request("GET", "/health")
            if connection.getresponse().status == 200:
                return process, port
        except OSError:
            time.sleep(0.1)
    process.kill()
    raise SystemExit("the server did not start")


def one_request(port: int, body: dict) -> dict:
    """A streamed completion: latency, time to the first chunk with text, completion tokens, success."""
    start = time.perf_counter()
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    connection.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
    response = connection.getresponse()
    first, tokens, ok, done = None, 0, response.status == 200, False
    if not ok:
        response.read()
        return {"ok": False, "status": response.status}
    if not body.get("stream"):
        answer = json.loads(response.read())
        latency = time.perf_counter() - start
        return {"ok": "choices" in answer, "latency": latency, "first": latency,
                "tokens": answer["usage"]["completion_tokens"]}
    for raw in response:
        line = raw.decode().strip()
        if not line.startswith("data: "):
            continue
        if line == "data: [DONE]":
            done = True
            break
        chunk = json.loads(line[6:])
        if "error" in chunk:
            ok = False
            continue
        if first is None and any(c.get("text") for c in chunk["choices"]):
            first = time.perf_counter() - start
        if chunk.get("usage"):
            tokens = chunk["usage"]["completion_tokens"]
    latency = time.perf_counter() - start
    return {"ok": ok and done, "latency": latency, "first": first if first is not None else latency,
            "tokens": tokens}


def load(port: int, clients: int, bodies: list[dict]) -> dict:
    results: list[dict] = []
    lock = threading.Lock()
    work = iter(enumerate(bodies))

    def client() -> None:
        while True:
            with lock:
                item = next(work, None)
            if item is None:
                return
            result = one_request(port, item[1])
            with lock:
                results.append(result)

    start = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    good = [r for r in results if r["ok"]]
    latencies = sorted(r["latency"] for r in good)
    p95 = latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))] if latencies else float("nan")
    return {"requests": len(bodies), "answered": len(results), "failed": len(results) - len(good),
            "req_s": len(good) / wall, "tok_s": sum(r["tokens"] for r in good) / wall,
            "p50": statistics.median(latencies) if latencies else float("nan"), "p95": p95,
            "ttfc": statistics.median(r["first"] for r in good) if good else float("nan")}


def bodies_for(family: str, count: int, max_tokens: int, stream: bool = True) -> list[dict]:
    """Mixed prompt lengths (2..26 words), greedy; the MDM decodes 4 blocks with the dual cache, 2 tokens a step."""
    out = []
    for k in range(count):
        words = 2 + (k * 7) % 25
        prompt = " ".join(WORDS[(k + i) % len(WORDS)] for i in range(words))
        body = {"model": "bench", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
        if stream:
            body.update(stream=True, stream_options={"include_usage": True})
        if family == "mdm":
            body.update(block_length=max_tokens // 4, steps=max_tokens // 2, cache="dual")
        out.append(body)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny-1m", help="size of the random-initialised checkpoints")
    parser.add_argument("--mdm", help="an MDM checkpoint instead")
    parser.add_argument("--arm", help="an ARM checkpoint instead")
    parser.add_argument("--requests", type=int, default=32, help="requests per measurement")
    parser.add_argument("--clients", default="1,4,16")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the server")
    parser.add_argument("--families", default="mdm,arm")
    parser.add_argument("--repeats", type=int, default=3, help="alternating runs per setting (medians reported)")
    parser.add_argument("--no-stream", action="store_true", help="plain responses (time to first chunk = latency)")
    parser.add_argument("--device", default="auto", help="the servers' device (auto: CUDA when there is one)")
    parser.add_argument("--json", help="also write the rows and the speed-ups to this file")
    args = parser.parse_args()
    clients = [int(c) for c in args.clients.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        checkpoints = make_checkpoints(args.model, Path(tmp)) if not (args.mdm and args.arm) else {}
        checkpoints.update({k: Path(v) for k, v in (("mdm", args.mdm), ("arm", args.arm)) if v})
        rows = []
        for family in args.families.split(","):
            # Both servers run side by side and the measurements alternate (off, on, off, on, ...), each repeated:
            # on a shared machine the load drifts, and a ratio of medians measured together is what holds.
            servers = {batching: start_server(checkpoints[family], size, args.threads, args.device)
                       for batching, size in (("off", 1), ("on", 16))}
            try:
                for _, port in servers.values():
                    for body in bodies_for(family, 4, args.max_tokens):  # warm-up: first calls are slower
                        one_request(port, body)
                for n in clients:
                    runs: dict[str, list[dict]] = {"off": [], "on": []}
                    for _ in range(args.repeats):
                        for batching, (_, port) in servers.items():
                            runs[batching].append(load(port, n, bodies_for(family, args.requests, args.max_tokens,
                                                                           not args.no_stream)))
                    for batching, measured in runs.items():
                        row = {"family": family, "batching": batching, "clients": n,
                               **{key: statistics.median(m[key] for m in measured) for key in measured[0]},
                               "failed": sum(m["failed"] for m in measured),
                               "requests": sum(m["requests"] for m in measured),
                               "answered": sum(m["answered"] for m in measured)}
                        rows.append(row)
                        print(f"{family} batching {batching:>3} clients {n:>2}: {row['req_s']:6.2f} req/s "
                              f"{row['tok_s']:7.1f} tok/s  p50 {row['p50']:.3f}s p95 {row['p95']:.3f}s "
                              f"ttfc {row['ttfc']:.3f}s  failed {row['failed']}/{row['requests']}", flush=True)
            finally:
                for process, _ in servers.values():
                    process.terminate()
                    process.wait(timeout=30)
    print("\nbatching speed-up (requests/s, on / off):")
    speedups = []
    for family in args.families.split(","):
        for n in clients:
            on = next(r for r in rows if r["family"] == family and r["batching"] == "on" and r["clients"] == n)
            off = next(r for r in rows if r["family"] == family and r["batching"] == "off" and r["clients"] == n)
            speedups.append({"family": family, "clients": n, "speedup": on["req_s"] / off["req_s"]})
            print(f"  {family} {n:>2} clients: {speedups[-1]['speedup']:.2f}x")
    lost = sum(r["requests"] - r["answered"] + r["failed"] for r in rows)
    print(f"requests lost or failed: {lost}")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows, "speedups": speedups,
                                               "lost_or_failed": lost}, indent=2) + "\n")


if __name__ == "__main__":
    main()
