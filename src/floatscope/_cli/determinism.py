"""``floatscope determinism TARGET [--backward]``: where results stop being bitwise reproducible."""

from __future__ import annotations

import argparse
from typing import Any

from floatscope._cli.render import console, write_json
from floatscope._engines.target import load_target

__all__ = ["add_parser"]


def add_parser(sub: Any) -> None:
    p = sub.add_parser("determinism", help="find the first op whose output differs bitwise between repeated runs, "
                                           "thread counts and reduction orders")
    p.add_argument("target", metavar="TARGET", help="path/to/file.py:factory returning (model, example_inputs)")
    p.add_argument("--backward", action="store_true", help="also run the backward pass")
    p.add_argument("--json", metavar="PATH")
    p.set_defaults(handler=main)


def main(args: argparse.Namespace) -> int:
    from floatscope._engines.determinism import check_determinism

    model, inputs = load_target(args.target)
    result = check_determinism(model, inputs, backward=args.backward)
    out = console()
    for s in result.settings:
        if s.identical:
            out.print(f"[green]{s.setting}[/]: bitwise identical over {s.ops_compared} ops")
            continue
        listed = "on PyTorch's non-deterministic list" if s.on_nondeterministic_list else "not on the non-deterministic list"
        fixed = "removed by" if s.fixed_by_seed_everything else "not removed by"
        where = f"module '{s.module}'" if s.module else ("the model's root" if s.module == "" else "outside any module")
        size = (f"by up to {s.max_ulp:.3g} ULPs ({s.max_abs:.3g} absolute)" if s.max_ulp is not None
                else "a different random draw")
        out.print(f"[red]{s.setting}[/]: first differs at op #{s.first_op_index} {s.first_op} ({s.phase}, {where}), "
                  f"{size}; {listed}; {fixed} seed_everything(0, deterministic=True)")
        if s.note:
            out.print(f"  {s.note}")
    if args.json:
        write_json(args.json, result.to_dict())
    return 0
