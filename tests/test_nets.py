"""Tests for impala.nets: shapes, the paper's torsos, network selection, the LSTM
reset on episode starts, the core's use of last action and reward, sampling."""

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode

from impala.config import Config
from impala.nets import (
    Agent,
    DeepTorso,
    MLPTorso,
    SamePadMaxPool,
    ShallowTorso,
    make_agent,
    resolve_network,
    sample_actions,
)

T, B = 3, 2
IMAGE = (4, 84, 84)
LSTM_SIZE = 32


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _inputs(observation_shape, num_actions, T=T, B=B, generator=None):
    g = generator or torch.Generator().manual_seed(1)
    if len(observation_shape) == 3:
        observation = torch.randint(0, 256, (T, B, *observation_shape), dtype=torch.uint8, generator=g)
    else:
        observation = torch.randn(T, B, *observation_shape, generator=g)
    last_action = torch.randint(0, num_actions, (T, B), generator=g)
    reward = torch.randn(T, B, generator=g)
    done = torch.zeros(T, B, dtype=torch.bool)
    return observation, last_action, reward, done


# ---------------------------------------------------------------------------
# Shapes.


@pytest.mark.parametrize("use_lstm", [True, False])
@pytest.mark.parametrize("network,observation_shape", [("mlp", (4,)), ("shallow", IMAGE), ("deep", IMAGE)])
def test_output_and_state_shapes(network, observation_shape, use_lstm):
    num_actions = 6
    agent = Agent(observation_shape, num_actions, network=network, use_lstm=use_lstm, lstm_size=LSTM_SIZE)
    assert agent.network == network
    state = agent.initial_state(B)
    if use_lstm:
        assert len(state) == 2
        assert all(s.shape == (B, LSTM_SIZE) and s.dtype == torch.float32 for s in state)
        assert all(torch.count_nonzero(s) == 0 for s in state)
        assert state[0].data_ptr() != state[1].data_ptr()
    else:
        assert state == ()
    with torch.no_grad():
        output, new_state = agent(*_inputs(observation_shape, num_actions), state)
    assert output.policy_logits.shape == (T, B, num_actions)
    assert output.baseline.shape == (T, B)
    assert output.policy_logits.dtype == output.baseline.dtype == torch.float32
    assert torch.isfinite(output.policy_logits).all() and torch.isfinite(output.baseline).all()
    if use_lstm:
        assert len(new_state) == 2 and all(s.shape == (B, LSTM_SIZE) for s in new_state)
    else:
        assert new_state == ()


def test_deep_torso_sections():
    torso = DeepTorso(IMAGE)
    assert len(torso.sections) == 3
    x = torch.zeros(1, *IMAGE)
    sizes = []
    for section, channels in zip(torso.sections, (16, 32, 32)):
        conv, pool, block1, block2 = section
        assert isinstance(conv, nn.Conv2d)
        assert (conv.out_channels, conv.kernel_size, conv.stride) == (channels, (3, 3), (1, 1))
        assert isinstance(pool, SamePadMaxPool)
        for block in (block1, block2):
            for c in (block.conv1, block.conv2):
                assert (c.in_channels, c.out_channels, c.kernel_size, c.stride) == (channels, channels, (3, 3), (1, 1))
        x = section(x)
        sizes.append(tuple(x.shape[1:]))
    assert sizes == [(16, 42, 42), (32, 21, 21), (32, 11, 11)]
    assert torso.fc.in_features == 32 * 11 * 11
    assert torso.fc.out_features == torso.output_size == 256
    assert torso(torch.zeros(5, *IMAGE, dtype=torch.uint8)).shape == (5, 256)


@pytest.mark.parametrize("n", [4, 5, 84, 21])
def test_same_pad_max_pool_matches_tensorflow_windows(n):
    # TF 'SAME': ceil(n/2) outputs; the total padding p = max((out-1)*2 + 3 - n, 0)
    # goes p//2 before and the rest after, so window i starts at 2*i - p//2.
    x = torch.randn(1, 1, n, n)
    out = SamePadMaxPool()(x)
    size = -(-n // 2)
    before = max((size - 1) * 2 + 3 - n, 0) // 2
    expected = torch.empty(size, size)
    for i in range(size):
        for j in range(size):
            r0, c0 = 2 * i - before, 2 * j - before
            expected[i, j] = x[0, 0, max(r0, 0) : r0 + 3, max(c0, 0) : c0 + 3].max()
    assert torch.equal(out[0, 0], expected)


def test_shallow_torso_layers():
    torso = ShallowTorso(IMAGE)
    c1, c2 = torso.conv1, torso.conv2
    assert (c1.in_channels, c1.out_channels, c1.kernel_size, c1.stride) == (4, 16, (8, 8), (4, 4))
    assert (c2.in_channels, c2.out_channels, c2.kernel_size, c2.stride) == (16, 32, (4, 4), (2, 2))
    assert torso.fc.in_features == 32 * 9 * 9  # 84 -> 20 -> 9
    assert torso.fc.out_features == torso.output_size == 256
    assert torso(torch.zeros(5, *IMAGE, dtype=torch.uint8)).shape == (5, 256)


def test_mlp_torso_and_core_sizes():
    torso = MLPTorso(4, (32, 16))
    assert [m.out_features for m in torso.layers if isinstance(m, nn.Linear)] == [32, 16]
    assert torso.output_size == 16
    agent = Agent((4,), 3, network="mlp", use_lstm=True, lstm_size=LSTM_SIZE, hidden_sizes=(32, 16))
    assert agent.core.input_size == 16 + 1 + 3  # torso + clipped reward + one-hot action
    no_lstm = Agent((4,), 3, network="mlp", use_lstm=False, hidden_sizes=(32, 16))
    assert no_lstm.core is None and no_lstm.policy.in_features == 16 + 1 + 3


def test_make_agent_follows_config():
    config = Config(network="auto", use_lstm=True, lstm_size=24, mlp_sizes="8,8")
    agent = make_agent(config, (4,), 2)
    assert agent.network == "mlp" and agent.core.hidden_size == 24 and agent.torso.output_size == 8


# ---------------------------------------------------------------------------
# Network selection.


def test_resolve_network_auto():
    assert resolve_network("auto", (4,)) == "mlp"
    assert resolve_network("auto", IMAGE) == "deep"
    assert resolve_network("mlp", (8,)) == "mlp"
    assert resolve_network("shallow", IMAGE) == "shallow"
    assert resolve_network("deep", (1, 64, 64)) == "deep"
    assert Agent(IMAGE, 2, use_lstm=False).network == "deep"


@pytest.mark.parametrize(
    "network,shape",
    [
        ("mlp", IMAGE),
        ("mlp", (84, 84)),
        ("shallow", (4,)),
        ("deep", (4,)),
        ("deep", (84, 84)),
    ],
)
def test_resolve_network_mismatch(network, shape):
    with pytest.raises(ValueError, match=network):
        resolve_network(network, shape)
    with pytest.raises(ValueError):
        Agent(shape, 2, network=network)


# ---------------------------------------------------------------------------
# The recurrent core.


def _mlp_agent(use_lstm=True, num_actions=3):
    return Agent((4,), num_actions, network="mlp", use_lstm=use_lstm, lstm_size=LSTM_SIZE, hidden_sizes=(16,))


def _random_state(agent, batch):
    g = torch.Generator().manual_seed(7)
    return tuple(torch.randn(batch, LSTM_SIZE, generator=g) for _ in agent.initial_state(batch))


@torch.no_grad()
def test_whole_unroll_equals_step_by_step():
    agent = _mlp_agent()
    steps = 6
    observation, last_action, reward, done = _inputs((4,), 3, T=steps)
    done[2, 0] = True
    done[4, 1] = True
    state0 = _random_state(agent, B)
    whole, whole_state = agent(observation, last_action, reward, done, state0)

    state = state0
    logits, baselines = [], []
    for t in range(steps):
        out, state = agent(observation[t : t + 1], last_action[t : t + 1], reward[t : t + 1], done[t : t + 1], state)
        logits.append(out.policy_logits)
        baselines.append(out.baseline)
    torch.testing.assert_close(torch.cat(logits), whole.policy_logits)
    torch.testing.assert_close(torch.cat(baselines), whole.baseline)
    for a, b in zip(state, whole_state):
        torch.testing.assert_close(a, b)


@torch.no_grad()
@pytest.mark.parametrize("reset_at", [0, 2])
def test_done_resets_the_core_state(reset_at):
    agent = _mlp_agent()
    steps = 5
    observation, last_action, reward, no_done = _inputs((4,), 3, T=steps)
    state0 = _random_state(agent, B)  # nonzero, so a missing reset shows
    done = no_done.clone()
    done[reset_at, 0] = True  # env 0 starts a new episode at step `reset_at`

    out, _ = agent(observation, last_action, reward, done, state0)
    carried, _ = agent(observation, last_action, reward, no_done, state0)
    fresh, _ = agent(
        observation[reset_at:], last_action[reset_at:], reward[reset_at:], no_done[reset_at:], agent.initial_state(B)
    )

    # Env 0 from the reset on: exactly a fresh episode from a zero state.
    torch.testing.assert_close(out.policy_logits[reset_at:, 0], fresh.policy_logits[:, 0])
    torch.testing.assert_close(out.baseline[reset_at:, 0], fresh.baseline[:, 0])
    # Before the reset env 0 is unaffected; env 1 (no done) is unaffected throughout.
    torch.testing.assert_close(out.policy_logits[:reset_at, 0], carried.policy_logits[:reset_at, 0])
    torch.testing.assert_close(out.policy_logits[:, 1], carried.policy_logits[:, 1])
    # The test can fail: without the done flag the state carries over and differs.
    assert not torch.allclose(carried.policy_logits[reset_at:, 0], fresh.policy_logits[:, 0], atol=1e-4)
    assert not torch.allclose(carried.baseline[reset_at:, 0], fresh.baseline[:, 0], atol=1e-4)
    # And env 1 was not reset by env 0's flag.
    assert not torch.allclose(out.policy_logits[reset_at:, 1], fresh.policy_logits[:, 1], atol=1e-4)


@torch.no_grad()
def test_done_at_step_zero_with_zero_state_changes_nothing():
    agent = _mlp_agent()
    observation, last_action, reward, done = _inputs((4,), 3)
    plain, _ = agent(observation, last_action, reward, done, agent.initial_state(B))
    done[0] = True
    reset, _ = agent(observation, last_action, reward, done, agent.initial_state(B))
    torch.testing.assert_close(plain.policy_logits, reset.policy_logits)


@torch.no_grad()
@pytest.mark.parametrize("use_lstm", [True, False])
def test_core_input_uses_last_action_and_reward(use_lstm):
    num_actions = 3
    agent = _mlp_agent(use_lstm, num_actions)
    observation, last_action, reward, done = _inputs((4,), num_actions)
    state = agent.initial_state(B)
    base, _ = agent(observation, last_action, reward, done, state)

    other_action = (last_action + 1) % num_actions
    changed, _ = agent(observation, other_action, reward, done, state)
    assert not torch.allclose(changed.policy_logits, base.policy_logits, atol=1e-5)
    assert not torch.allclose(changed.baseline, base.baseline, atol=1e-5)

    small = torch.full((T, B), 0.25)
    a, _ = agent(observation, last_action, small, done, state)
    b, _ = agent(observation, last_action, small + 0.5, done, state)
    assert not torch.allclose(a.policy_logits, b.policy_logits, atol=1e-5)
    assert not torch.allclose(a.baseline, b.baseline, atol=1e-5)

    # Rewards are clipped to [-1, 1] before entering the core.
    big, _ = agent(observation, last_action, torch.full((T, B), 5.0), done, state)
    one, _ = agent(observation, last_action, torch.ones(T, B), done, state)
    torch.testing.assert_close(big.policy_logits, one.policy_logits)
    neg, _ = agent(observation, last_action, torch.full((T, B), -7.0), done, state)
    minus_one, _ = agent(observation, last_action, -torch.ones(T, B), done, state)
    torch.testing.assert_close(neg.baseline, minus_one.baseline)


# ---------------------------------------------------------------------------
# Sampling.


def test_sample_actions_dtype_shape_range():
    logits = torch.randn(T, B, 5)
    actions = sample_actions(logits)
    assert actions.dtype == torch.int64 and actions.shape == (T, B)
    many = sample_actions(torch.zeros(10_000, 5))
    assert many.min() >= 0 and many.max() <= 4
    assert set(many.tolist()) == {0, 1, 2, 3, 4}


def test_sample_actions_follows_the_distribution():
    n = 20_000
    favoring = torch.tensor([0.0, 0.0, 12.0, 0.0])  # p(2) ~ 0.99998
    actions = sample_actions(favoring.expand(n, 4))
    assert (actions == 2).float().mean() > 0.999

    probs = torch.tensor([0.1, 0.2, 0.7])
    actions = sample_actions(probs.log().expand(n, 3))
    freq = torch.bincount(actions, minlength=3).float() / n
    torch.testing.assert_close(freq, probs, atol=0.02, rtol=0)

    # Rows are sampled independently: each row follows its own logits.
    rows = torch.tensor([[20.0, 0.0], [0.0, 20.0]]).repeat(100, 1)
    actions = sample_actions(rows.view(100, 2, 2))
    assert (actions[:, 0] == 0).all() and (actions[:, 1] == 1).all()


def test_shallow_torso_computes_the_papers_network_on_scaled_pixels():
    # The 1/255 is folded into conv1's weights; the result must be the textbook one.
    torso = ShallowTorso(IMAGE)
    x = torch.randint(0, 256, (5, *IMAGE), dtype=torch.uint8)
    h = torch.relu(torso.conv1(x.float() / 255.0))
    h = torch.relu(torso.conv2(h)).flatten(1)
    expected = torch.relu(torso.fc(h))
    torch.testing.assert_close(torso(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("torso_of", [ShallowTorso, DeepTorso])
def test_a_learner_pass_in_channels_last_gives_the_textbook_values_and_gradients(torso_of):
    # With gradients on, the image torsos run in channels-last (faster backward
    # convolutions); values and every parameter's gradient must be those of the
    # plain NCHW computation, here in float64 on the same float32 parameters.
    shape = (4, 36, 36)
    torso = torso_of(shape)
    reference = torso_of(shape).double()
    reference.load_state_dict(torso.state_dict())
    x = torch.randint(0, 256, (6, *shape), dtype=torch.uint8)
    out = torso(x)
    if torso_of is ShallowTorso:
        h = torch.relu(reference.conv1(x.double() / 255.0))
        expected = torch.relu(reference.fc(torch.relu(reference.conv2(h)).flatten(1)))
    else:
        expected = torch.relu(reference.fc(torch.relu(reference.sections(x.double() / 255.0)).flatten(1)))
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    (out.double() * weights).sum().backward()
    (expected * weights).sum().backward()
    torch.testing.assert_close(out.double(), expected, rtol=1e-4, atol=1e-5)
    for (name, p), q in zip(torso.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad.double(), q.grad, rtol=1e-3, atol=1e-4, msg=name)


@pytest.mark.parametrize("torso_of", [ShallowTorso, DeepTorso])
def test_under_autocast_pixels_go_straight_to_bfloat16_with_the_same_values(torso_of):
    # A bfloat16 learner: uint8 pixels are converted once, to autocast's dtype (they
    # are exact there), so the pass equals autocast on float32 pixels, up to where
    # 1/255 is rounded; and the convolutions see bfloat16, not float32, inputs.
    torso = torso_of(IMAGE)
    x = torch.randint(0, 256, (5, *IMAGE), dtype=torch.uint8)

    class ConvInputs(TorchFunctionMode):  # the dtype each convolution is called with
        def __init__(self):
            super().__init__()
            self.dtypes = []

        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func is F.conv2d:
                self.dtypes.append(args[0].dtype)
            return func(*args, **(kwargs or {}))

    with torch.autocast("cpu", dtype=torch.bfloat16):
        with ConvInputs() as convs:
            got = torso(x)
        expected = torso(x.float())
    assert got.dtype == torch.bfloat16 and convs.dtypes and set(convs.dtypes) == {torch.bfloat16}
    torch.testing.assert_close(got.float(), expected.float(), rtol=0.05, atol=0.05)
    torch.testing.assert_close(got.float(), torso(x), rtol=0.05, atol=0.05)  # and float32's values


@pytest.mark.parametrize(
    "network, observation_shape, use_lstm, mlp_sizes",
    [("shallow", IMAGE, False, ""), ("deep", (3, 16, 16), True, ""), ("mlp", (4,), True, "8"), ("mlp", (4,), True, "")],
)
def test_a_bfloat16_acting_agent_takes_float32_parameters_and_gives_float32_outputs(
    network, observation_shape, use_lstm, mlp_sizes
):
    config = Config(
        network=network, use_lstm=use_lstm, lstm_size=LSTM_SIZE, mlp_sizes=mlp_sizes, inference_dtype="bfloat16"
    )
    learner_agent = make_agent(config, observation_shape, 3)
    actor_agent = make_agent(config, observation_shape, 3, acting=True)
    assert {p.dtype for p in learner_agent.parameters()} == {torch.float32}
    assert {p.dtype for p in actor_agent.parameters()} == {torch.bfloat16}
    actor_agent.load_state_dict(learner_agent.state_dict())  # what an actor does with the learner's parameters
    inputs = _inputs(observation_shape, 3)
    state = learner_agent.initial_state(B)
    with torch.no_grad():
        expected, expected_state = learner_agent(*inputs, state)
        got, got_state = actor_agent(*inputs, state)
    assert got.policy_logits.dtype == got.baseline.dtype == torch.float32
    assert all(s.dtype == torch.float32 for s in got_state) and len(got_state) == len(expected_state)
    # bfloat16 keeps 8 bits of mantissa: logits agree to a few hundredths, not exactly.
    torch.testing.assert_close(got.policy_logits, expected.policy_logits, rtol=0.05, atol=0.05)
    assert not torch.equal(got.policy_logits, expected.policy_logits)
    for g, e in zip(got_state, expected_state):
        torch.testing.assert_close(g, e, rtol=0.05, atol=0.05)


def test_acting_agents_are_float32_by_default():
    agent = make_agent(Config(network="mlp"), (4,), 2, acting=True)
    assert {p.dtype for p in agent.parameters()} == {torch.float32}


# ---------------------------------------------------------------------------
# Initialisation as the original's (nets.init).

# A normal truncated at 2 stddev keeps 0.8796 of its stddev (TF1's truncated_normal_initializer).
TRUNCATED_STD = 0.8796


def _layers(agent, kinds):
    return [(name, m) for name, m in agent.named_modules() if isinstance(m, kinds)]


@pytest.mark.parametrize("network,observation_shape", [("mlp", (64,)), ("shallow", IMAGE), ("deep", IMAGE)])
def test_convolutions_and_linears_start_truncated_normal_with_zero_biases(network, observation_shape):
    agent = Agent(observation_shape, 6, network=network, lstm_size=256, instruction_length=8)
    layers = _layers(agent, (nn.Linear, nn.Conv2d))
    assert len(layers) >= 3
    for name, layer in layers:
        stddev = 1.0 / layer.weight[0].numel() ** 0.5  # 1/sqrt(fan_in)
        w = layer.weight.detach()
        assert w.abs().max() <= 2 * stddev + 1e-7, name  # truncated at 2 stddev
        assert torch.count_nonzero(layer.bias) == 0, name
        if w.numel() >= 4000:  # enough samples: the spread within 5% of the truncated normal's
            assert abs(w.std().item() / (TRUNCATED_STD * stddev) - 1) < 0.05, (name, w.std().item(), stddev)
            assert abs(w.mean().item()) < 0.05 * stddev, name
            assert w.abs().max() > 1.9 * stddev, name  # reaches the cut: not a narrower distribution


def test_torch_default_would_fail_the_spread_check():
    # Guards the test above: PyTorch's default (uniform, stddev 1/sqrt(3 fan_in)) is ~35% narrower.
    layer = nn.Linear(256, 256)
    assert layer.weight.std().item() * 256**0.5 < 0.7 * TRUNCATED_STD


@pytest.mark.parametrize("lstm_of", [lambda a: a.core, lambda a: a.instruction.lstm])
def test_lstms_start_as_lstm_block_cell_with_forget_bias_one(lstm_of):
    agent = Agent((64,), 6, network="mlp", lstm_size=256, instruction_length=8)
    lstm = lstm_of(agent)
    H = lstm.hidden_size
    params = dict(lstm.named_parameters())
    w_ih, w_hh, b_ih, b_hh = (
        next(v for k, v in params.items() if k.startswith(prefix))
        for prefix in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")
    )
    # One glorot-uniform kernel [input + H, 4H], split by torch into weight_ih and weight_hh.
    limit = (6.0 / (w_ih.shape[1] + H + 4 * H)) ** 0.5
    kernel = torch.cat([w_ih, w_hh], dim=1).detach()
    assert kernel.abs().max() <= limit
    assert abs(kernel.std().item() / (limit / 3**0.5) - 1) < 0.05
    # One bias: zero but for the forget gate's +1 (torch's gate order i, f, g, o); the second frozen at 0.
    expected = torch.zeros(4 * H)
    expected[H : 2 * H] = 1.0
    assert torch.equal(b_ih.detach(), expected) and b_ih.requires_grad
    assert torch.count_nonzero(b_hh) == 0 and not b_hh.requires_grad


def test_forget_gate_keeps_sigmoid_one_of_the_cell_at_zero_input():
    # With zero input and hidden state, c' = sigmoid(b_f) c + sigmoid(b_i) tanh(b_g) = sigmoid(1) c.
    agent = Agent((4,), 2, network="mlp", lstm_size=16)
    x = torch.zeros(3, agent.core.input_size)
    with torch.no_grad():
        _, c = agent.core(x, (torch.zeros(3, 16), torch.ones(3, 16)))
    torch.testing.assert_close(c, torch.full((3, 16), torch.sigmoid(torch.tensor(1.0)).item()))


def test_the_frozen_lstm_bias_stays_zero_through_training():
    from impala.optim import RMSPropTF

    agent = Agent((4,), 2, network="mlp", lstm_size=16)
    optimizer = RMSPropTF(agent.parameters(), lr=0.1)
    output, _ = agent(*_inputs((4,), 2))
    (output.policy_logits.sum() + output.baseline.sum()).backward()
    before = agent.core.bias_ih.detach().clone()
    optimizer.step()
    assert torch.count_nonzero(agent.core.bias_hh) == 0
    assert not torch.equal(agent.core.bias_ih, before)  # the one bias trains


def test_word_embedding_starts_standard_normal_with_a_zero_padding_row():
    agent = Agent((4,), 2, network="mlp", instruction_length=8)
    weight = agent.instruction.embedding.weight.detach()
    assert torch.count_nonzero(weight[0]) == 0
    assert abs(weight[1:].std().item() - 1.0) < 0.05
