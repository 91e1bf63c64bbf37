"""Where a model comes from: a local folder as it is, or a Hub repo downloaded (only the files
its layout needs). No MLX here: the command line resolves ``--model`` before importing it.

A ``Path`` is always a local folder; a string is a Hub repo id when ``looks_like_hub_id`` and
no folder of that name exists. A download first fetches the small files that tell the layout
(``model_layout.PROBE_PATTERNS``), then only what that layout reads: the original release
(8 GB) is fetched as published and read directly by ``load``; a mlx-community pack without the
release files mlx-audio's converter copies beside it.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from .errors import quoted
from .model_layout import DOWNLOAD_PATTERNS, PROBE_PATTERNS, RELEASE, config_layout

DEFAULT_REPO = "mistralai/Voxtral-4B-TTS-2603"
DEFAULT_REPO_SIZE = "about 8 GB"
# A Hub repo id: owner/name of letters, digits, "-", "_", "." (not leading), at most 96 each.
_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}")


class ModelNotFoundError(FileNotFoundError):
    """No model at the given path, or a Hub repo that cannot be downloaded (one-line message)."""


def looks_like_hub_id(text: str) -> bool:
    """Whether ``text`` names a Hub repo rather than a local folder.

    The rule: a Hub id is ``owner/name`` (letters, digits, ``-``, ``_``, ``.``; no ``..`` or
    ``--``), not starting with ``.``, ``/`` or ``~``, and its owner part is not an existing
    local folder. So ``./models/voxtral``, ``~/voxtral``, ``voxtral`` and ``models/voxtral``
    beside an existing ``models/`` are folders, reported as missing if they do not exist.
    """
    return (
        bool(_HUB_ID.fullmatch(text))
        and ".." not in text
        and "--" not in text
        and not Path(text.split("/")[0]).is_dir()
    )


def get_model_path(path_or_repo: str | Path, revision: str | None = None) -> Path:
    """A local folder as is, or a Hub repo downloaded (only the files its layout needs).

    Raises:
        ModelNotFoundError: a missing folder, or a repo the Hub cannot give (offline, no such
            repo, gated, no connection), in one line that says what to do.
        NotADirectoryError: the path is a file.
    """
    text = os.fspath(path_or_repo)
    path = Path(text).expanduser()
    if path.exists():
        if not path.is_dir():
            raise NotADirectoryError(f"model path {path} is a file; give the model folder")
        return path
    if isinstance(path_or_repo, Path) or not looks_like_hub_id(text):
        raise ModelNotFoundError(
            f"model folder {text} does not exist; give an MLX model folder, the original release "
            f"folder, a mlx-community pack folder, or a Hub repo id like {DEFAULT_REPO}"
        )
    return _download(text, revision)


def _download(repo: str, revision: str | None) -> Path:
    from huggingface_hub import snapshot_download

    try:
        probe = Path(snapshot_download(repo, revision=revision, allow_patterns=list(PROBE_PATTERNS)))
        layout = config_layout(probe) or RELEASE  # no config.json: the original release
        return Path(snapshot_download(repo, revision=revision, allow_patterns=list(DOWNLOAD_PATTERNS[layout])))
    except Exception as e:  # the Hub client raises a dozen types (httpx, OSError, its own)
        raise ModelNotFoundError(_hub_failure(repo, revision, e)) from None


def _hub_failure(repo: str, revision: str | None, e: Exception) -> str:
    """One line saying why the Hub could not give ``repo`` and what to do instead."""
    from huggingface_hub import constants
    from huggingface_hub import errors as hub

    if isinstance(e, hub.GatedRepoError):
        why = "the repo is gated: accept its terms on huggingface.co, then log in with `hf auth login`"
    elif isinstance(e, hub.RepositoryNotFoundError):
        why = "no such repo on the Hub (or it is private: log in with `hf auth login`)"
    elif isinstance(e, hub.RevisionNotFoundError):
        why = f"the repo has no revision {quoted(revision)}"
    elif isinstance(e, hub.LocalEntryNotFoundError):
        why = ("HF_HUB_OFFLINE is set and it is not in the local Hub cache" if constants.HF_HUB_OFFLINE
               else "the Hub cannot be reached (no network?) and it is not in the local Hub cache")
    else:
        first = (str(e).strip().splitlines() or [""])[0]
        why = f"{type(e).__name__}: {quoted(first, 160)}"
    size = f" ({DEFAULT_REPO_SIZE})" if repo == DEFAULT_REPO else ""
    folder = "" if repo == DEFAULT_REPO else f"there is no local folder {repo}, and "
    return (f"{folder}cannot download {repo}{size} from the Hugging Face Hub: {why}. "
            "Download it once with a connection, or pass --model PATH (a local folder holding "
            "the original release or a converted model).")
