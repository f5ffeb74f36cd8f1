"""User-facing errors.

Every problem a user can cause (bad recipe, missing file, wrong checkpoint) raises a subclass of
FlowgenError with a one-line message naming the field or file and what is allowed. The CLI turns
them into `error: ...` on stderr and exit code 2 — never a traceback.
"""


class FlowgenError(Exception):
    """A problem with the user's input; the message is shown as is, on one line."""

    exit_code = 2


class CheckpointError(FlowgenError):
    """A weights file or folder is missing, unreadable, or does not match the model."""


class ImageInputError(FlowgenError):
    """A reference image is unreadable or outside the allowed sizes."""


class RecipeError(FlowgenError):
    """A recipe (or a --set override) is invalid. May carry several problems at once."""

    def __init__(self, problems: list[str] | str):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("; ".join(self.problems))
