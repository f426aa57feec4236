"""What every method's trainer shares."""
from __future__ import annotations


class ResumableTrainer:
    """Checkpointed trainer state: the optimizer and the augmentation generator.

    Subclasses set ``self.optimizer``, ``self.generator`` and ``self.cfg``."""

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "generator": self.generator.get_state()}

    def before_checkpoint(self, progress: dict) -> None:
        """Bring everything a checkpoint must hold up to ``progress`` (nothing by default)."""

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        for group in self.optimizer.param_groups:  # the config's rate wins on resume (e.g. lowered after a NaN)
            group["lr"] = self.cfg.train.lr
        self.generator.set_state(state["generator"])
