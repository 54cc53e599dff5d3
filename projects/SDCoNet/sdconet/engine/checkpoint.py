"""Checkpoints written atomically and read with clear errors.

Saving: a kill or a full disk during a save never leaves a corrupt checkpoint or a
``last_checkpoint`` pointing at one. Loading: a damaged file (empty, truncated, not a checkpoint)
is named with what is wrong; ``--resume`` falls back to the newest loadable ``model_*.pth`` when
the file ``last_checkpoint`` names cannot be loaded; weights that leave more than half of the
model's tensors unset (another config or architecture) are refused unless allowed.
"""
import glob
import logging
import math
import os
import re
import zipfile
from collections.abc import Mapping

import numpy as np
import torch
from detectron2.checkpoint import DetectionCheckpointer

logger = logging.getLogger(__name__)


class UnreadableCheckpointError(OSError):
    """A checkpoint file that cannot be loaded: empty, truncated or not a checkpoint."""


class IncompatibleCheckpointError(ValueError):
    """A checkpoint that leaves most of the model's tensors unset."""


def atomic_write(path: str, write) -> None:
    """Call ``write(file)`` on a temporary file beside ``path``, fsync it, then rename it over
    ``path`` (atomic on POSIX). On any error the temporary file is removed and ``path`` is untouched."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:200]}" if text else type(error).__name__


def describe_unreadable(path: str, error: BaseException) -> str:
    """What is wrong with a checkpoint file that failed to load, judged from its first bytes."""
    if isinstance(error, OSError):
        return f"could not be read ({error})"
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(64)
    if head.startswith(b"PK\x03\x04"):  # torch.save's zip format
        if not zipfile.is_zipfile(path):
            return f"is truncated ({size} bytes): the zip archive torch.save writes ends early"
        return f"is damaged or holds no weights ({size} bytes; {_first_line(error)})"
    if head[:1] == b"\x80":  # a pickle: detectron2 .pkl or torch's legacy format
        if "Weights only load failed" in str(error):
            return ("is a pickle that torch.load(weights_only=True) refuses (Python objects other than "
                    "tensors, or not written by torch.save): not a checkpoint of weights")
        return f"is truncated or damaged ({size} bytes; {_first_line(error)})"
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as e:  # a character cut at the end of the 64 bytes is still text
        text = head[:e.start].decode("utf-8") if e.start >= len(head) - 3 else ""
    if text and all(c.isprintable() or c.isspace() for c in text):
        return f"is a text file, not a checkpoint (it begins {text[:40]!r})"
    return f"is not a checkpoint written by torch.save ({size} bytes of unrecognised content)"


def _iteration(path: str) -> float:
    """The iteration in a ``model_0000499.pth`` name; ``model_final.pth`` and others come last."""
    match = re.fullmatch(r"model_(\d+)\.pth", os.path.basename(path))
    return int(match.group(1)) if match else math.inf


def _modules(keys, limit: int = 6) -> str:
    names = sorted({k.split(".")[0] for k in keys})
    return ", ".join(names[:limit]) + (", ..." if len(names) > limit else "") if names else "no tensors"


class AtomicDetectionCheckpointer(DetectionCheckpointer):
    """``DetectionCheckpointer`` whose ``save`` and ``last_checkpoint`` tag are atomic and whose
    loading names a damaged file, resumes from the newest loadable checkpoint, and refuses
    weights of another model.

    Args:
        allow_partial_weights: load a checkpoint even when more than half of the model's tensors
            are missing from it (``tools/train_net.py --allow-partial-weights``).
    """

    def __init__(self, model, save_dir="", *, allow_partial_weights: bool = False, **kwargs):
        super().__init__(model, save_dir, **kwargs)
        self.allow_partial_weights = allow_partial_weights
        self._file = None

    def save(self, name: str, **kwargs) -> None:
        if not self.save_dir or not self.save_to_disk:
            return
        data = {"model": self.model.state_dict()}
        for key, obj in self.checkpointables.items():
            data[key] = obj.state_dict()
        data.update(kwargs)
        basename = f"{name}.pth"
        save_file = os.path.join(self.save_dir, basename)
        self.logger.info("Saving checkpoint to {}".format(save_file))
        try:
            atomic_write(save_file, lambda f: torch.save(data, f))
        except (OSError, RuntimeError) as e:
            # torch.save reports a failed write (disk full, file too large) as a RuntimeError
            # raised while handling the OSError.
            cause = e if isinstance(e, OSError) else e.__context__
            if not isinstance(cause, OSError):
                raise
            raise OSError(f"Could not save checkpoint {save_file} ({cause}); the previous checkpoint and "
                          "last_checkpoint are untouched") from e
        self.tag_last_checkpoint(basename)

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        path = os.path.join(self.save_dir, "last_checkpoint")
        atomic_write(path, lambda f: f.write(last_filename_basename.encode()))

    # ------------------------------------------------------------------------------- loading
    def load(self, path, *args, **kwargs):
        if path and "://" not in path and not os.path.isfile(path):
            raise FileNotFoundError(f"Checkpoint {path} does not exist")
        return super().load(path, *args, **kwargs)

    def _load_file(self, filename):
        """detectron2's loading, with an error naming the file and what is wrong with it."""
        self._file = filename
        if os.path.isfile(filename) and os.path.getsize(filename) == 0:
            raise UnreadableCheckpointError(f"Checkpoint {filename} is empty (0 bytes): it was never written "
                                            "completely")
        try:
            loaded = super()._load_file(filename)
        except Exception as e:
            raise UnreadableCheckpointError(f"Checkpoint {filename} {describe_unreadable(filename, e)}") from e
        weights = loaded.get("model") if isinstance(loaded, Mapping) else None
        if not isinstance(weights, Mapping):
            raise UnreadableCheckpointError(f"Checkpoint {filename} is not a checkpoint of weights: it holds a "
                                            f"{type(weights).__name__}, not a dict of tensors")
        others = [k for k, v in weights.items() if not isinstance(v, (torch.Tensor, np.ndarray))]
        if others:
            raise UnreadableCheckpointError(f"Checkpoint {filename} is not a checkpoint of weights: its entries "
                                            f"{others[:5]} are not tensors (expected a dict of tensors, alone or "
                                            "under 'model' as detectron2 saves them)")
        return loaded

    def _load_model(self, checkpoint):
        """detectron2's loading, refused when more than half of the model's tensors stay unset."""
        checkpoint_keys = [k.removeprefix("module.") for k in checkpoint["model"]]
        incompatible = super()._load_model(checkpoint)
        model_keys = list(self.model.state_dict())
        missing = set(incompatible.missing_keys)
        if self.allow_partial_weights or len(missing) * 2 <= len(model_keys):
            return incompatible
        shapes = incompatible.incorrect_shapes
        example = (f"; e.g. {shapes[0][0]} is {shapes[0][1]} in the checkpoint, {shapes[0][2]} in the model"
                   if shapes else "")
        raise IncompatibleCheckpointError(
            f"Checkpoint {self._file} does not fit this model: {len(missing)} of the model's {len(model_keys)} "
            f"tensors are missing from it ({len(shapes)} of them with another shape{example}). It is likely a "
            f"checkpoint of another MODEL.META_ARCHITECTURE or config: this model is "
            f"{type(self.model).__name__} ({_modules(model_keys)}), the checkpoint's tensors are under "
            f"{_modules(checkpoint_keys)}. Use the config it was trained with, or --allow-partial-weights to "
            f"load the tensors that fit anyway.")

    # ------------------------------------------------------------------------------- resuming
    def _tagged_checkpoint(self):
        """(the file ``last_checkpoint`` names or "", what is wrong with ``last_checkpoint`` or None)."""
        tag = os.path.join(self.save_dir, "last_checkpoint")
        try:
            with open(tag, "rb") as f:
                raw = f.read()
        except OSError as e:
            return "", f"{tag} could not be read ({e})"
        try:
            name = raw.decode("utf-8").strip()
        except UnicodeDecodeError:
            name = ""
        if not name or not name.isprintable() or os.sep in name or len(name) > 255:
            return "", f"{tag} holds no file name ({len(raw)} bytes beginning {raw[:20]!r})"
        return os.path.join(self.save_dir, name), None

    def get_checkpoint_file(self) -> str:
        return self._tagged_checkpoint()[0]

    def resume_or_load(self, path, *, resume=True):
        """detectron2's ``resume_or_load``; when the file ``last_checkpoint`` names cannot be
        loaded, resume from the newest loadable ``model_*.pth`` in the folder (by modification
        time) with a warning naming what was skipped. When none can be loaded, raise rather than
        start from MODEL.WEIGHTS: the user asked to resume and would silently lose the run."""
        if not (resume and self.has_checkpoint()):
            return super().resume_or_load(path, resume=resume)
        tagged, problem = self._tagged_checkpoint()
        skipped = [problem] if problem else []
        others = sorted((f for f in glob.glob(os.path.join(self.save_dir, "model_*.pth")) if f != tagged),
                        key=lambda f: (os.path.getmtime(f), _iteration(f)), reverse=True)
        for candidate in ([tagged] if tagged else []) + others:
            try:
                checkpoint = self.load(candidate)
            except (UnreadableCheckpointError, FileNotFoundError) as e:
                skipped.append(str(e))
                continue
            if skipped:
                logger.warning(f"Resuming from {candidate} instead of the last checkpoint: skipped "
                               + "; ".join(skipped))
            return checkpoint
        raise UnreadableCheckpointError(
            f"Cannot resume from {self.save_dir}: no checkpoint there can be loaded ({'; '.join(skipped)}). "
            "Remove the broken files (and last_checkpoint) to start from MODEL.WEIGHTS, or run without --resume.")
