"""Serve load: CLIENTS threads × REQUESTS images at once through the serve batcher.

    python bench/serve_load.py                 # the embedded tiny model (flux2-klein-tiny), 128x128, 2 steps
    python bench/serve_load.py --fake          # the FakeEngine (no JAX): the scheduler's own overhead
    python bench/serve_load.py --sequential    # each client waits for an image before asking the next
    python bench/serve_load.py --server        # through HTTP: uvicorn `flowgen serve` on loopback, httpx clients

Every client submits its requests together (an SDK sending a task array), then waits for all of
them; latency is submit -> result per request. Before measuring, one batch of every size the
run can use is rendered so that compilation is not counted. Prints p50/p95 latency, the mean and
largest batch size, and the queue depth seen by a sampler every 5 ms.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from flowgen.plan.job import Job  # noqa: E402
from flowgen.serve.batcher import Batcher  # noqa: E402


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(share * (len(ordered) - 1)))]


def make_engine(fake: bool):
    from flowgen.run.engine import FakeEngine, PipelineEngine

    return FakeEngine(delay_per_image=0.01) if fake else PipelineEngine("flux2-klein-tiny")


def warm_up(engine, job: Job, max_batch: int) -> float:
    """Compile every power-of-two batch size up to max_batch; returns the seconds it took."""
    from flowgen.run.engine import BatchRequest

    start = time.perf_counter()
    size = 1
    while size <= max_batch:
        engine.generate_batch(BatchRequest.for_jobs([(job, 0, [])], size))
        size *= 2
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fake", action="store_true", help="the FakeEngine instead of the tiny model")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=4, help="requests per client")
    parser.add_argument("--window", type=float, default=0.05, help="batch window in seconds")
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=128, help="image width and height")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--sequential", action="store_true", help="one request in flight per client")
    parser.add_argument("--server", action="store_true",
                        help="through HTTP: each request a POST /v1 to a real uvicorn server on loopback")
    args = parser.parse_args()

    def job(prompt: str) -> Job:
        return Job.from_task({"positivePrompt": prompt, "width": args.size, "height": args.size, "steps": args.steps},
                             guidance=None)

    engine = make_engine(args.fake)
    warm = warm_up(engine, job("warm up"), args.max_batch)
    if args.server:
        return through_server(args, engine, warm)
    encodes = 0 if args.fake else engine.pipe.counters["text_encode"]
    batcher = Batcher(lambda model: engine, window_s=args.window, max_batch=args.max_batch)
    latencies: list[float] = []
    lock = threading.Lock()
    start_line = threading.Barrier(args.clients)
    depths: list[int] = []
    sampling = threading.Event()

    def sample() -> None:
        while not sampling.wait(0.005):
            depths.append(batcher.stats()["queue_depth"])

    def prompts_of(number: int) -> list[str]:
        # clients c and c + CLIENTS/2 repeat each other's prompts: the engine encodes each once
        return [f"client {number % (args.clients // 2 or 1)} picture {index}" for index in range(args.requests)]

    def client(number: int) -> None:
        start_line.wait()
        prompts = prompts_of(number)
        if args.sequential:
            for index, prompt in enumerate(prompts):
                t0 = time.perf_counter()
                batcher.submit("flowgen:1@1", job(prompt), 1000 * number + index).result()
                with lock:
                    latencies.append(time.perf_counter() - t0)
            return
        t0 = time.perf_counter()
        futures = [batcher.submit("flowgen:1@1", job(p), 1000 * number + i) for i, p in enumerate(prompts)]
        for future in futures:
            future.add_done_callback(lambda done: finished(time.perf_counter() - t0, done))
        for future in futures:
            future.result()

    def finished(latency: float, future) -> None:
        if future.exception() is None:
            with lock:
                latencies.append(latency)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    threads = [threading.Thread(target=client, args=(n,)) for n in range(args.clients)]
    wall = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - wall
    sampling.set()
    sampler.join()
    batcher.close()
    stats = batcher.stats()

    total = args.clients * args.requests
    lost = total - len(latencies)
    engine_name = "FakeEngine (10 ms/image)" if args.fake else f"flux2-klein-tiny {args.size}x{args.size}, {args.steps} steps"
    print(f"{engine_name}; {args.clients} clients x {args.requests} requests"
          f"{' (sequential)' if args.sequential else ' at once'}; window {args.window * 1000:g} ms, "
          f"max batch {args.max_batch}; warm-up {warm:.1f} s (not counted)")
    print(f"completed {len(latencies)}/{total} (lost {lost}) in {wall:.2f} s = {len(latencies) / wall:.1f} images/s")
    print(f"latency p50 {percentile(latencies, 0.5) * 1000:.0f} ms, p95 {percentile(latencies, 0.95) * 1000:.0f} ms, "
          f"max {max(latencies) * 1000:.0f} ms")
    print(f"batches {stats['batches']}, images {stats['images']}, mean batch size {stats['mean_batch_size']:.2f}, "
          f"max batch size {stats['max_batch_size']}")
    if not args.fake:  # clients c and c + CLIENTS/2 ask the same prompts: encoded once between them
        distinct = len({p for n in range(args.clients) for p in prompts_of(n)})
        print(f"prompt encodes while serving: {engine.pipe.counters['text_encode'] - encodes} "
              f"for {distinct} distinct prompts in {total} requests")
    print(f"queue depth: max {max(depths, default=0)}, mean {statistics.fmean(depths) if depths else 0:.1f} "
          f"({len(depths)} samples every 5 ms)")
    return 0 if lost == 0 and stats["images"] == total else 1


def through_server(args, engine, warm: float) -> int:
    """The same load as REST requests to `flowgen serve` (uvicorn in a thread on a free loopback
    port); the batch figures come from the server's GET /v1/stats."""
    import socket
    import tempfile
    import uuid
    from concurrent.futures import ThreadPoolExecutor

    import httpx
    import uvicorn

    from flowgen.engine.catalog.cards import list_cards
    from flowgen.serve.app import create_app

    key = "bench-key"
    headers = {"Authorization": f"Bearer {key}"}
    card = next(card for card in list_cards() if card.tiny is not None)
    batcher = Batcher(lambda model: engine, window_s=args.window, max_batch=args.max_batch)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{port}/v1"
    with tempfile.TemporaryDirectory() as data_dir:
        app = create_app(batcher=batcher, data_dir=data_dir, models=[card], keys=frozenset({key}))
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        while not server.started:
            time.sleep(0.02)
        latencies: list[float] = []
        lock = threading.Lock()
        start_line = threading.Barrier(args.clients)

        def request(http: httpx.Client, number: int, index: int) -> None:
            task = {"taskType": "imageInference", "taskUUID": str(uuid.uuid4()), "model": "flowgen:1@1",
                    "positivePrompt": f"client {number % (args.clients // 2 or 1)} picture {index}",
                    "width": args.size, "height": args.size, "steps": args.steps, "seed": 1000 * number + index,
                    "outputType": "URL"}
            t0 = time.perf_counter()
            response = http.post(url, json=[task], headers=headers)
            if response.status_code == 200 and len(response.json().get("data", [])) == 1:
                with lock:
                    latencies.append(time.perf_counter() - t0)

        def client(number: int) -> None:
            with httpx.Client(timeout=600) as http:
                start_line.wait()
                if args.sequential:
                    for index in range(args.requests):
                        request(http, number, index)
                    return
                with ThreadPoolExecutor(args.requests) as pool:
                    list(pool.map(lambda index: request(http, number, index), range(args.requests)))

        threads = [threading.Thread(target=client, args=(n,)) for n in range(args.clients)]
        wall = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - wall
        stats = httpx.get(url + "/stats", headers=headers).json()
        server.should_exit = True
        thread.join(60)

    total = args.clients * args.requests
    engine_name = "FakeEngine (10 ms/image)" if args.fake else f"flux2-klein-tiny {args.size}x{args.size}, {args.steps} steps"
    print(f"{engine_name} behind flowgen serve (REST on loopback); {args.clients} clients x {args.requests} requests"
          f"{' (sequential)' if args.sequential else ' at once'}; window {args.window * 1000:g} ms, "
          f"max batch {args.max_batch}; warm-up {warm:.1f} s (not counted)")
    print(f"completed {len(latencies)}/{total} (lost {total - len(latencies)}) in {wall:.2f} s = "
          f"{len(latencies) / wall:.1f} images/s")
    if latencies:
        print(f"latency p50 {percentile(latencies, 0.5) * 1000:.0f} ms, p95 {percentile(latencies, 0.95) * 1000:.0f} ms, "
              f"max {max(latencies) * 1000:.0f} ms")
    print(f"server stats: batches {stats['batches']}, images {stats['images']}, mean batch size "
          f"{stats['mean_batch_size']:.2f}, max batch size {stats['max_batch_size']}")
    return 0 if len(latencies) == total and stats["images"] == total else 1


if __name__ == "__main__":
    sys.exit(main())
