"""--push_to_hub: a run's adapter and its card, or an export's files and its card, uploaded to a model repository on the
Hugging Face Hub (made if missing, private unless --hub_private false) in one commit, through huggingface_hub's upload
API. The token is huggingface_hub's: HF_TOKEN, or the one `hf auth login` saved.

The push comes after everything local is written, so a failed one loses nothing: it ends in one line naming the
repository, why (no connection, HF_HUB_OFFLINE, no token, a token that cannot write there) and what to do, and the
files go up later with

    python -m qlora.push FOLDER REPO_ID [--hub_private false]
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from .config import REPO_ID
from .errors import one_line_errors
from .export_job import BASE_GGUF, LOG, is_export_output
from .hub import LOGIN, HubError, hub_unreachable, offline_fix
from .model_card import CARD
from .runfolder import RUN_FILES

# what a run folder holds that is not for the hub: the profiler's output (the folders, data/, runs/, export/ and the
# checkpoints, go neither)
RUN_NOT_PUSHED = ("profile.txt", "profile.trace.json.gz")


def run_files(folder: Path) -> list[str]:
    """The run's files that go up: the adapter, its tokenizer, its card and the reports the card's figures come
    from."""
    return [name for name in RUN_FILES if (folder / name).is_file() and name not in RUN_NOT_PUSHED]


def export_files(folder: Path) -> list[str]:
    """The export's own files and folders (not llama.cpp's log, nor files of the user's carried over), its card, and a
    base GGUF the Modelfile names (--convert_base's, where Ollama has no model of the base)."""
    modelfile = folder / "Modelfile"
    uses_base = modelfile.is_file() and f"./{BASE_GGUF}" in modelfile.read_text(encoding="utf-8")
    return sorted(f"{item.name}/*" if item.is_dir() else item.name for item in folder.iterdir()
                  if (is_export_output(item.name) and item.name != LOG) or item.name == CARD
                  or (item.name == BASE_GGUF and uses_base))


def push_run(folder: Path, repo_id: str, private: bool = True) -> str:
    return push(folder, repo_id, private, run_files(folder), "the adapter and its card")


def push_export(folder: Path, repo_id: str, private: bool = True) -> str:
    return push(folder, repo_id, private, export_files(folder), "the export and its card")


def push(folder: Path, repo_id: str, private: bool, patterns: list[str], what: str) -> str:
    """Upload the files of `folder` that `patterns` name to `repo_id`; returns the repository's address. Raises
    HubError, one line, where it cannot be done."""
    from huggingface_hub import HfApi, constants, get_token

    retry = f"`python -m qlora.push {shlex.quote(str(folder))} {repo_id}{'' if private else ' --hub_private false'}`"
    hub_unreachable()  # turns offline mode on where the hub cannot be reached
    if constants.HF_HUB_OFFLINE:
        raise HubError(f"{what} not pushed to {repo_id}: {offline_fix()}; every file is written in {folder}: push "
                       f"them from there with {retry}")
    if get_token() is None:
        raise HubError(f"{what} not pushed to {repo_id}: no Hugging Face token here; {LOGIN} with a token that can "
                       f"write, then push the files written in {folder} with {retry}")
    api = HfApi()
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True)
        api.upload_folder(repo_id=repo_id, folder_path=folder, allow_patterns=patterns,
                          commit_message=f"{what} from {folder.resolve().name}")
    except Exception as err:
        reason = refusal(err)
        if reason is None:
            raise
        raise HubError(f"{what} not pushed to {repo_id}: {reason}; every file is written in {folder}: push them "
                       f"with {retry} once that is fixed") from None
    print(f"pushed {what} to {url}")
    return str(url)


def refusal(err: Exception) -> str | None:
    """Why the hub refused the push, with what to do, or None for an error that is not the hub's."""
    import httpx
    from huggingface_hub.errors import HfHubHTTPError

    from .hub import why

    if isinstance(err, HfHubHTTPError) and err.response is not None:
        status, said = err.response.status_code, str(err).strip().splitlines()[-1]
        if status == 401:
            return f"the hub does not take the token (expired, or revoked?): {LOGIN} again"
        if status == 403:
            return (f"the token cannot write there (a read-only token, or a namespace that is not yours): {LOGIN} "
                    f"with a token that can, or choose a repository of your own")
        return f"the hub answered {status} ({said})"
    reason = why(err)
    if reason == "offline" or isinstance(err, httpx.TransportError):  # or the connection lost since the hub was seen
        return offline_fix()
    if reason == "invalid":
        return "that is not a repository id: give it as namespace/name"
    if reason == "missing":
        return f"the token cannot see that namespace: {LOGIN} with a token of its owner, or choose your own"
    return None


def main(argv: list[str] | None = None) -> None:
    """python -m qlora.push FOLDER REPO_ID: a run folder's adapter and card, or an export folder's files and card."""
    parser = argparse.ArgumentParser(prog="python -m qlora.push", description=main.__doc__)
    parser.add_argument("folder", type=Path, help="a training run's output folder, or an export folder")
    parser.add_argument("repo_id", help="the model repository to upload to (namespace/name), made if missing")
    parser.add_argument("--hub_private", default="true", choices=("true", "false"),
                        help="make the repository private (default: true; one that exists keeps its visibility)")
    args = parser.parse_args(argv)
    if not REPO_ID.ok(args.repo_id):
        parser.exit(2, f"error: {args.repo_id}: must be {REPO_ID.must}\n")
    private = args.hub_private == "true"
    with one_line_errors(HubError):
        if (args.folder / "adapter_config.json").is_file():
            push_run(args.folder, args.repo_id, private)
        elif (args.folder / "Modelfile").is_file() or (args.folder / "merged").is_dir():
            push_export(args.folder, args.repo_id, private)
        else:
            sys.exit(f"error: {args.folder}: neither a training run's folder (adapter_config.json) nor an export's "
                     f"(a Modelfile or merged/); give one of those")


if __name__ == "__main__":
    main()
