"""LayerTimer: durations of start/stop pairs in order."""

import time

import pytest
import torch

from server.engine.timing import LayerTimer


def test_cpu_pairs_in_order():
    timer = LayerTimer(torch.device("cpu"))
    for pause in (0.002, 0.02):
        timer.start()
        time.sleep(pause)
        timer.stop()
    short, long_ = timer.seconds()
    assert 0.002 <= short < long_ and long_ >= 0.02


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_events():
    timer = LayerTimer(torch.device("cuda"))
    a = torch.randn(2048, 2048, device="cuda")
    timer.start()
    for _ in range(10):
        a = a @ a / 2048
    timer.stop()
    (t,) = timer.seconds()
    assert t > 0
