"""The Hugging Face Hub's failures as one line naming the model or data set and what to do.

The toolkit touches the hub in a few places only (the tokenizer file, model and tokenizer loading, a hub data set, the
export's base). Each wraps its call in `fetching(...)`; what comes out of huggingface_hub, transformers or datasets
when the hub cannot be reached, has no such repository or keeps it gated becomes a `HubError`. The libraries wrap
the hub's errors in their own (transformers in an OSError, datasets in a ConnectionError or DatasetNotFoundError),
so the whole chain of causes is looked at; anything else passes through unchanged.
"""

from __future__ import annotations

import functools
from contextlib import contextmanager
from pathlib import Path

LOGIN = "log in (`hf auth login`, or set HF_TOKEN)"
LOCAL_MODEL = "pass --model_name PATH to a local folder with the model"
LOCAL_BASE = "pass --base_model_16bit PATH to a local folder with it"
PROBE_SECONDS = 10  # how long the one request that tells whether the hub can be reached may take


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
    page = f"https://huggingface.co/{'datasets/' if kind == 'dataset' else ''}{repo_id}"
    if reason == "gated":
        return f"{what} {repo_id} is gated: accept its terms on {page}, then {LOGIN}; or {instead}"
    if reason == "invalid":
        return f"{what} {repo_id} is neither an existing folder nor a hub id (namespace/name): check it, or {instead}"
    if reason == "missing":
        return (f"{what} {repo_id} is not on the Hugging Face Hub (or is private): check the id, {LOGIN} if it is "
                f"private, or {instead}")
    return (f"{what} {repo_id} is not in the local Hugging Face cache and cannot be downloaded; {offline_fix()}, or "
            f"{instead}")


def offline_fix() -> str:
    """Why the hub is not reached and what to do: no connection, or offline mode (HF_HUB_OFFLINE)."""
    from huggingface_hub import constants

    return ("the hub cannot be reached: check the connection" if hub_unreachable() else
            "HF_HUB_OFFLINE is set: unset it on a machine with a connection" if constants.HF_HUB_OFFLINE else
            "the hub cannot be reached: check the connection")


@functools.cache
def hub_unreachable() -> bool:
    """Whether the hub cannot be reached (one request, once a process); if so, offline mode is turned on, as
    HF_HUB_OFFLINE=1 would: the libraries then read the local cache alone. huggingface_hub tries a file it has no cached
    copy of six times over about 23 s when the network fails (hf_hub_download's retry_on_errors, which nothing turns
    off), printing `Retrying in Ns [Retry k/5]`, before the one line that says the model cannot be had."""
    import httpx
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session

    if constants.HF_HUB_OFFLINE:  # offline already: nothing is requested
        return False
    try:
        get_session().head(constants.ENDPOINT, timeout=PROBE_SECONDS)
    except httpx.TransportError:  # no route, refused, no name resolution, timed out: any answer at all is reachable
        constants.HF_HUB_OFFLINE = True  # read at each request by huggingface_hub and transformers
        return True
    return False


@contextmanager
def fetching(repo_id: str, what: str, instead: str, kind: str = "model"):
    """Run a hub call for `repo_id`; its hub failures become a one-line HubError (see `message`). A hub id (not a
    local folder) is only tried where the hub can be reached (`hub_unreachable`)."""
    if not Path(repo_id).exists():
        hub_unreachable()
    try:
        yield
    except HubError:
        raise
    except Exception as err:
        reason = why(err)
        if reason is None:
            raise
        raise HubError(message(repo_id, what, reason, instead, kind)) from None


def parameter_count(name: str, what: str = "base model", instead: str = LOCAL_BASE) -> int:
    """Parameters of a model's architecture, from its config.json and counted on the meta device (no weights read or
    downloaded). `what` and `instead` word the error when the config cannot be had."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with fetching(name, what, instead):
        architecture = AutoConfig.from_pretrained(name)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(architecture)
    return sum(p.numel() for p in model.parameters())
