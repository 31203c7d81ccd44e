"""The training asset through Dagster on real S3 + MLflow: local and Pipes modes, metrics in MLflow."""

from __future__ import annotations

import dagster as dg
import pytest

from assets import datasets as dataset_assets
from assets import ingest as ingest_assets
from assets import quality, training
from skulens.catalog import importer
from tests.conftest import pipeline_resources

ASSETS = [ingest_assets.catalog_products, ingest_assets.catalog_images, quality.cleaned_catalog,
          dataset_assets.balanced_dataset, quality.dataset_version, training.trained_encoder]

TINY = {"model": "tiny-test", "epochs": 2, "batch_size": 16, "base_lr": 2e-3, "arcface_lr": 2e-2}


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["local", "pipes"])
def test_trained_encoder_logs_to_mlflow(mode, s3, mlflow_server, demo_dir, dvc_repo, tmp_path, dagster_instance):
    repo, bucket = dvc_repo
    importer.import_catalog(s3.client(), bucket, demo_dir / "catalog", progress=False).raise_for_failures()
    res = pipeline_resources(s3, bucket, repo, tmp_path / "state", mlflow_server.uri, training_mode=mode)
    remote = tmp_path / "elsewhere"  # pipes: the training process's own working directory
    if mode == "pipes":
        from resources.training import TrainingResource

        remote.mkdir()
        res["training"] = TrainingResource(mode="pipes", device="cpu", work_dir=str(remote))
    run_config = dg.RunConfig(ops={"trained_encoder": training.TrainSettings(**TINY),
                                   "balanced_dataset": dataset_assets.BalanceSettings(depth=6)})
    result = dg.materialize(ASSETS, resources=res, instance=dagster_instance, run_config=run_config)
    assert result.success
    out = result.output_for_node("trained_encoder")
    from skulens.model.io import load_encoder
    from skulens.registry.store import ModelStore, file_sha256

    # the encoder crosses the asset boundary as an MLflow URI + sha256, never as a local path
    assert "encoder_path" not in out
    assert out["encoder_uri"].startswith(f"runs:/{out['mlflow_run_id']}/") and len(out["encoder_sha256"]) == 64
    fetched = ModelStore(tmp_path / "fresh-cache", mlflow_server.uri).fetch(out["encoder_uri"], out["encoder_sha256"])
    assert file_sha256(fetched) == out["encoder_sha256"]
    enc = load_encoder(fetched)
    assert enc.spec.name == "tiny-test"
    assert out["dataset_version"]["clean_md5"]
    bundle = result.output_for_node("balanced_dataset")["bundle"]
    assert bundle["uri"].startswith(f"s3://{bucket}/artifacts/datasets/")
    if mode == "pipes":  # it trained from the S3 bundle, in its own folder: nothing in the Dagster state folder
        work = remote / "skulens-train" / "current"
        assert (work / "checkpoint.pt").is_file()
        assert (work / "datasets" / bundle["sha256"] / "balanced" / "train.parquet").is_file()
        assert not (tmp_path / "state" / "training").exists()

    from mlflow.tracking import MlflowClient

    client = MlflowClient(mlflow_server.uri)
    run = client.get_run(out["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.tags["dataset.clean_md5"] == out["dataset_version"]["clean_md5"]
    loss = client.get_metric_history(run.info.run_id, "train/loss")
    assert len(loss) >= 2 and loss[-1].step > loss[0].step
    val = client.get_metric_history(run.info.run_id, "val/val_acc")
    assert [m.step for m in sorted(val, key=lambda m: m.step)][0] == 0
    assert len(val) == 2  # before training + epoch 2 (val_every=2: every 2nd epoch and the last)
    assert not any("secret" in k.lower() or "access_key" in k.lower() for k in run.data.params)
    assert s3.secret_key not in str(run.data.params) + str(run.data.tags)


def test_k8s_mode_builds_a_gpu_pod_spec_or_says_what_is_missing():
    from resources.training import TrainingResource

    res = TrainingResource(mode="k8s", k8s_image="registry.example/skulens:1", k8s_gpus=2)
    try:
        import dagster_k8s  # noqa: F401
    except ImportError:
        with pytest.raises(dg.Failure, match="dagster-k8s"):
            res.pipes_client_and_kwargs()
        return
    client, kwargs = res.pipes_client_and_kwargs()
    assert kwargs["image"] == "registry.example/skulens:1"
    assert kwargs["base_pod_spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 2
    assert kwargs["command"] == ["python", "-m", "resources.pipes_train"]
