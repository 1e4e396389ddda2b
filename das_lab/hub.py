"""Upload an exported timm folder to the Hugging Face Hub (``das-lab export ... push_to_hub=ORG/NAME``).

The Hub is reached as huggingface_hub reaches it: the token from ``HF_TOKEN`` or ``hf auth login``'s
token file, the server from ``HF_ENDPOINT`` (a mirror or a private hub). Any failure (no token, no
network, a refused upload) is one line that says where the exported folder stays.
"""

from __future__ import annotations

from pathlib import Path

from das_lab.errors import ConfigError, UserError


class HubError(UserError):
    """An upload to the Hub that could not be made; the exported folder is kept."""


def check_repo_id(repo_id: str) -> str:
    """``ORG/NAME`` as the Hub accepts it, checked before anything is exported."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        if repo_id.count("/") != 1:
            raise HFValidationError("expected one '/' between owner and name")
        validate_repo_id(repo_id)
    except HFValidationError as error:
        reason = str(error).splitlines()[0]
        raise ConfigError(
            f"push_to_hub={repo_id}: not a Hub repository id ({reason}); give ORG/NAME, e.g. push_to_hub=my-lab/das-r50"
        ) from error
    return repo_id


def push_folder(folder: Path, repo_id: str, private: bool) -> str:
    """Create ``repo_id`` (kept if it exists) and upload every file of ``folder`` in one commit; the commit's URL."""
    from huggingface_hub import HfApi, get_token
    from huggingface_hub import errors as hub_errors

    upload_later = f"the export stays in {folder}; upload it later with `hf upload {repo_id} {folder} .`"
    token = get_token()
    if token is None:
        raise HubError(
            f"push_to_hub={repo_id} needs a Hugging Face token: set HF_TOKEN or run `hf auth login`; {upload_later}"
        )
    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        commit = api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message="Upload das-lab export")
    except (OSError, hub_errors.HTTPError) as error:
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise HubError(f"push_to_hub={repo_id}: upload to {api.endpoint} failed ({reason}); {upload_later}") from error
    return str(commit.commit_url)
