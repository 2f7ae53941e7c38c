"""Upload an adapter or merged folder to the Hugging Face Hub (opt-in: `--push-to-hub REPO`)."""
from __future__ import annotations

import os
from pathlib import Path

from loraforge.atomic import SCRATCH_PREFIXES
from loraforge.errors import UserError, first_line
from loraforge.ownership import BOOKKEEPING_FILES


def check_push(repo_id: str) -> str:
    """Everything that can be checked without the network, before any work: the name, offline mode,
    and that a token exists. Returns the token."""
    from huggingface_hub import get_token

    if repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise UserError(f"--push-to-hub {repo_id!r}: give the repository as OWNER/NAME, e.g. you/my-llama-adapter")
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        raise UserError("--push-to-hub: HF_HUB_OFFLINE=1 is set, so nothing can be uploaded; unset it to push")
    token = os.environ.get("HF_TOKEN") or get_token()
    if not token:
        raise UserError("--push-to-hub: no Hub token; set HF_TOKEN to a token with write access "
                        "(https://huggingface.co/settings/tokens) or run `hf auth login`")
    return token


def _network_errors() -> tuple:
    """Connection failures as raised by whichever HTTP client huggingface_hub uses."""
    errors: list = [OSError]  # requests' ConnectionError and socket errors are OSErrors
    for module, name in (("httpx2", "TransportError"), ("httpx", "TransportError"), ("requests", "RequestException")):
        try:
            errors.append(getattr(__import__(module), name))
        except (ImportError, AttributeError):
            pass
    return tuple(errors)


def push_folder(folder, repo_id: str, *, private: bool = False, what: str = "model") -> str:
    """Create `repo_id` if needed and upload `folder`; returns the repository's URL.

    The token comes from HF_TOKEN (or `hf auth login`) and is never printed.
    """
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    api = HfApi(token=check_push(repo_id))
    try:
        url = api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        api.upload_folder(folder_path=str(Path(folder)), repo_id=repo_id, repo_type="model",
                          commit_message=f"Upload {what} with loraforge",
                          ignore_patterns=[f"{p}*" for p in SCRATCH_PREFIXES] + list(BOOKKEEPING_FILES))
    except HfHubHTTPError as e:
        status = getattr(getattr(e, "response", None), "status_code", None)
        hint = ("check that HF_TOKEN is set to a token with write access"
                if status in (401, 403) else "check the repository name and your connection")
        raise UserError(f"--push-to-hub {repo_id}: the Hub refused the upload (HTTP {status}); {hint}") from None
    except OfflineModeIsEnabled:
        raise UserError(f"--push-to-hub {repo_id}: offline mode is on (HF_HUB_OFFLINE); unset it to push") from None
    except _network_errors() as e:
        raise UserError(f"--push-to-hub {repo_id}: could not reach the Hub ({first_line(e)}); check your connection "
                        f"and try again. The {what} is saved locally: {folder}") from None
    return str(url)
