"""reinseg.ema: the average mmengine's EMAHook keeps (copies before ``begin``, then
``average += momentum (weights - average)``), checked against that recurrence in float64."""

import pytest
import torch

from reinseg.config import Config, ConfigError, TrainConfig, check_values
from reinseg.ema import ExponentialAverage


def test_the_average_copies_before_begin_then_follows_the_recurrence():
    weight = torch.nn.Parameter(torch.zeros(3))
    average = ExponentialAverage({"w": weight}, momentum=0.25, begin=3)
    expected = None
    for step in range(1, 9):
        with torch.no_grad():
            weight.copy_(torch.tensor([step, -2.0 * step, step**2], dtype=torch.float32))
        average.update(step)
        now = weight.detach().double()
        # Steps 1 and 2 copy; step 3 (the first from begin on) copies once more; then the recurrence.
        expected = now.clone() if step <= 3 else expected + 0.25 * (now - expected)
        assert average.started == (step >= 3)
        torch.testing.assert_close(average.average["w"].double(), expected, rtol=1e-6, atol=1e-6)
    assert not torch.equal(average.average["w"], weight.detach())  # it lags the weights


def test_swap_exchanges_the_weights_and_the_average_and_state_round_trips():
    weight = torch.nn.Parameter(torch.ones(2))
    average = ExponentialAverage({"w": weight}, momentum=0.5)
    average.update(1)
    with torch.no_grad():
        weight.fill_(3.0)
    average.update(2)  # average 2.0, weight 3.0
    average.swap()
    assert weight.tolist() == [2.0, 2.0] and average.average["w"].tolist() == [3.0, 3.0]
    average.swap()
    assert weight.tolist() == [3.0, 3.0]
    restored = ExponentialAverage({"w": weight}, momentum=0.5)
    restored.load_state_dict(average.state_dict())
    assert restored.started and restored.average["w"].tolist() == [2.0, 2.0]


@pytest.mark.parametrize("momentum, message", [(0.0, "greater than 0"), (1.5, r"in \(0, 1\]")])
def test_a_momentum_out_of_range_is_refused_naming_the_key(momentum, message):
    with pytest.raises(ConfigError, match=f"train.ema_momentum must be {message}"):
        check_values(Config(train=TrainConfig(ema_momentum=momentum)))
    with pytest.raises(ValueError, match="momentum"):
        ExponentialAverage({}, momentum=momentum)
