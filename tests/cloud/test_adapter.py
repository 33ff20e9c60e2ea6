"""CEMA's cloud half: the teacher adapts, the student's norm affine parameters are distilled."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

from edgekit.cloud.adapter import CemaConfig, DeviceAdapter, ReplayBuffer, norm_parameter_names

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tests.cloud.tinymodels import student, teacher  # noqa: E402

torch.set_num_threads(1)  # tiny convs: one thread beats two contended ones


def test_norm_parameter_names() -> None:
    names = norm_parameter_names(student().module)
    assert names == {
        "features.1.weight": "scale",
        "features.1.bias": "bias",
        "features.5.weight": "scale",
        "features.5.bias": "bias",
    }
    with_stats = norm_parameter_names(student().module, statistics=True)
    assert "features.1.running_mean" in with_stats and "features.5.running_var" in with_stats


def test_step_moves_only_norm_affine_parameters_and_student_towards_teacher() -> None:
    s, t = student().module, teacher().module
    adapter = DeviceAdapter(t, s, CemaConfig(student_lr=1e-2))
    frozen = {k: v.clone() for k, v in adapter.student.state_dict().items() if "head" in k or "features.0" in k}
    before = adapter.student_arrays()
    x = np.random.default_rng(0).random((32, 1, 28, 28), dtype=np.float32)
    replay = ReplayBuffer(100)
    replay.add(x)

    def kl() -> float:
        with torch.no_grad():
            tx = adapter.teacher(torch.from_numpy(x)).log_softmax(1)
            sx = adapter.student(torch.from_numpy(x)).log_softmax(1)
        return float((tx.exp() * (tx - sx)).sum(1).mean())

    start = kl()
    for _ in range(15):
        metrics = adapter.step(x, replay.sample)
    assert np.isfinite(metrics["student_loss"])
    after = adapter.student_arrays()
    assert set(after) == set(before)
    assert any(not np.allclose(after[k], before[k]) for k in before)
    for name, value in adapter.student.state_dict().items():
        if name in frozen:
            assert torch.equal(value, frozen[name]), name  # conv and head weights never move
    assert kl() < start


def test_replay_step_distils_from_the_buffer_alone() -> None:
    adapter = DeviceAdapter(teacher().module, student().module, CemaConfig(student_lr=1e-2))
    replay = ReplayBuffer(100)
    assert np.isnan(adapter.replay_step(replay.sample)["student_loss"])  # nothing buffered: no step
    assert adapter.steps == 0
    replay.add(np.random.default_rng(2).random((64, 1, 28, 28), dtype=np.float32))
    before = adapter.student_arrays()
    teacher_before = {k: v.clone() for k, v in adapter.teacher.state_dict().items()}
    assert np.isfinite(adapter.replay_step(replay.sample)["student_loss"])
    assert any(not np.allclose(adapter.student_arrays()[k], v) for k, v in before.items())
    for name, value in adapter.teacher.state_dict().items():  # the teacher adapts on new samples only
        if "running" not in name and "num_batches" not in name:
            assert torch.equal(value, teacher_before[name]), name


def test_state_roundtrip_restores_a_device() -> None:
    s, t = student().module, teacher().module
    adapter = DeviceAdapter(t, s, CemaConfig(student_lr=1e-2))
    x = np.random.default_rng(1).random((16, 1, 28, 28), dtype=np.float32)
    for _ in range(3):
        adapter.step(x, lambda n: x[:n])
    restored = DeviceAdapter(t, s, CemaConfig())
    restored.load_state(adapter.state())
    for name, value in adapter.student_arrays().items():
        np.testing.assert_array_equal(restored.student_arrays()[name], value)


def test_replay_buffer_is_fifo_and_bounded() -> None:
    buffer = ReplayBuffer(5)
    buffer.add(np.arange(8, dtype=np.float32).reshape(8, 1))
    assert len(buffer.items) == 5 and buffer.items[0][0] == 3
    assert buffer.sample(3).shape == (3, 1)
