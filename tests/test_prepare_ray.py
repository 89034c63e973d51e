"""`jaxlm data prepare --engine ray` on a local Ray cluster (2 CPUs) that the tests start: byte-identical
output to the local engine at 1, 2 and 4 workers, and a worker killed mid-stage is retried to the same
output. Slow: starting Ray and its workers takes tens of seconds on this 2-core machine."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from jaxlm.data import corpus
from jaxlm.data.prepare import run as prepare

pytestmark = pytest.mark.slow
RAY = os.path.join(os.path.dirname(sys.executable), "ray")
# A throwaway cluster on 127.0.0.1: no token authentication between it and the prepare processes.
ENV = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled", "JAX_PLATFORMS": "cpu"}


@pytest.fixture(scope="module")
def cluster():
    pytest.importorskip("ray")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    subprocess.run([RAY, "start", "--head", "--num-cpus=2", f"--port={port}", "--include-dashboard=false",
                    "--node-ip-address=127.0.0.1"], check=True, capture_output=True, env=ENV)
    yield f"127.0.0.1:{port}"
    subprocess.run([RAY, "stop", "--force"], capture_output=True, env=ENV)


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    """English JSONL with exact and near copies and a malformed line, a Chinese .txt, and an empty file."""
    folder = tmp_path_factory.mktemp("raw")
    bible = corpus.documents("bible")
    with open(folder / "en.jsonl", "w") as f:
        for i, d in enumerate(bible[:300]):
            f.write(json.dumps({"text": d}) + "\n")
            if i % 10 == 3:
                f.write(json.dumps({"text": d.upper()}) + "\n")  # exact after case folding
            if i % 10 == 5:
                f.write(json.dumps({"text": d.replace(" and ", " also ", 3)}) + "\n")  # near
        f.write("{not json\n")
    (folder / "zh.txt").write_text("\n\n".join(corpus.peoples_daily()[:80]))
    (folder / "empty.jsonl").write_text("")
    return str(folder)


WORDS = ["vocab_size=2000", "docs_per_shard=64", "block_kb=64"]


def _run(raw: str, out: str, *extra: str) -> dict:
    cmd = [sys.executable, "-m", "jaxlm.cli", "data", "prepare", f"{raw}/*", *WORDS, "--out", out, "--no-progress",
           *extra]
    done = subprocess.run(cmd, capture_output=True, text=True, env=ENV)
    assert done.returncode == 0, done.stderr[-3000:]
    with open(os.path.join(out, "manifest.json")) as f:
        return json.load(f)


def _without_timings(m: dict) -> dict:
    def strip(x):
        if isinstance(x, dict):
            return {k: strip(v) for k, v in x.items() if "seconds" not in k}
        return x

    return strip(json.loads(json.dumps({k: v for k, v in m.items() if k != "execution"})))  # tuples as lists


def _same_output(a: str, b: str, manifest: dict) -> None:
    for name in [s["file"] for s in manifest["shards"]] + [manifest["tokenizer"]["file"]]:
        with open(os.path.join(a, name), "rb") as fa, open(os.path.join(b, name), "rb") as fb:
            assert fa.read() == fb.read(), name


@pytest.fixture(scope="module")
def local(raw, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("local") / "out")
    return out, _run(raw, out, "workers=1")


@pytest.mark.parametrize("workers", [1, 2, 4])
def test_ray_output_is_byte_identical_to_local(cluster, raw, local, tmp_path, workers):
    local_out, local_manifest = local
    m = _run(raw, str(tmp_path / "ray"), f"workers={workers}", "--engine", "ray", "--ray-address", cluster)
    assert m["execution"]["engine"] == "ray" and m["execution"]["workers"] == workers
    assert _without_timings(m) == _without_timings(local_manifest)
    _same_output(local_out, str(tmp_path / "ray"), m)
    st = m["stages"]
    assert st["exact_dedup"]["dropped"]["duplicate"] >= 25 and st["near_dedup"]["dropped"]["duplicate"] >= 25
    files = {os.path.basename(f["path"]): f for f in m["files"]}
    assert files["en.jsonl"]["malformed_json"] == 1 and files["empty.jsonl"]["empty_file"]


def _clean_task_pids() -> list[int]:
    """Ray workers running a clean_block task (Ray titles a busy worker's process ray::<task name>)."""
    pids = []
    for pid in os.listdir("/proc"):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if f.read().startswith(b"ray::clean_block"):
                    pids.append(int(pid))
        except (OSError, ValueError):
            continue
    return pids


def test_a_worker_killed_mid_stage_is_retried_to_the_same_output(cluster, raw, local, tmp_path):
    local_out, local_manifest = local
    out = str(tmp_path / "killed")
    cmd = [sys.executable, "-m", "jaxlm.cli", "data", "prepare", f"{raw}/*", *WORDS, "workers=2", "--out", out,
           "--no-progress", "--engine", "ray", "--ray-address", cluster]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=ENV)
    killed, deadline = None, time.time() + 180
    while killed is None and proc.poll() is None and time.time() < deadline:
        pids = _clean_task_pids()
        if pids:
            os.kill(pids[0], signal.SIGKILL)
            killed = pids[0]
        time.sleep(0.005)
    _, err = proc.communicate(timeout=300)
    assert killed is not None, "no clean_block task was seen running"
    assert proc.returncode == 0, err[-3000:]
    with open(os.path.join(out, "manifest.json")) as f:
        m = json.load(f)
    assert _without_timings(m) == _without_timings(local_manifest)
    _same_output(local_out, out, m)


def test_the_local_engine_is_deterministic_across_worker_counts(raw, local, tmp_path):
    local_out, local_manifest = local
    m = prepare.prepare([f"{raw}/*"], str(tmp_path / "two"), prepare.parse_config([*WORDS, "workers=2"]),
                        progress=False)
    assert _without_timings(m) == _without_timings(local_manifest)
    _same_output(local_out, str(tmp_path / "two"), m)


def test_ray_components_keep_one_per_cluster_through_chains(cluster, monkeypatch):
    """The crafted clusters of test_prepare.py's component test (chains A~B~C with A!~C), their label
    propagation run as Ray tasks over 1 and 3 partitions."""
    import numpy as np

    from jaxlm.data.prepare import engines, minhash
    from test_prepare import _crafted

    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    sigs = _crafted({1: 84, 2: 84, 4: 0, 5: 100, 7: 90, 8: 90, 9: 90, 10: 40})
    ids = np.arange(len(sigs), dtype=np.int64)
    edges = minhash.verify(minhash.candidate_edges(minhash.band_keys(sigs, 32).reshape(-1), np.repeat(ids, 32)),
                           lambda x: sigs[x], 0.6)
    for parts in (1, 3):
        with engines.Ray(parts, progress=False, address=cluster) as ex:
            dropped, rounds = prepare.components(ex, np.array_split(edges, 2))
        assert dropped.tolist() == [1, 2, 5, 7, 8, 9] and rounds >= 2
