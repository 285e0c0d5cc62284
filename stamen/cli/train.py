"""``stamen train``: train a model's own weights on the swarm's training stages (SWARM parallelism)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Annotated

import typer

from stamen.cli.logs import setup_logging
from stamen.cli.options import config_options
from stamen.client.config import ClientConfig
from stamen.client.train_config import TrainerConfig
from stamen.server.config import missing_local_dir

TRAIN_CLIENT_FIELDS = ("initial_peers", "dht_prefix", "connect_timeout", "request_timeout", "max_retries",
                       "ban_timeout", "refresh_period", "route_grace", "allowed_servers", "blocked_servers")
"""The swarm options of ``stamen train`` (the rest keep ``ClientConfig``'s defaults)."""


def _existing_model(model: str) -> str:
    if missing_local_dir(model):
        raise typer.BadParameter(f"no such directory: {model}")
    return model


@config_options(ClientConfig, "client", include=TRAIN_CLIENT_FIELDS)
@config_options(TrainerConfig, "trainer")
def train(
    model: Annotated[str, typer.Argument(help="Hugging Face model directory or hub id (the one the training "
                                              "servers serve).", callback=_existing_model)],
    client: ClientConfig,
    trainer: TrainerConfig,
    data: Annotated[Path, typer.Option(help="A UTF-8 text file to train on.", exists=True, dir_okay=False)],
    steps: Annotated[int, typer.Option(help="Optimizer steps to run.", min=1)] = 10,
    local_batch: Annotated[int, typer.Option(help="Sequences this trainer computes per step.", min=1)] = 32,
    seq_len: Annotated[int, typer.Option(help="Tokens per sequence.", min=2)] = 128,
    seed: Annotated[int, typer.Option(help="Seed of the batches drawn from the text.")] = 0,
    trainer_index: Annotated[int | None, typer.Option(
        help="This trainer's index among the trainers: with --seed, which batches it draws at each step "
             "(default: derived from its peer id, so trainers draw different batches).")] = None,
    save: Annotated[Path | None, typer.Option(help="After the last step, write the trained model here as a "
                                                   "Hugging Face directory.")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print a JSON summary at the end.")] = False,
) -> None:
    """Train the model's blocks on the swarm's --train servers and its embeddings, norm and head here,
    averaging them with the other trainers; a progress bar shows the loss and tokens/s."""
    setup_logging("WARNING")
    import zlib

    from tqdm.auto import tqdm
    from transformers import AutoTokenizer

    from stamen.client.swarm_train import SwarmTrainer
    from stamen.train.data import TextDataset

    tokenizer = AutoTokenizer.from_pretrained(model)
    dataset = TextDataset.from_file(data, tokenizer, seq_len, seed)
    started = time.perf_counter()
    with SwarmTrainer(model, client.initial_peers, trainer=trainer,
                      **client.model_dump(exclude={"initial_peers"})) as swarm_trainer:
        index = trainer_index if trainer_index is not None else zlib.crc32(swarm_trainer.peer_id.encode())
        bar = tqdm(total=steps, desc="training", unit="step", dynamic_ncols=True, disable=json_out)
        losses = []
        for step in range(steps):
            result = swarm_trainer.train_step(dataset.batch(step, local_batch, index))
            losses.append(result.loss)
            bar.set_postfix(loss=f"{result.loss:.4f}", tok_s=f"{result.tokens / result.seconds:.0f}")
            bar.update(1)
        bar.close()
        stats = swarm_trainer.stats
        averager = swarm_trainer.averager
        summary = dict(
            steps=stats.steps, tokens=stats.tokens, seconds=round(stats.seconds, 3),
            tokens_per_s=round(stats.tokens / stats.seconds, 1) if stats.seconds else None,
            initial_loss=losses[0], final_loss=losses[-1], losses=losses, reruns=stats.reruns, top_ups=stats.top_ups,
            target_batch_size=swarm_trainer.target_batch_size, averaging=trainer.averaging,
            averager_rounds=averager.rounds, averager_bytes=averager.averager.bytes_sent,
            dataset_sequences=len(dataset), saved=None)
        if save is not None:
            summary["saved"] = str(swarm_trainer.save(save))
            if not json_out:
                print(f"saved the trained model to {save}", file=sys.stderr)
    summary["wall_seconds"] = round(time.perf_counter() - started, 3)
    if json_out:
        print(json.dumps(summary))
    else:
        print(f"{stats.steps} steps, loss {losses[0]:.4f} -> {losses[-1]:.4f}, "
              f"{summary['tokens_per_s']} tokens/s", file=sys.stderr)
