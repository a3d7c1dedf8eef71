"""Remote measurement through TVM RPC, on a server the test starts on loopback."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from lightning_relief.deploy import RemoteDevice, compile_for_target, local_rpc_server, measure_latency
from lightning_relief.deploy.errors import DeployError


@pytest.mark.slow
def test_run_and_time_over_loopback_rpc(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 10)).eval()
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        expected = model(x).numpy()
    with local_rpc_server(timeout_s=240) as remote:
        assert remote.host == "127.0.0.1"
        compiled = compile_for_target(model, x, remote.target)
        np.testing.assert_allclose(remote.run(compiled, x)[0], expected, atol=1e-5, rtol=1e-5)
        result = measure_latency(model, x, remote=remote, repeat=3, number=3, cache_dir=tmp_path)
        assert not result.cached and result.median_ms > 0 and len(result.samples_ms) == 3
        # the cache key includes the remote device: the same model measured locally is a new entry
        assert not measure_latency(model, x, repeat=2, number=2, cache_dir=tmp_path).cached
        assert measure_latency(model, x, remote=remote, repeat=3, number=3, cache_dir=tmp_path).cached
    with pytest.raises(DeployError, match="cannot reach the RPC server@127.0.0.1"):
        remote.connect(retries=1)  # the server stopped with the block


def test_remote_device_validates_arguments():
    with pytest.raises(ValueError, match="port must be"):
        RemoteDevice("127.0.0.1", 0)
    with pytest.raises(ValueError, match="not valid JSON"):
        RemoteDevice("127.0.0.1", 9090, target="{bad")
    with pytest.raises(ValueError, match="loopback only"):
        with local_rpc_server(host="0.0.0.0"):
            pass
