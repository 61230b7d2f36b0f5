"""``stream-st``: inspect, list, load, benchmark and demo safetensors checkpoints at URLs."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import threading
import time
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from . import __version__
from .dtypes import CAST_NAMES
from .errors import ConfigError
from .location import scrub

if TYPE_CHECKING:
    from .header import Header
    from .plan import Want

EXAMPLES = {
    "inspect": (
        "stream-st inspect https://host/model.safetensors\n"
        "  stream-st inspect --json hf://org/repo            # every shard of a repo\n"
        "  stream-st inspect s3://bucket/model/model.safetensors.index.json"
    ),
    "ls": "stream-st ls hf://org/repo\n  stream-st ls s3://bucket/checkpoints/step-1000/",
    "load": (
        "stream-st load https://host/model.safetensors --select 'model.layers.0.*' --dtype f16\n"
        "  stream-st load s3://bucket/model/ --device cuda\n"
        "  stream-st load hf://org/repo/model.safetensors --verify"
    ),
    "bench": "stream-st bench https://host/model.safetensors",
    "digest": (
        "stream-st digest s3://bucket/model/ --output-dir sidecars/\n"
        "  aws s3 cp sidecars/ s3://bucket/model/ --recursive    # next to the files they describe"
    ),
    "demo": "stream-st demo",
}

# Longer descriptions, for the subcommands whose one-line help does not say what their numbers mean.
DETAILS = {
    "bench": (
        "raw ranged GETs: the requests load_file makes (header reads, then the tensor bytes in the same parts),\n"
        "sent by stream_st's own engine and sources (same connections, concurrency and retries), but read into\n"
        "one reused scratch buffer per thread instead of tensors: the ceiling of this client on this network.\n"
        "stream_st.load_file: the same checkpoint loaded into CPU tensors. GB/s: bytes received (raw) or tensor\n"
        "bytes (load_file) per second. The ratio, load_file's seconds over the raw read's (last: their medians\n"
        "over --repeats runs), is what allocation, copies and torch add to the transfer; near 1.00× the network\n"
        "or the server is the limit."
    ),
}


def _size(nbytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if nbytes < 1024:
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.2f} {unit}"
        nbytes /= 1024
    return f"{nbytes:.2f} TiB"


def _storage_options(args: argparse.Namespace) -> dict[str, Any] | None:
    from .config import json_object

    raw = getattr(args, "storage_options", None)
    return json_object(raw, "--storage-options") if raw else None


async def _open_all(url: str, storage_options: dict[str, Any] | None) -> list[Any]:
    """Every file of the checkpoint at ``url``, headers read and validated."""
    from .api import open_files
    from .config import Config

    async with open_files(url, Config.from_env(), storage_options) as checkpoint:
        files = await checkpoint.files(checkpoint.shards)
        return [(file.url, file.header) for file in files]


def cmd_inspect(args: argparse.Namespace) -> int:
    files = asyncio.run(_open_all(args.url, _storage_options(args)))
    if args.json:
        document = [
            {
                "url": url,
                "file_size": header.file_size,
                "header_size": header.header_size,
                "metadata": header.metadata,
                "tensors": [
                    {"name": t.name, "dtype": t.dtype, "shape": list(t.shape), "offsets": [t.start, t.end]}
                    for t in header
                ],
            }
            for url, header in files
        ]
        print(json.dumps(document[0] if len(document) == 1 else document, indent=2))
        return 0
    tensors = sum(len(header) for _, header in files)
    data = sum(header.data_size for _, header in files)
    for url, header in files:
        if len(files) > 1:
            print(f"\n== {url}")
        width = max((len(t.name) for t in header), default=4)
        print(f"{'name':<{width}}  {'dtype':<8} {'shape':<22} {'bytes':>12}  offsets")
        for t in header:
            print(f"{t.name:<{width}}  {t.dtype:<8} {str(list(t.shape)):<22} {t.nbytes:>12}  [{t.start}, {t.end})")
        if header.metadata:
            print("metadata: " + json.dumps(header.metadata))
    print(f"\n{tensors} tensors in {len(files)} file(s), {_size(data)} of data")
    return 0


def cmd_ls(args: argparse.Namespace) -> int:
    files = asyncio.run(_open_all(args.url, _storage_options(args)))
    for url, header in files:
        print(f"{_size(header.file_size):>12}  {len(header):>6} tensors  {url}")
    print(f"{_size(sum(h.file_size for _, h in files)):>12}  {sum(len(h) for _, h in files):>6} tensors  total")
    return 0


async def _timed_load(
    url: str,
    selection: list[str] | None,
    dtype: Any,
    device: str,
    storage_options: dict[str, Any] | None,
    progress: bool | None = None,
    verify: bool | str | None = None,
    early: Any = None,
    started: float | None = None,
) -> dict[str, Any]:
    """Stream and report what it cost: seconds, bytes, requests, and time to first tensor. With ``verify``
    the load is one ``load_file`` (a whole file is hashed as it streams), so no tensor comes first.
    ``early``: the prefetch started at ``started``, before torch was imported (its bytes are counted)."""
    from .api import iter_tensors_async, load_file_async
    from .fetch import Stats

    stats = Stats()
    started = time.perf_counter() if started is None else started
    first: float | None = None
    tensors: dict[str, Any] = {}
    options: dict[str, Any] = {"tensors": selection, "dtype": dtype, "storage_options": storage_options}
    options |= {"progress": progress, "stats": stats}
    if verify:
        tensors = await load_file_async(url, device, verify=verify, **options)
    else:
        async for name, tensor in iter_tensors_async(url, device, **options):
            if first is None:
                first = time.perf_counter() - started
            tensors[name] = tensor
    seconds = time.perf_counter() - started
    if early is not None:
        early.finish(stats)
    return {
        "tensors": tensors,
        "seconds": seconds,
        "first_tensor_seconds": first if first is not None else seconds,
        "bytes": stats.bytes,
        "requests": stats.requests,
        "retries": stats.retries,
        "tensor_bytes": sum(t.numel() * t.element_size() for t in tensors.values()),
    }


def _print_report(report: dict[str, Any]) -> None:
    seconds = report["seconds"]
    print(
        f"loaded {len(report['tensors'])} tensors, {_size(report['tensor_bytes'])} in {seconds:.3f} s "
        f"({report['tensor_bytes'] / seconds / 1e9:.2f} GB/s); {report['requests']} requests, "
        f"{_size(report['bytes'])} pulled, {report['retries']} retries; "
        f"first tensor after {report['first_tensor_seconds'] * 1e3:.1f} ms"
    )


def cmd_load(args: argparse.Namespace) -> int:
    from .prefetcher import start_before_torch

    started = time.perf_counter()
    options = _storage_options(args)
    early = start_before_torch(args.url, args.device, {"tensors": args.select, "storage_options": options})

    from .arguments import cast_target

    dtype = cast_target(args.dtype)
    from .errors import IntegrityWarning

    progress = False if args.no_progress else None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", IntegrityWarning)
        load = _timed_load(args.url, args.select, dtype, args.device, options, progress, args.verify, early, started)
        try:
            report = asyncio.run(load)
        except BaseException:
            if early is not None:
                early.cancel()
            raise
    _print_report(report)
    if args.verify:
        unverified = [str(w.message) for w in caught if issubclass(w.category, IntegrityWarning)]
        print("\n".join(f"NOT verified: {why}" for why in unverified) or "verified: every byte matched its digest")
    return 0


async def _raw_read(url: str, storage_options: dict[str, Any] | None) -> tuple[float, int, bool]:
    """The requests ``load_file`` makes (header reads, then the tensor bytes they did not hold), sent by the
    engine that sends them (same sources, connections, parts, retries, every file at once) but read into
    one reused scratch buffer per worker thread instead of tensors: the network ceiling as this client
    sees it, without allocation, copies or torch. Returns seconds, bytes received, and whether every
    server honoured Range."""
    from ._loop import gather_or_cancel
    from .api import open_files
    from .config import Config

    config = Config.from_env()
    scratch = threading.local()

    def into_scratch(_: object) -> memoryview:  # called on the worker thread that reads the part
        buffer: memoryview | None = getattr(scratch, "buffer", None)
        if buffer is None:
            buffer = scratch.buffer = memoryview(bytearray(config.part_size))
        return buffer

    started = time.perf_counter()
    async with open_files(url, config, storage_options) as checkpoint:
        files = await checkpoint.files(checkpoint.shards)
        fetch = checkpoint.engine.fetch
        reads = [
            fetch(f.source, _scratch_wants(f.header, len(f.fetched_prefix()), config.part_size), into_scratch)
            for f in files
        ]
        await gather_or_cancel(*reads)
        seconds, total = time.perf_counter() - started, checkpoint.engine.stats.bytes
    return seconds, total, all(file.source.ranges for file in files)


def _scratch_wants(header: Header, have: int, part_size: int) -> list[Want]:
    """Every tensor's bytes from byte ``have`` on (those before came with the header), as spans of at most
    ``part_size`` that each land at offset 0 of the scratch buffer. The engine plans the same parts from
    them as from whole tensors (contiguous spans coalesce), and no byte lands past ``part_size``."""
    from .plan import Want

    spans = [(t.name, max(t.start, have), t.end) for t in header]
    return [
        Want((name, at), at, min(at + part_size, end))
        for name, start, end in spans
        for at in range(start, end, part_size)
    ]


def cmd_bench(args: argparse.Namespace) -> int:
    from .api import load_file

    options = _storage_options(args)
    rows = []
    ranges = True
    for _ in range(args.repeats):
        raw_seconds, raw_bytes, ranges = asyncio.run(_raw_read(args.url, options))
        started = time.perf_counter()
        loaded = load_file(args.url, storage_options=options, progress=False)
        seconds = time.perf_counter() - started
        nbytes = sum(t.numel() * t.element_size() for t in loaded.values())
        del loaded
        rows.append((raw_seconds, seconds))
        print(
            f"raw ranged GETs: {raw_seconds:.3f} s ({raw_bytes / raw_seconds / 1e9:.2f} GB/s)   "
            f"stream_st.load_file: {seconds:.3f} s ({nbytes / seconds / 1e9:.2f} GB/s)   "
            f"ratio {seconds / raw_seconds:.2f}×"
        )
    raw = sorted(r for r, _ in rows)[len(rows) // 2]
    ours = sorted(s for _, s in rows)[len(rows) // 2]
    print(f"median over {len(rows)}: stream_st takes {ours / raw:.2f}× the raw read of the same bytes")
    if not ranges:
        print(
            "the server ignores Range requests: both reads streamed whole objects, so this ratio says nothing "
            "about ranged reads"
        )
    return 0


async def _digest(url: str, storage_options: dict[str, Any] | None) -> list[tuple[str, str]]:
    """Stream each file of the checkpoint once; return (file URL, sidecar JSON) pairs, hashed by the code
    that checks them (``Sidecar.of_file``), so that what this writes is what ``verify=`` expects."""
    from .api import open_files
    from .config import Config
    from .integrity import Memory, Sidecar

    sidecars = []
    async with open_files(url, Config.from_env(), storage_options) as checkpoint:
        for file in await checkpoint.files(checkpoint.shards):
            header = file.header
            outputs = await file.load((name, None) for name in header.offset_keys())
            views = {name: out.view() for name, out in outputs.items()}
            segments: list[tuple[int, int, Memory]] = [(0, header.data_start, file.header_bytes())]
            segments += [(t.start, t.end, views[t.name]) for t in header if t.nbytes]
            tensors = [(name, header.tensors[name].nbytes, views[name]) for name in header.offset_keys()]
            sidecar = Sidecar.of_file(file.url, header.file_size, segments, tensors)
            del outputs, views, segments, tensors  # before the next file lands
            sidecars.append((file.url, sidecar.dumps()))
    return sidecars


def cmd_digest(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .integrity import SIDECAR_SUFFIX, sidecar_location

    sidecars = asyncio.run(_digest(args.url, _storage_options(args)))
    folder = Path(args.output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    for url, text in sidecars:
        name = sidecar_location(url).name  # decoded: a name on disk, never a path that leaves --output-dir
        if "/" in name or "\\" in name:
            raise ConfigError(f"{url}: cannot name a sidecar file after it")
        target = folder / name
        target.write_text(text)
        print(f"{target}  (sha256 {json.loads(text)['sha256']} of {url})")
    print(f"put each sidecar next to its file (<file>{SIDECAR_SUFFIX}) to make loads of it verifiable")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    import safetensors.torch
    import torch

    from .demo import demo_url

    with demo_url() as (url, path):
        print(f"demo checkpoint: {_size(path.stat().st_size)} served at {url}")
        report = asyncio.run(_timed_load(url, None, None, "cpu", None))
        _print_report(report)
        expected = safetensors.torch.load_file(str(path))
        same = report["tensors"].keys() == expected.keys() and all(
            torch.equal(report["tensors"][n].view(torch.uint8), t.view(torch.uint8)) for n, t in expected.items()
        )
        print(f"bit-exact against safetensors.torch.load_file: {'yes' if same else 'NO'}")
        partial = asyncio.run(_timed_load(url, ["model.layers.1.*"], None, "cpu", None))
        print("partial load of model.layers.1.*: ", end="")
        _print_report(partial)
    return 0 if same else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stream-st", description="Stream safetensors checkpoints from URLs.")
    parser.add_argument("--version", action="version", version=f"stream-st {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    commands = parser.add_subparsers(dest="command", required=True)

    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(
            name,
            help=help_text,
            description=f"{help_text}\n\n{DETAILS[name]}" if name in DETAILS else help_text,
            epilog=f"example:\n  {EXAMPLES[name]}",
            formatter_class=argparse.RawTextHelpFormatter,
        )
        if name != "demo":
            sub.add_argument("url", help="a file, index.json, folder or repo: https://, s3://, gs://, hf://, path")
            sub.add_argument("--storage-options", help="JSON passed to fsspec (credentials, endpoint)")
        return sub

    inspect = command("inspect", "print the header: tensors, dtypes, shapes, offsets, metadata")
    inspect.add_argument("--json", action="store_true", help="machine-readable output")
    inspect.set_defaults(run=cmd_inspect)
    command("ls", "list the safetensors files of a checkpoint with sizes").set_defaults(run=cmd_ls)
    load = command("load", "stream tensors and report bytes, requests, seconds and GB/s")
    load.add_argument("--select", action="append", help="name or glob of tensors to load (repeatable)")
    load.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 ...")
    names = ", ".join(CAST_NAMES)
    load.add_argument("--dtype", choices=CAST_NAMES, metavar="DTYPE", help=f"cast floating tensors: {names}")
    load.add_argument("--no-progress", action="store_true", help="no progress bar")
    load.add_argument(
        "--verify",
        nargs="?",
        const=True,
        type=lambda value: True if value == "true" else value,
        metavar="DIGEST",
        help="check the bytes: the store's digest or a sidecar; 'strict'; or 'sha256:<hex>' of the file",
    )
    load.set_defaults(run=cmd_load)
    digest = command("digest", "write <file>.sha256.json: the sha256 of each file and of each tensor")
    digest.add_argument("--output-dir", default=".", help="where to write the sidecars (default: here)")
    digest.set_defaults(run=cmd_digest)
    bench = command("bench", "stream_st against a raw ranged-GET read of the same bytes, as a ratio")
    bench.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="runs of both reads (default 3); the ratio of their medians is printed last",
    )
    bench.set_defaults(run=cmd_bench)
    command("demo", "serve a small checkpoint on 127.0.0.1, stream it, check it against safetensors").set_defaults(
        run=cmd_demo
    )
    from .cache_cli import register as register_cache_commands

    register_cache_commands(commands)  # stream-st download, stream-st cache ls | prune | rm
    return parser


def _verify_as_flag(argv: Sequence[str]) -> list[str]:
    """``--verify`` takes an optional value: only 'strict' or 'sha256:<hex>' are one, so ``load --verify URL``
    verifies URL instead of taking URL for a digest."""
    out = list(argv)
    for index, arg in enumerate(out):
        following = out[index + 1] if index + 1 < len(out) else ""
        if arg == "--verify" and following != "strict" and not following.startswith("sha256:"):
            out[index] = "--verify=true"
    return out


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(_verify_as_flag(sys.argv[1:] if argv is None else argv))
    if args.debug:
        import logging

        logging.basicConfig(level=logging.DEBUG, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        return int(args.run(args))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if args.debug:
            raise
        # Messages carry display forms of URLs already; a third-party error may not: scrub the URL given.
        print(f"stream-st: error: {scrub(str(exc), getattr(args, 'url', '') or '')}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
