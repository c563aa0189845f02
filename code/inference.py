"""SageMaker inference handlers for S1-mini (packaged as code/inference.py in model.tar.gz).

The serving front and multi-model-server both load this file ($SAGEMAKER_PROGRAM) and
call these four functions; they live in s1_mini.sagemaker.handlers. Override any of
them here to customise request parsing or response encoding.
"""

from s1_mini.sagemaker.handlers import input_fn, model_fn, output_fn, predict_fn

__all__ = ["model_fn", "input_fn", "predict_fn", "output_fn"]
