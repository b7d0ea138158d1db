"""serve.py as a real process on 127.0.0.1 with a real HTTP client: the numbers test.py gives, bad
requests answered and survived, the token, batching, a model swapped under the running server,
the watched folder (slow writers, unreadable files, sorting, exactly once across restarts), and
the Python API `pipeline.inspection.load` that both use."""

from __future__ import annotations

import base64
import csv
import io
import json
import os
import shutil
import socket
import struct
import threading
import time
import zlib
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from conftest import TINY, error_line, make_mvtec_category, outputs, run_script
from dataset_manager import DataError
from evaluation.metrics import threshold_at_rate
from live_server import LiveServer, free_port

TOKEN = "s3cret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def relative_close(a: float, b: float, tolerance: float) -> bool:
    return abs(a - b) <= tolerance * max(abs(a), abs(b), 1e-12)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict:
    """A tiny category, its model (with the classifier), and a second model of it for the swap."""
    base = tmp_path_factory.mktemp("serve")
    category = make_mvtec_category(base / "data" / "part")
    result = run_script("train.py", f"DATASET_DIR={category}", *TINY, *outputs(base))
    assert result.returncode == 0, result.stderr
    # another version of it (as a retrain with other settings would give): its scores are the same, its
    # image threshold, so its normalized scores, double; its id differs
    second = base / "second" / "part"
    shutil.copytree(base / "models" / "part", second)
    description = json.loads((second / "model.json").read_text())
    description["thresholds"]["image"] *= 2
    (second / "model.json").write_text(json.dumps(description))
    return {"base": base, "category": category, "model": base / "models" / "part", "second": second}


@pytest.fixture(scope="module")
def server(trained, tmp_path_factory):
    """One server for the HTTP tests, on a private copy of the model (the last test swaps it)."""
    work = tmp_path_factory.mktemp("http")
    shutil.copytree(trained["model"], work / "models" / "part")
    live = LiveServer(
        f"DATASET_DIR={trained['category']}", *TINY, f"MODEL_DIR={work / 'models'}", f"RESULTS_DIR={work / 'results'}",
        f"SERVE_TOKEN={TOKEN}", "SERVE_MAX_BYTES=200000", f"REVIEW_DIR={work / 'review'}", log_path=work / "serve.log",
    )
    live.work = work
    yield live
    assert live.stop() == 0, live.log()


def rows_of_test_py(trained) -> dict[str, dict]:
    result = run_script("test.py", str(trained["category"] / "test"), f"DATASET_DIR={trained['category']}", *TINY,
                        f"MODEL_DIR={trained['base'] / 'models'}", f"RESULTS_DIR={trained['base'] / 'results'}", "SAVE_PICTURES=False")
    assert result.returncode == 0, result.stderr
    run_dir = Path(result.stdout.split("predictions: ")[1].split()[0]).parent
    with open(run_dir / "predictions.csv") as file:
        return {Path(row["path"]).relative_to(trained["category"] / "test").as_posix(): row for row in csv.DictReader(file)}


def test_inspect_gives_test_py_numbers_through_http_and_the_python_api(server, trained):
    from pipeline.inspection import load

    rows = rows_of_test_py(trained)
    inspector = load(trained["model"], "cpu")
    model_id = server.client.get("/health").json()["model"]
    assert model_id == inspector.model_id
    for name in ("good/000.png", "blob/000.png", "blob/001.png"):
        path = trained["category"] / "test" / name
        answer = server.client.post("/inspect", content=path.read_bytes(), headers={**AUTH, "Content-Type": "image/png"})
        assert answer.status_code == 200, answer.text
        got = answer.json()
        row = rows[name]
        assert got["verdict"] == row["verdict"] and got["model"] == model_id and got["seconds"] > 0
        for field, column in (("image_score", "image_score"), ("normalized_score", "normalized_score"), ("classifier_probability", "classifier_probability")):
            assert relative_close(got[field], float(row[column]), 1e-4), (name, field, got[field], row[column])  # the CSV rounds
        assert abs(got["defect_area_fraction"] - float(row["defect_area_fraction"])) < 2e-6
        rgb = np.asarray(Image.open(path).convert("RGB"))
        for image in (path, str(path), path.read_bytes(), Image.open(path), rgb):
            mine = inspector.inspect(image)
            for field in ("image_score", "normalized_score", "classifier_probability", "defect_area_fraction"):
                assert relative_close(mine.fields()[field], got[field], 1e-5), (name, type(image), field)
            assert mine.verdict == got["verdict"]
    rgba = np.asarray(Image.open(trained["category"] / "test" / "blob" / "000.png").convert("RGBA")).copy()
    rgba[::2, :, 3] = 60  # half transparent rows: an array gives what the same RGBA file gives (composited on white)
    buffer = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(buffer, format="PNG")
    assert inspector.inspect(rgba).image_score == pytest.approx(inspector.inspect(buffer.getvalue()).image_score, rel=1e-6)
    gray = np.asarray(Image.open(path).convert("L"))  # pictures take what inspect takes; another image's size is refused
    overlay, mask = inspector.pictures(inspector.inspect(gray), gray, 64)
    assert overlay.shape[2] == 3 and mask.shape == gray.shape
    with pytest.raises(DataError, match="give the image that was inspected"):
        inspector.pictures(inspector.inspect(gray), gray[: gray.shape[0] // 2], 64)
    for empty in (np.zeros((0, 0), np.uint8), np.zeros((0, 5, 3), np.uint8), Image.new("RGB", (0, 0)), np.full((4, 4), np.nan, np.float32)):
        with pytest.raises(DataError, match="cannot read image"):  # bad input, named: never a verdict on no pixels
            inspector.inspect(empty)


def test_multipart_and_pictures_only_when_asked(server, trained):
    path = trained["category"] / "test" / "blob" / "000.png"
    plain = server.client.post("/inspect", files={"image": ("../../etc/x.png", path.read_bytes(), "image/png")}, headers=AUTH)
    assert plain.status_code == 200, plain.text
    assert "overlay_png" not in plain.json()
    pictured = server.client.post("/inspect?pictures=true", files={"image": ("x.png", path.read_bytes(), "image/png")}, headers=AUTH)
    assert pictured.status_code == 200
    overlay = Image.open(io.BytesIO(base64.b64decode(pictured.json()["overlay_png"])))
    mask = Image.open(io.BytesIO(base64.b64decode(pictured.json()["mask_png"])))
    assert overlay.format == mask.format == "PNG"
    assert mask.size == Image.open(path).size and overlay.mode == "RGB"
    assert np.asarray(mask).any()  # the painted defect is found
    misspelt = server.client.post("/inspect?picture=true", files={"image": ("x.png", path.read_bytes(), "image/png")}, headers=AUTH)
    assert misspelt.status_code == 400 and misspelt.json()["error"] == "unknown query parameter 'picture': /inspect takes pictures, token"
    assert pictured.json()["image_score"] == plain.json()["image_score"]


def _claiming_size(png: bytes, width: int, height: int) -> bytes:
    """The PNG with its header claiming `width` x `height` pixels (CRC fixed): a few kilobytes that
    would decode to hundreds of megabytes."""
    header = struct.pack(">II", width, height) + png[24:29]
    return png[:16] + header + struct.pack(">I", zlib.crc32(b"IHDR" + header)) + png[33:]


def test_bad_requests_get_a_4xx_line_and_the_server_goes_on(server, trained):
    good = (trained["category"] / "test" / "good" / "000.png").read_bytes()
    big = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (400, 400, 3), dtype=np.uint8)).save(big, "BMP")
    cases = [
        ("text", {"content": b"hello", "headers": {**AUTH, "Content-Type": "text/plain"}}, 415, "content type"),
        ("no type", {"content": good, "headers": AUTH}, 415, "content type"),
        ("empty", {"content": b"", "headers": {**AUTH, "Content-Type": "image/png"}}, 400, "empty"),
        ("garbage", {"content": b"not an image at all", "headers": {**AUTH, "Content-Type": "application/octet-stream"}}, 422, "cannot read"),
        ("truncated", {"content": good[: len(good) // 2], "headers": {**AUTH, "Content-Type": "image/png"}}, 422, "truncated"),
        ("oversize", {"content": big.getvalue(), "headers": {**AUTH, "Content-Type": "image/bmp"}}, 413, "SERVE_MAX_BYTES"),
        ("bomb", {"content": _claiming_size(good, 8000, 8000), "headers": {**AUTH, "Content-Type": "image/png"}}, 422, "8000 x 8000 pixels, over SERVE_MAX_PIXELS"),
        ("no field", {"files": {"picture": ("a.png", good, "image/png")}, "headers": AUTH}, 400, "image"),
        ("broken multipart", {"content": b"garbage", "headers": {**AUTH, "Content-Type": "multipart/form-data; boundary=xyz"}}, 400, "multipart"),
        ("pictures=maybe", {"content": good, "headers": {**AUTH, "Content-Type": "image/png"}, "params": {"pictures": "maybe"}}, 400,
         "pictures='maybe' is not allowed"),  # was FastAPI's own 422 with a "detail" list
        ("pictures twice", {"content": good, "headers": {**AUTH, "Content-Type": "image/png"}, "params": [("pictures", "true"), ("pictures", "false")]},
         400, "give it once"),
        ("two files", {"files": [("image", ("a.png", good, "image/png")), ("image", ("b.png", good, "image/png"))], "headers": AUTH}, 400,
         "more than one file"),
        ("image as text", {"files": {"image": (None, b"abc")}, "headers": AUTH}, 400, "not a file"),
        ("no token", {"content": good, "headers": {"Content-Type": "image/png"}}, 401, "token"),
        ("wrong token", {"content": good, "headers": {"Authorization": "Bearer nope", "Content-Type": "image/png"}}, 401, "token"),
    ]
    for name, request, status, words in cases:
        answer = server.client.post("/inspect", **request)
        assert answer.status_code == status, (name, answer.status_code, answer.text)
        assert words in answer.json()["error"], (name, answer.json())
        after = server.client.post("/inspect", content=good, headers={**AUTH, "Content-Type": "image/png"})
        assert after.status_code == 200, (name, after.text)
    assert "Expected boundary" not in server.log()  # the parser's own warning line stays out of the server's log
    for method, path, status in (("GET", "/nowhere", 404), ("GET", "/inspect", 405)):  # the documented {"error": ...} shape too
        answer = server.client.request(method, path, headers=AUTH)
        assert answer.status_code == status and path in answer.json()["error"], answer.text
    answer = server.client.post("/review/x", json={"label": "good"}, headers=AUTH)
    assert answer.status_code == 400 and "form field" in answer.json()["error"], answer.text
    with socket.create_connection(("127.0.0.1", server.port)) as sock:  # a client gone mid-upload: one log line, no traceback
        sock.sendall(f"POST /inspect HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\nContent-Type: image/png\r\n"
                     f"Content-Length: 100000\r\n\r\n".encode() + good[:100])
    deadline = time.monotonic() + 10
    while "disconnected" not in server.log() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert "disconnected before its POST /inspect body" in server.log() and "Traceback" not in server.log(), server.log()
    assert server.client.post("/inspect", content=good, headers={**AUTH, "Content-Type": "image/png"}).status_code == 200


def test_with_a_token_only_health_answers_without_it(server, trained):
    """The page and the pictures show the inspected parts, /model the thresholds: each needs the token."""
    good = (trained["category"] / "test" / "good" / "000.png").read_bytes()
    image_id = server.client.post("/inspect", content=good, headers={**AUTH, "Content-Type": "image/png"}).json()["id"]
    for path in ("/", "/model", f"/pictures/{image_id}/overlay.png"):
        refused = server.client.get(path)
        assert refused.status_code == 401 and "token" in refused.text, path
        assert server.client.get(path, headers=AUTH).status_code == 200, path
    page = server.client.get(f"/?token={TOKEN}").text
    assert f"/pictures/{image_id}/overlay.png?token={TOKEN}" in page  # the page's pictures carry it
    assert server.client.get(f"/pictures/{image_id}/overlay.png?token={TOKEN}").headers["content-type"] == "image/png"
    assert server.client.get("/health").status_code == 200


def test_health_and_model_describe_the_model(server):
    assert server.client.head("/health").status_code == 200  # what monitoring probes send (it was a 405)
    health = server.client.get("/health").json()
    assert health["status"] == "ok" and health["model_name"] == "part" and health["note"] == ""
    model = server.client.get("/model", headers=AUTH).json()
    assert model["type"] == "padim" and model["backbone"] == "resnet18" and model["image_size"] == [64, 64]
    assert model["thresholds"]["image"] > 0 and model["thresholds"]["classifier"] is not None and model["saved"]


def test_concurrent_requests_are_batched_and_each_gets_its_own_answer(server, trained):
    images = {name: (trained["category"] / "test" / name).read_bytes() for name in ("good/000.png", "blob/000.png", "good/001.png", "blob/001.png")}
    alone = {name: server.client.post("/inspect", content=data, headers={**AUTH, "Content-Type": "image/png"}).json()["image_score"] for name, data in images.items()}
    before = server.client.get("/health").json()
    answers, failures = [], []

    def client(offset: int) -> None:
        import httpx

        with httpx.Client(base_url=server.url, timeout=60) as own:
            for step in range(6):
                name = list(images)[(offset + step) % len(images)]
                reply = own.post("/inspect", content=images[name], headers={**AUTH, "Content-Type": "image/png"})
                (answers if reply.status_code == 200 else failures).append((name, reply.json()))

    threads = [threading.Thread(target=client, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not failures and len(answers) == 48
    for name, answer in answers:
        assert relative_close(answer["image_score"], alone[name], 1e-5), name
    after = server.client.get("/health").json()
    images_scored, batches = after["images"] - before["images"], after["batches"] - before["batches"]
    assert images_scored == 48 and batches < images_scored  # some requests shared a backbone pass
    assert after["mean_batch_size"] == pytest.approx(after["images"] / after["batches"], abs=1e-3)


def test_a_model_swapped_under_the_server_is_used_from_the_next_batch(server, trained):
    """Last of the module's HTTP tests: it replaces the server's model."""
    good = (trained["category"] / "test" / "blob" / "000.png").read_bytes()
    old_id = server.client.get("/health").json()["model"]
    from pipeline.inspection import load

    expected = {old_id: load(trained["model"], "cpu").inspect(good).normalized_score}
    new = load(trained["second"], "cpu")
    expected[new.model_id] = new.inspect(good).normalized_score
    assert new.model_id != old_id
    answers, stop = [], threading.Event()

    def keep_asking() -> None:
        import httpx

        with httpx.Client(base_url=server.url, timeout=60) as own:
            while not stop.is_set() and len(answers) < 400:
                answers.append(own.post("/inspect", content=good, headers={**AUTH, "Content-Type": "image/png"}))

    asker = threading.Thread(target=keep_asking)
    asker.start()
    time.sleep(0.5)
    target = server.work / "models" / "part"
    staged = server.work / "models" / ".part.new"
    shutil.copytree(trained["second"], staged)
    os.rename(target, server.work / "models" / ".part.old")  # the swap train.py's AtomicFolder makes
    os.rename(staged, target)
    deadline = time.monotonic() + 60
    while server.client.get("/health").json()["model"] != new.model_id and time.monotonic() < deadline:
        server.client.post("/inspect", content=good, headers={**AUTH, "Content-Type": "image/png"})
        time.sleep(0.2)
    time.sleep(0.5)
    stop.set()
    asker.join(60)
    assert server.client.get("/health").json()["model"] == new.model_id
    assert answers and all(reply.status_code == 200 for reply in answers)
    for reply in answers:  # every answer is wholly one model's
        body = reply.json()
        assert relative_close(body["normalized_score"], expected[body["model"]], 1e-5)
    assert "switched model part" in server.log()


def test_serve_py_under_torchrun_is_refused_in_one_line(monkeypatch):
    """Every rank would bind the port and the second's "address in use" would mislead: one line instead."""
    import serve

    from anomaly_model import distributed
    from settings import SettingsError

    monkeypatch.setattr(distributed, "active", lambda: True)
    with pytest.raises(SettingsError, match="serve.py runs as one process .* not torchrun"):
        serve.main([])


def test_non_loopback_host_needs_a_token(trained, tmp_path):
    result = run_script("serve.py", f"DATASET_DIR={trained['category']}", *TINY, *outputs(tmp_path), "SERVE_HOST=0.0.0.0", f"SERVE_PORT={free_port()}")
    assert "SERVE_TOKEN" in error_line(result)


def test_a_second_server_on_the_same_review_folder_is_refused_and_ids_never_repeat(server, trained, tmp_path):
    """Two servers of two parts shared REVIEW_DIR: both numbered their images alike from the same
    second, so one's correction overwrote the other's, and each model's goods mixed with the other's."""
    second = run_script("serve.py", f"DATASET_DIR={trained['category']}", *TINY, *outputs(tmp_path), f"SERVE_PORT={free_port()}",
                        f"REVIEW_DIR={server.work / 'review'}")
    assert error_line(second) == (f"error: REVIEW_DIR={server.work / 'review'} is used by another serve.py: give each server its own "
                                  "REVIEW_DIR (its corrections teach that server's model)")
    from pipeline.review_page import RecentImages

    first, other = RecentImages(5, tmp_path / "a", draw=None), RecentImages(5, tmp_path / "b", draw=None)  # made in the same second
    inspection, drawn = SimpleNamespace(verdict="good"), SimpleNamespace(drawer=None)
    assert first.add("http", "x.png", b"", inspection, drawn) != other.add("http", "x.png", b"", inspection, drawn)


def test_operating_point_on_the_command_line(trained, tmp_path):
    """The thresholds re-picked from the model's honest good scores, said in one line; without the
    rate on the command line the model's own point stands."""
    from pipeline.inspection import OperatingPoint, honest_good_scores, load

    model = json.loads((trained["model"] / "model.json").read_text())
    scores = honest_good_scores(model)
    # no labeled defects: the verdict ranks like the image score, one threshold decides it: either rate
    # moves both, CLASSIFIER_FALSE_REJECT_RATE when both are given (said), and 1.0 stays the boundary
    paths = sorted((trained["category"] / "test").rglob("*.png"))
    for point, rate in ((OperatingPoint(image_false_reject_rate=0.5), 0.5), (OperatingPoint(classifier_false_reject_rate=0.25), 0.25),
                        (OperatingPoint(image_false_reject_rate=0.5, classifier_false_reject_rate=0.25), 0.25)):
        moved = load(trained["model"], "cpu", operating_point=point)
        assert not moved.detector.classifier.uses_trees and moved.detector.classifier.similarity is None
        assert moved.detector.image_threshold == threshold_at_rate(scores, rate)
        assert (scores >= moved.detector.image_threshold).mean() <= rate  # never more goods flagged than asked
        assert any("follows this threshold" in line and "no retraining" in line for line in moved.notes)
        assert ("IMAGE_FALSE_REJECT_RATE=0.5 is not used" in " ".join(moved.notes)) == (point.image_false_reject_rate == 0.5 and rate == 0.25)
        judged = [moved.inspect(path) for path in paths]
        assert all(item.verdict == ("defect" if item.normalized_score >= 1 else "good") for item in judged)
    strict = load(trained["model"], "cpu", operating_point=OperatingPoint(image_false_reject_rate=0.01)).notes  # more than the goods can show
    assert scores.size < 100 and any(f"asks for 1 good part in 100 flagged, but the threshold rests on {scores.size} good images" in line for line in strict)
    standing = load(trained["model"], "cpu")
    assert standing.detector.image_threshold == model["thresholds"]["image"] and not standing.notes
    # the model's own rate given again changes nothing (a re-pick moved older models' thresholds by up to 24 %)
    again = load(trained["model"], "cpu", operating_point=OperatingPoint(model["thresholds"]["image_false_reject_rate"]))
    assert again.detector.image_threshold == model["thresholds"]["image"] and again.notes == [
        f"operating point: IMAGE_FALSE_REJECT_RATE={model['thresholds']['image_false_reject_rate']} is part's own rate: "
        f"its image threshold {model['thresholds']['image']:.6g} stands"]
    from_config = OperatingPoint.from_command_line(["BATCH_SIZE=4"], SimpleNamespace(IMAGE_FALSE_REJECT_RATE=0.2, CLASSIFIER_FALSE_REJECT_RATE=0.2))
    assert from_config == OperatingPoint()  # config.py's rates are the model's business; only the command line moves the point
    # an old model without the classifier's good probabilities, whose trees decide, says it needs a retrain
    model["classifier"].pop("good_probabilities", None)
    model["classifier"]["tree_share"] = 0.5
    old = tmp_path / "old"
    shutil.copytree(trained["model"], old)
    (old / "model.json").write_text(json.dumps(model))
    lines = load(old, "cpu", operating_point=OperatingPoint(classifier_false_reject_rate=0.25)).notes
    assert len(lines) == 1 and "retrain" in lines[0]
    lines = load(old, "cpu", operating_point=OperatingPoint(image_false_reject_rate=0.5)).notes  # not sent to a setting that cannot work
    assert "needs a retrain for CLASSIFIER_FALSE_REJECT_RATE to move it" in lines[0], lines


def _rows(results: Path) -> list[dict]:
    rows = []
    for path in sorted(results.glob("part/live-*/predictions.csv")):
        with open(path) as file:
            rows += list(csv.DictReader(file))
    return rows


def _wait_for_rows(results: Path, count: int, server: LiveServer, timeout: float = 60) -> list[dict]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rows = _rows(results)
        if len(rows) >= count:
            return rows
        time.sleep(0.3)
    raise AssertionError(f"{len(_rows(results))} rows, expected {count}:\n{server.log()}")


def test_watched_folder_inspects_each_file_once_whole_across_restarts(trained, tmp_path):
    from pipeline.inspection import load

    inspector = load(trained["model"], "cpu")
    watch, results = tmp_path / "incoming", tmp_path / "results"
    watch.mkdir()
    sources = trained["category"] / "test"
    shutil.copy(sources / "good" / "000.png", watch / "a.png")
    shutil.copy(sources / "blob" / "000.png", watch / "b.png")
    (watch / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is no image")
    (watch / "link.png").symlink_to(sources / "good" / "001.png")  # not followed: named once in the log
    shutil.copy(sources / "good" / "002.png", watch / os.fsdecode(b"caf\xe9.png"))  # a Latin-1 name: not UTF-8
    settings = [f"DATASET_DIR={trained['category']}", *TINY, f"MODEL_DIR={trained['base'] / 'models'}", f"RESULTS_DIR={results}",
                f"WATCH_DIR={watch}", "WATCH_SETTLE_SECONDS=0.6", f"REVIEW_DIR={tmp_path / 'review'}"]
    first = LiveServer(*settings, log_path=tmp_path / "first.log")
    slow = (sources / "blob" / "001.png").read_bytes()
    with open(watch / "slow.png", "wb") as file:  # a camera writing slowly, pausing under the settle time
        for start in range(0, len(slow), max(1, len(slow) // 8)):
            file.write(slow[start : start + max(1, len(slow) // 8)])
            file.flush()
            time.sleep(0.35)
    rows = _wait_for_rows(results, 5, first)
    health = first.client.get("/health").json()
    assert health["status"] == "ok" and health["watch"]["running"] and health["watch"]["inspected"] == 4, health
    assert first.client.get("/").status_code == 200  # the page lists the Latin-1 name too
    assert first.stop() == 0, first.log()
    by_name = {Path(row["path"]).name: row for row in rows}
    assert sorted(by_name) == ["a.png", "b.png", "broken.png", "caf\\xe9.png", "slow.png"] and len(rows) == 5
    assert by_name["broken.png"]["error"] and by_name["broken.png"]["image_score"] == "" and by_name["broken.png"]["model"] == ""
    assert {by_name[name]["model"] for name in ("a.png", "b.png", "slow.png")} == {inspector.model_id}  # which model judged it
    assert first.log().count("link.png") == 1 and "is a link: not inspected" in first.log()
    whole = inspector.inspect(slow)
    assert relative_close(float(by_name["slow.png"]["image_score"]), whole.image_score, 1e-4) and by_name["slow.png"]["error"] == ""
    run_dir = next(path for path in results.glob("part/live-*") if path.is_dir())  # not live-ledger.jsonl
    assert (run_dir / by_name["b.png"]["overlay"]).exists() and (run_dir / by_name["b.png"]["mask"]).exists()

    # a restart (now sorting) scores nothing twice; a new file reusing a name is scored
    second = LiveServer(*settings, "WATCH_SORT=True", log_path=tmp_path / "second.log")
    deadline = time.monotonic() + 30
    while (watch / "a.png").exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    shutil.copy(sources / "blob" / "002.png", watch / "a.png")
    rows = _wait_for_rows(results, 6, second)
    third = run_script("serve.py", *settings, f"SERVE_PORT={free_port()}", f"REVIEW_DIR={tmp_path / 'review-3'}")  # would score every file a second time
    assert "is watched by another serve.py" in error_line(third)
    time.sleep(1.5)  # a few more polls: nothing else may be scored
    assert second.stop() == 0, second.log()
    rows = _rows(results)
    assert len(rows) == 6, rows
    assert Path(rows[-1]["path"]).parent.name in ("good", "defect") and Path(rows[-1]["path"]).exists()
    assert relative_close(float(rows[-1]["image_score"]), inspector.inspect(sources / "blob" / "002.png").image_score, 1e-4)
    assert sorted(p.name for p in (watch / "unreadable").iterdir()) == ["broken.png"]
    sorted_names = sorted(p.name for folder in ("good", "defect") for p in (watch / folder).iterdir())
    latin = os.fsdecode(b"caf\xe9.png")
    assert sorted_names in (sorted(["a-2.png", "a.png", "b.png", "slow.png", latin]), sorted(["a.png", "a.png", "b.png", "slow.png", latin]))
    assert [p.name for p in watch.iterdir() if p.is_file()] == ["link.png"]  # only the link stays, untouched


def test_live_rows_never_go_under_a_header_they_do_not_match(tmp_path):
    """A day's predictions.csv written by an older version (other columns) is left as it is: the
    rows go to predictions-2.csv, under their own header."""
    from pipeline.watching import LIVE_COLUMNS, LiveResults

    results = LiveResults(tmp_path)
    results.folder().mkdir(parents=True)
    old = results.folder() / "predictions.csv"
    old.write_bytes(b"path,image_score,error\r\nx.png,1.5,\r\n")
    row = [f"v{number}" for number in range(len(LIVE_COLUMNS))]
    for _ in range(2):
        path, text = results.row(row)
        assert path.name == "predictions-2.csv"
        results.write(path, text)
    assert old.read_bytes() == b"path,image_score,error\r\nx.png,1.5,\r\n"
    with open(results.folder() / "predictions-2.csv", newline="") as file:
        assert list(csv.reader(file)) == [LIVE_COLUMNS, row, row]


def test_a_kill_between_the_ledger_entry_and_its_row_is_mended_at_the_next_start(tmp_path, capsys):
    """The watcher records a file in the ledger (with its row), then writes the row: killed between
    the two, the file counts as done but has no row. The next watcher writes that row, once."""
    from pipeline.watching import LIVE_COLUMNS, FileState, FolderWatcher, Ledger, LiveResults, WatchSettings

    results = tmp_path / "results" / "part"
    live = LiveResults(results)
    ledger = Ledger(results / "live-ledger.jsonl")
    rows = [[f"{name}.png"] + [""] * (len(LIVE_COLUMNS) - 1) for name in ("a", "b")]
    for number, row in enumerate(rows):
        csv_path, text = live.row(row)
        ledger.add(FileState(f"{'ab'[number]}.png", 10, 1), "0" * 64, "good", (csv_path, text))
        if number == 0:
            live.write(csv_path, text)  # b.png: killed after its ledger entry, before its row
    settings = WatchSettings(tmp_path / "incoming", False, 0.5, results, False)
    watcher = FolderWatcher(settings, None, None, None)
    watcher.stop()
    assert "wrote the row of b.png again" in capsys.readouterr().err
    with open(csv_path, newline="") as file:
        assert [line[0] for line in csv.reader(file)] == ["path", "a.png", "b.png"]
    assert not live.restore(Ledger(results / "live-ledger.jsonl").last)  # whole now: never twice
    FolderWatcher(settings, None, None, None).stop()
    with open(csv_path, newline="") as file:
        assert len(list(csv.reader(file))) == 3


def test_what_the_watcher_cannot_read_is_said_once_not_at_every_poll(tmp_path, capsys, monkeypatch):
    """A file without read permission was retried at every poll without a word (never in the
    results, nobody told); a vanished folder was logged twice a second."""
    from pipeline.watching import FolderWatcher, WatchSettings

    incoming = tmp_path / "incoming"
    incoming.mkdir()
    (incoming / "locked.png").write_bytes(b"not read")
    real_read = Path.read_bytes

    def read_bytes(path: Path) -> bytes:
        if path.name == "locked.png":
            raise PermissionError(13, "Permission denied")
        return real_read(path)

    monkeypatch.setattr(Path, "read_bytes", read_bytes)
    watcher = FolderWatcher(WatchSettings(incoming, False, 0.2, tmp_path / "results", False), None, None, None)
    watcher.start()
    time.sleep(1.5)  # about a dozen polls after the file settled
    incoming.rename(tmp_path / "away")
    time.sleep(1.0)
    (tmp_path / "away").rename(incoming)
    time.sleep(0.5)
    watcher.stop()
    log = capsys.readouterr().err
    assert log.count("cannot read locked.png in the watched folder (Permission denied): it is inspected once it can be read") == 1, log
    assert log.count(f"WARNING: watched folder {incoming}:") == 1 and log.count("can be read again") == 1, log


def test_the_worker_loads_the_model_on_its_own_thread_and_hands_back_a_load_error():
    """serve.py's torch work runs on the scoring thread only, the model's loading and the pictures
    included (a parallel region run on another living thread halved its speed); a model that
    cannot be loaded is reported where serve.py starts it."""
    from pipeline.live import BatchingWorker

    threads = []

    def loading():
        threads.append(threading.current_thread())
        return SimpleNamespace(current=SimpleNamespace(batch_size=4), refresh=lambda: None)

    worker = BatchingWorker()
    holder = worker.start(loading)
    assert holder is worker.holder and threads[0] is not threading.current_thread() and threads[0].name == "inspection-worker"
    assert worker.call(threading.current_thread).result(timeout=10) is threads[0]  # pictures' torch work goes there too
    with pytest.raises(ZeroDivisionError):
        worker.call(lambda: 1 / 0).result(timeout=10)  # answered to the caller; the worker goes on
    assert worker.call(sum, [1, 2]).result(timeout=10) == 3
    worker.stop()

    def broken():
        raise OSError("model.json: not found")

    with pytest.raises(OSError, match="model.json"):
        BatchingWorker().start(broken)


def test_a_model_folder_deleted_under_the_server_is_said_and_the_old_model_keeps_serving(tmp_path, capsys):
    """/health's note says the model folder is gone (an atomic swap never shows that); the model in
    use keeps serving, and the note clears when the folder is back as it was."""
    from types import SimpleNamespace

    from pipeline.live import ModelHolder

    folder = tmp_path / "part"
    folder.mkdir()
    (folder / "model.json").write_text("{}")
    loaded = []
    holder = ModelHolder(folder, lambda path: loaded.append(path) or SimpleNamespace(model_id="a" * 64, notes=[], detector=SimpleNamespace(runtime="torch")))
    moved = tmp_path / "moved"
    folder.rename(moved)
    assert holder.refresh() is holder.current and "holds no model now" in holder.note and "aaaaaaaaaaaa" in holder.note
    moved.rename(folder)
    assert holder.refresh() is holder.current and holder.note == "" and len(loaded) == 1
    log = capsys.readouterr()
    assert "holds a model again: the same one, aaaaaaaaaaaa, still serving" in log.out + log.err  # the log says it is over too
    (folder / "model.json").write_text('{"export": {}}')  # rewritten, the model the same (export.py): no "switched" line
    assert holder.refresh() is holder.current and len(loaded) == 2
    log = capsys.readouterr()
    assert "reloaded model part: aaaaaaaaaaaa, unchanged (torch)" in log.err and "switched" not in log.err

    def failing(path):
        raise RecursionError("maximum recursion depth exceeded")  # what no list of load errors names

    holder._load = failing
    (folder / "model.json").write_text('{"damaged": true}')
    assert holder.refresh() is holder.current  # the model in use serves on; the worker thread does not die
    assert "could not be loaded (maximum recursion depth exceeded); still serving aaaaaaaaaaaa" in holder.note


def test_review_corrections_are_stored_in_a_format_the_updates_read(tmp_path):
    """A WebP or GIF sent to /inspect is stored under its own ending, which datasets, test.py, the
    watched folder and `train.py ADD_GOOD=` all read; a format they would not read (an icon) is
    stored as PNG of the pixels inspected, never under an ending the update skips."""
    from types import SimpleNamespace

    from dataset_manager import IMAGE_EXTENSIONS, find_images, read_rgb
    from pipeline.inspection import to_rgb
    from pipeline.review_page import _SUFFIXES, RecentImages

    assert set(_SUFFIXES.values()) <= set(IMAGE_EXTENSIONS)
    pixels = (np.arange(32 * 32 * 3) % 251).astype(np.uint8).reshape(32, 32, 3)
    images = RecentImages(10, tmp_path / "review", draw=None)
    stored, sent = {}, {}
    for form in ("WEBP", "GIF", "ICO"):
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format=form)
        sent[form] = buffer.getvalue()
        image_id = images.add("http", f"x.{form.lower()}", sent[form], SimpleNamespace(verdict="defect"), SimpleNamespace(drawer=SimpleNamespace(rgb=to_rgb)))
        stored[form] = images.correct(images.get(image_id), "good")
    assert [stored[form].suffix for form in ("WEBP", "GIF", "ICO")] == [".webp", ".gif", ".png"]
    assert sorted(find_images(tmp_path / "review" / "good")) == sorted(stored.values())  # what ADD_GOOD will learn
    assert stored["WEBP"].read_bytes() == sent["WEBP"]  # the bytes as sent, where the format is one the updates read
    assert np.array_equal(read_rgb(stored["ICO"]), read_rgb(io.BytesIO(sent["ICO"])))  # else the pixels as inspected


def test_the_review_page_keeps_no_model_alive(trained, tmp_path):
    """Each kept image held the Inspector that judged it: every swapped-out model (~460 MB for
    MobileNetV2 on tire) stayed in memory until its last image left the page."""
    import gc
    import weakref

    from pipeline.inspection import load
    from pipeline.review_page import RecentImages

    inspector = load(trained["model"], "cpu")
    path = trained["category"] / "test" / "good" / "000.png"
    recent = RecentImages(5, tmp_path / "review", draw=lambda drawer, inspection, rgb, size: drawer.pictures(inspection, rgb, size))
    image_id = recent.add("http", "a.png", path.read_bytes(), inspector.inspect(path), inspector)
    model = weakref.ref(inspector.detector.model)
    del inspector
    gc.collect()
    assert model() is None
    assert recent.overlay(recent.get(image_id)).startswith(b"\x89PNG")  # its pictures are still drawn


def test_a_correction_the_disk_refuses_leaves_no_partial_copy(tmp_path, monkeypatch):
    """REVIEW_DIR full: the half-written `.partial` copy stayed (and the page answered a bare 500)."""
    import errno
    from types import SimpleNamespace

    from pipeline.inspection import to_rgb
    from pipeline.review_page import RecentImages

    images = RecentImages(10, tmp_path / "review", draw=None)
    buffer = io.BytesIO()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(buffer, format="PNG")
    image_id = images.add("http", "x.png", buffer.getvalue(), SimpleNamespace(verdict="defect"), SimpleNamespace(drawer=SimpleNamespace(rgb=to_rgb)))
    real_write = Path.write_bytes

    def write_half(path: Path, data: bytes) -> int:
        real_write(path, data[:3])
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(Path, "write_bytes", write_half)
    with pytest.raises(OSError):
        images.correct(images.get(image_id), "good")
    assert list((tmp_path / "review" / "good").iterdir()) == [] and images.get(image_id).correction == ""


def test_the_python_apis_operating_point_is_checked_as_the_command_line_is():
    from pipeline.inspection import OperatingPoint
    from settings import SettingsError

    assert OperatingPoint(image_false_reject_rate=0.02).image_false_reject_rate == 0.02
    for given, words in ((dict(image_false_reject_rate=-0.1), "IMAGE_FALSE_REJECT_RATE=-0.1 is not allowed"),
                         (dict(image_false_reject_rate="0.05"), "is text: write it without quotes"),
                         (dict(classifier_false_reject_rate=1.0), r"CLASSIFIER_FALSE_REJECT_RATE=1.0 is not allowed: .* \[0, 1\)")):
        with pytest.raises(SettingsError, match=words):  # was a bare ValueError from numpy, or accepted
            OperatingPoint(**given)


def test_the_python_api_reads_what_embedders_pass_and_refuses_the_rest_in_one_line(trained):
    """What a developer embedding the suite passes: numpy subclasses and OpenCV's (H, W, 1) arrays are
    read as plain arrays (an np.matrix crashed the process inside np.repeat), a closed PIL image and
    a bad argument are one-line errors, and a result kept from a batch holds its own map only."""
    from anomaly_model.errors import ModelError
    from pipeline.inspection import OperatingPoint, load
    from settings import SettingsError

    inspector = load(trained["model"], "cpu")
    path = trained["category"] / "test" / "good" / "000.png"
    gray = np.asarray(Image.open(path).convert("L"))  # read-only, as PIL gives it
    plain = inspector.inspect(gray).image_score
    for same in (np.asmatrix(gray), np.ma.masked_array(gray, mask=gray > 100), gray[:, :, None]):
        assert inspector.inspect(same).image_score == plain, type(same)
    marked = gray > 100
    assert inspector.inspect(marked).image_score == inspector.inspect(marked.astype(np.uint8) * 255).image_score  # True is white
    with pytest.raises(DataError, match="a numpy image holds integers, floats or booleans, not complex128"):
        inspector.inspect(gray.astype(complex))
    with Image.open(path) as closed:
        pass
    with pytest.raises(DataError, match="the PIL image's file was closed before its pixels were read"):
        inspector.inspect(closed)
    many = inspector.inspect_many([path] * 3)
    alone = inspector.inspect(path).image_score
    assert all(relative_close(result.image_score, alone, 1e-5) for result in many)  # a batch of 3 differs in the last bits
    for result in many:  # not a view into the batch's maps
        assert result.anomaly_map.untyped_storage().nbytes() == result.anomaly_map.numel() * result.anomaly_map.element_size()
    with pytest.raises(DataError, match="inspect_many takes a list of images, not one str"):
        inspector.inspect_many(str(path))
    with pytest.raises(ValueError, match="preview_size=0"):
        inspector.pictures(many[0], path, 0)
    assert inspector.pictures(many[0], path)[1].shape == gray.shape  # the mask at the image's size, preview 640 by default
    assert OperatingPoint(np.float32(0.25)).image_false_reject_rate == 0.25
    with pytest.raises(TypeError, match="operating_point must be an OperatingPoint"):
        load(trained["model"], "cpu", operating_point=0.01)
    with pytest.raises(SettingsError, match="BATCH_SIZE=0 is not allowed"):
        load(trained["model"], "cpu", batch_size=0)
    with pytest.raises(ModelError, match="'mps' is not a device this suite runs on"):
        load(trained["model"], "mps")
    with pytest.raises(ModelError, match="give the model folder that holds it"):
        load(trained["model"] / "model.json", "cpu")


def test_a_pixel_at_the_pixel_threshold_is_marked_defect_as_the_threshold_counts_it():
    """threshold_at_rate flags value >= threshold: the mask, the outline and defect_area_fraction
    read the threshold the same way (they used >, so the goods the threshold counted were unmarked)."""
    import torch

    from dataset_manager import Preprocessor
    from pipeline.pictures import picture_arrays

    level = threshold_at_rate(np.r_[np.zeros(98), 1.0, 1.0], 0.02)  # the two goods at 1.0 are the 2 % it flags
    assert level == 1.0
    anomaly_map = torch.zeros(32, 32)
    anomaly_map[8:16, 8:16] = level
    preview = np.zeros((32, 32, 3), np.uint8)
    drawn, mask = picture_arrays(anomaly_map, (32, 32), preview, Preprocessor(32, 32, (0.5,) * 3, (0.2,) * 3), level, (0.0, 2.0))
    assert mask.sum() == 64 and mask[8:16, 8:16].all()
    assert drawn[8, 8].tolist() == [255, 255, 255] and drawn[0, 0].tolist() != [255, 255, 255]  # its outline


def test_results_that_cannot_be_written_keep_the_file_waiting_and_health_says_why(trained, tmp_path):
    """A full or read-only RESULTS_DIR was blamed on the watched folder, the file scored again at
    every poll, and /health said "ok"; a file where a folder is expected stopped serve.py with a traceback."""
    from datetime import date

    watch, results = tmp_path / "incoming", tmp_path / "results"
    settings = [f"DATASET_DIR={trained['category']}", *TINY, f"MODEL_DIR={trained['base'] / 'models'}", f"RESULTS_DIR={results}",
                f"REVIEW_DIR={tmp_path / 'review'}", "WATCH_SETTLE_SECONDS=0.3", "SAVE_PICTURES=False"]
    (tmp_path / "a-file").write_text("")
    refused = run_script("serve.py", *settings, f"WATCH_DIR={tmp_path / 'a-file'}")
    assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr
    assert f"error: WATCH_DIR={tmp_path / 'a-file'} cannot be used as a folder" in refused.stderr
    blocker = results / "part" / f"live-{date.today().strftime('%Y%m%d')}"  # today's rows cannot go there
    blocker.parent.mkdir(parents=True)
    blocker.write_text("in the way")
    watch.mkdir()
    live = LiveServer(*settings, f"WATCH_DIR={watch}", log_path=tmp_path / "serve.log")
    try:
        shutil.copy(trained["category"] / "test" / "good" / "000.png", watch / "a.png")
        deadline = time.monotonic() + 30
        while "waiting" not in live.client.get("/health").json()["status"] and time.monotonic() < deadline:
            time.sleep(0.2)
        health = live.client.get("/health").json()
        assert health["status"].startswith("the folder watcher is waiting: cannot write the results in") and health["watch"]["inspected"] == 0, health
        assert live.log().count("cannot write the results") == 1 and "watched folder" not in live.log().split("cannot write")[0][-80:]
        blocker.unlink()  # space again: the file is inspected, once
        while live.client.get("/health").json()["watch"]["inspected"] < 1 and time.monotonic() < deadline + 15:
            time.sleep(0.2)
        health = live.client.get("/health").json()
        assert health["status"] == "ok" and health["watch"]["inspected"] == 1 and health["watch"]["problem"] is None, health
        assert len(list(csv.DictReader(open(blocker / "predictions.csv")))) == 1
        assert "the results can be written again" in live.log() and "can be read again" not in live.log()  # not the folder's words
    finally:
        assert live.stop() == 0, live.log()


def test_sorting_shortens_a_name_too_long_to_number_and_remakes_missing_folders(tmp_path):
    """A second file of a 255-byte name could not be numbered (-2) in good/: the watcher stopped
    inspecting the whole folder; sorted folders removed while serving were never made again."""
    from pipeline.watching import FileState, FolderWatcher, WatchSettings, _Ready

    incoming = tmp_path / "incoming"
    (incoming / "good").mkdir(parents=True)
    name = "M" * 251 + ".png"
    (incoming / "good" / name).write_bytes(b"the first one")
    (incoming / name).write_bytes(b"the second one")
    watcher = FolderWatcher(WatchSettings(incoming, True, 0.2, tmp_path / "results", False), None, None, None)
    try:
        target = watcher._destination(incoming / name, "good")
        assert target.parent == incoming / "good" and target.name.endswith("-2.png") and len(target.name.encode()) <= 255
        shutil.rmtree(incoming / "good")
        watcher._finish(_Ready(FileState(name, 14, 0), b"", "", 1.0), target)
        assert target.read_bytes() == b"the second one"
    finally:
        watcher.stop()
