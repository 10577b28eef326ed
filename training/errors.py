"""Training's errors, in one light module that fitting, tracking and the CLI share."""


class TrainingError(RuntimeError):
    """Training could not produce a registered model."""


class MlflowUnavailable(TrainingError):
    """The MLflow tracking server cannot be reached."""


class Diverged(TrainingError):
    """The loss or the weights became NaN/inf: nothing may be registered."""

    def __init__(self, message: str, model_params: int) -> None:
        super().__init__(message)
        self.model_params = model_params
