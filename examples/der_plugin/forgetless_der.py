"""Dark Experience Replay (DER): replay past inputs and match the logits the model gave them.

Buzzega et al., "Dark Experience for General Continual Learning", NeurIPS 2020, eq. 3:
loss = CE(new batch) + alpha * ||f(x_past) - z_past||^2. It reuses rehearsal's buffer,
budget and checkpointing, storing logits where rehearsal stores labels. This version
stores the logits at the end of each experience (the paper stores them while training).
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from forgetless.core.schema import param
from forgetless.strategies.rehearsal import Rehearsal, RehearsalConfig
from forgetless.streams import Experience, Samples


@dataclass
class DERConfig(RehearsalConfig):
    alpha: float = param(0.5, "weight of the logit-matching term")


class DER(Rehearsal):
    Config = DERConfig

    def compose(self, batch: Samples) -> Samples:
        return batch  # replayed samples enter through the loss, not the batch

    def loss(self, batch: Samples) -> torch.Tensor:
        loss = super().loss(batch)
        if len(self.buffer):
            past = self.buffer.sample(self.replay_batch_size)
            loss = loss + self.config.alpha * F.mse_loss(self.model(past.x), past.y)
        return loss

    @torch.no_grad()
    def after_experience(self, experience: Experience) -> None:
        self.model.eval()
        inputs = experience.train.x.to(self.device)
        self.buffer.add(Samples(inputs, self.model(inputs)))  # y holds the logits
        self.model.train()
