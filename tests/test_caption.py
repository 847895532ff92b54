"""Batch jobs (meganeura caption): rows equal batched greedy pipe.generate answers (tiny VLM and
the real SmolLM2), bad inputs become error rows, a job killed with SIGKILL (or stopped with
Ctrl-C) and started again ends with every input exactly once, and the Ray path (a two-node
cluster on loopback, two actors) gives the same rows."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import meganeura
from meganeura.jobs import DEFAULT_PROMPT, list_inputs
from meganeura.jobs import local as local_jobs
from tiny_models import write_tiny_smolvlm_folder

ROOT = Path(__file__).resolve().parents[1]
TOKENS = 8


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny")
    write_tiny_smolvlm_folder(folder)
    return folder


@pytest.fixture(scope="module")
def pipe(tiny):
    return meganeura.load(str(tiny), device="cpu", progress=False)


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """Eight small pictures of three shapes (so different tile counts), some in a subfolder."""
    folder = tmp_path_factory.mktemp("photos")
    (folder / "b").mkdir()
    rng = np.random.default_rng(0)
    for i in range(8):
        pixels = rng.integers(0, 256, [(40, 90, 3), (64, 64, 3), (90, 30, 3)][i % 3], dtype=np.uint8)
        Image.fromarray(pixels).save(folder / ("b" if i % 3 == 0 else "") / f"p{i:02d}.png")
    return folder


def ask(path: str, prompt: str = DEFAULT_PROMPT) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image", "image": path}, {"type": "text", "text": prompt}]}]


def listing(folder: Path) -> list[str]:
    return sorted(str(p) for p in folder.rglob("*.png"))


@pytest.fixture(scope="module")
def expected(pipe, tiny, photos) -> list[dict]:
    """The rows of a job over `photos`: one batched greedy pipe.generate call."""
    paths = listing(photos)
    results = pipe.generate([ask(p) for p in paths], max_new_tokens=TOKENS)
    return [{"path": p, "prompt": DEFAULT_PROMPT, "text": r.text, "finish_reason": r.finish_reason,
             "prompt_tokens": r.prompt_tokens, "completion_tokens": len(r.token_ids), "error": None,
             "model": str(tiny)} for p, r in zip(paths, results)]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_inputs_from_folders_globs_and_tables(photos, tmp_path):
    assert [i.path for i in list_inputs(photos)] == listing(photos)  # recursive, sorted
    assert [i.path for i in list_inputs(str(photos / "b" / "*.png"), prompt="Q")] == listing(photos / "b")
    table = tmp_path / "jobs.csv"
    table.write_text("file,question\nb/p00.png,What?\n,Say hi.\nb/p03.png,\n")
    items = list_inputs(table, prompt_column="question", path_column="file")  # relative to the table's folder
    assert [(i.path, i.prompt) for i in items] == [(str(tmp_path / "b/p00.png"), "What?"), ("", "Say hi."),
                                                   (str(tmp_path / "b/p03.png"), DEFAULT_PROMPT)]
    with pytest.raises(ValueError, match="--prompt or --prompt-column, not both"):
        list_inputs(table, prompt="Q", prompt_column="question")
    with pytest.raises(ValueError, match="--path-column 'image' is not a column .*file, question"):
        list_inputs(table, path_column="image")
    with pytest.raises(ValueError, match="--prompt-column question needs a table"):
        list_inputs(photos, prompt_column="question")
    with pytest.raises(ValueError, match="matches no files"):
        list_inputs(str(tmp_path / "*.webp"))


def test_rows_equal_batched_greedy_answers_in_input_order(pipe, photos, expected, tmp_path):
    out = tmp_path / "captions.parquet"
    rows = meganeura.caption(photos, out, model=pipe, max_new_tokens=TOKENS, batch_size=3, progress=False)
    assert [r["path"] for r in rows] == listing(photos)  # recursive, sorted
    assert rows == expected
    import pyarrow.parquet as pq
    assert pq.read_table(out).to_pylist() == expected
    assert not (tmp_path / "captions.parquet.parts").exists()


def test_bad_inputs_become_error_rows_and_the_job_goes_on(pipe, photos, tmp_path):
    (tmp_path / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a JPEG")
    (tmp_path / "notes.png").write_text("a shopping list, not a picture")
    Image.new("1", (9000, 8000)).save(tmp_path / "huge.png")  # 72 megapixels: over the 64 MP limit
    table = tmp_path / "jobs.jsonl"
    good = str(photos / "p01.png")
    table.write_text("".join(json.dumps(r) + "\n" for r in [
        {"path": good}, {"path": "missing.png"}, {"path": "corrupt.jpg"}, {"path": "notes.png"},
        {"path": "huge.png"}, {"path": None}]))
    out = tmp_path / "out.jsonl"
    rows = meganeura.caption(table, out, model=pipe, max_new_tokens=TOKENS, progress=False)
    assert rows == read_jsonl(out)
    assert rows[0]["error"] is None and rows[0]["text"] == pipe.generate(ask(good), max_new_tokens=TOKENS).text
    errors = [r["error"] for r in rows[1:]]
    for error, words in zip(errors, [("missing.png", "not found"), ("corrupt.jpg", "cannot read"),
                                     ("notes.png", "not an image"), ("huge.png", "72000000 pixels", "limit"),
                                     ("no prompt",)]):
        assert all(w in error for w in words), error
    assert all(r["finish_reason"] == "error" and r["text"] is None for r in rows[1:])


def test_real_smollm2_answers_a_table_of_prompts(tmp_path):
    smollm2 = meganeura.load("smollm2-135m-instruct", device="cpu", progress=False)
    prompts = ["What is the capital of France?", "Name a colour.", "Say hello."]
    table = tmp_path / "prompts.jsonl"
    table.write_text("".join(json.dumps({"id": k, "question": q}) + "\n" for k, q in enumerate(prompts)))
    rows = meganeura.caption(table, None, model=smollm2, prompt_column="question", max_new_tokens=10,
                             batch_size=2, progress=False)
    want = smollm2.generate([[{"role": "user", "content": q}] for q in prompts], max_new_tokens=10)
    assert [(r["path"], r["prompt"], r["error"]) for r in rows] == [("", q, None) for q in prompts]
    assert [r["text"] for r in rows] == [w.text for w in want]
    assert [r["completion_tokens"] for r in rows] == [len(w.token_ids) for w in want]
    assert "Paris" in rows[0]["text"]


def _caption_command(tiny, photos, out, *extra, batch: int = 2) -> list[str]:
    return [sys.executable, "-m", "meganeura.cli", "caption", str(photos), "--output", str(out), "--model", str(tiny),
            "--device", "cpu", "--max-new-tokens", str(TOKENS), "--batch-size", str(batch), *extra]


def _stop_after_parts(command, parts: Path, sig: int, count: int) -> subprocess.CompletedProcess:
    # Ctrl-C's default action in the child whatever this process inherited: a shell runs a job
    # put in the background with SIGINT ignored, and Python then installs no KeyboardInterrupt
    proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 120
    while len(list(parts.glob("part-*"))) < count and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    assert proc.poll() is None, "the job ended before it could be stopped"
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    return subprocess.CompletedProcess(command, proc.returncode, out, err)


def test_a_killed_job_restarted_ends_with_every_input_once(tiny, photos, expected, tmp_path):
    out, parts = tmp_path / "out.jsonl", tmp_path / "out.jsonl.parts"
    command = _caption_command(tiny, photos, out, batch=1)  # a part per row: many moments to stop it at
    stopped = _stop_after_parts(command, parts, signal.SIGINT, 1)  # Ctrl-C: commits what is done, exits 130
    assert stopped.returncode == 130 and "run the same command to go on" in stopped.stderr, stopped.stderr
    after_ctrl_c = len(list(parts.glob("part-*")))
    killed = _stop_after_parts(command, parts, signal.SIGKILL, after_ctrl_c + 1)
    assert killed.returncode == -signal.SIGKILL and not out.exists()
    committed = [json.loads(line) for part in parts.glob("part-*.jsonl") for line in part.read_text().splitlines()]
    assert 0 < len(committed) < len(expected) and len({r["index"] for r in committed}) == len(committed)

    other = subprocess.run(_caption_command(tiny, photos, out, "--temperature", "0.5", batch=1), cwd=ROOT,
                           capture_output=True, text=True, timeout=300)
    assert other.returncode == 2 and "holds the parts of another job (its settings differ)" in other.stderr

    finished = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr
    assert read_jsonl(out) == expected
    assert not parts.exists()


def _end_processes_marked(token: str) -> None:
    """Ray workers that outlive their raylets (seen here: busy actors) would go on using the CPU."""
    import psutil
    for proc in psutil.process_iter():
        try:
            if proc.pid != os.getpid() and proc.environ().get("MEGANEURA_RAY_TEST") == token:
                proc.kill()
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            pass


def test_ray_cluster_of_two_nodes_gives_the_same_rows_and_resumes(tiny, photos, expected, tmp_path, monkeypatch):
    out = tmp_path / "out.parquet"
    real = local_jobs.caption_rows

    def interrupted(*args, **kwargs):  # a local run stopped by Ctrl-C after three rows
        rows = real(*args, **kwargs)
        for _ in range(3):
            yield next(rows)
        rows.close()
        raise KeyboardInterrupt
    monkeypatch.setattr(local_jobs, "caption_rows", interrupted)
    with pytest.raises(KeyboardInterrupt):
        meganeura.caption(photos, out, model=str(tiny), device="cpu", max_new_tokens=TOKENS, batch_size=2,
                          progress=False)
    assert len(list((tmp_path / "out.parquet.parts").glob("part-*.parquet"))) == 2  # rows 1-2, then row 3

    # Every Ray process on loopback: otherwise Ray swaps 127.0.0.1 for the machine's address.
    pytest.importorskip("ray")
    from ray._private import ray_constants
    from ray.cluster_utils import Cluster
    monkeypatch.setenv(ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR, "0")  # for the node and driver processes
    monkeypatch.setattr(ray_constants, "ENABLE_RAY_CLUSTER", False)     # for this one, which imported Ray already
    token = f"{os.getpid()}-{time.time_ns()}"  # marks every process of this cluster, to end any the shutdown misses
    monkeypatch.setenv("MEGANEURA_RAY_TEST", token)
    # Two nodes of two logical CPUs: room for two engine actors (one CPU each) and the decoding tasks.
    node = {"num_cpus": 2, "node_ip_address": "127.0.0.1", "object_store_memory": 100 * 2**20}
    cluster = Cluster(initialize_head=True, head_node_args={**node, "include_dashboard": False})
    try:
        cluster.add_node(**node)
        cluster.wait_for_nodes(timeout=60)
        # The driver runs in a process of its own, so that a stuck cluster fails the test instead of hanging it.
        job = subprocess.run(_caption_command(tiny, photos, out, "--ray", cluster.address, "--workers", "2"),
                             cwd=ROOT, capture_output=True, text=True, timeout=240)
    finally:
        cluster.shutdown()
        _end_processes_marked(token)
    assert job.returncode == 0, job.stderr[-3000:]
    import pyarrow.parquet as pq
    assert pq.read_table(out).to_pylist() == expected
