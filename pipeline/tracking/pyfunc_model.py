"""The models-from-code entry point of the cmaclip pyfunc: MLflow copies this file into the logged model
and runs it on load, so the model object is built by code and nothing is unpickled."""
import mlflow

from pipeline.tracking.pyfunc import CMACLIPPyfunc

mlflow.models.set_model(CMACLIPPyfunc())
