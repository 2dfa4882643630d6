"""`python -m loki_dist` and the `loki-dist` console script: cli.main, with Ctrl-C handled from the start.

Nothing heavy is imported before `exits.install()` (core/exits.py): a Ctrl-C while torch, transformers
and DeepSpeed still import ends as one later does, with exit status 130 and no traceback.
"""

from loki_dist.core import exits


def run() -> None:
    exits.install()
    try:
        from loki_dist.cli import main

        main()
    except KeyboardInterrupt:  # before cli.main's own handler (the imports, the parser) or after it
        exits.exit_now(exits.INTERRUPTED)


if __name__ == "__main__":
    run()
