"""Entry point of the external training process (Dagster Pipes): `python -m resources.pipes_train`.

Only `dagster_pipes` (a small, dependency-free package) and skulens are imported here, so this
runs in a slim GPU image without the Dagster framework.
"""

import os

from dagster_pipes import open_dagster_pipes

from skulens.model.training_run import run_training


def main() -> None:
    with open_dagster_pipes() as pipes:
        request = pipes.get_extra("request")
        source = (request.get("dataset") or {}).get("uri") or request.get("balanced_dir")
        pipes.log.info(f"training {request['spec'].get('name')} from {source} in {os.getcwd()}")
        summary = run_training(request, echo=pipes.log.info)
        pipes.report_asset_materialization(metadata={
            k: {"raw_value": v, "type": "json"} if isinstance(v, (dict, list)) else v
            for k, v in summary.items() if v is not None
        })


if __name__ == "__main__":
    main()
