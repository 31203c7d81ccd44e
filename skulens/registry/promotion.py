"""Register a challenger with its lineage and decide whether it replaces the champion.

A challenger is promoted only when it beats the champion on the same evaluation set; the decision and
its reason are recorded on the registered version."""

from __future__ import annotations

import json
import math
import os
import time
from datetime import datetime, timezone
from pathlib import Path

from skulens.registry.store import file_sha256


def log_to_run(tracking_uri: str, run_id: str, metrics: dict | None = None, files: dict | None = None,
               artifact_path: str = "evaluation", tags: dict | None = None) -> None:
    """Log metrics (step 0), tags and files (artifacts under ``artifact_path``) to an existing MLflow run."""
    from mlflow.entities import Metric, RunTag
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    ts = int(time.time() * 1000)
    ms = [Metric(k, float(v), ts, 0) for k, v in (metrics or {}).items()
          if v is not None and math.isfinite(float(v))]
    ts_tags = [RunTag(k, str(v)[:5000]) for k, v in (tags or {}).items()]
    for i in range(0, max(len(ms), 1), 900):
        client.log_batch(run_id, metrics=ms[i:i + 900], tags=ts_tags if i == 0 else [])
    for p in (files or {}).values():
        client.log_artifact(run_id, str(p), artifact_path)


# ====================================================================== registry
def lineage(trained: dict, evaluation: dict, extra: dict | None = None) -> dict:
    """What the registered version was made from and measured on."""
    dv = trained.get("dataset_version") or {}
    out = {
        "dataset_clean_md5": dv.get("clean_md5"), "dataset_balanced_md5": dv.get("balanced_md5"),
        "git_rev": dv.get("git_rev"), "git_dirty": dv.get("git_dirty"),
        "eval_set": evaluation["eval_set"], "eval_crops": evaluation["n_crops"],
        "training_run_id": trained.get("mlflow_run_id"), "device": trained.get("device"),
        "evaluated_champion": evaluation.get("champion_version"),
    }
    out.update(extra or {})
    return {k: v for k, v in out.items() if v is not None}


def registration_metrics(trained: dict, evaluation: dict, gallery: str = "catalog") -> dict:
    """Metrics stored on the registered version's run: the primary gallery's metrics under their
    plain names (``top1``, ``top5``, ...; what :func:`skulens.registry.get_champion` returns), the
    other galleries as ``<gallery>/<metric>``, and the training summary as ``train/<metric>``."""
    ch = evaluation["models"]["challenger"]["metrics"]
    out = dict(ch[gallery])
    for g, m in ch.items():
        for k, v in m.items():
            out[f"{g}/{k}"] = v
    for k, v in (trained.get("metrics") or {}).items():
        out[f"train/{k}"] = v
    return out


def saved_spec(encoder_path: str | os.PathLike) -> dict | None:
    """The resolved spec stored next to an encoder file (``<file>.json``, written by save_encoder):
    what evaluation and serving use (training may have run at another input size)."""
    side = Path(str(encoder_path) + ".json")
    try:
        return dict(json.loads(side.read_text())["spec"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


#: tags of the training run copied to the registered version's run (the nightly schedule compares
#: ``catalog.fingerprint`` and ``train.config_hash`` of the champion's run with the current ones)
CARRIED_TAG_PREFIXES = ("catalog.", "train.", "dataset.", "git.")


def training_run_tags(tracking_uri: str, run_id: str | None) -> dict:
    """The training run's ``catalog.*``, ``train.*``, ``dataset.*`` and ``git.*`` tags."""
    if not run_id:
        return {}
    from mlflow.tracking import MlflowClient

    tags = MlflowClient(tracking_uri).get_run(run_id).data.tags
    return {k: v for k, v in tags.items() if k.startswith(CARRIED_TAG_PREFIXES)}


#: training-run tags with the promotion decision of its challenger (also when no version was registered)
RUN_DECISION_TAG = "skulens.promotion_decision"
RUN_DECISION_REASON_TAG = "skulens.promotion_decision_reason"
KEPT_CHAMPION = "kept-champion"
PROMOTED = "promoted"


def register_and_decide(
    tracking_uri: str,
    model_name: str,
    trained: dict,
    evaluation: dict,
    metric: str = "top1",
    gallery: str = "catalog",
    margin: float = 0.0,
    checks_passed: bool = True,
    experiment: str | None = None,
    extra_lineage: dict | None = None,
    tags: dict | None = None,
    timeout_s: float = 10.0,
    retries: int = 2,
    register_rejected: bool = False,
) -> dict:
    """Decide whether the challenger beats the champion evaluated in the same run on the same crops; register
    it (alias ``challenger``) with lineage and promote it to ``champion`` when it does.

    Never promotes when: data checks failed, the challenger metric is missing, the champion could
    not be evaluated on these crops, the champion alias moved since the evaluation (another run
    promoted meanwhile), or the challenger is not better by ``margin``. A tie is not promoted. The
    first model (no champion yet) is promoted when the checks passed.

    A challenger that is not promoted is not registered (``register_rejected=False``, the default): no
    model version is created; its training run is tagged ``skulens.promotion_decision=kept-champion`` and
    ``skulens.promotion_decision_reason``, and the registered model's description still names the
    champion. The result has ``version`` None and ``registered`` False. With ``register_rejected=True`` it is
    registered and marked ``kept-champion`` (version tags and description), as a promoted one is.

    Order (the champion alias is the commit point): decide (before any version exists), register (or find
    again) the version, record the decision tags and the version's description, mark it
    ``skulens.registration=complete``, set ``challenger``, then ``previous-champion`` and ``champion``, then
    the model's description. An MLflow failure at any step raises
    :class:`skulens.registry.model_registry.RegistrationError` (URI, step, "nothing was promoted; re-run the
    step"); the retry completes the same version, and a champion alias that already names a version of this
    training run and encoder (moved by the failed attempt) counts as this version's promotion. A version a
    failed attempt created is completed (marked kept-champion) when the retry decides not to promote.
    """
    from skulens.registry.model_registry import (
        CHALLENGER,
        CHAMPION,
        PREVIOUS,
        RegistrationError,
        _client,
        _find_version,
        _mark_complete,
        _redact,
        _Steps,
        _version_by_alias,
        log_and_register,
    )
    from skulens.registry.store import SHA_TAG, bounded_http

    encoder_path = trained["encoder_path"]  # the verified local copy (ModelStore.fetch of encoder_uri)
    file_sha = file_sha256(encoder_path)
    sha = evaluation.get("challenger_sha256")
    if sha and file_sha != sha:
        raise RuntimeError(f"{encoder_path} changed since it was evaluated (another training run?): "
                           "re-run model_evaluation before registering")
    if gallery not in evaluation["models"]["challenger"]["metrics"]:
        raise ValueError(f"gallery {gallery!r} was not evaluated; one of {list(evaluation['models']['challenger']['metrics'])}")
    eval_set = evaluation["eval_set"]
    challenger = {**evaluation["models"]["challenger"]["metrics"][gallery], "eval_set": eval_set}
    spec, cfg = saved_spec(encoder_path) or trained.get("spec") or {}, trained.get("train_config") or {}
    params = {**{f"model.{k}": v for k, v in spec.items()}, **{f"train.{k}": v for k, v in cfg.items()},
              "eval.gallery": gallery, "eval.metric": metric, "eval.k": evaluation.get("k")}
    run_id = trained.get("mlflow_run_id")
    steps = _Steps(tracking_uri, model_name)
    with bounded_http(timeout_s, retries):
        client = _client(tracking_uri)
        # 1. the decision, before any version is created
        evaluated = evaluation.get("champion_version")
        with steps.step("reading the champion alias"):
            champ_mv = _version_by_alias(client, model_name, CHAMPION)
        current_version = str(champ_mv.version) if champ_mv is not None else None
        # a failed attempt of this registration moved the alias already (same training run and encoder)
        already = bool(champ_mv is not None and run_id and champ_mv.run_id == run_id
                       and (champ_mv.tags or {}).get(SHA_TAG) == file_sha)
        champion_metric = None
        previous = current_version
        if already:
            version = current_version
            with steps.step("reading the version's decision"):
                recorded = champ_mv.tags or {}
                before = _version_by_alias(client, model_name, PREVIOUS)
            promote_it = True
            reason = recorded.get("promotion_decision_reason") or recorded.get("promotion_reason") or \
                f"v{version} is champion already (promoted by an earlier attempt of this registration)"
            previous = str(before.version) if before is not None and str(before.version) != version else evaluated
            champ_eval = evaluation["models"].get("champion")
            if champ_eval and evaluated != version:
                champion_metric = champ_eval["metrics"].get(gallery, {}).get(metric)
        elif current_version != evaluated and evaluated is None and not evaluation.get("champion_checked", True):
            promote_it, reason = False, (f"champion v{current_version} was not evaluated in this run (include_champion="
                                         "False): not comparable, keeping the champion")
        elif current_version != evaluated:
            promote_it, reason = False, (f"champion changed during the run (evaluated v{evaluated}, now "
                                         f"v{current_version}): not comparable, keeping the champion; run again to "
                                         "compare on the same crops")
        elif champ_mv is None:
            promote_it, reason = decide_promotion(challenger, None, metric=metric, margin=margin,
                                                  checks_passed=checks_passed)
        else:
            champ_eval = evaluation["models"].get("champion")
            champion = {"eval_set": eval_set}
            if champ_eval:
                champion.update(champ_eval["metrics"].get(gallery, {}))
                champion_metric = champion.get(metric)
            promote_it, reason = decide_promotion(challenger, champion, metric=metric, margin=margin,
                                                  checks_passed=checks_passed)
            if not champ_eval and evaluation.get("champion_error"):
                reason += f" (champion v{evaluated} could not be evaluated: {evaluation['champion_error']})"

        register = promote_it or register_rejected
        if not register and run_id:  # a failed attempt that decided otherwise may have created it: complete it
            with steps.step("looking for this run's model version"):
                register = _find_version(client, model_name, run_id, file_sha, "") is not None
        if not register:
            return _keep_champion_unregistered(
                client, steps, model_name, run_id, reason, current_version, metric, gallery, margin, eval_set,
                challenger, champion_metric, checks_passed, trained)

        # 2. register (or find again) the version
        with steps.step("reading the training run's tags"):
            run_tags = training_run_tags(tracking_uri, run_id)
        version = log_and_register(
            tracking_uri, model_name, encoder_path,
            metrics=registration_metrics(trained, evaluation, gallery), params=params,
            tags={**run_tags, "run_name": f"register-{spec.get('name', 'encoder')}", "skulens.stage": "register",
                  **(tags or {})},
            lineage=lineage(trained, evaluation, extra_lineage), experiment=experiment,
            run_id=run_id,  # the training run: the version's source run has the curves
            complete=False, timeout_s=timeout_s, retries=retries, _steps=steps,
        )
        steps.version = version
        if promote_it and not already:  # the alias may have moved while the version was registered
            with steps.step("reading the champion alias"):
                now_mv = _version_by_alias(client, model_name, CHAMPION)
            now_version = str(now_mv.version) if now_mv is not None else None
            if now_version != current_version:
                promote_it, reason = False, (f"champion changed during the registration (was v{current_version}, "
                                             f"now v{now_version}): not comparable, keeping the champion; run again "
                                             "to compare on the same crops")
                current_version = previous = now_version

        # 3. everything about the version, while no alias names it as champion yet
        with steps.step("recording the promotion decision"):
            client.set_model_version_tag(model_name, version, "promotion_decision",
                                         PROMOTED if promote_it else KEPT_CHAMPION)
            client.set_model_version_tag(model_name, version, "promotion_decision_reason", reason[:5000])
            if promote_it and not already:
                client.set_model_version_tag(model_name, version, "promoted_at",
                                             datetime.now(timezone.utc).isoformat(timespec="seconds"))
                client.set_model_version_tag(model_name, version, "promotion_reason", _redact(reason)[:5000])
            elif not promote_it:  # an earlier attempt decided otherwise but never moved the alias
                stale = client.get_model_version(model_name, version).tags or {}
                for k in ("promoted_at", "promotion_reason"):
                    if k in stale:
                        client.delete_model_version_tag(model_name, version, k)
            if run_id:
                _tag_run_decision(client, run_id, PROMOTED if promote_it else KEPT_CHAMPION, reason)
        with steps.step("updating the version description"):
            client.update_model_version(model_name, version, description=version_description(
                promote_it, reason, metric=metric, gallery=gallery, challenger=challenger.get(metric),
                champion=champion_metric, eval_set=eval_set, spec=spec, trained=trained))
        with steps.step("marking the version complete"):
            _mark_complete(client, model_name, version)
        with steps.step("setting the challenger alias"):
            client.set_registered_model_alias(model_name, CHALLENGER, version)
        # 4. the commit point: previous-champion, then champion, last
        if promote_it and not already:
            if current_version is not None:
                with steps.step("moving the previous-champion alias"):
                    client.set_registered_model_alias(model_name, PREVIOUS, current_version)
            try:
                with steps.step("moving the champion alias"):
                    client.set_registered_model_alias(model_name, CHAMPION, version)
            except RegistrationError as e:  # did it move anyway (the answer was lost)?
                try:
                    now = _version_by_alias(client, model_name, CHAMPION)
                    steps.promoted, steps.uncertain = bool(now is not None and str(now.version) == version), False
                except Exception:  # noqa: BLE001 - still down: say that we cannot tell
                    steps.uncertain = True
                if steps.promoted or steps.uncertain:
                    raise steps.error(e.step, e.__cause__) from e.__cause__
                raise
        steps.promoted = bool(promote_it)
        # 5. after the commit: the model's description names the champion
        with steps.step("updating the registered model's description"):
            after = _version_by_alias(client, model_name, CHAMPION)
            after_version = str(after.version) if after is not None else None
            client.update_registered_model(model_name, description=model_description(after_version, metric, gallery))
    return {
        "version": version, "registered": True, "promoted": bool(promote_it), "reason": reason,
        "decision": PROMOTED if promote_it else KEPT_CHAMPION,
        "champion_version": after_version,
        "previous_champion": previous,
        "metric": metric, "gallery": gallery, "margin": float(margin), "eval_set": eval_set,
        "challenger_metric": challenger.get(metric), "champion_metric": champion_metric,
        "checks_passed": bool(checks_passed), "model_name": model_name,
        "clean_md5": (trained.get("dataset_version") or {}).get("clean_md5"),
    }


def _tag_run_decision(client, run_id: str, decision: str, reason: str) -> None:
    from mlflow.entities import RunTag

    from skulens.registry.model_registry import _redact

    client.log_batch(run_id, tags=[RunTag(RUN_DECISION_TAG, decision),
                                   RunTag(RUN_DECISION_REASON_TAG, _redact(reason)[:5000])])


def _keep_champion_unregistered(client, steps, model_name: str, run_id: str | None, reason: str,
                                champion_version: str | None, metric: str, gallery: str, margin: float,
                                eval_set: str, challenger: dict, champion_metric, checks_passed: bool,
                                trained: dict) -> dict:
    """The not-promoted challenger, not registered: the decision on its training run, the model's
    description naming the champion (idempotent: a retry writes the same)."""
    if run_id:
        with steps.step("recording the decision on the training run"):
            _tag_run_decision(client, run_id, KEPT_CHAMPION, reason)
    if champion_version is not None:  # the registered model exists
        with steps.step("updating the registered model's description"):
            client.update_registered_model(model_name, description=model_description(champion_version, metric,
                                                                                     gallery))
    return {
        "version": None, "registered": False, "promoted": False, "reason": reason, "decision": KEPT_CHAMPION,
        "champion_version": champion_version, "previous_champion": champion_version,
        "metric": metric, "gallery": gallery, "margin": float(margin), "eval_set": eval_set,
        "challenger_metric": challenger.get(metric), "champion_metric": champion_metric,
        "checks_passed": bool(checks_passed), "model_name": model_name,
        "clean_md5": (trained.get("dataset_version") or {}).get("clean_md5"),
        "training_run_id": run_id,
    }


def decide_promotion(
    challenger: dict,
    champion: dict | None,
    metric: str = "top1",
    margin: float = 0.0,
    checks_passed: bool = True,
) -> tuple[bool, str]:
    """Should the challenger replace the champion? Returns ``(promote, reason)``.

    * data checks failed -> never promote;
    * the challenger metric missing or not finite -> no;
    * no champion yet -> promote (first model);
    * metrics must come from the same crops: if either dict carries an ``eval_set`` fingerprint,
      both must carry the same one (re-evaluate the champion on the current crops otherwise);
    * promote only if ``challenger - champion >= margin`` and the challenger is strictly better
      (``margin=0`` means "any improvement"; a tie is not promoted). Never promotes a regression.
    """
    if not checks_passed:
        return False, "data checks failed: not promoting"
    c = _num(challenger.get(metric) if challenger else None)
    if c is None:
        return False, f"challenger has no finite '{metric}' metric"
    if champion is None:
        return True, f"no champion yet: first model becomes champion ({metric}={c:.4f})"
    ce, he = (challenger or {}).get("eval_set"), champion.get("eval_set")
    if (ce or he) and ce != he:
        return False, (f"metrics not comparable: challenger eval_set={ce!r}, champion eval_set={he!r}; "
                       "evaluate both on the same crops")
    h = _num(champion.get(metric))
    if h is None:
        return False, f"champion has no finite '{metric}' metric; evaluate it on the same crops first"
    delta = c - h
    if delta > 0 and delta >= margin - 1e-12:
        return True, f"{metric} {c:.4f} beats champion {h:.4f} by {delta:+.4f} (margin {margin})"
    if delta < 0:
        return False, f"regression: {metric} {c:.4f} < champion {h:.4f} ({delta:+.4f})"
    return False, f"{metric} {c:.4f} vs champion {h:.4f} ({delta:+.4f}) does not beat margin {margin}"


def _num(v) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _fmt(x) -> str:
    return "n/a" if x is None else f"{float(x):.4f}"


def version_description(promoted: bool, reason: str, metric: str, gallery: str, challenger, champion, eval_set: str,
                        spec: dict, trained: dict) -> str:
    """The registered version's description (Markdown): the decision and its reason, then what it was measured on."""
    ds = (trained.get("dataset_version") or {}).get("clean_md5")
    return "\n".join([
        f"**{'Promoted to champion' if promoted else 'Not promoted (champion kept)'}**: {reason}",
        "",
        f"- {gallery}/{metric}: challenger {_fmt(challenger)}, champion {_fmt(champion)}",
        f"- evaluation set `{eval_set}`",
        f"- tower `{spec.get('name', '?')}` at {spec.get('image_size', '?')} px; training data clean md5 `{ds}`",
    ])[:5000]


def model_description(champion_version, metric: str, gallery: str) -> str:
    head = (f"Champion: **v{champion_version}** (alias `champion`)." if champion_version else "No champion yet.")
    return (f"skulens product image encoder (open_clip image tower fine-tuned with ArcFace). {head} A new version "
            f"becomes champion only when it beats the champion on {gallery}/{metric} over the same shelf crops; "
            "each version's description says why it was or was not promoted.")


# ====================================================================== the nightly retrain policy's inputs
def _run_record(client, run_id: str) -> dict | None:
    """The run's ``catalog_state.json`` (None when it has none)."""
    import tempfile

    from skulens.catalog.state import CATALOG_STATE_ARTIFACT

    if not any(a.path == CATALOG_STATE_ARTIFACT for a in client.list_artifacts(run_id)):
        return None
    with tempfile.TemporaryDirectory() as td:
        return json.loads(Path(client.download_artifacts(run_id, CATALOG_STATE_ARTIFACT, td)).read_text())


def champion_training_state(tracking_uri: str, model_name: str, experiment: str | None = None,
                            train_config_hash: str | None = None) -> dict | None:
    """What :func:`skulens.catalog.state.retrain_decision` needs from MLflow, or None when there is no
    champion: ``version``, ``run_id`` and ``tags`` of the champion's training run, its ``record``
    (``catalog_state.json``, None for a model trained before it was recorded) and ``rejected``: the latest
    training run of ``experiment`` with this config hash that was evaluated against this champion and not
    promoted (``{"run_id", "reason", "fingerprint", "record"}``, or None)."""
    from skulens.registry.model_registry import CHAMPION, _client, _version_by_alias

    client = _client(tracking_uri)
    mv = _version_by_alias(client, model_name, CHAMPION)
    if mv is None:
        return None
    version, run_id = str(mv.version), mv.run_id
    tags = dict(client.get_run(run_id).data.tags) if run_id else {}
    record = _run_record(client, run_id) if run_id else None
    rejected = None
    exp = client.get_experiment_by_name(experiment or model_name) if train_config_hash else None
    if exp is not None:
        found = client.search_runs(
            [exp.experiment_id], max_results=1, order_by=["attribute.start_time DESC"],
            filter_string=(f"tags.`{RUN_DECISION_TAG}` = '{KEPT_CHAMPION}' and "
                           f"tags.`train.config_hash` = '{train_config_hash}' and "
                           f"tags.`eval.champion_version` = '{version}'"))
        if found:
            run = found[0]
            rejected = {"run_id": run.info.run_id, "reason": run.data.tags.get(RUN_DECISION_REASON_TAG, "")[:200],
                        "fingerprint": run.data.tags.get("catalog.fingerprint"),
                        "record": _run_record(client, run.info.run_id)}
    return {"version": version, "run_id": run_id, "tags": tags, "record": record, "rejected": rejected}
