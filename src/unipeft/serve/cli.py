"""`unipeft serve`: an OpenAI-compatible HTTP server for a base model and any number of adapters.

SIGTERM or Ctrl-C stops accepting connections, lets every in-flight request finish (uvicorn's graceful
shutdown, then the engine drains), and exits 0.
"""
from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

EXAMPLES = """examples:
  unipeft serve --model smollm2 --adapter sql=runs/sql/adapter --adapter chat=runs/chat/adapter
  unipeft serve --model runs/lm --port 8080            # a finished run: its adapter is served as 'default'
  curl localhost:8000/v1/completions -d '{"model": "sql", "prompt": "SELECT", "max_tokens": 16}'
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of `unipeft serve`."""
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = EXAMPLES
    parser.add_argument("--model", required=True,
                        help="base model: 'smollm2', a local model folder (config.json) or a finished run folder")
    parser.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR",
                        help="load adapter folder DIR under NAME (repeatable); more can be added at runtime with "
                             "POST /v1/adapters")
    parser.add_argument("--task", choices=("causal_lm", "classify"), default="causal_lm",
                        help="causal_lm: /v1/completions and /v1/chat/completions; classify: /v1/classify "
                             "(a run folder sets it itself)")
    parser.add_argument("--name", default=None,
                        help="the base model's name in the API (default: --model, or its folder's name)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000)")
    parser.add_argument("--max-batch", type=int, default=32, help="most requests decoded together (default 32)")
    parser.add_argument("--max-adapters", type=int, default=8,
                        help="most adapters resident at once; the least recently used idle one is unloaded and "
                             "reloaded from its folder on demand (default 8)")
    parser.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"),
                        help="uvicorn's log level")


def parse_adapters(values: list[str]) -> dict[str, str]:
    """NAME=DIR pairs as a dict; a malformed or repeated pair is a usage error."""
    from ..core.errors import ConfigError

    out: dict[str, str] = {}
    for value in values:
        name, sep, path = value.partition("=")
        if not sep or not name or not path:
            raise ConfigError(f"--adapter: expected NAME=DIR, got {value!r}")
        if name in out:
            raise ConfigError(f"--adapter: name {name!r} is given twice")
        out[name] = path
    return out


def build(args: argparse.Namespace):
    """(app, engine) for the parsed arguments: the model, its adapters and the engine, not yet started."""
    from ..core.errors import ConfigError
    from ..train.generate import _eos_ids
    from .api import ApiError
    from .app import create_app, load_model
    from .engine import Engine
    from .registry import check_folder

    if args.max_batch < 1 or args.max_adapters < 1:
        raise ConfigError("--max-batch and --max-adapters must be at least 1")
    adapters = parse_adapters(args.adapter)
    model, tokenizer, base, task, paths = load_model(args.model, args.task)
    name = args.name or (Path(base).name if Path(base).expanduser().is_dir() else base)
    for adapter, folder in adapters.items():
        if adapter in model.peft_config or adapter == name:
            raise ConfigError(f"--adapter: name {adapter!r} is already taken")
        try:
            check_folder(folder)
        except ApiError as exc:
            raise ConfigError(f"--adapter {adapter}={folder}: {exc.message}") from None
        model.load_adapter(folder, adapter)
        paths[adapter] = folder
    # the end-of-sequence ids `unipeft generate` stops at (model's generation config and the tokenizer's)
    engine = Engine(model, tokenizer, max_batch=args.max_batch, eos_ids=_eos_ids(model, tokenizer))
    app = create_app(model, tokenizer, engine, max_adapters=max(args.max_adapters, len(paths)), model_name=name,
                     task=task, adapter_paths=paths)
    return app, engine


def run(args: argparse.Namespace) -> int:
    """Serve until SIGTERM/SIGINT; in-flight requests finish first. Exit code 0."""
    import uvicorn

    app, _engine = build(args)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                            timeout_graceful_shutdown=None)  # wait for every in-flight response
    server = uvicorn.Server(config)
    # uvicorn handles SIGTERM/SIGINT itself (stop accepting, finish in-flight responses, then the app's shutdown
    # drains the engine) and afterwards raises the signal again for the previous handler: make that an exit 0.
    previous = {sig: signal.signal(sig, _exit_0) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        server.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0


def _exit_0(_sig, _frame) -> None:
    raise SystemExit(0)


def main(argv: list[str] | None = None) -> int:
    """`python -m unipeft.serve.cli ...`: the same as `unipeft serve ...` (errors: one line, exit code 2)."""
    from ..core.errors import UnipeftError

    parser = argparse.ArgumentParser(prog="unipeft serve", description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except (UnipeftError, FileNotFoundError) as exc:
        msg = "; ".join(line.strip() for line in str(exc).splitlines() if line.strip())
        print(f"unipeft serve: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
