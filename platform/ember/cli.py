"""The `ember` command. Thin: it parses arguments, loads a spec, and calls one function of a plane.

Errors a user can fix print as one line on stderr with exit status 1; `--debug` shows the traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from ember import __version__
from ember.errors import EmberError

# Job kind -> "module:function" that runs it; imported only when that kind runs.
JOB_RUNNERS = {
    "tokenize": "ember.data.pipeline:run_tokenize",
}

_EPILOG = """examples:
  ember run jobs/tokenize-demo.yaml
  ember run jobs/tokenize-demo.yaml --set pack.seq_len=128 --set output.dir=data/short
  ember run jobs/tokenize-demo.yaml --address auto   # on the Ray cluster this machine is a node of
"""


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show full tracebacks and Ray's own logs")
    parser = argparse.ArgumentParser(
        prog="ember", parents=[common], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=_EPILOG,
        description="Ember: corpus → tokenizer and shards → pretraining and fine-tuning → serving, on Ray. "
                    "Each job is one YAML spec (see jobs/).")
    parser.add_argument("--version", action="version", version=f"ember {__version__}")
    verbs = parser.add_subparsers(dest="verb", metavar="VERB")
    verbs.required = True

    run = verbs.add_parser(
        "run", parents=[common], formatter_class=argparse.RawDescriptionHelpFormatter,
        help="run a job spec (tokenize, ...) on Ray",
        description="Run a job spec. Connects to the Ray cluster given by --address or RAY_ADDRESS, otherwise starts "
                    f"a local Ray instance. Job kinds: {', '.join(JOB_RUNNERS)}.",
        epilog=_EPILOG)
    run.add_argument("spec", metavar="SPEC.yaml", help="the job spec file")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override a spec value, e.g. --set pack.seq_len=256 (repeatable; values are read as YAML)")
    run.add_argument("--address", default=None,
                     help="Ray cluster (GCS) address such as 10.0.0.5:6379, or 'auto' (default: RAY_ADDRESS, else a new "
                          "local instance)")
    return parser


def _runner(kind: str):
    module, _, name = JOB_RUNNERS[kind].partition(":")
    return getattr(importlib.import_module(module), name)


def cmd_run(args) -> int:
    from ember.config import load_spec

    spec = load_spec(args.spec, args.overrides)
    _runner(spec.kind)(spec, address=args.address)  # each runner checks its inputs before it connects to Ray
    return 0


def _setup_logging(debug: bool) -> None:
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger = logging.getLogger("ember")
    logger.handlers[:] = [handler]
    logger.setLevel(logging.DEBUG if debug else logging.INFO)
    logger.propagate = False


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    debug = getattr(args, "debug", False)
    _setup_logging(debug)
    from ember.runtime import find_ember_error

    try:
        return {"run": cmd_run}[args.verb](args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # the boundary: one line for the user, the traceback only with --debug
        if debug:
            raise
        found = find_ember_error(exc)
        if found is not None:
            print(f"error: {found}", file=sys.stderr)
        else:
            print(f"error: unexpected {type(exc).__name__}: {exc} (rerun with --debug for the traceback)",
                  file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
