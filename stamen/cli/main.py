"""The ``stamen`` command."""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Annotated

import typer
from typer._click.exceptions import ClickException, NoArgsIsHelpError, UsageError  # typer 0.29 vendors click

from stamen.cli.bench import bench_app
from stamen.cli.logs import setup_logging
from stamen.cli.options import CliField, config_options
from stamen.cli.streamer import TimedTextStreamer
from stamen.cli.train import train as train_command
from stamen.client.config import ClientConfig
from stamen.errors import StamenError
from stamen.process import check_port_free
from stamen.server.config import ServerConfig, missing_local_dir
from stamen.sim.simulate import SimConfig
from stamen.types import parse_bytes

app = typer.Typer(help="Stamen: run large language models over a swarm of peers.", no_args_is_help=True,
                  pretty_exceptions_enable=False)
app.add_typer(bench_app, name="bench")
app.command("train")(train_command)  # SWARM trainers (cli/train.py)


PeersOpt = Annotated[list[str], typer.Option("--initial-peers", help="Multiaddrs of DHT peers to join.")]


def _existing_model(model: str) -> str:
    """MODEL of a client command: a path that is not a directory is a usage error (not a hub id)."""
    if missing_local_dir(model):
        raise typer.BadParameter(f"no such directory: {model}")
    return model


ModelArg = Annotated[str, typer.Argument(help="Hugging Face model directory or hub id.", callback=_existing_model)]


@app.command()
def dht(
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port (0: any free port).")] = 0,
    identity: Annotated[Path | None, typer.Option(help="Private key file: a stable peer id across restarts.")] = None,
    initial_peers: PeersOpt = [],  # noqa: B006 (typer reads the default)
) -> None:
    """Start a bootstrap DHT peer and print its multiaddrs, one per line."""
    setup_logging("WARNING")
    check_port_free(host, port)  # at once, before the imports that load torch
    from stamen.server.config import parent_gone
    from stamen.server.server import start_dht

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    node = start_dht(initial_peers, host, port, str(identity) if identity else None)  # checks the port first
    try:
        for maddr in node.get_visible_maddrs():
            print(maddr, flush=True)
        while not stop.wait(1.0) and not parent_gone():
            pass
    finally:
        node.shutdown()


SERVER_FIELDS = {"model": CliField(argument=True), "max_memory": CliField(parser=parse_bytes, metavar="SIZE")}
"""``stamen server`` options that differ from the derived ones: MODEL is positional, --max-memory reads 6GiB."""


@app.command()
@config_options(ServerConfig, "config", SERVER_FIELDS)
def server(config: ServerConfig) -> None:
    """Serve a span of a model's blocks to the swarm."""
    setup_logging()
    check_port_free(config.host, config.port)  # at once, before the imports that load torch
    from stamen.server.server import Server

    Server(config).run()


CLIENT_FIELDS = ("initial_peers", "dht_prefix")
"""The client settings of commands that only find the swarm (the rest keep ``ClientConfig``'s defaults)."""
INFERENCE_FIELDS = tuple(n for n in ClientConfig.model_fields
                         if n not in ("sub_batch_tokens", "train_streams", "train_compression"))
"""The client settings of commands that run inference sessions (no training)."""


def _client_kwargs(config: ClientConfig) -> dict:
    """``from_pretrained`` keyword arguments (after the model and initial peers) for ``config``."""
    return config.model_dump(exclude={"initial_peers"})


@app.command()
@config_options(ClientConfig, "client", include=INFERENCE_FIELDS)
def generate(
    model: ModelArg,
    client: ClientConfig,
    prompt: Annotated[str, typer.Option(help="Text to continue.")] = "Hello",
    max_new_tokens: Annotated[int, typer.Option(help="Tokens to generate.", min=1)] = 32,
    do_sample: Annotated[bool, typer.Option(help="Sample instead of greedy decoding.")] = False,
    temperature: Annotated[float, typer.Option()] = 1.0,
    top_k: Annotated[int, typer.Option()] = 50,
    top_p: Annotated[float, typer.Option()] = 1.0,
    repetition_penalty: Annotated[float, typer.Option()] = 1.0,
    seed: Annotated[int | None, typer.Option(help="Random seed for sampling.")] = None,
    chat: Annotated[bool, typer.Option(help="Wrap the prompt in the model's chat template.")] = False,
    no_eos: Annotated[bool, typer.Option("--no-eos", help="Ignore the end-of-sequence token.")] = False,
) -> None:
    """Generate text through the swarm, streaming tokens as they arrive."""
    setup_logging("WARNING")
    import torch
    from transformers import AutoTokenizer

    from stamen.client.model import AutoDistributedModelForCausalLM

    if seed is not None:
        torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(model)
    dmodel = AutoDistributedModelForCausalLM.from_pretrained(model, client.initial_peers, **_client_kwargs(client))
    try:
        if chat and tokenizer.chat_template:
            ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                                return_tensors="pt", return_dict=True)["input_ids"]
        else:
            ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
        streamer = TimedTextStreamer(tokenizer)
        with dmodel.inference_session(max_length=ids.shape[1] + max_new_tokens) as session:
            print(f"route: {session.describe_route()}", file=sys.stderr)
            dmodel.generate(ids, max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature,
                            top_k=top_k, top_p=top_p, repetition_penalty=repetition_penalty, streamer=streamer,
                            **({"eos_token_id": None} if no_eos else {}))
        print(file=sys.stdout)
        print(streamer.summary(), file=sys.stderr)
    finally:
        dmodel.shutdown()


@app.command()
def convert(
    src: Annotated[str, typer.Argument(help="A .gguf file, a directory with one, or `smollm2` (packaged default).")],
    out: Annotated[Path, typer.Argument(help="Hugging Face model directory to write.")],
    dtype: Annotated[str, typer.Option(help="float32, bfloat16 or float16.")] = "float32",
    force: Annotated[bool, typer.Option(help="Convert again even if OUT holds this conversion.")] = False,
) -> None:
    """Write a Hugging Face model directory (safetensors, config, tokenizer, chat template) from GGUF."""
    setup_logging("WARNING")
    from stamen.errors import CheckpointError
    from stamen.models.config import DTYPES
    from stamen.models.convert import convert_gguf

    if dtype not in DTYPES:
        raise typer.BadParameter(f"dtype must be one of {sorted(DTYPES)}")
    try:
        convert_gguf(src, out, DTYPES[dtype], force=force)
    except CheckpointError as e:
        raise typer.BadParameter(str(e)) from None


@app.command()
@config_options(ClientConfig, "client", include=CLIENT_FIELDS)
def chat(
    model: ModelArg,
    client: ClientConfig,
    max_new_tokens: Annotated[int, typer.Option(help="Most tokens per answer.")] = 256,
    max_length: Annotated[int, typer.Option(help="Tokens the conversation's session can hold.")] = 2048,
    temperature: Annotated[float, typer.Option(help="0 means greedy.")] = 0.0,
    top_p: Annotated[float, typer.Option()] = 1.0,
    seed: Annotated[int | None, typer.Option(help="Random seed for sampling.")] = None,
    system: Annotated[str | None, typer.Option(help="A system message.")] = None,
) -> None:
    """Chat in the terminal: one inference session across turns, streamed answers; Ctrl-C stops an answer."""
    setup_logging("WARNING")
    from stamen.cli.chat import run_chat

    run_chat(model, client.initial_peers, max_new_tokens=max_new_tokens, max_length=max_length,
             temperature=temperature, top_p=top_p, seed=seed, system=system, dht_prefix=client.dht_prefix)


@app.command()
@config_options(ClientConfig, "client", include=INFERENCE_FIELDS)
def api(
    model: ModelArg,
    client: ClientConfig,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    model_id: Annotated[str | None, typer.Option(help="The model name clients send (default: the swarm's).")] = None,
    default_max_tokens: Annotated[int, typer.Option(help="New tokens when a request sets no limit.")] = 256,
    log_level: Annotated[str, typer.Option(help="uvicorn log level.")] = "info",
) -> None:
    """Serve an OpenAI-compatible HTTP API (chat completions, completions, models) over the swarm."""
    setup_logging("INFO")
    check_port_free(host, port, "serve the API")  # at once: uvicorn would find it busy only after joining the swarm
    import uvicorn
    from transformers import AutoTokenizer

    from stamen.api.app import create_app
    from stamen.api.engine import Engine
    from stamen.client.model import AutoDistributedModelForCausalLM
    from stamen.types import default_dht_prefix

    tokenizer = AutoTokenizer.from_pretrained(model)
    dmodel = AutoDistributedModelForCausalLM.from_pretrained(model, client.initial_peers, wait_for_servers=False,
                                                             **_client_kwargs(client))
    try:
        engine = Engine(dmodel, tokenizer, model_id or client.dht_prefix or default_dht_prefix(model),
                        default_max_tokens=default_max_tokens)
        logging.getLogger(__name__).info("serving %s at http://%s:%d/v1", engine.model_id, host, port)
        uvicorn.run(create_app(engine), host=host, port=port, log_level=log_level)
    finally:
        dmodel.shutdown()


@app.command()
@config_options(ClientConfig, "client", include=CLIENT_FIELDS)
def dashboard(
    model: ModelArg,
    client: ClientConfig,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8001,
    period: Annotated[float, typer.Option(help="Seconds between readings of the swarm.")] = 2.0,
    log_level: Annotated[str, typer.Option(help="uvicorn log level.")] = "warning",
) -> None:
    """Serve a live view of the swarm in the browser: every block with its servers and their states,
    throughput and free cache, uncovered blocks, the bottleneck, and an hour of history (the page
    at /, its data at /api/health, the same view as `stamen health --json`, and /api/history)."""
    setup_logging("INFO")
    import uvicorn

    from stamen.api.dashboard import SwarmWatcher, create_dashboard
    from stamen.client.health import read_health
    from stamen.dht.node import create_dht
    from stamen.models import load_block_config
    from stamen.process import check_port_free
    from stamen.types import ModelName, default_dht_prefix

    check_port_free(host, port, "serve the dashboard")
    num_blocks = load_block_config(model).num_blocks
    name = ModelName(client.dht_prefix or default_dht_prefix(model))
    node = create_dht(client.initial_peers, client_mode=True)
    watcher = SwarmWatcher(lambda: read_health(node, name, num_blocks), period).start()
    logging.getLogger(__name__).info("dashboard of %s at http://%s:%d/", name, host, port)
    try:
        uvicorn.run(create_dashboard(watcher), host=host, port=port, log_level=log_level)
    finally:
        watcher.stop()
        node.shutdown()


@app.command()
@config_options(ClientConfig, "client", include=CLIENT_FIELDS)
def health(
    model: ModelArg,
    client: ClientConfig,
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Print the swarm: servers with span, state, throughput, free cache, version; per-block coverage
    by the live servers (online servers are pinged: one that does not answer is not counted); training
    stages with their peers and epochs."""
    setup_logging("WARNING")
    from stamen.client.health import format_stages, read_health
    from stamen.dht.health import format_health
    from stamen.models import load_block_config
    from stamen.server.server import start_dht
    from stamen.types import ModelName, default_dht_prefix

    num_blocks = load_block_config(model).num_blocks
    name = ModelName(client.dht_prefix or default_dht_prefix(model))
    node = start_dht(client.initial_peers, "127.0.0.1", 0, client_mode=True)
    try:
        report = read_health(node, name, num_blocks)
    finally:
        node.shutdown()
    stages = format_stages(report.stages)
    print(report.model_dump_json(indent=2) if json_out else format_health(report) + ("\n" + stages if stages else ""))


SIM_FIELDS = {"num_servers": CliField(name="servers"), "num_blocks": CliField(name="blocks"),
              "churn_per_hour": CliField(name="churn"), "min_memory_blocks": CliField(name="min_memory"),
              "max_memory_blocks": CliField(name="max_memory")}
"""``stamen simulate`` options named shorter than their ``SimConfig`` fields."""


@app.command()
@config_options(SimConfig, "config", SIM_FIELDS)
def simulate(
    config: SimConfig,
    baseline: Annotated[bool, typer.Option(help="Also run the same swarm without rebalancing.")] = False,
    png: Annotated[Path | None, typer.Option(help="Write the plot here.")] = Path("simulate.png"),
    json_path: Annotated[Path | None, typer.Option("--json", help="Write the summary here.")] = Path("simulate.json"),
) -> None:
    """Simulate a swarm of virtual servers placing themselves with the real placement code."""
    from stamen.sim.report import run_and_report

    run_and_report(config, baseline, png, json_path)


@app.command("make-model")
def make_model(
    out: Annotated[Path, typer.Argument(help="Directory to write.")],
    preset: Annotated[str, typer.Option(help="tiny, small (demo) or 246m (benchmark).")] = "small",
    seed: Annotated[int, typer.Option()] = 0,
) -> None:
    """Create a random Llama-architecture model in the Hugging Face format (nothing is downloaded)."""
    from stamen.testing.models import PRESETS, save_random_llama

    if preset not in PRESETS:
        raise typer.BadParameter(f"preset must be one of {sorted(PRESETS)}")
    save_random_llama(out, PRESETS[preset], seed=seed)
    print(out)


def main() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # libgomp's idle OpenMP workers spin 300 000 times by default after every parallel region,
    # holding a core for milliseconds; when a client and servers share cores, that core is the one
    # the next hop computes on, and a 2-thread team then waits for it at every barrier. 3 000 spins
    # release the core within a fraction of a millisecond yet still cover the gaps between the
    # parallel regions of a step, so compute in one process is unchanged while servers sharing
    # cores do not stall each other (docs/benchmarks.md, GOMP_SPINCOUNT). Read when torch loads.
    os.environ.setdefault("GOMP_SPINCOUNT", "3000")
    debug = _debug_requested()
    try:
        code = app(standalone_mode=False)
    except NoArgsIsHelpError as e:
        e.show()
        code = e.exit_code
    except UsageError as e:  # bad usage: one line, with where to read more
        hint = f" (see '{e.ctx.command_path} --help')" if e.ctx is not None else ""
        print(f"error: {e.format_message()}{hint}", file=sys.stderr)
        code = e.exit_code
    except ClickException as e:
        print(f"error: {e.format_message()}", file=sys.stderr)
        code = e.exit_code
    except typer.Abort:
        print("aborted", file=sys.stderr)
        code = 1
    except StamenError as e:  # the project's typed errors: their message is the whole story
        if debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        code = 1
    sys.exit(code if isinstance(code, int) else 0)


DEBUG_ENV = "STAMEN_DEBUG"
"""Set to 1 (or pass --debug anywhere on the command line) to get tracebacks instead of one-line errors."""


def _debug_requested() -> bool:
    """Whether tracebacks are wanted: ``--debug`` anywhere before ``--`` (taken out of the
    arguments, so every command accepts it) or ``STAMEN_DEBUG=1``."""
    args = sys.argv[1:]
    end = args.index("--") if "--" in args else len(args)
    if "--debug" in args[:end]:
        del sys.argv[1 + args.index("--debug")]
        os.environ[DEBUG_ENV] = "1"  # the processes a command starts (LocalSwarm's servers) inherit it
    return os.environ.get(DEBUG_ENV, "") not in ("", "0")


@app.callback()
def _root(
    debug: Annotated[bool, typer.Option("--debug", help=f"Show tracebacks instead of one-line errors "
                                        f"(also {DEBUG_ENV}=1).")] = False,
) -> None:
    """Stamen: run large language models over a swarm of peers."""


if __name__ == "__main__":
    main()
