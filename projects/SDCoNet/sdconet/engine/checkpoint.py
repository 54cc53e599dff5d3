"""Checkpoints written atomically: a kill or a full disk during a save never leaves a corrupt
checkpoint or a ``last_checkpoint`` pointing at one."""
import logging
import os

import torch
from detectron2.checkpoint import DetectionCheckpointer

logger = logging.getLogger(__name__)


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


class AtomicDetectionCheckpointer(DetectionCheckpointer):
    """``DetectionCheckpointer`` whose ``save`` and ``last_checkpoint`` tag are atomic."""

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
