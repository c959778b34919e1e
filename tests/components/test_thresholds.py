"""SelfAdaptiveThreshold: update order, hand values, fixed mode, precision, checkpoints and DDP sync."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ssl_lightning.components.thresholds import FixedThreshold, SelfAdaptiveThreshold

T6_PROBS = torch.tensor([[0.7, 0.2, 0.1], [0.2, 0.5, 0.3], [0.4, 0.35, 0.25]])


def test_t6_state_is_updated_before_the_mask() -> None:
    sat = SelfAdaptiveThreshold(3, momentum=0.5)
    labels, mask = sat(T6_PROBS)
    assert sat.global_threshold.item() == pytest.approx(0.433333, abs=1e-6)
    torch.testing.assert_close(
        sat.class_marginal, torch.tensor([0.383333, 0.341667, 0.275]), atol=1e-6, rtol=0
    )
    torch.testing.assert_close(
        sat.class_thresholds(), torch.tensor([0.433333, 0.386232, 0.310870]), atol=1e-6, rtol=0
    )
    assert labels.tolist() == [0, 1, 0]
    # The pre-update state (all thresholds 1/3) would accept the third sample too.
    assert mask.tolist() == [1.0, 1.0, 0.0]
    assert mask.dtype == torch.float32 and labels.dtype == torch.long


def test_t6_slow_momentum() -> None:
    sat = SelfAdaptiveThreshold(3, momentum=0.999)
    _, mask = sat(T6_PROBS)
    assert sat.global_threshold.item() == pytest.approx(0.333533, abs=1e-6)
    assert mask.tolist() == [1.0, 1.0, 1.0]


def test_t7_init_and_state_dict() -> None:
    sat = SelfAdaptiveThreshold(10)
    assert sat.global_threshold.shape == ()
    assert sat.global_threshold.item() == pytest.approx(0.1)
    torch.testing.assert_close(sat.class_marginal, torch.full((10,), 0.1))
    state = sat.state_dict()
    assert set(state) == {"global_threshold", "class_marginal"}
    assert all(v.dtype == torch.float32 for v in state.values())


def test_state_dict_round_trip_reproduces_the_next_step() -> None:
    generator = torch.Generator().manual_seed(0)
    batches = [torch.randn(16, 5, generator=generator).mul(3).softmax(dim=1) for _ in range(4)]
    original = SelfAdaptiveThreshold(5, momentum=0.9)
    for probs in batches[:3]:
        original(probs)
    restored = SelfAdaptiveThreshold(5, momentum=0.9)
    restored.load_state_dict(original.state_dict())
    labels_a, mask_a = original(batches[3])
    labels_b, mask_b = restored(batches[3])
    assert torch.equal(labels_a, labels_b) and torch.equal(mask_a, mask_b)
    assert torch.equal(original.global_threshold, restored.global_threshold)
    assert torch.equal(original.class_marginal, restored.class_marginal)


def test_t8_fixed_mode_uses_ge_and_still_tracks_the_state() -> None:
    probs = torch.tensor([[0.95, 0.05, 0.0], [0.9499, 0.0501, 0.0], [0.2, 0.3, 0.5], [0.01, 0.98, 0.01]])
    fixed = SelfAdaptiveThreshold(3, momentum=0.5, mode="fixed", fixed_value=0.95)
    sat = SelfAdaptiveThreshold(3, momentum=0.5, mode="sat")
    for _ in range(3):
        labels, mask = fixed(probs)
        sat(probs)
        assert mask.tolist() == [1.0, 0.0, 0.0, 1.0]
        assert labels.tolist() == [0, 0, 2, 1]
        assert torch.equal(fixed.global_threshold, sat.global_threshold)
        assert torch.equal(fixed.class_marginal, sat.class_marginal)
    # Same rule as FixMatch's stateless threshold.
    assert torch.equal(FixedThreshold(0.95)(probs)[1], mask)
    assert fixed.global_threshold.item() != pytest.approx(1 / 3)


def test_t19_bf16_autocast_keeps_fp32_state_that_moves() -> None:
    generator = torch.Generator().manual_seed(1)
    sat = SelfAdaptiveThreshold(4, momentum=0.999)
    expected = torch.tensor(0.25, dtype=torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for _ in range(100):
            logits = torch.randn(32, 4, generator=generator) * 4
            probs = torch.softmax(logits, dim=1).to(torch.bfloat16)
            _, mask = sat(probs)
            expected = 0.999 * expected + 0.001 * probs.double().amax(dim=1).mean()
    assert sat.global_threshold.dtype == torch.float32 and sat.class_marginal.dtype == torch.float32
    assert mask.dtype == torch.float32
    # In bf16, 0.999 rounds to 1.0 and τ would stay at 0.25.
    assert sat.global_threshold.item() - 0.25 > 0.02
    assert sat.global_threshold.item() == pytest.approx(expected.item(), abs=1e-5)
    assert sat.class_marginal.sum().item() == pytest.approx(1.0, abs=1e-5)


def test_non_fp32_state_raises_a_clear_error() -> None:
    sat = SelfAdaptiveThreshold(3).to(torch.bfloat16)
    with pytest.raises(TypeError, match="float32"):
        sat(T6_PROBS)


def test_invalid_arguments() -> None:
    with pytest.raises(ValueError):
        SelfAdaptiveThreshold(3, mode="flex")
    with pytest.raises(ValueError):
        SelfAdaptiveThreshold(3, momentum=1.0)
    with pytest.raises(ValueError):
        SelfAdaptiveThreshold(3)(torch.rand(4, 5))


# --- 2-process gloo: the synchronised state equals one process on the concatenated global batch ---

WORLD_SIZE, STEPS, GLOBAL_N, CLASSES, MOMENTUM = 2, 5, 12, 4, 0.7


def _global_batches() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(123)
    # Skewed logits so classes, confidences and therefore thresholds differ between the two halves.
    return [
        (
            torch.randn(GLOBAL_N, CLASSES, generator=generator) * 3 + torch.arange(CLASSES) * (step % 2)
        ).softmax(1)
        for step in range(STEPS)
    ]


def _ddp_worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD_SIZE)
    try:
        calls = []
        real_all_reduce = dist.all_reduce

        def counting_all_reduce(tensor: torch.Tensor, *args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            calls.append(tensor.shape)
            return real_all_reduce(tensor, *args, **kwargs)

        dist.all_reduce = counting_all_reduce
        sat = SelfAdaptiveThreshold(CLASSES, momentum=MOMENTUM)
        local_n = GLOBAL_N // WORLD_SIZE
        records = []
        for probs in _global_batches():
            labels, mask = sat(probs[rank * local_n : (rank + 1) * local_n])
            records.append(
                {
                    "tau": sat.global_threshold.clone(),
                    "marginal": sat.class_marginal.clone(),
                    "labels": labels,
                    "mask": mask,
                }
            )
        torch.save({"records": records, "calls": calls}, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.ddp
@pytest.mark.timeout(120)
def test_ddp_sync_equals_single_process_on_the_global_batch(tmp_path: Path) -> None:
    mp.spawn(_ddp_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD_SIZE, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD_SIZE)]
    for result in ranks:
        # One packed all-reduce per step: [Σ c, Σ q (C values), count].
        assert result["calls"] == [torch.Size([CLASSES + 2])] * STEPS

    single = SelfAdaptiveThreshold(CLASSES, momentum=MOMENTUM)
    masks_seen = set()
    for step, probs in enumerate(_global_batches()):
        labels, mask = single(probs)
        r0, r1 = (result["records"][step] for result in ranks)
        # Every rank holds bit-identical state after the all-reduce.
        assert torch.equal(r0["tau"], r1["tau"]) and torch.equal(r0["marginal"], r1["marginal"])
        torch.testing.assert_close(r0["tau"], single.global_threshold, atol=1e-6, rtol=0)
        torch.testing.assert_close(r0["marginal"], single.class_marginal, atol=1e-6, rtol=0)
        assert torch.equal(torch.cat([r0["labels"], r1["labels"]]), labels)
        assert torch.equal(torch.cat([r0["mask"], r1["mask"]]), mask)
        masks_seen.add(tuple(mask.tolist()))
    # The test is only meaningful if some samples were rejected along the way.
    assert any(0.0 in m for m in masks_seen)

    # Unsynchronised per-rank state would differ from the global one on these skewed halves.
    local = SelfAdaptiveThreshold(CLASSES, momentum=MOMENTUM, sync=False)
    for probs in _global_batches():
        local(probs[: GLOBAL_N // WORLD_SIZE])
    assert not torch.allclose(local.class_marginal, single.class_marginal, atol=1e-4)
