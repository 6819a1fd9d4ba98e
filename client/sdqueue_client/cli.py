"""`sdq`: the command line for sdqueue (generate, status, cancel, models, queue, watch; train, trainings,
datasets, delete-dataset).

Why exit codes by family: scripts branch on them. 0 ok, 1 the API refused or
the job failed, 2 usage (argparse's own), 3 the service could not be reached,
130 Ctrl-C. Every error is one line on stderr: `sdq: error: <what>`.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from tqdm import tqdm

from sdqueue_client import __version__
from sdqueue_client.aio import AsyncClient
from sdqueue_client.client import Client
from sdqueue_client.config import ENV_KEY, ENV_URL, Config, ConfigError, default_path, load
from sdqueue_client.core import image_urls
from sdqueue_client.errors import ApiError, Conflict, ConnectionProblem, JobFailed, SdqError, Unauthorized
from sdqueue_client.events import Event
from sdqueue_client.files import dataset_files, image_name, infotext, png_size, save_image

OK, FAILED, USAGE, UNREACHABLE, INTERRUPTED = 0, 1, 2, 3, 130
FORMATS = ("png", "jpg", "jpeg", "webp")


# -- arguments ---------------------------------------------------------------------------------------------
def size(text: str) -> Tuple[int, int]:
    """`768x512` -> (768, 512)."""
    width, sep, height = text.lower().partition("x")
    if not sep or not width.isdigit() or not height.isdigit():
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT such as 768x512, got {text!r}")
    return int(width), int(height)


def lora(text: str) -> Dict[str, Any]:
    """`name` or `name:weight` -> {"name": ..., "weight": ...} (an entry of `loras`)."""
    name, sep, weight = text.rpartition(":") if ":" in text else (text, "", "")
    if not name:
        raise argparse.ArgumentTypeError(f"expected NAME or NAME:WEIGHT, got {text!r}")
    try:
        return {"name": name, "weight": float(weight)} if sep else {"name": name}
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected NAME:WEIGHT with a number as the weight, got {text!r}") from None


def image_folder(text: str) -> Path:
    """A folder with at least one image to train on; a usage error (exit 2) before anything is uploaded."""
    path = Path(text)
    if not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is not a folder")
    if not dataset_files(path):
        raise argparse.ArgumentTypeError(f"no images (png, jpg, jpeg, webp) in {text}")
    return path


def common_options(suppress: bool = True) -> argparse.ArgumentParser:
    """The global options, accepted before or after the command (`sdq status ID --json`).

    After the command their defaults are SUPPRESS, so an option given before it is not reset.
    """
    common = argparse.ArgumentParser(add_help=False, argument_default=argparse.SUPPRESS if suppress else None)
    common.add_argument("--url", help=f"the service's base URL (env {ENV_URL}; default http://localhost:8000)")
    common.add_argument("--key", help=f"the API key (env {ENV_KEY})")
    common.add_argument("--config", type=Path, help=f"a TOML or INI file with url and key (default {default_path()})")
    common.add_argument("--timeout", type=float, help="seconds per HTTP request (default 30)")
    common.add_argument("--retries", type=int, help="retries on connection errors, 429 and 503 (default 4)")
    common.add_argument("--json", action="store_true", help="print JSON instead of text")
    return common


def build_parser() -> argparse.ArgumentParser:
    common = common_options()
    parser = argparse.ArgumentParser(prog="sdq", description="Generate images and train LoRAs with an sdqueue service.",
                                     parents=[common_options(suppress=False)],
                                     epilog=f"Settings: flags > {ENV_URL} / {ENV_KEY} > the config file > defaults.")
    parser.add_argument("--version", action="version", version=f"sdq {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    gen = commands.add_parser("generate", help="generate images and save them", parents=[common])
    gen.add_argument("prompt", nargs="+", help="a prompt; several prompts run as several jobs")
    gen.add_argument("-n", "--num-images", type=int, help="images per prompt")
    gen.add_argument("--size", type=size, help="WIDTHxHEIGHT, e.g. 768x512")
    gen.add_argument("--steps", type=int, help="denoising steps")
    gen.add_argument("--guidance", type=float, help="CFG scale")
    gen.add_argument("--seed", type=int, help="the first image's seed (image n uses seed + n)")
    gen.add_argument("--negative", help="negative prompt")
    gen.add_argument("--model", help="a model of `sdq models`")
    gen.add_argument("--scheduler", help="e.g. EulerDiscreteScheduler")
    gen.add_argument("--lora", type=lora, action="append", metavar="NAME[:WEIGHT]",
                     help="apply a LoRA (yours from `sdq train`, or the service's); repeatable")
    gen.add_argument("--format", choices=FORMATS, help="image format (default png)")
    gen.add_argument("--out", type=Path, default=Path("."), help="where to save the images (default: here)")
    gen.add_argument("--no-progress", action="store_true", help="no progress bars")

    for name, text in (("status", "show a task"), ("cancel", "cancel a task"), ("watch", "print a task's events")):
        commands.add_parser(name, help=text, parents=[common]).add_argument("task_id")
    commands.add_parser("models", help="list the models", parents=[common])
    commands.add_parser("queue", help="this key's waiting and running tasks", parents=[common])
    add_train(commands, common)
    listing = commands.add_parser("trainings", help="this key's training jobs, newest first", parents=[common])
    listing.add_argument("--limit", type=int, default=20, help="how many (default 20)")
    listing.add_argument("--offset", type=int, default=0, help="skip the newest OFFSET")
    commands.add_parser("datasets", help="this key's training datasets", parents=[common])
    commands.add_parser("delete-dataset", help="remove a dataset and its files",
                        parents=[common]).add_argument("dataset")
    commands.add_parser("loras", help="the LoRAs this key may use (shared, and its own)", parents=[common])
    commands.add_parser("delete-lora", help="delete one of this key's own LoRAs",
                        parents=[common]).add_argument("lora")
    return parser


def add_train(commands: Any, common: argparse.ArgumentParser) -> None:
    """`sdq train DIR --name NAME ...`: the options map to POST /api/v1/trainings fields (TRAIN_FIELDS)."""
    train = commands.add_parser("train", help="upload a folder of images as a dataset and train a LoRA on it",
                                parents=[common])
    train.add_argument("folder", type=image_folder, metavar="DIR",
                       help="images (png, jpg, jpeg, webp), each with an optional caption file of its stem (.txt)")
    train.add_argument("--name", required=True, help="the dataset's name (it must not exist yet)")
    train.add_argument("--model", help="the base model (default: the service's default model)")
    length = train.add_mutually_exclusive_group()
    length.add_argument("--steps", type=int, help="optimizer steps (default 500)")
    length.add_argument("--epochs", type=int, help="passes over the dataset, instead of --steps")
    train.add_argument("--rank", type=int, help="LoRA rank (default 8)")
    train.add_argument("--lr", type=float, help="learning rate (default 1e-4)")
    train.add_argument("--resolution", type=int, help="training side in pixels, a multiple of 64 (default: the "
                                                      "model's)")
    train.add_argument("--trigger", help="a word put first in every caption, to call up what was learned")
    train.add_argument("--lora-name", help="the LoRA's name (default: DATASET-<job id>)")
    train.add_argument("--seed", type=int, help="the same seed, data and settings train the same LoRA")
    train.add_argument("--no-wait", action="store_true", help="print the training id once queued and exit")
    train.add_argument("--no-progress", action="store_true", help="no progress bar")


TRAIN_FIELDS = {"model": "model", "steps": "max_steps", "epochs": "epochs", "rank": "rank", "lr": "learning_rate",
                "resolution": "resolution", "trigger": "trigger_word", "lora_name": "lora_name", "seed": "seed"}


def training_params(args: argparse.Namespace) -> Dict[str, Any]:
    """The POST /api/v1/trainings fields the options set (unset ones are left to the server)."""
    return {field: getattr(args, option) for option, field in TRAIN_FIELDS.items()
            if getattr(args, option) is not None}


def request_params(args: argparse.Namespace, prompt: str) -> Dict[str, Any]:
    """The POST /api/v1/generate body of one prompt (unset options are left to the server)."""
    width, height = args.size or (None, None)
    return {"prompt": prompt, "negative_prompt": args.negative, "num_images": args.num_images, "width": width,
            "height": height, "num_inference_steps": args.steps, "guidance_scale": args.guidance, "seed": args.seed,
            "model": args.model, "scheduler": args.scheduler, "output_format": args.format, "loras": args.lora}


# -- generate ----------------------------------------------------------------------------------------------
class JobBar:
    """One tqdm bar per job, moved by its events."""

    def __init__(self, position: int, label: str, enabled: bool):
        self.bar = tqdm(total=None, position=position, desc=label, unit="step", leave=True, disable=not enabled,
                        file=sys.stderr, dynamic_ncols=True)

    def on_event(self, event: Event) -> None:
        data = event.data if isinstance(event.data, dict) else {}
        if event.type == "queued":
            place = data.get("queue_position")
            self.bar.set_postfix_str(f"queued #{place}" if place else "queued")
        elif event.type == "started":
            self.bar.set_postfix_str(f"on {data.get('worker')}")
        elif event.type == "progress" and data.get("total"):
            self.advance(int(data["step"]), int(data["total"]))
        elif event.final:
            progress = data.get("progress") or {}
            if event.type == "completed" and (self.bar.total or progress.get("total")):
                total = int(progress.get("total") or self.bar.total)
                self.advance(total, total)
            self.bar.set_postfix_str(event.type)

    def advance(self, step: int, total: int) -> None:
        if self.bar.total != total:
            self.bar.reset(total=total)
        self.bar.update(step - self.bar.n)

    def close(self) -> None:
        self.bar.close()


async def generate_one(client: AsyncClient, params: Dict[str, Any], out: Path, position: int, progress: bool,
                       submitted: List[str]) -> List[Path]:
    """Submit one job, follow it (a bar from its submission on), save its images; the paths written."""
    task_id = await client.submit(**params)
    submitted.append(task_id)
    bar = JobBar(position, task_id[:8], progress)
    try:
        result = client.core.result(await client.wait(task_id, on_event=bar.on_event), client)
    finally:
        bar.close()
    submitted.remove(task_id)
    paths = []
    for index, url in enumerate(result.urls):
        seed = result.seeds[index] if index < len(result.seeds) else None
        data = await client.download(url)
        text = infotext(params, seed, png_size(data), result.task.get("model"))
        paths.append(save_image(data, out / image_name(task_id, index, seed, url), text))
    return paths


async def generate_all(config: Config, args: argparse.Namespace, submitted: List[str]) -> List[Any]:
    """Every prompt's job at once; each entry is a list of paths or the exception that job ended with."""
    async with AsyncClient(config.url, config.key, timeout=config.timeout, retries=config.retries,
                           header=config.header) as client:
        jobs = [generate_one(client, request_params(args, prompt), args.out, i, not args.no_progress, submitted)
                for i, prompt in enumerate(args.prompt)]
        return await asyncio.gather(*jobs, return_exceptions=True)


def run_generate(config: Config, args: argparse.Namespace) -> int:
    submitted: List[str] = []
    try:
        outcomes = asyncio.run(generate_all(config, args, submitted))
    except KeyboardInterrupt:
        if submitted:
            report(f"interrupted; still queued or running: {', '.join(submitted)} (sdq cancel ID stops one)")
        raise
    errors = [o for o in outcomes if isinstance(o, BaseException)]
    for paths in outcomes:
        if not isinstance(paths, BaseException):
            for path in paths:
                print(path)
    for error in errors:
        if not isinstance(error, SdqError):
            raise error
        report(describe(error, config))
    if any(isinstance(e, ConnectionProblem) for e in errors):
        return UNREACHABLE
    return FAILED if errors else OK


# -- train -------------------------------------------------------------------------------------------------
class TrainingBar(JobBar):
    """A job's bar whose postfix is the latest loss while it trains."""

    loss: Optional[float] = None

    def on_event(self, event: Event) -> None:
        super().on_event(event)
        data = event.data if isinstance(event.data, dict) else {}
        if event.type == "progress" and data.get("loss") is not None:
            self.loss = float(data["loss"])
        if self.loss is not None and (event.type == "progress" or event.final):
            self.bar.set_postfix_str(f"loss={self.loss:.4f}" + (f", {event.type}" if event.final else ""))


def run_train(client: Client, args: argparse.Namespace) -> int:
    """Upload DIR as a dataset, queue a training on it, follow it with a bar; print the LoRA's name.

    A training the service refuses (a bad value) removes the dataset this run made, so the same command,
    corrected, can run again under the same --name.
    """
    try:
        dataset = client.create_dataset(args.name, dataset_files(args.folder))
    except Conflict:
        hint(f"pick another --name, or remove the old dataset: sdq delete-dataset {args.name}")
        raise
    images = [f for f in dataset["files"] if f.get("type") == "image"]
    captioned = sum(1 for f in images if f.get("caption"))
    hint(f"dataset {args.name}: {len(images)} images ({captioned} with captions) uploaded and checked")
    try:
        training_id = client.start_training(args.name, **training_params(args))
    except ApiError:
        forget_dataset(client, args.name)
        raise
    if args.no_wait:
        print(json.dumps(client.training(training_id), indent=2) if args.json else training_id)
        hint(f"queued; follow it with `sdq watch {training_id}`, stop it with `sdq cancel {training_id}`")
        return OK
    bar = TrainingBar(0, f"training {training_id[:8]}", not args.no_progress)
    try:
        try:
            client.core.trained(client.wait(training_id, on_event=bar.on_event))
        finally:
            bar.close()
    except KeyboardInterrupt:
        report(f"interrupted; training {training_id} goes on (sdq cancel {training_id} stops it)")
        raise
    body = client.training(training_id)
    print(json.dumps(body, indent=2) if args.json else body["lora"]["name"])
    name = body["lora"]["name"]
    hint(f"LoRA {name} is ready: sdq generate \"a prompt\" --lora {name} (API: \"loras\": [{{\"name\": \"{name}\"}}])")
    return OK


def forget_dataset(client: Client, name: str) -> None:
    """Delete the dataset this run made; the refusal that stopped the run is the error worth reporting."""
    try:
        client.delete_dataset(name)
    except SdqError:
        pass


def show_trainings(body: Dict[str, Any]) -> str:
    if not body.get("trainings"):
        return "no training jobs"
    rows = []
    for t in body["trainings"]:
        progress = t.get("progress") or {}
        done = f"{progress.get('step')}/{progress.get('total')}" if progress.get("total") else None
        loss = f"{t['loss']:.4f}" if t.get("loss") is not None else None
        rows.append((t.get("id"), t.get("status"), t.get("dataset"), done, loss, (t.get("lora") or {}).get("name")
                     or t.get("lora_name"), t.get("created_at")))
    return table(("TRAINING", "STATUS", "DATASET", "PROGRESS", "LOSS", "LORA", "CREATED"), rows)


def show_datasets(datasets: List[Dict[str, Any]]) -> str:
    if not datasets:
        return "no datasets"
    rows = []
    for d in datasets:
        images = [f for f in d.get("files") or [] if f.get("type") == "image"]
        rows.append((d.get("name"), d.get("status"), len(images), sum(1 for f in images if f.get("caption")),
                     d.get("created_at")))
    return table(("DATASET", "STATUS", "IMAGES", "CAPTIONED", "CREATED"), rows)


# -- the other commands ------------------------------------------------------------------------------------
def show_task(task: Dict[str, Any]) -> str:
    progress = task.get("progress") or {}
    rows = [("task", task.get("task_id")), ("status", task.get("status")),
            ("progress", f"{progress.get('step', 0)}/{progress.get('total', 0)}" if progress else None),
            ("queue", task.get("queue_position")), ("model", task.get("model")),
            ("seeds", ", ".join(str(s) for s in task.get("seeds") or []) or None),
            ("created", task.get("created_at")), ("error", task.get("error_message"))]
    lines = [f"{name:<9}{value}" for name, value in rows if value not in (None, "")]
    lines += [f"{'image' if i == 0 else '':<9}{url}" for i, url in enumerate(image_urls(task))]
    return "\n".join(lines)


def table(headers: Sequence[str], rows: List[Sequence[Any]]) -> str:
    """Left-aligned columns as wide as their widest cell."""
    cells = [[str(h) for h in headers]] + [["-" if c is None else str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells)


def show_models(body: Dict[str, Any]) -> str:
    rows = [(m.get("name"), m.get("family"), f"{m.get('width')}x{m.get('height')}",
             (m.get("defaults") or {}).get("steps"), "yes" if m.get("loaded") else "no",
             "*" if m.get("default") else "") for m in body.get("models", [])]
    rows += [(m.get("name"), m.get("family"), None, None, None, f"own ({m.get('source')})")
             for m in body.get("own", [])]
    return table(("NAME", "FAMILY", "SIZE", "STEPS", "LOADED", "DEFAULT"), rows)


def show_loras(loras: List[Dict[str, Any]]) -> str:
    if not loras:
        return "no LoRAs"
    return table(("LORA", "SOURCE", "FAMILY", "BASE MODEL"),
                 [(entry.get("name"), entry.get("source"), entry.get("family"), entry.get("base_model"))
                  for entry in loras])


def show_queue(tasks: List[Dict[str, Any]]) -> str:
    if not tasks:
        return "no waiting or running tasks"
    rows = []
    for t in tasks:
        progress = t.get("progress") or {}
        done = f"{progress.get('step')}/{progress.get('total')}" if progress.get("total") else None
        rows.append((t.get("task_id"), t.get("status"), t.get("queue_position"), done, t.get("model"),
                     t.get("created_at")))
    return table(("TASK", "STATUS", "POSITION", "PROGRESS", "MODEL", "CREATED"), rows)


def show_event(event: Event) -> str:
    data = event.data if isinstance(event.data, dict) else {}
    if event.type == "queued":
        text = f"position {data['queue_position']}" if data.get("queue_position") else ""
    elif event.type == "started":
        text = f"worker {data.get('worker')} model {data.get('model')}"
    elif event.type == "progress":
        text = f"step {data.get('step')}/{data.get('total')}"
        if data.get("eta_seconds") is not None:
            text += f" eta {data['eta_seconds']:.1f}s"
    elif event.type == "preview":
        text = f"step {data.get('step')}/{data.get('total')} {data.get('width')}x{data.get('height')} preview"
    elif event.final:
        text = " ".join(image_urls(data)) or data.get("error_message") or ""
    else:
        text = json.dumps(event.data) if data else str(event.data)
    return f"{event.type:<10} {text}".rstrip()


def run_watch(client: Client, args: argparse.Namespace) -> int:
    def echo(event: Event) -> None:
        print(json.dumps({"type": event.type, "id": event.id, "data": event.data}) if args.json
              else show_event(event), flush=True)

    task = client.wait(args.task_id, on_event=echo)
    if task.get("status") != "completed":
        raise JobFailed(task)
    return OK


def run_simple(client: Client, args: argparse.Namespace) -> int:
    """status, cancel, models, queue, trainings, datasets, delete-dataset, loras, delete-lora: one call, one
    printout."""
    if args.command == "status":
        body: Any = client.status(args.task_id)
        text = show_task(body)
    elif args.command == "cancel":
        body = client.cancel(args.task_id)
        text = show_task(body)
    elif args.command == "models":
        body = client.models()
        text = show_models(body)
    elif args.command == "trainings":
        body = client.trainings(limit=args.limit, offset=args.offset)
        text = show_trainings(body)
    elif args.command == "datasets":
        body = client.datasets()
        text = show_datasets(body)
    elif args.command == "delete-dataset":
        client.delete_dataset(args.dataset)
        body, text = {"deleted": args.dataset}, f"deleted {args.dataset}"
    elif args.command == "loras":
        body = client.loras()
        text = show_loras(body)
    elif args.command == "delete-lora":
        client.delete_lora(args.lora)
        body, text = {"deleted": args.lora}, f"deleted {args.lora}"
    else:
        body = client.queue()
        text = show_queue(body)
    print(json.dumps(body, indent=2, ensure_ascii=False) if args.json else text)
    return OK


# -- errors and the entry point ----------------------------------------------------------------------------
def report(message: str) -> None:
    print(f"sdq: error: {message}", file=sys.stderr, flush=True)


def hint(message: str) -> None:
    """A note for the person at the terminal, on stderr: stdout stays what a script reads."""
    print(f"sdq: {message}", file=sys.stderr, flush=True)


def describe(error: SdqError, config: Config) -> str:
    """The one line an error is reported with; a 401 says where a key comes from when none was set."""
    if isinstance(error, Unauthorized) and not config.key:
        return f"{error} (no API key: use --key, {ENV_KEY} or `key` in {default_path()})"
    return str(error)


def dispatch(config: Config, args: argparse.Namespace) -> int:
    if args.command == "generate":
        return run_generate(config, args)
    with Client(config.url, config.key, timeout=config.timeout, retries=config.retries, header=config.header) as client:
        if args.command == "watch":
            return run_watch(client, args)
        if args.command == "train":
            return run_train(client, args)
        return run_simple(client, args)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    config = Config()
    try:
        config = load({"url": args.url, "key": args.key, "timeout": args.timeout, "retries": args.retries},
                      path=args.config)
        return dispatch(config, args)
    except ConfigError as exc:
        report(str(exc))
        return USAGE
    except ConnectionProblem as exc:
        report(str(exc))
        return UNREACHABLE
    except (ApiError, JobFailed) as exc:
        report(describe(exc, config))
        return FAILED
    except OSError as exc:                      # a file to upload or to write that cannot be
        report(str(exc))
        return FAILED
    except KeyboardInterrupt:
        print("", file=sys.stderr)
        return INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
