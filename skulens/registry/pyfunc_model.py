"""Models-from-code entry for MLflow (no pickled Python object): MLflow copies this file into the model folder and
runs it on load. Not imported by skulens itself."""

from mlflow.models import set_model

from skulens.registry.pyfunc import EncoderModel

set_model(EncoderModel())
