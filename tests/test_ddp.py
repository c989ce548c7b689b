"""DistributedDataParallel over the wrapped MLP: two CPU processes, gloo, loopback only. Each
rank trains on its own data; DDP registers only the adapters, frozen weights get no gradient and
never move, the synchronised gradients are the ranks' average, the replicas stay identical."""

import os
import socket
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

REPO = Path(__file__).resolve().parents[1]
WORLD = 2
STEPS = 3


# gloo over the loopback interface; the rendezvous is a file, so no port is raced for
LOOPBACK = next((name for _, name in socket.if_nameindex() if name.startswith("lo")), None)


def gather(t: torch.Tensor) -> list[torch.Tensor]:
    out = [torch.empty_like(t) for _ in range(WORLD)]
    dist.all_gather(out, t.contiguous())
    return out


def worker(rank: int, rendezvous: str, class_name: str) -> None:
    torch.set_num_threads(1)
    os.environ["GLOO_SOCKET_IFNAME"] = LOOPBACK
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=WORLD)
    try:
        check_replica(rank, class_name)
    finally:
        dist.destroy_process_group()
    # Passed: skip interpreter shutdown, where a gloo thread still dropping a finished
    # all-reduce takes the GIL and aborts the process (SIGABRT). A failure raised above.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def check_replica(rank: int, class_name: str) -> None:
    from torch.nn.parallel import DistributedDataParallel as DDP

    import helpers
    from dora_tutorial.notebook import import_notebook_definitions

    nb = import_notebook_definitions(REPO / "DoRA.ipynb")
    model = helpers.add_adapters(
        helpers.make_mlp((784, 64, 10), seed=0), getattr(nb, class_name), 4, 8
    )
    torch.manual_seed(100 + rank)  # another adapter init per rank: DDP must broadcast it
    adapter = {n: p for n, p in model.named_parameters() if p.requires_grad}
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if n not in adapter}
    with torch.no_grad():
        for p in adapter.values():
            p.normal_()
    ddp = DDP(model)
    assert {id(p) for p in ddp.parameters() if p.requires_grad} == {id(p) for p in adapter.values()}
    optimizer = torch.optim.SGD(adapter.values(), lr=0.05)
    gen = torch.Generator().manual_seed(rank)  # each rank its own data
    for _ in range(3):
        x, y = torch.randn(16, 784, generator=gen), torch.randint(0, 10, (16,), generator=gen)
        model.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), y).backward()  # this rank alone
        local = {n: p.grad.clone() for n, p in adapter.items()}
        model.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(ddp(x), y).backward()
        for n, p in model.named_parameters():
            if n not in adapter:
                assert p.grad is None, f"frozen {n} got a gradient"
                continue
            expected = torch.stack(gather(local[n])).mean(0)
            torch.testing.assert_close(p.grad, expected, rtol=1e-5, atol=1e-6, msg=n)
            assert not torch.allclose(local[n], expected)  # the ranks really differ
        optimizer.step()
    for n, p in model.named_parameters():
        assert torch.equal(*gather(p.detach())), f"replicas differ in {n}"
        assert n in adapter or torch.equal(p, frozen[n]), f"frozen {n} changed"


@pytest.mark.multiprocess
@pytest.mark.slow
@pytest.mark.skipif(LOOPBACK is None, reason="no loopback network interface")
def test_ddp_syncs_only_adapters_and_replicas_agree(tmp_path):
    mp.spawn(worker, args=(str(tmp_path / "rendezvous"), "DoRALinear"), nprocs=WORLD, join=True)
