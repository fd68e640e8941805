"""Plain reference implementations shared by several test files (independent of the package)."""
import torch


def official_sinkhorn(scores, beta, epsilon=0.05, iterations=3):
    """The official ProtoOT formula as loops, in float64: Q = exp(S/eps)^T, Q /= sum(Q);
    each round scales prototype rows to beta, then sample columns to 1/N; returns N Q^T (float64)."""
    q = torch.exp(scores.double() / epsilon).T
    q /= q.sum()
    num_prototypes, num_samples = q.shape
    for _ in range(iterations):
        for k in range(num_prototypes):
            q[k] *= beta[k].double() / q[k].sum()
        for n in range(num_samples):
            q[:, n] /= q[:, n].sum() * num_samples
    return num_samples * q.T


#: The memory buffers Python reads every step, which stay on the CPU wherever the memory goes.
MEMORY_HOST_BUFFERS = {"epoch", "refresh_countdown", "potentials_valid"}


def assert_memory_on(memory, device):
    """Every buffer of a PrototypeMemory on ``device``'s type but the step bookkeeping, on the CPU."""
    for name, buffer in memory.named_buffers():
        expected = "cpu" if name.rsplit(".", 1)[-1] in MEMORY_HOST_BUFFERS else torch.device(device).type
        assert buffer.device.type == expected, f"{name} is on {buffer.device}, expected {expected}"
