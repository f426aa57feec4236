"""Shared fixtures: offline test environment, an embedded S3 server, a synthetic dataset, a local Ray."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

CAMVID = Path(__file__).parents[2] / "shared" / "data" / "camvid"


@pytest.fixture(scope="session", autouse=True)
def offline_env():
    """No Ray auth, no Hugging Face downloads, no MLflow server from the caller's environment."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RAY_AUTH_MODE", "disabled")
        mp.setenv("HF_HUB_OFFLINE", "1")
        for name in list(os.environ):
            if name.startswith("MLFLOW_"):
                mp.delenv(name)
        yield


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory, offline_env):
    """A running SeaweedFS S3 server with fresh credentials, exported as AWS_* for the session."""
    from raysseg.io.storage import SeaweedServer

    access, secret = SeaweedServer.generate_credentials()
    server = SeaweedServer(tmp_path_factory.mktemp("seaweed"), access_key=access, secret_key=secret)
    with server, pytest.MonkeyPatch.context() as mp:
        mp.delenv("S3_ENDPOINT_URL", raising=False)
        mp.setenv("AWS_REGION", "us-east-1")
        for name, value in server.client_env.items():
            mp.setenv(name, value)
        yield server


@pytest.fixture(scope="session")
def synth_data(tmp_path_factory) -> Path:
    """Root of a small synthetic dataset (8 train / 4 val images of 48x64, 5 classes)."""
    from raysseg.apps.synth import synth_dataset

    root = tmp_path_factory.mktemp("synth")
    synth_dataset(str(root), n_train=8, n_val=4, size=(48, 64), seed=0)
    return root


@pytest.fixture(scope="session")
def ray_local(offline_env, s3_server):
    """A local Ray shared by the whole session: 2 cores plus 2 logical CPUs for long-lived
    workers (as ``raysseg.runtime.driver.init_ray`` does), with the S3 server's variables in every worker
    (inherited, as a user's shell variables are)."""
    import ray

    # Ray's processes inherit this process's environment, which s3_server has set; nothing secret goes
    # into a runtime env (Ray logs those).
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FAISS_OPT_LEVEL", "generic")
        ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=True,
                 object_store_memory=1 << 30)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def camvid() -> Path:
    """The real CamVid folder (train/val with images/labels); skips when absent."""
    if not (CAMVID / "train" / "images").is_dir():
        pytest.skip(f"CamVid not found at {CAMVID} (expected train/images and val/images there)")
    return CAMVID
