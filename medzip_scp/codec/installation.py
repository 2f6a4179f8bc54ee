"""What this installation can code with, checked once at start (``medzip serve``, ``worker``,
``codec encode|decode``, opening an archive) so that a broken install fails there, in one line,
instead of coding every frame by another path than the one configured."""

from __future__ import annotations

from medzip_scp.codec import predictive
from medzip_scp.codec.api import PRIOR_MAX_PIXELS, LearnedOptions, load_prior
from medzip_scp.codec.errors import CodecError, UnknownModelError
from medzip_scp.codec.zoo import ModelStore, default_store

__all__ = ["CodecInstallError", "check_codec"]


class CodecInstallError(CodecError):
    """A path the configuration asks for cannot run here (message: what and what to do)."""


def check_codec(
    learned: LearnedOptions | None = None, store: ModelStore | None = None, prior: bool = False
) -> None:
    """Check that the default paths and, with ``learned``, the learned paths can run; with
    ``prior`` (a node, which must decode every blob it keeps) that the predictive prior
    the blobs of small frames start from loads.

    Raises
    ------
    CodecInstallError
        If the predictive coder's C core does not load, the prior does not, or the learned
        models ``learned`` names are not installed in the models folder.
    """
    try:
        predictive.check_core()
    except predictive.CoreUnavailableError as exc:
        raise CodecInstallError(str(exc)) from None
    store = store if store is not None else default_store()
    if prior:
        try:
            load_prior(store)
        except UnknownModelError as exc:
            raise CodecInstallError(
                f"{exc}; blobs of frames of at most {PRIOR_MAX_PIXELS:,} pixels start from it"
            ) from None
    if learned is None:
        return
    from medzip_scp.codec.learned.paths import learned_available  # imports the learned stack

    if not learned_available(store, learned):
        raise CodecInstallError(
            f"the learned paths are on but their models ({learned.local_model}, "
            f"{learned.global_model}) are not installed in {store.root}: give the folder that "
            "holds them (--models, [pipeline] models_dir) or turn the learned paths off"
        )
