"""Training hooks of our own (detectron2's ``HookBase``): the training-time budget.

detectron2's loop (``TrainerBase.train``) iterates over a fixed ``range(start_iter, max_iter)``
and has no early stop; a hook can only leave it by raising. :class:`TimeBudget` does so at the
start of a step, after the previous step's hooks (LR schedule, checkpoint, metrics) have all run,
and leaves the trainer as a finished loop leaves it (``iter == max_iter``), so ``EvalHook`` runs
the final evaluation in ``after_train`` as usual. ``Trainer.train`` catches the exception.
"""
import logging
import time

from detectron2.engine import HookBase
from detectron2.utils import comm

logger = logging.getLogger(__name__)


class TimeBudgetSpent(BaseException):
    """Raised by :class:`TimeBudget` to end the loop. A ``BaseException``: detectron2 logs an
    ``Exception`` leaving the loop as a training failure, and this is no failure."""


class TimeBudget(HookBase):
    """Measures the time of the training steps and, with ``seconds > 0``, ends training once it
    has reached ``seconds``, with a final checkpoint and the final evaluation as at MAX_ITER.

    So runs of different configs can be compared at equal training time. The time counts from
    this hook's ``before_step`` to its ``after_step``: register it right after ``IterationTimer``
    (first in detectron2's order) and that is the step itself, data loading included, without
    checkpoints, evaluations and logging, which differ between configs. The sum is put in the
    event storage as ``train_seconds`` (metrics.json) and kept in checkpoints, so a resumed run
    goes on counting where its checkpoint stopped.

    Args:
        seconds: the budget; 0: never stop, only measure.
        checkpointer: saves ``model_final`` when the budget ends training (the periodic
            checkpointer saves it only at MAX_ITER); None: no checkpoint.
    """

    def __init__(self, seconds: float, checkpointer=None):
        self.seconds = float(seconds)
        self.checkpointer = checkpointer
        self.train_seconds = 0.0
        self._start = None

    def _spent(self) -> float:
        """The time measured so far; under DDP the largest over ranks, so all ranks stop at the
        same iteration (a rank stopping alone would wait forever in the next all-reduce)."""
        if comm.get_world_size() > 1:
            self.train_seconds = max(comm.all_gather(self.train_seconds))
        return self.train_seconds

    def before_step(self):
        if self.seconds > 0 and self._spent() >= self.seconds:
            self._stop()
        self._start = time.perf_counter()

    def after_step(self):
        self.train_seconds += time.perf_counter() - self._start
        self.trainer.storage.put_scalar("train_seconds", self.train_seconds, smoothing_hint=False)

    def _stop(self):
        trainer = self.trainer
        last = trainer.iter - 1  # the step about to begin will not run
        logger.info(f"Time budget of {self.seconds:g} s spent ({self.train_seconds:.1f} s of training steps): "
                    f"training ends after iteration {last} instead of SOLVER.MAX_ITER")
        if self.checkpointer is not None:
            trainer.iter = last  # the iteration --resume continues after
            self.checkpointer.save("model_final", iteration=last)
        trainer.iter = trainer.max_iter = last + 1  # as after a finished loop
        raise TimeBudgetSpent()

    def state_dict(self):
        return {"train_seconds": self.train_seconds}

    def load_state_dict(self, state_dict):
        self.train_seconds = float(state_dict["train_seconds"])
