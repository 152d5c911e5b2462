"""``kronfac thermo-cost``: print (and save) the thermodynamic K-FAC cost model's predictions.

Donatella et al. 2025, "Scalable Thermodynamic Second-order Optimization". ``add_parser`` plugs the subcommand
into the ``kronfac`` command; ``python -m kronfac.bench.thermo_cost`` runs it on its own. The cost model itself
lives in :mod:`kronfac.linalg.thermodynamic.cost`; the tables and the plot in :mod:`kronfac.bench.thermo_cost_report`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from kronfac.bench.thermo_cost_report import (
    cost_report,
    format_assumptions,
    format_crossover,
    format_table,
    plot_speedups,
)
from kronfac.linalg.thermodynamic.cost import WORKLOADS, CostModel
from kronfac.linalg.thermodynamic.hardware import HardwareModel

__all__ = ["add_parser", "build_model", "main", "run"]

DEFAULT_WIDTHS = "128,256,512,1024,2048,4096,8192"


def _widths(text: str) -> list[int]:
    try:
        widths = [int(w) for w in text.split(",") if w.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"widths must be comma-separated integers, got {text!r}") from None
    if not widths or min(widths) < 1:
        raise argparse.ArgumentTypeError(f"widths must be positive integers, got {text!r}")
    return widths


def configure(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the cost-model options (defaults are those of :class:`CostModel`) to ``parser``."""
    model, hw = CostModel(), CostModel().hardware
    add = parser.add_argument
    add("--workload", choices=[*sorted(WORKLOADS), "all"], default="all", help="layer list (default: all)")
    add("--widths", type=_widths, default=_widths(DEFAULT_WIDTHS), help=f"default {DEFAULT_WIDTHS}")
    add("--time-constant", type=float, default=hw.time_constant, help="device time constant τ, seconds")
    add("--io-bandwidth", type=float, default=hw.io_bandwidth, help="host-device link, bits/s")
    add("--input-bits", type=int, default=hw.input_bits, help="bits sent per value")
    add("--output-bits", type=int, default=hw.output_bits, help="bits read back per value")
    add("--solver-dim", type=int, default=None, help="largest matrix the device holds (default: unlimited)")
    add("--condition-number", type=float, default=model.condition_number, help="κ of the damped factors")
    add("--target-error", type=float, default=model.target_error, help="relative error ε per read-out")
    add("--beta", type=float, default=model.beta, help="signal-to-thermal-noise ratio (method 2)")
    add("--burn-in", type=float, default=model.burn_in, help="relaxation times before sampling")
    add("--matmul-flops", type=float, default=model.matmul_flops, help="digital matmul FLOP/s")
    add("--inverse-flops", type=float, default=model.inverse_flops, help="digital eigensolver FLOP/s")
    add("--factor-every", type=int, default=model.factor_every)
    add("--inverse-every", type=int, default=model.inverse_every)
    add("--out", type=Path, default=None, help="write thermo_cost.json and thermo_cost.png into this folder")
    return parser


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``thermo-cost`` on an ``argparse`` subparsers object; dispatch to :func:`run`."""
    parser = subparsers.add_parser(
        "thermo-cost",
        help="predict per-step time of Adam, digital and thermodynamic K-FAC vs layer width",
        description=__doc__,
    )
    configure(parser)
    parser.set_defaults(func=run)
    return parser


def build_model(args: argparse.Namespace) -> CostModel:
    """The :class:`CostModel` described by parsed arguments (raises ``ValueError`` on a bad value)."""
    hardware = HardwareModel(
        input_bits=args.input_bits,
        output_bits=args.output_bits,
        solver_dim=args.solver_dim,
        time_constant=args.time_constant,
        io_bandwidth=args.io_bandwidth,
    )
    return CostModel(
        matmul_flops=args.matmul_flops,
        inverse_flops=args.inverse_flops,
        factor_every=args.factor_every,
        inverse_every=args.inverse_every,
        condition_number=args.condition_number,
        target_error=args.target_error,
        burn_in=args.burn_in,
        beta=args.beta,
        hardware=hardware,
    )


def run(args: argparse.Namespace) -> int:
    """Print the assumptions, one table per workload and the crossover widths; optionally save JSON and PNG."""
    model = build_model(args)
    workloads = sorted(WORKLOADS) if args.workload == "all" else [args.workload]
    report = cost_report(model, workloads, args.widths)
    print("Assumptions:\n" + format_assumptions(report["assumptions"]))
    for name, result in report["workloads"].items():
        crossover = result["crossover_width"]
        print(f"\n## {name}\n\n{format_table(result['rows'])}")
        print(
            f"\ncrossover width: method 1 {format_crossover(crossover['thermo1'])},"
            f" method 2 {format_crossover(crossover['thermo2'])}"
        )
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "thermo_cost.json").write_text(json.dumps(report, indent=2))
        print(f"\nwrote {plot_speedups(report, args.out / 'thermo_cost.png')} and thermo_cost.json")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry point: ``python -m kronfac.bench.thermo_cost [options]``."""
    parser = configure(argparse.ArgumentParser(prog="kronfac thermo-cost", description=__doc__))
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
