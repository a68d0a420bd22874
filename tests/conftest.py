"""Shared fixtures. The environment is isolated (offline HF, private Prefect home, cached torch extensions)."""
import os
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import torch

from rlhf_tasks.launch import free_port  # noqa: F401  (also imported by tests from here)

torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))

ROOT = Path(__file__).resolve().parent.parent
_SESSION_TMP = Path(os.environ.get("RLHF_TEST_TMP", "/tmp")) / f"rlhf-tests-{os.getpid()}"
(_SESSION_TMP / "prefect-home").mkdir(parents=True, exist_ok=True)
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
# Tiny models run fastest single-threaded on this 2-core box (and subprocess ranks do not oversubscribe the cores).
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ["PREFECT_HOME"] = str(_SESSION_TMP / "prefect-home")
os.environ["PREFECT_LOCAL_STORAGE_PATH"] = str(_SESSION_TMP / "prefect-results")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))
# Tiny models built once per machine are reused across test sessions (deterministic builds).
os.environ.setdefault("RLHF_CACHE_DIR", str(ROOT / ".cache" / "rlhf_tasks"))


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A local store shared by the tests of one module (stage jobs reuse its data artifact)."""
    from rlhf_tasks.store import ArtifactStore

    root = tmp_path_factory.mktemp("store")
    return ArtifactStore(str(root / "store"), cache_dir=root / "cache")


@pytest.fixture(scope="module")
def data_uri(store):
    """A demo `data` artifact (first 400 rows) built by the real data stage in the module's store."""
    from _training_helpers import make_data_artifact, tiny_cfg

    return make_data_artifact(store, tiny_cfg(), n_rows=400)


@pytest.fixture
def single_process_group(monkeypatch):
    """An in-process DeepSpeed process group of one rank (fresh rendezvous), torn down after the test."""
    from rlhf_tasks.training.distributed import destroy_distributed, init_distributed

    for k, v in dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                     MASTER_PORT=str(free_port())).items():
        monkeypatch.setenv(k, v)
    init_distributed()
    yield
    destroy_distributed()


@pytest.fixture
def local_store(tmp_path):
    from rlhf_tasks.store import ArtifactStore

    return ArtifactStore(str(tmp_path / "store"), cache_dir=tmp_path / "cache")


@pytest.fixture(scope="session")
def moto_server():
    """A real S3-compatible server (moto) on a free loopback port; yields its endpoint URL."""
    port = free_port()
    exe = Path(sys.executable).with_name("moto_server")
    proc = subprocess.Popen([str(exe), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            time.sleep(0.1)
    else:
        proc.kill()
        raise RuntimeError("moto_server did not start")
    old = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")}
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1")
    yield endpoint
    proc.terminate()
    proc.wait(10)
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture
def s3_bucket(moto_server):
    """A fresh bucket on the moto server; yields `s3://bucket`."""
    import boto3

    name = f"b-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=moto_server).create_bucket(Bucket=name)
    return f"s3://{name}"


@pytest.fixture
def s3_store(moto_server, s3_bucket, tmp_path):
    from rlhf_tasks.store import ArtifactStore

    return ArtifactStore(f"{s3_bucket}/prefix", endpoint_url=moto_server, cache_dir=tmp_path / "cache")


@pytest.fixture(params=["local", "s3"])
def any_store(request, tmp_path):
    """The same tests against a local folder and a real S3-compatible server."""
    if request.param == "local":
        return request.getfixturevalue("local_store")
    return request.getfixturevalue("s3_store")
