"""AWS SageMaker serving: handlers, the serving front, the local runtime."""
