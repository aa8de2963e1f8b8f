"""DDP with the gloo backend in 2 CPU processes: masks identical across ranks (broadcast from rank 0),
gradients averaged, nothing densified."""
import os
import socket
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _model(seed):
    import sparsefast
    torch.manual_seed(seed)  # different per rank on purpose: DDP must make them identical
    return torch.nn.Sequential(sparsefast.SparseLinear(16, 32, sparsity=0.8, backend="reference"), torch.nn.ReLU(),
                               sparsefast.SparseLinear(32, 4, pattern="2:4", backend="reference"))


def _worker(rank, world, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model = torch.nn.parallel.DistributedDataParallel(_model(100 + rank))
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        g = torch.Generator().manual_seed(7)
        xs, ys = torch.randn(3, 8, 16, generator=g), torch.randn(3, 8, 4, generator=g)
        for step in range(3):
            x, y = xs[step, rank * 4:(rank + 1) * 4], ys[step, rank * 4:(rank + 1) * 4]
            torch.nn.functional.mse_loss(model(x), y).backward()
            opt.step()
            opt.zero_grad()
        torch.save({k: v.clone() for k, v in model.module.state_dict().items()}, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()



def test_ddp_gloo_two_processes():
    with tempfile.TemporaryDirectory() as d:
        mp.start_processes(_worker, args=(2, _free_port(), d), nprocs=2, join=True, start_method="spawn")
        s0, s1 = torch.load(f"{d}/rank0.pt"), torch.load(f"{d}/rank1.pt")
    for k in s0:
        assert torch.equal(s0[k], s1[k]), f"{k} differs across ranks"
    # single-process reference: rank 0's initial model, full batch (mean of the two halves' grads)
    model = _model(100)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    g = torch.Generator().manual_seed(7)
    xs, ys = torch.randn(3, 8, 16, generator=g), torch.randn(3, 8, 4, generator=g)
    for step in range(3):
        torch.nn.functional.mse_loss(model(xs[step]), ys[step]).backward()
        opt.step()
        opt.zero_grad()
    for k, v in model.state_dict().items():
        torch.testing.assert_close(s0[k], v, atol=1e-5, rtol=1e-5, msg=k)
    for i in (0, 2):
        assert s0[f"{i}.mask"].dtype == torch.bool
        assert (s0[f"{i}.weight"][~s0[f"{i}.mask"]] == 0).all()
        assert s0[f"{i}.mask"].float().mean() < 0.6  # still sparse
