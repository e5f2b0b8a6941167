"""Every test starts from the same global torch state, whatever ran before it."""

import pytest
import torch


@pytest.fixture(autouse=True)
def isolated_torch_state():
    """Restores, after each test, what torch keeps process-wide and a test or a benchmark's
    ``main`` may change: thread count, default dtype, grad mode, deterministic algorithms,
    anomaly detection and the CPU random stream."""
    threads = torch.get_num_threads()
    dtype = torch.get_default_dtype()
    grad = torch.is_grad_enabled()
    deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    anomaly = torch.is_anomaly_enabled()
    rng = torch.get_rng_state()
    yield
    torch.set_num_threads(threads)
    torch.set_default_dtype(dtype)
    torch.set_grad_enabled(grad)
    torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
    torch.set_anomaly_enabled(anomaly)
    torch.set_rng_state(rng)
