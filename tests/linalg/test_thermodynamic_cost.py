"""Cost model of thermodynamic K-FAC: the scaling of every term on its formula, crossover width (its CLI:
tests/bench/test_thermo_cost.py)."""

from __future__ import annotations

import pytest

from kronfac.linalg.thermodynamic import HardwareModel
from kronfac.linalg.thermodynamic.cost import CostModel, Layer, crossover_width, gnn_like, sweep, vit_like


def _square(n: int, tokens: int = 64) -> Layer:
    return Layer(n, n, tokens)


def test_digital_kfac_inversion_grows_cubically() -> None:
    model = CostModel()
    for n in (64, 512, 4096):
        assert model.layer_terms(_square(2 * n))["eigh"] == pytest.approx(8 * model.layer_terms(_square(n))["eigh"])
    # With few tokens the cubic terms dominate K-FAC's overhead over Adam: doubling n multiplies it by ~8.
    overhead = [
        model.layer_times(_square(n, tokens=1))["kfac"] - model.layer_times(_square(n, 1))["adam"]
        for n in (8192, 16384)
    ]
    assert overhead[1] / overhead[0] == pytest.approx(8.0, rel=0.01)


def test_thermodynamic_terms_follow_their_formulas() -> None:
    hw = HardwareModel(time_constant=2e-9, io_bandwidth=1e10, input_bits=6, output_bits=10)
    model = CostModel(condition_number=50.0, target_error=0.2, burn_in=3.0, beta=500.0, inverse_every=5, hardware=hw)
    n, tau, kappa, eps = 300, 2e-9, 50.0, 0.2
    terms = model.layer_terms(_square(n))
    inverse = tau * kappa * (3.0 + (n + 1) / eps**2)
    assert terms["thermo1_device"] == pytest.approx(2 * inverse / 5)
    assert terms["thermo1_io"] == pytest.approx(2 * n * (n + 1) / 2 * 16 / 1e10 / 5)
    solve = tau * (kappa * 3.0 + 6 * kappa**2 / (500.0 * eps**2))
    assert terms["thermo2_device"] == pytest.approx(2 * n * solve)
    assert terms["thermo2_io"] == pytest.approx((2 * n * (n + 1) / 2 * 6 / 5 + 2 * n * n * 16) / 1e10)
    # Method 2's device time grows linearly in n at fixed κ, and quadratically in κ at fixed n.
    assert model.layer_terms(_square(2 * n))["thermo2_device"] == pytest.approx(2 * terms["thermo2_device"])
    stiffer = CostModel(condition_number=500.0, target_error=0.2, burn_in=0.0, beta=500.0, hardware=hw)
    softer = CostModel(condition_number=50.0, target_error=0.2, burn_in=0.0, beta=500.0, hardware=hw)
    ratio = stiffer.layer_terms(_square(n))["thermo2_device"] / softer.layer_terms(_square(n))["thermo2_device"]
    assert ratio == pytest.approx(100.0)


def test_blocking_sums_over_blocks() -> None:
    whole = CostModel()
    blocked = CostModel(hardware=HardwareModel(solver_dim=100, time_constant=1e-9))
    assert blocked.device_inverse_seconds(300) == pytest.approx(3 * whole.device_inverse_seconds(100))
    assert blocked.device_solve_seconds(300) == pytest.approx(3 * whole.device_solve_seconds(300))


def test_crossover_width_is_where_thermodynamic_starts_winning() -> None:
    model = CostModel()
    for method in ("thermo1", "thermo2"):
        width = crossover_width(model, "square", method)
        assert width is not None and width > 1
        below, at = (model.step_times([Layer(w, w, 1024)]) for w in (width - 1, width))
        assert at[method] < at["kfac"] and below[method] >= below["kfac"]
    slower = CostModel(hardware=HardwareModel(time_constant=1e-8, input_bits=8, output_bits=8))
    assert crossover_width(slower, "square", "thermo1") > crossover_width(model, "square", "thermo1")
    hopeless = CostModel(hardware=HardwareModel(time_constant=1.0))
    assert crossover_width(hopeless, "square", "thermo1", max_width=4096) is None


def test_sweep_speedup_grows_with_width_for_both_case_studies() -> None:
    model = CostModel()
    for workload in ("vit", "gnn"):
        rows = sweep(model, workload, [256, 1024, 4096])
        speedups = [row["speedup1_vs_kfac"] for row in rows]
        assert speedups == sorted(speedups)
        assert all(row["kfac"] > row["adam"] for row in rows)
    assert sum(layer.count for layer in vit_like()) == 2 + 4 * 12
    assert {layer.name for layer in gnn_like()} >= {"edge_mlp_in", "node_mlp_in", "decoder"}


def test_bad_cost_model_and_workload_are_rejected() -> None:
    with pytest.raises(ValueError, match="target_error"):
        CostModel(target_error=1.5)
    with pytest.raises(ValueError, match="condition_number"):
        CostModel(condition_number=0.5)
    with pytest.raises(ValueError, match="workload"):
        sweep(CostModel(), "resnet", [64])
    with pytest.raises(ValueError, match="method"):
        crossover_width(CostModel(), "square", "adam")


def test_inverse_time_assumption_matches_the_simulator() -> None:
    # The cost model's inverse-mode time assumes relative Frobenius error² ≈ (n + 1) / N for N independent
    # samples (exact for M = I); samples a few relaxation times apart are independent in the simulator.
    import torch

    from kronfac.linalg.thermodynamic import simulate_ou

    n, samples, chains = 8, 50, 8
    m = torch.eye(n, dtype=torch.float64)
    errors = []
    for seed in range(20):
        result = simulate_ou(
            m,
            mode="inverse",
            dt=4.0,
            burn_in=10.0,
            num_samples=samples,
            num_chains=chains,
            generator=torch.Generator().manual_seed(seed),
        )
        errors.append(float(torch.linalg.matrix_norm(result.estimate - m) ** 2 / n))
    assert sum(errors) / len(errors) == pytest.approx((n + 1) / (samples * chains), rel=0.25)


def test_solve_time_assumption_matches_the_simulator() -> None:
    # The cost model's solve-mode time rests on Var(time average) = 2 M^{-2} / (β T) per eigenmode.
    import torch

    from kronfac.linalg.thermodynamic import simulate_ou

    rates = torch.tensor([0.1, 0.3, 1.0], dtype=torch.float64)
    m, beta, duration = torch.diag(rates), 4.0, 400.0
    c = torch.ones(3, 400, dtype=torch.float64)
    result = simulate_ou(
        m, c, dt=0.5, burn_in=50.0, duration=duration, beta=beta, generator=torch.Generator().manual_seed(0)
    )
    variance = result.estimate.var(dim=1)
    expected = 2 / (beta * rates**2 * duration)
    torch.testing.assert_close(variance, expected, rtol=0.25, atol=0)
