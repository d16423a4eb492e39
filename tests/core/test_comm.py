"""Tests of fedtalora.comm.DownlinkLedger: catch-up bytes per client, factored vs dense per layer."""

from __future__ import annotations

from fedtalora.core.comm import DownlinkLedger

# Dense size of each adapted layer's residual. "k" never gets a residual.
DENSE = {"q": 1000, "v": 500, "k": 800}
# Factored bytes of each round's residual, per layer ("k" absent or 0: no residual there).
ROUNDS = [
    {"q": 100, "v": 150},
    {"q": 200, "v": 150, "k": 0},
    {"q": 250, "v": 200},
    {"q": 300, "v": 250},
    {"q": 350, "v": 100},
]


def run_round(ledger: DownlinkLedger, r: int, clients: list[int]) -> dict[int, int]:
    """One round as the engine runs it: each sampled client catches up and syncs, then the residual is recorded."""
    paid = {}
    for c in clients:
        paid[c] = ledger.catch_up_bytes(c)
        ledger.sync(c)
    ledger.record_round(ROUNDS[r])
    return paid


def test_client_in_every_round_pays_only_the_last_residual() -> None:
    """A client synchronised last round receives only that round's factors (each smaller than dense)."""
    # Prepare
    ledger = DownlinkLedger(DENSE)

    # Execute
    paid = [run_round(ledger, r, [0])[0] for r in range(len(ROUNDS))]
    after = ledger.catch_up_bytes(0)

    # Assert
    assert paid == [0, 100 + 150, 200 + 150, 250 + 200, 300 + 250]
    assert after == 350 + 100


def test_client_missing_rounds_pays_min_of_factored_sum_and_dense_per_layer() -> None:
    """After missing rounds 1-3: q pays the sum of its factors (750 < 1000), v pays dense (600 > 500)."""
    # Prepare: client 1 takes part in round 1 (it then holds the base without round 1's residual),
    # skips rounds 2 and 3, and comes back in round 4 owing the residuals of rounds 1, 2 and 3.
    ledger = DownlinkLedger(DENSE)
    run_round(ledger, 0, [0])
    assert run_round(ledger, 1, [0, 1])[1] == 100 + 150, "new in round 1: owes round 0"
    run_round(ledger, 2, [0])
    run_round(ledger, 3, [0])

    # Execute
    paid = ledger.catch_up_bytes(1)

    # Assert
    # q: 200 + 250 + 300 = 750 <= 1000 -> 750 (factored); v: 150 + 200 + 250 = 600 > 500 -> 500 (dense); k: 0.
    assert paid == 750 + 500
    # Not the min over the total (min(1350, 2300) = 1350), and not 3x the last round (1650).
    assert paid != 1350 and paid != 3 * (300 + 250)
    assert ledger.catch_up_bytes(1) == paid, "asking does not sync"
    assert ledger.catch_up_bytes(0) == 300 + 250


def test_brand_new_client_pays_from_round_zero() -> None:
    """A client never seen before receives every residual since round 0 (capped at dense per layer)."""
    # Prepare
    ledger = DownlinkLedger(DENSE)
    for r in range(4):
        run_round(ledger, r, [0])

    # Execute
    paid = run_round(ledger, 4, [7, 0])

    # Assert
    # q: 100 + 200 + 250 + 300 = 850 <= 1000; v: 150 + 150 + 200 + 250 = 750 > 500 -> 500.
    assert paid[7] == 850 + 500
    assert paid[0] == 300 + 250
    # Both synced at round 4: now both owe exactly round 4.
    assert ledger.catch_up_bytes(7) == ledger.catch_up_bytes(0) == 350 + 100


def test_new_client_before_any_round_pays_nothing() -> None:
    """Before any residual exists there is nothing to catch up on."""
    ledger = DownlinkLedger(DENSE)
    assert ledger.catch_up_bytes(3) == 0
    assert ledger.rounds == 0


def test_layers_without_residual_cost_nothing() -> None:
    """A layer whose factored size is 0 (or missing) in every round adds nothing, even when dense is large."""
    # Prepare
    with_k = DownlinkLedger(DENSE)
    without_k = DownlinkLedger({"q": 1000, "v": 500})
    only_k = DownlinkLedger({"k": 800})

    # Execute
    for r in range(len(ROUNDS)):
        for ledger in (with_k, without_k, only_k):
            ledger.record_round(ROUNDS[r])

    # Assert
    assert with_k.catch_up_bytes(5) == without_k.catch_up_bytes(5) == 1000 + 500
    assert only_k.catch_up_bytes(5) == 0


def test_rounds_counts_recorded_rounds() -> None:
    """`rounds` is the number of record_round calls; sync stamps a client with it."""
    # Prepare
    ledger = DownlinkLedger(DENSE)

    # Execute / Assert
    for r in range(len(ROUNDS)):
        assert ledger.rounds == r
        ledger.record_round(ROUNDS[r])
    assert ledger.rounds == len(ROUNDS)
    ledger.sync(2)
    assert ledger.last_sync[2] == len(ROUNDS)
    assert ledger.catch_up_bytes(2) == 0
    assert ledger.cumulative["q"] == [0, 100, 300, 550, 850, 1200]


def test_encodings_dense_and_factored_bound_the_best() -> None:
    """``dense`` always sends the accumulated delta of a layer with a missed residual, ``factored`` always its
    factors; ``best`` is their per-layer minimum, so it is at most either total."""
    # Prepare: the scenario of the min-per-layer test (client 1 owes rounds 1-3).
    ledger = DownlinkLedger(DENSE)
    run_round(ledger, 0, [0])
    run_round(ledger, 1, [0, 1])
    run_round(ledger, 2, [0])
    run_round(ledger, 3, [0])

    # Execute
    got = {e: ledger.catch_up_bytes(1, e) for e in ("best", "dense", "factored")}

    # Assert: q 750 factored / 1000 dense, v 600 factored / 500 dense, k never has a residual.
    assert got == {"best": 750 + 500, "dense": 1000 + 500, "factored": 750 + 600}
    assert got["best"] <= min(got["dense"], got["factored"])
    assert ledger.catch_up_bytes(0, "dense") == 1000 + 500, "one missed round already costs the whole dense delta"


def test_unknown_encoding_raises() -> None:
    import pytest

    with pytest.raises(ValueError, match="encoding"):
        DownlinkLedger(DENSE).catch_up_bytes(0, "zip")


def test_one_update_per_round_has_no_residual_to_send(tiny_overrides: list[str]) -> None:
    """With a single aggregated update the exact residual is zero (inner dimension (K-1) r = 0): no residual
    bytes in either encoding, and the downlink is the global state alone."""
    from fedtalora.api import run
    from fedtalora.config import resolve
    from fedtalora.core.aggregation import state_nbytes

    res = run(resolve("tiny-vit", [*tiny_overrides, "fed.clients_per_round=1", "scenario.num_tasks=1"]))
    m = res.metrics
    state = state_nbytes(res.model.trainable_state(list(res.model.lora_parameters()) + ["head.weight", "head.bias"]))
    for r in m["rounds"]:
        assert r["residual_bytes_factored"] == r["residual_bytes_dense"] == 0, r
        assert r["downlink_bytes"] == r["downlink_bytes_dense"] == state
    assert m["max_aggregation_error"] == 0.0
