"""Live inspection figures: serve.py's per-image latency against the backbone's, throughput under
1 / 4 / 8 concurrent clients against test.py's scoring rate, memory over a soak, a watched folder
receiving many files, and what the pictures cost.

    flock /tmp/bench.lock .venv/bin/python bench/serve_benchmark.py [--dataset ../shared/data/tire]
        [--backbone mobilenet_v2] [--weights imagenet-offline] [--soak 10000] [--watch-files 1000] [--threads N]

Trains the model once into bench/out/serve-models/<backbone>-<weights>/ (IMAGE_SIZE 224 x 224,
config.py's other defaults) unless it is there. Every figure comes from this one run on this
machine: the server is a real `python serve.py` process on 127.0.0.1 driven by HTTP clients in
threads of this process. Writes bench/out/serve-<backbone>-<weights>.json and prints a table.
The backbone and the in-process steps are timed with the server's torch threads (SERVE_THREADS,
config.py's unless --threads), the backbone also with torch's default; test.py's rate with its own.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
from tqdm import tqdm

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
OUT = ROOT / "bench" / "out"
SIZE = "IMAGE_SIZE=(224,224)"


@dataclass
class Run:
    """One benchmark run's inputs: the data, the model, and the server's settings."""

    dataset: Path
    model_root: Path  # MODEL_DIR; the model is MODEL_DIR/<category>
    images: list[Path]  # the test images sent, in turn
    settings: list[str]  # KEY=VALUE for train.py / serve.py


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def rss_mb(pid: int) -> float:
    """Resident memory of process `pid` now (VmRSS), in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds process `pid` has used, all its threads (/proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def load_average() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


class Server:
    """`python serve.py` on a free port, waited for; stopped with SIGTERM."""

    def __init__(self, run: Run, *extra: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.NamedTemporaryFile("w+", suffix=".log", delete=False)
        self.process = subprocess.Popen(
            [sys.executable, str(ROOT / "serve.py"), *run.settings, f"SERVE_PORT={self.port}", *extra],
            cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise SystemExit(f"serve.py exited: {Path(self.log.name).read_text()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.3)
        raise SystemExit("serve.py did not start within 180 s")

    def health(self) -> dict:
        return httpx.get(f"{self.url}/health", timeout=30).json()

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        self.process.wait(120)


def ensure_model(run: Run, category: str) -> Path:
    model_dir = run.model_root / category
    if not (model_dir / "model.json").exists():
        print(f"training {model_dir} ...", file=sys.stderr)
        subprocess.run([sys.executable, str(ROOT / "train.py"), *run.settings], cwd=ROOT, check=True)
    return model_dir


@contextmanager
def torch_threads(threads: int):
    """torch's CPU threads set to `threads` (0: left at torch's default) inside, restored after: the
    in-process figures run with the server's SERVE_THREADS, test.py's scoring with torch's default."""
    import torch

    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def feature_stack(model_dir: Path):
    """(the model's backbone feature stack, one random preprocessed image of its working size)."""
    import torch

    from pipeline.inspection import load

    inspector = load(model_dir, "cpu")
    return inspector.detector.model.extractor, torch.randn(1, 3, *inspector.detector.preprocessor.size)


def backbone_latency(model_dir: Path, repeats: int) -> dict:
    """The backbone's feature stack (every stage the model uses) on one preprocessed 224 x 224 image,
    with the caller's torch threads."""
    import torch

    extractor, image = feature_stack(model_dir)
    times = []
    with torch.inference_mode():
        for _ in range(5):
            extractor(image)
        for _ in range(repeats):
            started = time.perf_counter()
            extractor(image)
            times.append(time.perf_counter() - started)
    return {"p50_ms": 1000 * percentile(times, 50), "p99_ms": 1000 * percentile(times, 99), "repeats": repeats, "threads": torch.get_num_threads()}


def stage_breakdown(model_dir: Path, image: Path, repeats: int) -> dict:
    """Where one image's time goes in-process (p50 ms): decoding and preprocessing, the backbone,
    the anomaly model's whole scoring (backbone, patch scores, map upsampling and blur), the
    classifier added (Detector.score_images), and Inspector.inspect end to end. For PaDiM also the
    floor of its distances on this machine: the inverted factors' size, one plain pass over them (a
    sum: memory speed), and that pass scaled to a packed triangle, the fewest float32 bytes an exact
    distance can read."""
    import torch

    from pipeline.inspection import load

    inspector = load(model_dir, "cpu")
    detector = inspector.detector
    data = image.read_bytes()
    tensor = inspector.prepare(data).tensor[None]

    def p50(step) -> float:
        step()
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            step()
            times.append(time.perf_counter() - started)
        return 1000 * percentile(times, 50)

    with torch.inference_mode():
        figures = {
            "decode_and_preprocess_ms": p50(lambda: inspector.prepare(data)),
            "backbone_ms": p50(lambda: detector.model.extractor(tensor)),
            "anomaly_model_score_ms": p50(lambda: detector.score(tensor)),
            "score_with_classifier_ms": p50(lambda: detector.score_images(tensor)),
            "inspect_end_to_end_ms": p50(lambda: inspector.inspect(data)),
        }
        whitening = detector.model.whitening() if hasattr(detector.model, "whitening") else None
        if whitening is not None:  # PaDiM's distances must read every factor once per image (or batch)
            bytes_read = sum(block.numel() * block.element_size() for block in whitening.blocks)
            figures["factors_mb"] = bytes_read / 1e6
            figures["factors_read_once_ms"] = p50(lambda: [block.sum() for block in whitening.blocks])
            packed = figures["factors_read_once_ms"] * whitening_packed_share(whitening)
            figures["distances_floor_ms"] = packed  # the triangle alone, read at the speed just measured
    return figures


def whitening_packed_share(whitening) -> float:
    """The share of the stored factor bytes that a perfectly packed triangle would hold, d(d+1)/2 of
    each position's d x d: the least any exact float32 distance can read per image."""
    dim = whitening.bounds[-1]
    stored = sum((end - start) * end for start, end in zip(whitening.bounds, whitening.bounds[1:]))
    return dim * (dim + 1) / 2 / stored


def scoring_rate(model_dir: Path, images: list[Path], batch_size: int, workers: int) -> dict:
    """test.py's scoring alone (start-up and pictures excluded): its Inspector.inspect_paths over the images."""
    from pipeline.inspection import load

    inspector = load(model_dir, "cpu", batch_size=batch_size)
    list(inspector.inspect_paths(images[:batch_size], batch_size, 0)[0])  # warm-up
    started = time.perf_counter()
    results, _ = inspector.inspect_paths(images, batch_size, workers)
    count = sum(1 for _ in results)
    seconds = time.perf_counter() - started
    return {"images": count, "seconds": seconds, "images_per_second": count / seconds, "batch_size": batch_size, "num_workers": workers}


def send(client: httpx.Client, data: bytes, pictures: bool = False, seconds: list[float] | None = None) -> float:
    """One request's latency; the server's own `seconds` field is appended to `seconds` when given."""
    started = time.perf_counter()
    reply = client.post("/inspect" + ("?pictures=true" if pictures else ""), content=data, headers={"Content-Type": "image/png"})
    if reply.status_code != 200:
        raise SystemExit(f"inspect failed: {reply.status_code} {reply.text}")
    elapsed = time.perf_counter() - started
    if seconds is not None:
        seconds.append(reply.json()["seconds"])
    return elapsed


def one_client_latency(server: Server, payloads: list[bytes], count: int, model_dir: Path, rounds: int = 10) -> dict:
    """One client's requests back to back: the client's latency, and the server's own `seconds`
    (decoding to verdict), so that what HTTP and the queue add is their difference. The backbone's
    feature stack on one image (in this process, with the server's threads set by the caller) is
    timed in blocks between the blocks of requests: the speed of this shared 2-core machine drifts by
    a quarter within minutes, so a backbone timed only before the requests can sit in another regime
    than they do. `p50_over_backbone` is the latency's p50 over the interleaved backbone's p50;
    `round_ratios` each block's, to show the spread."""
    import torch

    extractor, image = feature_stack(model_dir)
    inside: list[float] = []
    times: list[float] = []
    backbone: list[float] = []
    ratios: list[float] = []
    per_round = max(1, count // rounds)
    with httpx.Client(base_url=server.url, timeout=60) as client, torch.inference_mode(), tqdm(total=per_round * rounds, desc="one client", file=sys.stderr) as bar:
        for data in payloads[:30]:  # warm-up
            send(client, data)
        for _ in range(5):
            extractor(image)
        for round_index in range(rounds):
            passes = []
            for _ in range(per_round):
                started = time.perf_counter()
                extractor(image)
                passes.append(time.perf_counter() - started)
            requests = [send(client, payloads[(round_index * per_round + i) % len(payloads)], seconds=inside) for i in range(per_round)]
            backbone += passes
            times += requests
            ratios.append(percentile(requests, 50) / percentile(passes, 50))
            bar.update(per_round)
    return {"requests": len(times), "p50_ms": 1000 * percentile(times, 50), "p99_ms": 1000 * percentile(times, 99), "mean_ms": 1000 * statistics.mean(times),
            "server_seconds_p50_ms": 1000 * percentile(inside, 50), "backbone_interleaved_p50_ms": 1000 * percentile(backbone, 50),
            "p50_over_backbone": percentile(times, 50) / percentile(backbone, 50),
            "round_ratios": [round(ratio, 2) for ratio in ratios]}


def concurrent(server: Server, payloads: list[bytes], clients: int, per_client: int, pictures: bool = False) -> dict:
    """`clients` threads each sending `per_client` requests back to back: images per second and the mean batch size."""
    before = server.health()
    latencies: list[float] = []

    def worker(offset: int) -> None:
        with httpx.Client(base_url=server.url, timeout=120) as client:
            for step in range(per_client):
                latencies.append(send(client, payloads[(offset * 7 + step) % len(payloads)], pictures))

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(clients)]
    server_cpu, client_cpu = cpu_seconds(server.process.pid), time.process_time()
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - started
    server_cpu, client_cpu = cpu_seconds(server.process.pid) - server_cpu, time.process_time() - client_cpu
    after = server.health()
    images, batches = after["images"] - before["images"], after["batches"] - before["batches"]
    requests = clients * per_client
    return {
        "clients": clients, "requests": requests, "seconds": seconds, "images_per_second": requests / seconds,
        "mean_batch_size": images / batches if batches else 0.0, "p50_ms": 1000 * percentile(latencies, 50), "p99_ms": 1000 * percentile(latencies, 99),
        # where the machine's CPU went: the server's per image, and the benchmark's own HTTP clients' (on the same cores)
        "server_cpu_ms_per_image": 1000 * server_cpu / requests, "client_cpu_ms_per_image": 1000 * client_cpu / requests,
        "client_cpu_share": client_cpu / (seconds * (os.cpu_count() or 1)),
    }


def soak(server: Server, payloads: list[bytes], total: int, clients: int = 4) -> dict:
    """`total` requests from `clients` threads; the server's RSS sampled as they go."""
    start_rss = rss_mb(server.process.pid)
    samples = [start_rss]
    done = [0]
    lock = threading.Lock()
    progress = tqdm(total=total, desc="soak", file=sys.stderr)

    def worker(offset: int) -> None:
        with httpx.Client(base_url=server.url, timeout=120) as client:
            while True:
                with lock:
                    if done[0] >= total:
                        return
                    done[0] += 1
                    number = done[0]
                send(client, payloads[(offset + number) % len(payloads)])
                progress.update(1)
                if number % 250 == 0:
                    samples.append(rss_mb(server.process.pid))

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    progress.close()
    samples.append(rss_mb(server.process.pid))
    return {
        "requests": total, "clients": clients, "seconds": time.perf_counter() - started, "rss_start_mb": start_rss,
        "rss_peak_mb": max(samples), "rss_end_mb": samples[-1], "growth_mb": max(samples) - start_rss,
        "rss_samples_mb": samples,  # every 250 requests: a plateau (allocator pools filling) or a slope (a leak)
    }


def watched_folder(run: Run, files: int, settle: float) -> dict:
    """`files` images copied into a fresh watched folder: how long until every one has its row, and none twice."""
    work = Path(tempfile.mkdtemp(prefix="serve-bench-watch-"))
    incoming, results = work / "incoming", work / "results"
    incoming.mkdir()
    server = Server(run, f"WATCH_DIR={incoming}", f"RESULTS_DIR={results}", f"WATCH_SETTLE_SECONDS={settle}", f"REVIEW_DIR={work / 'review'}")
    try:
        started = time.perf_counter()
        for number in range(files):
            source = run.images[number % len(run.images)]
            shutil.copy(source, incoming / f"{number:05d}{source.suffix}")
        copied = time.perf_counter() - started
        deadline = time.monotonic() + 60 + files * 0.5
        rows: list[str] = []
        with tqdm(total=files, desc="watched folder", file=sys.stderr) as progress:
            while time.monotonic() < deadline:
                rows = [line for path in results.glob("*/live-*/predictions.csv") for line in path.read_text().splitlines()[1:]]
                progress.update(len(rows) - progress.n)
                if len(rows) >= files:
                    break
                time.sleep(0.5)
        seconds = time.perf_counter() - started
        time.sleep(3 * settle)  # more polls: nothing may be scored twice
        rows = [line for path in results.glob("*/live-*/predictions.csv") for line in path.read_text().splitlines()[1:]]
        names = [Path(line.split(",")[0]).name for line in rows]
    finally:
        server.stop()
    expected = {f"{n:05d}{run.images[n % len(run.images)].suffix}" for n in range(files)}
    return {
        "files": files, "copy_seconds": copied, "seconds_until_all_rows": seconds, "files_per_second": files / seconds,
        "rows": len(rows), "lost": len(expected - set(names)), "twice": len(names) - len(set(names)),
        "errors": sum(1 for line in rows if not line.endswith(",")), "pictures": True,
    }


def picture_cost(model_dir: Path, images: list[Path], repeats: int) -> dict:
    """test.py's pictures for one image (preview, overlay JPEG and mask PNG written), and the PNG pair serve.py returns."""
    from dataset_manager.images import preview
    from pipeline.inspection import load, to_rgb
    from pipeline.pictures import picture_arrays, png_bytes, write_pictures
    from pipeline.prediction import PREVIEW_SIZE

    inspector = load(model_dir, "cpu")
    detector = inspector.detector
    folder = Path(tempfile.mkdtemp(prefix="serve-bench-pictures-"))
    written, returned = [], []
    for number in range(repeats):
        rgb = to_rgb(images[number % len(images)])
        inspection = inspector.inspect(rgb)
        started = time.perf_counter()
        arrays = picture_arrays(inspection.anomaly_map, inspection.size, preview(rgb, PREVIEW_SIZE),
                                detector.preprocessor, detector.pixel_threshold, inspector.color_scale)
        write_pictures(folder, f"p{number}", arrays)
        written.append(time.perf_counter() - started)
        started = time.perf_counter()
        overlay, mask = inspector.pictures(inspection, rgb, PREVIEW_SIZE)
        png_bytes(overlay), png_bytes(mask)
        returned.append(time.perf_counter() - started)
    shutil.rmtree(folder, ignore_errors=True)
    height, width = to_rgb(images[0]).shape[:2]
    return {"image_size": [height, width], "repeats": repeats, "test_py_files_ms_p50": 1000 * percentile(written, 50),
            "serve_png_pair_ms_p50": 1000 * percentile(returned, 50)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", type=Path, default=ROOT.parent / "shared" / "data" / "tire")
    parser.add_argument("--backbone", default="mobilenet_v2")
    parser.add_argument("--weights", default="imagenet-offline")
    parser.add_argument("--soak", type=int, default=10000, help="requests of the memory soak")
    parser.add_argument("--watch-files", type=int, default=1000)
    parser.add_argument("--latency-requests", type=int, default=300)
    parser.add_argument("--per-client", type=int, default=60, help="requests per client in the throughput runs")
    parser.add_argument("--threads", type=int, default=None,
                        help="SERVE_THREADS for the server, and torch's threads for the backbone and breakdown figures (default: config.py's)")
    parser.add_argument("--only-breakdown", action="store_true", help="print where one image's time goes in-process, and stop")
    parser.add_argument("--only-throughput", action="store_true",
                        help="print test.py's scoring rate and the 1 / 4 / 8 client throughput (with CPU per image), and stop")
    parser.add_argument("--only-one-client", action="store_true",
                        help="print the backbone, the in-process breakdown and one client's latency (with the server's own seconds), and stop")
    args = parser.parse_args()
    from dataset_manager import find_images

    import config

    threads = config.SERVE_THREADS if args.threads is None else args.threads
    tag = f"{args.backbone}-{args.weights}"
    model_root = OUT / "serve-models" / tag
    run = Run(args.dataset, model_root, find_images(args.dataset / "test"), [
        f"DATASET_DIR={args.dataset}", f"BACKBONE={args.backbone}", f"WEIGHTS={args.weights}", SIZE, f"MODEL_DIR={model_root}",
        f"RESULTS_DIR={OUT / 'serve-results'}", "DEVICE=cpu",
    ])
    model_dir = ensure_model(run, args.dataset.name)
    if args.only_breakdown:
        with torch_threads(threads):
            print(json.dumps(stage_breakdown(model_dir, run.images[0], 50), indent=2))
        return
    payloads = [path.read_bytes() for path in run.images]
    if args.only_one_client:
        quick = {"load_average": load_average(), "serve_threads": threads, "backbone_one_image_default_threads": backbone_latency(model_dir, 100)}
        with torch_threads(threads):  # the backbone as the server runs it, on one image
            quick["backbone_one_image"] = backbone_latency(model_dir, 100)
            quick["in_process_breakdown"] = stage_breakdown(model_dir, run.images[0], 50)
        server = Server(run, f"REVIEW_DIR={OUT / 'serve-review'}", f"SERVE_THREADS={threads}")
        try:
            with torch_threads(threads):
                quick["one_client"] = one_client_latency(server, payloads, args.latency_requests, model_dir)
                with httpx.Client(base_url=server.url, timeout=60) as client:  # pictures must not slow what follows
                    for data in payloads[:10]:
                        send(client, data, True)
                quick["one_client_after_10_pictures"] = one_client_latency(server, payloads, args.latency_requests, model_dir)
        finally:
            server.stop()
        print(json.dumps({**quick, "load_average_end": load_average()}, indent=2))
        return
    if args.only_throughput:
        quick = {"load_average": load_average(), "serve_threads": threads,
                 "test_py_scoring": scoring_rate(model_dir, run.images, config.BATCH_SIZE, config.NUM_WORKERS)}
        server = Server(run, f"REVIEW_DIR={OUT / 'serve-review'}", f"SERVE_THREADS={threads}")
        try:
            quick["throughput"] = [concurrent(server, payloads, clients, args.per_client) for clients in (1, 4, 8)]
        finally:
            server.stop()
        for row in quick["throughput"]:
            row["over_test_py"] = row["images_per_second"] / quick["test_py_scoring"]["images_per_second"]
        print(json.dumps({**quick, "load_average_end": load_average()}, indent=2))
        return
    figures: dict = {"machine": f"{os.cpu_count()} CPUs, shared with other jobs (not quiet)", "load_average_start": load_average(),
                     "dataset": str(args.dataset), "backbone": args.backbone, "weights": args.weights, "image_size": [224, 224],
                     "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "serve_threads": threads}
    figures["backbone_one_image_default_threads"] = backbone_latency(model_dir, 100)
    with torch_threads(threads):  # the backbone and the in-process steps as the server runs them
        figures["backbone_one_image"] = backbone_latency(model_dir, 100)
        figures["in_process_breakdown"] = stage_breakdown(model_dir, run.images[0], 50)
    figures["test_py_scoring"] = scoring_rate(model_dir, run.images, config.BATCH_SIZE, config.NUM_WORKERS)
    figures["picture_cost"] = picture_cost(model_dir, run.images, 60)
    server = Server(run, f"REVIEW_DIR={OUT / 'serve-review'}", f"SERVE_THREADS={threads}")
    try:
        with torch_threads(threads):
            figures["one_client"] = one_client_latency(server, payloads, args.latency_requests, model_dir)
        figures["throughput"] = [concurrent(server, payloads, clients, args.per_client) for clients in (1, 4, 8)]
        figures["soak"] = soak(server, payloads, args.soak)
    finally:
        server.stop()
    figures["watched_folder"] = watched_folder(run, args.watch_files, 1.0)
    figures["load_average_end"] = load_average()
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / f"serve-{tag}.json").write_text(json.dumps(figures, indent=2))
    print(report(figures))


def report(figures: dict) -> str:
    backbone, one = figures["backbone_one_image"], figures["one_client"]
    rate = figures["test_py_scoring"]["images_per_second"]
    lines = [
        f"{figures['backbone']} ({figures['weights']}) at 224 x 224 on {figures['dataset']}, {figures['date']}; {figures['machine']}, "
        f"load {figures['load_average_start']} -> {figures['load_average_end']}",
        f"backbone feature stack, one image: p50 {backbone['p50_ms']:.1f} ms with the server's {figures['serve_threads']} thread(s) (SERVE_THREADS), "
        f"{figures['backbone_one_image_default_threads']['p50_ms']:.1f} ms with torch's default {figures['backbone_one_image_default_threads']['threads']}",
        f"serve.py one client: p50 {one['p50_ms']:.1f} ms ({one['p50_ms'] / backbone['p50_ms']:.2f}x the backbone timed before; "
        f"{one['p50_over_backbone']:.2f}x its {one['backbone_interleaved_p50_ms']:.1f} ms timed between the blocks of requests, "
        f"blocks {min(one['round_ratios']):.2f}-{max(one['round_ratios']):.2f}x), p99 {one['p99_ms']:.1f} ms, "
        f"the server's own seconds (decoding to verdict) p50 {one['server_seconds_p50_ms']:.1f} ms",
        f"test.py scoring alone: {rate:.1f} images/s",
    ]
    for row in figures["throughput"]:
        lines.append(f"  {row['clients']} clients: {row['images_per_second']:.1f} images/s ({row['images_per_second'] / rate:.2f}x test.py), "
                     f"mean batch {row['mean_batch_size']:.2f}, p50 {row['p50_ms']:.1f} ms, p99 {row['p99_ms']:.1f} ms; CPU per image: "
                     f"server {row['server_cpu_ms_per_image']:.1f} ms, the benchmark's clients {row['client_cpu_ms_per_image']:.1f} ms "
                     f"({100 * row['client_cpu_share']:.0f} % of the machine)")
    soaked = figures["soak"]
    lines.append(f"soak {soaked['requests']} requests: RSS {soaked['rss_start_mb']:.0f} -> peak {soaked['rss_peak_mb']:.0f} MB (growth {soaked['growth_mb']:.1f} MB)")
    watched = figures["watched_folder"]
    lines.append(f"watched folder {watched['files']} files: all rows after {watched['seconds_until_all_rows']:.1f} s, lost {watched['lost']}, twice {watched['twice']}")
    pictures = figures["picture_cost"]
    lines.append(f"pictures of a {pictures['image_size'][0]} x {pictures['image_size'][1]} image: test.py's files {pictures['test_py_files_ms_p50']:.1f} ms, serve.py's PNG pair {pictures['serve_png_pair_ms_p50']:.1f} ms (p50)")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
