"""The Hugging Face Hub's failures as one line naming the model or data set and what to do.

The toolkit touches the hub in a few places only (the tokenizer file, model and tokenizer loading, a hub data set, the
export's base). Each wraps its call in `fetching(...)`; what comes out of huggingface_hub, transformers or datasets
when the hub cannot be reached, has no such repository or keeps it gated becomes a `HubError`. The libraries wrap
the hub's errors in their own (transformers in an OSError, datasets in a ConnectionError or DatasetNotFoundError),
so the whole chain of causes is looked at; anything else passes through unchanged.
"""

from __future__ import annotations

from contextlib import contextmanager

LOGIN = "log in (`hf auth login`, or set HF_TOKEN)"


class HubError(RuntimeError):
    """A model, tokenizer or data set that cannot be had: one line naming it and what to do."""


def _causes(err: BaseException):
    """The error, then what caused it, and so on (`raise ... from` or an error raised while handling another)."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        yield err
        err = err.__cause__ or err.__context__


def why(err: BaseException) -> str | None:
    """"gated", "missing" (no such repository, or a private one), "invalid" (neither a folder nor a repository id),
    "offline" (no connection, or offline mode), or None for an error that is not the hub's."""
    from datasets.exceptions import DatasetNotFoundError
    from huggingface_hub.errors import (GatedRepoError, HFValidationError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError)

    causes = list(_causes(err))
    if any(isinstance(e, GatedRepoError) for e in causes):
        return "gated"
    if any(isinstance(e, HFValidationError) for e in causes):  # a path that does not exist, taken for an id
        return "invalid"
    if any(isinstance(e, (RepositoryNotFoundError, DatasetNotFoundError)) for e in causes):
        return "missing"
    # LocalEntryNotFoundError: not in the cache and the hub not reached (offline mode or no connection), the
    # OfflineModeIsEnabled, httpx and socket errors below it; datasets raises a bare ConnectionError for the same
    if any(isinstance(e, (LocalEntryNotFoundError, ConnectionError)) for e in causes):
        return "offline"
    return None


def message(repo_id: str, what: str, reason: str, instead: str, kind: str = "model") -> str:
    """`what repo_id: why; what to do`, where `instead` names the local alternative (`--model_name PATH ...`)."""
    from huggingface_hub import constants

    page = f"https://huggingface.co/{'datasets/' if kind == 'dataset' else ''}{repo_id}"
    if reason == "gated":
        return f"{what} {repo_id} is gated: accept its terms on {page}, then {LOGIN}; or {instead}"
    if reason == "invalid":
        return f"{what} {repo_id} is neither an existing folder nor a hub id (namespace/name): check it, or {instead}"
    if reason == "missing":
        return (f"{what} {repo_id} is not on the Hugging Face Hub (or is private): check the id, {LOGIN} if it is "
                f"private, or {instead}")
    fix = ("HF_HUB_OFFLINE is set: unset it on a machine with a connection" if constants.HF_HUB_OFFLINE else
           "the hub cannot be reached: check the connection")
    return f"{what} {repo_id} is not in the local Hugging Face cache and cannot be downloaded; {fix}, or {instead}"


@contextmanager
def fetching(repo_id: str, what: str, instead: str, kind: str = "model"):
    """Run a hub call for `repo_id`; its hub failures become a one-line HubError (see `message`)."""
    try:
        yield
    except HubError:
        raise
    except Exception as err:
        reason = why(err)
        if reason is None:
            raise
        raise HubError(message(repo_id, what, reason, instead, kind)) from None
