"""The model registry holds MLflow Models (a pyfunc: image -> label map), registering a run twice keeps one
version, and the sweep and pull-best pick the same best run at a tie. A real SQLite MLflow store in tmp_path;
the runs carry a small fixture checkpoint (tests/fixtures/checkpoints)."""
import json
import lzma
import os
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

FIXTURE = Path(__file__).parent / "fixtures" / "checkpoints" / "kmeans.pt.xz"


@dataclass
class Store:
    uri: str
    client: object
    experiment: str  # one per test: the tests share one store (creating one takes seconds)
    experiment_id: str
    checkpoint: str


@pytest.fixture(scope="module")
def db(tmp_path_factory):
    """(tracking URI, client, checkpoint file) of a local SQLite store shared by this module's tests."""
    from raysseg.io import tracking

    root = tmp_path_factory.mktemp("registry")
    uri = f"sqlite:///{root / 'mlruns.db'}"
    checkpoint = root / "model.pt"
    checkpoint.write_bytes(lzma.decompress(FIXTURE.read_bytes()))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)  # read_checkpoint's store
        yield uri, tracking._client(uri), str(checkpoint)


@pytest.fixture
def store(db, request) -> Store:
    import mlflow

    from raysseg.io import tracking

    uri, client, checkpoint = db
    mlflow.set_tracking_uri(uri)  # mlflow.pyfunc.load_model's store
    experiment = re.sub(r"\W", "_", request.node.name)
    return Store(uri, client, experiment, tracking.experiment_id(uri, experiment), checkpoint)


def finished_run(store: Store, value: float, name: str = "run") -> str:
    """A FINISHED run with ``view_nmi = value`` and the checkpoint as its ``checkpoint/model.pt``, as training logs it."""
    from raysseg.io.tracking import CHECKPOINT_TAG, RUN_NAME_TAG

    run_id = store.client.create_run(store.experiment_id, run_name=name,
                                     tags={RUN_NAME_TAG: name, CHECKPOINT_TAG: store.checkpoint}).info.run_id
    store.client.log_metric(run_id, "view_nmi", value, step=3)
    store.client.log_artifact(run_id, store.checkpoint, "checkpoint")
    store.client.set_terminated(run_id, "FINISHED")
    return run_id


@pytest.mark.parametrize("mode", ["max", "min"])
def test_at_a_tie_the_sweep_and_pull_best_pick_the_same_run(store, tmp_path, mode):
    from raysseg.io.tracking import pull_best
    from raysseg.runtime.sweep import SweepSpec, _pick_best

    tied = [finished_run(store, 0.625, f"tied{i}") for i in range(3)]
    finished_run(store, 0.5 if mode == "max" else 0.75, "worse")
    rows = [{"trial": f"t{i}", "status": "finished", "view_nmi": 0.625, "run_id": run_id, "checkpoint": ""}
            for i, run_id in enumerate(tied)]
    spec = SweepSpec(name="tie", space={}, metric="view_nmi", mode=mode)
    picked = pull_best(store.experiment, "view_nmi", str(tmp_path / "best"), mode=mode)["run_id"]
    assert picked == min(tied)  # the stated rule: at a tie, the smallest run id
    for order in (rows, rows[::-1], rows[1:] + rows[:1]):  # whatever order Tune lists the trials in
        assert _pick_best(order, spec)["run_id"] == picked


def test_the_registered_model_loads_with_pyfunc_and_predicts_label_maps(store, tmp_path):
    import mlflow

    from raysseg.core.label_maps import label_map
    from raysseg.io.checkpoints import load_segmenter, read_checkpoint
    from raysseg.io.tracking import pull_best

    run_id = finished_run(store, 0.7)
    info = pull_best(store.experiment, "view_nmi", str(tmp_path / "best"), register_as=store.experiment)
    assert info["registered"] == f"models:/{store.experiment}@best"

    model = mlflow.pyfunc.load_model(f"models:/{store.experiment}@best")
    meta = model.metadata.metadata["raysseg"]
    assert meta["run_id"] == run_id and meta["config"]["method"] == "kmeans"
    assert model.metadata.signature.outputs.inputs[0].shape == (-1, -1, -1)
    image = np.random.default_rng(0).integers(0, 256, (37, 53, 3), dtype=np.uint8)
    labels = model.predict(image)
    seg, ckpt = load_segmenter(store.checkpoint)
    assert labels.shape == (37, 53) and np.issubdtype(labels.dtype, np.integer)
    np.testing.assert_array_equal(labels, label_map(seg, image))  # the label map `raysseg predict` writes
    batch = model.predict(np.stack([image, image[::-1]]))
    assert batch.shape == (2, 37, 53)
    np.testing.assert_array_equal(batch[1], label_map(seg, image[::-1]))
    with pytest.raises(ValueError, match=r"\(H, W, 3\)"):
        model.predict(image[..., :2])

    registered = read_checkpoint(f"models:/{store.experiment}@best")  # evaluate, predict, concepts read it so
    assert registered["run_id"] == ckpt["run_id"]
    assert all((registered["state"][k] == v).all() for k, v in ckpt["state"].items())


def test_registering_a_run_twice_keeps_one_version_and_moves_the_alias(store, tmp_path):
    from raysseg.io.tracking import pull_best, register

    name, client = store.experiment, store.client
    first = finished_run(store, 0.7, "first")
    assert pull_best(name, "view_nmi", str(tmp_path / "best"), register_as=name)["run_id"] == first
    again = subprocess.run([sys.executable, "-m", "raysseg.apps.cli", "pull-best", "--experiment", name, "--metric",
                            "view_nmi", "--out", str(tmp_path / "again"), "--register-as", name],
                           capture_output=True, text=True, env={**os.environ, "MLFLOW_TRACKING_URI": store.uri})
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"best run {first}" in again.stdout and f"registered: models:/{name}@best" in again.stdout
    assert [(str(v.version), v.run_id) for v in client.search_model_versions(f"name = '{name}'")] == [("1", first)]
    assert [f.path for f in client.list_artifacts(first, "model")].count("model/MLmodel") == 1

    second = finished_run(store, 0.8, "second")
    pull_best(name, "view_nmi", str(tmp_path / "best"), register_as=name)
    assert client.get_model_version_by_alias(name, "best").run_id == second
    register(store.uri, first, name, "best")  # back to the first run: its version, not a third one
    assert str(client.get_model_version_by_alias(name, "best").version) == "1"
    assert sorted(str(v.version) for v in client.search_model_versions(f"name = '{name}'")) == ["1", "2"]


def registered_the_old_way(store: Store, run_id: str) -> str:
    """Register ``run_id``'s bare ``checkpoint/`` folder, as pull-best did before it logged MLflow Models."""
    name = f"{store.experiment}_old"
    store.client.create_registered_model(name)
    source = store.client.get_run(run_id).info.artifact_uri + "/checkpoint"
    version = store.client.create_model_version(name, source=source, run_id=run_id)
    store.client.set_registered_model_alias(name, "best", version.version)
    return f"models:/{name}@best"


def test_a_version_registered_the_old_way_as_a_bare_checkpoint_folder_still_loads(store):
    from raysseg.io.checkpoints import read_checkpoint

    uri = registered_the_old_way(store, finished_run(store, 0.7))
    assert read_checkpoint(uri)["config"]["method"] == "kmeans"


@pytest.mark.slow  # two Ray Data evaluations; read_checkpoint, their entry, is checked above
def test_evaluate_reads_a_registered_model_and_an_old_bare_folder(store, ray_local, synth_data, tmp_path):
    from raysseg.io.tracking import register
    from raysseg.runtime.evaluate import evaluate

    run_id = finished_run(store, 0.7)
    uris = [register(store.uri, run_id, store.experiment, "best"), registered_the_old_way(store, run_id)]
    reports = [evaluate(uri, split=str(synth_data / "val"), crf=False, probe=False, retrieval=False,
                        out=str(tmp_path / str(i)), log_to_mlflow=False) for i, uri in enumerate(uris)]
    assert reports[0]["n_images"] == 4 and reports[0]["scores"] == reports[1]["scores"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # ~30 s: MLflow's scoring server starts in a subprocess
def test_mlflow_models_serve_answers_an_image_with_its_label_map(store, tmp_path):
    from raysseg.core.label_maps import label_map
    from raysseg.io.checkpoints import load_segmenter
    from raysseg.io.tracking import register

    uri = register(store.uri, finished_run(store, 0.7), store.experiment, "best")
    port = _free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": store.uri,
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}  # it runs `uvicorn` by name
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "models", "serve", "-m", uri, "--env-manager", "local",
                               "-h", "127.0.0.1", "-p", str(port)],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        image = np.random.default_rng(1).integers(0, 256, (29, 41, 3), dtype=np.uint8)
        request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations",
                                         data=json.dumps({"inputs": image.tolist()}).encode(),
                                         headers={"Content-Type": "application/json"})
        deadline = time.time() + 180
        while True:
            try:
                with urllib.request.urlopen(request, timeout=30) as answer:
                    labels = np.array(json.loads(answer.read())["predictions"])
                break
            except urllib.error.HTTPError:
                raise
            except OSError:  # not listening yet
                assert server.poll() is None and time.time() < deadline, "mlflow models serve did not start"
                time.sleep(1)
    finally:
        os.killpg(server.pid, 15)
        server.wait(30)
    seg, _ = load_segmenter(store.checkpoint)
    assert labels.shape == (29, 41)
    np.testing.assert_array_equal(labels, label_map(seg, image))
