"""Benchmarks of jax_ark against the jax.lax / jax.jit baseline measured in the same run.

Each case is timed in --repeats rounds; a round times the baseline and ark back to back, each as
the median of many calls (dispatch included, results waited for). The tables give the median over
rounds and the ratio's interquartile range (IQR: the middle half of the per-round ratios), so a
reader sees how much a figure moves between rounds. Results also go to JSON and PNG under --out.
"""

from __future__ import annotations

import argparse
import sys

from jax_ark._env import configure_host_devices


def build_parser() -> argparse.ArgumentParser:
    from jax_ark.bench import cnn, collectives, decode, overlap, persistent

    parser = argparse.ArgumentParser(
        prog="python -m jax_ark.bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(
        dest="bench", required=True, metavar="{collectives,persistent,decode,overlap,cnn}"
    )
    for name, module in (
        ("collectives", collectives),
        ("persistent", persistent),
        ("decode", decode),
        ("overlap", overlap),
        ("cnn", cnn),
    ):
        doc = module.__doc__ or ""
        module.add_arguments(
            sub.add_parser(
                name,
                help=doc.splitlines()[0].split(": ", 1)[-1],
                description=doc,
                formatter_class=argparse.RawDescriptionHelpFormatter,
            )
        )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_host_devices()  # before any jax backend starts
    if args.bench == "collectives":
        from jax_ark.bench import collectives as bench
    elif args.bench == "decode":
        from jax_ark.bench import decode as bench
    elif args.bench == "overlap":
        from jax_ark.bench import overlap as bench
    elif args.bench == "cnn":
        from jax_ark.bench import cnn as bench
    else:
        from jax_ark.bench import persistent as bench
    return bench.run(args)


if __name__ == "__main__":
    sys.exit(main())
