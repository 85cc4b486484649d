"""What the command modules share (kept apart from `main`, which imports them all)."""

from __future__ import annotations

import os


def quiet_libraries() -> None:
    """--quiet: also silence transformers' and huggingface_hub's own progress bars (loading
    and saving weights), so a quiet run prints only its result or its one-line error."""
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    try:
        import transformers

        transformers.utils.logging.disable_progress_bar()
    except ImportError:
        pass
