"""Command line: ``python -m sparse_inductor fidelity SETUP [options]`` and
``python -m sparse_inductor calibrate SETUP --out plan.json [options]``.

``SETUP`` names a function, ``path/to/file.py:function`` or ``package.module:function``, that
builds what to measure. It is called with the ``--checkpoint`` and ``--device`` given (as
keyword arguments, only those given) and returns a dict::

    {"model": model, "inputs": (x, t),            # required
     "kwargs": {...}, "sample_fn": fn, "grid": (T, H, W), "peak": 1.0}   # optional

(the arguments of :func:`sparse_inductor.fidelity`). Example, on the model trained by
``examples/train_tiny_video_dit.py``::

    python -m sparse_inductor fidelity examples/train_tiny_video_dit.py:fidelity_setup \\
        --checkpoint runs/a/dense.pt --sparsities 0.5 0.875 --tiles 4,4,4 1,8,8 --warmup 0 4
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import sys

from .calibrate import ALLOCATIONS


def load_function(spec: str):
    """The callable named by ``file.py:name`` or ``package.module:name``."""
    if ":" not in spec:
        raise ValueError(f"SETUP must look like 'path/to/file.py:function' or 'package.module:function', got {spec!r}")
    where, name = spec.rsplit(":", 1)
    if where.endswith(".py"):
        if not os.path.isfile(where):
            raise ValueError(f"SETUP file {where!r} does not exist")
        directory = os.path.dirname(os.path.abspath(where))
        if directory not in sys.path:  # so the file can import its neighbours
            sys.path.insert(0, directory)
        name_of_module = os.path.splitext(os.path.basename(where))[0]
        module = sys.modules.get(name_of_module)
        if getattr(module, "__file__", None) != os.path.abspath(where):
            module_spec = importlib.util.spec_from_file_location(name_of_module, where)
            module = importlib.util.module_from_spec(module_spec)
            sys.modules[name_of_module] = module  # dataclasses look their module up while it runs
            module_spec.loader.exec_module(module)
    else:
        module = importlib.import_module(where)
    fn = getattr(module, name, None)
    if not callable(fn):
        raise ValueError(f"SETUP {spec!r}: {where} has no function {name!r}")
    return fn


def parse_tile(text: str) -> tuple:
    parts = text.replace("x", ",").split(",")
    try:
        tile = tuple(int(p) for p in parts)
    except ValueError:
        tile = ()
    if len(tile) != 3:
        raise argparse.ArgumentTypeError(f"a tile is three ints like 4,4,4, got {text!r}")
    return tile


def build(args) -> dict:
    """Call SETUP with the ``--checkpoint`` / ``--device`` given and check what it returns."""
    setup_kwargs = {k: v for k, v in (("checkpoint", args.checkpoint), ("device", args.device)) if v is not None}
    built = load_function(args.setup)(**setup_kwargs)
    if not isinstance(built, dict) or "model" not in built or "inputs" not in built:
        raise ValueError("SETUP must return a dict with at least 'model' and 'inputs'")
    return built


def fidelity_main(argv) -> int:
    import sparse_inductor

    parser = argparse.ArgumentParser(prog="python -m sparse_inductor fidelity",
                                     description="Measure attention-mass recall, output error and sample PSNR of "
                                                 "block-sparse attention against dense on a model.")
    parser.add_argument("setup", metavar="SETUP", help="file.py:function or package.module:function (see module doc)")
    parser.add_argument("--checkpoint", help="passed to SETUP as checkpoint=")
    parser.add_argument("--device", help="passed to SETUP as device=")
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.5, 0.75, 0.875, 0.9375])
    parser.add_argument("--tiles", type=parse_tile, nargs="+", default=[(4, 4, 4)], help="e.g. 4,4,4 1,8,8")
    parser.add_argument("--warmup", type=int, nargs="+", default=[0], help="dense first sampling steps, e.g. 0 4")
    parser.add_argument("--backend", choices=["sparse_inductor", "eager"], default="sparse_inductor")
    parser.add_argument("--min-tokens", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="also write the result as JSON here")
    parser.add_argument("--no-sites", action="store_true", help="print only the overall table")
    args = parser.parse_args(argv)
    built = build(args)
    result = sparse_inductor.fidelity(
        built["model"], *built["inputs"], kwargs=built.get("kwargs"), sample_fn=built.get("sample_fn"),
        grid=built.get("grid"), peak=built.get("peak", 1.0), sparsities=args.sparsities, tiles=args.tiles,
        warmup_steps=args.warmup, backend=args.backend, min_tokens=args.min_tokens, seed=args.seed)
    print(result.table() if args.no_sites else result)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result.to_dict(), f, indent=1)
    return 0


def calibrate_main(argv) -> int:
    import sparse_inductor

    parser = argparse.ArgumentParser(prog="python -m sparse_inductor calibrate",
                                     description="Find per-head attention patterns (a plan) that keep the most "
                                                 "softmax mass within a mean FLOP budget; write the plan as JSON.")
    parser.add_argument("setup", metavar="SETUP", help="file.py:function or package.module:function (see module doc)")
    parser.add_argument("--out", required=True, help="where to write the plan (JSON)")
    parser.add_argument("--budget", type=float, default=0.125, help="mean share of attention FLOPs kept (0.125)")
    parser.add_argument("--checkpoint", help="passed to SETUP as checkpoint=")
    parser.add_argument("--device", help="passed to SETUP as device=")
    parser.add_argument("--tile", type=parse_tile, default=(4, 4, 4))
    parser.add_argument("--skip-threshold", type=float, default=0.02,
                        help="skip heads whose output energy is below this share of the mean head's (0: never)")
    parser.add_argument("--dynamic", action="store_true", help="also offer TopK per head")
    parser.add_argument("--allocation", choices=ALLOCATIONS, default="global",
                        help="global: the budget is the mean over heads; per_head: every head keeps at most it")
    parser.add_argument("--no-sample", action="store_true", help="measure the inputs only, not a whole sample")
    parser.add_argument("--min-tokens", type=int, default=0)
    args = parser.parse_args(argv)
    built = build(args)
    result = sparse_inductor.calibrate(
        built["model"], *built["inputs"], kwargs=built.get("kwargs"), budget=args.budget, tile=args.tile,
        sample_fn=None if args.no_sample else built.get("sample_fn"), grid=built.get("grid"),
        skip_threshold=args.skip_threshold, dynamic=args.dynamic, min_tokens=args.min_tokens,
        allocation=args.allocation)
    result.plan.save(args.out)
    print(result)
    print(f"plan written to {args.out}")
    return 0


COMMANDS = {"fidelity": fidelity_main, "calibrate": calibrate_main}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] not in COMMANDS:
        print(f"usage: python -m sparse_inductor {{{','.join(COMMANDS)}}} ...  (see --help of each)", file=sys.stderr)
        return 2
    return COMMANDS[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
