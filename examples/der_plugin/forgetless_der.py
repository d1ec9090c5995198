"""Dark Experience Replay (DER): replay past inputs and match the logits the model gave them.

Buzzega et al., "Dark Experience for General Continual Learning", NeurIPS 2020, eq. 3:
loss = CE(new batch) + alpha * ||f(x_past) - z_past||^2. This version stores the logits
at the end of each experience (the paper stores them while training, per batch).
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from forgetless.experiments.schema import param
from forgetless.strategies import Strategy
from forgetless.strategies.buffers import BufferConfig, ReplayBuffer
from forgetless.streams import Experience, Samples


@dataclass
class DERConfig:
    alpha: float = param(0.5, "weight of the logit-matching term")
    buffer: BufferConfig = param(BufferConfig(size=200), "the buffer of (input, logits) pairs")


class DER(Strategy):
    Config = DERConfig

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.buffer = ReplayBuffer(self.config.buffer, self.device)

    def loss(self, batch: Samples) -> torch.Tensor:
        loss = super().loss(batch)
        if len(self.buffer):
            past = self.buffer.sample(self.train_config.batch_size)
            loss = loss + self.config.alpha * F.mse_loss(self.model(past.x), past.y)
        return loss

    @torch.no_grad()
    def after_experience(self, experience: Experience) -> None:
        self.model.eval()
        inputs = experience.train.x.to(self.device)
        self.buffer.add(Samples(inputs, self.model(inputs)))  # y holds the logits
        self.model.train()

    def memory_bytes(self) -> int:
        return self.buffer.nbytes

    def state_dict(self) -> dict:
        return {**super().state_dict(), "buffer": self.buffer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.buffer.load_state_dict(state["buffer"])
