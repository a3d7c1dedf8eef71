"""Photonic layers under a process group (2 gloo ranks, no callback): every rank draws its own noise."""

from __future__ import annotations

import multiprocessing

import torch
import torch.distributed as dist
import torch.nn.functional as F

from lightning_relief.nn.photonic import PhotonicLinear
from lightning_relief.photonic import sample_logits


def _layers() -> tuple[PhotonicLinear, PhotonicLinear, torch.Tensor]:
    torch.manual_seed(0)
    local = PhotonicLinear(8, 4, bandwidth_ratio=0.05)
    exact = PhotonicLinear(8, 4, bandwidth_ratio=0.05, sampling="exact", correlation=0.5)
    return local, exact, torch.randn(3, 8)


def _draw_on_rank(rank: int, world: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        local, exact, x = _layers()  # seeded alike, as seed_everything does on every rank
        with torch.no_grad():
            record = {
                "local": local(x),
                "intensities": exact.sample_intensities(3),
                "after": torch.rand(4),  # the global generator once the photonic draws are done
                "seeded": sample_logits(local, x, 2, seed=7),
            }
        torch.save(record, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_each_rank_draws_its_own_block_of_the_shared_global_stream(tmp_path):
    world = 2
    # forkserver: the ranks fork from a clean server (plain fork is unsafe once this process ran threads)
    multiprocessing.set_forkserver_preload(["torch", "lightning_relief.photonic.physics"])
    torch.multiprocessing.start_processes(
        _draw_on_rank, args=(world, str(tmp_path / "init"), str(tmp_path)), nprocs=world, start_method="forkserver"
    )
    records = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]

    # the reference, by hand in one process: the global stream's blocks in turn, rank r keeps block r
    local, exact, x = _layers()
    with torch.no_grad():
        w_mean, w_var = local.weight_moments()
        mean, std = F.linear(x, w_mean, local.bias), F.linear(x * x, w_var.expand(local.weight_shape)).sqrt()
        local_blocks = [torch.randn(3, 4) for _ in range(world)]
        chain = [torch.randn(3, 2, 4, 8) for _ in range(world)]
        after = torch.rand(4)
        seeded = sample_logits(local, x, 2, seed=7)
        amp, spread = exact.amplitude, exact.relative_spread
        for rank, record in enumerate(records):
            torch.testing.assert_close(record["local"], mean + std * local_blocks[rank], rtol=0, atol=1e-6)
            z = chain[rank].clone()
            for k in (1, 2):  # AR(1) with correlation 0.5
                z[k] = 0.5 * z[k - 1] + (1 - 0.25) ** 0.5 * z[k]
            torch.testing.assert_close(record["intensities"], (amp * (1 + spread * z)).clamp_min(0), rtol=0, atol=1e-6)
            torch.testing.assert_close(record["after"], after, rtol=0, atol=0)  # ranks stay in step
            torch.testing.assert_close(record["seeded"], seeded, rtol=0, atol=0)  # a caller's generator is kept
    assert not torch.equal(records[0]["local"], records[1]["local"])
