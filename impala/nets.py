"""The agents of the IMPALA paper: shallow and deep ("IMPALA CNN") torsos, an MLP
torso for vector observations, an optional LSTM core, and policy/baseline heads.

Parameters start as the original's (`init`, below): Sonnet's truncated-normal
weights and zero biases for convolutions and linears, TensorFlow's LSTMBlockCell
initialisation and forget bias of 1 for the LSTMs.

As in the original, the core's input is the torso output concatenated with the
clipped reward and a one-hot of the last action (and, for levels with language
instructions, the instruction encoder's output), and the LSTM state is reset to
zeros at steps whose `done` flag says a new episode starts there.

Shapes (time-major): observation [T, B, *obs_shape], last_action/reward/done
[T, B], instruction [T, B, L] word ids (agents built with instruction_length > 0);
outputs policy_logits [T, B, A], baseline [T, B]. Core state is a tuple (h, c) of
[B, lstm_size] tensors, or () without an LSTM.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import nn
from torch.nn import functional as F

from impala.config import NETWORKS

CoreState = tuple[torch.Tensor, ...]


class AgentOutput(NamedTuple):
    policy_logits: torch.Tensor  # [T, B, A]
    baseline: torch.Tensor  # [T, B]


def resolve_network(network: str, observation_shape: Sequence[int]) -> str:
    """'auto' picks the MLP for vector observations and the deep ResNet for images."""
    if network not in NETWORKS:
        raise ValueError(f"unknown network {network!r}; choose one of {NETWORKS}")
    if network == "auto":
        return "mlp" if len(observation_shape) == 1 else "deep"
    if network == "mlp" and len(observation_shape) != 1:
        raise ValueError(f"the mlp torso needs vector observations, got shape {tuple(observation_shape)}")
    if network in ("shallow", "deep") and len(observation_shape) != 3:
        raise ValueError(
            f"the {network} torso needs [C, H, W] image observations, got shape {tuple(observation_shape)}"
        )
    return network


def _pixel_dtype(weight: torch.Tensor) -> torch.dtype:
    """The dtype an image torso converts its uint8 pixels to: autocast's when autocast
    is on (bfloat16 in a --learner_dtype=bfloat16 learner), else the weights'. Pixels
    (0..255) are exact in bfloat16 and float16, so converting straight to autocast's
    dtype gives the convolution the values it would get from float32, without a float32
    copy of every observation that autocast then converts again (the two copies were a
    quarter of a Pong learner step on 2 CPU cores; docs/results.md, "The image torsos'
    input path")."""
    device = weight.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype


class MLPTorso(nn.Module):
    def __init__(self, input_size: int, hidden_sizes: Sequence[int]):
        super().__init__()
        layers: list[nn.Module] = []
        for size in hidden_sizes:
            layers += [nn.Linear(input_size, size), nn.ReLU()]
            input_size = size
        self.layers = nn.Sequential(*layers)
        self.output_size = input_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x.to(next(self.parameters(), x).dtype))


class ShallowTorso(nn.Module):
    """The paper's shallow network (Fig. 3, left): two convolutions and fc 256."""

    def __init__(self, observation_shape: Sequence[int]):
        super().__init__()
        channels, height, width = observation_shape
        self.conv1 = nn.Conv2d(channels, 16, kernel_size=8, stride=4)
        self.conv2 = nn.Conv2d(16, 32, kernel_size=4, stride=2)
        with torch.no_grad():
            flat = self._conv(torch.zeros(1, channels, height, width)).shape[1]
        self.fc = nn.Linear(flat, 256)
        self.output_size = 256

    def _conv(self, x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        """conv1 and conv2 on scale * x, the scale applied to conv1's weights."""
        x = F.relu(F.conv2d(x, self.conv1.weight * scale, self.conv1.bias, stride=self.conv1.stride))
        return F.relu(self.conv2(x)).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Scaling conv1's 4K weights instead of the pixels saves a pass over every
        # observation (28K values each on Atari) in each forward pass. Channels-last
        # only for a pass that will be differentiated (the learner's): oneDNN's backward
        # convolutions are much faster in it, while forward-only passes (acting) are
        # faster in NCHW at every batch size measured, 16 to 336 rows (docs/results.md,
        # "The image torsos' input path").
        layout = torch.channels_last if torch.is_grad_enabled() else torch.contiguous_format
        return F.relu(self.fc(self._conv(x.to(_pixel_dtype(self.fc.weight), memory_format=layout), 1 / 255.0)))


class SamePadMaxPool(nn.Module):
    """3x3 stride-2 max-pool with TensorFlow's 'SAME' padding: pads ceil(n/2) outputs'
    worth, the odd pixel at the bottom/right, so windows line up with the original."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads = []
        for n in (x.shape[-1], x.shape[-2]):  # F.pad wants the last dimension first
            total = max((-(-n // 2) - 1) * 2 + 3 - n, 0)
            pads += [total // 2, total - total // 2]
        return F.max_pool2d(F.pad(x, pads, value=float("-inf")), 3, stride=2)


class ResidualBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(F.relu(self.conv1(F.relu(x))))


class DeepTorso(nn.Module):
    """The paper's deep ResNet (Fig. 3, right): sections of 16/32/32 channels, each a
    conv, a 3x3 stride-2 max-pool and two residual blocks; then fc 256."""

    def __init__(self, observation_shape: Sequence[int]):
        super().__init__()
        channels, height, width = observation_shape
        sections = []
        for out_channels in (16, 32, 32):
            sections.append(
                nn.Sequential(
                    nn.Conv2d(channels, out_channels, 3, padding=1),
                    SamePadMaxPool(),
                    ResidualBlock(out_channels),
                    ResidualBlock(out_channels),
                )
            )
            channels = out_channels
        self.sections = nn.Sequential(*sections)
        with torch.no_grad():
            flat = self.sections(torch.zeros(1, *observation_shape)).flatten(1).shape[1]
        self.fc = nn.Linear(flat, 256)
        self.output_size = 256

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # channels-last: CPU max-pooling runs several times faster in that layout.
        x = x.to(_pixel_dtype(self.fc.weight), memory_format=torch.channels_last) / 255.0
        x = F.relu(self.sections(x)).flatten(1)
        return F.relu(self.fc(x))


class InstructionEncoder(nn.Module):
    """The original's language encoder: words (hashed to ids 1..num_buckets, 0 pads)
    are embedded (20) and read by an LSTM (64); the output is the LSTM's output
    after the last word, zeros for an empty instruction."""

    def __init__(self, num_buckets: int = 1000, embedding_size: int = 20, hidden_size: int = 64):
        super().__init__()
        self.embedding = nn.Embedding(num_buckets + 1, embedding_size, padding_idx=0)
        self.lstm = nn.LSTM(embedding_size, hidden_size, batch_first=True)
        self.output_size = hidden_size

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [N, L] (words first, then zeros) -> [N, hidden_size]."""
        tokens = tokens.long()
        # An episode's instruction repeats over its steps: encode each distinct one once.
        unique, inverse = torch.unique(tokens, dim=0, return_inverse=True)
        lengths = (unique != 0).sum(dim=1)
        longest = int(lengths.max()) if unique.shape[0] else 0
        if longest == 0:
            return tokens.new_zeros(tokens.shape[0], self.output_size, dtype=self.embedding.weight.dtype)
        outputs, _ = self.lstm(self.embedding(unique[:, :longest]))  # [U, longest, H]
        last = outputs[torch.arange(unique.shape[0], device=tokens.device), (lengths - 1).clamp(min=0)]
        last = last * (lengths > 0).unsqueeze(1).to(last.dtype)
        return last[inverse]


class Agent(nn.Module):
    def __init__(
        self,
        observation_shape: Sequence[int],
        num_actions: int,
        network: str = "auto",
        use_lstm: bool = True,
        lstm_size: int = 256,
        hidden_sizes: Sequence[int] = (64, 64),
        instruction_length: int = 0,
    ):
        super().__init__()
        self.observation_shape = tuple(observation_shape)
        self.num_actions = num_actions
        self.instruction_length = instruction_length
        self.network = resolve_network(network, observation_shape)
        if self.network == "mlp":
            self.torso: nn.Module = MLPTorso(observation_shape[0], hidden_sizes)
        elif self.network == "shallow":
            self.torso = ShallowTorso(observation_shape)
        else:
            self.torso = DeepTorso(observation_shape)
        core_input = self.torso.output_size + 1 + num_actions  # + clipped reward + one-hot action
        # Levels with language instructions (DMLab): + the instruction encoder's output.
        self.instruction = InstructionEncoder() if instruction_length > 0 else None
        if self.instruction is not None:
            core_input += self.instruction.output_size
        self.core = nn.LSTMCell(core_input, lstm_size) if use_lstm else None
        core_output = lstm_size if use_lstm else core_input
        self.policy = nn.Linear(core_output, num_actions)
        self.baseline = nn.Linear(core_output, 1)
        init(self)

    def initial_state(self, batch_size: int, device: torch.device | str = "cpu") -> CoreState:
        if self.core is None:
            return ()
        zeros = torch.zeros(batch_size, self.core.hidden_size, device=device)
        return (zeros, zeros.clone())

    def forward(
        self,
        observation: torch.Tensor,
        last_action: torch.Tensor,
        reward: torch.Tensor,
        done: torch.Tensor,
        core_state: CoreState | None = None,
        instruction: torch.Tensor | None = None,
    ) -> tuple[AgentOutput, CoreState]:
        T, B = observation.shape[:2]
        dtype = self.policy.weight.dtype  # float32, or bfloat16 for actors' inference
        if core_state is None:
            core_state = self.initial_state(B, observation.device)
        # .to(dtype): an MLP torso without hidden layers passes its float32 input through.
        torso_out = self.torso(observation.reshape(T * B, *self.observation_shape)).to(dtype)
        one_hot_action = F.one_hot(last_action.reshape(T * B).long(), self.num_actions).to(dtype)
        clipped_reward = reward.reshape(T * B, 1).float().clamp(-1.0, 1.0).to(dtype)
        core_input = torch.cat([torso_out, clipped_reward, one_hot_action], dim=1)
        if self.instruction is not None:
            if instruction is None:
                raise ValueError("this agent reads instructions: pass instruction [T, B, L]")
            core_input = torch.cat([core_input, self.instruction(instruction.reshape(T * B, -1))], dim=1)
        elif instruction is not None:
            raise ValueError("this agent has no instruction encoder (built with instruction_length=0)")

        if self.core is None:
            core_output = core_input
        else:
            core_input = core_input.view(T, B, -1)
            not_done = (~done.bool()).to(dtype).unsqueeze(-1)  # [T, B, 1]
            h, c = (s.to(dtype) for s in core_state)
            outputs = []
            for t in range(T):
                # A new episode starts at step t: forget the previous one.
                h, c = self.core(core_input[t], (h * not_done[t], c * not_done[t]))
                outputs.append(h)
            core_state = (h.float(), c.float())  # float32 whatever the agent's dtype: it is shipped
            core_output = torch.stack(outputs).view(T * B, -1)

        policy_logits = self.policy(core_output).float().view(T, B, self.num_actions)
        baseline = self.baseline(core_output).float().view(T, B)
        return AgentOutput(policy_logits, baseline), core_state


def _truncated_normal_(weight: torch.Tensor, stddev: float) -> None:
    # TF1's truncated_normal_initializer: a normal of this stddev, redrawn beyond 2 stddev.
    nn.init.trunc_normal_(weight, mean=0.0, std=stddev, a=-2.0 * stddev, b=2.0 * stddev)


def _init_lstm_(lstm: nn.LSTM | nn.LSTMCell, forget_bias: float = 1.0) -> None:
    """TF1 LSTMBlockCell's start: one kernel [input + H, 4H], glorot-uniform (the
    default initializer of its variable), one zero bias, and `forget_bias` added to
    the forget gate's pre-activation. torch keeps the kernel as weight_ih [4H, input]
    and weight_hh [4H, H] (same distribution) and has two biases that are summed:
    bias_ih plays the one bias, starting at 0 with `forget_bias` on the forget gate
    (torch's gate order is i, f, g, o), and bias_hh stays at zero, frozen, so the
    sum trains as the original's single bias would."""
    hidden = lstm.hidden_size
    for name, param in lstm.named_parameters():
        if name.startswith("weight_ih"):
            limit = math.sqrt(6.0 / (param.shape[1] + hidden + 4 * hidden))  # glorot: fan_in + fan_out
            for weight in (param, getattr(lstm, name.replace("weight_ih", "weight_hh"))):
                nn.init.uniform_(weight, -limit, limit)
        elif name.startswith("bias_ih"):
            nn.init.zeros_(param)
            param.data[hidden : 2 * hidden] = forget_bias
        elif name.startswith("bias_hh"):
            nn.init.zeros_(param)
            param.requires_grad_(False)


@torch.no_grad()
def init(module: nn.Module) -> nn.Module:
    """Initialises every layer of `module` as the original agent's started
    (scalable_agent experiment.py, TF1 and Sonnet 1):

      - convolutions and linears (Sonnet's Conv2D and Linear; impala's MLP torso is
        given the same): weights from a normal of stddev 1/sqrt(fan_in) truncated at
        2 stddev, biases zero;
      - LSTMs (the core's LSTMBlockCell(256) and the instruction encoder's
        LSTMBlockCell(64)): see `_init_lstm_`, forget bias 1;
      - the word embedding (Sonnet's Embed): a standard normal, the padding row zero.

    Returns `module`."""
    for layer in module.modules():
        if isinstance(layer, (nn.Linear, nn.Conv2d)):
            fan_in = layer.weight[0].numel()  # in_features, or in_channels * kernel height * width
            _truncated_normal_(layer.weight, 1.0 / math.sqrt(fan_in))
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)
        elif isinstance(layer, (nn.LSTM, nn.LSTMCell)):
            _init_lstm_(layer)
        elif isinstance(layer, nn.Embedding):
            nn.init.normal_(layer.weight, 0.0, 1.0)
            if layer.padding_idx is not None:
                layer.weight[layer.padding_idx] = 0.0
    return module


def sample_actions(policy_logits: torch.Tensor) -> torch.Tensor:
    """Samples one action per row of [..., A] logits; returns int64 [...]."""
    flat = policy_logits.reshape(-1, policy_logits.shape[-1])
    return torch.multinomial(F.softmax(flat, dim=-1), 1).view(policy_logits.shape[:-1])


def make_agent(
    config, observation_shape: Sequence[int], num_actions: int, instruction_length: int = 0, acting: bool = False
) -> Agent:
    """Builds the agent that `config` (an impala.config.Config) describes; with
    instruction_length > 0 it reads instructions of that many words. An actor's
    agent (`acting`) is in --inference_dtype: the learner's float32 parameters are
    rounded as they load. Actors ship the logits they sampled from, so V-trace
    corrects for the rounding as for any other lag behind the learner's policy."""
    agent = Agent(
        observation_shape,
        num_actions,
        network=config.network,
        use_lstm=config.use_lstm,
        lstm_size=config.lstm_size,
        hidden_sizes=config.hidden_sizes,
        instruction_length=instruction_length,
    )
    return agent.to(getattr(torch, config.inference_dtype)) if acting else agent
