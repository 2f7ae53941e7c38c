"""Upload an adapter or merged folder to the Hugging Face Hub (opt-in: `--push-to-hub REPO`)."""
from __future__ import annotations

import os
from pathlib import Path

from loraforge.atomic import SCRATCH_PREFIXES
from loraforge.errors import UserError


def push_folder(folder, repo_id: str, *, private: bool = False, what: str = "model") -> str:
    """Create `repo_id` if needed and upload `folder`; returns the repository's URL.

    The token comes from HF_TOKEN (or `huggingface-cli login`) and is never printed.
    """
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    if repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise UserError(f"--push-to-hub {repo_id!r}: give the repository as OWNER/NAME, e.g. you/my-llama-adapter")
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        raise UserError("--push-to-hub: HF_HUB_OFFLINE=1 is set, so nothing can be uploaded; unset it to push")
    api = HfApi(token=os.environ.get("HF_TOKEN") or None)
    try:
        url = api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        api.upload_folder(folder_path=str(Path(folder)), repo_id=repo_id, repo_type="model",
                          commit_message=f"Upload {what} with loraforge",
                          ignore_patterns=[f"{p}*" for p in SCRATCH_PREFIXES])
    except HfHubHTTPError as e:
        status = getattr(getattr(e, "response", None), "status_code", None)
        hint = ("check that HF_TOKEN is set to a token with write access"
                if status in (401, 403) else "check the repository name and your connection")
        raise UserError(f"--push-to-hub {repo_id}: the Hub refused the upload (HTTP {status}); {hint}") from None
    return str(url)
