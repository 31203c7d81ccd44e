"""Model registry on a real MLflow server: aliases challenger/champion, no promotion of a regression."""

from __future__ import annotations

import uuid
from pathlib import Path

import numpy as np
import pytest

from skulens.registry.model_registry import get_champion, log_and_register, promote
from skulens.registry.promotion import decide_promotion


def test_decide_promotion_rules():
    assert decide_promotion({"top1": 0.4}, None)[0] is True  # first model
    ok, why = decide_promotion({"top1": 0.9}, None, checks_passed=False)
    assert not ok and "checks" in why
    assert decide_promotion({"top1": 0.7}, {"top1": 0.6})[0] is True
    ok, why = decide_promotion({"top1": 0.5}, {"top1": 0.6})
    assert not ok and "regression" in why
    assert decide_promotion({"top1": 0.6}, {"top1": 0.6})[0] is False  # a tie is not an improvement
    assert decide_promotion({"top1": 0.605}, {"top1": 0.6}, margin=0.01)[0] is False
    assert decide_promotion({"top1": 0.61}, {"top1": 0.6}, margin=0.01)[0] is True
    assert decide_promotion({"top5": 0.9}, {"top1": 0.6})[0] is False  # metric missing
    assert decide_promotion({"top1": float("nan")}, None)[0] is False
    ok, why = decide_promotion({"top1": 0.9, "eval_set": "crops@v2"}, {"top1": 0.6, "eval_set": "crops@v1"})
    assert not ok and "same crops" in why
    assert decide_promotion({"top1": 0.9, "eval_set": "e1"}, {"top1": 0.6, "eval_set": "e1"})[0] is True
    assert decide_promotion({"top1": 0.9, "eval_set": "e1"}, {"top1": 0.6})[0] is False
    assert decide_promotion({"top5": 0.8}, {"top5": 0.7}, metric="top5")[0] is True


@pytest.fixture(scope="module")
def saved_encoder(tmp_path_factory):
    import torch

    from skulens.model import ModelSpec, create_encoder, save_encoder

    torch.manual_seed(1)
    enc = create_encoder(ModelSpec(name="tiny-test"), device="cpu")
    path = save_encoder(enc, tmp_path_factory.mktemp("enc") / "encoder.pt")
    return enc, path


def test_champion_lifecycle_on_real_mlflow(mlflow_server, saved_encoder, tmp_path):
    from mlflow import MlflowClient

    enc, path = saved_encoder
    uri = mlflow_server.uri
    name = f"skulens-test-{uuid.uuid4().hex[:8]}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    assert get_champion(uri, name) is None  # not even registered yet

    secret = "s3cr3t-value-XYZ"
    v1 = log_and_register(
        uri, name, path,
        metrics={"top1": 0.60, "top5": 0.80, "note": "not a number"},
        params={"lr": 1e-4, "epochs": 2, "aws_secret_access_key": secret,
                "s3_endpoint": f"http://user:{secret}@127.0.0.1:9000"},
        tags={"run_name": "first", "api_token": secret},
        lineage={"catalog_version": "abc123", "eval_set": "crops@1", "password": secret},
    )
    assert v1 == "1"
    assert client.get_model_version_by_alias(name, "challenger").version == "1"
    assert get_champion(uri, name) is None
    run = client.get_run(client.get_model_version(name, v1).run_id)
    assert run.data.metrics == {"top1": 0.60, "top5": 0.80}
    assert run.data.params["epochs"] == "2"
    everything = repr(run.data.params) + repr(run.data.tags) + repr(client.get_model_version(name, v1).tags)
    assert secret not in everything  # secrets dropped / redacted everywhere
    assert "aws_secret_access_key" not in run.data.params and "***@" in run.data.params["s3_endpoint"]
    assert run.data.tags["lineage.catalog_version"] == "abc123"

    # first model: promoted
    ok, why = decide_promotion({"top1": 0.60, "eval_set": "crops@1"}, None)
    assert ok, why
    assert promote(uri, name, v1) is None
    champ = get_champion(uri, name)
    assert champ[0] == "1" and champ[1]["top1"] == pytest.approx(0.60) and champ[1]["eval_set"] == "crops@1"

    # a deliberately worse challenger on the same crops: registered as challenger, not promoted
    v2 = log_and_register(uri, name, path, metrics={"top1": 0.40}, params={}, tags={},
                          lineage={"eval_set": "crops@1"})
    assert v2 == "2"
    assert client.get_model_version_by_alias(name, "challenger").version == "2"
    ok, why = decide_promotion({"top1": 0.40, "eval_set": "crops@1"}, champ[1])
    assert not ok and "regression" in why
    assert get_champion(uri, name)[0] == "1"  # champion alias untouched

    # a better one is promoted; the old champion keeps a rollback alias
    v3 = log_and_register(uri, name, path, metrics={"top1": 0.75}, params={}, tags={},
                          lineage={"eval_set": "crops@1"})
    ok, _ = decide_promotion({"top1": 0.75, "eval_set": "crops@1"}, get_champion(uri, name)[1], margin=0.01)
    assert ok
    assert promote(uri, name, v3, reason="beats champion") == "1"
    assert get_champion(uri, name)[0] == v3 == "3"
    assert client.get_model_version_by_alias(name, "previous-champion").version == "1"
    assert client.get_model_version(name, v3).tags["promotion_reason"] == "beats champion"
    # aliases, not deprecated stages
    assert all(mv.current_stage in (None, "None") for mv in client.search_model_versions(f"name='{name}'"))

    # download and load the champion: same weights, same embeddings
    import torch

    from skulens.model import load_encoder
    from skulens.registry.store import ModelStore, file_sha256

    store = ModelStore(tmp_path / "models", uri, name)
    ref = store.champion()
    assert ref.version == "3" and ref.sha256 == file_sha256(path)  # the version records its checksum
    local = store.path(ref)
    assert local.name == "encoder.pt" and local.parent.name == ref.sha256
    assert Path(str(local) + ".json").is_file()  # the spec sidecar travels with the weights
    loaded = load_encoder(local)
    x = torch.randn(2, 3, enc.image_size, enc.image_size)
    with torch.inference_mode():
        np.testing.assert_allclose(loaded(x).numpy(), enc.eval()(x).numpy(), atol=1e-6)
    assert store.path(store.version("3")) == local  # cached: the same file, no second download
    assert ModelStore(tmp_path / "x", uri, f"{name}-none").champion() is None


def test_interrupted_registration_is_pending_refused_by_the_store_and_completed_by_a_retry(mlflow_server,
                                                                                          saved_encoder, tmp_path):
    """log_and_register(complete=False) leaves what an interrupted registration leaves: a version tagged
    skulens.registration=pending and no alias. The model store refuses it (by number, or if an alias is
    pointed at it by hand); registering again for the same training run and file returns that same
    version (no second one), marks it complete and sets challenger; the store then serves it."""
    from mlflow import MlflowClient

    from skulens.registry.model_registry import experiment_id
    from skulens.registry.store import REGISTRATION_TAG, ModelStore, ModelUnavailable, file_sha256

    _, path = saved_encoder
    uri, name = mlflow_server.uri, f"skulens-pending-{uuid.uuid4().hex[:8]}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    run_id = client.create_run(experiment_id(client, name), run_name="train").info.run_id
    v = log_and_register(uri, name, path, metrics={"top1": 0.5}, run_id=run_id, complete=False)
    assert client.get_model_version(name, v).tags[REGISTRATION_TAG] == "pending"
    assert client.get_registered_model(name).aliases == {}
    store = ModelStore(tmp_path / "models", uri, name)
    with pytest.raises(ModelUnavailable, match="did not complete"):
        store.version(v)
    client.set_registered_model_alias(name, "champion", v)  # by hand: skulens never does this
    with pytest.raises(ModelUnavailable, match="'champion' alias names .* did not complete"):
        store.champion()
    client.delete_registered_model_alias(name, "champion")

    again = log_and_register(uri, name, path, metrics={"top1": 0.5}, run_id=run_id)
    assert again == v and [mv.version for mv in client.search_model_versions(f"name='{name}'")] == [v]
    assert client.get_model_version(name, v).tags[REGISTRATION_TAG] == "complete"
    assert client.get_model_version_by_alias(name, "challenger").version == v
    assert [m.value for m in client.get_metric_history(run_id, "top1")] == [0.5]  # the retry logged no duplicate
    assert store.version(v).sha256 == file_sha256(path)


def test_a_tie_registers_nothing_and_marks_the_training_run(mlflow_server, saved_encoder):
    """A challenger from a training run that ties the champion: no model version is created (register_rejected
    False, the default); the run is tagged with the decision and its reason, the model's description still
    names the champion, and a retry does the same (nothing registered twice). When an earlier attempt did
    create a version for the run (register_rejected=True), a retry without it completes that version, marked
    kept-champion, instead of leaving it behind."""
    from mlflow import MlflowClient

    from skulens.registry.model_registry import experiment_id
    from skulens.registry.promotion import register_and_decide
    from skulens.registry.store import file_sha256

    _, path = saved_encoder
    uri, name = mlflow_server.uri, f"skulens-tie-{uuid.uuid4().hex[:8]}"
    c = MlflowClient(tracking_uri=uri, registry_uri=uri)

    def ev(champion_version, challenger, champion):
        models = {"challenger": {"metrics": {"catalog": {"top1": challenger}}}}
        if champion is not None:
            models["champion"] = {"metrics": {"catalog": {"top1": champion}}}
        return {"eval_set": "E", "n_crops": 4, "k": 5, "models": models, "champion_version": champion_version,
                "champion_error": None, "challenger_sha256": file_sha256(path)}

    def trained(run_id):
        return {"encoder_path": str(path), "spec": {"name": "tiny-test"}, "train_config": {}, "metrics": {},
                "dataset_version": {}, "mlflow_run_id": run_id}

    def new_run():
        return c.create_run(experiment_id(c, name), run_name="train").info.run_id

    first = register_and_decide(uri, name, trained(new_run()), ev(None, 0.6, None))
    assert first["promoted"] and first["version"] == "1"
    run_id = new_run()
    for _ in range(2):  # the retry of a finished non-registration changes nothing
        r = register_and_decide(uri, name, trained(run_id), ev("1", 0.6, 0.6))
        assert r["version"] is None and not r["registered"] and not r["promoted"] and r["champion_version"] == "1"
        assert "does not beat margin" in r["reason"]
    tags = c.get_run(run_id).data.tags
    assert tags["skulens.promotion_decision"] == "kept-champion"
    assert tags["skulens.promotion_decision_reason"] == r["reason"]
    assert [mv.version for mv in c.search_model_versions(f"name='{name}'")] == ["1"]
    assert "Champion: **v1**" in c.get_registered_model(name).description
    assert c.get_model_version_by_alias(name, "challenger").version == "1"

    other = new_run()
    kept = register_and_decide(uri, name, trained(other), ev("1", 0.5, 0.6), register_rejected=True)
    assert kept["version"] == "2" and kept["registered"] and not kept["promoted"] and "regression" in kept["reason"]
    assert c.get_model_version(name, "2").tags["promotion_decision"] == "kept-champion"
    again = register_and_decide(uri, name, trained(other), ev("1", 0.5, 0.6))  # a version of this run exists
    assert again["version"] == "2" and not again["promoted"]
    assert sorted(mv.version for mv in c.search_model_versions(f"name='{name}'")) == ["1", "2"]
    assert c.get_model_version_by_alias(name, "champion").version == "1"
    assert c.get_model_version(name, "2").tags["skulens.registration"] == "complete"


def test_inference_backend_env_is_read_when_the_store_is_made(tmp_path, monkeypatch):
    """$SKULENS_INFERENCE_BACKEND set after `resources` was imported (a launch's env, a test) still applies;
    an explicit resource value wins over it."""
    from resources.mlflow import MlflowResource

    res = MlflowResource(tracking_uri="http://127.0.0.1:9")
    monkeypatch.setenv("SKULENS_INFERENCE_BACKEND", "onnxruntime")
    assert res.store(tmp_path / "a").inference_backend == "onnxruntime"
    monkeypatch.delenv("SKULENS_INFERENCE_BACKEND")
    assert res.store(tmp_path / "b").inference_backend == "auto"
    assert MlflowResource(tracking_uri="http://127.0.0.1:9", inference_backend="torch").store(
        tmp_path / "c").inference_backend == "torch"
