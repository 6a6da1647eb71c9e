"""`hyrun data prepare`: the command-line shell over `prepare.prepare`. numpy, pydantic and tokenizers
load only when the command runs, so `hyrun --help` stays fast."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

app = typer.Typer(help="Prepare real training data: token shards, a tokenizer, a manifest.", no_args_is_help=True,
                  rich_markup_mode=None)


@app.command("prepare")
def prepare_cmd(
    sources: Annotated[list[str], typer.Argument(help="NAME=PATH per source: a file, or a directory walked "
                                                      "recursively (.jsonl/.ndjson: JSON lines, .parquet: "
                                                      "Parquet, anything else: one text document per file)")],
    out: Annotated[Path, typer.Option("--out", help="directory to write (a rerun finishes an interrupted one)")],
    tokenizer: Annotated[Optional[Path], typer.Option(help="a Hugging Face tokenizers JSON file", exists=True,
                                                      dir_okay=False)] = None,
    train_tokenizer: Annotated[Optional[int], typer.Option("--train-tokenizer", metavar="VOCAB",
                                                           help="train a byte-level BPE of VOCAB tokens on the "
                                                                "corpus instead")] = None,
    glob: Annotated[Optional[list[str]], typer.Option(help="keep only files matching (e.g. '*.py'); repeatable")] = None,
    jsonl_field: Annotated[str, typer.Option(help="the JSONL field (or Parquet column) holding the text")] = "text",
    eos_token: Annotated[Optional[str], typer.Option(help="end-of-document token of --tokenizer (default: the "
                                                          "first of <eos>, </s>, <|endoftext|>, ... it has)")] = None,
    val_fraction: Annotated[float, typer.Option(help="share of documents held out for validation")] = 0.01,
    workers: Annotated[int, typer.Option(help="encoding processes (0: one per core)")] = 0,
    part_mib: Annotated[float, typer.Option(help="MiB of input per part (the unit a rerun skips)")] = 8.0,
    force: Annotated[bool, typer.Option("--force", help="replace a different corpus already in --out")] = False,
) -> None:
    """Tokenize text, JSONL or Parquet sources into memory-mapped shards: per source and split (train,
    val) a .bin of token ids and an index of document ends, plus manifest.json with the tokenizer and
    every input's SHA-256. Interrupted runs are finished by running the same command again."""
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TimeRemainingColumn, TransferSpeedColumn

    from hyrun.runtime.data.prepare import PrepareSettings, prepare
    from hyrun.runtime.data.sources import DataError, parse_source

    err = Console(stderr=True)
    try:
        settings = PrepareSettings(
            out=out, sources=tuple(parse_source(s) for s in sources), globs=tuple(glob or ()), field=jsonl_field,
            tokenizer=tokenizer, train_vocab=train_tokenizer, eos_token=eos_token, val_fraction=val_fraction,
            workers=workers, part_bytes=max(1, int(part_mib * 2**20)), force=force,
        )  # fmt: skip
        with Progress("[progress.description]{task.description}", BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                      TimeRemainingColumn(), console=err, transient=True, disable=not err.is_terminal) as bar:
            task = bar.add_task("encoding", total=None)
            result = prepare(settings, progress=lambda done, total: bar.update(task, completed=done, total=total),
                             say=lambda text: bar.update(task, description=text))
    except DataError as error:
        err.print(f"[bold red]error:[/] {error}", highlight=False, soft_wrap=True)
        raise typer.Exit(2)
    except KeyboardInterrupt:
        err.print("interrupted: finished parts are kept; run the same command again to go on")
        raise typer.Exit(130)
    manifest = result.manifest
    if result.up_to_date:
        print(f"{out} is up to date ({result.tokens:,} tokens)")
        return
    speed = result.tokens / result.wall_s if result.wall_s else 0.0
    print(f"prepared {out}: {result.tokens:,} tokens in {result.wall_s:.1f} s ({speed:,.0f} tokens/s), "
          f"{result.parts_written} parts encoded, {result.parts_reused} reused; vocab {manifest.tokenizer.vocab_size} "
          f"({manifest.dtype}), eos {manifest.tokenizer.eos_token}={manifest.tokenizer.eos_id}")
    for name, source in manifest.sources.items():
        train, val = source.splits["train"], source.splits["val"]
        print(f"  {name}: {len(source.inputs)} files, train {train.documents:,} documents / {train.tokens:,} tokens, "
              f"val {val.documents:,} / {val.tokens:,}")
