"""``python -m llama.server`` / ``llama-serve``: the OpenAI-compatible server, on one process or under torchrun.

Rank 0 serves HTTP (the model loads meanwhile: /health answers 503 until it is ready); every rank runs the scheduler.
"""

from __future__ import annotations

import argparse
import importlib
import ipaddress
import logging
import os
import sys
import threading
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from llama import cli

logger = logging.getLogger("llama.server")

DEFAULTS = dict(max_seq_len=2048, max_batch_size=8, max_gen_len=None)
DEMO_MODEL_NAME = "llama-demo"
# 128 prompt tokens of a 1B model take about 0.25 s on 2 CPU cores: a stream pauses at most that long while a prompt joins.
DEFAULT_PREFILL_CHUNK = 128


class _ServerFlag(argparse.Action):
    """Stores a server flag's value aside, so that the shared build flags still parse into ``cli.CliArgs``."""

    def __init__(self, *args: Any, values: Dict[str, Any], append: bool = False, **kwargs: Any) -> None:
        self.values = values
        self.append = append
        default = kwargs.pop("default", None)
        super().__init__(*args, default=argparse.SUPPRESS, **kwargs)
        values[self.dest] = default

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, value: Any, option: Optional[str] = None) -> None:
        if self.append:  # repeatable
            self.values[self.dest] = (self.values[self.dest] or []) + [value]
        else:
            self.values[self.dest] = value


def port(value: str) -> int:
    return int(cli._number(value, int, "a port number from 0 to 65535", lambda n: 0 <= n <= 65535))


def build_parser() -> tuple:
    """The parser (the shared build flags plus the server's) and the dict its server flags fill."""
    parser = cli.build_parser(
        "Serve a Llama checkpoint over HTTP with OpenAI's API (/v1/completions, /v1/chat/completions, /v1/models), "
        "batching concurrent requests. Under torchrun, rank 0 serves and every rank computes.",
        prog="llama-serve", temperature_default=1.0, top_p_default=1.0, **DEFAULTS,
    )
    for action in parser._actions:  # the shared flags' help, as the server reads them
        if action.dest in ("temperature", "top_p"):
            action.help = f"{action.dest} of requests that do not set it (default: 1.0, as OpenAI's)"
        elif action.dest == "max_gen_len":
            action.help = "max_tokens of requests that do not set it (default: 16 for completions, as OpenAI's; the room left in the context for chat)"
        elif action.dest == "stop":
            action.help = "a stop string added to every request's (repeatable)"
    values: Dict[str, Any] = {}
    group = parser.add_argument_group("server")
    add = lambda *names, **kw: group.add_argument(*names, action=_ServerFlag, values=values, **kw)  # noqa: E731
    add("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only; 0.0.0.0 for every interface)")
    add("--port", type=port, default=8000, help="TCP port (default: 8000)")
    add("--api-key", "--api_key", dest="api_key", metavar="KEY", default=os.environ.get("LLAMA_API_KEY"),
        help="require 'Authorization: Bearer KEY' on every endpoint but /health and the chat page (default: $LLAMA_API_KEY, else none)")
    add("--cors-origin", "--cors_origin", dest="cors_origin", metavar="ORIGIN", append=True, default=None,
        help="let browser pages from ORIGIN (e.g. http://localhost:3000) call the API (repeatable); none by default")
    add("--max_queue", type=cli.non_negative_int, default=64, metavar="INT",
        help="sequences that may wait for a free batch row; past that, requests get 503 with Retry-After (default: 64)")
    add("--prefill_chunk", type=cli.positive_int, default=DEFAULT_PREFILL_CHUNK, metavar="INT",
        help="prompt tokens prefilled per step between the running requests' decode steps: smaller keeps their streams "
        f"smoother while a long prompt joins, larger gives it its first token sooner (default: {DEFAULT_PREFILL_CHUNK})")
    add("--max_body_bytes", type=cli.positive_int, default=4 * 2**20, metavar="INT", help="largest request body (default: 4 MiB)")
    add("--model_name", metavar="NAME", default=None,
        help="the model's id in the API (default: the checkpoint folder's name, or llama-demo for the bundled model)")
    return parser, values


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser, values = build_parser()
    args = cli.parse_args(parser, argv)
    for name, value in (("--stream", args.stream), ("--prompt", args.prompt)):
        if value:
            parser.error(f"{name} is a flag of the command-line scripts, not of the server")
    cli.setup_logging(args)
    try:
        importlib.import_module("uvicorn")
        importlib.import_module("starlette")
    except ImportError as e:
        parser.error(f"the server needs its optional dependencies ({e.name} is missing): pip install 'llama[server]'")
    if int(os.environ.get("RANK", "0")) != 0:
        _follow(args, values)
    else:
        _serve(args, values)


def _follow(args: cli.CliArgs, values: Dict[str, Any]) -> None:
    """A rank other than 0: load this rank's shard, then run every step rank 0 orders."""
    from llama.generation import Llama
    from llama.server.scheduler import Scheduler

    llama = Llama.build(**args.build_options())
    scheduler = Scheduler(max_queue=0, prefill_chunk=values["prefill_chunk"])
    scheduler.run(llama)
    if scheduler.error is not None:
        sys.exit(scheduler.error)


def _serve(args: cli.CliArgs, values: Dict[str, Any]) -> None:
    import uvicorn

    from llama.generation import Llama
    from llama.server.app import ServerConfig, create_app
    from llama.server.scheduler import Scheduler

    name = values["model_name"] or (Path(args.ckpt_dir).resolve().name if args.ckpt_dir else DEMO_MODEL_NAME)
    config = ServerConfig(
        model_name=name, api_key=values["api_key"] or None, cors_origins=tuple(values["cors_origin"] or ()),
        max_body_bytes=values["max_body_bytes"], default_temperature=args.temperature, default_top_p=args.top_p,
        default_max_tokens=args.max_gen_len, extra_stop=tuple(args.stop),
    )
    if not _loopback(values["host"]) and not config.api_key:
        logger.warning("listening on %s without --api-key: anyone who can reach this port can use the model", values["host"])
    scheduler = Scheduler(values["max_queue"], values["prefill_chunk"])
    server = uvicorn.Server(uvicorn.Config(
        create_app(config, scheduler), host=values["host"], port=values["port"], log_config=None, lifespan="off",
        log_level=logging.getLogger().level, access_log=not args.quiet, timeout_graceful_shutdown=5,
    ))
    fatal: List[str] = []

    def on_fatal(message: str) -> None:
        fatal.append(message)
        server.should_exit = True

    def work() -> None:
        try:
            llama = Llama.build(**args.build_options())
        except Exception as e:
            scheduler.error = f"loading the model failed: {type(e).__name__}: {e}"
            logger.error("%s", scheduler.error)
            on_fatal(scheduler.error)
            return
        logger.info("ready: serving %s at http://%s:%d (max_seq_len %d, max_batch_size %d)", name, values["host"], values["port"],
                    llama.model.params.max_seq_len, llama.model.params.max_batch_size)
        scheduler.run(llama, on_fatal)

    worker = threading.Thread(target=work, name="llama-server-scheduler", daemon=True)
    worker.start()
    logger.info("loading the model; /health answers 503 until it is ready")
    server.run()
    scheduler.stop()
    worker.join(timeout=30)
    if fatal:
        sys.exit(f"llama-serve: {fatal[0]}")


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


if __name__ == "__main__":
    main()
