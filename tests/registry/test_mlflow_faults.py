"""Fault injection against the real MLflow server (tests/faults.py: a proxy in front of it, no mocks).

* training logs: MLflow answering 503, resetting connections or losing answers while the steps are
  logged -> training goes on, every metric arrives once after recovery;
* MLflow down for good at the end of training -> one clear error, checkpoint and unsent metrics kept;
  the retry resumes at the last step (no retraining), sends the metrics and uploads the encoder;
* registration with a failure injected at each step in turn -> one clear error, the champion alias
  unchanged (or, when the failure came after it moved, naming the new version), and the retry
  completes the same version: exactly one version for the training run, marked complete.
"""

from __future__ import annotations

import os
import uuid
from urllib.parse import urlparse

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
import pandas as pd
import pytest
from PIL import Image, ImageDraw

from tests.faults import Fault, FaultProxy

torch = pytest.importorskip("torch")

API = "/api/2.0/mlflow"


@pytest.fixture(autouse=True)
def _bounded_mlflow_client(monkeypatch):
    """MLflow's client retries each request 7 times with backoff factor 2 (minutes): here one try, so an
    injected fault reaches skulens's own handling at once."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def proxy(mlflow_server):
    u = urlparse(mlflow_server.uri)
    with FaultProxy(u.hostname, u.port) as p:
        yield p


def _client(uri):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _new_run(uri, name="faults") -> str:
    from skulens.registry.model_registry import experiment_id

    c = _client(uri)
    return c.create_run(experiment_id(c, f"faults-{uuid.uuid4().hex[:6]}"), run_name=name).info.run_id


# ------------------------------------------------------------------------------------------- training
@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """6 SKUs x 6 generated images, balanced at depth 8: 48 rows, batch 16 -> 3 steps per epoch."""
    from skulens.data import layout
    from skulens.data.balance import balance, split_validation

    root = tmp_path_factory.mktemp("faults-data")
    clean = root / "clean"
    clean.mkdir()
    rng = np.random.default_rng(0)
    rows = []
    for ci, colour in enumerate([(220, 40, 40), (40, 160, 60), (50, 80, 220)]):
        for shape in ("disc", "bar"):
            sku = f"sku-{shape}-{ci}"
            for i in range(6):
                img = Image.fromarray(rng.integers(0, 256, size=(48, 48, 3)).astype(np.uint8))
                d = ImageDraw.Draw(img)
                (d.ellipse if shape == "disc" else d.rectangle)([12, 12, 36, 36], fill=colour)
                p = clean / f"{sku}_{i}.png"
                img.save(p)
                rows.append({"sku": sku, "clean_path": str(p), "key": f"{sku}/{i}"})
    tr, va = split_validation(pd.DataFrame(rows), per_sku=1, seed=0)
    layout.write_balanced(balance(tr, 8, seed=0), va, clean, root / "balanced", {})
    return root / "balanced", clean


def _request(dataset, out_dir, uri, run_id, **logger) -> dict:
    return {"balanced_dir": str(dataset[0]), "clean_dir": str(dataset[1]), "spec": {"name": "tiny-test"},
            "config": {"epochs": 2, "batch_size": 16, "warmup_steps": 1, "val_before": False, "seed": 0,
                       "num_workers": 0, "val_every": 1},
            "out_dir": str(out_dir), "mlflow_uri": uri, "mlflow_run_id": run_id, "progress": False, "device": "cpu",
            "mlflow_logger": {"retry_every_s": 0.0, "final_retry_s": 2.0, "timeout_s": 5.0, "retries": 0, **logger}}


STEP_KEYS = ("train/loss", "train/lr", "train/arcface_lr")


def _assert_every_step_once(uri, run_id, steps: int) -> None:
    c = _client(uri)
    for key in STEP_KEYS:
        got = sorted(m.step for m in c.get_metric_history(run_id, key))
        assert got == list(range(1, steps + 1)), (key, got)  # none missing, none twice
    assert sorted(m.step for m in c.get_metric_history(run_id, "val/val_acc")) == [3, 6]


def test_training_logs_survive_mlflow_503_resets_and_lost_answers(mlflow_server, proxy, dataset, tmp_path):
    """The log-batch requests of a training run get 503 (3x), then connection resets (2x), then an
    answer lost after the server stored the batch (six failed flushes in a row: one outage): training
    finishes, one warning for the outage and one "back" line, and MLflow holds every step's
    loss/lr/arcface_lr exactly once (steps 1..6: none lost, the resent batch not doubled)."""
    from skulens.model.training_run import run_training

    run_id = _new_run(mlflow_server.uri)
    proxy.add(Fault(method="POST", path=r"/runs/log-batch$", status=503, times=3),
              Fault(method="POST", path=r"/runs/log-batch$", reset=True, times=2),
              Fault(method="POST", path=r"/runs/log-batch$", reset=True, after=True, times=1))
    said = []
    out = run_training(_request(dataset, tmp_path / "train", proxy.endpoint, run_id, flush_every=3), echo=said.append)
    assert out["steps"] == 6 and out["encoder_uri"] == f"runs:/{run_id}/encoder/encoder.pt"
    faults = [o for m, p, o in proxy.injected() if p.endswith("log-batch")]
    assert [o.split()[0].strip(",") for o in faults] == ["503"] * 3 + ["reset"] * 3, proxy.injected()
    assert "forward" in faults[-1] and not any("forward" in o for o in faults[:-1])  # the last one: answer lost
    down = [s for s in said if "unreachable" in s]
    back = [s for s in said if "is back after" in s]
    assert len(down) == 1 and len(back) == 1, said  # warned once for the outage, once when it was over
    assert proxy.endpoint in down[0] and "training continues" in down[0]
    _assert_every_step_once(mlflow_server.uri, run_id, 6)
    assert not (tmp_path / "train" / "unsent-metrics.json").exists()


def test_mlflow_down_at_the_end_fails_clearly_then_the_retry_resumes_and_uploads(mlflow_server, proxy, dataset,
                                                                                 tmp_path):
    """MLflow goes down for good after the first request of a training run. Training still finishes;
    the end raises one MlflowLoggingError (the MLflow URI, checkpoint kept, a re-run resumes), the
    unsent metrics are on disk, no encoder was uploaded. With MLflow back the same request resumes at
    the last step (no retraining: resumed_from_step == steps), sends every metric exactly once and
    uploads the encoder."""
    from skulens.model.training_run import UNSENT_METRICS, MlflowLoggingError, run_training

    run_id = _new_run(mlflow_server.uri)
    out_dir = tmp_path / "train"
    proxy.add(Fault(path=r"^/api/", reset=True, times=None, skip=1))
    said = []
    with pytest.raises(MlflowLoggingError) as err:
        run_training(_request(dataset, out_dir, proxy.endpoint, run_id), echo=said.append)
    msg = str(err.value)
    assert proxy.endpoint in msg and "checkpoint" in msg and "kept" in msg and "resumes" in msg, msg
    assert len([s for s in said if "unreachable" in s]) == 1, said  # one warning for the whole outage
    ck = torch.load(out_dir / "checkpoint.pt", weights_only=True)
    assert ck["step"] == 6 and ck["epoch"] == 2
    assert (out_dir / UNSENT_METRICS).is_file()
    c = _client(mlflow_server.uri)
    assert not c.list_artifacts(run_id, "encoder")

    proxy.clear()  # MLflow is back
    again = run_training(_request(dataset, out_dir, proxy.endpoint, run_id), echo=said.append)
    assert again["resumed_from_step"] == again["steps"] == 6  # nothing retrained
    assert again["encoder_uri"] == f"runs:/{run_id}/encoder/encoder.pt"
    assert {a.path for a in c.list_artifacts(run_id, "encoder")} >= {"encoder/encoder.pt", "encoder/encoder.pt.json"}
    _assert_every_step_once(mlflow_server.uri, run_id, 6)
    assert not (out_dir / UNSENT_METRICS).exists()


def test_killed_during_an_outage_loses_no_metric(mlflow_server, proxy, dataset, tmp_path):
    """MLflow is down from the start; training (a checkpoint every 2 steps) dies at step 5 (an exception
    from the log_fn; the logger and everything it buffered in memory die with it). A new process with
    MLflow back resumes at the step-4 checkpoint: the metrics of steps 1-4 come from the unsent-metrics
    file written at that checkpoint, steps 5-6 from the resumed steps: every step exactly once."""
    from skulens.data import layout
    from skulens.model import ModelSpec
    from skulens.model.train import TrainConfig, train
    from skulens.model.training_run import UNSENT_METRICS, MlflowStepLogger

    run_id = _new_run(mlflow_server.uri)
    out = tmp_path / "train"
    tr, va = layout.read_balanced(*dataset)
    cfg = TrainConfig(**{**_request(dataset, out, "", "")["config"], "checkpoint_every_steps": 2})

    def logger():
        return MlflowStepLogger(proxy.endpoint, run_id, spool_path=out / UNSENT_METRICS, retry_every_s=0.0,
                                final_retry_s=2.0, timeout_s=2.0, retries=0)

    class Killed(Exception):
        pass

    first = logger()

    def dies_at_step_5(kind, step, metrics):
        first(kind, step, metrics)
        if kind == "step" and step == 5:
            raise Killed

    proxy.upstream_down = True
    with pytest.raises(Killed):
        train(tr, va, ModelSpec(name="tiny-test"), cfg, out, log_fn=dies_at_step_5, progress=False, device="cpu")
    assert first.sent == 0 and (out / UNSENT_METRICS).is_file()

    proxy.upstream_down = False
    second = logger()
    res = train(tr, va, ModelSpec(name="tiny-test"), cfg, out, log_fn=second, progress=False, device="cpu")
    second.close()
    assert res.resumed_from_step == 4 and res.steps == 6
    _assert_every_step_once(mlflow_server.uri, run_id, 6)
    assert not (out / UNSENT_METRICS).exists()


# ------------------------------------------------------------------------------------------- registration
@pytest.fixture(scope="module")
def encoders(tmp_path_factory):
    from skulens.model import ModelSpec, create_encoder, save_encoder

    root = tmp_path_factory.mktemp("fault-enc")
    torch.manual_seed(3)
    return [save_encoder(create_encoder(ModelSpec(name="tiny-test"), device="cpu"), root / f"e{i}" / "encoder.pt")
            for i in range(2)]


def _evaluation(path, challenger: float, champion: float | None, champion_version: str | None) -> dict:
    from skulens.registry.store import file_sha256

    models = {"challenger": {"metrics": {"catalog": {"top1": challenger}}}}
    if champion is not None:
        models["champion"] = {"version": champion_version, "metrics": {"catalog": {"top1": champion}}}
    return {"eval_set": "crops-E1", "n_crops": 10, "k": 5, "models": models, "champion_version": champion_version,
            "champion_error": None, "champion_checked": True, "challenger_sha256": file_sha256(path)}


def _trained(path, run_id) -> dict:
    return {"encoder_path": str(path), "spec": {"name": "tiny-test"}, "train_config": {"epochs": 1}, "metrics": {},
            "dataset_version": {"clean_md5": "c0ffee"}, "mlflow_run_id": run_id}


#: (case, faults, challenger top1, step named in the error or None if the attempt recovers by itself,
#:  whether the champion alias had moved when the error came)
CASES = [
    ("log-batch 503", [Fault(method="POST", path=r"/runs/log-batch$", status=503)], 0.8,
     "logging tags to the training run", False),
    ("artifact upload 503", [Fault(method="PUT", path=r"/mlflow-artifacts/artifacts/", status=503)], 0.8,
     "uploading the model artifacts", False),
    ("create: answer lost, found again at once",
     [Fault(method="POST", path=r"/model-versions/create$", reset=True, after=True)], 0.8, None, False),
    ("create: answer lost, then MLflow down",
     [Fault(method="POST", path=r"/model-versions/create$", reset=True, after=True),
      Fault(method="GET", path=r"/model-versions/search", reset=True, skip=1)], 0.8, "creating model version", False),
    ("decision set-tag 503", [Fault(method="POST", path=r"/model-versions/set-tag$", status=503)], 0.8,
     "recording the promotion decision", False),
    ("version description 500", [Fault(method="PATCH", path=r"/model-versions/update$", status=500)], 0.8,
     "updating the version description", False),
    ("challenger alias reset", [Fault(method="POST", path=r"/registered-models/alias$", reset=True)], 0.8,
     "setting the challenger alias", False),
    ("champion alias: answer lost",  # challenger, previous-champion pass; champion moves, the answer is lost
     [Fault(method="POST", path=r"/registered-models/alias$", reset=True, after=True, skip=2)], 0.8,
     "moving the champion alias", True),
    ("model description after the move", [Fault(method="PATCH", path=r"/registered-models/update$", status=503)],
     0.8, "updating the registered model's description", True),
    ("regression registered (register_rejected), set-tag 503",
     [Fault(method="POST", path=r"/model-versions/set-tag$", status=503)], 0.4, "recording the promotion decision", False),
    ("regression not registered, run tags 503", [Fault(method="POST", path=r"/runs/log-batch$", status=503)], 0.4,
     "recording the decision on the training run", False),
    ("regression not registered, version search reset",
     [Fault(method="GET", path=r"/model-versions/search", reset=True)], 0.4, "looking for this run's model version",
     False),
]
#: cases whose challenger is registered although it is not promoted (PromotionSettings.register_rejected)
REGISTER_REJECTED = {"regression registered (register_rejected), set-tag 503"}


@pytest.mark.parametrize("case, faults, top1, step, moved", CASES, ids=[c[0] for c in CASES])
def test_registration_fails_clearly_and_the_retry_completes_the_same_version(mlflow_server, proxy, encoders, monkeypatch,
                                                                            case, faults, top1, step, moved):
    """Champion v1 exists; a challenger from its own training run (top1 0.8 vs 0.6, or a 0.4 regression)
    is registered through the proxy with one fault. The first attempt raises one RegistrationError
    (the MLflow URI, the step, "nothing was promoted; re-run the step" - or, after the alias moved, that
    it is champion already) and no alias names an incomplete version; the retry, MLflow healed,
    completes it: exactly one version for the run, tagged complete, promoted (champion = it,
    previous-champion = v1) unless it is a regression (champion stays v1, decision kept-champion). A
    regression is not registered at all by default (register_rejected=False): the retry creates no version
    and records the decision on the training run."""
    from skulens.registry.model_registry import RegistrationError
    from skulens.registry.promotion import register_and_decide
    from skulens.registry.store import REGISTRATION_TAG

    if step is None:  # MLflow's own retries on (2, bounded by skulens): a retried create must not register twice
        monkeypatch.delenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES")
    uri, name = mlflow_server.uri, f"faults-{uuid.uuid4().hex[:8]}"
    c = _client(uri)
    v1 = register_and_decide(uri, name, _trained(encoders[0], _new_run(uri, "champion")),
                             _evaluation(encoders[0], 0.6, None, None))
    assert v1["promoted"] and v1["version"] == "1"
    run_id = _new_run(uri, "challenger")
    trained, ev = _trained(encoders[1], run_id), _evaluation(encoders[1], top1, 0.6, "1")
    kw = {"register_rejected": case in REGISTER_REJECTED}
    registered = top1 > 0.6 or kw["register_rejected"]

    proxy.add(*faults)
    if step is None:  # the lost answer is recovered inside the attempt
        res = register_and_decide(proxy.endpoint, name, trained, ev, **kw)
        assert proxy.count("POST", r"/model-versions/create$") == 1  # sent once: no client retry of the POST
    else:
        with pytest.raises(RegistrationError) as err:
            register_and_decide(proxy.endpoint, name, trained, ev, **kw)
        msg = str(err.value)
        assert proxy.injected(), "the fault was not hit"
        assert proxy.endpoint in msg and step in msg and err.value.step == step, msg
        if moved:
            assert err.value.promoted and "already the champion" in msg, msg
        else:
            assert "nothing was promoted; re-run the step" in msg and not err.value.promoted, msg
        champ = c.get_model_version_by_alias(name, "champion")
        assert champ.version == ("2" if moved else "1")
        for alias in ("champion", "challenger"):  # an alias only ever names a complete version
            mv = c.get_model_version_by_alias(name, alias)
            assert mv.tags.get(REGISTRATION_TAG, "complete") == "complete", (alias, mv.version, mv.tags)
        proxy.clear()
        res = register_and_decide(proxy.endpoint, name, trained, ev, **kw)

    if not registered:  # the default for a regression: no version, the decision on the training run
        assert res["version"] is None and not res["registered"] and not res["promoted"], res
        assert "regression" in res["reason"] and res["champion_version"] == "1", res
        assert not c.search_model_versions(f"name='{name}' and run_id='{run_id}'")
        assert c.get_model_version_by_alias(name, "champion").version == "1"
        assert c.get_model_version_by_alias(name, "challenger").version == "1"
        tags = c.get_run(run_id).data.tags
        assert tags["skulens.promotion_decision"] == "kept-champion" and "regression" in tags[
            "skulens.promotion_decision_reason"]
        assert "Champion: **v1**" in c.get_registered_model(name).description
        assert len(c.search_model_versions(f"name='{name}'")) == 1
        return
    versions = c.search_model_versions(f"name='{name}' and run_id='{run_id}'")
    assert [mv.version for mv in versions] == ["2"], [(mv.version, mv.tags) for mv in versions]  # no duplicate
    mv = c.get_model_version(name, "2")
    assert mv.tags[REGISTRATION_TAG] == "complete"
    assert c.get_model_version_by_alias(name, "challenger").version == "2"
    assert res["version"] == "2"
    if top1 > 0.6:
        assert res["promoted"] and res["champion_version"] == "2" and res["previous_champion"] == "1", res
        assert "changed during the run" not in res["reason"] and "beats champion" in res["reason"], res
        assert c.get_model_version_by_alias(name, "champion").version == "2"
        assert c.get_model_version_by_alias(name, "previous-champion").version == "1"
        assert mv.tags["promotion_decision"] == "promoted" and "promoted_at" in mv.tags
        assert mv.description.startswith("**Promoted to champion**")
        assert "Champion: **v2**" in c.get_registered_model(name).description
    else:  # a regression is never promoted, faults or not
        assert not res["promoted"] and "regression" in res["reason"], res
        assert c.get_model_version_by_alias(name, "champion").version == "1"
        assert mv.tags["promotion_decision"] == "kept-champion" and "promoted_at" not in mv.tags
    assert len(c.search_model_versions(f"name='{name}'")) == 2


def test_step_logger_buffer_is_bounded_while_mlflow_is_down(mlflow_server, proxy):
    """MLflow refuses every connection while 10 steps (30 metrics) are logged into a 10-metric buffer:
    nothing raises, the 20 oldest are dropped and counted, one warning for the outage and one for the
    full buffer; when MLflow is back, close() sends the 10 kept ones and says how many were dropped."""
    from skulens.model.training_run import MlflowStepLogger

    run_id = _new_run(mlflow_server.uri)
    said = []
    logger = MlflowStepLogger(proxy.endpoint, run_id, flush_every=1, echo=said.append, max_buffer=10,
                              retry_every_s=0.0, final_retry_s=2.0, timeout_s=2.0, retries=0)
    proxy.upstream_down = True
    for step in range(1, 11):
        logger("step", step, {"loss": 1.0 / step, "lr": 0.1, "arcface_lr": 0.5})
    assert (logger.pending, logger.dropped) == (10, 20)
    assert len([s for s in said if "unreachable" in s]) == 1 and len([s for s in said if "buffer full" in s]) == 1
    proxy.upstream_down = False
    logger.close()
    assert logger.pending == 0 and logger.sent == 10
    assert "20 of the oldest were dropped" in said[-1]
    c = _client(mlflow_server.uri)
    assert [m.step for m in c.get_metric_history(run_id, "train/loss")] == [8, 9, 10]
    assert [m.step for m in c.get_metric_history(run_id, "train/arcface_lr")] == [7, 8, 9, 10]


def test_registered_model_asset_turns_mlflow_down_into_one_failure_and_succeeds_on_retry(mlflow_server, proxy,
                                                                                         encoders, tmp_path,
                                                                                         dagster_instance):
    """The registered_model asset (its inputs from stand-in upstream assets) with MLflow refusing every
    connection: the step fails with a dg.Failure whose description is the RegistrationError (MLflow URI,
    step, "nothing was promoted; re-run the step"), nothing is registered; the re-run with MLflow back
    registers and promotes the first model, marked complete."""
    import dagster as dg

    from assets.evaluation import registered_model
    from resources import LocalStateResource
    from resources.mlflow import MlflowResource
    from skulens.registry.store import file_sha256

    name = f"faults-asset-{uuid.uuid4().hex[:8]}"
    path = encoders[0]
    trained = {**_trained(path, None), "encoder_uri": str(path), "encoder_sha256": file_sha256(path)}
    trained.pop("encoder_path")
    evaluation = _evaluation(path, 0.6, None, None)

    @dg.asset(name="trained_encoder")
    def trained_stub() -> dict:
        return trained

    @dg.asset(name="model_evaluation")
    def evaluation_stub() -> dict:
        return evaluation

    resources = {"mlflow": MlflowResource(tracking_uri=proxy.endpoint, experiment=name, model_name=name,
                                          timeout_s=2, retries=0),
                 "state": LocalStateResource(home=str(tmp_path / "state"))}
    proxy.upstream_down = True
    run = dg.materialize([trained_stub, evaluation_stub, registered_model], resources=resources,
                         instance=dagster_instance, raise_on_error=False)
    assert not run.success
    (failure,) = [e for e in run.all_events if e.event_type == dg.DagsterEventType.STEP_FAILURE]
    assert failure.step_key == "registered_model"
    desc = failure.step_failure_data.user_failure_data.description
    assert desc.startswith("skulens error: MLflow at " + proxy.endpoint), desc
    # the decision comes first, before any version exists: the first MLflow call reads the champion alias
    assert "reading the champion alias" in desc and "nothing was promoted; re-run the step" in desc, desc
    c = _client(mlflow_server.uri)
    assert not c.search_registered_models(f"name='{name}'")

    proxy.upstream_down = False
    run = dg.materialize([trained_stub, evaluation_stub, registered_model], resources=resources,
                         instance=dagster_instance)
    res = run.output_for_node("registered_model")
    assert res["promoted"] and res["version"] == "1" and res["champion_version"] == "1"
    assert c.get_model_version_by_alias(name, "champion").tags["skulens.registration"] == "complete"
