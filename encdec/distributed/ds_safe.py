"""Check a DeepSpeed checkpoint before DeepSpeed's own loader unpickles it.

``engine.load_checkpoint`` reads its ``*.pt`` files with a plain ``torch.load(weights_only=False)``, and run
directories are handed around (``--resume``, ``--init-from``): a crafted file would run what it names on every
rank. Each file is first read by the restricted unpickler (:func:`~encdec.models.safe_load.safe_torch_load`), which
runs nothing and lists the globals outside its allowlist; the only ones DeepSpeed writes are its plain data classes
below (the ZeRO stage enum, the loss scaler's settings). A file naming anything else is refused with the name, and
DeepSpeed never opens it. Every rank checks the same files, so every rank refuses together (no collective hangs).
"""

from __future__ import annotations

from pathlib import Path

from encdec.models.safe_load import UnsafeGlobalError, safe_torch_load

__all__ = ["DEEPSPEED_DATA_CLASSES", "check_deepspeed_checkpoint"]

#: Classes DeepSpeed pickles into its checkpoints besides tensors and containers (seen in ZeRO-2/3 and universal
#: checkpoints of DeepSpeed 0.18): an enum, the loss scaler's settings, a (start, numel) dataclass; built from
#: plain values, they run nothing of the file's choosing.
DEEPSPEED_DATA_CLASSES = frozenset({
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.utils.tensor_fragment.fragment_address",
})


def check_deepspeed_checkpoint(load_dir: str | Path) -> int:
    """Read every ``*.pt`` under ``load_dir`` without running code; raise unless each names only tensors,
    containers and :data:`DEEPSPEED_DATA_CLASSES`. Returns the number of files checked.

    Raises:
        UnsafeGlobalError: a file names another global, or cannot be read by the restricted unpickler.
    """
    files = sorted(Path(load_dir).rglob("*.pt"))
    for f in files:
        stubbed: list[str] = []
        try:
            safe_torch_load(f, stub_unknown=True, stubbed=stubbed)
        except Exception as err:
            raise UnsafeGlobalError(f"{f}: not a DeepSpeed checkpoint file that can be read without running code "
                                    f"({type(err).__name__}: {err}); nothing from it was run. Fix: resume from a "
                                    f"checkpoint this program wrote.") from None
        foreign = sorted(set(stubbed) - DEEPSPEED_DATA_CLASSES)
        if foreign:
            raise UnsafeGlobalError(f"{f} names {foreign}, which a DeepSpeed checkpoint never holds (it was not "
                                    f"written by this program or has been altered); refused before DeepSpeed "
                                    f"read it, nothing from it was run. Fix: resume from a checkpoint you trust.")
    return len(files)
