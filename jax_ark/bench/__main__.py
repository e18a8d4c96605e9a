"""`python -m jax_ark.bench {collectives,persistent} [options]`."""

from __future__ import annotations

import sys

from jax_ark._env import configure_host_devices


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = ("collectives", "persistent")
    if not argv or argv[0] not in commands:
        print(f"usage: python -m jax_ark.bench {{{','.join(commands)}}} [--help]", file=sys.stderr)
        return 2
    configure_host_devices()  # before any jax backend starts
    if argv[0] == "collectives":
        from jax_ark.bench import collectives as bench
    else:
        from jax_ark.bench import persistent as bench
    return bench.main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
